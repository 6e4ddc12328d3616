"""The fast path of `trace`: export one decoder layer and a relay, repeat the layer.

torch.export costs a few ms per ATen op, so exporting a 12- or 30-layer model takes
seconds, nearly all of it spent on layers that are alike. Here the frontend exports a
*view* of the model (the same module objects and parameters, nothing copied) whose layer
list holds layer 0 and, in place of layer 1, a relay that hands back the stream it is
given through one `clone`. The trace of the view shows the per-layer pattern (layer 0's
ops) and what lies between layers: nothing may run between layer 0's last op and the
relay, and the relay must get an output of layer 0, which is then what every layer passes
to the next. Layer 0 is repeated for every further layer under that layer's module and
parameter names.

That is sound only if the layers really are alike, so `unlike_layers` compares the
modules of every layer first (types, settings, parameter and buffer shapes, buffers,
hooks, per-instance patches), and a config with several `layer_types` is not repeated unless
the adapter reads what differs per layer (`per_layer_attrs`: Gemma 2's alternate sliding
windows, which each repeated attention op then takes from the adapter's attention_extras).
Whatever is not alike or not as expected raises NotRepeatable, and `trace` exports the
whole model instead. Forward code that branches on the layer index is invisible to both
checks: the check of the IR against the HF logits, the final proof on either path, is
what catches it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import replace

import torch
import torch.fx.config
from torch import fx, nn
from torch.fx._lazy_graph_module import _use_lazy_graph_module

from ..graph import Graph, Node
from .values import BOOKKEEPING, LAYOUT, Val, module_of, op_name

MIN_LAYERS = 3  # with two layers the fast path would save one layer's export: not worth a second path
PER_LAYER_INDEX = {"layer_idx"}  # module attributes that differ between alike layers (the cache slot)


class NotRepeatable(Exception):
    """The layers of this model are not alike (the message says where): trace all of them."""


def layer_list(model, path: str) -> nn.ModuleList:
    return model.get_submodule(path)


def unlike_layers(model, path: str, per_layer: tuple[str, ...] = ()) -> None:
    """Raise NotRepeatable naming the first module (path inside the model) that differs
    from its counterpart in layer 0 (but in the attributes `per_layer`, which the adapter reads
    per layer), or a config with several layer types (unless the adapter reads them per layer)."""
    types = getattr(model.config, "layer_types", None)
    if types is not None and len(set(types)) > 1 and not per_layer:
        raise NotRepeatable(f"config.layer_types holds several types: {sorted(set(types))}")
    layers = layer_list(model, path)
    template = _signature(layers[0], per_layer)
    for index in range(1, len(layers)):
        signature = _signature(layers[index], per_layer)
        for (inner, a), (_, b) in zip(template, signature):
            if not _same(a, b):
                raise NotRepeatable(f"{path}.{index}{'.' + inner if inner else ''} differs from {path}.0"
                                    f"{'.' + inner if inner else ''}")
        if len(signature) != len(template):
            raise NotRepeatable(f"{path}.{index} has other submodules than {path}.0")


def _signature(layer: nn.Module, per_layer: tuple[str, ...] = ()) -> list[tuple[str, tuple]]:
    """Per submodule: its type, public attributes (but the layer index and `per_layer`), parameters'
    shapes and dtypes, buffers, and how many hooks it has."""
    out = []
    ignored = PER_LAYER_INDEX | set(per_layer)
    for inner, module in layer.named_modules():
        attrs = {k: v for k, v in vars(module).items() if not k.startswith("_") and k not in ignored}
        params = {k: (tuple(p.shape), p.dtype, p.requires_grad) for k, p in module._parameters.items()
                  if p is not None}
        buffers = {k: b for k, b in module._buffers.items() if b is not None}
        hooks = {k: len(v) for k, v in vars(module).items() if k.startswith("_") and "hooks" in k
                 and isinstance(v, dict)}
        out.append((inner, (type(module), attrs, params, buffers, hooks)))
    return out


def _same(a, b) -> bool:
    """Equal as settings: tensors by value, other objects by identity or ==. Meta tensors (a model
    built from its config alone) have no values: their shape and dtype are compared."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and (a.is_meta and b.is_meta or torch.equal(a, b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, functools.partial) and isinstance(b, functools.partial):  # Gemma 2's act_fn: gelu, tanh
        return a.func is b.func and _same(a.args, b.args) and _same(a.keywords, b.keywords)
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


class Relay(nn.Module):
    """Stands in for layer 1 in the exported view: hands back the stream it is given, as the
    layers return it (alone, or first of a tuple where the model takes the layer's output [0]).
    Its one op, a clone (a view for the recogniser), marks where the model calls layer 1."""

    def __init__(self, returns_tuple: bool = False):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states.clone(), None) if self.returns_tuple else hidden_states.clone()


def relayed(model, path: str, returns_tuple: bool = False) -> nn.Module:
    """A view of `model` whose layer list at `path` is [layer 0, a Relay]: new containers
    along the path, every other module (and so every parameter) shared. `returns_tuple`: the
    adapter's layer_returns_tuple."""
    view = _shallow(model)
    parent = view
    *outer, last = path.split(".")
    for part in outer:
        child = _shallow(parent._modules[part])
        parent._modules[part] = child
        parent = child
    parent._modules[last] = nn.ModuleList([parent._modules[last][0], Relay(returns_tuple)])
    return view


