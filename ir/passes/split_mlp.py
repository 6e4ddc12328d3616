"""MLP split: an FFN of inner width F runs as F/w sub-MLPs of width w, one after another, their outputs
summed (the reference construction's MLP sub-partition). Each sub-MLP is an MLP of its own: chunk c
of the input projections (rows cw:(c+1)w of W_in, W_gate, W_up and their biases), its activation and
gated product, and chunk c of the output projection (columns cw:(c+1)w of W_out; the bias once, on
chunk 0). The maths is the FFN's; only the order of the output sum changes. Where the FFN's output is
read only by a residual add, the sub-MLPs' outputs are added to the residual one by one (the add's
name on the last sum): the FFN's partial sum is never held beside the residual.

Why: every simulated map then has w inputs and outputs, so its prefix rows are w wide, and the
TinT holds w-wide activations at a time instead of F-wide ones: the stream narrows (DESIGN §6 has
the reference's D_sim = 4·D at K = 256). Runs on the traced forward graph, before select_train:
the chunks keep their op's role, so they train as their op did.

An FFN is split when F is a multiple of w above it (a w that does not divide F is refused), every op
inside it (the input projections, the activation, the gated product) is read only inside it, and no
input projection selects periodic rows.
"""

from __future__ import annotations

from ir.errors import PassError

from ..graph import Graph, Node, WeightRef
from . import PassResult

OUTPUT_ROLES = ("mlp_out", "mlp_down")
INPUT_ROLES = ("mlp_in", "mlp_gate", "mlp_up")


def split_mlp(graph: Graph, width: int | None) -> PassResult:
    """width=None turns the split off."""
    if width is None:
        return PassResult(graph, False)
    groups = {}  # output projection -> the ops inside its FFN, in graph order
    for node in graph.nodes():
        if node.kind == "linear" and node.attrs.get("role") in OUTPUT_ROLES:
            inside = _ffn(graph, node, width)
            if inside:
                groups[node.name] = inside
    if not groups:
        return PassResult(graph, False)
    member_of = {name: out for out, inside in groups.items() for name in inside}
    position = {n.name: i for i, n in enumerate(graph.nodes())}
    residual_of = {out: _residual_add(graph, graph.node(out), position) for out in groups}  # (add, residual) or None
    absorbed = {found[0].name for found in residual_of.values() if found}
    result = Graph(graph.name, graph.attrs)
    result.weight_shapes = dict(graph.weight_shapes)
    for node in graph.nodes():
        if node.name in member_of or node.name in absorbed:
            continue  # emitted with its FFN, at the output projection
        if node.name in groups:
            _emit_chunks(graph, result, node, groups[node.name], width, residual_of[node.name])
        else:
            result.add(node.name, node.kind, node.inputs, node.shape, node.attrs, node.weights)
    return PassResult(result, True)


def _residual_add(graph: Graph, out: Node, position: dict[str, int]):
    """(the add node, its other input) where the FFN's output is read only by a residual add, else None:
    then each sub-MLP's output is added to the residual in turn, so no partial sum of the FFN is held
    beside the residual (its sum is never needed on its own)."""
    readers = list(graph.nx.successors(out.name))
    if len(readers) != 1 or graph.node(readers[0]).kind != "add":
        return None
    add = graph.node(readers[0])
    others = [i for i in add.inputs if i != out.name]
    if len(others) != 1 or position[others[0]] > position[out.name]:
        return None  # the chunks come where the output projection was: the residual must be there before it
    return add, others[0]


def _ffn(graph: Graph, out: Node, width: int) -> list[str]:
    """The ops between the FFN's input and its output projection `out` (graph order), or [] where
    it is not split."""
    inner = graph.node(out.inputs[0]).shape[-1]
    if inner % width:
        raise PassError(f"tint.passes.split_mlp.width: got {width}, which does not divide the inner width {inner} "
                        f"of the FFN under %{out.name} ({out.attrs.get('module', '?')}); allowed: a divisor of {inner}")
    if inner == width:
        return []
    inside, todo = set(), [out.inputs[0]]
    while todo:
        name = todo.pop()
        node = graph.node(name)
        if name in inside:
            continue
        if node.kind == "linear" and node.attrs.get("role") in INPUT_ROLES:
            if any(ref.period is not None or ref.cols is not None for ref in node.weights.values()):
                return []
        elif node.kind in ("activation", "mul"):
            todo += node.inputs
        else:
            return []  # something else inside the FFN: not a plain (gated) MLP
        if node.shape[-1] != inner:
            return []
        inside.add(name)
    if any(succ not in inside | {out.name} for name in inside for succ in graph.nx.successors(name)):
        return []  # an inner value read outside the FFN
    return [n.name for n in graph.nodes() if n.name in inside]


def _emit_chunks(graph: Graph, result: Graph, out: Node, inside: list[str], width: int, residual) -> None:
    """Sub-MLP c for each chunk, then the sum of their outputs under the output projection's name; with
    `residual` (the add that reads the FFN, and its other input), the outputs are added to the residual
    one by one, the last sum under the add's name."""
    chunks = graph.node(out.inputs[0]).shape[-1] // width
    total = None if residual is None else residual[1]
    last = out if residual is None else residual[0]  # the node whose name and attrs the last sum takes
    attrs = last.attrs if residual else {k: out.attrs[k] for k in ("module", "layer") if k in out.attrs}
    for c in range(chunks):
        rename = {}
        for name in inside:
            node = graph.node(name)
            weights = {slot: _rows(ref, c, width) for slot, ref in node.weights.items()}
            rename[name] = result.add(f"{name}.c{c}", node.kind, [rename.get(i, i) for i in node.inputs],
                                      (*node.shape[:-1], width), node.attrs, weights)
        weights = {"weight": _cols(out.weights["weight"], c, width)}
        if c == 0 and "bias" in out.weights:
            weights["bias"] = out.weights["bias"]
        part = result.add(f"{out.name}.c{c}", "linear", [rename[out.inputs[0]]], out.shape, out.attrs, weights)
        if total is None:
            total = part
            continue
        name = last.name if c == chunks - 1 else f"{out.name}.sum{c}"
        total = result.add(name, "add", [total, part], last.shape, attrs)


def _rows(ref: WeightRef, c: int, width: int) -> WeightRef:
    """Rows cw:(c+1)w of an input projection's weight or bias (of its own row range, if it has one)."""
    start = ref.rows[0] if ref.rows is not None else 0
    return WeightRef(ref.name, ref.transpose, (start + c * width, start + (c + 1) * width), ref.version)


def _cols(ref: WeightRef, c: int, width: int) -> WeightRef:
    return WeightRef(ref.name, ref.transpose, ref.rows, ref.version, ref.period, (c * width, (c + 1) * width))
