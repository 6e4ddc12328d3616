"""The fast path of `trace`: export two decoder layers, repeat the second for the rest.

torch.export costs a few ms per ATen op, so exporting a 12- or 30-layer model takes
seconds, nearly all of it spent on layers that are alike. Here the frontend exports a
*view* of the model holding only its first two decoder layers (the same module objects
and parameters, nothing copied), recognises its ops as usual, and checks that layer 1 is
layer 0 with the index changed; layer 1 also shows what lies between layers (it reads
layer 0's output where layer 0 reads the embeddings). Layer 1 is then repeated for every
further layer under that layer's module and parameter names.

That is sound only if the layers really are alike, so `unlike_layers` compares the
modules of every layer first (types, settings, parameter and buffer shapes, buffers,
hooks, per-instance patches), and a config with several `layer_types` is not repeated.
Whatever is not alike raises NotRepeatable, and `trace` exports the whole model instead.
The check of the IR against the HF logits stays the final proof on either path.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import replace

import torch
import torch.fx.config
from torch import nn
from torch.fx._lazy_graph_module import _use_lazy_graph_module

from ..graph import Graph, Node

PATTERN_LAYERS = 2  # layers exported on the fast path: layer 0, and layer 1 as the pattern
PER_LAYER_INDEX = {"layer_idx"}  # module attributes that differ between alike layers (the cache slot)


class NotRepeatable(Exception):
    """The layers of this model are not alike (the message says where): trace all of them."""


def layer_list(model, path: str) -> nn.ModuleList:
    return model.get_submodule(path)


def unlike_layers(model, path: str) -> None:
    """Raise NotRepeatable naming the first module (path inside the model) that differs
    from its counterpart in layer 0, or a config with several layer types."""
    types = getattr(model.config, "layer_types", None)
    if types is not None and len(set(types)) > 1:
        raise NotRepeatable(f"config.layer_types holds several types: {sorted(set(types))}")
    layers = layer_list(model, path)
    template = _signature(layers[0])
    for index in range(1, len(layers)):
        signature = _signature(layers[index])
        for (inner, a), (_, b) in zip(template, signature):
            if not _same(a, b):
                raise NotRepeatable(f"{path}.{index}{'.' + inner if inner else ''} differs from {path}.0"
                                    f"{'.' + inner if inner else ''}")
        if len(signature) != len(template):
            raise NotRepeatable(f"{path}.{index} has other submodules than {path}.0")


def _signature(layer: nn.Module) -> list[tuple[str, tuple]]:
    """Per submodule: its type, public attributes (but the layer index), parameters'
    shapes and dtypes, buffers, and how many hooks it has."""
    out = []
    for inner, module in layer.named_modules():
        attrs = {k: v for k, v in vars(module).items() if not k.startswith("_") and k not in PER_LAYER_INDEX}
        params = {k: (tuple(p.shape), p.dtype, p.requires_grad) for k, p in module._parameters.items()
                  if p is not None}
        buffers = {k: b for k, b in module._buffers.items() if b is not None}
        hooks = {k: len(v) for k, v in vars(module).items() if k.startswith("_") and "hooks" in k
                 and isinstance(v, dict)}
        out.append((inner, (type(module), attrs, params, buffers, hooks)))
    return out


def _same(a, b) -> bool:
    """Equal as settings: tensors by value, other objects by identity or ==."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an object that cannot be compared is not known to be the same
        return False


@contextlib.contextmanager
def lean_export():
    """torch.export without what only an error message needs: no Python stack trace per
    node (the whole trace, which runs on any error, records them) and no Python code
    generated for graph modules that are never run (only their graphs are read). Both
    cut the export time by about a third."""
    before = torch.fx.config.do_not_emit_stack_traces
    torch.fx.config.do_not_emit_stack_traces = True
    try:
        with _use_lazy_graph_module(True):
            yield
    finally:
        torch.fx.config.do_not_emit_stack_traces = before


def truncated(model, path: str, keep: int) -> nn.Module:
    """A view of `model` whose layer list at `path` holds its first `keep` layers: new
    containers along the path, every other module (and so every parameter) shared."""
    view = _shallow(model)
    parent = view
    *outer, last = path.split(".")
    for part in outer:
        child = _shallow(parent._modules[part])
        parent._modules[part] = child
        parent = child
    parent._modules[last] = nn.ModuleList(list(parent._modules[last])[:keep])
    return view


def _shallow(module: nn.Module) -> nn.Module:
    clone = copy.copy(module)
    clone._modules = dict(module._modules)  # its own child table; the children are shared
    return clone


