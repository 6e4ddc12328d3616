"""`tintc eval --task classify`: the paper's few-shot classification experiment.

The data is a JSON-lines file of {"text": ..., "label": ...}; the config's `eval.classify`
section gives a template holding {text}, a label word per label value, a separator and k
(`shots`). For each test example, k demonstrations are drawn (with `seed`) from the other
examples, and the input is

    template(demo_1) label_word(demo_1) separator ... template(demo_k) label_word(demo_k) separator template(query)

each piece tokenised on its own, so that a label word is exactly its one token. The
demonstrations are the train segment and the loss is label-only: only the predictions of the
demonstrations' label-word tokens are trained on (the TinT is compiled with
`tint.train.loss: label_only` and takes that label mask). The prediction is the argmax of the
next-token logits of the label words at the query's last token. Rows, on the same inputs:

    base (0-shot)         the HF model on the query alone
    base                  the HF model with the k demonstrations in its context (in-context learning)
    dynamic eval (exact)  autograd SGD on the demonstrations' label tokens, then the same input
    ĝ                     the same with the configured approximate backward rules
    TinT                  the emitted package, loaded from its directory

Examples are independent: under torchrun each rank takes every world-th one and rank 0 gathers.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from tintc.config import ClassifySpec, TintcConfig
from ir.errors import ConfigError
from tintc.eval.run import BASE, Rows, require_finite, settings_info
from tintc.eval.text_source import Encoder

ZERO_SHOT = "base (0-shot)"


@dataclass(frozen=True)
class Example:
    text: str
    label: str | int
    line: int  # 1-based line of the data file


@dataclass
class Scores:
    """One example under one row: the label words' next-token logits at the query's end."""

    logits: list[float]
    seconds: float

    @property
    def prediction(self) -> int:
        return max(range(len(self.logits)), key=self.logits.__getitem__)


@dataclass
class ClassifyResult:
    info: dict  # what was run: config, data, tokenizer, label words, settings
    tests: list[int]  # the test examples' data lines, data order
    gold: list[int]  # each test example's label index (into info["labels"])
    demonstrations: list[list[int]]  # each test example's demonstrations, as data lines
    zero_shot: list[Scores]
    base: list[Scores]
    runs: dict[float, dict[str, list[Scores]]]  # lr -> row -> per test example
    compile_seconds: float = 0.0  # the one compile that serves every learning rate

    def accuracy(self, scores: list[Scores]) -> float:
        return sum(s.prediction == g for s, g in zip(scores, self.gold)) / len(self.gold)


# -- the data --------------------------------------------------------------------------------
def read_examples(path: Path, spec: ClassifySpec) -> list[Example]:
    """Every non-blank line of the JSON-lines file; each label must be one of the config's."""
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")  # JSON lines end at \n only, not at U+2028
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"--data: got {path}; allowed: a readable UTF-8 JSON-lines file ({error})") from None
    examples, allowed = [], " | ".join(repr(k) for k in spec.labels)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise ConfigError(f"--data: {path}:{number}: got invalid JSON ({error}); allowed: one JSON object "
                              'per line, {"text": ..., "label": ...}') from None
        if not isinstance(row, dict) or set(row) != {"text", "label"} or not isinstance(row["text"], str):
            raise ConfigError(f"--data: {path}:{number}: got {line[:60]!r}; allowed: a JSON object with exactly "
                              'the keys "text" (a string) and "label"')
        label = row["label"]
        if not isinstance(label, (str, int)) or isinstance(label, bool) or label not in spec.labels:
            raise ConfigError(f"--data: {path}:{number}: label: got {label!r}; allowed: one of "
                              f"eval.classify.labels: {allowed}")
        examples.append(Example(row["text"], label, number))
    if len(examples) < spec.shots + 1:
        raise ConfigError(f"--data: {path}: got {len(examples)} examples; allowed: at least "
                          f"eval.classify.shots + 1 = {spec.shots + 1} (k demonstrations and a query)")
    return examples


