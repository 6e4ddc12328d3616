"""Frontend: a Hugging Face causal LM -> IR graph: `torch.export`, then recognition.

`trace` exports the model (`use_cache=False`, the default attention), recognises IR
ops in the exported ATen graph (recognize.py), verifies the graph and checks it
numerically: the IR interpreter must reproduce the HF logits. A model of three or more
alike layers is exported as layer 0 and a relay, layer 0 repeated (repeat.py); `trace_from_config`
does the same from the model's config alone: a shallow random model of MIN_LAYERS layers is
exported and checked, and its layer repeated to the config's depth (no aux-sized tensor). An
adapter per family (one small file each, registered in ADAPTERS) adds what the graph
cannot give: module roles, config settings, and the settings it refuses.
"""

from __future__ import annotations

import copy
import os

import torch

from ir.errors import FrontendError

from ..graph import Graph
from ..interpret import Interpreter
from ..verify import verify
from .adapter import Adapter
from .bloom import BloomAdapter
from .gemma2 import Gemma2Adapter
from .gpt2 import GPT2Adapter
from .gpt_neox import GPTNeoXAdapter
from .llama import LlamaAdapter
from .mistral import MistralAdapter
from .olmo2 import Olmo2Adapter
from .opt import OPTAdapter
from .phi3 import Phi3Adapter
from .qwen2 import Qwen2Adapter
from .qwen3 import Qwen3Adapter
from . import repeat
from .recognize import Recognizer

ADAPTERS: dict[str, Adapter] = {
    a.family: a for a in (GPT2Adapter(), OPTAdapter(), LlamaAdapter(), Qwen2Adapter(), MistralAdapter(),
                          GPTNeoXAdapter(), Phi3Adapter(), Olmo2Adapter(),
                          Qwen3Adapter(),
                          BloomAdapter(),
                          Gemma2Adapter())}
EXPORT_LENGTH = 8  # tokens in the example input of the export (graphs are shape-specialised)


