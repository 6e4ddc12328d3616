"""Results are finite or refused: a NaN or inf anywhere in a command's numbers stops it, naming
the stage (row) and the quantity, instead of printing "nan" in a table."""

from __future__ import annotations

import dataclasses
import math

from ir.errors import TintcError


def non_finite(value, path: str = "") -> str | None:
    """The path of the first NaN or inf in nested dicts, lists, tuples and dataclasses, or None."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return None
    if isinstance(value, (int, float)):
        return None if math.isfinite(value) else f"{path} = {value}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = non_finite(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def require_finite(value, command: str):
    """`value`, or a TintcError naming where in it a NaN or inf is."""
    found = non_finite(value)
    if found is not None:
        raise TintcError(f"{found}: not a finite number; allowed: finite results (a smaller learning rate, a "
                         "longer input, or tint.dtype float64 may keep them finite)", headline=f"{command} error")
    return value
