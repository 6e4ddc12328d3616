"""The driver: config -> aux model -> IR -> training passes -> TinT -> package and reports, and the
verification of a TinT against the oracles.

Each function is one step of the pipeline; the CLI calls them in order.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub

import torch  # noqa: E402

import ir.frontend  # noqa: E402
from ir.errors import ConfigError, FrontendError  # noqa: E402
from ir.frontend.repeat import NotRepeatable  # noqa: E402
from backends.torch.allocate import allocate  # noqa: E402
from backends.torch.lint import lint  # noqa: E402
from backends.torch.emit import package_files  # noqa: E402
from backends.torch.lower import lower  # noqa: E402
from backends.torch.prefixes import plan  # noqa: E402
from backends.torch.tint import TinT  # noqa: E402
from ir.graph import Graph  # noqa: E402
from ir.passes import run_passes  # noqa: E402
from ir.passes.attention_rows import attention_rows  # noqa: E402
from ir.passes.autodiff import autodiff  # noqa: E402
from ir.passes.block_sharing import block_sharing  # noqa: E402
from ir.passes.head_splitting import head_splitting  # noqa: E402
from ir.passes.low_rank import low_rank  # noqa: E402
from ir.passes.prefix_stacking import prefix_stacking  # noqa: E402
from ir.passes.rematerialise import rematerialise  # noqa: E402
from ir.passes.select_train import select_train  # noqa: E402
from ir.passes.split_mlp import split_mlp  # noqa: E402
from ir.passes.sub_mlp import sub_mlp  # noqa: E402
from ir.text import dump  # noqa: E402

from tintc import __version__, memory  # noqa: E402
from tintc.config import TintcConfig  # noqa: E402
from tintc.files import write_files  # noqa: E402
from tintc.eval import text_source  # noqa: E402
from tintc.finite import require_finite  # noqa: E402
from tintc.options import check_length  # noqa: E402
from tintc.oracle import metrics  # noqa: E402
from tintc.oracle.fidelity import example_input, fidelity_rows, render  # noqa: E402
from tintc.oracle.reference import GDResult, TrainSettings, approx_gd, exact_gd  # noqa: E402
from tintc.report.counts import parameter_report  # noqa: E402
from tintc.report.render import report_files  # noqa: E402


def load_aux_model(cfg: TintcConfig):
    """The auxiliary HF model: built from config kwargs with a seed, or loaded from a local dir."""
    if cfg.resolved_model_path is not None:
        return ir.frontend.load_model(cfg.model.family, cfg.resolved_model_path, dtype=cfg.torch_dtype)
    return ir.frontend.build_model(cfg.model.family, cfg.model.config or {}, cfg.model.seed, cfg.torch_dtype)


def aux_config(cfg: TintcConfig):
    """The aux model's HF config: from `model.config`, or `model.path`'s config.json (no weights read)."""
    return ir.frontend.config_of(cfg.model.family, cfg.model.config, cfg.resolved_model_path)


def trace(cfg: TintcConfig, model) -> Graph:
    return _settled(cfg, ir.frontend.trace(model, name=cfg.name))


def trace_from_config(cfg: TintcConfig, config) -> Graph:
    """The aux model's graph from its HF config alone (ir.frontend.trace_from_config: one layer traced
    and repeated). A model of MIN_LAYERS layers or fewer, or whose layers are not alike, or where the
    shallow path fails, is built whole with random weights and traced (that trace decides)."""
    family, seed, dtype = cfg.model.family, cfg.model.seed, cfg.torch_dtype
    loaded = cfg.resolved_model_path is not None  # init-time constants as the folder's model will have them
    try:
        graph = ir.frontend.trace_from_config(family, config, seed, dtype, name=cfg.name, as_loaded=loaded)
    except (NotRepeatable, FrontendError):
        check_memory(cfg, config, whole=True)
        graph = ir.frontend.trace(ir.frontend.random_model(family, config, seed, dtype, as_loaded=loaded),
                                  name=cfg.name)
    return _settled(cfg, graph)


def _settled(cfg: TintcConfig, graph: Graph) -> Graph:
    """The traced graph checked against the TinT's settings, and HF's upcasts the TinT does not make."""
    length = cfg.max_length(graph.attrs["max_positions"])
    windows = sorted({n.attrs["window"] for n in graph.nodes() if "window" in n.attrs})
    if windows and windows[0] < length:  # the TinT's attention sees every earlier token
        raise ConfigError(f"model.config.sliding_window: got {windows[0]}, shorter than the TinT's max length "
                          f"{length}; allowed: a window of at least tint.max_length (or none)")
    for node in graph.nodes():  # a window the TinT's length fits in hides no key: no window
        node.attrs.pop("window", None)
    for node in graph.nodes():  # the TinT computes in its dtype: HF's float32 cast inside a float64
        upcast = node.attrs.get("upcast")  # RMSNorm, eager softmax: HF's rounding, not ĝ; a widening cast stays
        if upcast and getattr(torch, upcast).itemsize <= cfg.torch_dtype.itemsize:
            del node.attrs["upcast"]
    return graph


def train_graph(cfg: TintcConfig, graph: Graph) -> Graph:
    """The training graph: which weights train, N steps of backward and descent, the evaluation;
    then the construction choices of the optimisation passes."""
    t, a, p = cfg.tint.train, cfg.tint.approximations, cfg.tint.passes
    # default widths divide every linear input: a gated MLP's inner width need not be a multiple of D
    d_model = graph.attrs["d_model"]
    d = math.gcd(d_model, *(graph.node(n.inputs[0]).shape[-1] for n in graph.nodes()
                                           if n.kind == "linear"))
    return run_passes(graph, [
        (split_mlp, {"width": cfg.split_width(d_model)}),
        (select_train, {"layers": cfg.trained_layers(graph.attrs["n_layer"]), "kinds": list(t.kinds)}),
        (autodiff, {"steps": t.steps, "lr": t.lr, "attention": a.attention, "layer_norm": a.layer_norm,
                    "activation": a.activation, "scale": a.scale}),
        (rematerialise, {"enabled": p.rematerialise.enabled}),
        (prefix_stacking, {"prefixes": cfg.tint.prefixes if p.prefix_stacking.enabled else None}),
        (head_splitting, {"width": cfg.head_width(d)}),
        (sub_mlp, {"width": cfg.group_width(d)}),
        (attention_rows, {"heads": cfg.row_heads(d_model, cfg.max_length(graph.attrs["max_positions"]))}),
        (block_sharing, {"enabled": p.block_sharing.enabled}),
        (low_rank, {"rank": p.low_rank.rank if p.low_rank.enabled else None}),
    ])


def summary(graph: Graph) -> dict[str, int]:
    """Op counts by kind."""
    return dict(Counter(node.kind for node in graph.nodes()))


class Compiled:
    """A compiled TinT, its graphs and compile time, and the aux model it was compiled for: its HF
    config and parameter count (from shapes), and `model`, the aux model with its weights, loaded at
    first use (verify, eval, encoding the prefixes): a compile itself never reads them."""

    def __init__(self, graph: Graph, train_graph: Graph, tint: TinT, seconds: float, aux_config,
                 aux_parameters: int, load_model, model=None):
        self.graph, self.train_graph, self.tint = graph, train_graph, tint
        self.seconds = seconds  # compile time: trace, passes and lowering
        self.aux_config, self.aux_parameters = aux_config, aux_parameters  # tied tensors counted once
        self._load_model, self._model = load_model, model

    @property
    def model(self):
        if self._model is None:
            self._model = self._load_model()
        return self._model


# A compile or a run that would not fit is refused before it starts (tintc/memory.py predicts both).
MEMORY_BUDGET = memory.BUDGET


def check_memory(cfg: TintcConfig, config, whole: bool = False, announce=lambda line: None) -> memory.Prediction:
    """The compile's predicted peak (tintc/memory.py), announced; refused above MEMORY_BUDGET."""
    prediction = memory.compile_prediction(cfg, config, whole)
    announce(prediction.line())
    if prediction.largest == memory.CAPPED_HEAD:
        memory.refuse_above(prediction, f"model.config.final_logit_softcapping ({config.final_logit_softcapping})",
                            f"the capped head's softmax over the vocabulary grows as V² (V = {config.vocab_size}): "
                            "null (no final cap) or a smaller vocabulary", MEMORY_BUDGET)
    memory.refuse_above(prediction, "tint.train.steps, tint.passes.block_sharing",
                        f"fewer steps, block sharing on, or a smaller model (steps {cfg.tint.train.steps}, block "
                        f"sharing {'on' if cfg.tint.passes.block_sharing.enabled else 'off'})", MEMORY_BUDGET)
    return prediction


