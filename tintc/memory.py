"""Peak memory of a compile and of a TinT run, predicted from shapes before the work starts.

Each prediction is the resident size of the process when it is asked (the interpreter, torch and
whatever the process holds already: measured, /proc/self/statm) plus what the work adds, from shapes:

- a compile (`tintc compile`: pipeline.compile_tint from the config, the report and the package)
  peaks in one of two stages: the trace (the shallow random aux model, its embedding tables and
  MIN_LAYERS decoder layers, or the whole model where the layers cannot be repeated, once, and a tied
  embedding table once more, which building it costs; what torch.export loads on first use), or the
  program and its JSON form, whose wiring grows with the prefix rows each layer's linear maps stack:
  n_layer·d_model²/K per step;
- a TinT run (one forward of B sequences of T tokens): the TinT's weights, the prefixes (θ's blocks
  and embedding tables, unless the caller holds them already), the logits, and at the worst moment
  the token stream (B·T·its live width then) beside the new block versions held then: the stream's
  tail is let go as the backward walks down the layers while the new versions pile up
  (allocate.narrowing; a version no later step reads is dropped, allocate.released), so the worst
  moment is in the last stretch of calls before a cut or at the end; a bfloat16 TinT
  multiplies in float32 on a CPU (projection.widened), and its largest product, the output head's,
  holds the unembedding and the logits in float32 at the end.

The constants were fitted on GPT-2 (256 and 768 wide), SmolLM2-135M/360M, Qwen3-0.6B, OPT-1.3B, OLMo 2-1B,
Phi-3 and Gemma 2 (8 layers) shapes, by the peak of each stage measured alone (the figures are in the
bench's rows); tests/test_memory.py holds both predictions to ±20% of the peak measured in a fresh
process (the run's: after its first run). Block sharing off is not fitted (its primitives are not
counted). A model whose shallow trace fails is traced whole (pipeline.trace_from_config), which the
compile's prediction of record does not count (it is made before the trace is tried; the fallback
announces its own).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ir.errors import ConfigError

MIB = 2**20
BUDGET = 24 * 2**30  # bytes: the machine tintc is sized for
EXPORT_BYTES = 34 * MIB  # torch.export's modules and caches, loaded at the first export
PROGRAM_BYTES = 500  # the program (calls, wiring, JSON form) per unit of n_layer·d_model²/K, per step
# (measured after the trace is freed: ~210 MB at the 360M shape, ~100 MB at OLMo 2-1B)
PROCESS = "process now"  # the resident size when asked: interpreter, torch, what the process holds
CAPPED_HEAD = "final-logit cap's V × V identities"
WIDE, WIDENED_HEAD = 4, "output head widened to float32"  # a bfloat16 TinT's products on a CPU
CAPPED_IDENTITIES = 4  # the capped head's softmax over the vocabulary: its q, k, v, o built dense (lower_llama.py)


def resident_bytes() -> int:
    """This process's resident size now (0 where /proc is not there)."""
    try:
        pages = int(open("/proc/self/statm").read().split()[1])
    except OSError:
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Prediction:
    what: str  # "compile" or "run"
    terms: dict[str, int]  # bytes, by what holds them

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    @property
    def largest(self) -> str:
        """The largest term of the work (not the process's own resident size, which no setting changes)."""
        work = {name: size for name, size in self.terms.items() if name != PROCESS} or self.terms
        return max(work, key=work.get)

    def line(self) -> str:
        terms = ", ".join(f"{name} {size / MIB:,.0f}" for name, size in self.terms.items())
        return f"predicted peak of the {self.what}: {self.total / MIB:,.0f} MiB ({terms} MiB)"


def aux_bytes(meta_model, layers_path: str, layers: int | None, itemsize: int) -> int:
    """Bytes of the aux model's parameters with only `layers` of its decoder layers (all with None)."""
    stack = meta_model.get_submodule(layers_path)
    per_layer = sum(p.numel() for p in stack[0].parameters()) if len(stack) else 0
    outer = sum(p.numel() for p in meta_model.parameters()) - per_layer * len(stack)
    return (outer + per_layer * (len(stack) if layers is None else min(layers, len(stack)))) * itemsize


