"""The TinT runtime: everything a compiled TinT runs besides its list of calls, in plain torch.

The in-memory module (backends/torch/tint.py) imports it, and the emitted package carries
its source inside tint_model.py, so both run the same code. It must therefore import
nothing but torch. Contents: the layer primitives, the application of one call (gather
the groups' inputs, run the primitive, write each group's output), the input layer, and
the prefix encoder and decoder over a layout in JSON form (backends/torch/prefixes.py).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .checks import FINGERPRINT, check_inputs, check_prefixes, check_state_dict, contract, fingerprint_tensor  # noqa: F401


# -- the primitives ---------------------------------------------------------------------------
# Ordinary transformer components with weights built from shapes and settings alone. Each
# works on G groups at once with one set of weights: inputs and output are [B, T, G, width].
# For attention a group is a head (heads share their projections, each reads its own slice of
# the stream); for the others a group is a chunk of a wide value.


def gelu_tanh(x):
    """GPT-2's gelu_new."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


ACTIVATIONS = {"gelu_tanh": gelu_tanh, "gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
               "silu": F.silu}
MASKS = ("causal", "full")


def _param(t: torch.Tensor) -> nn.Parameter:
    """Every stored weight is its own tensor (constructions often reuse one identity matrix)."""
    return nn.Parameter(t.detach().clone(), requires_grad=False)


class LowRank(nn.Module):
    """A projection stored as two factors, W = left @ right (tint.passes.low_rank)."""

    def __init__(self, left: torch.Tensor, right: torch.Tensor):
        super().__init__()
        self.left, self.right = _param(left), _param(right)  # [out, r], [r, in]


class Diagonal(nn.Module):
    """A square projection that is zero off its diagonal (identities, scalings, masks of units),
    stored as that diagonal and applied as an elementwise product: the same numbers as the
    matrix product (which only adds exact zeros), for n times less work at width n. An identity
    (`identity`, fixed at construction like every TinT weight) is not applied at all."""

    def __init__(self, diagonal: torch.Tensor, identity: bool = False):
        super().__init__()
        self.diagonal, self.identity = _param(diagonal), identity  # [n]

    @property
    def shape(self) -> torch.Size:  # the matrix's
        return torch.Size((len(self.diagonal), len(self.diagonal)))

    def extra_repr(self) -> str:
        return f"identity={self.identity}"


class Selection(nn.Module):
    """A projection with one nonzero per row, W[i, index[i]] = coef[i] (a signed copy, as
    [I; −I]), stored as both and applied as a gather and a product: the same numbers."""

    def __init__(self, index: torch.Tensor, coef: torch.Tensor, columns: int):
        super().__init__()
        self.register_buffer("index", index.detach().to(torch.long).clone())  # [n]
        self.coef, self.columns = _param(coef), columns  # [n]; W is [n, columns]

    @property
    def shape(self) -> torch.Size:  # the matrix's
        return torch.Size((len(self.coef), self.columns))

    def dense(self) -> torch.Tensor:
        w = torch.zeros(len(self.coef), self.columns, dtype=self.coef.dtype, device=self.coef.device)
        return w.scatter(1, self.index[:, None], self.coef[:, None])


STRUCTURED = (LowRank, Diagonal, Selection)


def _weight(w):
    """A primitive's projection: a matrix, a structured form of one (STRUCTURED), or None."""
    return w if w is None or isinstance(w, STRUCTURED) else _param(w)


def project(x, w):
    """x @ Wᵀ for a stored matrix or a structured form of one."""
    if isinstance(w, Diagonal):
        return x if w.identity else x * w.diagonal
    if isinstance(w, Selection):
        return x[..., w.index] * w.coef
    if isinstance(w, LowRank):
        return (x @ w.right.T) @ w.left.T
    return x @ w.T


def _transposed_project(x, w):
    """x @ W for a stored matrix or a structured form of one."""
    if isinstance(w, Diagonal):
        return x if w.identity else x * w.diagonal
    if isinstance(w, Selection):
        return x @ w.dense()
    if isinstance(w, LowRank):
        return (x @ w.left) @ w.right
    return x @ w


