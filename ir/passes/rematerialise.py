"""Rematerialisation: the backward recomputes each layer's forward from the layer's input instead of
reading what the forward pass kept.

Without it, every activation the backward reads (a norm's input, a linear map's input, q and k, an
activation's input) lives from the forward pass to the backward of its layer, so the stream holds all
layers' activations at once at the end of the forward. With it, the forward keeps only what crosses
a layer boundary (each layer's input, the residual stream); right before the first backward or
descent op of a layer that reads one of its forward values, that value is computed again, with the
ops it depends on inside the layer, from the kept input and the same weight versions. The stream then
holds the layers' inputs and one sublayer's activations at a time: width traded for depth (one more
forward pass and the attention's ops once more, run inside the backward).

A copy serves one sublayer: where the backward sums the gradient of a residual sum it leaves the FFN for
the attention below, and what the FFN's backward recomputed of the attention (to reach the FFN's input)
is made again there rather than kept through the FFN's backward. A recomputed op is a copy of the forward
op named `<op>.remat@<step>` (a second copy `<op>.remat2@<step>`); its phase is the backward (phase_of).
Ops outside the layers (embeddings, the final norm, layer −1) are read as kept.
"""

from __future__ import annotations

from collections import Counter

from ..graph import Graph, Node
from . import PassResult
from .autodiff import REMAT, phase_of


def rematerialise(graph: Graph, enabled: bool) -> PassResult:
    if not enabled or any(REMAT in n.name for n in graph.nodes()):
        return PassResult(graph, False)
    steps = graph.attrs["steps"]
    out = Graph(graph.name, graph.attrs)
    out.weight_shapes = dict(graph.weight_shapes)
    remade: dict[str, str] = {}  # forward op -> its recomputed copy for the sublayer the backward is in
    copies: Counter = Counter()  # forward op -> how many copies made

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
            copies[name] += 1  # a value recomputed for two sublayers: <op>.remat@<step>, <op>.remat2@<step>
            suffix = REMAT if copies[name] == 1 else f"{REMAT}{copies[name]}"
            remade[name] = out.add(f"{base}{suffix}@{step}", node.kind, inputs, node.shape, node.attrs, node.weights)
        return remade[name]

    changed = False
    for node in graph.nodes():
        if crosses_a_residual(graph, node):
            remade.clear()  # what the sublayer above needed dies there: the one below recomputes its own
        inputs = list(node.inputs)
        if phase_of(node, steps) in ("backward", "descent"):
            layer = node.attrs.get("layer", -1)
            inputs = [remake(i, layer) for i in inputs]
            changed |= inputs != list(node.inputs)
        out.add(node.name, node.kind, inputs, node.shape, node.attrs, node.weights)
    return PassResult(out if changed else graph, changed)


def crosses_a_residual(graph: Graph, node: Node) -> bool:
    """Whether `node` sums the gradient of a residual sum (autodiff's `<op>.grad<n>@<step>` of an add): the
    backward leaves one sublayer (an FFN) for the one below it (attention)."""
    if node.kind != "add" or ".grad" not in node.name:
        return False
    target = f"{node.name.split('.grad')[0]}@{node.name.rsplit('@', 1)[1]}"
    return target in graph and graph.node(target).kind == "add"
