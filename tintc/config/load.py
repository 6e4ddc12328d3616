"""Loading a model.yaml: YAML syntax, the schema and the cross-field checks, with every problem
of all three reported at once as `file:line: dotted.key: got VALUE; allowed: WHAT`.

1. YAML syntax (and duplicate keys), on the node tree so that lines are known;
2. the schema (schema.py: pydantic, unknown keys forbidden everywhere);
3. cross-field checks that need the Hugging Face config of the family (cross_checks.py:
   unknown HF keys, hidden size vs. prefixes and heads, top-N vs. number of layers).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from ir.errors import ConfigError
from tintc.config.cross_checks import cross_checks
from tintc.config.schema import Loc, TintcConfig, show

def load_config(path: str | Path) -> TintcConfig:
    """Read and check a model.yaml; raise ConfigError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: byte {err.start} is not UTF-8 ({err.reason}); allowed: a UTF-8 text file") from None
    return parse_config(text, filename=str(path))


def parse_config(text: str, filename: str = "<string>", base_dir: str | Path | None = None) -> TintcConfig:
    """Check YAML text as a config.

    Relative paths in it resolve against `base_dir`, by default the directory of
    `filename` (or the current directory for "<string>").
    """
    source = None if filename == "<string>" else Path(filename)
    if base_dir is None:
        base_dir = source.parent if source is not None else Path.cwd()
    base = Path(base_dir).resolve()
    try:
        _no_aliases(text, filename)  # before any walk: aliases can expand exponentially
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        line = mark.line + 1 if mark is not None else 1
        what = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{filename}:{line}: YAML syntax error: {what}") from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        raise ConfigError(f"{filename}:1: got {got}; allowed: a mapping with keys model, tint, eval, output")

    problems: list[tuple[Loc, str]] = _duplicate_keys(root)
    config = None
    try:
        config = TintcConfig.model_validate(data)
    except ValidationError as err:
        problems += [(tuple(e["loc"]), _explain(e)) for e in err.errors()]
    problems += cross_checks(data, base)
    if problems:
        lines = sorted((_line_of(root, loc), _dotted(loc), msg) for loc, msg in problems)
        raise ConfigError([f"{filename}:{line}: {key}: {msg}" for line, key, msg in lines])
    config._source = source.resolve() if source is not None else None
    config._base_dir = base
    return config


# --- turning pydantic errors into "got X; allowed: Y" -------------------------------


def _explain(error: dict) -> str:
    loc, kind, ctx = tuple(error["loc"]), error["type"], error.get("ctx") or {}
    if kind == "missing":
        return f"missing; allowed: {_field_allowed(loc) or 'a value'}"
    if kind == "extra_forbidden":
        return "unknown key; allowed: " + " | ".join(_model_at(loc[:-1]).model_fields)
    if "allowed" in ctx:
        allowed = ctx["allowed"]
    elif kind == "literal_error":
        allowed = " | ".join(re.findall(r"'([^']*)'", str(ctx.get("expected", ""))))
    else:
        allowed = _field_allowed(loc) or error["msg"]
    return f"got {show(error.get('input'))}; allowed: {allowed}"


def _model_at(loc: Loc) -> type[BaseModel]:
    """The schema class that holds the keys at `loc` (a path of nested model fields)."""
    cls: type[BaseModel] = TintcConfig
    for part in loc:
        if part not in cls.model_fields:
            break
        annotation = _schema_class(cls.model_fields[part].annotation)
        cls = annotation if annotation is not None else cls
    return cls


def _schema_class(annotation) -> type[BaseModel] | None:
    """The schema class of a field's annotation, `X | None` included; None for plain values."""
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _field_allowed(loc: Loc) -> str | None:
    keys = [part for part in loc if isinstance(part, str)]
    if not keys:
        return None
    holder = _model_at(tuple(keys[:-1]))
    field = holder.model_fields.get(keys[-1])
    if field is None:
        return None
    if field.description:
        return field.description
    if _schema_class(field.annotation) is not None:
        return "a mapping with keys " + " | ".join(_schema_class(field.annotation).model_fields)
    args = getattr(field.annotation, "__args__", ())
    return " | ".join(str(a) for a in args) or None


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


# --- YAML node tree: lines and duplicate keys ---------------------------------------


def _no_aliases(text: str, filename: str) -> None:
    """Refuse anchors and aliases, reading the event stream (linear in the text)."""
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            what = f"alias *{event.anchor}" if isinstance(event, yaml.AliasEvent) else f"anchor &{event.anchor}"
            raise ConfigError(f"{filename}:{event.start_mark.line + 1}: got YAML {what}; allowed: plain values "
                              "(anchors and aliases are not supported)")


def _line_of(root: yaml.Node | None, loc: Loc) -> int:
    """The line of the deepest key of `loc` present in the file (1 if none)."""
    line, node = 1, root
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:  # the last one wins, as in yaml.safe_load
                if key.value == str(part):
                    line, child = key.start_mark.line + 1, value
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line


def _duplicate_keys(node: yaml.Node | None, loc: Loc = ()) -> list[tuple[Loc, str]]:
    problems: list[tuple[Loc, str]] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            if key.value in seen:
                problems.append(
                    (loc + (key.value,), f"duplicate key (first on line {seen[key.value]}); allowed: each key once")
                )
            seen.setdefault(key.value, key.start_mark.line + 1)
            problems += _duplicate_keys(value, loc + (key.value,))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems += _duplicate_keys(item, loc + (i,))
    return problems

