"""The TinT's layer primitives: the only computations a TinT performs.

Each is an ordinary transformer component with weights constructed by the lowering
from shapes and settings alone (never from aux weights): linear maps, MLPs with an
elementwise activation, gated linear units, layer norm, and attention (softmax or
linear, causal or full, self- or cross-). A primitive maps gathered inputs to a
delta; the TinT module adds the delta to the fields it writes (the residual).
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
    """w_out · σ(w_in · x): an MLP layer of the TinT, σ elementwise."""

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
    """Layer norm without affine parameters: (x − mean) / sqrt(var + eps)."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), None, None, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class Attention(nn.Module):
    """Multi-head attention: queries from one stream, keys and values from another (or the same).

    softmax=False is linear attention: the weight of key j for query i is the raw score
    ⟨q_i, k_j⟩. mask: "causal" (query i sees keys j <= i, same stream) or "full".
    """

    def __init__(self, w_q, w_k, w_v, w_o, heads: int, softmax: bool, mask: str):
        super().__init__()
        assert mask in MASKS
        self.w_q, self.w_k, self.w_v, self.w_o = (_param(w) for w in (w_q, w_k, w_v, w_o))
        self.heads, self.softmax, self.mask = heads, softmax, mask

    def forward(self, xq, xk, xv):
        q = _split(xq @ self.w_q.T, self.heads)  # [B, H, Tq, dq]
        k = _split(xk @ self.w_k.T, self.heads)  # [B, H, Tk, dq]
        v = _split(xv @ self.w_v.T, self.heads)  # [B, H, Tk, dv]
        scores = q @ k.transpose(-1, -2)
        if self.mask == "causal":
            future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(future, float("-inf") if self.softmax else 0.0)
        weights = scores.softmax(-1) if self.softmax else scores
        out = weights @ v  # [B, H, Tq, dv]
        b, h, t, dv = out.shape
        return out.transpose(1, 2).reshape(b, t, h * dv) @ self.w_o.T

    def extra_repr(self) -> str:
        return f"heads={self.heads}, softmax={self.softmax}, mask={self.mask}"


def _split(x, heads: int):
    b, t, d = x.shape
    return x.view(b, t, heads, d // heads).transpose(1, 2)


PRIMITIVES = (Linear, MLP, Gate, Norm, Attention)
