"""The reference code's parameter counts (Panigrahi et al.'s TinT repository), from shapes alone.

The reference builds its TinT from a handful of module types (DESIGN §6). Each simulator projection
is a block-structured `Conv2D(nf, nx)`: nf blocks of nx×nx plus a bias (nf·nx² + nf·nx numbers; its
transposed form nx·nf² + nx·nf) that acts on the whole D_sim-wide stream as one D_sim×D_sim map.
Position maps and gates are small dense maps over its one-hot positions, P = T_aux + K wide (T_aux
the aux model's `max_position_embeddings`). This module rebuilds that inventory module by module and
counts it in the reference's conventions:

- **as printed**: `sum(p.numel() for p in model.parameters())`, a module used twice counted once:
  the TinT's own modules, the aux weights it stores as prefix parameters (one K×D_sim tensor per
  linear map and norm, one zero tensor per MLP chunk) and the aux token and position embeddings;
- **as stored**: the same without the embeddings and the stored aux weights;
- **dense**: every Conv2D map expanded to D_sim×D_sim + bias, position maps and gates as stored;
  over every stored map, over the maps a forward pass applies, and with consecutive linear maps
  composed (a query/key/value map and its transposed channel map; an output projection with the
  permutation and bias maps after it).

The reference keeps stored activations and per-layer prefixes in Python lists between blocks,
outside the stream: its dense count is the "activations outside the stream" convention.

    counts = reference_counts(GPT2_SHAPE, Settings())   # DESIGN §6's figures, to the unit
    section = like_with_like(report, model.config)      # report.json's "reference_counts"
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

NO_CONSTRUCTION = {  # families the reference code has no construction for, and why
    "llama": "gated MLP (SwiGLU), RMSNorm and rotary positions",
    "qwen2": "gated MLP (SwiGLU), RMSNorm and rotary positions",
    "mistral": "gated MLP (SwiGLU), RMSNorm and rotary positions",
    "gpt_neox": "rotary positions and a parallel residual",
}


@dataclass(frozen=True)
class Shape:
    """The aux model as the reference reads it."""

    family: str
    d_model: int  # D
    d_ffn: int  # F: the MLP runs in F/D chunks of width D through the same modules
    n_layer: int  # L
    n_head: int  # H
    vocab: int
    positions: int  # T_aux = max_position_embeddings: the reference's one-hot positions are T_aux + K wide
    position_rows: int  # rows of the position table (OPT reserves two)
    tied: bool  # the LM head is the token table (stored once)


@dataclass(frozen=True)
class Settings:
    """The reference's construction settings; the defaults are its README's (DESIGN §6)."""

    width: int = 3072  # D_sim
    prefixes: int = 256  # K, also the width of its linear maps' heads
    heads: int = 12  # TinT attention heads (its config.num_attention_heads)
    trained_layers: int = 12  # the top layers simulated in the backward (n_simulation_layers)
    steps: int = 1  # SGD steps (n_forward_backward)
    reuse_forward: bool = True  # the final forward reuses the first forward's blocks
    reuse_backward: bool = True  # later steps reuse the first step's backward blocks

    @classmethod
    def for_shape(cls, d_model: int, prefixes: int, trained_layers: int, steps: int) -> Settings:
        """The narrowest stream the reference's construction accepts at this K: S = D/K weight rows
        and a bias per prefix token, D_sim = (S + 1)·D, but at least 4·D (its attention backward keeps
        three D-wide activations beside the signal); heads K wide, as in its README (3072 = 12 × 256)."""
        width = max(d_model // prefixes + 1, 4) * d_model
        return cls(width=width, prefixes=prefixes, heads=width // prefixes, trained_layers=trained_layers,
                   steps=steps)


@dataclass(frozen=True)
class Modules:
    """A tally of reference modules."""

    maps: int = 0  # Conv2D maps stored
    applied: int = 0  # of which a forward pass applies
    composed: int = 0  # the applied maps once consecutive linear maps are composed
    map_numel: int = 0  # numbers the Conv2D maps store
    small: int = 0  # numbers in position maps and gates (dense already)
    attention: int = 0  # Attention modules (the TinT's attention layers)
    mlp_pairs: int = 0  # pairs of maps with a nonlinearity between them (activation, layer-norm backward)

    def __add__(self, other: Modules) -> Modules:
        return Modules(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __mul__(self, n: int) -> Modules:
        return Modules(*(getattr(self, f.name) * n for f in fields(self)))

    @property
    def stored(self) -> int:
        return self.map_numel + self.small


def _conv2d(nf: int, nx: int, transpose: bool = False) -> int:
    """Numbers a reference Conv2D(nf, nx) stores: nf blocks nx×nx and a bias; transposed, nx blocks nf×nf."""
    return nx * nf * nf + nx * nf if transpose else nf * nx * nx + nf * nx


def _maps(*numels: int, applied: int, composed: int) -> Modules:
    return Modules(maps=len(numels), applied=applied, composed=composed, map_numel=sum(numels))


def _gates(p: int) -> Modules:
    """Two tanh gates, each a dense map from the P-wide one-hot position to one number."""
    return Modules(small=2 * (p + 1))


def _attention(s: Settings, p: int, heads: int, project: int, run: dict[str, str],
               conv: dict[str, int] | None = None) -> Modules:
    """The reference's Attention module. For each of q, k, v a block map (`main`, channels conv[x]
    wide, by default the head width) and a transposed map across channels (`head`); run[x] names the
    ones a forward applies (the others stay at their identity initialisation, unused). Then an output
    projection (transposed, channels `project` wide) and the position maps: P → 3 head widths, and an
    expansion over the heads (3 × heads weights + heads biases)."""
    head_width = s.width // heads
    total = Modules(attention=1, small=p * 3 * head_width + 3 * head_width + 4 * heads)
    for x in "qkv":
        channel = (conv or {}).get(x, head_width)
        used = len(run[x].split("+")) if run[x] else 0
        total += _maps(_conv2d(s.width // channel, channel), _conv2d(s.width // channel, channel, transpose=True),
                       applied=used, composed=min(used, 1))  # "head+main": two maps in a row, one composed
    return total + _maps(_conv2d(s.width // project, project, transpose=True), applied=1, composed=1)


# -- the reference's modules, each from the ones it holds -----------------------------------------

def linear_forward(s: Settings, p: int, d: int) -> Modules:
    """y = Wx + b (D → D, as every map it simulates): linear attention over K-wide heads, then a
    permutation and a bias map (composed with the output projection they follow), and gates."""
    heads = s.width // s.prefixes
    attention = _attention(s, p, heads, s.prefixes, run={"q": "head", "k": "main", "v": "main"})
    permute = _maps(_conv2d(s.width // d, d), _conv2d(s.width // d, d, transpose=True),
                    applied=2, composed=0)
    return attention + permute + _gates(p)


def linear_backward(s: Settings, p: int, d: int) -> Modules:
    """∂x = Wᵀ∂y: the query is ∂y reordered over D-wide channels; the value is the stream itself."""
    heads = s.width // s.prefixes
    run = {"q": "head+main", "k": "main", "v": ""}
    return _attention(s, p, heads, s.prefixes, run=run, conv={"q": d}) + _gates(p)


def linear_descent(s: Settings, p: int, d: int) -> Modules:
    """W −= η Σ ∂y xᵀ: prefixes query, train tokens are keys (∂y over D-wide channels) and values."""
    heads = s.width // s.prefixes
    run = {"q": "head", "k": "head+main", "v": "head"}
    return _attention(s, p, heads, s.prefixes, run=run, conv={"k": d}) + _gates(p)


def linear_descent_backward(s: Settings, p: int, d: int) -> Modules:
    return linear_backward(s, p, d) + linear_descent(s, p, d)


def _channel_pair(s: Settings) -> Modules:
    """Two transposed channel maps with a nonlinearity (activation or normalisation) between them."""
    numel = _conv2d(s.heads, s.width // s.heads, transpose=True)
    return _maps(numel, numel, applied=2, composed=2) + Modules(mlp_pairs=1)


def layer_norm_forward(s: Settings, p: int, d: int) -> Modules:
    return linear_forward(s, p, d) + _gates(p)


def layer_norm_descent_backward(s: Settings, p: int, d: int) -> Modules:
    """Backward: a linear backward, then N·(f(x + ∂y/N) − f(x)) by two channel maps, and gates;
    descent: a linear descent."""
    backward = linear_backward(s, p, d) + _channel_pair(s) + _gates(p)
    return backward + linear_descent(s, p, d)


def activation_forward(s: Settings, p: int) -> Modules:
    numels = (_conv2d(s.heads, s.width // s.heads, transpose=True), _conv2d(s.heads, s.width // s.heads))
    return _maps(*numels, applied=2, composed=2) + Modules(mlp_pairs=1) + _gates(p)


def activation_backward(s: Settings) -> Modules:
    return _channel_pair(s)


def _softmax_attention(s: Settings, p: int) -> Modules:
    """Softmax heads over the TinT's own heads, every q, k, v map applied, and gates."""
    return _attention(s, p, s.heads, s.width // s.heads, run={x: "head+main" for x in "qkv"}) + _gates(p)


def attention_forward(s: Settings, p: int, d: int) -> Modules:
    """One linear forward computes Q, K and V in turn; then the softmax attention."""
    return linear_forward(s, p, d) + _softmax_attention(s, p)


def attention_backward_descent(s: Settings, p: int, d: int) -> Modules:
    """Stop-gradient backward (the scores recomputed, transposed; it runs, as backprop_through_attention
    defaults to on), then a linear backward+descent for V."""
    return _softmax_attention(s, p) + linear_descent_backward(s, p, d)


def forward_block(s: Settings, p: int, d: int) -> Modules:
    """One aux layer forward: 2 layer norms, attention, 3 linears (out projection, MLP in and out; the
    F/D MLP chunks reuse them), the activation."""
    return (layer_norm_forward(s, p, d) * 2 + attention_forward(s, p, d) + linear_forward(s, p, d) * 3
            + activation_forward(s, p))


def backward_block(s: Settings, p: int, d: int) -> Modules:
    """One aux layer backward: 3 linear backward+descent pairs, the activation backward, 2 layer-norm
    backward+descent, the attention backward+descent."""
    return (linear_descent_backward(s, p, d) * 3 + activation_backward(s)
            + layer_norm_descent_backward(s, p, d) * 2 + attention_backward_descent(s, p, d))


def gradient_module(s: Settings, p: int, d: int) -> Modules:
    """The final layer norm, forward and backward+descent (the loss gradient itself is Python)."""
    return layer_norm_forward(s, p, d) + layer_norm_descent_backward(s, p, d)


# -- the counts ------------------------------------------------------------------------------------

def problems(shape: Shape, s: Settings) -> list[str]:
    """Why the reference's construction does not apply to this shape at these settings (its asserts)."""
    d, k, out = shape.d_model, s.prefixes, []
    if d % k:
        out.append(f"d_model {d}: K = {k} must divide it (rows spread evenly over the prefixes)")
    elif s.width % d or s.width < 4 * d or s.width // k < d // k + (d // k) ** 2:
        out.append(f"D_sim {s.width}: must be a multiple of d_model {d}, at least 4·{d}, with "
                   f"D_sim/K ≥ D/K + (D/K)² heads")
    elif s.width % s.heads or s.width // s.heads != k:
        out.append(f"TinT heads {s.heads}: must be D_sim/K = {s.width // k} (heads K wide)")
    elif shape.n_head > s.heads or shape.n_head % (d // k):
        out.append(f"n_head {shape.n_head}: must be at most {s.heads} and a multiple of D/K = {d // k}")
    if shape.d_ffn % d:
        out.append(f"d_ffn {shape.d_ffn}: must be a multiple of d_model {d} (the MLP runs in D-wide chunks)")
    if not 1 <= s.trained_layers <= shape.n_layer or s.steps < 1:
        out.append(f"trained layers {s.trained_layers}, steps {s.steps}: allowed 1..{shape.n_layer} layers, "
                   f"at least 1 step")
    return out


def reference_counts(shape: Shape, s: Settings) -> dict:
    """The reference's TinT for `shape` at settings `s`, counted in its conventions (module docstring)."""
    found = problems(shape, s)
    if found:
        raise ValueError(f"the reference's construction does not apply: {'; '.join(found)}")
    d, p = shape.d_model, shape.positions + s.prefixes
    forward, backward, gradient = forward_block(s, p, d), backward_block(s, p, d), gradient_module(s, p, d)
    n, steps = s.trained_layers, s.steps
    blocks = (forward * (shape.n_layer + (0 if s.reuse_forward else steps * n))
              + backward * (n * (1 if s.reuse_backward else steps)) + gradient)
    # aux weights as prefix parameters: per layer the norms, q, k, v, out projection, and per MLP chunk
    # its in map, a zero tensor and its out map; one for the final norm
    prefix_tensors = shape.n_layer * (6 + 3 * (shape.d_ffn // d)) + 1
    aux_weights = prefix_tensors * s.prefixes * s.width
    embeddings = (shape.vocab * (1 if shape.tied else 2) + shape.position_rows) * d
    dense_map = s.width * s.width + s.width
    return {
        "printed": blocks.stored + aux_weights + embeddings,
        "embeddings": embeddings,
        "aux_weights_stored": aux_weights,
        "prefix_tensors": prefix_tensors,
        "as_stored": blocks.stored,
        "blocks_once": (forward + backward + gradient).stored,
        "dense_every_map": blocks.maps * dense_map + blocks.small,
        "dense_applied_maps": blocks.applied * dense_map + blocks.small,
        "dense_composed": blocks.composed * dense_map + blocks.small,
        "maps": blocks.maps,
        "maps_applied": blocks.applied,
        "maps_composed": blocks.composed,
        "attention_modules": blocks.attention,
        "mlp_pairs": blocks.mlp_pairs,
        "position_width": p,
    }


# -- the aux shapes the reference builds for, read from the HF config ----------------------------------

def _gpt2_shape(c) -> tuple[Shape, list[str]]:
    ffn = c.n_inner if c.n_inner is not None else 4 * c.n_embd
    return Shape("gpt2", c.n_embd, ffn, c.n_layer, c.n_head, c.vocab_size, c.n_positions, c.n_positions,
                 c.tie_word_embeddings), []


def _opt_shape(c) -> tuple[Shape, list[str]]:
    out = []
    if not c.do_layer_norm_before:
        out.append("do_layer_norm_before=False: the reference's OPT blocks are pre-LN only; allowed: True")
    if c.word_embed_proj_dim != c.hidden_size:
        out.append(f"word_embed_proj_dim {c.word_embed_proj_dim}: the reference has no project_in/out; "
                   f"allowed: hidden_size {c.hidden_size}")
    shape = Shape("opt", c.hidden_size, c.ffn_dim, c.num_hidden_layers, c.num_attention_heads, c.vocab_size,
                  c.max_position_embeddings, c.max_position_embeddings + 2, c.tie_word_embeddings)
    return shape, out


SHAPES = {"gpt2": _gpt2_shape, "opt": _opt_shape}


def _ratio(ours, theirs) -> float | None:
    return ours / theirs if ours is not None and theirs else None


def _settings_that_apply(shape: Shape, prefixes: int, trained_layers: int, steps: int) -> tuple[Settings, str | None]:
    """The reference's settings at our K; where its construction does not take our K (its heads are K
    wide: a wide K leaves too few of them), at its README's K instead, said so (None: ours applied)."""
    ours = Settings.for_shape(shape.d_model, prefixes, trained_layers, steps)
    readme = Settings.for_shape(shape.d_model, Settings.prefixes, trained_layers, steps)
    if not problems(shape, ours) or prefixes == readme.prefixes or problems(shape, readme):
        return ours, None
    return readme, (f"at our K = {prefixes} its construction does not apply ({'; '.join(problems(shape, ours))}): "
                    f"shown at its README's K = {readme.prefixes}")


def like_with_like(report: dict, config) -> dict:
    """report.json's "reference_counts": the reference's TinT for this aux config (its shape, our K or,
    where its construction does not take ours, its README's; trained layers and steps; its narrowest stream) and ours beside it in three conventions, with a
    ratio only between like counts. `config` is the aux model's HF config."""
    family, s, sv = report["family"], report["settings"], report["standard_view"]
    ours = {"as_stored": report["counts"]["unique"]["dense"],
            "dense_activations_outside": sv["reference_convention"]["dense"]["total"],
            "dense_everything_in_stream": sv["ours"]["dense"]["total"]}
    d_sim = {"as_stored": None, "dense_activations_outside": sv["reference_convention"]["d_sim"],
             "dense_everything_in_stream": sv["ours"]["d_sim"]}
    found, shape, settings, ref, own_k = [], None, None, None, None
    if family in NO_CONSTRUCTION:
        found.append(f"family {family}: {NO_CONSTRUCTION[family]} have no construction in the reference code; "
                     f"it builds GPT-2 and OPT (pre-LN)")
    elif family not in SHAPES:
        found.append(f"family {family}: the reference code builds only gpt2 and opt")
    else:
        shape, found = SHAPES[family](config)
        if not isinstance(s["prefixes"], int):
            found.append(f"tint.prefixes {s['prefixes']}: the reference uses one K for every map")
        else:
            settings, own_k = _settings_that_apply(shape, s["prefixes"], len(s["trained_layers"]), s["steps"])
            found += problems(shape, settings)
    if not found:
        ref = reference_counts(shape, settings)
    theirs = {"as_stored": ref and ref["as_stored"], "dense_activations_outside": ref and ref["dense_applied_maps"],
              "dense_everything_in_stream": None}  # its backward reads activations from Python lists
    width = settings.width if ref else None
    conventions = {
        name: {"tintc": ours[name], "reference": theirs[name], "ratio": _ratio(ours[name], theirs[name]),
               "d_sim": {"tintc": d_sim[name], "reference": None if name == "as_stored" or theirs[name] is None
                         else width}}
        for name in ours}
    return {"applies": ref is not None, "why_not": "; ".join(found) or None, "own_k": own_k,
            "shape": asdict(shape) if shape else None, "settings": asdict(settings) if settings else None,
            "reference": ref, "conventions": conventions}
