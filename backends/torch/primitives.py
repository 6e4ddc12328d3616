"""The TinT's layer primitives: ordinary transformer components with weights built from shapes and
settings alone.

Each works on G groups at once with one set of weights: inputs and output are [B, T, *groups, width]
(one group axis, or the call's grid S × C: backends/torch/calls.py; an axis of size 1 is shared).
For attention a group is a head (heads share their projections, each reads its own slice of the
stream); for the others a group is a chunk of a wide value. Every projection is applied through
backends/torch/projection.py, whatever form it is stored in. Carried inside the emitted package.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ir.activations import ACTIVATIONS
from .projection import Diagonal, as_projection, stored, widened

MASKS = ("causal", "full")
POSITIONAL = (None, "queries", "keys", "values")


class Linear(nn.Module):
    """x @ weightᵀ."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = stored(weight)  # [out, in]

    def forward(self, x):
        y = as_projection(self.weight).apply(x)
        return y.clone() if y is x else y  # an identity passes its input, a view of the stream being written


class MLP(nn.Module):
    """w_out · σ(w_in · x): an MLP layer, σ elementwise (ir/activations.py)."""

    def __init__(self, w_in: torch.Tensor, w_out: torch.Tensor, fn: str):
        super().__init__()
        self.w_in, self.w_out, self.fn = stored(w_in), stored(w_out), fn  # [hidden, in], [out, hidden]

    def forward(self, x):
        return as_projection(self.w_out).apply(ACTIVATIONS[self.fn](as_projection(self.w_in).apply(x)))

    def extra_repr(self) -> str:
        return f"fn={self.fn}"


class Gate(nn.Module):
    """(a · x_a) ⊙ (b · x_b) + c · x_c: a gated linear unit with a linear path (c optional)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None):
        super().__init__()
        self.a, self.b, self.c = stored(a), stored(b), stored(c)

    def forward(self, xa, xb, xc=None):
        out = as_projection(self.a).apply(xa) * as_projection(self.b).apply(xb)
        return out if self.c is None else out + as_projection(self.c).apply(xc)


class Norm(nn.Module):
    """Layer norm without affine parameters, over each group: (x − mean) / sqrt(var + eps)."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), None, None, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def grouped_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [*lead, n, m] @ b [*lead, m, p] whose leading axes (batch, groups) broadcast: an axis of size 1
    on one side is not copied along the other's (as matmul's broadcast would) but folded into the
    other's rows or columns, so that heads sharing a query, a key or a value make one larger product."""
    lead = a.dim() - 2
    letters = "abcdefgh"[:lead]
    sides = []
    for t in (a, b):
        axes = [i for i in range(lead) if t.shape[i] != 1]
        sides.append((t.squeeze(tuple(i for i in range(lead) if i not in axes)), "".join(letters[i] for i in axes)))
    (a1, la), (b1, lb) = sides
    out = "".join(l for l in letters if l in la or l in lb)
    dtype = a1.dtype
    if widened(a1):  # bfloat16 on a CPU: multiplied in float32, rounded once
        a1, b1 = a1.float(), b1.float()
    product = torch.einsum(f"{la}xy,{lb}yz->{out}xz", a1, b1).to(dtype)
    shape = [max(a.shape[i], b.shape[i]) for i in range(lead)] + list(product.shape[-2:])
    return product.reshape(shape)


