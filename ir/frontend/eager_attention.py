"""Recognition of attention written out op by op (a part of recognize.py's Recognizer): BLOOM's eager
attention, baddbmm(bias, q, kᵀ, alpha=scale) for the scores plus ALiBi's bias, an added causal mask,
a softmax, and bmm with v. The bias and the mask are constants of the trace; what they are (ALiBi)
comes from the adapter's attention attributes, and the logit check confirms it. The mask's add and the
softmax are eager.py's, shared with Gemma 2's matmul form."""

from __future__ import annotations

from .values import Const, Probs, Scores, Val, module_of


class EagerAttention:
    """BLOOM's baddbmm and bmm; the mask's add and the softmax between them are eager.py's (Gemma 2's too)."""

    def op_baddbmm(self, node, bias, q, k, *, beta=1, alpha=1):
        vq, vk = self.values.get(q), self.values.get(k)
        if not (isinstance(self.values.get(bias), Const) and isinstance(vq, Val) and isinstance(vk, Val)):
            self.fail(node, "baddbmm of attention scores expects a constant bias (ALiBi) and q, k projections")
        if beta != 1 or vq.scale != 1.0 or vk.scale != 1.0 or vq.rotary or vk.rotary:
            self.fail(node, f"scores bias scaled by beta={beta}, or q/k scaled or rotated; allowed: beta=1, "
                            "plain q and k")
        head_dim = int(q.meta["val"].shape[-1])
        return Scores(Val(vq.name), Val(vk.name), self.width(vq) // head_dim, head_dim, float(alpha))

    def op_bmm(self, node, probs, v):
        weights, vv = self.values.get(probs), self.values.get(v)
        if not isinstance(weights, Probs) or not isinstance(vv, Val):
            self.fail(node, "bmm other than the attention weights times v")
        scores = weights.scores
        head_dim = int(node.args[1].meta["val"].shape[-1])
        heads = self.width(scores.q) // head_dim
        attrs = {"heads": heads, "head_dim": head_dim, "causal": True, "scale": scores.scale, "positions": "none"}
        kv_heads = self.width(scores.k) // head_dim
        if kv_heads != heads:
            attrs["kv_heads"] = kv_heads
        module = module_of(node)
        attrs |= self.adapter.attention_extras(self.model, self.where(module)[0])
        attrs |= {"upcast": weights.upcast} if weights.upcast else {}
        return self.emit("attn", "attention", [scores.q, scores.k, self.val(node, v)], self.width(scores.q),
                         module, **attrs)