def repeat_layers(small: Graph, n_layer: int, path: str) -> Graph:
    """The graph of an `n_layer`-layer model from the graph `small` of its first two layers
    (layers at module path `path`), node for node what the full trace gives."""
    prefix, first, pattern, suffix = _parts(small)
    _check_alike(first, pattern, {n.name for n in prefix}, path)
    graph = Graph(small.name, dict(small.attrs))
    for node in prefix + first:
        _add(graph, node, small)
    for layer in range(1, n_layer):
        for node in pattern:
            _add(graph, _moved(node, 1, layer, path), small, node)
    for node in suffix:  # what follows the layers reads the last one
        if any(i.startswith("h0.") for i in node.inputs):
            raise NotRepeatable(f"%{node.name} after the layers reads layer 0")
        inputs = tuple(f"h{n_layer - 1}." + i.removeprefix("h1.") if i.startswith("h1.") else i for i in node.inputs)
        _add(graph, Node(node.name, node.kind, inputs, node.shape, node.attrs, node.weights), small)
    return graph


def _moved(node: Node, src: int, dst: int, path: str) -> Node:
    """`node` of layer `src` as the same op of layer `dst`: its name, module, parameters and
    the inputs it reads from its own and the previous layer shift by dst - src."""
    def name(n: str) -> str:
        for layer in (src, src - 1):
            if n.startswith(f"h{layer}."):
                return f"h{layer + dst - src}." + n.removeprefix(f"h{layer}.")
        return n

    def module(text: str) -> str:
        old = f"{path}.{src}"
        return f"{path}.{dst}{text[len(old):]}" if text == old or text.startswith(old + ".") else text

    attrs = {**node.attrs, "module": module(node.attrs["module"]), "layer": dst}
    weights = {slot: replace(ref, name=module(ref.name)) for slot, ref in node.weights.items()}
    return Node(name(node.name), node.kind, tuple(name(i) for i in node.inputs), node.shape, attrs, weights)


def _add(graph: Graph, node: Node, small: Graph, template: Node | None = None) -> None:
    """Add `node` (moved from `template` of `small`), declaring its weights at first use as
    the recogniser does, so in the same order; a moved weight has its template's shape."""
    for slot, ref in node.weights.items():
        if ref.name not in graph.weight_shapes:
            graph.declare_weight(ref.name, small.weight_shapes[(template or node).weights[slot].name])
    graph.add(node.name, node.kind, node.inputs, node.shape, node.attrs, node.weights)
def _parts(small: Graph) -> tuple[list[Node], list[Node], list[Node], list[Node]]:
    """(before the layers, layer 0, layer 1, after the layers), each contiguous."""
    parts: tuple[list[Node], ...] = ([], [], [], [])
    stage = 0
    for node in small.nodes():
        layer = node.attrs["layer"]
        want = {-1: 0 if stage == 0 else 3, 0: 1, 1: 2}.get(layer)
        if want is None or want < stage:
            raise NotRepeatable(f"%{node.name} (layer {layer}) is out of order: expected the ops before the "
                                "layers, layer 0, layer 1, then the ops after them")
        stage = want
        parts[want].append(node)
    if not parts[1] or not parts[2]:
        raise NotRepeatable("the exported view has no two layers")
    return parts


def _check_alike(first: list[Node], pattern: list[Node], before: set[str], path: str) -> None:
    """Layer 1 must be layer 0 moved by one index: the same ops, attributes and weight
    slots, reading layer 0's output where layer 0 reads one value from before the layers."""
    if len(first) != len(pattern):
        raise NotRepeatable(f"layer 0 has {len(first)} ops, layer 1 {len(pattern)}")
    entry = exit_ = None
    for a, b in zip(first, pattern):
        if len(a.inputs) != len(b.inputs):
            raise NotRepeatable(f"%{b.name} has other inputs than %{a.name}")
        for ia, ib in zip(a.inputs, b.inputs):
            if ib.startswith("h0."):  # b reads layer 0: where a reads from before the layers
                if ia not in before or (entry or ia) != ia or (exit_ or ib) != ib:
                    raise NotRepeatable(f"%{b.name} reads %{ib} where %{a.name} reads %{ia}: layers do not "
                                        "pass one value from one to the next")
                entry, exit_ = ia, ib
            elif ib in before:
                if ia != ib:
                    raise NotRepeatable(f"%{b.name} reads %{ib} where %{a.name} reads %{ia}")
            elif ia != "h0." + ib.removeprefix("h1."):
                raise NotRepeatable(f"%{b.name} reads %{ib} where %{a.name} reads %{ia}")
        moved = _moved(a, 0, 1, path)
        if (moved.name, moved.kind, moved.shape, moved.attrs, moved.weights) != (b.name, b.kind, b.shape, b.attrs,
                                                                                   b.weights):
            raise NotRepeatable(f"%{b.name} is not %{a.name} of the next layer (attributes, weights or shape "
                                "differ)")
    if entry is None:
        raise NotRepeatable("layer 1 does not read layer 0")
