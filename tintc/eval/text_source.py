"""Text for `tintc eval`: where it comes from, how it becomes token ids, how it is cut into chunks.

Sources: a UTF-8 file, a Hugging Face dataset saved with `save_to_disk` (needs the optional
`datasets` package), or by default the documentation strings of CPython's `pydoc_data.topics`
(real English text that every Python install has; it differs between Python versions, so the
version is recorded).
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from ir.errors import ConfigError


@dataclass(frozen=True)
class Text:
    text: str
    source: str  # what the text is, for the outputs


@dataclass(frozen=True)
class Tokens:
    ids: torch.Tensor  # [N] int64
    tokenizer: str  # the tokenizer's name, or how ids were made without one


def default_text() -> Text:
    """CPython's pydoc topics, joined in sorted key order with blank lines."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    return Text(text, f"pydoc_data.topics of Python {platform.python_version()} ({len(topics)} topics, "
                      f"sorted keys, joined with blank lines)")


def file_text(path: Path) -> Text:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"--text: got {path}; allowed: a readable UTF-8 text file ({error})") from None
    if not text.strip():
        raise ConfigError(f"--text: got {path}, which holds no text ({len(text)} characters, all blank); "
                          "allowed: a UTF-8 text file with text in it")
    return Text(text, f"file {path}")


def dataset_text(directory: Path, column: str = "text") -> Text:
    """The `column` of a dataset saved with `save_to_disk` (its "train" split if it has splits),
    rows joined with blank lines."""
    try:
        import datasets
    except ImportError:
        raise ConfigError("--dataset: needs the optional `datasets` package; allowed: install it with "
                          "pip install 'tintc[datasets]', or use --text FILE") from None
    try:
        data = datasets.load_from_disk(str(directory))
    except (OSError, ValueError, FileNotFoundError) as error:
        raise ConfigError(f"--dataset: got {directory}; allowed: a directory written by save_to_disk "
                          f"({error})") from None
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise ConfigError(f"--dataset: got splits {sorted(data)}; allowed: a Dataset or a DatasetDict "
                              "with a 'train' split")
        data = data["train"]
    if column not in data.column_names:
        raise ConfigError(f"--dataset: got columns {data.column_names}; allowed: a dataset with a "
                          f"{column!r} column")
    rows = data[column]
    for number, row in enumerate(rows):
        if not isinstance(row, str):
            raise ConfigError(f"--dataset: {directory}: row {number} of {column!r}: got {row!r:.60}; allowed: "
                              "a string in every row")
    if not any(row.strip() for row in rows):
        raise ConfigError(f"--dataset: {directory}: got {len(rows)} rows of {column!r} with no text; allowed: "
                          "a dataset with text in it")
    return Text("\n\n".join(rows), f"dataset {directory} ({len(data)} rows of {column!r})")


# The files save_pretrained writes for a tokenizer: a model folder holding any of them has a
# tokenizer, which is then used or refused, never silently replaced by bytes.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "special_tokens_map.json", "vocab.txt", "spiece.model")


def tokenizer_files(directory: Path | None) -> list[str]:
    if directory is None:
        return []
    return [name for name in TOKENIZER_FILES if os.path.lexists(Path(directory) / name)]


def load_tokenizer(directory: Path, files: list[str]):
    """The folder's tokenizer; a ConfigError naming the file when one is unreadable or corrupt."""
    from transformers import AutoTokenizer

    for name in files:
        path = Path(directory) / name
        if name.endswith(".json"):
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as error:
                raise ConfigError(f"model.path: {path}: got a tokenizer file that is not readable JSON ({error}); "
                                  "allowed: the tokenizer files as save_pretrained wrote them, or none at all "
                                  "(then UTF-8 bytes are the tokens)") from None
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as error:  # transformers raises many types for a broken tokenizer
        raise ConfigError(f"model.path: {directory}: its tokenizer ({', '.join(files)}) cannot be loaded "
                          f"({type(error).__name__}: {str(error)[:200]}); allowed: the tokenizer files as "
                          "save_pretrained wrote them, or none at all (then UTF-8 bytes are the tokens)") from None


class Encoder:
    """Text to token ids: the model's tokenizer where its directory has one (no special tokens
    added; a broken one is an error), else the UTF-8 bytes modulo the vocabulary (random test
    models have no tokenizer). Every id is checked against the model's vocabulary."""

    def __init__(self, tokenizer_dir: Path | None, vocab: int):
        files = tokenizer_files(tokenizer_dir)
        self.tokenizer = load_tokenizer(tokenizer_dir, files) if files else None
        self.vocab = vocab
        self.name = (f"{type(self.tokenizer).__name__} of {tokenizer_dir}" if self.tokenizer is not None else
                     f"no tokenizer: UTF-8 bytes modulo the vocabulary ({vocab})")

    def __call__(self, text: str) -> list[int]:
        if self.tokenizer is None:
            return [b % self.vocab for b in text.encode("utf-8")]
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        self.check(ids)
        return ids

    def check(self, ids) -> None:
        """Refuse token ids the model has no embedding for (a tokenizer of another model)."""
        top = max(ids, default=-1)
        if top >= self.vocab:
            raise ConfigError(f"model.path: {self.name} gave token id {top}; allowed: ids below the model's "
                              f"vocabulary size {self.vocab} (a tokenizer of this model)")


def tokenize(text: Text, tokenizer_dir: Path | None, vocab: int) -> Tokens:
    """The text's token ids with the model's tokenizer, else its bytes modulo the vocabulary."""
    encoder = Encoder(tokenizer_dir, vocab)
    if encoder.tokenizer is not None:
        return Tokens(torch.tensor(encoder(text.text), dtype=torch.long), encoder.name)

    ids = torch.frombuffer(bytearray(text.text.encode("utf-8")), dtype=torch.uint8).long() % vocab
    return Tokens(ids, encoder.name)


def chunk_starts(n_tokens: int, length: int, chunks: int | None, seed: int) -> list[int]:
    """Start offsets of the chunks evaluated: the text holds n_tokens // length non-overlapping
    chunks (the tail shorter than a chunk is not used); `chunks` of them are drawn without
    replacement with `seed` (None: all), then put in text order."""
    available = n_tokens // length
    if available == 0:
        raise ConfigError(f"--length: got {length}; allowed: at most the text's {n_tokens} tokens")
    if chunks is None:
        return [i * length for i in range(available)]
    if not 1 <= chunks <= available:
        raise ConfigError(f"--chunks: got {chunks}; allowed: 1 to {available} (the text's {n_tokens} tokens "
                          f"hold {available} chunks of {length})")
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))
    return sorted(int(i) * length for i in order[:chunks])


def text_ids(path, tokenizer_dir: Path | None, vocab: int, length: int) -> torch.Tensor:
    """ids [1, length] of a --text file for verify and reference: its first `length` tokens (the
    first half is trained on, so a shorter text would leave nothing to test)."""
    tokens = tokenize(file_text(path), tokenizer_dir, vocab)
    if len(tokens.ids) < length:
        raise ConfigError(f"--text, --length: got {path}, {len(tokens.ids)} tokens of {tokens.tokenizer}, for "
                          f"T={length}; allowed: a text of at least T tokens (or a smaller --length)")
    return tokens.ids[:length][None]