class Attention(nn.Module):
    """Attention with one head per group; all heads share w_q, w_k, w_v, w_o.

    Queries come from one stream ([B, Tq, *groups, in_q]), keys and values from another or the
    same ([B, Tk, *groups, in_k], [B, Tk, *groups, in_v]); a group axis of size 1 is shared by all
    groups along it. softmax=False is linear attention: the weight
    of key j for query i is the raw score ⟨q_i, k_j⟩. mask: "causal" (query i sees keys
    j <= i, same stream) or "full". With more keys than queries (prefix blocks are often
    longer than the input) the products are associated the other way: the same function
    for less work.

    heads > 1: each group is multi-head attention, its projected q, k and v split into that many equal
    parts (one head each) and the heads' outputs side by side before w_o.

    positional names the input ("queries", "keys" or "values"), if any, that holds the one-hot of its
    own position, e_i at position i (a prefix block's routing coordinates, which checks.py holds the
    prefixes to, or the token positions the input layer writes): a product with it only places
    numbers, so it is not computed (the standard view's block multiplies; the numbers are the same,
    as the product adds exact zeros).
    """

    def __init__(self, w_q, w_k, w_v, w_o, softmax: bool, mask: str, positional: str | None = None,
                 heads: int = 1):
        super().__init__()
        if mask not in MASKS:
            raise ValueError(f"mask={mask!r}; allowed: {', '.join(MASKS)}")
        if positional not in POSITIONAL:
            raise ValueError(f"positional={positional!r}; allowed: {', '.join(map(repr, POSITIONAL))}")
        if heads > 1 and (positional is not None or any(w.shape[0] % heads for w in (w_q, w_k, w_v))):
            raise ValueError(f"heads={heads}: w_q, w_k and w_v split into that many equal parts, without positional")
        self.w_q, self.w_k, self.w_v, self.w_o = (stored(w) for w in (w_q, w_k, w_v, w_o))
        self.softmax, self.mask, self.positional, self.heads = softmax, mask, positional, heads

    def sums(self, axis: int, xq, xk, xv) -> bool:
        """Whether forward(..., summed=axis) sums its heads along that group axis inside its products:
        linear attention whose inputs vary along it (the caller sums the heads otherwise)."""
        return not self.softmax and self.heads == 1 and max(x.shape[axis] for x in (xq, xk, xv)) > 1

    def forward(self, xq, xk, xv, summed: int | None = None):
        """summed (where sums() allows): the group axis (-3 or -2) whose heads add into one field, summed
        inside the products (their output adds over the heads) and returned of size 1: one larger
        product where there were many small ones and their sum."""
        w_q, w_k, w_v, w_o = (as_projection(w) for w in (self.w_q, self.w_k, self.w_v, self.w_o))
        if self.heads > 1:
            return self._heads(w_q.apply(xq), w_k.apply(xk), w_v.apply(xv), w_o)
        if summed is not None and xv.shape[summed] == 1 and self.positional in (None, "values"):
            # Σ_g Q_g·K_gᵀ·V: the heads' scores add up
            xq, xk = _summed_scores(xq, xk, summed, w_q, w_k)
            w_q, w_k, summed = _IDENTITY, _IDENTITY, None
        keys_first = xk.shape[1] <= xq.shape[1]
        # (contiguous: the scores as a product would make them; a view of the gathered input cost 25% more peak)
        if self.positional == "queries":  # Q = [I 0]·W_qᵀ, so Q·Kᵀ = ((K·W_q)[:, :Tq])ᵀ
            scores = w_q.apply_transposed(w_k.apply(xk))[..., : xq.shape[1]].movedim(1, -1).contiguous()
        elif self.positional == "keys":  # K = [I 0]·W_kᵀ, so Q·Kᵀ = (Q·W_k)[:, :Tk]
            scores = w_k.apply_transposed(w_q.apply(xq))[..., : xk.shape[1]].movedim(1, -2).contiguous()
        elif keys_first:  # the usual order: project the keys and values
            scores = grouped_matmul(w_q.apply(xq).movedim(1, -2), w_k.apply(xk).movedim(1, -1))
        else:  # more keys than queries (a prefix block): apply w_k to the queries instead, same scores
            scores = grouped_matmul(w_k.apply_transposed(w_q.apply(xq).movedim(1, -2)), xk.movedim(1, -1))
        weights = self._weights(scores)  # [B, *groups, Tq, Tk]
        if summed is not None:  # Σ_g A_g·V_g: the heads' weights and values side by side, one product
            weights, xv = _summed_values(weights, xv, summed - 1, summed)
        if self.positional == "values":  # V = [I 0]·W_vᵀ, so A·V = [A 0]·W_vᵀ
            pad = xv.shape[-1] - xv.shape[1]  # token positions are max_length wide; a prefix block's are K
            heads = w_v.apply(F.pad(weights, (0, pad)) if pad else weights)
        elif keys_first:
            heads = grouped_matmul(weights, w_v.apply(xv).movedim(1, -2))
        else:  # weigh the raw values, then project: (A·X)·Wᵀ = A·(X·Wᵀ)
            heads = w_v.apply(grouped_matmul(weights, xv.movedim(1, -2)))
        return w_o.apply(heads.movedim(-2, 1))  # [B, Tq, *groups, out]

    def _heads(self, q, k, v, w_o):
        """Each group's projected q, k, v split into `heads` equal parts, one head each (multi-head
        attention inside a group): [B, T, *groups, heads·d] → [B, *groups, heads, T, d]."""
        q, k, v = (x.unflatten(-1, (self.heads, -1)) for x in (q, k, v))  # [B, T, *groups, heads, d]
        if k.shape[1] == 1 and not self.softmax:  # one key (a norm's prefix token): products, not matmuls
            scores = sum(q[..., i] * k[..., i] for i in range(q.shape[-1]))  # [B, Tq, *groups, heads]
            return w_o.apply((scores.unsqueeze(-1) * v).flatten(-2))
        q, k, v = (x.movedim(1, -2) for x in (q, k, v))  # [B, *groups, heads, T, d]
        return w_o.apply((self._weights(q @ k.mT) @ v).movedim(-2, 1).flatten(-2))  # [B, Tq, *groups, out]

    def _weights(self, scores):
        """The attention weights of scores [..., Tq, Tk]: masked (causal: no future key), then softmax
        or the raw scores (linear attention)."""
        if self.mask == "causal":
            future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(future, float("-inf") if self.softmax else 0.0)
        return scores.softmax(-1) if self.softmax else scores

    def extra_repr(self) -> str:
        return (f"softmax={self.softmax}, mask={self.mask}" + (f", positional={self.positional}" if self.positional else "")
                + (f", heads={self.heads}" if self.heads > 1 else ""))