class Linear(nn.Module):
    """x @ weightᵀ."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = _weight(weight)  # [out, in]

    def forward(self, x):
        y = project(x, self.weight)
        return y.clone() if y is x else y  # an identity passes its input, a view of the stream being written


class MLP(nn.Module):
    """w_out · σ(w_in · x): an MLP layer, σ elementwise."""

    def __init__(self, w_in: torch.Tensor, w_out: torch.Tensor, fn: str):
        super().__init__()
        self.w_in, self.w_out, self.fn = _weight(w_in), _weight(w_out), fn  # [hidden, in], [out, hidden]

    def forward(self, x):
        return project(ACTIVATIONS[self.fn](project(x, self.w_in)), self.w_out)

    def extra_repr(self) -> str:
        return f"fn={self.fn}"


class Gate(nn.Module):
    """(a · x_a) ⊙ (b · x_b) + c · x_c: a gated linear unit with a linear path (c optional)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None):
        super().__init__()
        self.a, self.b, self.c = _weight(a), _weight(b), _weight(c)

    def forward(self, xa, xb, xc=None):
        out = project(xa, self.a) * project(xb, self.b)
        return out if self.c is None else out + project(xc, self.c)


class Norm(nn.Module):
    """Layer norm without affine parameters, over each group: (x − mean) / sqrt(var + eps)."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), None, None, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class Attention(nn.Module):
    """Attention with one head per group; all heads share w_q, w_k, w_v, w_o.

    Queries come from one stream ([B, Tq, G, in_q]), keys and values from another or the
    same ([B, Tk, G, in_k], [B, Tk, G, in_v]). softmax=False is linear attention: the weight
    of key j for query i is the raw score ⟨q_i, k_j⟩. mask: "causal" (query i sees keys
    j <= i, same stream) or "full". With more keys than queries (prefix blocks are often
    longer than the input) the products are associated the other way: the same function
    for less work.
    """

    def __init__(self, w_q, w_k, w_v, w_o, softmax: bool, mask: str):
        super().__init__()
        if mask not in MASKS:
            raise ValueError(f"mask={mask!r}; allowed: {', '.join(MASKS)}")
        self.w_q, self.w_k, self.w_v, self.w_o = (_weight(w) for w in (w_q, w_k, w_v, w_o))
        self.softmax, self.mask = softmax, mask

    def forward(self, xq, xk, xv):
        q = project(xq, self.w_q).transpose(1, 2)  # [B, G, Tq, dq]
        keys_first = xk.shape[1] <= xq.shape[1]
        if keys_first:  # the usual order: project the keys and values
            scores = q @ project(xk, self.w_k).transpose(1, 2).transpose(-1, -2)
        else:  # more keys than queries (a prefix block): apply w_k to the queries instead, same scores
            scores = _transposed_project(q, self.w_k) @ xk.transpose(1, 2).transpose(-1, -2)
        if self.mask == "causal":
            future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(future, float("-inf") if self.softmax else 0.0)
        weights = scores.softmax(-1) if self.softmax else scores  # [B, G, Tq, Tk]
        if keys_first:
            heads = weights @ project(xv, self.w_v).transpose(1, 2)
        else:  # weigh the raw values, then project: (A·X)·Wᵀ = A·(X·Wᵀ)
            heads = project(weights @ xv.transpose(1, 2), self.w_v)
        return project(heads.transpose(1, 2), self.w_o)  # [B, Tq, G, out]

    def extra_repr(self) -> str:
        return f"softmax={self.softmax}, mask={self.mask}"


PRIMITIVES = (Linear, MLP, Gate, Norm, Attention)
WEIGHTS = {Linear: ("weight",), MLP: ("w_in", "w_out"), Gate: ("a", "b", "c"), Norm: (),
           Attention: ("w_q", "w_k", "w_v", "w_o")}  # each primitive's projections, in constructor order


# -- one call: gather, apply, write -----------------------------------------------------------
# Indexing the last axis of the wide token stream with an index tensor reads it at scattered
# places (about 1 GB/s); the fields a call touches are few runs of side-by-side coordinates, and
# slices of those runs copy at memory speed. So wirings are runs where there are few of them.
MAX_RUNS = 64  # beyond this many runs, one index operation beats a loop of slices


def runs_of(coords: list[int]) -> tuple:
    """((start, length), …): the maximal side-by-side stretches of `coords`, in their order."""
    runs = []
    for i in coords:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return tuple((start, length) for start, length in runs)


class Gather:
    """A read whose groups are not one side-by-side run: the distinct groups' coordinates (as runs,
    or an index tensor where runs would be many), then which distinct groups the groups read, as
    runs of side-by-side distinct groups (None: each its own, in order). Groups that repeat are
    gathered once; the picking copies slices, since indexing a group axis is as slow as the stream's."""

    def __init__(self, groups: list[list[int]]):
        distinct = list(dict.fromkeys(tuple(g) for g in groups))
        flat = [i for g in distinct for i in g]
        self.distinct, self.width = len(distinct), len(groups[0])
        runs = runs_of(flat)
        self.source = runs if len(runs) <= MAX_RUNS else torch.tensor(flat)  # runs: a tuple
        self.pick = None if len(distinct) == len(groups) else runs_of([distinct.index(tuple(g)) for g in groups])


