"""The shared mechanics of the construction passes: set one attribute on chosen ops.

Each construction pass (prefix stacking, head splitting, sub-MLP partition) decides a
width per op of the training graph and records it as an attribute that the backend
obeys; this helper does the copying, the change tracking and the error listing.
"""

from __future__ import annotations

from typing import Callable

from ir.errors import PassError

from ..graph import Graph, Node
from . import PassResult

# Ops that read a linear map's weight, and the (out, in) widths of that map.
LINEAR_OPS = ("linear", "linear_backward", "linear_descent")


def linear_widths(graph: Graph, node: Node) -> tuple[int, int]:
    if "weight" in node.weights:
        ref = node.weights["weight"]
        return ref.shape(graph.weight_shapes[ref.name])
    # a bias-only descent: the widths come from its inputs (x, ∂y)
    x, dy = (graph.node(i).shape for i in node.inputs)
    return dy[-1], x[-1]


def annotate(graph: Graph, attr: str, choose: Callable[[Node], int | None | str]) -> PassResult:
    """Set `attr` to choose(node) on every op where it returns an int; a str is a problem."""
    out = graph.copy()
    changed, problems = False, []
    for node in out.nodes():
        value = choose(node)
        if isinstance(value, str):
            problems.append(f"node %{node.name} ({node.attrs.get('module', '')}): {value}")
        elif value is not None and node.attrs.get(attr) != value:
            node.attrs[attr] = value
            changed = True
    if problems:
        raise PassError(problems)
    return PassResult(out, changed)


def annotate_linear_ops(graph: Graph, attr: str, side: str, value: int | None, knob: str) -> PassResult:
    """Set `attr` on every op that reads a linear weight: `value`, or the map's own width on
    `side` ("output" or "input") when value is None; the value must divide that width."""
    def choose(node):
        if node.kind not in LINEAR_OPS:
            return None
        d_out, d_in = linear_widths(graph, node)
        width = d_out if side == "output" else d_in
        chosen = width if value is None else value
        if width % chosen:
            return (f"{side} width {width} is not divisible by {knob}={chosen}; "
                    f"allowed: a value dividing every linear {side} width")
        return chosen

    return annotate(graph, attr, choose)
