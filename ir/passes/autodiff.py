"""Autodiff: the traced forward graph -> the training graph of N SGD steps and the evaluation.

For each step n the forward ops are re-emitted reading the weights' version n (a
forward op that reads nothing new reuses its earlier value), then `loss_grad` gives
∂ at the final norm's output, the backward ops run in reverse order, and a descent op
per trained op, right after the op's backward (the last reader of version n), writes
version n+1 of its trained weights. Finally the forward runs
once more on the last version: its logits are the graph's output.

Only ops upstream of which some weight trains receive a gradient; with the
stop-gradient attention rule only v does (q and k get none); with the exact rule q and k
get theirs through the scores (attention_score_backward).
"""

from __future__ import annotations

import re

import networkx as nx

from ir.errors import PassError

from ..graph import Graph, Node
from . import PassResult

FORWARD_KINDS = {"input", "embed", "pos_embed", "add", "layer_norm", "rms_norm", "linear", "activation", "mul",
                 "attention", "lm_head", "output"}


def autodiff(graph: Graph, steps: int, lr: float, attention: str = "stop_gradient",
             layer_norm: str = "finite_difference", activation: str = "finite_difference",
             scale: float = 1000.0) -> PassResult:
    if any(n.kind not in FORWARD_KINDS for n in graph.nodes()):
        return PassResult(graph, False)  # already a training graph: a second run changes nothing
    missing = [f"node %{n.name} ({n.attrs.get('module', '')}): {_unsupported(graph, n)} has no TinT construction "
               "yet; allowed: the ops of GPT-2, OPT, LLaMA and GPT-NeoX" for n in graph.nodes() if _unsupported(graph, n)]
    if missing:
        raise PassError(missing)
    rules = {"attention": attention, "layer_norm": layer_norm, "activation": activation, "scale": float(scale)}
    out = Graph(graph.name, {**graph.attrs, "steps": steps, "lr": lr})
    out.weight_shapes = dict(graph.weight_shapes)
    builder = _Builder(graph, out, lr, rules)
    for step in range(steps):
        builder.forward(step)
        builder.backward(step)
    builder.forward(steps, evaluate=True)
    return PassResult(out, True)


REMAT = ".remat"  # a forward op recomputed in the backward (passes/rematerialise.py): <op>.remat<n>@<step>


def aux_op(name: str) -> str:
    """The traced op a training-graph op simulates: its name without the step and a recomputation's suffix
    (the op's prefix block is named for it)."""
    return re.sub(rf"{re.escape(REMAT)}\d*$", "", name.split("@")[0])


def phase_of(node: Node, steps: int) -> str:
    """forward | backward | descent | eval of a training-graph op, from its kind and name: a gradient's
    sums and products are named `.grad…`, a recomputed forward op `.remat`; the evaluation is the
    forward of step `steps`. Ops with no step (the inputs and masks) belong to the first forward."""
    if node.kind.endswith("_descent"):
        return "descent"
    if node.kind.endswith("_backward") or node.kind == "loss_grad" or ".grad" in node.name or REMAT in node.name:
        return "backward"
    if "@" not in node.name:
        return "forward"
    return "eval" if int(node.name.rsplit("@", 1)[1]) == steps else "forward"


def rules_of(graph: Graph) -> dict[str, str]:
    """The backward rules a training graph was built with, read off its backward ops (a rule whose op the
    graph has none of is left out)."""
    seen = {}
    for node in graph.nodes():
        if "rule" in node.attrs:
            kind = node.kind.removesuffix("_backward")  # attention, activation, layer_norm, rms_norm
            seen[kind if kind in ("attention", "activation") else "layer_norm"] = node.attrs["rule"]
    return {k: seen[k] for k in ("attention", "layer_norm", "activation") if k in seen}


def _unsupported(graph: Graph, node: Node) -> str | None:
    if node.kind == "attention" and "window" in node.attrs:
        return "attention with a window"
    return None