def wiring(call: dict) -> tuple[list, object]:
    """A call's wiring (JSON form) as indices: per read, None for the whole stream, a
    (start, G, width, shared) run when the groups' fields lie side by side or are all the same
    field, else a Gather; the write as a side-by-side run, else [(start, length, offset)] runs
    of the stream and where they sit in the output, or a flat index where runs would be many."""
    def index(groups):
        flat = [i for fields in groups for start, width in fields for i in range(start, start + width)]
        width = len(flat) // len(groups)
        if flat == list(range(flat[0], flat[0] + len(flat))):  # side by side: a view, no copy
            return (flat[0], len(groups), width, False)
        one = flat[:width]
        if one == list(range(one[0], one[0] + width)) and flat == one * len(groups):  # every group reads one field
            return (flat[0], len(groups), width, True)
        return Gather([flat[g * width:(g + 1) * width] for g in range(len(groups))])

    reads = [None if not groups else index(groups) for groups in call["reads"]]
    fields = call["write"]
    write = index([[field] for field in fields])
    if isinstance(write, tuple) and not write[3]:
        return reads, write
    flat = [i for start, width in fields for i in range(start, start + width)]
    runs = runs_of(flat)
    if len(runs) > MAX_RUNS:
        return reads, torch.tensor(flat)
    offsets = [0]
    for _, length in runs[:-1]:
        offsets.append(offsets[-1] + length)
    return reads, [(start, length, offset) for (start, length), offset in zip(runs, offsets)]


def _gather(stream, index):
    """[B, T, G, width] from a stream by a wiring index ([B, T, 1, width] when every group reads
    the same field: primitives broadcast it, so shared work is done once)."""
    if index is None:
        return stream.unsqueeze(2)
    if isinstance(index, tuple):
        start, groups, width, shared = index
        if shared:  # the same field for every group: one group that broadcasts against the others
            return stream[..., start : start + width].unsqueeze(-2)
        return stream[..., start : start + groups * width].unflatten(-1, (groups, width))
    if isinstance(index.source, tuple):
        x = torch.cat([stream[..., start : start + length] for start, length in index.source], -1)
    else:
        x = stream[..., index.source.to(stream.device)]
    x = x.unflatten(-1, (index.distinct, index.width))
    if index.pick is None or index.distinct == 1:  # one distinct group broadcasts, as a shared field
        return x
    return torch.cat([x[..., start : start + length, :] for start, length in index.pick], -2)


def apply(layer: nn.Module, reads: list, write, streams: list, into: torch.Tensor, gated: bool) -> torch.Tensor:
    """Run one call and return `into` with each group's output added to its field. A gated write
    first gates out what the field held (h ← (1−m)⊙h + Δ, m the field's indicator).

    This is the fast execution of one block of the standard view (backends/torch/standard.py, which
    builds and checks it): the gathers are the selections inside the block's Q, K, V or W_a, W_b,
    W_in; the write field is the selection inside O or W_o; a group is a head or a set of units;
    a new prefix-block version is the same positions after the residual add; the gate is the
    block's erase units (−h on a field whose value is dead)."""
    delta = layer(*(_gather(s, index) for s, index in zip(streams, reads)))  # [B, T, G or 1, width]
    if isinstance(write, tuple):
        groups = write[1] * write[2] // delta.shape[-1]
    else:
        groups = (sum(length for _, length, _ in write) if isinstance(write, list) else write.numel()) // delta.shape[-1]
    delta = delta.expand(*delta.shape[:-2], groups, delta.shape[-1]).flatten(-2)  # [B, T, G·width]
    if isinstance(write, tuple):  # fields side by side, each written once
        start, groups, width, _ = write
        field = into[..., start : start + groups * width]
        if gated:
            field.copy_(delta)
        else:
            field.add_(delta)
        return into
    if isinstance(write, list):  # runs; a coordinate written by several groups gets their sum
        if gated:  # every run is cleared before any is added to
            for start, length, _ in write:
                into[..., start : start + length] = 0.0
        for start, length, offset in write:
            into[..., start : start + length] += delta[..., offset : offset + length]
        return into
    write = write.to(into.device)
    if gated:
        into[..., write] = 0.0
    return into.index_add_(-1, write, delta)