def check_run(compiled: Compiled, length: int, batch: int = 1, announce=lambda line: None) -> memory.Prediction:
    """The predicted peak of one TinT forward on [batch, length] tokens, announced; refused above MEMORY_BUDGET."""
    shape = memory.run_shape(compiled.tint.program)
    prediction = memory.run_prediction(shape, length, batch, holds_package=False)
    announce(prediction.line())
    memory.refuse_above(prediction, "--length, --batch", "shorter or fewer sequences", MEMORY_BUDGET)
    return prediction


def compile_tint(cfg: TintcConfig, model=None, announce=lambda line: None) -> Compiled:
    """The TinT of `cfg`'s aux model, from its config alone (the weights are read only when
    `Compiled.model` is first used); or, with `model`, traced from that model. `announce` gets the
    predicted peak before the work starts."""
    config = model.config if model is not None else aux_config(cfg)
    predicted = check_memory(cfg, config, announce=announce)
    start = time.perf_counter()
    graph = trace(cfg, model) if model is not None else trace_from_config(cfg, config)
    tg = train_graph(cfg, graph)
    layout = plan(tg)
    program = allocate(lower(tg, layout, cfg.max_length(graph.attrs["max_positions"]), cfg.torch_dtype),
                       shared_rows=cfg.tint.passes.shared_rows.enabled)
    lint(program)  # the allocated program's invariants (backends/torch/lint.py)
    # a bfloat16 TinT is built in float32 (its constants rounded once, at the end)
    tint = TinT(program, label_only=cfg.tint.train.loss == "label_only").to(cfg.tint_dtype).eval()
    seconds = time.perf_counter() - start
    shapes = model if model is not None else ir.frontend.meta_model(cfg.model.family, config, cfg.torch_dtype)
    parameters = sum(p.numel() for p in shapes.parameters())
    compiled = Compiled(graph, tg, tint, seconds, config, parameters, lambda: load_aux_model(cfg), model)
    compiled.predicted = predicted  # the compile's peak as predicted before it started
    compiled.passes = cfg.tint.passes.model_dump()  # the passes' switches and knobs, for the report
    return compiled


