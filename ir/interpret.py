"""The IR interpreter: runs a graph on aux weights with plain, differentiable torch ops.

It is the oracle for the frontend (a traced graph must reproduce the HF logits), for
autodiff (a training graph must reproduce `tintc.oracle.reference`'s ĝ) and for the TinT.
One method per op kind; values are batched: [B, T, ...]. Weights are read at their
version: θ_0 from `params`, later versions from what descent ops wrote.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import rules
from .graph import Graph, Node, WeightRef


@dataclass
class Result:
    logits: torch.Tensor  # [B, T, V]
    params: dict[str, torch.Tensor]  # every aux parameter at its last version
    values: dict[str, torch.Tensor]  # every node's value (descent ops: none)


class Interpreter:
    def __init__(self, graph: Graph):
        self.graph = graph

    def run(self, params: dict[str, torch.Tensor], input_ids: torch.Tensor, keep: bool = False):
        """Logits [B, T, V] for ids [B, T] (a forward graph); with keep=True also every node's value."""
        logits, params, values = self._execute_one(params, input_ids, None, None)
        return (logits, values) if keep else logits

    def execute(self, params, input_ids, train_mask=None, label_mask=None) -> Result:
        """Run any graph on each sequence of the batch as its own context (a training graph
        trains one copy of θ per sequence). Result.params: [B, *shape]; values: [B, T, ...]."""
        runs = []
        for b in range(input_ids.shape[0]):
            one = slice(b, b + 1)
            runs.append(self._execute_one(params, input_ids[one], None if train_mask is None else train_mask[one],
                                          None if label_mask is None else label_mask[one]))
        return Result(
            logits=torch.cat([r[0] for r in runs]),
            params={n: torch.stack([r[1][n] for r in runs]) for n in params},
            values={n: torch.cat([r[2][n] for r in runs]) for n, v in runs[0][2].items() if v is not None},
        )

    def _execute_one(self, params, input_ids, train_mask, label_mask):
        self.inputs = {"ids": input_ids, "train": train_mask,
                       "label": torch.ones_like(input_ids, dtype=torch.bool) if label_mask is None else label_mask}
        self.written: dict[tuple, torch.Tensor] = {}  # (weight key, version) -> value
        values: dict[str, torch.Tensor] = {}
        logits = None
        for node in self.graph.nodes():
            args = [values[i] for i in node.inputs]
            weights = {slot: self._read(ref, params) for slot, ref in node.weights.items()}
            values[node.name] = getattr(self, "op_" + node.kind)(node, args, weights)
            if node.kind == "output":
                logits = values[node.name]
        return logits, self._updated(params), values

    def _read(self, ref: WeightRef, params):
        return ref.resolve(params) if ref.version == 0 else self.written[(ref.key, ref.version)]

    def _write(self, node: Node, slot: str, value) -> None:
        ref = node.weights[slot]
        self.written[(ref.key, ref.version + 1)] = value

    def _updated(self, params):
        """The aux parameters with every weight at its last written version."""
        latest: dict[tuple, tuple[int, torch.Tensor]] = {}
        for (key, version), value in self.written.items():
            if version > latest.get(key, (0, None))[0]:
                latest[key] = (version, value)
        out = dict(params)
        for (name, transpose, rows, period, cols), (_, value) in latest.items():
            full = out[name].detach().clone() if out[name] is params[name] else out[name]
            view = full.T if transpose else full
            index = WeightRef(name, transpose, rows, period=period).row_index(view.shape[0])
            if cols is None:
                view[index] = value
            else:  # a column chunk of contiguous rows (split_mlp)
                view[index, cols[0] : cols[1]] = value
            out[name] = full
        return out

    # -- forward ops -----------------------------------------------------------------------
    def op_input(self, node: Node, args, w):
        return self.inputs["ids"]

    def op_embed(self, node, args, w):
        rows = w["table"][args[0]]  # [B, T, D]
        return rows * node.attrs["scale"] if "scale" in node.attrs else rows

    def op_pos_embed(self, node, args, w):
        batch, length = args[0].shape
        offset = node.attrs["offset"]
        return w["table"][offset : offset + length].expand(batch, -1, -1)

    def op_add(self, node, args, w):
        return args[0] + args[1]

    def op_layer_norm(self, node, args, w):
        return self.layer_norm(args[0], w["gain"], w["bias"], node.attrs["eps"])

    def op_rms_norm(self, node, args, w):
        a, x = node.attrs, args[0]
        if "gain_offset" not in a:
            return self.rms_norm(x, w["gain"], a["eps"], a.get("upcast"), a.get("heads", 1))
        # Gemma 2: the gain is offset + w, and with upcast HF multiplies by it before the cast back
        dtype = getattr(torch, a["upcast"]) if "upcast" in a else x.dtype
        return self.rms_norm(x.to(dtype), a["gain_offset"] + w["gain"].to(dtype), a["eps"],
                             heads=a.get("heads", 1)).to(x.dtype)

    def op_linear(self, node, args, w):
        return F.linear(args[0], w["weight"], w.get("bias"))

    def op_activation(self, node, args, w):
        return self.activation(args[0], node.attrs["fn"])

    def op_mul(self, node, args, w):
        return args[0] * args[1]

    def op_attention(self, node, args, w):
        a = node.attrs
        kv_heads = a.get("kv_heads", a["heads"])
        q = _heads(args[0], a["heads"])  # [B, H, T, hd]
        k, v = (_heads(x, kv_heads) for x in args[1:])  # [B, H_kv, T, hd]
        if a["positions"] == "rope":
            cos, sin = rules.rope_cos_sin(q.shape[-2], a["rotary_dim"], a["rope_theta"], q.dtype)
            q, k = rules.apply_rope(q, cos, sin), rules.apply_rope(k, cos, sin)
        # grouped-query: each k/v head serves heads/kv_heads consecutive query heads
        k, v = (x.repeat_interleave(a["heads"] // kv_heads, dim=1) for x in (k, v))
        return _merge(self.attention(q, k, v, a["scale"], a["causal"], window=a.get("window"), bias=_bias(a, q),
                                     upcast=a.get("upcast"), softcap=a.get("softcap")))

    def op_lm_head(self, node, args, w):
        return rules.capped_logits(args[0] @ w["weight"].T, node.attrs.get("softcap"))

    def op_output(self, node, args, w):
        return args[0]

    # -- training ops ----------------------------------------------------------------------
    def op_mask(self, node, args, w):
        return self.inputs[node.attrs["which"]].bool()

    def op_loss_grad(self, node, args, w):
        x, ids, train, label = args
        return rules.loss_grad(x, ids, w["weight"], rules.loss_weights(train, label), node.attrs.get("softcap"))

    def op_linear_backward(self, node, args, w):
        return args[0] @ w["weight"]

    def op_linear_descent(self, node, args, w):
        x, dy = args
        lr = node.attrs["lr"]
        if "weight" in w:
            self._write(node, "weight", w["weight"] - lr * torch.einsum("bto,bti->oi", dy, x))
        if "bias" in w:
            self._write(node, "bias", w["bias"] - lr * dy.sum((0, 1)))

    def op_layer_norm_backward(self, node, args, w):
        a = node.attrs
        return rules.layer_norm_backward(args[0], w["gain"], args[1], a["eps"], a["rule"], a["scale"])

    def op_layer_norm_descent(self, node, args, w):
        x, dy = args
        lr = node.attrs["lr"]
        if "gain" in w:
            self._write(node, "gain", w["gain"] - lr * (dy * rules.normalise(x, node.attrs["eps"])).sum((0, 1)))
        if "bias" in w:
            self._write(node, "bias", w["bias"] - lr * dy.sum((0, 1)))

    def op_activation_backward(self, node, args, w):
        a = node.attrs
        return rules.activation_backward(args[0], args[1], a["fn"], a["rule"], a["scale"])

    def op_rms_norm_backward(self, node, args, w):
        a = node.attrs
        gain = a["gain_offset"] + w["gain"] if "gain_offset" in a else w["gain"]
        return rules.rms_norm_backward(args[0], gain, args[1], a["eps"], a["rule"], a["scale"], a.get("heads", 1))

    def op_rms_norm_descent(self, node, args, w):
        x, dy = args
        xhat = rules.rms_normalise(x, node.attrs["eps"], node.attrs.get("heads", 1))
        per_part = (dy * xhat).reshape(-1, w["gain"].shape[-1])  # heads: every part's sum
        self._write(node, "gain", w["gain"] - node.attrs["lr"] * per_part.sum(0))

    def op_attention_backward(self, node, args, w):
        a = node.attrs
        heads, kv_heads = a["heads"], a.get("kv_heads", a["heads"])
        q, do = _heads(args[0], heads), _heads(args[2], heads)
        k = _heads(args[1], kv_heads)
        if a.get("positions") == "rope":
            cos, sin = rules.rope_cos_sin(q.shape[-2], a["rotary_dim"], a["rope_theta"], q.dtype)
            q, k = rules.apply_rope(q, cos, sin), rules.apply_rope(k, cos, sin)
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        dv = rules.attention_backward_values(q, k, do, a["scale"], a["causal"], bias=_bias(a, q),
                                             softcap=a.get("softcap"))  # per query head
        b, _, t, hd = dv.shape
        return _merge(dv.view(b, kv_heads, heads // kv_heads, t, hd).sum(2))  # a k/v head: its query heads' sum

    def op_attention_score_backward(self, node, args, w):
        a = node.attrs
        heads, kv_heads = a["heads"], a.get("kv_heads", a["heads"])
        q, do = _heads(args[0], heads), _heads(args[3], heads)
        k, v = _heads(args[1], kv_heads), _heads(args[2], kv_heads)
        rope = a.get("positions") == "rope"
        if rope:
            cos, sin = rules.rope_cos_sin(q.shape[-2], a["rotary_dim"], a["rope_theta"], q.dtype)
            q, k = rules.apply_rope(q, cos, sin), rules.apply_rope(k, cos, sin)
        groups = heads // kv_heads
        k, v = (x.repeat_interleave(groups, dim=1) for x in (k, v))
        dq, dk = rules.attention_backward_scores(q, k, v, do, a["scale"], a["causal"], bias=_bias(a, q),
                                                 softcap=a.get("softcap"))  # rotated q, k
        if a["wrt"] == "q":
            grad = dq
        else:  # a k/v head: the sum over its query heads
            b, _, t, hd = dk.shape
            grad = dk.view(b, kv_heads, groups, t, hd).sum(2)
        return _merge(rules.unapply_rope(grad, cos, sin) if rope else grad)

    # -- the primitives whose backward the oracle replaces ---------------------------------
    def layer_norm(self, x, gain, bias, eps):
        return F.layer_norm(x, (x.shape[-1],), gain, bias, eps)

    def rms_norm(self, x, gain, eps, upcast: str | None = None, heads: int = 1):
        return gain.repeat(heads) * rules.rms_normalise_as(x, eps, upcast, heads)

    def activation(self, x, fn: str):
        return rules.ACTIVATION_FNS[fn](x)

    def attention(self, q, k, v, scale: float, causal: bool, window: int | None = None, bias=None, upcast=None,
                  softcap: float | None = None):
        return rules.attention_probs(q, k, scale, causal, window=window, bias=bias, upcast=upcast,
                                     softcap=softcap) @ v


def _bias(attrs: dict, q):
    """ALiBi's score bias [H, T] (positions='alibi'), else None; q: [B, H, T, hd]."""
    if attrs.get("positions") != "alibi":
        return None
    return rules.alibi_bias(attrs["heads"], q.shape[-2], q.dtype)


def _heads(x, heads: int):
    """[B, T, H·hd] -> [B, H, T, hd]"""
    b, t, d = x.shape
    return x.view(b, t, heads, d // heads).transpose(1, 2)


def _merge(x):
    """[B, H, T, hd] -> [B, T, H·hd]"""
    b, h, t, hd = x.shape
    return x.transpose(1, 2).reshape(b, t, h * hd)
