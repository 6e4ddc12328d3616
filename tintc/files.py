"""Writing output files so that nothing half-written is left under a final name."""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def write_files(directory, files: dict[str, str | Callable[[Path], None]]) -> list[Path]:
    """Write each file (text, or a function that writes the path it is given) under a temporary
    name, then rename them all; on failure remove the temporary files and keep what was there."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    temporary = {}
    try:
        for name, content in files.items():
            tmp = temporary[name] = directory / f".{name}.tmp"
            if callable(content):
                content(tmp)
            else:
                tmp.write_text(content, encoding="utf-8")
    except BaseException:
        for tmp in temporary.values():
            tmp.unlink(missing_ok=True)
        raise
    for name, tmp in temporary.items():
        tmp.chmod(0o644)
        tmp.replace(directory / name)
    return [directory / name for name in files]
