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

The TinT reads η from its config, so every learning rate of a sweep is its own compile. Chunks
are independent (each starts from θ and trains its own copy, in a batch too): under torchrun each
rank takes every world-th chunk and rank 0 gathers.
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
from tintc.options import lr_dir, lr_name

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
    compile_seconds: dict[float, float] = field(default_factory=dict)  # per lr, every rule set's compiles
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
    """The model, its traced graph and θ on the device; per lr and rule set, the oracles' settings and the
    TinT. `rule_sets`: named rule sets (row_plan); None: the config's own rules."""

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
        self.tints: dict[tuple, tuple] = {}  # (lr, rule set) -> (TinT module, prefixes of θ)
        self.float64 = None  # (graph, θ) in float64 for the G_HAT64 row
        if float64_reference:
            if cfg.tint.dtype != "float32":
                raise ConfigError(f"--float64-reference: got tint.dtype {cfg.tint.dtype}; allowed: float32 configs")
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

    def package_dir(self, out: Path, lr: float, rule_set: str | None) -> Path:
        return out / lr_dir(lr) if rule_set is None else out / rule_set / lr_dir(lr)

    def compile(self, lr: float, directory: Path, rule_set: str | None = None) -> float:
        """Compile the TinT for `lr` (and `rule_set`) and write its package into `directory`; the seconds."""
        cfg = self.config(lr, rule_set)
        start = time.perf_counter()
        # the TinT depends on the architecture only; trace a CPU copy when θ lives on an accelerator
        model = self.model if self.device.type == "cpu" else pipeline.load_aux_model(cfg)
        compiled = pipeline.compile_tint(cfg, model)
        pipeline.emit(compiled, cfg, directory)
        return time.perf_counter() - start

    def load(self, lr: float, directory: Path, rule_set: str | None = None) -> None:
        """The oracles' settings for `lr` and `rule_set`, and the TinT as a user loads it: from its package."""
        n_layer = self.graph.attrs["n_layer"]
        self.settings[(lr, None)] = TrainSettings.from_config(self.config(lr, None), n_layer)
        self.settings[(lr, rule_set)] = TrainSettings.from_config(self.config(lr, rule_set), n_layer)
        tint = import_package(directory).load(directory, device=self.device)
        self.tints[(lr, rule_set)] = (tint, tint.encode(self.params))

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
            tint, prefixes = self.tints[(lr, rule_set)]
            with torch.no_grad():
                return tint(ids, train, prefixes, labels)[0]
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

    def compile_all(self, lrs, out: Path, group, progress, total: int) -> dict[float, float]:
        """Per lr and rule set, rank 0 compiles the TinT into its package folder (package_dir) and every
        rank loads it; the seconds per lr, every rule set's together."""
        compile_seconds = {}
        for lr in lrs:
            compile_seconds[lr] = 0.0
            for rule_set in self.rule_sets:
                directory = self.package_dir(out, lr, rule_set)
                rules = "" if rule_set is None else f" with the {rule_set} rules"
                progress(0, total, f"compiling the TinT for lr {lr:g}{rules}")
                if group.rank == 0:  # one writer; the others wait and load the same files
                    compile_seconds[lr] += self.compile(lr, directory, rule_set)
                group.barrier()
                self.load(lr, directory, rule_set)
        return compile_seconds

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# -- the outputs -----------------------------------------------------------------------------
RESULT_FILES = ("eval.json", "eval.md", "eval.png")  # eval/render.py and eval/classify_render.py write these
PACKAGE_FILES = ("tint_model.py", "weights.safetensors", "tint_config.json")  # backends/torch/emit.py's package


def check_outputs(out: Path, lrs: tuple[float, ...], rule_sets: tuple[str, ...] | None = None) -> Path:
    """Before the first compile or chunk: the output folder (links resolved whole) and each learning
    rate's (and rule set's) package folder must take what eval will write; returns the resolved folder."""
    out = check_output(out, RESULT_FILES)
    for lr in lrs:
        for rule_set in rule_sets or (None,):
            check_output(out / lr_dir(lr) if rule_set is None else out / rule_set / lr_dir(lr), PACKAGE_FILES)
    return out


# -- the protocol ----------------------------------------------------------------------------
def evaluate(cfg: TintcConfig, text: Text, settings: EvalSettings, out: Path, group=None,
             progress=None) -> EvalResult | None:
    """Run every row on the chunks (this process's share under `group`, a tintc.distributed.Group);
    return the result on rank 0 (None elsewhere). `progress(advance, total, what)` is called as work is
    done. The TinT packages are written under out/lr-<lr>/."""
    from tintc.eval import distributed

    group = group or distributed.Group.single()
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
    total = len(batches) * (1 + len(trained_rows) * len(lrs))

    compile_seconds = rows.compile_all(lrs, out, group, progress, total)

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
            for row in trained_rows:
                runs[lr][row].update(zip(batch, rows.run(row, lr, ids, train, where)))
                progress(1, total, f"{named}: {row}, lr {lr:g}")

    gathered = group.gather((base, runs))
    if gathered is None:
        return None
    distributed.merge_gathered((base, runs), gathered, lrs, trained_rows)
    in_order = range(len(starts))
    return EvalResult(
        info={"text": text.source, "python": platform.python_version(), "torch": torch.__version__,
              "tokens": len(tokens.ids), "tokenizer": tokens.tokenizer, "length": settings.length,
              "train_tokens": n_train, "train_fraction": settings.train_fraction, "seed": settings.seed,
              "device": settings.device, "processes": group.world, "batch": settings.batch,
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
