"""Graphviz DOT for an IR graph: one box per op, labelled with kind, shape and weights."""

from __future__ import annotations

from .graph import Graph


def _quote(text: str) -> str:
    return '"' + text.replace('"', '\\"') + '"'


def to_dot(graph: Graph) -> str:
    lines = [f"digraph {_quote(graph.name)} {{", "  node [shape=box, fontname=monospace];"]
    for node in graph.nodes():
        label = [node.name, f"{node.kind} {list(node.shape)}"]
        label += [f"{slot}={ref}" for slot, ref in node.weights.items()]
        dot_label = "\\n".join(label)  # DOT's own line break escape
        lines.append(f"  {_quote(node.name)} [label={_quote(dot_label)}];")
        for src in node.inputs:
            lines.append(f"  {_quote(src)} -> {_quote(node.name)};")
    lines.append("}")
    return "\n".join(lines) + "\n"
