"""Sub-MLP partition: elementwise work on a wide value runs as chunks of width g through one
shared module (the FFN's F-wide activations become F/g chunks). Sets `group_width` on
every elementwise op whose width g divides; other ops stay one chunk."""

from __future__ import annotations

from ..graph import Graph
from . import PassResult
from .annotate import annotate

ELEMENTWISE_OPS = ("add", "layer_norm", "activation", "activation_backward", "layer_norm_backward",
                   "layer_norm_descent", "linear_descent", "loss_grad")  # a linear descent: its product with η


def sub_mlp(graph: Graph, width: int | None) -> PassResult:
    """width=None turns the partition off: one chunk per value."""
    def choose(node):
        if node.kind not in ELEMENTWISE_OPS:
            return None
        full = graph.node(node.inputs[0]).shape[-1]
        return full if width is None or full % width else width

    return annotate(graph, "group_width", choose)