def emit(compiled_or_tint, cfg: TintcConfig | None, directory, force: bool = False) -> list:
    """Write the standalone package alone (a pipeline.Compiled or the TinT itself) into `directory`,
    as one set (tintc/files.py); return the paths."""
    return write_files(directory, package_files(compiled_or_tint, cfg, __version__), force=force)


def save(compiled: Compiled, cfg: TintcConfig, force: bool = False, report: dict | None = None) -> list[str]:
    """Write under `output`, as one set (tintc/files.py), the standalone TinT package (tint_model.py,
    weights.safetensors, tint_config.json: see backends/torch/emit.py), the IR dumps of the traced and
    the training graph, the parameter report, and the compile time (timings.json, the one file that
    differs between identical compiles); return the paths. `report`: the parameter report if the
    caller has it already (else it is counted here)."""
    report = report if report is not None else parameter_report(compiled)
    files = {**package_files(compiled, cfg, __version__), "traced.ir": dump(compiled.graph), "train.ir": dump(compiled.train_graph),
             **report_files(report),
             "timings.json": json.dumps({"compile_seconds": round(compiled.seconds, 3)}, indent=2) + "\n"}
    return [str(path) for path in write_files(cfg.resolved_output, files, force=force, source=cfg.source_key)]


@dataclass
class Verification:
    construction: dict[str, float]  # TinT vs ĝ
    approximation: dict[str, float]  # ĝ vs exact GD
    tint_seconds: float
    # a TinT below float64 only: ĝ in the TinT's dtype vs ĝ in float64, the rounding the rules themselves
    # incur in that dtype (the finite differences amplify it by N), and the TinT vs ĝ in float64
    rounding: dict[str, float] | None = None
    construction_vs_float64: dict[str, float] | None = None
    input_shape: tuple[int, int] = (0, 0)  # [B, T] of the input
    lr: float = 0.0  # the learning rate the TinT and the oracles ran at


