"""Attention rows by head groups: the stop-gradient attention backward makes each token's attention
row over the positions (T wide per aux head) and weighs ∂o by it. Made for all H heads at once, the
rows take H·T coordinates of the stream at the backward's widest point; made for `heads` heads at a
time, each group's rows die before the next group's are made, so the stream holds heads·T of them.
Sets `row_heads` on every stop-gradient attention_backward (under the exact rule the score gradient
reads all rows at once, so there is nothing to save; a soft-capped softmax is left whole).
"""

from __future__ import annotations

from ..graph import Graph
from . import PassResult
from .annotate import annotate


def attention_rows(graph: Graph, heads: int | None) -> PassResult:
    """heads=None turns the grouping off: every head's rows at once."""
    def choose(node):
        if heads is None or node.kind != "attention_backward" or node.attrs.get("rule") != "stop_gradient":
            return None
        if "softcap" in node.attrs or heads >= node.attrs["heads"]:
            return None
        return heads

    return annotate(graph, "row_heads", choose)