# -- the start and the end of a forward pass ------------------------------------------------------
def begin(fields: dict, width: int, max_length: int, position_offset: int, blocks, input_ids, train_mask,
          label_mask, prefixes: dict, contract: dict):
    """Check the input against the TinT's contract (checks.py), let every input hold one checkpoint
    for all sequences or one per sequence, and return the token stream after the input layer, the
    unembedding and the prefix streams at version 0 ("block@0")."""
    check_inputs(contract, input_ids, train_mask, label_mask, prefixes)
    batch, length = input_ids.shape
    batched = {name: t if t.dim() == 3 else t.expand(batch, -1, -1)
               for name, t in prefixes.items() if name != FINGERPRINT}
    unembed = batched.get("unembed", batched["vocab"])
    h = input_layer(fields, width, position_offset, input_ids, train_mask, label_mask, batched.get("positions"),
                    batched["vocab"], unembed)  # [B, T, width]
    return h, unembed, {f"{block}@0": batched[block] for block in blocks}


def finish(h, logits_field, unembed, prefixes: dict, final_blocks: dict):
    """The output head (the final hidden state's field against the unembedding) and the new prefixes:
    the embedding tables as given, each block at its last version."""
    start, size = logits_field
    logits = h[..., start : start + size] @ unembed.transpose(-1, -2)  # [B, T, V]
    new_prefixes = {name: prefixes[name] for name in ("vocab", "positions", "unembed", FINGERPRINT) if name in prefixes}
    return logits, {**new_prefixes, **final_blocks}


def input_layer(fields: dict, width: int, position_offset: int, input_ids, train_mask, label_mask,
                positions, vocab, unembed):
    """The TinT's embedding [B, T, width]: token and position rows of the aux tables, constants one
    and zero, one-hot positions, and the train and label masks, each in its field (start, width)."""
    batch, length = input_ids.shape
    h = torch.zeros(batch, length, width, dtype=vocab.dtype, device=vocab.device)

    def at(name):
        start, size = fields[name]
        return slice(start, start + size)

    rows = torch.arange(batch, device=input_ids.device)[:, None]
    h[..., at("token_embed")] = vocab[rows, input_ids]
    if positions is not None:  # rotary models have none: q and k are rotated inside attention
        h[..., at("pos_embed")] = positions[:, position_offset : position_offset + length]
    if "target_embed" in fields:
        h[..., at("target_embed")] = unembed[rows, input_ids]
    h[..., fields["one"][0]] = 1.0
    start = fields["positions"][0]
    h[..., start : start + length] = torch.eye(length, dtype=h.dtype, device=h.device)
    h[..., fields["train"][0]] = train_mask.to(h.dtype)
    h[..., fields["label"][0]] = 1.0 if label_mask is None else label_mask.to(h.dtype)
    return h


# -- aux weights <-> prefix tokens ----------------------------------------------------------------
def row_index(ref: dict, n: int):
    """The rows a weight reference selects out of n: rows start:stop, or start:stop of every
    `period` rows (GPT-NeoX's q|k|v, interleaved per head)."""
    start, stop = ref["rows"]
    if ref.get("period") is None:
        return slice(start, stop)
    return (torch.arange(0, n, ref["period"])[:, None] + torch.arange(start, stop)).flatten()