def relay_input(program: torch.export.ExportedProgram, values: dict, path: str) -> str:
    """The IR node the model passes from layer 0 to layer 1 (`values`: the recogniser's
    value of each fx node). Only views may run between layer 0's last op and the relay."""
    nodes = list(program.graph.nodes)
    relay = [i for i, n in enumerate(nodes) if module_of(n) == f"{path}.1"]
    layer0 = [i for i, n in enumerate(nodes) if module_of(n) == f"{path}.0" or module_of(n).startswith(f"{path}.0.")]
    if len(relay) != 1 or not layer0 or max(layer0) > relay[0]:
        raise NotRepeatable(f"the relay at {path}.1 was not called once after layer 0")
    between = [n for n in nodes[max(layer0) + 1 : relay[0]] if op_name(n) not in LAYOUT | BOOKKEEPING]
    if between:
        raise NotRepeatable(f"the model computes aten.{op_name(between[0])} ({between[0].name}) between two layers")
    given = values.get(nodes[relay[0]].args[0]) if isinstance(nodes[relay[0]].args[0], fx.Node) else None
    if not (isinstance(given, Val) and given.name.startswith("h0.") and given.scale == 1.0 and not given.rotary):
        raise NotRepeatable(f"layer 1 is not given an output of layer 0 (got {given})")
    return given.name


def _shallow(module: nn.Module) -> nn.Module:
    clone = copy.copy(module)
    clone._modules = dict(module._modules)  # its own child table; the children are shared
    return clone


def repeat_layers(small: Graph, n_layer: int, path: str, exit_: str, extras=None) -> Graph:
    """The graph of an `n_layer`-layer model from the graph `small` of its view (layers at
    module path `path`; layer 0 hands `exit_` to the next layer), node for node what the
    whole trace gives. extras(index): the attention attributes of layer `index` (the adapter's
    attention_extras), in place of layer 0's."""
    prefix, layer, suffix = _parts(small)
    before = {n.name for n in prefix}
    entry = {i for n in layer for i in n.inputs if i in before}
    if len(entry) != 1:
        raise NotRepeatable(f"layer 0 reads {sorted(entry)} from before the layers; allowed: one value, the stream")
    entry = entry.pop()
    graph = Graph(small.name, dict(small.attrs))
    for node in prefix + layer:
        _add(graph, node, small)
    for index in range(1, n_layer):
        inputs = {n.name: _at(index, n.name) for n in layer} | {entry: _at(index - 1, exit_)}
        for node in layer:
            moved = _moved(node, index, path, inputs)
            if extras is not None and node.kind == "attention":
                moved = _with_extras(moved, extras(0), extras(index))
            _add(graph, moved, small, node)
    for node in suffix:  # what follows the layers reads the last one's output
        inner = [i for i in node.inputs if i.startswith("h0.") and i != exit_]
        if inner:
            raise NotRepeatable(f"%{node.name} after the layers reads layer 0's {inner}, not its output %{exit_}")
        inputs = tuple(_at(n_layer - 1, i) if i == exit_ else i for i in node.inputs)
        _add(graph, Node(node.name, node.kind, inputs, node.shape, node.attrs, node.weights), small)
    return graph


def _at(index: int, name: str) -> str:
    """The name of layer 0's node `name` in layer `index`."""
    return f"h{index}." + name.removeprefix("h0.")


def _moved(node: Node, index: int, path: str, inputs: dict[str, str]) -> Node:
    """`node` of layer 0 as the same op of layer `index`: its name, module and parameters
    move to that layer, its inputs are renamed by `inputs`."""
    def module(text: str) -> str:
        old = f"{path}.0"
        return f"{path}.{index}{text[len(old):]}" if text == old or text.startswith(old + ".") else text

    attrs = {**node.attrs, "module": module(node.attrs["module"]), "layer": index}
    weights = {slot: replace(ref, name=module(ref.name)) for slot, ref in node.weights.items()}
    return Node(inputs[node.name], node.kind, tuple(inputs.get(i, i) for i in node.inputs), node.shape, attrs, weights)


def _with_extras(node: Node, first: dict, own: dict) -> Node:
    """`node` with layer 0's attention extras `first` replaced by its layer's `own`, where the recogniser
    puts them (after the other attributes, before module and layer)."""
    if any(node.attrs.get(k) != v for k, v in first.items()):
        raise NotRepeatable(f"%{node.name}: layer 0's attention attributes are not the adapter's {first}")
    meta = ("module", "layer")
    attrs = {k: v for k, v in node.attrs.items() if k not in first and k not in meta} | own
    return replace(node, attrs=attrs | {k: node.attrs[k] for k in meta})


def _add(graph: Graph, node: Node, small: Graph, template: Node | None = None) -> None:
    """Add `node` (moved from `template` of `small`), declaring its weights at first use as
    the recogniser does, so in the same order; a moved weight has its template's shape."""
    for slot, ref in node.weights.items():
        if ref.name not in graph.weight_shapes:
            graph.declare_weight(ref.name, small.weight_shapes[(template or node).weights[slot].name])
    graph.add(node.name, node.kind, node.inputs, node.shape, node.attrs, node.weights)
def _parts(small: Graph) -> tuple[list[Node], list[Node], list[Node]]:
    """(before the layers, layer 0, after the layers), each contiguous."""
    parts: tuple[list[Node], ...] = ([], [], [])
    stage = 0
    for node in small.nodes():
        layer = node.attrs["layer"]
        want = {-1: 0 if stage == 0 else 2, 0: 1}.get(layer)
        if want is None or want < stage:
            raise NotRepeatable(f"%{node.name} (layer {layer}) is out of order: expected the ops before the "
                                "layers, layer 0, then the ops after them")
        stage = want
        parts[want].append(node)
    if not parts[1]:
        raise NotRepeatable("the exported view has no layer 0")
    return parts
