"""`tintc eval`: the paper's language-modelling experiment on real text (dynamic evaluation).

The text's token ids are cut into non-overlapping chunks of T tokens. In each chunk the first
`train_fraction` of the tokens is the train segment; the perplexity is exp(mean CE) over the
next-token predictions of the rest (the test segment), each from the full causal context,
pooled over all chunks. Every chunk starts from the original weights θ. Rows, on the same chunks:

    base                  the aux model as given (the Hugging Face model itself)
    dynamic eval (exact)  autograd SGD on the train segment (tintc.oracle.reference.exact_gd)
    ĝ                     the same with the configured approximate backward rules (approx_gd)
    TinT                  the emitted package, loaded from its directory as a user would

With named rule sets (`rules`, e.g. exact and paper: `tintc eval`'s default) each set is its own
compile and its rows are named after it: `TinT (exact)`, measured against exact dynamic evaluation,
and for a set with approximations `ĝ (paper)` and `TinT (paper)`, measured against that ĝ.

The TinT takes η as an input, so one compile per rule set (one package, out/<rule set>/, or out/tint/
for the config's own rules) serves every learning rate of a sweep. Chunks are independent (each starts
from θ and trains its own copy, in a batch too): under torchrun each rank takes every world-th chunk
and rank 0 gathers; with `stages` the ranks run the TinT's calls as pipeline stages instead.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from backends.torch.emit import import_package

from tintc.oracle import metrics

from tintc import pipeline
from tintc.config import TintcConfig
from tintc.config.schema import RULE_SETS
from ir.errors import ConfigError, TintcError
from tintc.oracle.reference import TrainSettings, approx_gd, exact_gd
from tintc.eval.text_source import Text, chunk_starts, tokenize
from tintc.files import check_output
from tintc.options import lr_name

BASE, EXACT, G_HAT, TINT = "base", "dynamic eval (exact)", "ĝ", "TinT"
G_HAT64 = "ĝ (float64)"  # optional, for float32 configs: how far rounding alone moves ĝ (the fp32 floor)
TRAINED_ROWS = (EXACT, G_HAT, TINT)  # the rows that depend on the learning rate


def row_plan(rule_sets: tuple[str, ...] | None, float64: bool) -> tuple[dict, dict]:
    """The trained rows: name -> (what runs: exact, g_hat, tint or g_hat64; rule set, None for the
    config's own), and each compared row's reference row (its agreement is measured against it).
    None: the config's rules alone (rows EXACT, G_HAT, TINT). A set of exact rules has no ĝ row: its ĝ
    is exact GD, so its TinT is measured against dynamic evaluation itself."""
    if rule_sets is None:
        plan = {EXACT: ("exact", None), G_HAT: ("g_hat", None), TINT: ("tint", None)}
        references = {TINT: G_HAT}
        last, g_hat = None, G_HAT
    else:
        plan, references = {EXACT: ("exact", None)}, {}
        for name in rule_sets:
            g_hat = EXACT if name == "exact" else f"{G_HAT} ({name})"
            if name != "exact":
                plan[g_hat] = ("g_hat", name)
            plan[f"{TINT} ({name})"] = ("tint", name)
            references[f"{TINT} ({name})"] = g_hat
        last = rule_sets[-1]
    if float64:
        row = G_HAT64 if last is None else f"{G_HAT} ({last}, float64)"
        plan[row], references[row] = ("g_hat64", last), g_hat
    return plan, references


@dataclass(frozen=True)
class EvalSettings:
    length: int | None = None  # T, tokens per chunk (None: the TinT's max length, at most 256)
    train_fraction: float = 0.5
    chunks: int | None = None  # None: every chunk of the text
    seed: int = 0
    lrs: tuple[float, ...] | None = None  # None: the config's
    device: str = "cpu"
    float64_reference: bool = False  # add the G_HAT64 row (float32 configs)
    rules: tuple[str, ...] | None = None  # named rule sets (RULE_SETS), each its own compile; None: the config's
    batch: int = 1  # chunks run together (each its own context)
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
    compile_seconds: dict[str, float] = field(default_factory=dict)  # per rule set: its one compile (every lr)
    references: dict[str, str] = field(default_factory=lambda: {TINT: G_HAT})  # compared row -> its reference

    def perplexity(self, values: list[ChunkValues]) -> float:
        """exp of the mean CE over every test prediction of every chunk."""
        return math.exp(sum(v.ce for v in values) / (self.predictions * len(values)))

    def chunk_perplexities(self, values: list[ChunkValues]) -> list[float]:
        return [math.exp(v.ce / self.predictions) for v in values]


# -- the loss on one chunk -------------------------------------------------------------------
def train_mask(length: int, n_train: int, device="cpu", batch: int = 1) -> torch.Tensor:
    mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
    mask[:, :n_train] = True
    return mask


def test_ces(logits: torch.Tensor, ids: torch.Tensor, train: torch.Tensor) -> list[float]:
    """Per sequence, the summed next-token CE (float64) over the positions whose next token is a test token."""
    evaluated = metrics.eval_mask(train)[:, :-1]
    ce = F.cross_entropy(logits[:, :-1].double().transpose(1, 2), ids[:, 1:], reduction="none")
    return (ce * evaluated).sum(-1).tolist()



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
    """The model, its traced graph and θ on the device; per rule set the TinT (η is its input), per lr and
    rule set the oracles' settings. `rule_sets`: named rule sets (row_plan); None: the config's own rules."""

    def __init__(self, cfg: TintcConfig, device: str, float64_reference: bool = False, loss: str = "context",
                 rule_sets: tuple[str, ...] | None = None):
        if cfg.tint.train.loss != loss:
            task = "the language-modelling protocol" if loss == "context" else "--task classify"
            raise ConfigError(f"tint.train.loss: got {cfg.tint.train.loss!r}; allowed: {loss!r} for {task}")
        self.cfg, self.device = cfg, torch.device(device)
        self.model = pipeline.load_aux_model(cfg).to(self.device)
        self.graph = pipeline.trace(cfg, self.model)
        self.params = {n: p.detach() for n, p in self.model.named_parameters()}
        self.plan, self.references = row_plan(rule_sets, float64_reference)
        self.rule_sets = (None,) if rule_sets is None else tuple(rule_sets)
        self.settings: dict[tuple, TrainSettings] = {}  # (lr, rule set) -> the oracles' settings
        self.tints: dict[str | None, tuple] = {}  # rule set -> (TinT module, prefixes of θ)
        self.float64 = None  # (graph, θ) in float64 for the G_HAT64 row
        if float64_reference:
            if cfg.tint.dtype != "float32":
                raise ConfigError(f"--float64-reference: got tint.dtype {cfg.tint.dtype}; allowed: float32 configs "
                                  "(a bfloat16 TinT's floor, ĝ in bfloat16, is in `tintc verify`)")
            model64 = pipeline.load_aux_model(cfg.model_copy(update={"tint": cfg.tint.model_copy(
                update={"dtype": "float64"})})).to(self.device)
            self.float64 = (pipeline.trace(cfg, model64), {n: p.detach() for n, p in model64.named_parameters()})

    @property
    def trained_rows(self) -> tuple[str, ...]:
        return tuple(self.plan)

    def config(self, lr: float, rule_set: str | None) -> TintcConfig:
        """The config for one learning rate and rule set (None: the config's own rules)."""
        cfg = with_lr(self.cfg, lr)
        return cfg if rule_set is None else cfg.with_rules(RULE_SETS[rule_set])

    def compile(self, rule_set: str | None, directory: Path | None):
        """Compile the TinT of `rule_set` (the config's lr is only its default η) and write its package into
        `directory` (None: no package); return the seconds and the in-memory TinT."""
        cfg = self.config(self.cfg.tint.train.lr, rule_set)
        start = time.perf_counter()
        compiled = pipeline.compile_tint(cfg)  # from the config alone: the TinT depends on the architecture only
        if directory is not None:
            pipeline.emit(compiled, cfg, directory)
        return time.perf_counter() - start, compiled.tint

    def load(self, lrs, directory: Path, rule_set: str | None = None) -> None:
        """The oracles' settings for each of `lrs` and `rule_set`, and the TinT as a user loads it: from its
        package."""
        n_layer = self.graph.attrs["n_layer"]
        for lr in lrs:
            self.settings[(lr, None)] = TrainSettings.from_config(self.config(lr, None), n_layer)
            self.settings[(lr, rule_set)] = TrainSettings.from_config(self.config(lr, rule_set), n_layer)
        tint = import_package(directory).load(directory, device=self.device)
        self.tints[rule_set] = (tint, tint.encode(self.params))

    def logits(self, row: str, lr: float | None, ids: torch.Tensor, train: torch.Tensor,
               labels: torch.Tensor | None = None) -> torch.Tensor:
        """The row's logits on `ids` after training on `train` (with the label_only loss, on the
        predictions of the `labels` tokens)."""
        if row == BASE:
            with torch.no_grad():
                return self.model(ids, use_cache=False).logits
        what, rule_set = self.plan[row]
        settings = self.settings[(lr, rule_set)]
        if what == "tint":
            tint, prefixes = self.tints[rule_set]
            with torch.no_grad():
                return tint(ids, train, prefixes, labels, lr=lr)[0]
        if what == "exact":  # the config's kinds, whatever the rule sets
            return exact_gd(self.model, self.graph, ids, train, settings, labels, before=False).logits
        if what == "g_hat64":
            return approx_gd(*self.float64, ids, train, settings, labels, before=False).logits
        return approx_gd(self.graph, self.params, ids, train, settings, labels, before=False).logits

    def timed(self, row: str, lr: float | None, ids, train, labels=None) -> tuple[torch.Tensor, float]:
        """The row's logits and its seconds (the device synchronised around it)."""
        self._sync()
        start = time.perf_counter()
        logits = self.logits(row, lr, ids, train, labels)
        self._sync()
        return logits, time.perf_counter() - start

    def run(self, row: str, lr: float | None, ids: torch.Tensor, train: torch.Tensor, where: str) -> list[ChunkValues]:
        """The row on a batch of chunks: each one's test CE, and the batch's seconds shared out evenly."""
        logits, seconds = self.timed(row, lr, ids, train)
        ces = test_ces(require_finite(logits, row, lr, where), ids, train)
        return [ChunkValues(ce, seconds / len(ces)) for ce in ces]

    def compile_all(self, lrs, out: Path, group, progress, total: int, staged: bool = False) -> dict[str, float]:
        """Per rule set, rank 0 compiles the TinT into its package folder (package_dir) once and every rank
        loads it (it takes each lr as an input); the seconds per rule set (0 on the other ranks). Staged,
        every rank keeps its own in-memory compile (the same TinT) to run its stage of."""
        compile_seconds = {}
        for rule_set in self.rule_sets:
            name = rule_set or self.cfg.tint.approximations.rule_set
            progress(0, total, f"compiling the TinT with the {name} rules (every learning rate)")
            seconds, tint = 0.0, None
            if group.rank == 0 or staged:  # one package writer; the others wait (staged: their own compile)
                seconds, tint = self.compile(rule_set, package_dir(out, rule_set) if group.rank == 0 else None)
            group.barrier()
            self.load(lrs, package_dir(out, rule_set), rule_set)
            if staged:
                self.tints[rule_set] = (tint.to(self.device), tint.encode(self.params))
            compile_seconds[name] = seconds if group.rank == 0 else 0.0
        return compile_seconds

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# -- the outputs -----------------------------------------------------------------------------
RESULT_FILES = ("eval.json", "eval.md", "eval.png")  # eval/render.py and eval/classify_render.py write these
PACKAGE_FILES = ("tint_model.py", "weights.safetensors", "tint_config.json")  # backends/torch/emit.py's package


PACKAGE_DIR = "tint"  # under the output folder: the package of the config's own rules (every learning rate)


def package_dir(out: Path, rule_set: str | None) -> Path:
    """The folder of a rule set's one package: out/<rule set>/, or out/tint/ for the config's own rules."""
    return out / (rule_set or PACKAGE_DIR)


def check_outputs(out: Path, rule_sets: tuple[str, ...] | None = None) -> Path:
    """Before the first compile or chunk: the output folder (links resolved whole) and each rule set's
    package folder must take what eval will write; returns the resolved folder."""
    out = check_output(out, RESULT_FILES)
    for rule_set in rule_sets or (None,):
        check_output(package_dir(out, rule_set), PACKAGE_FILES)
    return out


# -- the protocol ----------------------------------------------------------------------------
def evaluate(cfg: TintcConfig, text: Text, settings: EvalSettings, out: Path, group=None,
             progress=None) -> EvalResult | None:
    """Run every row on the chunks (this process's share under `group`, a tintc.distributed.Group);
    return the result on rank 0 (None elsewhere). `progress(advance, total, what)` is called as work is
    done. The TinT packages are written under out/<rule set>/ (out/tint/: the config's own rules)."""
    from tintc.eval import distributed, stages

    group = group or distributed.Group.single()
    staged = settings.stages > 1
    if staged:
        stages.check_stages(settings.stages, group)
    rows = Rows(cfg, settings.device, settings.float64_reference, rule_sets=settings.rules)
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
    batches = [mine[b : b + settings.batch] for b in range(0, len(mine), settings.batch)]
    staged_rows = [row for row in trained_rows if staged and rows.plan[row][0] == "tint"]  # run below
    per_chunk = [row for row in trained_rows if row not in staged_rows]
    total = len(batches) * (1 + len(per_chunk) * len(lrs)) + len(staged_rows) * len(lrs)

    compile_seconds = rows.compile_all(lrs, out, group, progress, total, staged)

    base: dict[int, ChunkValues] = {}
    runs: dict[float, dict[str, dict[int, ChunkValues]]] = {lr: {row: {} for row in trained_rows} for lr in lrs}
    for batch in batches:  # a batch of chunks: each sequence its own context, trained from θ
        ids = torch.stack([tokens.ids[starts[i] : starts[i] + settings.length] for i in batch]).to(rows.device)
        train = train_mask(settings.length, n_train, rows.device, len(batch))
        named = ("chunk " if len(batch) == 1 else "chunks ") + ", ".join(f"{i + 1}" for i in batch) + f"/{len(starts)}"
        where = f"{named} (tokens {', '.join(f'{starts[i]}+' for i in batch)})"
        base.update(zip(batch, rows.run(BASE, None, ids, train, where)))
        progress(1, total, f"{named}: {BASE}")
        for lr in lrs:
            for row in per_chunk:
                runs[lr][row].update(zip(batch, rows.run(row, lr, ids, train, where)))
                progress(1, total, f"{named}: {row}, lr {lr:g}")
    stage_times = []
    if staged_rows:  # every chunk a micro-batch through the stages
        chunks = [tokens.ids[start : start + settings.length][None].to(rows.device) for start in starts]
        train = train_mask(settings.length, n_train, rows.device)
    for lr in lrs:
        for row in staged_rows:
            tint, prefixes = rows.tints[rows.plan[row][1]]
            outputs, times = stages.Pipeline(tint, group, settings.stages, settings.length).run(
                [(ids, train, None) for ids in chunks], prefixes, lr)
            stage_times.append({"lr": lr, "row": row, **vars(times)})
            for i, (ids, (logits, _)) in enumerate(zip(chunks, outputs or ())):  # the last rank has the logits
                where = f"chunk {i + 1}/{len(starts)} (tokens {starts[i]}+)"
                ce, = test_ces(require_finite(logits, row, lr, where), ids, train)
                runs[lr][row][i] = ChunkValues(ce, times.seconds / len(chunks))  # the pipeline's seconds per chunk
            progress(1, total, f"{row}, lr {lr:g}: {settings.stages} stages")

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
              "device": settings.device, "processes": group.world, "batch": settings.batch, **staging,
              **settings_info(cfg, settings.rules)},
        starts=starts, predictions=settings.length - n_train,
        base=[base[i] for i in in_order],
        runs={lr: {row: [runs[lr][row][i] for i in in_order] for row in trained_rows} for lr in lrs},
        compile_seconds=compile_seconds, references=rows.references,
    )


def settings_info(cfg: TintcConfig, rule_sets: tuple[str, ...] | None = None) -> dict:
    """What ran: the config's settings, and the rule sets of the TinT rows (the config's own set by name
    when `rule_sets` is None), each with its rules and the kinds it trains."""
    t, a = cfg.tint.train, cfg.tint.approximations
    sets = {a.rule_set: cfg} if rule_sets is None else {name: cfg.with_rules(RULE_SETS[name]) for name in rule_sets}
    return {"config": cfg.name, "family": cfg.model.family, "dtype": cfg.tint.dtype, "steps": t.steps,
            "layers": t.layers, "kinds": list(t.kinds),
            "approximations": {"attention": a.attention, "layer_norm": a.layer_norm, "activation": a.activation,
                               "scale": a.scale},
            "rule_sets": {name: {**c.tint.approximations.rules, "scale": a.scale, "kinds": list(c.tint.train.kinds)}
                          for name, c in sets.items()}}
