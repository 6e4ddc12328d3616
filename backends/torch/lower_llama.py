"""Lowering of the LLaMA ops (a part of backends/torch/lower.py's _Lowering): RMSNorm forward,
finite-difference backward and gain descent, the elementwise product of a gated MLP, and the
rotary positions and grouped-query head map that attention's forward and backward read.

RMSNorm is the Norm primitive on [x, −x]: its mean is 0 and its variance mean(x²), so layer
norm with the same ε gives [x, −x]/sqrt(mean(x²) + ε). Rotary cos/sin are constants of a
linear map from the one-hot positions, built from θ and rotary_dim (settings, not aux weights).
"""

from __future__ import annotations

import torch

from ir import rules
from ir.errors import BackendError

from . import runtime as P
from .program import Field


class LlamaLowering:
    # -- RMSNorm ---------------------------------------------------------------------------
    def _rms_normalised(self, x: Field, eps: float, heads: int = 1) -> Field:
        """x / sqrt(mean(x²) + eps): the layer norm of [x, −x], first half; once per (x, eps). heads: each of
        x's equal parts on its own (a norm of each head), a group per part, then their first halves side
        by side."""
        key = ("rms_normalised", x, eps) + (() if heads == 1 else (heads,))
        if key not in self.memo:
            d = x.width // heads
            if heads == 1:
                mirrored = self._linear_of("mirror", torch.cat([self.eye(d), -self.eye(d)]), [x])
                normed = self.alloc(2 * d)
                self.call(self.layer(("norm", repr(eps)), lambda: P.Norm(eps)), [[(mirrored,)]], [normed])
                self.memo[key] = normed.part(0, d)
                return self.memo[key]
            mirror = self.layer(("mirror", 2 * d, d), lambda: P.Linear(torch.cat([self.eye(d), -self.eye(d)])))
            _, mirrored = self.new(2 * x.width, 2 * d)
            self.call(mirror, [[(c,) for c in x.chunks(d)]], mirrored)
            _, normed = self.new(2 * x.width, 2 * d)
            self.call(self.layer(("norm", repr(eps)), lambda: P.Norm(eps)), [[(c,) for c in mirrored]], normed)
            first = self.layer(("first_half", d), lambda: P.Linear(torch.cat([self.eye(d), 0 * self.eye(d)], 1)))
            out, chunks = self.new(x.width, d)
            self.call(first, [[(c,) for c in normed]], chunks)
            self.memo[key] = out
        return self.memo[key]

    def _rms_normalise_of(self, node):
        """f of this node's norm: of the whole value, or of each head (attribute `heads`)."""
        heads = node.attrs.get("heads", 1)
        return lambda x, eps: self._rms_normalised(x, eps, heads)

    def lower_rms_norm(self, node):
        y = self._rms_normalise_of(node)(self.x(node), node.attrs["eps"])
        self.fields[node.name] = self._gained(node, y)  # the block's β is 0 and unused

    def lower_rms_norm_backward(self, node):
        """finite_difference: N·[f(x + (γ⊙∂y)·(1/N)) − f(x)], f the RMS normalisation, as the rule computes it.
        exact: ∂x = (u − f·mean(f⊙u))/rms(x), u = γ⊙∂y, the division by _divided_by_sigma with y = x.
        heads: per head, the means and σ of each head."""
        a = node.attrs
        heads = a.get("heads", 1)
        x, u = self._norm_backward_inputs(node, "RMSNorm")
        if a["rule"] == "exact":
            f = self._rms_normalised(x, a["eps"], heads)
            (mean_fu,) = self._means(self._product(f, u), heads=heads)
            self.fields[node.name] = self._divided_by_sigma(x, self._minus_times(mean_fu, f, u), a["eps"], heads)
            return
        self._finite_difference_backward(node, x, u, self._rms_normalise_of(node))

    def lower_rms_norm_descent(self, node):
        self._norm_descent(node, self._rms_normalise_of(node))

    # -- the gated MLP's product -------------------------------------------------------------
    def lower_mul(self, node):
        self.fields[node.name] = self._product(self.x(node, 0), self.x(node, 1))

    # -- attention: rotary positions and the grouped-query head map --------------------------
    @staticmethod
    def _kv_head(a: dict, head: int) -> int:
        """The k/v head that query head `head` reads (grouped-query: heads/kv_heads share one)."""
        return head // (a["heads"] // a.get("kv_heads", a["heads"]))

    def _rope_tables(self, a: dict) -> tuple[Field, Field]:
        """cos and sin of every position over one head (head_dim wide; beyond rotary_dim cos 1, sin 0):
        a linear map of the one-hot position whose weight is the table, as the oracle builds it."""
        hd, r = a["head_dim"], a["rotary_dim"]
        key = ("rope", hd, r, a["rope_theta"])
        if key not in self.memo:
            cos, sin = rules.rope_cos_sin(self.tmax, r, a["rope_theta"], self.dtype)  # [T_max, r]
            n = self.tmax
            full_cos = torch.cat([cos, torch.ones(n, hd - r, dtype=self.dtype)], 1)
            full_sin = torch.cat([sin, torch.zeros(n, hd - r, dtype=self.dtype)], 1)
            table = torch.cat([full_cos, full_sin], 1).T  # [2·hd, T_max]
            name = f"rope_table_{r}_{a['rope_theta']!r}"
            both = self._linear_of(name, table, [self.inputs["positions"]])
            self.memo[key] = (both.part(0, hd), both.part(hd, hd))
        return self.memo[key]

    def _rotated(self, a: dict, x: Field, inverse: bool = False) -> Field:
        """x⊙cos + rotate_half(x)⊙sin per head (positions='rope'), else x; once per value. inverse:
        x⊙cos − rotate_half(x)⊙sin, the transposed rotation (by −angle) that takes a gradient wrt
        the rotated q or k back to the unrotated one."""
        if a.get("positions", "none") != "rope":
            return x
        hd, r = a["head_dim"], a["rotary_dim"]
        key = ("rotated", x, hd, r, a["rope_theta"], inverse)
        if key not in self.memo:
            cos, sin = self._rope_tables(a)
            sign = -1.0 if inverse else 1.0
            half = torch.zeros(hd, hd, dtype=self.dtype)  # ±rotate_half on the first r coordinates
            idx = torch.arange(r // 2)
            half[idx, idx + r // 2] = -sign
            half[idx + r // 2, idx] = sign
            heads = x.chunks(hd)
            along = self.layer(("rope_cos", hd), lambda: P.Gate(self.eye(hd), self.eye(hd)))
            by_cos, by_cos_chunks = self.new(x.width, hd)
            self.call(along, [[(c,) for c in heads], [(cos,)] * len(heads)], by_cos_chunks)
            name = "rope_sin_inverse" if inverse else "rope_sin"
            turn = self.layer((name, hd, r), lambda: P.Gate(half, self.eye(hd), self.eye(hd)))
            out, chunks = self.new(x.width, hd)
            self.call(turn, [[(c,) for c in heads], [(sin,)] * len(heads), [(c,) for c in by_cos_chunks]], chunks)
            self.memo[key] = out
        return self.memo[key]

    def _score_inputs(self, node) -> tuple[list, list, torch.Tensor, torch.Tensor, tuple]:
        """Per query head, the q and k groups of a softmax head, its w_q and w_k and a key suffix, from the
        node's inputs 0 and 1: rope rotates q and k; alibi appends a constant 1 to q and m_h·j to k (a key
        feature of the one-hot position), so the score is scale·⟨q_t, k_j⟩ + m_h·j exactly. Query head i
        reads k/v head _kv_head(i)."""
        a = node.attrs
        hd = a["head_dim"]
        q, k = (self._rotated(a, self.x(node, i)).chunks(hd) for i in range(2))
        k = [k[self._kv_head(a, i)] for i in range(len(q))]
        if a.get("positions") != "alibi":
            return [(c,) for c in q], [(c,) for c in k], a["scale"] * self.eye(hd), self.eye(hd), ()
        bias = self._alibi_keys(a["heads"])
        w_q = torch.diag(torch.tensor([a["scale"]] * hd + [1.0], dtype=self.dtype))
        return ([(c, self.inputs["one"]) for c in q], [(c, bias.part(i, 1)) for i, c in enumerate(k)], w_q,
                self.eye(hd + 1), ("alibi",))

    def _alibi_keys(self, heads: int) -> Field:
        """m_h·j of every head h at position j: a linear map of the one-hot position whose weight is ALiBi's
        bias table (rules.alibi_bias, from the number of heads: a setting, not an aux weight)."""
        key = ("alibi", heads)
        if key not in self.memo:
            table = rules.alibi_bias(heads, self.tmax, self.dtype)  # [H, T_max]
            self.memo[key] = self._linear_of(f"alibi_table_{heads}", table, [self.inputs["positions"]])
        return self.memo[key]

    def _group_sum(self, per_head: Field, hd: int, groups: int) -> Field:
        """Per k/v head j, the sum of query heads j·groups … (j+1)·groups − 1 (each hd wide)."""
        heads = per_head.chunks(hd)
        layer = self.layer(("group_sum", hd, groups), lambda: P.Linear(torch.cat([self.eye(hd)] * groups, 1)))
        out, chunks = self.new(per_head.width // groups, hd)
        self.call(layer, [[tuple(heads[j * groups:(j + 1) * groups]) for j in range(len(chunks))]], chunks)
        return out

    # -- soft-capped attention (Gemma 2): the scores as values in the stream -------------------
    def _capped_scores(self, node) -> Field:
        """τ_tj = tanh(s_tj/c), s_tj = scale·⟨q_t, k_j⟩, per query head (h·T wide), once per (q, k): a causal
        linear head (query q_t, key k_j, value the one-hot e_j) writes each row of scores, a tanh MLP caps it."""
        a = node.attrs
        hd, h, n, c = a["head_dim"], a["heads"], self.tmax, a["softcap"]
        key = ("capped_scores", self.x(node, 0), self.x(node, 1))
        if key not in self.memo:  # the scores as attention computes them (rope, grouped-query)
            queries, keys, w_q, w_k, suffix = self._score_inputs(node)
            layer = self.layer(("attention_scores", hd, n, repr(a["scale"])) + suffix, lambda: P.Attention(
                w_q, w_k, self.eye(n), self.eye(n), softmax=False, mask="causal", positional="values"))
            scores, chunks = self.new(h * n, n)
            self.call(layer, [queries, keys, [(self.inputs["positions"],)] * h], chunks)
            tanh = self.layer(("softcap_tanh", n, repr(c)), lambda: P.MLP(self.eye(n) / c, self.eye(n), "tanh"))
            tau, tau_chunks = self.new(h * n, n)
            self.call(tanh, [[(x,) for x in scores.chunks(n)]], tau_chunks)
            self.memo[key] = tau
        return self.memo[key]

    def _capped_softmax(self, node, values: list[tuple], width: int) -> Field:
        """Σ_j softmax_j(c·τ_tj)·value_j per query head, keyed on the one-hot positions (causal)."""
        n = self.tmax
        tau = self._capped_scores(node).chunks(n)
        keys = [(self.inputs["positions"],)] * len(tau)
        return self._softmax_of_stored(tau, keys, values, node.attrs["softcap"], width, "causal")

    def _softmax_of_stored(self, tau: list[Field], keys, values, c: float, width: int, mask: str) -> Field:
        """Σ_j softmax_j(c·τ_j)·value_j, one head per row τ (n wide) of stored capped scores: a softmax head
        whose query is the row c·τ and whose keys are one-hot indices (the positions, or the vocabulary's
        in the capped head's block), so that its score of key j is c·τ_j exactly."""
        n = tau[0].width
        layer = self.layer(("capped_softmax", n, width, repr(c)) + (() if mask == "causal" else (mask,)), lambda:
                           P.Attention(c * self.eye(n), self.eye(n), self.eye(width), self.eye(width), softmax=True,
                                       mask=mask, positional="keys"))
        out, chunks = self.new(len(tau) * width, width)
        self.call(layer, [[(x,) for x in tau], keys, values], chunks)
        return out

    def _capped_gradient(self, tau: Field, g: Field, group: int | None = None) -> Field:
        """∂ through a cap c·tanh(s/c): g − τ⊙(τ⊙g) = g·(1 − τ²), elementwise (τ of width 1: broadcast)."""
        return self._difference(g, self._product(tau, self._product(tau, g, group=group), group=group), group=group)

    # -- soft-capped final logits (Gemma 2): the logits as values in the stream -----------------
    def _capped_loss_gradient(self, node, x: Field, target: Field) -> Field:
        """Σ_v p_v(1 − τ_v²)·E_v − (1 − τ_y²)·E_y, the loss gradient of logits c·tanh(z/c) before the weight w_t:
        z_t = E x_t (V wide) is a linear forward over the head's block (one row per prefix token, prefixes.py),
        a tanh MLP makes τ_t = tanh(z_t/c), a softmax head whose query is c·τ_t and whose keys and values are
        the block's one-hot vocabulary indices gives p_t = softmax(c·τ_t), 1 − τ² as in capped attention, and
        Eᵀ(p_t(1 − τ_t²)) a linear backward over the block. The target's τ_y = tanh(⟨x_t, E_y⟩/c): a product,
        a sum and a tanh unit, as E_y = target is already a value."""
        c = node.attrs["softcap"]
        block, version = self.block_of(node)
        b = self.layout.blocks[block]
        tau = self._activated(self._linear_forward(block, version, x), "tanh", 1 / c)
        onehot = self.block_read(block, version, [b.onehot])
        p = self._softmax_of_stored([tau], onehot, onehot, c, b.d_out, "full")
        expected = self._linear_backward(block, version, self._capped_gradient(tau, p))
        dot = self._linear_of("row_sum", torch.ones(1, x.width, dtype=self.dtype), [self._product(x, target)])
        tau_y = self._activated(dot, "tanh", 1 / c)
        return self._difference(expected, self._capped_gradient(tau_y, target))
