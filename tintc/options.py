"""Command-line numbers, checked by the same pydantic field as the config key they override.

`--lrs` (eval) and `--lr` (verify) are tint.train.lr, `--length` is tint.max_length, `--seed` is model.seed (eval.classify.seed
has the same range), `--lengths` of bench are lengths as tint.max_length; the numbers with no config
key (`--train-fraction`, `--chunks`, `--batch`) have their field in `CommandOptions` below. Every
problem of one command is reported at once, as `--option: got VALUE; allowed: WHAT (config key)`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from pathlib import Path

from ir.errors import ConfigError
from tintc.config.schema import MAX_LENGTH, ModelSpec, TintSpec, TrainSpec
from tintc.eval import text_source

MAX_CHUNKS = 2**31 - 1
DEFAULT_CHUNKS = 16
MAX_BENCH_LENGTHS = 16  # one process per length and row: a few minutes each at full size
MIN_VERIFY_LENGTH = 4  # half train: 2 train tokens (one train prediction) and test predictions after them


class CommandOptions(BaseModel):
    """The numbers of the commands that no config key holds."""

    train_fraction: float = Field(0.5, gt=0, lt=1, allow_inf_nan=False,
                                  description="a number strictly between 0 and 1")
    chunks: int = Field(DEFAULT_CHUNKS, ge=0, le=MAX_CHUNKS, strict=True,
                        description=f"0 (every chunk) or an integer from 1 to {MAX_CHUNKS}")


# (schema class, field name, the config key it is, shown in the message)
LR = (TrainSpec, "lr", "tint.train.lr")
LENGTH = (TintSpec, "max_length", "tint.max_length")
LENGTH_ALLOWED = f"an integer from 2 to {MAX_LENGTH}"
SEED = (ModelSpec, "seed", "model.seed")
TRAIN_FRACTION = (CommandOptions, "train_fraction", None)
CHUNKS = (CommandOptions, "chunks", None)


@lru_cache(maxsize=None)
def _adapter(schema: type[BaseModel], name: str) -> TypeAdapter:
    field = schema.model_fields[name]
    return TypeAdapter(Annotated[field.annotation, field])


def problem(option: str, value: Any, spec: tuple, allowed: str | None = None) -> str | None:
    """None when `value` passes the field of `spec`, else the message naming `option` (and saying
    `allowed`, by default the field's own description)."""
    schema, name, key = spec
    try:
        _adapter(schema, name).validate_python(value)
        return None
    except ValidationError:
        also = f" (as {key} in the config)" if key else ""
        return f"{option}: got {value!r}; allowed: {allowed or schema.model_fields[name].description}{also}"


def _raise(problems: list[str | None]) -> None:
    problems = [p for p in problems if p is not None]
    if problems:
        raise ConfigError(problems, headline="command line error")


def parse_numbers(option: str, text: str, convert) -> tuple:
    """A comma-separated list; the whole text is named when a part is not a number."""
    try:
        values = tuple(convert(part.strip()) for part in text.split(","))
    except ValueError:
        values = ()
    if not values:
        raise ConfigError(f"{option}: got {text!r}; allowed: comma-separated numbers, e.g. "
                          f"{'1e-4,1e-3' if convert is float else '64,128'}", headline="command line error")
    return values


def lr_name(lr: float) -> str:
    """A learning rate as tables and JSON keys show it: short where that names it exactly,
    else all of repr's digits (so that two learning rates never share a name)."""
    short = f"{lr:g}"
    return short if float(short) == lr else repr(lr)


def eval_numbers(length: int | None, train_fraction: float | None, chunks: int | None, seed: int | None,
                 lrs: str | None) -> tuple[float, ...] | None:
    """`tintc eval`'s numbers checked (None: not given); returns the learning rates of --lrs."""
    learning_rates = None if lrs is None else parse_numbers("--lrs", lrs, float)
    given = [("--train-fraction", train_fraction, TRAIN_FRACTION), ("--chunks", chunks, CHUNKS),
             ("--seed", seed, SEED)]
    problems = [problem(option, value, spec) for option, value, spec in given if value is not None]
    problems.append(problem("--length", length, LENGTH, LENGTH_ALLOWED) if length is not None else None)
    problems += [problem("--lrs", lr, LR) for lr in learning_rates or ()]
    names = [lr_name(lr) for lr in learning_rates or ()]
    if len(set(names)) != len(names):
        problems.append(f"--lrs: got {lrs!r}; allowed: distinct learning rates (each is its own row)")
    _raise(problems)
    return learning_rates


EVAL_RULES = "config, or a comma-separated list of distinct named rule sets: exact, paper"


def eval_rules(text: str) -> tuple[str, ...] | None:
    """`tintc eval --rules`: the named rule sets (tint.approximations' words) whose TinTs run, each its own
    compile; `config`: the config's own rules (None)."""
    from tintc.config.schema import RULE_SETS

    names = tuple(part.strip() for part in text.split(","))
    if names == ("config",):
        return None
    if not names or len(set(names)) != len(names) or not set(names) <= set(RULE_SETS):
        raise ConfigError(f"--rules: got {text!r}; allowed: {EVAL_RULES}", headline="command line error")
    return names


def check_length(option: str, length: int | None, least: int = MIN_VERIFY_LENGTH, most: int | None = None,
                 what: str = "") -> None:
    """A sequence length of verify or reference: the config field's range, then the command's own."""
    if length is None:
        return
    upper = f"{most}{what}" if most is not None else str(MAX_LENGTH)
    allowed = f"an integer from {least} to {upper} (half of it is trained on: at least 2 tokens)"
    found = problem(option, length, LENGTH, allowed)
    if found is None and (length < least or (most is not None and length > most)):
        found = f"{option}: got {length}; allowed: {allowed}"
    _raise([found])


def bench_lengths(text: str) -> list[int]:
    """`bench --lengths`: each a length as tint.max_length, at most MAX_BENCH_LENGTHS of them."""
    lengths = parse_numbers("--lengths", text, int)
    problems = [problem("--lengths", n, LENGTH, LENGTH_ALLOWED) for n in lengths]
    if len(set(lengths)) > MAX_BENCH_LENGTHS:
        problems.append(f"--lengths: got {len(set(lengths))} lengths; allowed: at most {MAX_BENCH_LENGTHS}")
    _raise(problems)
    return sorted(set(lengths))


def check_classify(data: Path | None, lm_options: dict[str, object]) -> None:
    """--task classify takes --data and none of the language-modelling options (name -> value given)."""
    given = [name for name, value in lm_options.items() if value is not None]
    if given:
        raise ConfigError(f"{', '.join(given)}: got with --task classify; allowed: --data and the config's "
                          "eval.classify section (shots, seed, examples)")
    if data is None:
        raise ConfigError('--data: missing; allowed: a JSON-lines file of {"text": ..., "label": ...} '
                          "for --task classify")


def check_lm(data: Path | None, text: Path | None, dataset: Path | None,
             chunks: int | None) -> tuple[text_source.Text, int | None]:
    """--task lm: at most one text source and no --data; return the text and the chunks to draw
    (None: every chunk). --chunks's range is eval_numbers' check."""
    if data is not None:
        raise ConfigError("--data: got with --task lm; allowed: --text FILE or --dataset DIR")
    if text is not None and dataset is not None:
        raise ConfigError("--text, --dataset: got both; allowed: at most one text source")
    chunks = DEFAULT_CHUNKS if chunks is None else chunks
    source = (text_source.file_text(text) if text is not None else
              text_source.dataset_text(dataset) if dataset is not None else text_source.default_text())
    return source, chunks or None


def check_lr(option: str, lr: float | None) -> None:
    """A learning rate of verify: tint.train.lr's range."""
    if lr is not None:
        _raise([problem(option, lr, LR)])
