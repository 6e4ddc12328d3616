"""The IR's text form: one line per weight and per op; `parse(dump(g)) == g`.

    graph gpt2-tiny {"family": "gpt2", "d_model": 64, ...}
    weight @transformer.wte.weight : [128, 64]
    %h0.q : [T, 64] = linear(%h0.ln_attn) weight=@transformer.h.0.attn.c_attn.weight.T[0:64] ... layer=0 role="q"

Attribute values are JSON scalars (so floats print exactly and strings are quoted);
weight slots are `slot=@param[.T][start:stop[%period]][[:,start:stop]][#version]` (version n: the weight
after n SGD steps; %period: rows start:stop of every `period` rows; [:,a:b]: columns a:b).
"""

from __future__ import annotations

import json
import re

from ir.errors import IRError

from .graph import Graph, WeightRef
from .ops import OPS


def _shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def dump(graph: Graph) -> str:
    lines = [f"graph {graph.name} {json.dumps(graph.attrs)}"]
    for name, shape in graph.weight_shapes.items():
        lines.append(f"weight @{name} : {_shape(shape)}")
    for node in graph.nodes():
        args = ", ".join("%" + i for i in node.inputs)
        parts = [f"%{node.name} : {_shape(node.shape)} = {node.kind}({args})"]
        for slot in OPS[node.kind].weights if node.kind in OPS else sorted(node.weights):
            if slot in node.weights:
                parts.append(f"{slot}={node.weights[slot]}")
        for key, value in node.attrs.items():
            parts.append(f"{key}={json.dumps(value)}")
        lines.append(" ".join(parts))
    return "\n".join(lines) + "\n"


_GRAPH = re.compile(r"^graph (\S+) (\{.*\})$")
_WEIGHT = re.compile(r"^weight @(\S+) : \[([0-9, ]*)\]$")
_NODE = re.compile(r"^%(\S+) : \[([^\]]*)\] = (\w+)\(([^)]*)\)(.*)$")
_FIELD = re.compile(r'\s+(\w+)=(@\S+|"(?:[^"\\]|\\.)*"|\S+)')
_REF = re.compile(r"^@([^\[\]#]+?)(\.T)?(?:\[(\d+):(\d+)(?:%(\d+))?\])?(?:\[:,(\d+):(\d+)\])?(?:#(\d+))?$")  # names hold no brackets


def _parse_shape(text: str):
    dims = [d.strip() for d in text.split(",") if d.strip()]
    return tuple(d if d == "T" else int(d) for d in dims)


def _parse_ref(text: str) -> WeightRef:
    m = _REF.match(text)
    if not m:
        raise ValueError(f"bad weight reference {text!r}")
    rows = (int(m.group(3)), int(m.group(4))) if m.group(3) else None
    period = int(m.group(5)) if m.group(5) else None
    cols = (int(m.group(6)), int(m.group(7))) if m.group(6) else None
    return WeightRef(m.group(1), bool(m.group(2)), rows, int(m.group(8) or 0), period, cols)


def parse(text: str, source: str = "<ir>") -> Graph:
    """Parse a dump back into a Graph; errors name the source line."""
    graph: Graph | None = None
    problems = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        where = f"{source}:{lineno}"
        try:
            if graph is None:
                m = _GRAPH.match(line)
                if not m:
                    raise ValueError("the first line must be `graph NAME {json attrs}`")
                graph = Graph(m.group(1), json.loads(m.group(2)))
            elif m := _WEIGHT.match(line):
                graph.declare_weight(m.group(1), _parse_shape(m.group(2)))
            elif m := _NODE.match(line):
                name, shape, kind, args, rest = m.groups()
                inputs = [a.strip().removeprefix("%") for a in args.split(",") if a.strip()]
                attrs, weights = {}, {}
                consumed = "".join(f.group(0) for f in _FIELD.finditer(rest))
                if consumed != rest:
                    raise ValueError(f"cannot read fields {rest.strip()!r}")
                for f in _FIELD.finditer(rest):
                    key, value = f.groups()
                    if value.startswith("@"):
                        weights[key] = _parse_ref(value)
                    else:
                        attrs[key] = json.loads(value)
                graph.add(name, kind, inputs, _parse_shape(shape), attrs, weights)
            else:
                raise ValueError("expected `weight @NAME : [dims]` or `%NAME : [shape] = kind(inputs) fields`")
        except (ValueError, json.JSONDecodeError) as err:
            problems.append(f"{where}: {err}")
    if graph is None:
        problems.append(f"{source}: empty IR text")
    if problems:
        raise IRError(problems, headline="cannot parse IR")
    return graph