def resolve(ref: dict, params: dict) -> torch.Tensor:
    """The matrix or vector a weight reference names: param (transposed?) [rows start:stop]."""
    t = params[ref["name"]]
    if ref["transpose"]:
        t = t.T
    if ref["rows"] is not None:
        t = t[row_index(ref, t.shape[0])]
    return t


def encode(layout: dict, params: dict) -> dict:
    """θ (Hugging Face names) -> {block: [K, width]} plus "vocab", "positions" (and "unembed"), and the
    layout fingerprint under "tint_layout" (checks.py)."""
    check_state_dict(layout, params)
    out = {FINGERPRINT: fingerprint_tensor(layout, params[layout["vocab"]["name"]].device),
           "vocab": resolve(layout["vocab"], params).detach().clone()}
    if layout["positions"] is not None:  # rotary models have no position table
        out["positions"] = resolve(layout["positions"], params).detach().clone()
    if not layout["tied"]:
        out["unembed"] = resolve(layout["unembed"], params).detach().clone()
    for name, block in layout["blocks"].items():
        refs = block["refs"]
        first = resolve(next(iter(refs.values())), params)
        tokens = torch.zeros(block["tokens"], block["width"], dtype=first.dtype, device=first.device)
        if block["kind"] == "linear":
            S, K, c = block["rows"], block["tokens"], block["chunk"]
            C = block["d_in"] // c
            units = torch.zeros(S, K, C, c + 1, dtype=first.dtype, device=first.device)
            units[..., :c] = resolve(refs["weight"], params).reshape(S, K, C, c)  # row r = s·K + j
            if "bias" in refs:
                units[:, :, 0, c] = resolve(refs["bias"], params).reshape(S, K)
            tokens[:, : S * C * (c + 1)] = units.movedim(1, 0).reshape(K, S * C * (c + 1))
            tokens[:, S * C * (c + 1) :] = torch.eye(K, dtype=first.dtype, device=first.device)
        else:
            d = block["d_out"]
            tokens[0, :d] = resolve(refs["gain"], params)
            if "bias" in refs:  # RMSNorm has none: its β stays 0
                tokens[0, d : 2 * d] = resolve(refs["bias"], params)
            tokens[0, 2 * d] = 1.0
        out[name] = tokens
    return out


def decode(layout: dict, prefixes: dict) -> dict:
    """Prefix tokens -> θ in Hugging Face names; batched blocks ([B, K, width]) give [B, *shape]."""
    batch = check_prefixes(layout, prefixes)  # () or (B,)
    vocab = prefixes["vocab"]
    params = {name: torch.empty(*batch, *shape, dtype=vocab.dtype, device=vocab.device)
              for name, shape in layout["shapes"].items()}
    written = set()

    def put(ref, value):
        view = params[ref["name"]].transpose(-1, -2) if ref["transpose"] else params[ref["name"]]
        if ref["rows"] is None:
            view.copy_(value)
        elif view.dim() - len(batch) == 2:
            view[..., row_index(ref, view.shape[-2]), :] = value
        else:
            view[..., row_index(ref, view.shape[-1])] = value
        written.add(ref["name"])

    put(layout["vocab"], prefixes["vocab"])
    if layout["positions"] is not None:
        put(layout["positions"], prefixes["positions"])
    if not layout["tied"]:
        put(layout["unembed"], prefixes["unembed"])
    for name, block in layout["blocks"].items():
        tokens, refs = prefixes[name], block["refs"]
        if block["kind"] == "linear":
            S, K, c = block["rows"], block["tokens"], block["chunk"]
            C = block["d_in"] // c
            units = tokens[..., : S * C * (c + 1)].reshape(*batch, K, S, C, c + 1)
            rows = units.movedim(-4, -3)  # [.., S, K, C, c+1]: row r = s·K + j
            put(refs["weight"], rows[..., :-1].reshape(*batch, block["d_out"], block["d_in"]))
            if "bias" in refs:
                put(refs["bias"], rows[..., 0, -1].reshape(*batch, block["d_out"]))
        else:
            put(refs["gain"], tokens[..., 0, : block["d_out"]])
            if "bias" in refs:
                put(refs["bias"], tokens[..., 0, block["d_out"] : 2 * block["d_out"]])
    missing = sorted(set(params) - written)
    if missing:
        raise ValueError(f"parameters in no prefix block: {', '.join(missing)}")
    return params
