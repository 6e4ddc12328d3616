"""Recognition of attention (a part of recognize.py's Recognizer): `scaled_dot_product_attention`,
and eager attention written out op by op, as Gemma 2 runs it (its HF class has no sdpa):
matmul(q, kᵀ) · scale, its soft-capping c·tanh(s/c) if any, + the mask, softmax (HF's in float32 whatever the model's dtype: kept as
`upcast`), matmul with v. Both become one IR attention op.
"""

from __future__ import annotations

from dataclasses import replace

from torch import fx

from .values import CappedLogits, Const, Ids, Probs, Scores, Val, module_of


class AttentionPatterns:
    def op_scaled_dot_product_attention(self, node, q, k, v, mask=None, dropout_p=0.0, is_causal=False,
                                        scale=None, enable_gqa=False):
        vq, vk, vv = (self.values.get(a) for a in (q, k, v))
        if mask is not None and not isinstance(self.values.get(mask), Const):
            self.fail(node, "the attention mask depends on activations; allowed: the causal mask")
        heads, _, head_dim = q.meta["val"].shape[-3:]
        return self._attention(node, vq, vk, vv, int(heads), int(head_dim), head_dim**-0.5 if scale is None else scale)

    def op_matmul(self, node, a, b):
        va, vb = (self.values.get(x) for x in (a, b))
        if isinstance(va, Val) and isinstance(vb, Val):  # q·kᵀ (k seen through its transpose)
            heads, _, head_dim = a.meta["val"].shape[-3:]
            return Scores(va, vb, int(heads), int(head_dim))
        if isinstance(va, Probs) and isinstance(vb, Val):
            s = va.scores
            if not s.masked:
                self.fail(node, "eager attention without a mask; allowed: the causal mask")
            extra = {"upcast": va.upcast} if va.upcast else {}
            if s.softcap is not None:
                extra["softcap"] = s.softcap
            return self._attention(node, s.q, s.k, vb, s.heads, s.head_dim, s.scale, **extra)
        if self._constant(node):
            return Const()
        self.fail(node, "a matrix product other than eager attention's q·kᵀ and probabilities·v")

    def scores_times(self, node, scores: Scores, factor) -> Scores:
        """The score scale (before any soft-capping), or the c of c·tanh(s/c)."""
        if isinstance(factor, (int, float)) and not scores.masked and not scores.cap:
            return replace(scores, scale=scores.scale * factor)
        if scores.cap == "tanh" and factor == scores.softcap:
            return replace(scores, cap="capped")
        self.fail(node, "eager attention's scores may only be scaled by a number, then soft-capped c·tanh(s/c), "
                        "then masked")

    def op_div(self, node, x, divisor):
        value = self.values.get(x)
        if isinstance(value, Scores) and isinstance(divisor, (int, float)) and not value.cap and not value.masked:
            return replace(value, cap="divided", softcap=float(divisor))  # soft-capping: s/c
        head = self.graph.node(value.name) if isinstance(value, Val) else None
        if head is not None and head.kind == "lm_head" and "softcap" not in head.attrs and value.scale == 1.0 \
                and isinstance(divisor, (int, float)):
            return CappedLogits(value, float(divisor))  # the final logits' soft-capping: z/c
        if self._constant(node):
            return Const()
        self.fail(node, "a division other than the s/c of a soft-capping c·tanh(s/c) (eager attention's scores or "
                        "the final logits)")

    def op_tanh(self, node, x):
        value = self.values.get(x)
        if isinstance(value, Scores) and value.cap == "divided":
            return replace(value, cap="tanh")
        if isinstance(value, CappedLogits) and value.stage == "divided":
            return replace(value, stage="tanh")
        if self._constant(node):
            return Const()
        self.fail(node, "a tanh other than that of a soft-capping c·tanh(s/c) (eager attention's scores or the final "
                        "logits) or of tanh-GELU")

    def logits_times(self, node, value: CappedLogits, factor) -> Val:
        """c·tanh(z/c) of the head's logits: the lm_head op's `softcap` c."""
        if value.stage != "tanh" or factor != value.softcap:
            self.fail(node, f"the final logits' tanh(z/c) times {factor}; allowed: times c = {value.softcap} "
                            "(soft-capping c·tanh(z/c))")
        self.graph.node(value.logits.name).attrs["softcap"] = value.softcap
        return value.logits

    def _constant(self, node) -> bool:
        """Computed from positions alone (masks, rotary tables), as recognize.py's walk treats any op."""
        return all(isinstance(self.values.get(a), (Const, Ids)) for a in node.all_input_nodes)

    def scores_masked(self, node, scores: Scores, mask) -> Scores:
        if not isinstance(mask, Const) or scores.masked or scores.cap not in ("", "capped"):
            self.fail(node, "eager attention's mask depends on activations or comes inside the soft-capping; "
                            "allowed: the causal mask, after c·tanh(s/c)")
        return replace(scores, masked=True)

    def op_softmax(self, node, x, dim=-1, dtype=None):
        value = self.values.get(x)
        if isinstance(value, Const):
            return Const()
        if not isinstance(value, Scores) or dim not in (-1, x.meta["val"].dim() - 1):
            self.fail(node, "a softmax of something other than eager attention's scores over the keys")
        upcast = dtype if dtype is not None and dtype != x.meta["val"].dtype else None
        return Probs(value, str(upcast).removeprefix("torch.") if upcast else None)

    def _attention(self, node: fx.Node, vq, vk, vv, heads: int, head_dim: int, scale: float, **extra) -> Val:
        if not all(isinstance(x, Val) for x in (vq, vk, vv)) or vv.scale != 1.0 or vv.rotary:
            self.fail(node, "q, k, v must be projections of the stream (v unscaled, unrotated)")
        if vq.rotary != vk.rotary:
            self.fail(node, "q and k must both be rotated or neither")
        attrs = {"heads": heads, "head_dim": head_dim, "causal": True, "scale": float(scale * vq.scale * vk.scale),
                 "positions": "rope" if vq.rotary else "none", **extra}
        kv_heads = self.width(vk) // head_dim
        if kv_heads != heads:
            attrs["kv_heads"] = kv_heads
        if vq.rotary:
            attrs |= {"rope_theta": self.adapter.rope_theta(self.model), "rotary_dim": vq.rotary}
        attrs |= self.adapter.attention_extras(self.model, self.where(module_of(node))[0])
        plain = [Val(x.name) for x in (vq, vk, vv)]
        return self.emit("attn", "attention", plain, self.width(vq), module_of(node), **attrs)
