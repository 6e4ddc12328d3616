"""`tintc eval`: the paper's language-modelling experiment on real text (dynamic evaluation).

The text's token ids are cut into non-overlapping chunks of T tokens. In each chunk the first
`train_fraction` of the tokens is the train segment; the perplexity is exp(mean CE) over the
next-token predictions of the rest (the test segment), each from the full causal context,
pooled over all chunks. Every chunk starts from the original weights θ. Rows, on the same chunks:

    base                  the aux model as given (the Hugging Face model itself)
    dynamic eval (exact)  autograd SGD on the train segment (tintc.oracle.reference.exact_gd)
    ĝ                     the same with the configured approximate backward rules (approx_gd)
    TinT                  the emitted package, loaded from its directory as a user would

The TinT takes η as an input, so one compile (one package, out/tint/) serves every learning rate
of a sweep. Chunks are independent: under torchrun each rank takes every world-th chunk and rank 0 gathers.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from backends.torch.emit import import_package

from tintc.oracle import metrics

from tintc import pipeline
from tintc.config import TintcConfig
from ir.errors import ConfigError, TintcError
from tintc.oracle.reference import TrainSettings, approx_gd, exact_gd
from tintc.eval.text_source import Text, chunk_starts, tokenize
from tintc.files import check_output
from tintc.options import lr_name

BASE, EXACT, G_HAT, TINT = "base", "dynamic eval (exact)", "ĝ", "TinT"
G_HAT64 = "ĝ (float64)"  # optional, for float32 configs: how far rounding alone moves ĝ (the fp32 floor)
TRAINED_ROWS = (EXACT, G_HAT, TINT)  # the rows that depend on the learning rate


@dataclass(frozen=True)
class EvalSettings:
    length: int | None = None  # T, tokens per chunk (None: the TinT's max length, at most 256)
    train_fraction: float = 0.5
    chunks: int | None = None  # None: every chunk of the text
    seed: int = 0
    lrs: tuple[float, ...] | None = None  # None: the config's
    device: str = "cpu"
    float64_reference: bool = False  # add the G_HAT64 row (float32 configs)
    stages: int = 1  # > 1: the TinT's calls in pipeline stages, one per torchrun rank (tintc/eval/stages.py)

    def split(self) -> int:
        """Tokens in the train segment; at least 2 (one prediction to train on) and one test token."""
        n_train = int(self.length * self.train_fraction)
        if not 0 < self.train_fraction < 1 or n_train < 2 or n_train >= self.length:
            raise ConfigError(f"--train-fraction, --length: got {self.train_fraction} of T={self.length}; allowed: "
                              "a fraction in (0, 1) of a length that leaves at least 2 train tokens and 1 test token")
        return n_train


@dataclass
class ChunkValues:
    """One chunk under one row: summed test CE (nats, float64), and the row's seconds."""

    ce: float
    seconds: float


@dataclass
class EvalResult:
    info: dict  # what was run: config, text, tokenizer, sizes, settings
    starts: list[int]  # chunk start offsets in the token ids, text order
    predictions: int  # test predictions per chunk
    base: list[ChunkValues]
    runs: dict[float, dict[str, list[ChunkValues]]]  # lr -> row -> per chunk
    compile_seconds: float = 0.0  # the one compile that serves every learning rate

    def perplexity(self, values: list[ChunkValues]) -> float:
        """exp of the mean CE over every test prediction of every chunk."""
        return math.exp(sum(v.ce for v in values) / (self.predictions * len(values)))

    def chunk_perplexities(self, values: list[ChunkValues]) -> list[float]:
        return [math.exp(v.ce / self.predictions) for v in values]


# -- the loss on one chunk -------------------------------------------------------------------
def train_mask(length: int, n_train: int, device="cpu") -> torch.Tensor:
    mask = torch.zeros(1, length, dtype=torch.bool, device=device)
    mask[:, :n_train] = True
    return mask