def draw(n: int, spec: ClassifySpec) -> tuple[list[int], list[list[int]]]:
    """The test examples (indices, data order; `examples` of them, or all) and for each its k
    demonstrations from the other examples, in drawn order: one generator seeded with `seed`,
    the same on every rank."""
    generator = torch.Generator().manual_seed(spec.seed)
    if spec.examples is not None and spec.examples > n:
        raise ConfigError(f"eval.classify.examples: got {spec.examples}; allowed: 1 to {n}, the data's examples")
    tests = sorted(torch.randperm(n, generator=generator)[: spec.examples].tolist()) if spec.examples else list(range(n))
    demonstrations = []
    for i in tests:
        others = torch.randperm(n - 1, generator=generator)[: spec.shots].tolist()
        demonstrations.append([j + (j >= i) for j in others])  # skip the query itself
    return tests, demonstrations


# -- the prompts -----------------------------------------------------------------------------
class Prompter:
    """Examples to token ids, masks and the label words' ids."""

    def __init__(self, cfg: TintcConfig, spec: ClassifySpec, vocab: int):
        self.spec, self.encoder = spec, Encoder(cfg.resolved_model_path, vocab)
        self.values = list(spec.labels)
        self.label_ids = [self._one_token(value, word) for value, word in spec.labels.items()]
        if len(set(self.label_ids)) != len(self.label_ids):
            raise ConfigError(f"eval.classify.labels: got label words with the token ids {self.label_ids} "
                              f"({self.encoder.name}); allowed: label words with distinct tokens")

    def _one_token(self, value, word: str) -> int:
        ids = self.encoder(word)
        if len(ids) != 1:
            what = "one byte (this model has no tokenizer)" if self.encoder.tokenizer is None else "one token"
            raise ConfigError(f"eval.classify.labels.{value}: got {word!r}, {len(ids)} tokens of {self.encoder.name}; "
                              f"allowed: a label word that is {what}")
        return ids[0]

    def build(self, demonstrations: list[Example], query: Example) -> tuple[torch.Tensor, ...]:
        """ids [1, T], train [1, T] (the demonstrations) and labels [1, T] (their label words)."""
        ids, labels = [], []
        for demo in demonstrations:
            ids += self.encoder(self.spec.template.replace("{text}", demo.text))
            labels += [False] * (len(ids) - len(labels)) + [True]
            ids += [self.label_ids[self.values.index(demo.label)]] + self.encoder(self.spec.separator)
            labels += [False] * (len(ids) - len(labels))
        n_train = len(ids)
        ids += self.encoder(self.spec.template.replace("{text}", query.text))
        if len(ids) == n_train:
            raise ConfigError(f"--data: line {query.line}: got a query whose prompt has no tokens "
                              f"({query.text!r} in eval.classify.template); allowed: a query of at least one token")
        labels += [False] * (len(ids) - len(labels))
        train = torch.arange(len(ids)) < n_train
        return torch.tensor([ids]), train[None], torch.tensor([labels])


# -- the protocol ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassifySettings:
    data: Path
    lrs: tuple[float, ...] | None = None  # None: the config's
    device: str = "cpu"
    float64_reference: bool = False