def adapter_for(family: str) -> Adapter:
    if family not in ADAPTERS:
        raise FrontendError(
            f"model family {family!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[family]


def build_model(family: str, config_kwargs: dict, seed: int = 0, dtype=torch.float32):
    """A randomly initialised HF model of `family` built from config kwargs (no download)."""
    return random_model(family, config_of(family, config_kwargs), seed, dtype)


def config_of(family: str, config_kwargs: dict | None = None, path=None):
    """The HF config of `family`: from kwargs, or the config.json of a local `save_pretrained` directory."""
    adapter = adapter_for(family)
    if path is None:
        return adapter.config_class(**(config_kwargs or {}))
    try:
        return adapter.config_class.from_pretrained(path, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - a bad config.json fails anywhere in transformers
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FrontendError(f"model.path {str(path)!r}: cannot read its config.json ({reason}); allowed: a "
                            "directory written by save_pretrained") from None


def meta_model(family: str, config, dtype=torch.float32):
    """The model of `config` on the meta device: its modules, settings and parameter shapes, no storage."""
    with torch.device("meta"):
        return adapter_for(family).model_class(config).to(dtype).eval()


def random_model(family: str, config, seed: int = 0, dtype=torch.float32, layers: int | None = None,
                 as_loaded: bool = False):
    """The model of `config`, randomly initialised; with `layers`, only the first that many decoder layers
    (`layer_types` cut to match), the rest of the config unchanged. `as_loaded`: built in `dtype` as
    from_pretrained builds it, so that constants computed at init (Gemma 2's √D buffer) are the ones a
    model loaded from a folder has, not float32 values cast up."""
    if layers is not None:
        config = copy.deepcopy(config)
        config.num_hidden_layers = layers  # every family's config maps this name to its own
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:layers]
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    if as_loaded:
        torch.set_default_dtype(dtype)
    try:
        return adapter_for(family).model_class(config).to(dtype).eval()
    finally:
        torch.set_default_dtype(previous)


def load_model(family: str, path: str | os.PathLike, dtype=torch.float32):
    """An HF model saved with `save_pretrained` in a local directory (never the hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    adapter = adapter_for(family)
    if not os.path.isdir(path):
        raise FrontendError(f"model.path {str(path)!r} is not a local directory (the hub is never used)")
    try:
        model = adapter.model_class.from_pretrained(path, dtype=dtype, local_files_only=True)
    except Exception as err:  # a corrupt directory fails anywhere in transformers: say which and why
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FrontendError(f"model.path {str(path)!r}: cannot load a {family} model ({reason}); allowed: a "
                            "directory written by save_pretrained (config.json and complete weights)") from None
    return model.eval()


def family_of(model) -> str:
    for family, adapter in ADAPTERS.items():
        if isinstance(model, adapter.model_class):
            return family
    raise FrontendError(
        f"model class {type(model).__name__} is not supported; supported: "
        + ", ".join(a.model_class.__name__ for a in ADAPTERS.values())
    )


def trace(model, name: str | None = None, whole: bool = False) -> Graph:
    """The IR graph of `model`, checked three ways: settings the adapter supports, every
    parameter read by some op, and the interpreted graph reproducing the HF logits.

    A model of more than two layers whose layers are alike is traced by `trace_repeated`:
    the same graph in a fraction of the export time. Where that does not apply or fails
    (any error, the logit check included), or with `whole`, every layer is exported, and
    that trace decides."""
    if not whole:
        try:
            return trace_repeated(model, name)
        except (repeat.NotRepeatable, FrontendError):
            pass
    adapter, headline = _supported(model)
    graph = Recognizer(adapter, model, _export(adapter, model, model, headline), name or adapter.family).run()
    return _checked(graph, adapter, model, headline)


def trace_repeated(model, name: str | None = None) -> Graph:
    """`trace` through an export of the model's layer 0 and a relay in place of layer 1,
    layer 0 repeated for the rest (repeat.py). Raises NotRepeatable for a model of fewer
    than three layers or with layers that are not alike."""
    adapter, headline = _supported(model)
    n_layer = len(repeat.layer_list(model, adapter.layers))
    if n_layer < repeat.MIN_LAYERS:
        raise repeat.NotRepeatable(f"{n_layer} layers: the whole trace costs about the same")
    repeat.unlike_layers(model, adapter.layers, adapter.per_layer_attrs)
    small, exit_ = _layer_graph(adapter, model, headline, name)
    graph = repeat.repeat_layers(small, n_layer, adapter.layers, exit_, _extras(adapter, model))
    return _checked(graph, adapter, model, headline)


def _extras(adapter: Adapter, model):
    """Each layer's attention attributes, where the adapter reads some per layer (repeat.repeat_layers)."""
    return (lambda index: adapter.attention_extras(model, index)) if adapter.per_layer_attrs else None


def trace_from_config(family: str, config, seed: int = 0, dtype=torch.float32, name: str | None = None,
                      as_loaded: bool = False) -> Graph:
    """The graph `trace_repeated` gives for the model of `config`, without building that model: its
    layers are compared on the meta device (settings and shapes), a shallow random model of
    MIN_LAYERS layers is exported and checked against its HF logits, and its layer 0 is repeated to
    the config's depth, whose parameter names and shapes the graph must match. Memory and time grow
    with one layer. Raises NotRepeatable where the layers are not alike or the depth is MIN_LAYERS or
    less (then trace the model itself). The logit check runs on the shallow model's layers only:
    forward code that branches on a layer index past MIN_LAYERS is not seen (nor by `unlike_layers`)."""
    whole = meta_model(family, config, dtype)
    adapter, headline = _supported(whole)
    n_layer = len(repeat.layer_list(whole, adapter.layers))
    if n_layer <= repeat.MIN_LAYERS:
        raise repeat.NotRepeatable(f"{n_layer} layers: the model itself is as small as a shallow one")
    repeat.unlike_layers(whole, adapter.layers, adapter.per_layer_attrs)
    shallow = random_model(family, config, seed, dtype, layers=repeat.MIN_LAYERS, as_loaded=as_loaded)
    small, exit_ = _layer_graph(adapter, shallow, headline, name)
    _checked(repeat.repeat_layers(small, repeat.MIN_LAYERS, adapter.layers, exit_, _extras(adapter, shallow)),
             adapter, shallow, headline)
    graph = repeat.repeat_layers(small, n_layer, adapter.layers, exit_, _extras(adapter, whole))
    _describe(graph, adapter, whole, headline)
    _check_weights(graph, adapter, dict(whole.named_parameters()), headline)
    return graph


def _layer_graph(adapter: Adapter, model, headline: str, name: str | None) -> tuple[Graph, str]:
    """The graph of the view [layer 0, relay] of `model`, and the node layer 0 hands to the next layer."""
    view = repeat.relayed(model, adapter.layers, adapter.layer_returns_tuple)
    with repeat.lean_export():
        program = _export(adapter, view, model, headline)
    recognizer = Recognizer(adapter, view, program, name or adapter.family)
    small = recognizer.run()
    return small, repeat.relay_input(program, recognizer.values, adapter.layers)


def _supported(model) -> tuple[Adapter, str]:
    """The model's adapter, once it has found no setting it refuses."""
    adapter = ADAPTERS[family_of(model)]
    headline = f"cannot trace {type(model).__name__}"
    problems = adapter.check(model)
    if problems:
        raise FrontendError(problems, headline)
    return adapter, headline


def _checked(graph: Graph, adapter: Adapter, model, headline: str) -> Graph:
    """`graph` with its attributes set, once verified, reading every parameter, and
    reproducing the HF logits."""
    _describe(graph, adapter, model, headline)
    params = dict(model.named_parameters())
    _check_weights(graph, adapter, params, headline)
    _check_logits(graph, model, params, headline)
    return graph


def _check_weights(graph: Graph, adapter: Adapter, params: dict, headline: str) -> None:
    """The graph is sound, its weights are `params` by name and shape, and it reads every one."""
    verify(graph, params)
    unread = [n for n in params if n not in graph.weight_shapes]
    if unread:
        raise FrontendError(
            [f"{n}: module {n.rsplit('.', 1)[0]} holds a parameter that no op of the {adapter.family} adapter "
             "reads; this module is not supported" for n in unread], headline)


def _export(adapter: Adapter, module, model, headline: str) -> torch.export.ExportedProgram:
    """Export `module` (the model, or a view of it; sizes come from `model`)."""
    length = min(EXPORT_LENGTH, adapter.max_positions(model))
    ids = torch.zeros(1, length, dtype=torch.long)
    try:
        return torch.export.export(module, (ids,), {"use_cache": False})
    except Exception as err:  # noqa: BLE001 - any export failure is a frontend problem of this model
        raise FrontendError(f"torch.export failed: {type(err).__name__}: {str(err).splitlines()[0]}", headline)


def _describe(graph: Graph, adapter: Adapter, model, headline: str) -> None:
    """Set the graph's attributes (the aux model's sizes) from its ops."""
    nodes = graph.nodes()
    residual = next((n for n in nodes if n.kind == "add" and n.attrs["layer"] >= 0), None)  # on the stream
    attention = next((n for n in nodes if n.kind == "attention"), None)
    head = next((n for n in nodes if n.kind == "lm_head"), None)
    ffn = next((n for n in nodes if n.attrs.get("role") in ("mlp_in", "mlp_up")), None)
    if None in (residual, attention, head, ffn):
        raise FrontendError("the trace has no residual add, attention, MLP or unembedding", headline)
    graph.attrs = {"family": adapter.family, "d_model": residual.shape[-1],
                   "n_layer": 1 + max(n.attrs["layer"] for n in nodes), "n_head": attention.attrs["heads"],
                   "d_ffn": ffn.shape[-1], "vocab": head.shape[-1], "max_positions": adapter.max_positions(model)}


def _check_logits(graph: Graph, model, params, headline: str, length: int = 8) -> None:
    """The interpreter must give the HF logits on a short fixed input."""
    gen = torch.Generator().manual_seed(0)
    length = min(length, graph.attrs["max_positions"])
    ids = torch.randint(0, graph.attrs["vocab"], (1, length), generator=gen)
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
        got = Interpreter(graph).run(params, ids)
    err = (got - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    tolerance = (1e-4 if expected.dtype == torch.float32 else 1e-10) * scale
    if not err <= tolerance:
        raise FrontendError(
            f"the traced graph gives logits {err:.3g} from the model's (allowed {tolerance:.1g}): "
            f"the {family_of(model)} adapter missed or misread an op", headline)
