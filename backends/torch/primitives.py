"""The TinT's layer primitives: the only computations a TinT performs.

Each is an ordinary transformer component with weights constructed by the lowering
from shapes and settings alone (never from aux weights): linear maps, MLPs with an
elementwise activation, gated linear units, layer norm, and attention (softmax or
linear, causal or full, self- or cross-).

Every primitive works on G groups at once with one set of weights: inputs are
[B, T, G, width] and so is the output. For attention a group is a head (heads share
their projections, each reads its own slice of the stream: head splitting); for the
others a group is a chunk of a wide value (sub-MLP partition). The TinT module
gathers the groups' inputs from the stream and adds each group's output to its field.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ir.rules import ACTIVATION_FNS

MASKS = ("causal", "full")


def _param(t: torch.Tensor) -> nn.Parameter:
    """Every stored weight is its own tensor (constructions often reuse one identity matrix)."""
    return nn.Parameter(t.detach().clone(), requires_grad=False)


class Linear(nn.Module):
    """x @ weightᵀ."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = _param(weight)  # [out, in]

    def forward(self, x):
        return x @ self.weight.T


class MLP(nn.Module):
    """w_out · σ(w_in · x): an MLP layer, σ elementwise."""

    def __init__(self, w_in: torch.Tensor, w_out: torch.Tensor, fn: str):
        super().__init__()
        self.w_in, self.w_out, self.fn = _param(w_in), _param(w_out), fn  # [hidden, in], [out, hidden]

    def forward(self, x):
        return ACTIVATION_FNS[self.fn](x @ self.w_in.T) @ self.w_out.T

    def extra_repr(self) -> str:
        return f"fn={self.fn}"


class Gate(nn.Module):
    """(a · x_a) ⊙ (b · x_b) + c · x_c: a gated linear unit with a linear path (c optional)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None):
        super().__init__()
        self.a, self.b = _param(a), _param(b)
        self.c = _param(c) if c is not None else None

    def forward(self, xa, xb, xc=None):
        out = (xa @ self.a.T) * (xb @ self.b.T)
        return out if self.c is None else out + xc @ self.c.T


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
    j <= i, same stream) or "full".
    """

    def __init__(self, w_q, w_k, w_v, w_o, softmax: bool, mask: str):
        super().__init__()
        if mask not in MASKS:
            raise ValueError(f"mask={mask!r}; allowed: {', '.join(MASKS)}")
        self.w_q, self.w_k, self.w_v, self.w_o = (_param(w) for w in (w_q, w_k, w_v, w_o))
        self.softmax, self.mask = softmax, mask

    def forward(self, xq, xk, xv):
        q = (xq @ self.w_q.T).transpose(1, 2)  # [B, G, Tq, dq]
        k = (xk @ self.w_k.T).transpose(1, 2)  # [B, G, Tk, dq]
        v = (xv @ self.w_v.T).transpose(1, 2)  # [B, G, Tk, dv]
        scores = q @ k.transpose(-1, -2)
        if self.mask == "causal":
            future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(future, float("-inf") if self.softmax else 0.0)
        weights = scores.softmax(-1) if self.softmax else scores
        return (weights @ v).transpose(1, 2) @ self.w_o.T  # [B, Tq, G, out]

    def extra_repr(self) -> str:
        return f"softmax={self.softmax}, mask={self.mask}"


PRIMITIVES = (Linear, MLP, Gate, Norm, Attention)