def verify(cfg: TintcConfig, compiled: Compiled, input_ids, train_mask, label_mask=None,
           forward=None, lr: float | None = None) -> Verification | None:
    """Run the TinT and the oracles on one input at learning rate `lr` (None: the config's; the TinT
    takes it as an input); measure the two errors of DESIGN §1. `forward(tint, ids, train, prefixes,
    labels, lr=)` runs the TinT (default: its forward); one that returns None (a pipeline stage that is
    not the last, tintc/eval/stages.py) makes verify return None."""
    model, graph, tint = compiled.model, compiled.graph, compiled.tint
    lr = cfg.tint.train.lr if lr is None else lr
    settings = replace(TrainSettings.from_config(cfg, graph.attrs["n_layer"]), lr=lr)
    labels = label_mask if cfg.tint.train.loss == "label_only" else None
    params = {n: p.detach() for n, p in model.named_parameters()}
    start = time.perf_counter()
    with torch.no_grad():
        out = (forward or (lambda t, *inputs, lr: t(*inputs, lr=lr)))(tint, input_ids, train_mask,
                                                                      tint.encode(params), labels, lr=lr)
    seconds = time.perf_counter() - start
    if out is None:
        return None
    logits, prefixes = out
    g_hat = approx_gd(graph, params, input_ids, train_mask, settings, labels)
    exact = exact_gd(model, graph, input_ids, train_mask, settings, labels)
    tint_run = GDResult(tint.decode(prefixes), logits, g_hat.logits_before, g_hat.trained)
    evaluated = metrics.eval_mask(train_mask)
    result = Verification(_errors(tint_run, g_hat, params, evaluated), _errors(g_hat, exact, params, evaluated),
                          seconds, input_shape=tuple(input_ids.shape), lr=lr)
    if tint.dtype != torch.float64:
        params64 = {n: p.double() for n, p in params.items()}
        g_hat64 = approx_gd(graph, params64, input_ids, train_mask, settings, labels)
        g_hat_low = g_hat if tint.dtype == g_hat.logits.dtype else approx_gd(  # a bfloat16 TinT: ĝ in bfloat16
            graph, {n: p.to(tint.dtype) for n, p in params.items()}, input_ids, train_mask, settings, labels)
        result.rounding = _errors(g_hat_low, g_hat64, params64, evaluated)
        result.construction_vs_float64 = _errors(tint_run, g_hat64, params64, evaluated)
    return require_finite(result, "verify")


def verify_on(cfg: TintcConfig, compiled: Compiled, length: int | None = None, batch: int = 1,
              text=None, forward=None, lr: float | None = None,
              announce=lambda line: None) -> Verification | None:
    """`tintc verify`: verify on `batch` seeded random inputs of `length` tokens (default: the TinT's max
    length, at most 64), or on the start of a text file, at learning rate `lr` (default: the config's;
    `forward`: as for verify). `announce` gets the TinT run's predicted peak."""
    max_length = compiled.tint.program.max_length
    check_length("--length", length, most=max_length, what=", the TinT's max length")
    length = length or min(64, max_length)
    compiled.model  # noqa: B018 - the aux weights, loaded here so that the prediction counts them as held
    check_run(compiled, length, batch, announce)
    return verify(cfg, compiled, *example_or_text(cfg, compiled.graph, length, batch, text), forward=forward, lr=lr)


def _errors(run, ref, params, evaluated) -> dict[str, float]:
    errors = metrics.logit_change_errors(run, ref, evaluated)
    errors["logits_rel"] = ((run.logits - ref.logits).norm() / ref.logits.norm()).item()
    updates = metrics.update_errors(run, ref, params)
    errors["worst_update_rel"] = max(updates.values()) if updates else 0.0
    return errors


def text_input(cfg: TintcConfig, graph: Graph, path, length: int):
    """Token ids [1, n] of a text file: the model folder's tokenizer if it has one, else bytes modulo
    the vocabulary (random-weight test models have no tokenizer)."""
    return text_source.text_ids(path, cfg.resolved_model_path, graph.attrs["vocab"], length)


def example_or_text(cfg: TintcConfig, graph: Graph, length: int, batch: int = 1, text=None):
    """(input_ids, train_mask, label_mask), the first half train: `batch` seeded random sequences of
    `length` tokens, or with `text` one sequence, the file's first `length` tokens (fewer if it is shorter)."""
    input_ids, train_mask, label_mask = example_input(graph.attrs["vocab"], length, batch, seed=cfg.model.seed)
    if text is None:
        return input_ids, train_mask, label_mask
    input_ids = text_input(cfg, graph, text, length)
    n = input_ids.shape[1]
    return input_ids, train_mask[:1, :n], label_mask[:1, :n]


def reference_table(cfg: TintcConfig, length: int | None = None, batch: int = 1, text=None):
    """The oracle's fidelity table on a seeded random input, or on a text file (half train, half test)."""
    model = load_aux_model(cfg)
    graph = trace(cfg, model)
    check_length("--length", length, most=graph.attrs["max_positions"], what=", the aux model's positions")
    input_ids, train_mask, label_mask = example_or_text(cfg, graph, length or min(64, graph.attrs["max_positions"]),
                                                        batch, text)
    settings = TrainSettings.from_config(cfg, graph.attrs["n_layer"])
    rows = fidelity_rows(model, graph, input_ids, train_mask, settings, label_mask)
    require_finite({row.name: row for row in rows}, "reference")
    t = cfg.tint.train
    title = (f"{cfg.name}: {t.steps} step(s) of SGD, lr {t.lr:g}, layers {t.layers}, kinds {','.join(t.kinds)}, "
             f"loss {t.loss}, {cfg.tint.dtype}, T={input_ids.shape[1]} (first half train)")
    return render(rows, title)

