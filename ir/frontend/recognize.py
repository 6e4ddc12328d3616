"""Recognition: the ATen graph of `torch.export` -> IR ops.

The exported graph is walked once in execution order. Every fx node gets a symbolic
value: the token ids, an aux parameter, a *constant* (what the model computes from
positions alone: masks, position ids, rotary cos/sin), or an IR value (a tensor equal to
an IR node's output, whatever view or head layout it is seen through). Each ATen op is
matched against the patterns the IR knows (linear, norm, attention with its mask and
position scheme, activation, gated product, residual add, embedding, head); a module
whose ops form a known composite (RMSNorm, tanh-GELU) is matched as a whole. A node that
matches nothing is an error naming its module path, its ATen op and its source line.

What the trace cannot say comes from the family's adapter: the role of each module
(q, mlp_in, ...), the rotary base, the position offset.
"""

from __future__ import annotations

import re
from dataclasses import replace

import networkx as nx
import torch
from torch import fx

from ir.errors import FrontendError

from ..graph import Graph, WeightRef
from .eager import AttentionPatterns
from .eager_attention import EagerAttention
from .fused import FusedProjections
from .values import (BOOKKEEPING, COMPOSITES, LAYOUT, CappedLogits, Const, Fused, Ids, Rope, Scores, Val, feeds_split,
                     module_of, normalised_width, op_name, reaches_attention, source_of)


