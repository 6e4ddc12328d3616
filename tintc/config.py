"""The model.yaml file: schema, loading, and errors that point at file:line.

Loading runs in three steps and reports every problem of all three at once:

1. YAML syntax (and duplicate keys), on the node tree so that lines are known;
2. the schema below (pydantic, unknown keys forbidden everywhere);
3. cross-field checks that need the Hugging Face config of the family (unknown HF keys,
   hidden size vs. prefixes and heads, top-N vs. number of layers).

Each problem reads `file:line: dotted.key: got VALUE; allowed: WHAT`.
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from ir.errors import ConfigError

# A problem before formatting: where it is (keys and list indices from the top) and what.
Loc = tuple[str | int, ...]

# The parameter kinds of a layer that training may update, and the paper's default set.
Kind = Literal["attn_q", "attn_k", "attn_v", "attn_o", "mlp_in", "mlp_out", "mlp_gate", "mlp_up", "mlp_down",
               "norm_gain", "norm_bias", "qk_norm_gain"]
PARAM_KINDS: tuple[str, ...] = get_args(Kind)
PAPER_KINDS = ("attn_v", "attn_o", "mlp_in", "mlp_out", "norm_bias")

LAYERS_PATTERN = re.compile(r"\A(all|top-(\d+))\Z")
LAYERS_ALLOWED = "all | top-N with N >= 1"

# Finite bounds on the numeric settings: what a 24 GiB machine can compile in reasonable time
# (each SGD step unrolls the whole backward into the TinT), and what stays finite in float32.
MAX_SEED = 2**32 - 1  # torch.manual_seed's range on every platform
MAX_STEPS = 64
MAX_LR = 1.0e3
MAX_SCALE = 1.0e6
MAX_SIZE = 8192  # hidden sizes, widths, ranks, K
MAX_LENGTH = 4096
MAX_LAYERS = 96
MAX_VOCAB = 1_000_000


def _not_allowed(allowed: str) -> PydanticCustomError:
    """A validator error whose `allowed` text the formatter prints as is."""
    return PydanticCustomError("not_allowed", "allowed: {allowed}", {"allowed": allowed})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- schema -------------------------------------------------------------------------
# Every leaf field's `description` is the "allowed" text shown when its value is wrong.


class ModelSpec(_Strict):
    family: str = Field(
        description="a supported family (gpt2 | opt | llama | qwen2 | mistral | gpt_neox | phi3 | olmo2)")
    config: dict[str, Any] | None = Field(None, description="a mapping of HF config keys to values")
    path: str | None = Field(None, description="a local save_pretrained directory")
    seed: int = Field(0, ge=0, le=MAX_SEED, strict=True, description=f"an integer from 0 to {MAX_SEED}")

    @field_validator("family")
    @classmethod
    def _known_family(cls, family: str) -> str:
        from ir.frontend import ADAPTERS  # lazy: the frontend imports torch and transformers

        if family not in ADAPTERS:
            raise _not_allowed(" | ".join(sorted(ADAPTERS)))
        return family


class TrainSpec(_Strict):
    layers: str = Field("all", description=LAYERS_ALLOWED)
    steps: int = Field(1, ge=1, le=MAX_STEPS, strict=True, description=f"an integer from 1 to {MAX_STEPS}")
    lr: float = Field(1.0e-3, gt=0, le=MAX_LR, allow_inf_nan=False, description=f"a finite number > 0, at most {MAX_LR:g}")
    loss: Literal["context", "label_only"] = "context"
    kinds: list[Kind] = Field(
        default_factory=lambda: list(PAPER_KINDS),
        min_length=1,
        description="a non-empty list without repeats of: " + " | ".join(PARAM_KINDS),
    )

    @field_validator("layers")
    @classmethod
    def _layers_form(cls, layers: str) -> str:
        match = LAYERS_PATTERN.match(layers)
        if match is None or (match.group(2) is not None and int(match.group(2)) < 1):
            raise _not_allowed(LAYERS_ALLOWED)
        return layers

    @field_validator("kinds")
    @classmethod
    def _no_repeats(cls, kinds: list[str]) -> list[str]:
        if len(set(kinds)) != len(kinds):
            raise _not_allowed("each of " + " | ".join(PARAM_KINDS) + " at most once")
        return kinds

    def top_n(self) -> int | None:
        """N of `top-N`, or None for `all`."""
        match = LAYERS_PATTERN.match(self.layers)
        return int(match.group(2)) if match and match.group(2) else None


class ApproximationSpec(_Strict):
    attention: Literal["stop_gradient", "exact"] = "stop_gradient"
    layer_norm: Literal["finite_difference", "exact"] = "finite_difference"
    activation: Literal["finite_difference", "exact"] = "finite_difference"
    scale: float = Field(1000.0, gt=0, le=MAX_SCALE, allow_inf_nan=False,
                         description=f"a finite number > 0, at most {MAX_SCALE:g}")


def _default_width(hidden: int) -> int:
    """The default head and chunk width: the largest divisor of the hidden size up to 256."""
    return max(w for w in range(1, min(hidden, 256) + 1) if hidden % w == 0)


class PassSpec(_Strict):
    enabled: bool = Field(True, strict=True, description="true | false")


class WidthPassSpec(PassSpec):
    width: int | None = Field(None, ge=1, le=MAX_SIZE, strict=True,
                              description=f"an integer from 1 to {MAX_SIZE}, or null for the default")


class LowRankSpec(PassSpec):
    enabled: bool = Field(False, strict=True, description="true | false")
    rank: int = Field(64, ge=1, le=MAX_SIZE, strict=True, description=f"an integer from 1 to {MAX_SIZE}")


class PassesSpec(_Strict):
    """The optimisation passes (ir/passes/), each switchable, with its knobs."""

    prefix_stacking: PassSpec = Field(default_factory=PassSpec)  # its knob is tint.prefixes (K)
    head_splitting: WidthPassSpec = Field(default_factory=WidthPassSpec)  # width: largest divisor of D <= 256
    sub_mlp: WidthPassSpec = Field(default_factory=WidthPassSpec)  # width: the head-splitting width
    block_sharing: PassSpec = Field(default_factory=PassSpec)
    low_rank: LowRankSpec = Field(default_factory=LowRankSpec)  # off by default


class TintSpec(_Strict):
    prefixes: int = Field(16, ge=1, le=MAX_SIZE, strict=True, description="an integer >= 1 that divides the hidden size")
    train: TrainSpec = Field(default_factory=TrainSpec)
    approximations: ApproximationSpec = Field(default_factory=ApproximationSpec)
    dtype: Literal["float32", "float64"] = "float32"
    passes: PassesSpec = Field(default_factory=PassesSpec)
    max_length: int | None = Field(None, ge=2, le=MAX_LENGTH, strict=True,
                                   description="an integer >= 2: the longest input the TinT takes "
                                               "(default: the aux model's, at most 256)")


MAX_SHOTS = 64


class ClassifySpec(_Strict):
    """`tintc eval --task classify`: how an example becomes a prompt, and the label words."""

    template: str = Field(description="a string holding {text} once, e.g. 'Review: {text}\\nSentiment:'")
    labels: dict[str | int, str] = Field(
        min_length=2, description="a mapping of at least 2 label values (as in the data) to distinct, non-empty "
                                  "label words")
    separator: str = Field("\n\n", description="a string: what follows each demonstration's label word")
    shots: int = Field(4, ge=1, le=MAX_SHOTS, strict=True, description=f"an integer from 1 to {MAX_SHOTS}: k, "
                                                                       "the demonstrations (zero-shot is always run)")
    seed: int = Field(0, ge=0, le=MAX_SEED, strict=True, description=f"an integer from 0 to {MAX_SEED}")
    examples: int | None = Field(None, ge=1, strict=True,
                                 description="an integer >= 1: test examples drawn with seed, or null for all")

    @field_validator("template")
    @classmethod
    def _one_slot(cls, template: str) -> str:
        if template.count("{text}") != 1:
            raise _not_allowed("a string holding {text} exactly once")
        return template

    @field_validator("labels")
    @classmethod
    def _distinct_words(cls, labels: dict) -> dict:
        words = list(labels.values())
        if any(isinstance(k, bool) for k in labels) or "" in words or len(set(words)) != len(words):
            raise _not_allowed("a mapping of at least 2 label values (strings or integers) to distinct, "
                               "non-empty label words")
        return labels


class EvalSpec(_Strict):
    classify: ClassifySpec | None = None


class TintcConfig(_Strict):
    model: ModelSpec
    tint: TintSpec = Field(default_factory=TintSpec)
    eval: EvalSpec | None = None
    output: str | None = Field(None, description="a directory path (default: build/<config name>)")

    _source: Path | None = PrivateAttr(None)  # the YAML file, None when parsed from a string
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)  # relative paths resolve against it

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    def name(self) -> str:
        """A short name for titles and graphs: the YAML file's stem, else the model family."""
        return self._source.stem if self._source else self.model.family

    @property
    def source_key(self) -> str:
        """A digest of the settings and the model path: which config a file in the output came from."""
        import hashlib

        text = json.dumps([self.model_dump(mode="json"), str(self.resolved_model_path)], sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    @property
    def resolved_output(self) -> Path:
        if self.output is not None:
            return (self.base_dir / self.output).resolve()
        return (self.base_dir / "build" / self.name).resolve()

    @property
    def resolved_model_path(self) -> Path | None:
        return None if self.model.path is None else (self.base_dir / self.model.path).resolve()

    @property
    def torch_dtype(self):
        import torch

        return {"float32": torch.float32, "float64": torch.float64}[self.tint.dtype]

    def max_length(self, aux_max_positions: int) -> int:
        """The longest input the TinT is built for (its one-hot positions have this width)."""
        if self.tint.max_length is None:
            return min(aux_max_positions, 256)
        if self.tint.max_length > aux_max_positions:
            raise ConfigError(f"tint.max_length: got {self.tint.max_length}; allowed: at most the aux model's "
                              f"{aux_max_positions} positions")
        return self.tint.max_length

    def head_width(self, hidden: int) -> int | None:
        """c, the input chunk each head of a simulated linear map reads; None: splitting off."""
        spec = self.tint.passes.head_splitting
        if not spec.enabled:
            return None
        return spec.width or _default_width(hidden)

    def group_width(self, hidden: int) -> int | None:
        """The chunk width of elementwise work on wide values; None: the partition is off."""
        spec = self.tint.passes.sub_mlp
        if not spec.enabled:
            return None
        return spec.width or self.head_width(hidden) or _default_width(hidden)

    def trained_layers(self, n_layer: int) -> list[int]:
        """Indices of the trained layers, ascending: all of them, or the top N."""
        n = self.tint.train.top_n()
        if n is None:
            return list(range(n_layer))
        if n > n_layer:
            raise ConfigError(f"tint.train.layers: got 'top-{n}'; allowed: top-N with N <= {n_layer} layers")
        return list(range(n_layer - n, n_layer))


# --- loading ------------------------------------------------------------------------


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
    problems += _cross_checks(data, base)
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
    return f"got {_show(error.get('input'))}; allowed: {allowed}"


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


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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


# --- cross-field checks on the raw data (so they run even when the schema fails) ----


def _cross_checks(data: dict, base: Path) -> list[tuple[Loc, str]]:
    return _rule_checks(data) + _model_checks(data, base)


def _rule_checks(data: dict) -> list[tuple[Loc, str]]:
    """Kinds that get no gradient under the chosen backward rules."""
    tint = data.get("tint") if isinstance(data.get("tint"), dict) else {}
    train = tint.get("train") if isinstance(tint.get("train"), dict) else {}
    approx = tint.get("approximations") if isinstance(tint.get("approximations"), dict) else {}
    kinds = train.get("kinds", [])
    attention = approx.get("attention", ApproximationSpec.model_fields["attention"].default)
    frozen = [k for k in ("attn_q", "attn_k", "qk_norm_gain") if isinstance(kinds, list) and k in kinds]
    if frozen and attention == "stop_gradient":
        return [(("tint", "train", "kinds"), f"got {', '.join(frozen)} with approximations.attention: stop_gradient, "
                 "under which W_Q, W_K and the q/k norms get no gradient; allowed: approximations.attention: exact, "
                 "or drop them")]
    return []


def _model_checks(data: dict, base: Path) -> list[tuple[Loc, str]]:
    from ir.frontend import ADAPTERS

    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    family = model.get("family")
    if not isinstance(family, str) or family not in ADAPTERS:
        return []  # the schema already reports it; nothing below can be checked
    has_config, has_path = model.get("config") is not None, model.get("path") is not None
    if has_config == has_path:
        loc: Loc = ("model", "path") if has_config else ("model",)
        got = "both model.config and model.path" if has_config else "neither model.config nor model.path"
        return [(loc, f"got {got}; allowed: exactly one of model.config (random init) | model.path")]

    config_class = ADAPTERS[family].config_class
    if has_config:
        problems, hf_config = _hf_config_from_kwargs(config_class, model["config"], ADAPTERS[family].config_keys)
    else:
        problems, hf_config = _hf_config_from_path(config_class, model["path"], base)
    if hf_config is not None and not problems:  # with a misspelt key, the shapes would use defaults
        problems += _shape_checks(data, hf_config, has_config)
    return problems


def _hf_config_keys(config_class, extra: tuple[str, ...] = ()) -> set[str]:
    keys = set(config_class().to_dict()) | set(extra)
    keys |= set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
    keys |= set(getattr(config_class, "attribute_map", {}))
    return keys


def _hf_config_from_kwargs(config_class, kwargs: Any, extra: tuple[str, ...] = ()):
    if not isinstance(kwargs, dict):
        return [], None  # the schema reports the type
    allowed = _hf_config_keys(config_class, extra)
    problems: list[tuple[Loc, str]] = []
    for key in kwargs:
        if key not in allowed:
            name = config_class.__name__
            close = difflib.get_close_matches(str(key), allowed, n=3)
            if close:
                allowed_text = f"a {name} key (closest: {' | '.join(close)})"
            else:
                allowed_text = f"a {name} key: " + " | ".join(sorted(k for k in allowed if not k.startswith("_")))
            problems.append((("model", "config", key), f"unknown {name} key; allowed: {allowed_text}"))
    known = {key: value for key, value in kwargs.items() if key in allowed}
    try:
        return problems, config_class(**known)
    except Exception as err:  # HF validates types field by field; name the field it rejects
        field = re.search(r"field '(\w+)'", str(err))
        expected = re.search(r"expected (.+?), got", str(err))
        loc: Loc = ("model", "config", field.group(1)) if field else ("model", "config")
        got = known.get(field.group(1)) if field else known
        reason = expected.group(1) if expected else str(err).strip().splitlines()[-1].strip()
        return problems + [(loc, f"got {_show(got)}; allowed: {reason}")], None


def _hf_config_from_path(config_class, path: Any, base: Path):
    if not isinstance(path, str):
        return [], None
    directory = (base / path).resolve()
    if not directory.is_dir():
        return [(("model", "path"), f"got {path!r} ({directory}); allowed: an existing local directory")], None
    if not (directory / "config.json").is_file():
        return [(("model", "path"), f"got {path!r}, which has no config.json; allowed: a directory written by "
                 "save_pretrained")], None
    try:
        loaded = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return [(("model", "path"), f"got {path!r}, whose config.json is not JSON ({err}); allowed: a directory "
                 "written by save_pretrained")], None
    if not isinstance(loaded, dict):
        return [(("model", "path"), f"got {path!r}, whose config.json holds a {type(loaded).__name__}; allowed: "
                 "a JSON object written by save_pretrained")], None
    model_type = loaded.get("model_type")
    if model_type != config_class.model_type:
        return [
            (("model", "path"), f"got a {model_type!r} model; allowed: a {config_class.model_type!r} model (model.family)")
        ], None
    try:
        return [], config_class.from_pretrained(directory)
    except Exception as err:  # transformers rejects a bad field anywhere: name the file and why
        return [(("model", "path"), f"got {path!r}, whose config.json {config_class.__name__} rejects "
                 f"({str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}); "
                 "allowed: a config written by save_pretrained")], None


def _shape_checks(data: dict, hf, from_kwargs: bool) -> list[tuple[Loc, str]]:
    """Hidden size vs. heads and prefixes; top-N vs. number of layers."""
    names = dict(getattr(type(hf), "attribute_map", {}))  # canonical name -> the family's own key

    def where(canonical: str) -> Loc:
        return ("model", "config", names.get(canonical, canonical)) if from_kwargs else ("model", "path")

    def key(canonical: str) -> str:
        return "model.config." + names.get(canonical, canonical)

    problems: list[tuple[Loc, str]] = []
    hidden, heads, layers = hf.hidden_size, hf.num_attention_heads, hf.num_hidden_layers
    sizes = (("hidden_size", hidden, 1, MAX_SIZE), ("num_attention_heads", heads, 1, MAX_SIZE),
             ("num_hidden_layers", layers, 1, MAX_LAYERS), ("vocab_size", getattr(hf, "vocab_size", None), 1, MAX_VOCAB),
             ("max_position_embeddings", getattr(hf, "max_position_embeddings", None), 2, 1 << 20))
    for canonical, value, low, high in sizes:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            problems.append((where(canonical), f"got {value!r}; allowed: an integer from {low} to {high}"))
    for name, value in hf.to_dict().items():
        if isinstance(value, float) and not math.isfinite(value):
            problems.append((where(name), f"got {value!r}; allowed: a finite number"))
    if problems:
        return problems
    if hidden % heads:
        problems.append(
            (where("num_attention_heads"), f"got {heads}; allowed: a divisor of the hidden size {hidden} ({key('hidden_size')})")
        )

    tint = data.get("tint") if isinstance(data.get("tint"), dict) else {}
    prefixes = tint.get("prefixes", TintSpec.model_fields["prefixes"].default)
    if isinstance(prefixes, int) and not isinstance(prefixes, bool) and prefixes >= 1 and hidden % prefixes:
        divisors = " | ".join(str(d) for d in range(1, hidden + 1) if hidden % d == 0)
        problems.append(
            (("tint", "prefixes"), f"got {prefixes}; allowed: a divisor of the hidden size {hidden} ({key('hidden_size')}): {divisors}")
        )

    train = tint.get("train") if isinstance(tint.get("train"), dict) else {}
    match = LAYERS_PATTERN.match(train.get("layers", "all")) if isinstance(train.get("layers", "all"), str) else None
    if match and match.group(2) and int(match.group(2)) > layers:
        problems.append(
            (("tint", "train", "layers"), f"got {train['layers']!r}; allowed: all | top-N with 1 <= N <= {layers} ({key('num_hidden_layers')})")
        )
    return problems
