"""The model.yaml schema: every key, its default, its bounds, and the "allowed" text of its errors.

pydantic checks it with unknown keys forbidden everywhere; each leaf field's `description` is
what an error prints after "allowed:". Loading (file:line errors) is in load.py, the checks
that need the family's Hugging Face config in cross_checks.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ir.errors import ConfigError

# A problem before formatting: where it is (keys and list indices from the top) and what.
Loc = tuple[str | int, ...]

# The parameter kinds of a layer that training may update.
Kind = Literal["attn_q", "attn_k", "attn_v", "attn_o", "mlp_in", "mlp_out", "mlp_gate", "mlp_up", "mlp_down",
               "norm_gain", "norm_bias", "qk_norm_gain"]
PARAM_KINDS: tuple[str, ...] = get_args(Kind)
# What the paper trains: V, O, the MLP's linear maps and the layer norms' bias, named here for both
# MLP forms. A family's default kinds are those of these that its layers have (default_kinds).
PAPER_KINDS = ("attn_v", "attn_o", "mlp_in", "mlp_out", "mlp_gate", "mlp_up", "mlp_down", "norm_bias")

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


class ModelSpec(_Strict):
    family: str = Field(
        description="a supported family (gpt2 | opt | llama | qwen2 | mistral | gpt_neox | phi3 | olmo2"
                    " | qwen3 | bloom | gemma2)")
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
        default_factory=list,  # not given: TintcConfig sets the family's default_kinds
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


# The two named sets of backward rules `tint.approximations` takes as a word: every rule exact (the
# default), or the paper's approximations (stop-gradient attention, finite-difference norms and activations).
RULE_SETS = {"exact": {"attention": "exact", "layer_norm": "exact", "activation": "exact"},
             "paper": {"attention": "stop_gradient", "layer_norm": "finite_difference",
                       "activation": "finite_difference"}}
QUERY_KEY_KINDS = ("attn_q", "attn_k", "qk_norm_gain")  # trained only where attention is exact
APPROXIMATIONS_ALLOWED = "exact | paper | a mapping of attention, layer_norm, activation, scale"


DTYPES_ALLOWED = "float32 | float64 | bfloat16 (the TinT's weights, prefixes and stream)"
BFLOAT16_RULES = ("bfloat16 only with exact layer_norm and activation rules (finite differences at scale N lose every "
                  "digit of its 8-bit mantissa)")


def bfloat16_refusal(dtype: str, rules: dict[str, str]) -> str | None:
    """Why `dtype` cannot run these backward rules, or None: a finite difference at scale N divides a
    difference of two nearly equal bfloat16 numbers (relative step 2^-8) by 1/N, which leaves no digit
    (measured: GPT-2 tiny, updates off by 135-165%)."""
    fd = [name for name in ("layer_norm", "activation") if rules.get(name) == "finite_difference"]
    if dtype == "bfloat16" and fd:
        return f"{' and '.join(fd)} finite_difference"
    return None


class ApproximationSpec(_Strict):
    attention: Literal["stop_gradient", "exact"] = "exact"
    layer_norm: Literal["finite_difference", "exact"] = "exact"
    activation: Literal["finite_difference", "exact"] = "exact"
    scale: float = Field(1000.0, gt=0, le=MAX_SCALE, allow_inf_nan=False,
                         description=f"a finite number > 0, at most {MAX_SCALE:g}")

    @model_validator(mode="before")
    @classmethod
    def _named_set(cls, data: Any) -> Any:
        """`exact` or `paper` for the whole set of rules (RULE_SETS)."""
        if isinstance(data, str):
            if data not in RULE_SETS:
                raise _not_allowed(APPROXIMATIONS_ALLOWED)
            return dict(RULE_SETS[data])
        return data

    @property
    def rules(self) -> dict[str, str]:
        return {"attention": self.attention, "layer_norm": self.layer_norm, "activation": self.activation}

    @property
    def rule_set(self) -> str:
        return rule_set_name(self.rules)


def rule_set_name(rules: dict[str, str]) -> str:
    """Which backward rules run, in a word: exact, paper (RULE_SETS), or the mixture spelled out. `rules` may
    leave out a rule (a training graph without that backward op): the others decide."""
    named = [name for name, named_rules in RULE_SETS.items()
             if rules and all(named_rules[k] == v for k, v in rules.items())]
    return named[0] if named else "mixed (" + ", ".join(f"{k} {v}" for k, v in rules.items()) + ")"


def default_kinds(family: str) -> list[str]:
    """The kinds trained when the config names none: the paper's (PAPER_KINDS) that `family` has.
    GPT-2, OPT, GPT-NeoX: attn_v attn_o mlp_in mlp_out norm_bias; LLaMA, Qwen2, Mistral (a gated
    MLP, RMSNorm): attn_v attn_o mlp_gate mlp_up mlp_down."""
    from ir.frontend import ADAPTERS  # lazy: the frontend imports torch and transformers
    from ir.passes.select_train import KINDS  # kind -> (op roles, weight slots)

    adapter = ADAPTERS[family]
    roles = set()
    for role in adapter.roles.values():  # a fused projection holds a tuple of roles
        roles |= set(role) if isinstance(role, tuple) else {role}
    return [kind for kind in PAPER_KINDS
            if roles & set(KINDS[kind][0]) and (kind != "norm_bias" or adapter.norm_bias)]


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


class SplitMlpSpec(WidthPassSpec):
    enabled: bool = Field(False, strict=True, description="true | false")


class AttentionRowsSpec(PassSpec):
    enabled: bool = Field(False, strict=True, description="true | false")
    heads: int | None = Field(None, ge=1, le=MAX_SIZE, strict=True,
                              description=f"an integer from 1 to {MAX_SIZE}, or null for the default")


class OptInSpec(PassSpec):
    enabled: bool = Field(False, strict=True, description="true | false")


class PassesSpec(_Strict):
    """The optimisation passes (ir/passes/), each switchable, with its knobs."""

    prefix_stacking: PassSpec = Field(default_factory=PassSpec)  # its knob is tint.prefixes (K)
    head_splitting: WidthPassSpec = Field(default_factory=WidthPassSpec)  # width: largest divisor of D <= 256
    sub_mlp: WidthPassSpec = Field(default_factory=WidthPassSpec)  # width: the head-splitting width
    block_sharing: PassSpec = Field(default_factory=PassSpec)
    low_rank: LowRankSpec = Field(default_factory=LowRankSpec)  # off by default
    shared_rows: OptInSpec = Field(default_factory=OptInSpec)  # off by default (backends/torch/allocate.py)
    rematerialise: OptInSpec = Field(default_factory=OptInSpec)  # off by default (ir/passes/rematerialise.py)
    split_mlp: SplitMlpSpec = Field(default_factory=SplitMlpSpec)  # off by default; width: the aux hidden size
    attention_rows: AttentionRowsSpec = Field(default_factory=AttentionRowsSpec)  # off; heads: hidden // T


class TintSpec(_Strict):
    prefixes: int = Field(16, ge=1, le=MAX_SIZE, strict=True, description="an integer >= 1 that divides the hidden size")
    train: TrainSpec = Field(default_factory=TrainSpec)
    approximations: ApproximationSpec = Field(default_factory=ApproximationSpec, description=APPROXIMATIONS_ALLOWED)
    dtype: Literal["float32", "float64", "bfloat16"] = Field("float32", description=DTYPES_ALLOWED)
    passes: PassesSpec = Field(default_factory=PassesSpec)
    max_length: int | None = Field(None, ge=2, le=MAX_LENGTH, strict=True,
                                   description="an integer >= 2: the longest input the TinT takes "
                                               "(default: the aux model's, at most 256)")

    @field_validator("dtype")
    @classmethod
    def _rules_keep_digits(cls, dtype: str, info) -> str:
        approximations = info.data.get("approximations")
        refused = approximations is not None and bfloat16_refusal(dtype, approximations.rules)
        if refused:
            raise _not_allowed(f"float32 | float64 with tint.approximations' {refused}; {BFLOAT16_RULES}")
        return dtype


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

    @model_validator(mode="after")
    def _family_kinds(self) -> TintcConfig:
        if "kinds" not in self.tint.train.model_fields_set:
            self.tint.train.kinds = default_kinds(self.model.family)
        return self

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
        """The dtype the aux model is loaded, traced and compiled in, and its oracles run in: the TinT's,
        except for a bfloat16 TinT, which is compiled in float32 and stored in bfloat16 (tint_dtype)."""
        import torch

        return {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.float32}[self.tint.dtype]

    @property
    def tint_dtype(self):
        """The dtype of the TinT's weights, prefixes and stream."""
        import torch

        return getattr(torch, self.tint.dtype)

    def max_length(self, aux_max_positions: int) -> int:
        """The longest input the TinT is built for (its one-hot positions have this width)."""
        if self.tint.max_length is None:
            return min(aux_max_positions, 256)
        if self.tint.max_length > aux_max_positions:
            raise ConfigError(f"tint.max_length: got {self.tint.max_length}; allowed: at most the aux model's "
                              f"{aux_max_positions} positions")
        return self.tint.max_length

    def with_rules(self, rules: dict[str, str]) -> TintcConfig:
        """This config with the backward rules in `rules` changed (scale kept), and the kinds those rules
        can train: attn_q, attn_k and qk_norm_gain get no gradient under stop_gradient attention."""
        approximations = self.tint.approximations.model_copy(update=rules)
        refused = bfloat16_refusal(self.tint.dtype, approximations.rules)
        if refused:
            raise ConfigError(f"tint.dtype: got bfloat16 with the rules {approximations.rule_set}; allowed: "
                              f"float32 | float64 with {refused}; {BFLOAT16_RULES}")
        kinds = [k for k in self.tint.train.kinds if approximations.attention == "exact" or k not in QUERY_KEY_KINDS]
        tint = self.tint.model_copy(update={"approximations": approximations,
                                            "train": self.tint.train.model_copy(update={"kinds": kinds})})
        return self.model_copy(update={"tint": tint})

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

    def split_width(self, hidden: int) -> int | None:
        """The width of each sub-MLP an FFN is split into; None: the split is off."""
        spec = self.tint.passes.split_mlp
        return (spec.width or hidden) if spec.enabled else None

    def row_heads(self, hidden: int, length: int) -> int | None:
        """The aux heads whose attention rows the backward makes at a time; None: all at once."""
        spec = self.tint.passes.attention_rows
        return (spec.heads or max(1, hidden // length)) if spec.enabled else None

    def trained_layers(self, n_layer: int) -> list[int]:
        """Indices of the trained layers, ascending: all of them, or the top N."""
        n = self.tint.train.top_n()
        if n is None:
            return list(range(n_layer))
        if n > n_layer:
            raise ConfigError(f"tint.train.layers: got 'top-{n}'; allowed: top-N with N <= {n_layer} layers")
        return list(range(n_layer - n, n_layer))



def show(value: Any) -> str:
    """A value as an error message quotes it: its repr, cut at 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
