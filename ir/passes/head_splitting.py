"""Head splitting: each head of a simulated linear map reads a chunk of c input coordinates.

The heads of one map share their projections, so a narrower chunk means smaller stored
matrices and more heads; their partial dot products add up in the output. c = Din is
the unsplit construction. Sets `head_width` on every op that reads a linear weight.
"""

from __future__ import annotations

from ..graph import Graph
from . import PassResult
from .annotate import annotate_linear_ops


def head_splitting(graph: Graph, width: int | None) -> PassResult:
    """width=None turns splitting off: every head reads the whole input."""
    return annotate_linear_ops(graph, "head_width", "input", width, "tint.passes.head_splitting.width")