def compile_prediction(cfg, config, whole: bool = False) -> Prediction:
    """The peak of `tintc compile` (compile, report, package) of `cfg`, whose aux HF config is `config`;
    `whole`: the model is built with all its layers (its layers cannot be repeated). The larger stage."""
    import ir.frontend
    from ir.frontend.repeat import MIN_LAYERS

    family, itemsize = cfg.model.family, cfg.torch_dtype.itemsize
    meta = ir.frontend.meta_model(family, config, cfg.torch_dtype)
    path = ir.frontend.adapter_for(family).layers
    n_layer, d_model = len(meta.get_submodule(path)), config.hidden_size
    built = n_layer if whole else min(MIN_LAYERS, n_layer)
    trace = {"torch.export": EXPORT_BYTES, f"aux model ({built} layers, random)": aux_bytes(meta, path, built, itemsize)}
    if _tied(meta):  # measured: building a tied model peaks at its parameters plus the table once more
        trace["tied embedding table, built twice"] = meta.get_input_embeddings().weight.numel() * itemsize
    program = {"program": int(PROGRAM_BYTES * n_layer * d_model**2 / cfg.tint.prefixes * cfg.tint.train.steps)}
    if getattr(config, "final_logit_softcapping", None) is not None:  # Gemma 2: grows as V², not with depth
        program[CAPPED_HEAD] = CAPPED_IDENTITIES * config.vocab_size**2 * itemsize
    stage = trace if sum(trace.values()) >= sum(program.values()) else program
    return Prediction("compile", {PROCESS: resident_bytes(), **stage})


def _tied(meta_model) -> bool:
    output = meta_model.get_output_embeddings()
    return output is not None and output.weight is meta_model.get_input_embeddings().weight


def run_shape(program) -> dict[str, int]:
    """What a run's prediction needs of a compiled TinT (JSON-able, for a process that holds only its
    package): the stream's width, the vocabulary, the itemsize, the moments that can be the worst
    ("moments": [stream coordinates held, the most elements of new block versions held], for each stretch
    of calls between narrowing cuts), and the bytes of the TinT's weights (each shared tensor once) and of
    θ's prefixes (its blocks and embedding tables)."""
    layout, tensors = program.layout, {}
    for module in program.layers.values():
        tensors.update({id(t): t for t in [*module.parameters(), *module.buffers()]})
    itemsize = next(t for m in program.layers.values() for t in m.parameters()).element_size()
    tables = {layout.vocab.name, layout.unembed.name} | ({layout.positions.name} if layout.positions else set())
    prefixes = sum(b.tokens * b.width for b in layout.blocks.values()) + sum(_numel(layout.shapes[n]) for n in tables)
    return {"width": program.width, "vocab": layout.shapes[layout.vocab.name][0], "itemsize": itemsize,
            "head_width": program.logits.width,
            "moments": _moments(program), "weights_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            "prefix_bytes": prefixes * itemsize}


def _moments(program) -> list[list[int]]:
    """[stream coordinates held, the most new block-version elements held] for each stretch of calls
    between narrowing cuts (the last stretch ends after the last call): the moments that can be the run's
    worst."""
    from backends.torch.allocate import versions_held

    held, moments, width, start = versions_held(program), [], program.width, 0
    for i, narrow in sorted(program.narrowing.items()):
        moments.append([width, max(held[start:i], default=0)])
        width, start = narrow, i
    return [*moments, [width, max(held[start:])]]


def run_prediction(shape: dict, length: int, batch: int = 1, holds_package: bool = True) -> Prediction:
    """The peak of one TinT forward of `batch` sequences of `length` tokens (`shape`: run_shape's);
    `holds_package`: the process holds the TinT and θ's prefixes already (else they are counted)."""
    terms = {PROCESS: resident_bytes()}
    if not holds_package:
        terms["TinT weights"] = shape["weights_bytes"]
        terms["prefixes"] = shape["prefix_bytes"]
    tokens, itemsize = batch * length, shape["itemsize"]
    # each sequence trains its own copy of θ: the new block versions are [batch, K, width]
    held, made = max(shape["moments"], key=lambda m: tokens * m[0] + batch * m[1])
    terms |= {"token streams": tokens * held * itemsize,
              "trained blocks' new versions": batch * made * itemsize,
              "logits": tokens * shape["vocab"] * itemsize}
    if itemsize < WIDE:  # bfloat16: the output head's product in float32 (on a CPU)
        terms[WIDENED_HEAD] = (shape["vocab"] * shape["head_width"] + tokens * shape["vocab"]) * WIDE
    return Prediction(f"TinT run (T={length}, batch {batch})", terms)


def refuse_above(prediction: Prediction, keys: str, advice: str, budget: int | None = None) -> None:
    """Raise ConfigError naming `keys` and the largest term of the work (not the process's own resident
    size, which no setting changes) when the prediction exceeds the budget."""
    budget = BUDGET if budget is None else budget
    if prediction.total > budget:
        largest = prediction.largest
        raise ConfigError(f"{keys}: the {prediction.what} would need about {prediction.total / 2**30:.1f} GiB, "
                          f"{largest} {prediction.terms[largest] / 2**30:.1f} GiB the largest; allowed: at most "
                          f"{budget / 2**30:.0f} GiB: {advice}")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
