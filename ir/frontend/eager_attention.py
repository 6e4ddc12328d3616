"""Recognition of attention written out op by op (a part of recognize.py's Recognizer): BLOOM's eager
attention, baddbmm(bias, q, kᵀ, alpha=scale) for the scores plus ALiBi's bias, an added causal mask,
a softmax, and bmm with v. The bias and the mask are constants of the trace; what they are (ALiBi)
comes from the adapter's attention attributes, and the logit check confirms it."""

from __future__ import annotations

from dataclasses import replace

from .values import Const, Scores, Val, module_of


class EagerAttention:
    def op_baddbmm(self, node, bias, q, k, *, beta=1, alpha=1):
        vq, vk = self.values.get(q), self.values.get(k)
        if not (isinstance(self.values.get(bias), Const) and isinstance(vq, Val) and isinstance(vk, Val)):
            self.fail(node, "baddbmm of attention scores expects a constant bias (ALiBi) and q, k projections")
        if beta != 1 or vq.scale != 1.0 or vk.scale != 1.0 or vq.rotary or vk.rotary:
            self.fail(node, f"scores bias scaled by beta={beta}, or q/k scaled or rotated; allowed: beta=1, "
                            "plain q and k")
        return Scores(Val(vq.name), Val(vk.name), float(alpha))

    def op_softmax(self, node, x, dim, *rest):
        scores = self.values.get(x)
        if not isinstance(scores, Scores) or scores.probs or dim not in (-1, node.args[0].meta["val"].dim() - 1):
            self.fail(node, "a softmax of something other than attention scores over the keys")
        dtype = rest[0] if rest else None
        upcast = str(dtype).removeprefix("torch.") if dtype not in (None, node.args[0].meta["val"].dtype) else None
        return replace(scores, probs=True, upcast=upcast)

    def op_bmm(self, node, probs, v):
        weights, vv = self.values.get(probs), self.values.get(v)
        if not isinstance(weights, Scores) or not weights.probs or not isinstance(vv, Val):
            self.fail(node, "bmm other than the attention weights times v")
        head_dim = int(node.args[1].meta["val"].shape[-1])
        heads = self.width(weights.q) // head_dim
        attrs = {"heads": heads, "head_dim": head_dim, "causal": True, "scale": weights.scale, "positions": "none"}
        kv_heads = self.width(weights.k) // head_dim
        if kv_heads != heads:
            attrs["kv_heads"] = kv_heads
        attrs |= self.adapter.attention_extras(self.model) | ({"upcast": weights.upcast} if weights.upcast else {})
        return self.emit("attn", "attention", [weights.q, weights.k, self.val(node, v)], self.width(weights.q),
                         module_of(node), **attrs)

    def scores_plus_constant(self, va, vb):
        """The scores plus a constant (the causal mask): still the scores; None for any other add."""
        return va if isinstance(va, Scores) and isinstance(vb, Const) else None
