"""The math of the IR's ops that is more than one torch call, as plain tensor code on [B, T, ...]
values: activations, softmax attention, and the backward rules of the training graph.

These are the rules the TinT simulates; the training-graph interpreter runs them, and
the oracle (`tintc.oracle.reference`) uses the same formulas inside its autograd functions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ir.activations import ACTIVATIONS as ACTIVATION_FNS  # noqa: F401  (the interpreter and the oracle read it here)


def normalise(x, eps: float):
    """f(x) = (x − mean) / sqrt(var + eps) over the last axis (layer norm without affine)."""
    return F.layer_norm(x, (x.shape[-1],), None, None, eps)


def rms_normalise(x, eps: float, heads: int = 1):
    """f(x) = x / sqrt(mean(x²) + eps) over the last axis (RMSNorm without gain), in HF's op order;
    heads > 1: over each of `heads` equal parts of it (Qwen3's q/k norm)."""
    if heads > 1:
        return rms_normalise(x.unflatten(-1, (heads, -1)), eps).flatten(-2)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rms_normalise_as(x, eps: float, upcast: str | None, heads: int = 1):
    """f(x), computed in `upcast` (a dtype name) and cast back when given: HF's precision."""
    if upcast is None:
        return rms_normalise(x, eps, heads)
    return rms_normalise(x.to(getattr(torch, upcast)), eps, heads).to(x.dtype)


def rms_norm_backward(x, gain, dy, eps: float, rule: str, scale: float, heads: int = 1):
    """∂x of y = f(x)·γ, f the RMS normalisation (of each part: γ repeated over the `heads` parts).
    finite_difference: N·[f(x + γ⊙∂y/N) − f(x)]."""
    g = gain.repeat(heads) * dy
    if rule == "finite_difference":
        return scale * (rms_normalise(x + g * (1.0 / scale), eps, heads) - rms_normalise(x, eps, heads))
    return torch.func.vjp(lambda v: rms_normalise(v, eps, heads), x)[1](g)[0]


def rope_cos_sin(length: int, rotary_dim: int, theta: float, dtype):
    """cos, sin [T, rotary_dim] of the rotary embedding (halves layout), computed in float32 as
    Hugging Face computes them, then cast to `dtype`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    freqs = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None, :]  # [T, rotary_dim/2]
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate the first cos.shape[-1] coordinates of x [B, H, T, hd]: x·cos + rotate_half(x)·sin."""
    rotary = cos.shape[-1]
    rot, rest = x[..., :rotary], x[..., rotary:]
    first, second = rot[..., : rotary // 2], rot[..., rotary // 2 :]
    rotated = rot * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated


def unapply_rope(x, cos, sin):
    """The transposed rotation (by −angle) of the first cos.shape[-1] coordinates: x·cos − rotate_half(x)·sin.
    It maps the gradient wrt a rotated q or k to the gradient wrt the unrotated one."""
    return apply_rope(x, cos, -sin)


def layer_norm_backward(x, gain, dy, eps: float, rule: str, scale: float):
    """∂x of y = f(x)·γ + β. finite_difference: N·[f(x + γ⊙∂y/N) − f(x)]."""
    g = gain * dy
    if rule == "finite_difference":  # written op by op as the TinT computes it, so both round alike
        return scale * (normalise(x + g * (1.0 / scale), eps) - normalise(x, eps))
    xhat = normalise(x, eps)
    sigma = (x.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    return (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True)) / sigma


def activation_backward(x, dy, fn: str, rule: str, scale: float):
    """∂x of y = σ(x). finite_difference: N·[σ(x + ∂y/N) − σ(x)]."""
    sigma = ACTIVATION_FNS[fn]
    if rule == "finite_difference":
        return scale * (sigma(x + dy * (1.0 / scale)) - sigma(x))
    return torch.func.vjp(sigma, x)[1](dy)[0]


def alibi_slopes(heads: int):
    """ALiBi's slope m_h of each head (BLOOM's): 2^(−8h/n) for h = 1..n, n the largest power of 2 ≤ heads,
    and for the other heads the odd powers of the slopes of 2n heads; in float32, as Hugging Face builds them."""
    n = 2 ** math.floor(math.log2(heads))
    slopes = torch.tensor(2 ** (-(2 ** -(math.log2(n) - 3))), dtype=torch.float32) ** torch.arange(1, 1 + n)
    if n != heads:
        extra = torch.tensor(2 ** (-(2 ** -(math.log2(2 * n) - 3))), dtype=torch.float32)
        slopes = torch.cat([slopes, extra ** torch.arange(1, 1 + 2 * min(n, heads - n), 2)])
    return slopes


def alibi_bias(heads: int, length: int, dtype):
    """b[h, j] = m_h·j, ALiBi's score bias of key j in head h (the query's own m_h·t is a constant of its
    softmax row, so HF adds only this), computed in float32 and cast to `dtype` as HF does."""
    return (alibi_slopes(heads)[:, None] * torch.arange(length)).to(dtype)


def attention_probs(q, k, scale: float, causal: bool, window: int | None = None, bias=None,
                    upcast: str | None = None, softcap: float | None = None):
    """a[b, h, t, j] = softmax_j(scale·⟨q_t, k_j⟩ + bias[h, j]) on [B, H, T, hd] tensors (bias: ALiBi's,
    or none); with a window, query t sees only keys j with t − j < window; upcast (a dtype name): the
    softmax runs in it, as HF's eager attention does, and is cast back; softcap c: the scaled scores s are
    c·tanh(s/c) (Gemma 2)."""
    scores = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias[:, None, :]
    t = q.shape[-2]
    hidden = torch.zeros(t, t, dtype=torch.bool, device=q.device)
    if causal:
        hidden |= torch.ones_like(hidden).triu(1)
    if window is not None:
        hidden |= torch.ones_like(hidden).tril(-window)
    if hidden.any():
        scores = scores.masked_fill(hidden, float("-inf"))
    if upcast is not None:
        return scores.to(getattr(torch, upcast)).softmax(-1).to(q.dtype)
    return scores.softmax(-1)


def attention_backward_values(q, k, do, scale: float, causal: bool, bias=None, softcap: float | None = None):
    """Stop-gradient rule: the scores are constants, so ∂v_j = Σ_t a_tj ∂o_t (heads [B, H, T, hd])."""
    return attention_probs(q, k, scale, causal, bias=bias, softcap=softcap).transpose(-1, -2) @ do


def attention_backward_scores(q, k, v, do, scale: float, causal: bool, bias=None, softcap: float | None = None):
    """The gradient through the scores (heads [B, H, T, hd]): g_tj = a_tj·(d_tj − Σ_j' a_tj' d_tj'),
    d_tj = ⟨∂o_t, v_j⟩; soft-capped scores: g_tj·(1 − τ_tj²), τ = tanh(s/c) (the derivative of c·tanh(s/c));
    returns (∂q, ∂k) = (scale·g·k, scale·gᵀ·q) (a constant bias has no gradient)."""
    a = attention_probs(q, k, scale, causal, bias=bias, softcap=softcap)
    d = do @ v.transpose(-1, -2)
    g = a * (d - (a * d).sum(-1, keepdim=True))
    if softcap is not None:
        tau = torch.tanh((q @ k.transpose(-1, -2)) * scale / softcap)
        g = g - tau * (tau * g)  # as the TinT computes it
    return scale * g @ k, scale * g.transpose(-1, -2) @ q


def loss_weights(train_mask, label_mask=None):
    """w[b, t] = 1 where CE(z_{t+1} | z_≤t) enters the loss: t and t+1 train (and t+1 a label)."""
    m = train_mask.bool()
    w = torch.zeros_like(m)
    w[:, :-1] = m[:, :-1] & m[:, 1:]
    if label_mask is not None:
        w[:, :-1] &= label_mask.bool()[:, 1:]
    return w


def capped_logits(logits, softcap: float | None):
    """c·tanh(z/c) (Gemma 2's final soft-capping, in HF's order), or z without a cap."""
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def loss_grad(x, input_ids, unembed, weights, softcap: float | None = None):
    """∂/∂x_t of Σ_t w_t·CE(z_{t+1} | x_t) with logits x_t·Eᵀ: w_t·(Σ_v softmax_v(E x_t)·E_v − E_{z_{t+1}}).
    softcap c (logits c·tanh(z/c), τ = tanh(z/c)): ∂z = (softmax(c·τ) − y)⊙(1 − τ²), so
    w_t·(Σ_v p_v(1 − τ_v²)·E_v − (1 − τ_y²)·E_y) with y = z_{t+1}, each 1 − τ² applied as the TinT does:
    a − τ⊙(τ⊙a)."""
    target = torch.zeros_like(x)
    target[:, :-1] = unembed[input_ids[:, 1:]]
    logits = x @ unembed.T
    if softcap is None:
        expected = logits.softmax(-1) @ unembed  # [B, T, D]
    else:
        tau = torch.tanh(logits / softcap)
        p = (softcap * tau).softmax(-1)
        expected = (p - tau * (tau * p)) @ unembed
        tau_y = torch.tanh((x * target).sum(-1, keepdim=True) / softcap)  # τ at the target token
        target = target - tau_y * (tau_y * target)
    return weights[..., None].to(x.dtype) * (expected - target)
