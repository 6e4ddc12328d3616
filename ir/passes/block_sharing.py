"""Block sharing: simulator blocks do not depend on the aux weights, so every TinT layer
whose construction is the same (same primitive, shapes and settings) can use one set of
weights, across aux layers and SGD steps: a looped TinT. Sets the graph attribute
`share_blocks`; reports give both the unique and the unrolled parameter counts."""

from __future__ import annotations

from ..graph import Graph
from . import PassResult


def block_sharing(graph: Graph, enabled: bool) -> PassResult:
    if graph.attrs.get("share_blocks") == enabled:
        return PassResult(graph, False)
    out = graph.copy()
    out.attrs["share_blocks"] = enabled
    return PassResult(out, True)
