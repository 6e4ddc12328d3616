"""Head splitting: each head of a simulated linear map reads a chunk of c input coordinates.

The heads of one map share their projections, so a narrower chunk means smaller stored
matrices and more heads; their partial dot products add up in the output. c = Din is
the unsplit construction. Sets `head_width` on every op that reads a linear weight.
"""

from __future__ import annotations

from ..graph import Graph
from .annotate import LINEAR_OPS, annotate, linear_widths


def head_splitting(graph: Graph, width: int | None) -> object:
    """width=None turns splitting off: every head reads the whole input."""
    def choose(node):
        if node.kind not in LINEAR_OPS:
            return None
        _, d_in = linear_widths(graph, node)
        c = d_in if width is None else width
        if d_in % c:
            return (f"input width {d_in} is not divisible by tint.passes.head_splitting.width={c}; "
                    "allowed: a width dividing every linear input width")
        return c

    return annotate(graph, "head_width", choose)
