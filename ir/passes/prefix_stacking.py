"""Prefix stacking: lay a linear map W [Dout, Din] out over K prefix tokens, S = Dout/K rows each.

Fewer, wider prefix tokens mean a shorter TinT input and more heads per simulated map;
K = Dout (one row per token) is the unstacked layout. Sets `prefixes` on every op that
reads a linear weight.
"""

from __future__ import annotations

from ..graph import Graph
from . import PassResult
from .annotate import annotate_linear_ops


def prefix_stacking(graph: Graph, prefixes: int | None) -> PassResult:
    """prefixes=None turns stacking off: K = Dout for every map."""
    return annotate_linear_ops(graph, "prefixes", "output", prefixes, "tint.prefixes")