_IDENTITY = Diagonal(torch.ones(1), identity=True)  # applied as x itself at any width: q, k already projected


def _summed_scores(xq, xk, axis: int, w_q, w_k):
    """Queries and keys [B, T, S, C, width] (projected) whose scores are Σ_g ⟨q_g, k_g⟩ over group axis
    `axis`, with that axis of size 1: a side that does not vary along it meets the other's sum; two that
    do are laid side by side along their width (one longer product)."""
    q, k = w_q.apply(xq), w_k.apply(xk)
    if q.shape[axis] == 1 or k.shape[axis] == 1:
        return q.sum(axis, keepdim=True), k.sum(axis, keepdim=True)
    side_by_side = lambda x: x.movedim(axis, -2).flatten(-2).unsqueeze(axis)
    return side_by_side(q), side_by_side(k)


def _summed_values(weights, xv, weights_axis: int, values_axis: int):
    """Σ_g A_g·V_g over one group axis as one product: weights [B, *groups, Tq, Tk] and values
    [B, Tk, *groups, width] with the axis of size 1 and (g, key) laid side by side as the keys; where
    the weights do not vary along it the values are summed (A·Σ_g V_g), and where the values do not,
    the weights."""
    if weights.shape[weights_axis] == 1 or xv.shape[values_axis] == 1:
        return weights.sum(weights_axis, keepdim=True), xv.sum(values_axis, keepdim=True)
    weights = weights.movedim(weights_axis, -2).flatten(-2).unsqueeze(weights_axis)  # [.., Tq, g·Tk]
    xv = xv.movedim(values_axis, 1).flatten(1, 2).unsqueeze(values_axis)  # [B, g·Tk, .., width]
    return weights, xv


PRIMITIVES = (Linear, MLP, Gate, Norm, Attention)
PER_POSITION = (Linear, MLP, Gate)  # each position's output from that position alone (a gated MLP block)
WEIGHTS = {Linear: ("weight",), MLP: ("w_in", "w_out"), Gate: ("a", "b", "c"), Norm: (),
           Attention: ("w_q", "w_k", "w_v", "w_o")}  # each primitive's projections, in constructor order


def projections(module: nn.Module) -> dict:
    """A primitive's projections by attribute, each with projection.py's interface (None: absent)."""
    return {attr: None if getattr(module, attr) is None else as_projection(getattr(module, attr))
            for attr in WEIGHTS[type(module)]}