def test_ce(logits: torch.Tensor, ids: torch.Tensor, train: torch.Tensor) -> float:
    """Summed next-token CE (float64) over the positions whose next token is a test token."""
    evaluated = metrics.eval_mask(train)[:, :-1]
    ce = F.cross_entropy(logits[:, :-1].double().transpose(1, 2), ids[:, 1:], reduction="none")
    return ce[evaluated].sum().item()


def require_finite(logits: torch.Tensor, row: str, lr: float | None, where: str) -> torch.Tensor:
    """The logits, or an error naming the row (stage), learning rate and chunk or example that gave
    NaN or inf: a result that is not a number is never averaged into a table."""
    if not bool(torch.isfinite(logits).all()):
        at_lr = f", lr {lr_name(lr)}" if lr is not None else ""
        raise TintcError(f"{where}: the {row} row{at_lr} gave non-finite logits (NaN or inf); allowed: finite "
                         "results (a smaller learning rate, --lrs or tint.train.lr, or tint.dtype float64 may keep "
                         "them finite)",
                         headline="eval error")
    return logits


# -- the rows --------------------------------------------------------------------------------
def with_lr(cfg: TintcConfig, lr: float) -> TintcConfig:
    train = cfg.tint.train.model_copy(update={"lr": lr})
    return cfg.model_copy(update={"tint": cfg.tint.model_copy(update={"train": train})})


class Rows:
    """The model, its traced graph and θ on the device; the TinT (every lr) and, per lr, the oracles' settings."""

    def __init__(self, cfg: TintcConfig, device: str, float64_reference: bool = False, loss: str = "context"):
        if cfg.tint.train.loss != loss:
            task = "the language-modelling protocol" if loss == "context" else "--task classify"
            raise ConfigError(f"tint.train.loss: got {cfg.tint.train.loss!r}; allowed: {loss!r} for {task}")
        self.cfg, self.device = cfg, torch.device(device)
        self.model = pipeline.load_aux_model(cfg).to(self.device)
        self.graph = pipeline.trace(cfg, self.model)
        self.params = {n: p.detach() for n, p in self.model.named_parameters()}
        self.settings: dict[float, TrainSettings] = {}
        self.tint: tuple | None = None  # (TinT module, prefixes of θ): η is its input
        self.float64 = None  # (graph, θ) in float64 for the G_HAT64 row
        if float64_reference:
            if cfg.tint.dtype != "float32":
                raise ConfigError(f"--float64-reference: got tint.dtype {cfg.tint.dtype}; allowed: float32 configs")
            model64 = pipeline.load_aux_model(cfg.model_copy(update={"tint": cfg.tint.model_copy(
                update={"dtype": "float64"})})).to(self.device)
            self.float64 = (pipeline.trace(cfg, model64), {n: p.detach() for n, p in model64.named_parameters()})

    @property
    def trained_rows(self) -> tuple[str, ...]:
        return TRAINED_ROWS + ((G_HAT64,) if self.float64 else ())

    def compile(self, directory: Path | None):
        """Compile the TinT (the config's lr is only its default η) and write its package into `directory`
        (None: no package); return the seconds and the in-memory TinT."""
        start = time.perf_counter()
        compiled = pipeline.compile_tint(self.cfg)  # from the config alone: the TinT depends on the architecture only
        if directory is not None:
            pipeline.emit(compiled, self.cfg, directory)
        return time.perf_counter() - start, compiled.tint

    def load(self, lrs, directory: Path) -> None:
        """The oracles' settings for each of `lrs`, and the TinT as a user loads it: from its package."""
        self.settings = {lr: TrainSettings.from_config(with_lr(self.cfg, lr), self.graph.attrs["n_layer"]) for lr in lrs}
        tint = import_package(directory).load(directory, device=self.device)
        self.tint = (tint, tint.encode(self.params))

    def logits(self, row: str, lr: float | None, ids: torch.Tensor, train: torch.Tensor,
               labels: torch.Tensor | None = None) -> torch.Tensor:
        """The row's logits on `ids` after training on `train` (with the label_only loss, on the
        predictions of the `labels` tokens)."""
        with torch.no_grad():
            if row == BASE:
                return self.model(ids, use_cache=False).logits
            if row == TINT:
                tint, prefixes = self.tint
                return tint(ids, train, prefixes, labels, lr=lr)[0]
        if row == EXACT:
            return exact_gd(self.model, self.graph, ids, train, self.settings[lr], labels, before=False).logits
        if row == G_HAT64:
            return approx_gd(*self.float64, ids, train, self.settings[lr], labels, before=False).logits
        return approx_gd(self.graph, self.params, ids, train, self.settings[lr], labels, before=False).logits

    def timed(self, row: str, lr: float | None, ids, train, labels=None) -> tuple[torch.Tensor, float]:
        """The row's logits and its seconds (the device synchronised around it)."""
        self._sync()
        start = time.perf_counter()
        logits = self.logits(row, lr, ids, train, labels)
        self._sync()
        return logits, time.perf_counter() - start

    def run(self, row: str, lr: float | None, ids: torch.Tensor, train: torch.Tensor, where: str) -> ChunkValues:
        logits, seconds = self.timed(row, lr, ids, train)
        return ChunkValues(test_ce(require_finite(logits, row, lr, where), ids, train), seconds)

    def compile_all(self, lrs, out: Path, group, progress, total: int, staged: bool = False) -> float:
        """Rank 0 compiles the TinT into out/tint/ once and every rank loads it (it takes each lr as an
        input); the compile's seconds (0 on the other ranks). Staged, every rank keeps its own in-memory
        compile (the same TinT) to run its stage of."""
        progress(0, total, "compiling the TinT (every learning rate)")
        seconds, tint = 0.0, None
        if group.rank == 0 or staged:  # one package writer; the others wait (staged: their own compile)
            seconds, tint = self.compile(out / PACKAGE_DIR if group.rank == 0 else None)
        group.barrier()
        self.load(lrs, out / PACKAGE_DIR)
        if staged:
            self.tint = (tint.to(self.device), tint.encode(self.params))
        return seconds if group.rank == 0 else 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# -- the outputs -----------------------------------------------------------------------------
