"""Prefix stacking: lay a linear map W [Dout, Din] out over K prefix tokens, S = Dout/K rows each.

Fewer, wider prefix tokens mean a shorter TinT input and more heads per simulated map;
K = Dout (one row per token) is the unstacked layout. Sets `prefixes` on every op that
reads a linear weight.
"""

from __future__ import annotations

from ..graph import Graph
from .annotate import LINEAR_OPS, annotate, linear_widths


def prefix_stacking(graph: Graph, prefixes: int | None) -> object:
    """prefixes=None turns stacking off: K = Dout for every map."""
    def choose(node):
        if node.kind not in LINEAR_OPS:
            return None
        d_out, _ = linear_widths(graph, node)
        k = d_out if prefixes is None else prefixes
        if d_out % k:
            return f"output width {d_out} is not divisible by tint.prefixes={k}; allowed: a K dividing every linear width"
        return k

    return annotate(graph, "prefixes", choose)
