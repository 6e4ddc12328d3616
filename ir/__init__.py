"""The tintc graph IR: a closed set of typed ops over an auxiliary model's weights.

ops.py lists every op kind; graph.py holds the graph; text.py prints and parses it;
verify.py checks it; interpret.py runs it; frontend/ builds it from a HF model;
passes/ rewrite it.
"""

from .graph import Graph, Node, WeightRef
from .ops import OPS

__all__ = ["Graph", "Node", "WeightRef", "OPS"]
