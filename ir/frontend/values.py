"""The symbolic values of the recognition walk (recognize.py) and helpers to read fx nodes.

Every node of the exported graph gets one value: the token ids, a constant (computed
from positions alone), an IR value seen through views, a fused projection waiting for its
split, or a partial match of the rotary embedding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import fx

from ..graph import WeightRef

# ops that only change how a tensor is viewed (or are no-ops in eval mode)
LAYOUT = {"view", "reshape", "_unsafe_view", "transpose", "permute", "unsqueeze", "squeeze", "expand",
          "contiguous", "clone", "dropout", "alias", "to", "_to_copy", "type_as", "flatten"}
BOOKKEEPING = {"_assert_tensor_metadata", "_assert_scalar", "sym_size", "sym_constrain_range_for_size"}
# composite modules: their ops (without layout and bookkeeping) -> IR op kind
COMPOSITES = {
    ("pow", "mean", "add", "rsqrt", "mul", "mul"): "rms_norm",
    ("mul", "pow", "mul", "add", "mul", "tanh", "add", "mul"): "gelu_tanh",
    ("mul", "mul", "mul", "mul", "add", "mul", "tanh", "add", "mul"): "gelu_bloom",
    ("pow", "mean", "add", "rsqrt", "mul", "add", "mul"): "rms_norm_offset",  # Gemma 2's x̂·(1 + w)
}


class Ids:
    """The token ids (or a view of them)."""


class Const:
    """A tensor computed without the aux weights or activations: masks, positions, rotary cos/sin."""


@dataclass(frozen=True)
class Val:
    """A tensor equal to IR node `name`'s output; `scale` is a scalar factor applied on the way
    (OPT scales q before attention), `rotary` the rotated width when rotary embedding was applied."""

    name: str
    scale: float = 1.0
    rotary: int = 0
    origin: str = ""  # the fx node that applied the scale


@dataclass(frozen=True)
class Fused:
    """A linear whose output is split (GPT-2's q|k|v) or chunked per head (GPT-NeoX's): emitted
    per part, at the split; a part is rows start:stop, of every `period` rows when set."""

    module: str
    x: Val
    weight: WeightRef
    bias: WeightRef | None
    rows: tuple[int, int] | None = None
    period: int | None = None


@dataclass(frozen=True)
class Rope:
    """A partial match of the rotary embedding of `x`: its cos term, a slice of a head, rotate_half,
    its sin term, or (partial rotary, GPT-NeoX) the rotated first coordinates before the rest joins."""

    stage: str  # cos | half | rotated | sin | rotary_part
    x: Val
    start: int = 0
    stop: int = 0
    negated: bool = False


@dataclass(frozen=True)
class Scores:
    """Eager attention's scores q·kᵀ of heads [.., heads, T, head_dim] (Gemma 2's matmul; BLOOM's baddbmm,
    ALiBi's bias added in it), times `scale`; soft-capped c·tanh(s/c) as `cap` goes "divided" (s/c), "tanh", "capped" (c = softcap);
    `masked` once the causal (or sliding-window) mask is added."""

    q: Val
    k: Val
    heads: int
    head_dim: int
    scale: float = 1.0
    masked: bool = False
    cap: str = ""
    softcap: float | None = None


@dataclass(frozen=True)
class CappedLogits:
    """The head's logits on their way to c·tanh(z/c) (Gemma 2's final soft-capping): `stage` "divided"
    (z/c), then "tanh"; the product with c sets the lm_head op's `softcap`."""

    logits: Val
    softcap: float
    stage: str = "divided"


@dataclass(frozen=True)
class Probs:
    """The softmax of eager attention's scores; `upcast`: the dtype HF's softmax computes in."""

    scores: Scores
    upcast: str | None = None


def op_name(node: fx.Node) -> str:
    target = node.target
    if hasattr(target, "_overloadpacket"):
        return target._overloadpacket.__name__
    return getattr(target, "__name__", str(target))


def module_of(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def source_of(node: fx.Node) -> str:
    """file:line of the Python line that issued the op (the last frame of its stack trace)."""
    frames = re.findall(r'File "([^"]+)", line (\d+)', node.meta.get("stack_trace") or "")
    return f"{frames[-1][0].rsplit('/', 1)[-1]}:{frames[-1][1]}" if frames else "unknown source"


def reaches_attention(node: fx.Node) -> bool:
    """Does this value reach an attention op through views only?"""
    frontier = list(node.users)
    while frontier:
        user = frontier.pop()
        if op_name(user) == "scaled_dot_product_attention":
            return True
        if op_name(user) in LAYOUT:
            frontier += list(user.users)
    return False


def feeds_split(node: fx.Node) -> bool:
    """Does this linear's output reach a split or chunk through views only, or is it sliced
    directly (Phi-3's q|k|v: `qkv[..., :q_width]`; a slice after views is rotate_half's)?"""
    if any(op_name(user) == "slice" for user in node.users):
        return True
    frontier = list(node.users)
    while frontier:
        user = frontier.pop()
        if op_name(user) in ("split", "chunk", "select"):  # select: BLOOM's [heads, 3, head_dim] view
            return True
        if op_name(user) in LAYOUT:
            frontier += list(user.users)
    return False


def normalised_width(run: list[fx.Node]) -> int:
    """The width a norm's mean runs over: its input's last axis, which a view may have cut into heads."""
    mean = next(n for n in run if op_name(n) == "mean")
    return int(mean.args[0].meta["val"].shape[-1])