RESULT_FILES = ("eval.json", "eval.md", "eval.png")  # eval/render.py and eval/classify_render.py write these
PACKAGE_FILES = ("tint_model.py", "weights.safetensors", "tint_config.json")  # backends/torch/emit.py's package
PACKAGE_DIR = "tint"  # under the output folder: the one package every learning rate runs


def check_outputs(out: Path) -> Path:
    """Before the compile or the first chunk: the output folder (links resolved whole) and the package
    folder must take what eval will write; returns the resolved folder."""
    out = check_output(out, RESULT_FILES)
    check_output(out / PACKAGE_DIR, PACKAGE_FILES)
    return out


# -- the protocol ----------------------------------------------------------------------------
def evaluate(cfg: TintcConfig, text: Text, settings: EvalSettings, out: Path, group=None,
             progress=None) -> EvalResult | None:
    """Run every row on the chunks (this process's share under `group`, a tintc.distributed.Group);
    return the result on rank 0 (None elsewhere). `progress(advance, total, what)` is called as work is
    done. The TinT package is written under out/tint/."""
    from tintc.eval import distributed, stages

    group = group or distributed.Group.single()
    staged = settings.stages > 1
    if staged:
        stages.check_stages(settings.stages, group)
    rows = Rows(cfg, settings.device, settings.float64_reference)
    max_length = cfg.max_length(rows.graph.attrs["max_positions"])
    settings = replace(settings, length=settings.length or min(max_length, 256))
    if settings.length > max_length:
        raise ConfigError(f"--length: got {settings.length}; allowed: at most the TinT's max length {max_length} "
                          "(tint.max_length)")
    n_train = settings.split()
    tokens = tokenize(text, cfg.resolved_model_path, rows.graph.attrs["vocab"])
    lrs = tuple(settings.lrs or (cfg.tint.train.lr,))
    starts = chunk_starts(len(tokens.ids), settings.length, settings.chunks, settings.seed)
    mine = list(range(group.rank, len(starts), group.world))
    progress = progress or (lambda advance, total, what: None)
    trained_rows = rows.trained_rows
    per_chunk = [row for row in trained_rows if not (staged and row == TINT)]  # staged: the TinT runs below
    total = len(mine) * (1 + len(per_chunk) * len(lrs)) + (len(lrs) if staged else 0)

    compile_seconds = rows.compile_all(lrs, out, group, progress, total, staged)

    train = train_mask(settings.length, n_train, rows.device)
    base: dict[int, ChunkValues] = {}
    runs: dict[float, dict[str, dict[int, ChunkValues]]] = {lr: {row: {} for row in trained_rows} for lr in lrs}
    for i in mine:
        ids = tokens.ids[starts[i] : starts[i] + settings.length][None].to(rows.device)
        where = f"chunk {i + 1}/{len(starts)} (tokens {starts[i]}+)"
        base[i] = rows.run(BASE, None, ids, train, where)
        progress(1, total, f"chunk {i + 1}/{len(starts)}: {BASE}")
        for lr in lrs:
            for row in per_chunk:
                runs[lr][row][i] = rows.run(row, lr, ids, train, where)
                progress(1, total, f"chunk {i + 1}/{len(starts)}: {row}, lr {lr:g}")
    stage_times = []
    for lr in lrs if staged else ():  # every chunk a micro-batch through the stages
        chunks = [tokens.ids[start : start + settings.length][None].to(rows.device) for start in starts]
        tint, prefixes = rows.tint
        outputs, times = stages.Pipeline(tint, group, settings.stages, settings.length).run(
            [(ids, train, None) for ids in chunks], prefixes, lr)
        stage_times.append({"lr": lr, **vars(times)})
        for i, (ids, (logits, _)) in enumerate(zip(chunks, outputs or ())):  # the last rank has the logits
            where = f"chunk {i + 1}/{len(starts)} (tokens {starts[i]}+)"
            ce = test_ce(require_finite(logits, TINT, lr, where), ids, train)
            runs[lr][TINT][i] = ChunkValues(ce, times.seconds / len(chunks))  # the pipeline's seconds per chunk
        progress(1, total, f"{TINT}, lr {lr:g}: {settings.stages} stages")

    gathered = group.gather((base, runs, stage_times))
    if gathered is None:
        return None
    distributed.merge_gathered((base, runs), [g[:2] for g in gathered], lrs, trained_rows)
    staging = {"stages": stage_times + [t for g in gathered for t in g[2]]} if staged else {}
    in_order = range(len(starts))
    return EvalResult(
        info={"text": text.source, "python": platform.python_version(), "torch": torch.__version__,
              "tokens": len(tokens.ids), "tokenizer": tokens.tokenizer, "length": settings.length,
              "train_tokens": n_train, "train_fraction": settings.train_fraction, "seed": settings.seed,
              "device": settings.device, "processes": group.world, **staging, **settings_info(cfg)},
        starts=starts, predictions=settings.length - n_train,
        base=[base[i] for i in in_order],
        runs={lr: {row: [runs[lr][row][i] for i in in_order] for row in trained_rows} for lr in lrs},
        compile_seconds=compile_seconds,
    )


def settings_info(cfg: TintcConfig) -> dict:
    t, a = cfg.tint.train, cfg.tint.approximations
    return {"config": cfg.name, "family": cfg.model.family, "dtype": cfg.tint.dtype, "steps": t.steps,
            "layers": t.layers, "kinds": list(t.kinds),
            "approximations": {"attention": a.attention, "layer_norm": a.layer_norm, "activation": a.activation,
                               "scale": a.scale}}
