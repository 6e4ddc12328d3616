"""`tintc eval`'s options checked before anything runs: which belong to which task, the learning
rates, and the text of --task lm. Each error names the option, what it got and what is allowed."""

from __future__ import annotations

from pathlib import Path

from ir.errors import ConfigError
from tintc.eval import text_source

DEFAULT_CHUNKS = 16


def parse_lrs(text: str | None) -> tuple[float, ...] | None:
    """--lrs: comma-separated distinct numbers > 0; None: the config's learning rate."""
    if text is None:
        return None
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or any(not v > 0 for v in values) or len(set(values)) != len(values):
        raise ConfigError(f"--lrs: got {text!r}; allowed: comma-separated distinct numbers > 0, e.g. 1e-4,3e-4,1e-3")
    return values


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
    (None: every chunk)."""
    if data is not None:
        raise ConfigError("--data: got with --task lm; allowed: --text FILE or --dataset DIR")
    if text is not None and dataset is not None:
        raise ConfigError("--text, --dataset: got both; allowed: at most one text source")
    chunks = DEFAULT_CHUNKS if chunks is None else chunks
    if chunks < 0:
        raise ConfigError(f"--chunks: got {chunks}; allowed: 0 (every chunk) or a positive number")
    source = (text_source.file_text(text) if text is not None else
              text_source.dataset_text(dataset) if dataset is not None else text_source.default_text())
    return source, chunks or None
