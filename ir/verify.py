"""The IR verifier: every test runs it after every pass. Errors name the node.

Checks: every op kind is known, arity and attributes match its spec, inputs are
defined earlier (so the graph is acyclic), every weight reference resolves to a
declared aux weight with a slice in range, shapes agree with each op's rule, and there
is exactly one output. With `params`, the declared weights must also match them.
"""

from __future__ import annotations

import networkx as nx

from ir.errors import IRError

from .graph import Graph
from .ops import COMMON_ATTRS, OPS


def _type_ok(value, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _check_node(graph: Graph, node, shapes: dict) -> list[str]:
    where = f"node %{node.name} ({node.kind})"
    spec = OPS.get(node.kind)
    if spec is None:
        return [f"{where}: unknown op kind; allowed: {', '.join(OPS)}"]
    problems = []
    if len(node.inputs) != spec.inputs:
        problems.append(f"{where}: takes {spec.inputs} inputs, got {len(node.inputs)}")
    allowed_attrs = {**COMMON_ATTRS, **spec.attrs, **spec.optional_attrs}
    for key, typ in spec.attrs.items():
        if key not in node.attrs:
            problems.append(f"{where}: missing attribute {key!r} ({typ.__name__})")
    for key, value in node.attrs.items():
        if key not in allowed_attrs:
            problems.append(f"{where}: unknown attribute {key!r}; allowed: {', '.join(allowed_attrs)}")
        elif not _type_ok(value, allowed_attrs[key]):
            problems.append(f"{where}: attribute {key}={value!r} is not {allowed_attrs[key].__name__}")
    weight_shapes = {}
    for slot in spec.weights:
        if slot not in node.weights:
            if slot not in spec.optional_weights:
                problems.append(f"{where}: missing weight slot {slot!r}")
            continue
        ref = node.weights[slot]
        declared = graph.weight_shapes.get(ref.name)
        if declared is None:
            problems.append(f"{where}: weight {ref} is not a declared aux weight")
            continue
        if ref.rows is not None:
            full = declared[-1] if ref.transpose else declared[0]
            start, stop = ref.rows
            if not 0 <= start < stop <= full:
                problems.append(f"{where}: rows {start}:{stop} of {ref.name} out of range 0:{full}")
                continue
            if ref.period is not None and not (stop <= ref.period and full % ref.period == 0):
                problems.append(f"{where}: rows {start}:{stop}%{ref.period} of {ref.name}: the period must divide "
                                f"its {full} rows and hold stop")
                continue
        if ref.cols is not None:
            full = declared[0] if ref.transpose else declared[-1]
            if len(declared) != 2 or not 0 <= ref.cols[0] < ref.cols[1] <= full:
                problems.append(f"{where}: columns {ref.cols[0]}:{ref.cols[1]} of {ref.name} out of range 0:{full}")
                continue
        weight_shapes[slot] = ref.shape(declared)
    for slot in node.weights:
        if slot not in spec.weights:
            problems.append(f"{where}: unknown weight slot {slot!r}; allowed: {', '.join(spec.weights)}")
    if problems or any(i not in shapes for i in node.inputs):
        return problems
    in_shapes = [shapes[i] for i in node.inputs]
    try:
        result = spec.infer(in_shapes, node.attrs, weight_shapes)
    except (IndexError, TypeError, ValueError):  # e.g. a rank-0 input: report it, do not crash
        result = f"cannot take inputs of shapes {[list(s) for s in in_shapes]}"
    if isinstance(result, str):
        problems.append(f"{where}: {result}")
    elif tuple(result) != tuple(node.shape):
        problems.append(f"{where}: shape {list(node.shape)} but the op gives {list(result)}")
    return problems


def verify(graph: Graph, params: dict | None = None) -> Graph:
    """Raise IRError listing every problem; return the graph unchanged when it is sound."""
    problems = []
    if not nx.is_directed_acyclic_graph(graph.nx):
        problems.append(f"graph {graph.name}: has a cycle")
    shapes = {}
    for node in graph.nodes():
        for i in node.inputs:
            if i not in shapes:
                problems.append(f"node %{node.name}: input %{i} is not defined before it")
        problems += _check_node(graph, node, shapes)
        shapes[node.name] = tuple(node.shape)
    outputs = [n.name for n in graph.nodes() if n.kind == "output"]
    if len(outputs) != 1:
        problems.append(f"graph {graph.name}: needs exactly one output op, has {len(outputs)}")
    if params is not None:
        for name, shape in graph.weight_shapes.items():
            if name not in params:
                problems.append(f"weight @{name}: not among the model's parameters")
            elif tuple(params[name].shape) != shape:
                problems.append(f"weight @{name}: declared {list(shape)}, model has {list(params[name].shape)}")
    if problems:
        raise IRError(problems, headline=f"graph {graph.name} is not valid")
    return graph