def evaluate(cfg: TintcConfig, settings: ClassifySettings, out: Path, group=None,
             progress=None) -> ClassifyResult | None:
    """Every row on every test example (this process's share under `group`); the result on rank 0
    (None elsewhere). The TinT package is written under out/tint/."""
    from tintc.eval import distributed

    spec = cfg.eval.classify if cfg.eval is not None else None
    if spec is None:
        raise ConfigError("eval.classify: missing; allowed: a section with template, labels (and separator, "
                          "shots, seed, examples) for --task classify")
    group = group or distributed.Group.single()
    examples = read_examples(settings.data, spec)  # before the model loads: bad data fails at once
    tests, demonstrations = draw(len(examples), spec)
    rows = Rows(cfg, settings.device, settings.float64_reference, loss="label_only")
    prompter = Prompter(cfg, spec, rows.graph.attrs["vocab"])
    inputs = [prompter.build([examples[j] for j in demos], examples[i]) for i, demos in zip(tests, demonstrations)]
    _check_lengths(inputs, [(examples[i], [examples[j] for j in demos]) for i, demos in zip(tests, demonstrations)],
                   cfg.max_length(rows.graph.attrs["max_positions"]))

    lrs = tuple(settings.lrs or (cfg.tint.train.lr,))
    mine = list(range(group.rank, len(tests), group.world))
    progress = progress or (lambda advance, total, what: None)
    trained_rows = rows.trained_rows
    total = len(mine) * (2 + len(trained_rows) * len(lrs))
    compile_seconds = sum(rows.compile_all(lrs, out, group, progress, total).values())  # one rule set

    label_ids = torch.tensor(prompter.label_ids, device=rows.device)

    def score(row, lr, ids, train, labels, where: str) -> Scores:
        logits, seconds = rows.timed(row, lr, ids, train, labels)
        return Scores(require_finite(logits, row, lr, where)[0, -1, label_ids].double().tolist(), seconds)

    zero: dict[int, Scores] = {}
    base: dict[int, Scores] = {}
    runs = {lr: {row: {} for row in trained_rows} for lr in lrs}
    for i in mine:
        ids, train, labels = (t.to(rows.device) for t in inputs[i])
        where = f"example {i + 1}/{len(tests)} (--data line {examples[tests[i]].line})"
        zero[i] = score(BASE, None, ids[train.logical_not()][None], None, None, where)  # the query alone
        progress(1, total, f"example {i + 1}/{len(tests)}: {ZERO_SHOT}")
        base[i] = score(BASE, None, ids, train, labels, where)
        progress(1, total, f"example {i + 1}/{len(tests)}: {BASE}")
        for lr in lrs:
            for row in trained_rows:
                runs[lr][row][i] = score(row, lr, ids, train, labels, where)
                progress(1, total, f"example {i + 1}/{len(tests)}: {row}, lr {lr:g}")

    gathered = group.gather((zero, base, runs))
    if gathered is None:
        return None
    distributed.merge_gathered((zero, base, runs), gathered, lrs, trained_rows)
    in_order = range(len(tests))
    return ClassifyResult(
        info={"data": str(settings.data), "examples": len(examples), "python": platform.python_version(),
              "torch": torch.__version__, "tokenizer": prompter.encoder.name, "template": spec.template,
              "separator": spec.separator, "labels": [{"value": v, "word": w, "token": t} for (v, w), t in
                                                      zip(spec.labels.items(), prompter.label_ids)],
              "shots": spec.shots, "seed": spec.seed, "lengths": [int(x[0].shape[1]) for x in inputs],
              "device": settings.device, "processes": group.world, **settings_info(cfg)},
        tests=[examples[i].line for i in tests],
        gold=[prompter.values.index(examples[i].label) for i in tests],
        demonstrations=[[examples[j].line for j in demos] for demos in demonstrations],
        zero_shot=[zero[i] for i in in_order], base=[base[i] for i in in_order],
        runs={lr: {row: [runs[lr][row][i] for i in in_order] for row in trained_rows} for lr in lrs},
        compile_seconds=compile_seconds,
    )


def _check_lengths(inputs, prompts: list[tuple[Example, list[Example]]], max_length: int) -> None:
    """Refuse, before any compile, an input longer than the TinT takes, naming its query's line and
    its demonstrations' lines (a long demonstration makes a short query's input too long)."""
    for (ids, _, _), (query, demos) in zip(inputs, prompts):
        if ids.shape[1] > max_length:
            lines = ", ".join(str(d.line) for d in demos)
            raise ConfigError(f"--data: line {query.line}: got an input of {ids.shape[1]} tokens with its "
                              f"demonstrations (lines {lines}); allowed: at most the TinT's max length {max_length} "
                              "(tint.max_length; or fewer eval.classify.shots, shorter texts)")