class Recognizer(FusedProjections, AttentionPatterns, EagerAttention):
    def __init__(self, adapter, model, program: torch.export.ExportedProgram, name: str):
        self.adapter, self.model, self.program = adapter, model, program
        self.params = dict(model.named_parameters())  # tied tensors are listed once, under their first name
        canonical = {id(t): n for n, t in self.params.items()}
        state = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
        sig = program.graph_signature
        self.param_of = {p: canonical[id(state[n])] for p, n in sig.inputs_to_parameters.items()}
        self.layer_re = re.compile(rf"^{re.escape(adapter.layers)}\.(\d+)(?:\.(.+))?$")
        self.graph = Graph(name, {})
        self.values: dict[fx.Node, object] = {}
        self.adds_in_layer: dict[int, int] = {}
        self.parallel: set[int] = set()  # layers whose attention and MLP outputs are summed (GPT-NeoX)
        self.n_layer = 0

    # -- building IR nodes ---------------------------------------------------------------
    def where(self, module: str) -> tuple[int, str | None]:
        """(layer index, path inside the layer) of a module path; (-1, None) outside layers."""
        m = self.layer_re.match(module)
        return (int(m.group(1)), m.group(2)) if m else (-1, None)

    def emit(self, suffix, kind, inputs, width, module, role=None, weights=None, layer=None, **attrs) -> Val:
        if layer is None:
            layer = self.where(module)[0]
        self.n_layer = max(self.n_layer, layer + 1)
        for ref in (weights or {}).values():
            if ref.name not in self.graph.weight_shapes:
                self.graph.declare_weight(ref.name, self.params[ref.name].shape)
        name = f"h{layer}.{suffix}" if layer >= 0 else suffix
        meta = {"module": module, "layer": layer} | ({"role": role} if role else {})
        self.graph.add(name, kind, [v.name for v in inputs], ("T", width) if width else ("T",), attrs | meta,
                       weights)
        self.order[name] = len(self.order)
        return Val(name)

    def width(self, val: Val) -> int:
        return self.graph.node(val.name).shape[-1]

    def role(self, node: fx.Node, module: str, index: int = 0) -> str:
        layer, inner = self.where(module)
        roles = self.adapter.roles.get(inner) if layer >= 0 else self.adapter.outer_roles.get(module)
        if roles is None:
            known = [f"{self.adapter.layers}.N.{r}" for r in self.adapter.roles] + list(self.adapter.outer_roles)
            self.fail(node, f"module {module!r} has no role in the {self.adapter.family} adapter; known: "
                            + ", ".join(known))
        return roles[index] if isinstance(roles, tuple) else roles

    def fail(self, node: fx.Node, why: str):
        module = module_of(node) or "<root>"
        raise FrontendError(f"{module}: aten.{op_name(node)} ({node.name}, {source_of(node)}): {why}",
                            headline=f"cannot trace {type(self.model).__name__}")

    def val(self, node: fx.Node, arg) -> Val:
        """The IR value of an argument that must be one, unscaled."""
        value = self.values.get(arg) if isinstance(arg, fx.Node) else None
        if not isinstance(value, Val):
            self.fail(node, f"expected an activation as input, got {type(value).__name__} {arg}; "
                            "this op matches no pattern the IR knows")
        if value.scale != 1.0 or value.rotary:
            self.fail(node, f"reads a value scaled by {value.scale} ({value.origin}) or rotated; only attention may")
        return value

    def param(self, arg, transpose=False) -> WeightRef | None:
        if arg is None:
            return None
        return WeightRef(self.param_of[arg.name], transpose=transpose)

    # -- the walk ------------------------------------------------------------------------
    def run(self) -> Graph:
        self.graph.add("ids", "input", (), ("T",), {"module": "", "layer": -1})
        self.order = {"ids": 0}  # IR node -> its index: residual adds put the older input first
        nodes = list(self.program.graph.nodes)
        i = 0
        while i < len(nodes):
            node = nodes[i]
            run = self._module_run(nodes, i)
            kind = COMPOSITES.get(tuple(op_name(n) for n in run if op_name(n) not in LAYOUT | BOOKKEEPING))
            if kind and any(isinstance(self.values.get(a), Val) for n in run for a in n.all_input_nodes):
                self._composite(kind, run)
                i += len(run)
                continue
            self._node(node)
            i += 1
        return self.graph

    def _module_run(self, nodes, i) -> list[fx.Node]:
        module, j = module_of(nodes[i]), i
        while j < len(nodes) and nodes[j].op == "call_function" and module_of(nodes[j]) == module:
            j += 1
        return nodes[i:j] if j - i >= 2 else nodes[i : i + 1]

    def _node(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            if node.name in self.param_of:
                self.values[node] = node  # resolved by `param`
            else:  # buffers (rotary frequencies) and non-tensor inputs are constants
                self.values[node] = Ids() if node.name == "input_ids" else Const()
            return
        if node.op == "get_attr":
            self.values[node] = Const()
            return
        if node.op == "output":
            self._output(node)
            return
        name = op_name(node)
        inputs = [self.values.get(a) for a in node.all_input_nodes]
        if name in BOOKKEEPING:
            return
        if name in LAYOUT and inputs:
            self.values[node] = inputs[0]
            return
        handler = getattr(self, "op_" + name, None)
        if handler is not None:
            self.values[node] = handler(node, *node.args, **node.kwargs)
        elif all(isinstance(v, (Const, Ids)) for v in inputs):
            self.values[node] = Const()  # mask and position construction
        else:
            self.fail(node, "this op matches no pattern the IR knows")

    # -- patterns --------------------------------------------------------------------------
    def op_embedding(self, node, weight, indices, *rest):
        module = module_of(node)
        ref = self.param(weight)
        width = self.params[ref.name].shape[1]
        if isinstance(self.values[indices], Ids):
            return self.emit("tok_embed", "embed", [Val("ids")], width, module, weights={"table": ref})
        return self.emit("pos_embed", "pos_embed", [Val("ids")], width, module, weights={"table": ref},
                         offset=self.adapter.position_offset)

    def op_linear(self, node, x, weight, bias=None):
        return self._linear(node, self.val(node, x), self.param(weight), self.param(bias))

    def op_addmm(self, node, bias, x, weight):  # GPT-2's Conv1D: weight stored [in, out]
        return self._linear(node, self.val(node, x), self.param(weight, transpose=True), self.param(bias))

    def _linear(self, node, x: Val, weight: WeightRef, bias: WeightRef | None):
        module = module_of(node)
        if module == self.adapter.head:
            if bias is not None:
                self.fail(node, "the unembedding has a bias; allowed: none")
            vocab = self.params[weight.name].shape[0]
            return self.emit("logits", "lm_head", [x], vocab, module, weights={"weight": weight})
        if feeds_split(node):
            return Fused(module, x, weight, bias)
        weights = {"weight": weight} | ({"bias": bias} if bias is not None else {})
        role = self.role(node, module)
        out = weight.shape(self.params[weight.name].shape)[0]
        return self.emit(role, "linear", [x], out, module, role, weights)

    def op_layer_norm(self, node, x, shape, weight=None, bias=None, eps=1e-5, *rest):
        if weight is None or bias is None:
            self.fail(node, "a layer norm without gain or bias; allowed: both")
        return self._norm(node, "layer_norm", self.val(node, x), module_of(node),
                          {"gain": self.param(weight), "bias": self.param(bias)}, float(eps))

    def _norm(self, node, kind, x: Val, module: str, weights, eps: float, **attrs) -> Val:
        layer, _ = self.where(module)
        role = self.role(node, module) if layer >= 0 else self.adapter.outer_roles.get(module, "ln_final")
        return self.emit(role, kind, [x], self.width(x), module, role, weights, eps=eps, **attrs)

    def _composite(self, kind: str, run: list[fx.Node]) -> None:
        first, last = run[0], run[-1]
        inside = set(run)
        external = [a for n in run for a in n.all_input_nodes if a not in inside]
        x = self.val(first, next(a for a in external if isinstance(self.values.get(a), Val)))
        upcast = None
        for n in run:  # views and casts of the input stay the input (HF's residual reads the cast)
            if op_name(n) in LAYOUT and self.values.get(n.args[0]) == x:
                self.values[n] = x
                dtype = n.kwargs.get("dtype", n.args[1] if len(n.args) > 1 else None)
                if op_name(n) == "to" and dtype != n.args[0].meta["val"].dtype:
                    upcast = str(dtype).removeprefix("torch.")  # HF normalises in float32 whatever the dtype
        for n in run[:-1]:
            if n not in self.values and any(u not in inside for u in n.users):
                self.fail(n, f"is used outside its module, which does not fit the {kind} pattern")
        module = module_of(first)
        if kind in ("rms_norm", "rms_norm_offset"):
            gains = [a for a in external if a.name in self.param_of]
            adds = [n.args[1] for n in run if op_name(n) == "add"]  # + eps, then (Gemma 2) offset + gain
            eps = adds[0]
            extra = {"upcast": upcast} if upcast else {}
            per = normalised_width(run)  # Qwen3's q_norm: each head of x, one gain of the head width
            if per != self.width(x):
                extra["heads"] = self.width(x) // per
            if kind == "rms_norm_offset":
                extra["gain_offset"] = float(adds[1])
            self.values[last] = self._norm(first, "rms_norm", x, module, {"gain": self.param(gains[0])}, float(eps),
                                           **extra)
        else:
            self.values[last] = self._activation(first, x, kind)

    def _activation(self, node, x: Val, fn: str) -> Val:
        module = self.graph.node(x.name).attrs["module"]  # named after the linear it follows
        return self.emit("act", "activation", [x], self.width(x), module, fn=fn)

    def op_relu(self, node, x):
        return self._activation(node, self.val(node, x), "relu")

    def op_silu(self, node, x):
        return self._activation(node, self.val(node, x), "silu")

    def op_gelu(self, node, x, approximate="none"):
        return self._activation(node, self.val(node, x), "gelu" if approximate == "none" else "gelu_tanh")

    def op_add(self, node, a, b, alpha=1):
        va, vb = (self.values.get(v) if isinstance(v, fx.Node) else v for v in (a, b))
        if isinstance(va, Rope) and isinstance(vb, Rope):
            return self._rope(node, va, vb)
        if isinstance(va, Scores):  # Gemma 2's and BLOOM's eager attention: + the causal mask
            return self.scores_masked(node, va, vb)
        if isinstance(va, Val) and isinstance(vb, Val):
            module = module_of(node)
            layer, _ = self.where(module)
            x, y = sorted([self.val(node, a), self.val(node, b)], key=lambda v: self.order[v.name])
            if layer < 0:  # canonical order: the older value (the residual stream) first
                return self.emit("embed", "add", [x, y], self.width(va), "")
            if not nx.has_path(self.graph.nx, x.name, y.name) and layer not in self.parallel:
                # neither feeds the other: parallel residual (GPT-NeoX), attention's and the MLP's outputs
                self.parallel.add(layer)
                return self.emit("branches", "add", [x, y], self.width(va), module)
            count = self.adds_in_layer.get(layer, 0)
            self.adds_in_layer[layer] = count + 1
            names = ("resid",) if layer in self.parallel else ("resid_attn", "resid_mlp")
            if count >= len(names):
                self.fail(node, "one residual add too many in this layer; allowed: attention's, then the MLP's, "
                                "or (parallel residual) the sum of both, then its residual add")
            return self.emit(names[count], "add", [x, y], self.width(va), module)
        if all(isinstance(v, (Const, Ids, int, float)) for v in (va, vb)):
            return Const()
        self.fail(node, "this add matches no pattern the IR knows (residual add, rotary embedding)")

    def op_mul(self, node, a, b):
        va, vb = (self.values.get(v) if isinstance(v, fx.Node) else v for v in (a, b))
        if isinstance(va, Scores):
            return self.scores_times(node, va, vb)
        if isinstance(va, CappedLogits):
            return self.logits_times(node, va, vb)
        if isinstance(va, Val) and isinstance(vb, Const) and self.graph.node(va.name).kind == "embed":
            return self._scaled_embedding(node, va)
        if isinstance(va, Val) and isinstance(vb, (int, float)) and reaches_attention(node):  # q/k scaling
            return replace(va, scale=va.scale * vb, origin=f"{module_of(node)}: {node.name}, {source_of(node)}")
        if isinstance(va, Val) and isinstance(vb, Val):  # the gated MLP's product
            x, y = self.val(node, a), self.val(node, b)
            return self.emit("gated", "mul", [x, y], self.width(x), module_of(node))
        if isinstance(va, Val) and isinstance(vb, Const):
            return Rope("cos", va)
        if isinstance(va, Rope) and va.stage == "half" and va.start == 0 and isinstance(vb, Const):
            return replace(va, stage="cos")  # partial rotary: the cos term of the first coordinates
        if isinstance(va, Rope) and va.stage == "rotated" and isinstance(vb, Const):
            return replace(va, stage="sin")
        if all(isinstance(v, (Const, Ids, int, float)) for v in (va, vb)):
            return Const()
        self.fail(node, "this product matches no pattern the IR knows (gated MLP, q scaling, rotary embedding)")

    def _scaled_embedding(self, node, embedding: Val) -> Val:
        """Gemma 2's embedding times √D: the factor the adapter reads off the model, an attribute of the embed op."""
        scale = self.adapter.embed_scale(self.model)
        if scale is None or len(node.args[0].users) != 1:
            self.fail(node, f"the token embedding times a tensor; the {self.adapter.family} adapter knows no "
                            "embedding scale")
        self.graph.node(embedding.name).attrs["scale"] = scale
        return embedding

    # the rotary embedding: x·cos + cat(−x[h:], x[:h])·sin, recognised piece by piece
    def op_slice(self, node, x, dim=0, start=None, stop=None, step=1):
        value = self.values[x]
        if isinstance(value, (Const, Ids)):
            return Const()
        if isinstance(value, Fused):
            return self._sliced_part(node, value, dim, start or 0, stop, step)
        if dim not in (-1, node.args[0].meta["val"].dim() - 1) or step != 1:
            self.fail(node, "a slice of a q/k head must take consecutive coordinates of its last axis")
        end = min(stop, node.args[0].meta["val"].shape[-1])
        if isinstance(value, Val):
            return Rope("half", value, start or 0, end)
        if isinstance(value, Rope) and value.stage == "half" and not value.negated:  # a slice of a slice
            return Rope("half", value.x, value.start + (start or 0), value.start + end)
        self.fail(node, "a slice of something other than a q/k head (rotary embedding)")

    def op_neg(self, node, x):
        value = self.values[x]
        if isinstance(value, Rope) and value.stage == "half":
            return replace(value, negated=True)
        self.fail(node, "a negation outside the rotary embedding's rotate_half")

    def op_cat(self, node, parts, dim=0):
        values = [self.values[p] for p in parts]
        if all(isinstance(v, Const) for v in values):
            return Const()
        if (len(values) == 2 and isinstance(values[0], Val) and isinstance(values[1], Rope)
                and values[1].stage == "half" and values[1].start == values[1].stop
                and values[1].x.name == values[0].name):
            return values[0]  # GPT-NeoX with rotary_pct=1: the unrotated rest of the head is empty
        if (len(values) == 2 and all(isinstance(v, Rope) and v.stage == "half" for v in values)
                and values[0].negated and not values[1].negated and values[0].x == values[1].x
                and values[1].start == 0 and values[0].start == values[1].stop):
            return Rope("rotated", values[0].x, 0, values[0].stop)
        if (len(values) == 2 and all(isinstance(v, Rope) for v in values) and values[0].stage == "rotary_part"
                and values[1].stage == "half" and not values[1].negated and values[0].x == values[1].x
                and values[1].start == values[0].stop and values[1].stop == node.meta["val"].shape[-1]):
            return replace(values[0].x, rotary=values[0].stop)  # partial rotary: the rest of the head joins
        self.fail(node, "a concatenation that is not the rotary embedding's rotate_half or its partial form")

    def _rope(self, node, a: Rope, b: Rope) -> Val | Rope:
        if not (a.stage == "cos" and b.stage == "sin" and a.x == b.x and a.stop in (0, b.stop)):
            self.fail(node, "the sum x·cos + rotate_half(x)·sin of one tensor x was expected (rotary embedding)")
        if a.stop:  # the cos term read a slice: only the first b.stop coordinates are rotated so far
            return Rope("rotary_part", a.x, 0, b.stop)
        return replace(a.x, rotary=b.stop)

    def _output(self, node: fx.Node) -> None:
        result = node.args[0][0] if isinstance(node.args[0], (tuple, list)) else node.args[0]
        logits = self.values.get(result)
        if not isinstance(logits, Val) or self.graph.node(logits.name).kind != "lm_head":
            self.fail(node, "the model's output is not the unembedding's logits")
        self.emit("out", "output", [logits], self.width(logits), "", layer=-1)
