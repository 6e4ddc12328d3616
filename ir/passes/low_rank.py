"""Low rank: the backend stores each TinT projection as two factors where that is exact and
smaller (backends/torch/low_rank.py), and reports the others with the error a rank-r
truncation would make. Sets the graph attribute `low_rank` (the rank r, or None: off)."""

from __future__ import annotations

from ..graph import Graph
from . import PassResult


def low_rank(graph: Graph, rank: int | None) -> PassResult:
    if graph.attrs.get("low_rank") == rank:
        return PassResult(graph, False)
    out = graph.copy()
    out.attrs["low_rank"] = rank
    return PassResult(out, True)