class _Builder:
    def __init__(self, src: Graph, out: Graph, lr: float, rules: dict):
        self.src, self.out, self.lr, self.rules = src, out, lr, rules
        self.version: dict[tuple, int] = {}  # trained weight -> its current version
        self.value: dict[str, str] = {}  # source node -> its value in the step being built
        self.memo: dict[tuple, str] = {}  # (kind, inputs, weights) -> node: reuse unchanged values
        trained = {n.name for n in src.nodes() if n.attrs.get("train")}
        # the ops whose output carries gradient: those with a trained op at or above them
        self.carries_grad = {n for n in src.nx if trained & (nx.ancestors(src.nx, n) | {n})}
        self.ids = out.add("ids", "input", (), ("T",), {"module": "", "layer": -1})
        self.train_mask = out.add("train_mask", "mask", (), ("T",), {"which": "train", "module": "", "layer": -1})
        self.label_mask = out.add("label_mask", "mask", (), ("T",), {"which": "label", "module": "", "layer": -1})

    def _current(self, ref):
        return ref.at(self.version.get(ref.key, 0))

    def forward(self, step: int, evaluate: bool = False) -> None:
        for node in self.src.nodes():
            if node.kind == "input":
                self.value[node.name] = self.ids
                continue
            if node.kind in ("lm_head", "output") and not evaluate:
                continue  # the training steps need only ∂ at the final norm (loss_grad)
            inputs = tuple(self.value[i] for i in node.inputs)
            weights = {slot: self._current(ref) for slot, ref in node.weights.items()}
            key = (node.kind, node.name, inputs, tuple(sorted(weights.items())))
            if key not in self.memo:
                attrs = {k: v for k, v in node.attrs.items() if k != "train"}
                self.memo[key] = self.out.add(f"{node.name}@{step}", node.kind, inputs, node.shape, attrs, weights)
            self.value[node.name] = self.memo[key]

    def backward(self, step: int) -> None:
        grads: dict[str, str] = {}  # source node -> the sum of its gradient contributions so far
        counts: dict[str, int] = {}  # source node -> how many contributions that sum holds
        head = next(n for n in self.src.nodes() if n.kind == "lm_head")
        final = head.inputs[0]
        grads[final] = self._add(f"{final}.grad_loss@{step}", "loss_grad",
                                 [self.value[final], self.ids, self.train_mask, self.label_mask],
                                 self.src.node(final).shape, head, {"weight": head.weights["weight"]},
                                 **{k: head.attrs[k] for k in ("softcap",) if k in head.attrs})
        updates = []
        for node in reversed(self.src.nodes()):
            if node.name not in grads:
                continue
            dy = grads[node.name]
            contributions = self._backward_op(node, dy, step)
            updates += self._descend(node, dy, step)  # after the backward: it reads the old weights
            for target, contribution in contributions:
                if target not in self.carries_grad:
                    continue
                # summed as each contribution arrives, so that none waits in the stream for the others
                n = counts[target] = counts.get(target, 0) + 1
                grads[target] = contribution if n == 1 else self._add(
                    f"{target}.grad{n - 1}@{step}", "add", [grads[target], contribution],
                    self.src.node(target).shape, self.src.node(target))
        for refs in updates:  # versions change only after the whole backward pass of the step
            for ref in refs:
                self.version[ref.key] = step + 1

    # -- helpers ------------------------------------------------------------------------
    def _add(self, name, kind, inputs, shape, like: Node, weights=None, **attrs) -> str:
        meta = {k: like.attrs[k] for k in ("module", "layer", "role") if k in like.attrs}
        return self.out.add(name, kind, inputs, shape, {**attrs, **meta}, weights or {})

    def _descend(self, node: Node, dy: str, step: int) -> list:
        slots = [s for s in node.attrs.get("train", "").split(",") if s]
        if not slots:
            return []
        weights = {s: self._current(node.weights[s]) for s in slots}
        x = self.value[node.inputs[0]]
        if node.kind == "linear":
            self._add(f"{node.name}.descent@{step}", "linear_descent", [x, dy], (), node, weights, lr=self.lr)
        elif node.kind in ("layer_norm", "rms_norm"):
            self._add(f"{node.name}.descent@{step}", f"{node.kind}_descent", [x, dy], (), node, weights,
                      eps=node.attrs["eps"], lr=self.lr, **_heads(node))
        else:
            raise PassError(f"node %{node.name}: {node.kind} ops have no trainable weights")
        return [list(weights.values())]

    def _backward_op(self, node: Node, dy: str, step: int) -> list[tuple[str, str]]:
        """(source node, gradient contribution) pairs for the inputs of `node`."""
        name = f"{node.name}.bwd@{step}"
        if node.kind == "add":
            return [(node.inputs[0], dy), (node.inputs[1], dy)]
        x = node.inputs[0]
        if node.kind == "linear":
            if x not in self.carries_grad:
                return []
            return [(x, self._add(name, "linear_backward", [dy], self.src.node(x).shape, node,
                                  {"weight": self._current(node.weights["weight"])}))]
        if node.kind in ("layer_norm", "rms_norm"):
            if x not in self.carries_grad:
                return []
            return [(x, self._add(name, f"{node.kind}_backward", [self.value[x], dy], node.shape, node,
                                  {"gain": self._current(node.weights["gain"])}, eps=node.attrs["eps"],
                                  rule=self.rules["layer_norm"], scale=self.rules["scale"], **_heads(node),
                                  **{k: node.attrs[k] for k in ("gain_offset",) if k in node.attrs}))]
        if node.kind == "activation":
            return [(x, self._add(name, "activation_backward", [self.value[x], dy], node.shape, node,
                                  fn=node.attrs["fn"], rule=self.rules["activation"], scale=self.rules["scale"]))]
        if node.kind == "mul":  # the product rule: ∂a = ∂y⊙b, ∂b = ∂y⊙a
            a, b = node.inputs
            return [(x, self._add(f"{node.name}.grad_mul{i}@{step}", "mul", [dy, self.value[other]], node.shape, node))
                    for i, (x, other) in enumerate(((a, b), (b, a))) if x in self.carries_grad]
        if node.kind == "attention":
            q, k, v = node.inputs
            a = node.attrs
            rope = {key: a[key] for key in ("kv_heads", "positions", "rope_theta", "rotary_dim", "softcap") if key in a}
            out = [(v, self._add(name, "attention_backward", [self.value[q], self.value[k], dy],
                                 self.src.node(v).shape, node, heads=a["heads"], head_dim=a["head_dim"],
                                 causal=a["causal"], scale=a["scale"], rule=self.rules["attention"], **rope))]
            if self.rules["attention"] == "exact":  # through the scores too: q and k learn
                qkv = [self.value[i] for i in (q, k, v)]
                out += [(x, self._add(f"{node.name}.bwd_{wrt}@{step}", "attention_score_backward", qkv + [dy],
                                      self.src.node(x).shape, node, heads=a["heads"], head_dim=a["head_dim"],
                                      causal=a["causal"], scale=a["scale"], wrt=wrt, **rope))
                        for x, wrt in ((q, "q"), (k, "k")) if x in self.carries_grad]
            return out
        return []  # embeddings: nothing below them trains


def _heads(node: Node) -> dict:
    """A norm of each head (Qwen3's q/k norm): its backward and descent work per head too."""
    return {"heads": node.attrs["heads"]} if "heads" in node.attrs else {}
