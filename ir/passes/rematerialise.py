"""Rematerialisation: the backward recomputes each layer's forward from the layer's input instead of
reading what the forward pass kept.

Without it, every activation the backward reads (a norm's input, a linear map's input, q and k, an
activation's input) lives from the forward pass to the backward of its layer, so the stream holds all
layers' activations at once at the end of the forward. With it, the forward keeps only what crosses
a layer boundary (each layer's input, the residual stream); right before the first backward or
descent op of a layer that reads one of its forward values, that value is computed again, with the
ops it depends on inside the layer, from the kept input and the same weight versions. The stream then
holds the layers' inputs and one layer's activations at a time: width traded for depth (one more
forward pass, run inside the backward).

A recomputed op is a copy of the forward op named `<op>.remat@<step>`: its phase is the backward
(phase_of). Ops outside the layers (embeddings, the final norm, layer −1) are read as kept.
"""

from __future__ import annotations

from ..graph import Graph, Node
from . import PassResult

REMAT = ".remat"


def aux_op(name: str) -> str:
    """The traced op a training-graph op simulates: its name without the step and a recomputation's suffix
    (the op's prefix block is named for it)."""
    return name.split("@")[0].removesuffix(REMAT)


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


def rematerialise(graph: Graph, enabled: bool) -> PassResult:
    if not enabled or any(REMAT in n.name for n in graph.nodes()):
        return PassResult(graph, False)
    steps = graph.attrs["steps"]
    out = Graph(graph.name, graph.attrs)
    out.weight_shapes = dict(graph.weight_shapes)
    remade: dict[str, str] = {}  # forward op -> its recomputed copy

    def kept(name: str, layer: int) -> bool:
        """Whether a backward op of `layer` reads this value as the forward kept it: not an op of the
        same layer's forward pass."""
        node = graph.node(name)
        return node.attrs.get("layer", -1) != layer or layer < 0 or phase_of(node, steps) != "forward"

    def remake(name: str, layer: int) -> str:
        if kept(name, layer):
            return name
        if name not in remade:
            node = graph.node(name)
            inputs = [remake(i, layer) for i in node.inputs]
            base, step = name.rsplit("@", 1)
            remade[name] = out.add(f"{base}{REMAT}@{step}", node.kind, inputs, node.shape, node.attrs, node.weights)
        return remade[name]

    changed = False
    for node in graph.nodes():
        inputs = list(node.inputs)
        if phase_of(node, steps) in ("backward", "descent"):
            layer = node.attrs.get("layer", -1)
            inputs = [remake(i, layer) for i in inputs]
            changed |= inputs != list(node.inputs)
        out.add(node.name, node.kind, inputs, node.shape, node.attrs, node.weights)
    return PassResult(out if changed else graph, changed)
