"""The closed set of IR op kinds: for each, its inputs, attributes, weight slots and shape rule.

Shapes are tuples whose entries are ints or the symbol "T" (sequence length). Every
op works per sequence; a batch dimension is implicit and handled by the interpreter.
Node attributes that every op may carry besides its own (for reports and error
messages): `module` (HF module path), `layer` (aux layer index, -1 outside layers),
`role` (what the op is in the aux model, e.g. "q", "mlp_in", "ln_attn"), `train`
(the weight slots that SGD updates, comma-separated; set by passes/select_train.py),
and the construction choices the optimisation passes make for the backend:
`prefixes` (K prefix tokens for the op's weight: passes/prefix_stacking.py),
`head_width` (the input chunk each head reads: passes/head_splitting.py) and
`group_width` (the chunk width of elementwise work: passes/sub_mlp.py) and `row_heads` (the aux heads
whose attention rows a stop-gradient attention backward makes at a time: passes/attention_rows.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

T = "T"
COMMON_ATTRS = {"module": str, "layer": int, "role": str, "train": str, "prefixes": int, "head_width": int,
                "group_width": int, "row_heads": int}

ACTIVATIONS = ("gelu_tanh", "gelu", "relu", "silu", "gelu_bloom")  # gelu_tanh = GPT-2's gelu_new
# none: absolute positions are added by pos_embed; rope: q and k are rotated inside attention;
# alibi: each head's scores get m_h·j for key j (BLOOM; rules.alibi_bias)
POSITION_SCHEMES = ("none", "rope", "alibi")
MASKS = ("train", "label")
BACKWARD_RULES = ("finite_difference", "exact")  # layer norm and activation backward
ATTENTION_RULES = ("stop_gradient", "exact")  # attention backward: scores constant, or differentiated


@dataclass(frozen=True)
class OpSpec:
    kind: str
    inputs: int  # number of graph inputs
    attrs: dict[str, type]  # required attributes of this kind
    weights: tuple[str, ...]  # weight slots, in print order
    infer: Callable  # (input shapes, attrs, weight shapes by slot) -> output shape or error str
    doc: str
    optional_weights: tuple[str, ...] = field(default=())  # slots that may be absent
    optional_attrs: dict[str, type] = field(default_factory=dict)  # attributes that may be absent


def _input(shapes, attrs, w):
    return (T,)


def _embed(shapes, attrs, w):
    (ids,) = shapes
    if ids != (T,):
        return f"expects token ids of shape [T], got {list(ids)}"
    return (T, w["table"][1])


def _same(shapes, attrs, w):
    a, b = shapes
    return a if a == b else f"input shapes differ: {list(a)} vs {list(b)}"


def _norm_width(x, attrs) -> int | str:
    """The width one normalisation runs over: the whole value, or each of `heads` equal parts."""
    heads = attrs.get("heads", 1)
    if heads < 1 or x[-1] % heads:
        return f"heads={heads}; allowed: a divisor of the width {x[-1]}"
    return x[-1] // heads


def _layer_norm(shapes, attrs, w):
    (x,) = shapes
    width = _norm_width(x, attrs)
    if isinstance(width, str):
        return width
    for slot in ("gain", "bias"):
        if slot in w and w[slot] != (width,):
            return f"{slot} has shape {list(w[slot])}, expected [{width}]"
    return x


def _linear(shapes, attrs, w):
    (x,) = shapes
    d_out, d_in = w["weight"]
    if x[-1] != d_in:
        return f"input width {x[-1]} does not match weight [{d_out}, {d_in}]"
    if "bias" in w and w["bias"] != (d_out,):
        return f"bias has shape {list(w['bias'])}, expected [{d_out}]"
    return (*x[:-1], d_out)


def _activation(shapes, attrs, w):
    if attrs["fn"] not in ACTIVATIONS:
        return f"fn={attrs['fn']!r}; allowed: {', '.join(ACTIVATIONS)}"
    return shapes[0]


def _attention(shapes, attrs, w):
    q, k, v = shapes
    heads, hd = attrs["heads"], attrs["head_dim"]
    kv_heads = attrs.get("kv_heads", heads)
    if kv_heads < 1 or heads % kv_heads:
        return f"kv_heads={kv_heads} does not divide heads={heads}"
    if not (q == (T, heads * hd) and k == v == (T, kv_heads * hd)):
        return (f"q must be [T, {heads * hd}] (heads*head_dim) and k, v [T, {kv_heads * hd}] (kv_heads*head_dim), "
                f"got {[list(s) for s in shapes]}")
    if attrs["positions"] not in POSITION_SCHEMES:
        return f"positions={attrs['positions']!r}; allowed: {', '.join(POSITION_SCHEMES)}"
    rope = {"rope_theta", "rotary_dim"} & set(attrs)
    if attrs["positions"] == "rope" and len(rope) < 2:
        return "positions='rope' needs rope_theta and rotary_dim"
    if attrs["positions"] != "rope" and rope:
        return f"{sorted(rope)} are only allowed with positions='rope'"
    rotary = attrs.get("rotary_dim", 2)
    if rotary % 2 or not 0 < rotary <= hd:
        return f"rotary_dim={rotary}; allowed: an even number in 2..head_dim={hd}"
    if attrs.get("window", 1) < 1:
        return f"window={attrs['window']}; allowed: an integer >= 1"
    if not attrs.get("softcap", 1.0) > 0:
        return f"softcap={attrs['softcap']}; allowed: a number > 0"
    return q


def _lm_head(shapes, attrs, w):
    (x,) = shapes
    vocab, d = w["weight"]
    if x != (T, d):
        return f"input {list(x)} does not match unembedding [{vocab}, {d}]"
    if not attrs.get("softcap", 1.0) > 0:
        return f"softcap={attrs['softcap']}; allowed: a number > 0"
    return (T, vocab)


def _output(shapes, attrs, w):
    return shapes[0]


# -- the training graph's ops (ir/passes/autodiff.py) ---------------------------------------
def _mask(shapes, attrs, w):
    return (T,) if attrs["which"] in MASKS else f"which={attrs['which']!r}; allowed: {', '.join(MASKS)}"


def _loss_grad(shapes, attrs, w):
    x, ids, train, label = shapes
    if not ids == train == label == (T,):
        return "expects ids, train mask and label mask of shape [T]"
    problem = _lm_head([x], attrs, w)
    return problem if isinstance(problem, str) else x


def _linear_backward(shapes, attrs, w):
    (dy,) = shapes
    d_out, d_in = w["weight"]
    return (T, d_in) if dy == (T, d_out) else f"∂y {list(dy)} does not match weight [{d_out}, {d_in}]"


def _linear_descent(shapes, attrs, w):
    x, dy = shapes
    if not w:
        return "updates nothing: needs a weight or a bias slot"
    if "weight" in w and w["weight"] != (dy[-1], x[-1]):
        return f"weight {list(w['weight'])} does not match ∂y {list(dy)} and x {list(x)}"
    if "bias" in w and w["bias"] != (dy[-1],):
        return f"bias {list(w['bias'])} does not match ∂y {list(dy)}"
    return ()


def _rule(attrs, allowed):
    return None if attrs["rule"] in allowed else f"rule={attrs['rule']!r}; allowed: {', '.join(allowed)}"


def _pointwise_backward(shapes, attrs, w):
    x, dy = shapes
    if x != dy:
        return f"x {list(x)} and ∂y {list(dy)} differ"
    width = _norm_width(x, attrs)
    if isinstance(width, str) or ("gain" in w and w["gain"] != (width,)):
        return width if isinstance(width, str) else f"gain {list(w['gain'])} does not match width {width}"
    if "fn" in attrs and attrs["fn"] not in ACTIVATIONS:
        return f"fn={attrs['fn']!r}; allowed: {', '.join(ACTIVATIONS)}"
    return _rule(attrs, BACKWARD_RULES) or x


def _layer_norm_descent(shapes, attrs, w):
    x, dy = shapes
    if not w:
        return "updates nothing: needs a gain or a bias slot"
    width = _norm_width(x, attrs)
    if isinstance(width, str):
        return width
    bad = [s for s, shape in w.items() if shape != (width,)]
    return f"{bad} do not match width {width}" if bad or x != dy else ()


def _attention_backward(shapes, attrs, w):
    q, k, do = shapes
    hd = attrs["head_dim"]
    width, kv_width = attrs["heads"] * hd, attrs.get("kv_heads", attrs["heads"]) * hd
    if not (q == do == (T, width) and k == (T, kv_width)):
        return f"q, ∂o must be [T, {width}] and k [T, {kv_width}], got {[list(s) for s in shapes]}"
    problem = _attention([q, k, k], {**attrs, "causal": True}, w)  # kv_heads and the rope attributes
    return problem if isinstance(problem, str) else _rule(attrs, ATTENTION_RULES) or (T, kv_width)


def _attention_score_backward(shapes, attrs, w):
    q, k, v, do = shapes
    hd = attrs["head_dim"]
    width, kv_width = attrs["heads"] * hd, attrs.get("kv_heads", attrs["heads"]) * hd
    if not (q == do == (T, width) and k == v == (T, kv_width)):
        return f"q, ∂o must be [T, {width}] and k, v [T, {kv_width}], got {[list(s) for s in shapes]}"
    problem = _attention([q, k, v], {**attrs, "positions": attrs.get("positions", "none")}, w)
    if isinstance(problem, str):  # kv_heads and the rope attributes
        return problem
    return {"q": q, "k": k}.get(attrs["wrt"], f"wrt={attrs['wrt']!r}; allowed: q, k")


_specs = [
    OpSpec("input", 0, {}, (), _input, "token ids z_1..z_T"),
    OpSpec("embed", 1, {}, ("table",), _embed, "token embedding: table[ids]; scale: table[ids]·scale (Gemma 2's √D, "
           "as the model's dtype rounds it)", optional_attrs={"scale": float}),
    OpSpec("pos_embed", 1, {"offset": int}, ("table",), _embed,
           "learned absolute positions: table[offset + 0..T-1] (the input only gives T)"),
    OpSpec("add", 2, {}, (), _same, "residual addition a + b"),
    OpSpec("layer_norm", 1, {"eps": float}, ("gain", "bias"), _layer_norm,
           "(x - mean) / sqrt(var + eps) * gain + bias over the last axis"),
    OpSpec("rms_norm", 1, {"eps": float}, ("gain",), _layer_norm,
           "x / sqrt(mean(x²) + eps) * gain over the last axis (LLaMA's RMSNorm: no centring, no bias); "
           "upcast='float32': the normalisation runs in float32 and is cast back before the gain, as HF does; "
           "heads=H: each of H equal parts of x normalised on its own, one gain shared by the parts (Qwen3's q/k norm); "
           "gain_offset: the gain is gain_offset + gain (Gemma 2's 1 + w; with upcast, multiplied before the cast back)",
           optional_attrs={"upcast": str, "heads": int, "gain_offset": float}),
    OpSpec("linear", 1, {}, ("weight", "bias"), _linear,
           "x @ weight.T + bias with weight [out, in]; bias optional", ("bias",)),
    OpSpec("activation", 1, {"fn": str}, (), _activation, "elementwise activation fn(x)"),
    OpSpec("mul", 2, {}, (), _same, "elementwise product a ⊙ b (a gated MLP: act(gate) ⊙ up)"),
    OpSpec("attention", 3, {"heads": int, "head_dim": int, "causal": bool, "scale": float,
                            "positions": str}, (), _attention,
           "multi-head softmax attention of (q, k, v), scores scaled by `scale`; with kv_heads < heads "
           "(grouped-query) query head h reads k/v head h // (heads / kv_heads); positions='rope' rotates "
           "the first rotary_dim coordinates of every q and k head by position·rope_theta^(-2i/rotary_dim) "
           "(halves layout); positions='alibi' adds m_h·j to head h's score of key j (ALiBi, BLOOM's slopes); "
           "window: query t sees keys j with t − j < window; upcast='float32': the softmax runs in float32 and is "
           "cast back (HF's eager attention); softcap c: the scores s are c·tanh(s/c) (Gemma 2)",
           optional_attrs={"kv_heads": int, "rope_theta": float, "rotary_dim": int, "window": int, "upcast": str,
                           "softcap": float}),
    OpSpec("lm_head", 1, {}, ("weight",), _lm_head, "logits = x @ weight.T (weight [vocab, D]); softcap c: "
           "c·tanh(logits/c) (Gemma 2's final soft-capping)", optional_attrs={"softcap": float}),
    OpSpec("output", 1, {}, (), _output, "marks the graph's result (the logits)"),
    # training graph: inputs, the loss gradient, backward and descent ops
    OpSpec("mask", 0, {"which": str}, (), _mask, "a [T] 0/1 input: the train segment or the label tokens"),
    OpSpec("loss_grad", 4, {}, ("weight",), _loss_grad,
           "∂/∂x of Σ_t w_t·CE(z_{t+1} | x_t·weightᵀ), inputs (x, ids, train mask, label mask), "
           "w_t = m_t·m_{t+1}·l_{t+1}; softcap c: of the logits c·tanh(x_t·weightᵀ/c)",
           optional_attrs={"softcap": float}),
    OpSpec("linear_backward", 1, {}, ("weight",), _linear_backward, "∂x = ∂y @ weight"),
    OpSpec("linear_descent", 2, {"lr": float}, ("weight", "bias"), _linear_descent,
           "inputs (x, ∂y): weight#n+1 = weight#n − lr·Σ_t ∂y_t x_tᵀ, bias#n+1 = bias#n − lr·Σ_t ∂y_t",
           ("weight", "bias")),
    OpSpec("layer_norm_backward", 2, {"eps": float, "rule": str, "scale": float}, ("gain",), _pointwise_backward,
           "inputs (x, ∂y): ∂x; finite_difference: N·[f(x + gain⊙∂y/N) − f(x)], f the normalisation"),
    OpSpec("layer_norm_descent", 2, {"eps": float, "lr": float}, ("gain", "bias"), _layer_norm_descent,
           "inputs (x, ∂y): gain −= lr·Σ_t ∂y_t⊙f(x_t), bias −= lr·Σ_t ∂y_t", ("gain", "bias")),
    OpSpec("activation_backward", 2, {"fn": str, "rule": str, "scale": float}, (), _pointwise_backward,
           "inputs (x, ∂y): ∂x; finite_difference: N·[σ(x + ∂y/N) − σ(x)]"),
    OpSpec("rms_norm_backward", 2, {"eps": float, "rule": str, "scale": float}, ("gain",), _pointwise_backward,
           "inputs (x, ∂y): ∂x of RMSNorm; finite_difference: N·[f(x + γ⊙∂y/N) − f(x)], f = x/rms(x), "
           "γ = gain_offset + gain (heads: per part, as rms_norm)", optional_attrs={"heads": int, "gain_offset": float}),
    OpSpec("rms_norm_descent", 2, {"eps": float, "lr": float}, ("gain",), _layer_norm_descent,
           "inputs (x, ∂y): gain −= lr·Σ_t ∂y_t⊙f(x_t), f the RMS normalisation (heads: summed over the parts)",
           optional_attrs={"heads": int}),
    OpSpec("attention_backward", 3, {"heads": int, "head_dim": int, "causal": bool, "scale": float, "rule": str},
           (), _attention_backward, "inputs (q, k, ∂o): ∂v_j = Σ_t a_tj ∂o_t (the same under both rules), a from "
           "the rotated q, k (positions='rope'); with kv_heads < heads a k/v head sums over its query heads",
           optional_attrs={"kv_heads": int, "positions": str, "rope_theta": float, "rotary_dim": int,
                           "softcap": float}),
    OpSpec("attention_score_backward", 4, {"heads": int, "head_dim": int, "causal": bool, "scale": float,
                                           "wrt": str}, (), _attention_score_backward,
           "inputs (q, k, v, ∂o), rule exact: the gradient through the scores, ∂q_t = scale·Σ_j g_tj k_j "
           "(wrt q) or ∂k_j = scale·Σ_t g_tj q_t (wrt k), g_tj = a_tj·(⟨∂o_t, v_j⟩ − Σ_j' a_tj'⟨∂o_t, v_j'⟩); "
           "positions='rope': q, k rotated in g and in the sums, the result rotated back (Rᵀ: by −angle); "
           "with kv_heads < heads ∂k of a k/v head sums over its query heads; softcap c: g_tj·(1 − tanh²(s_tj/c))",
           optional_attrs={"kv_heads": int, "positions": str, "rope_theta": float, "rotary_dim": int,
                           "softcap": float}),
]

OPS: dict[str, OpSpec] = {s.kind: s for s in _specs}
