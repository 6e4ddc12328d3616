"""convert-gguf against hostile or careless use (issue 25): the package is found without running
its code, --file stays inside it, the output is a new folder (or one it wrote before), never
another's files or links, and a conversion killed midway leaves nothing that passes for done:
the README's `[ -f DIR/config.json ] || tintc convert-gguf DIR` converts again and succeeds.

The real conversion reads a 538 MB model (~40 s): the writer is tested here on a tiny model and
tokenizer, the same save_pretrained calls the real conversion makes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ir.errors import ConfigError, OutputError
from tintc.convert.gguf import COMPLETE, package_file, write_converted
from tintc.files import MANIFEST

ROOT = Path(__file__).resolve().parent.parent

# A tiny model and tokenizer; with SLOW set, save_pretrained stops for a minute after the weights.
TINY_WRITER = """
import os, sys, time
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast
from tests.models import tiny_model
from tintc.convert.gguf import write_converted

model = tiny_model("llama")
tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")))
if os.environ.get("SLOW"):
    save = model.save_pretrained
    def slow(folder, **kwargs):
        save(folder, **kwargs)
        time.sleep(60)
    model.save_pretrained = slow
write_converted(model, tokenizer, sys.argv[1], source="test")
"""


def _write(out: Path, slow: bool = False) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "SLOW": "1" if slow else ""}
    return subprocess.Popen([sys.executable, "-c", TINY_WRITER, str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _convert(out: Path) -> None:
    done = _write(out)
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err


def test_a_killed_conversion_leaves_no_config_and_the_readme_line_converts_again(tmp_path):
    out = tmp_path / "model"
    writer = _write(out, slow=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.rglob("model.safetensors")):  # the weights are written, the writer sleeps
        assert writer.poll() is None and time.monotonic() < deadline, writer.stderr.read()
        time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert not (out / COMPLETE).exists()  # the README's test says: not converted
    assert list(tmp_path.glob(".model.new-*"))  # the killed write's leftover
    _convert(out)  # the README's line runs the conversion again
    assert (out / COMPLETE).is_file() and (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".model.new-*"))  # the leftover is gone
    _convert(out)  # a folder it wrote before may be written again


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from tests.models import tiny_model

    vocab = {"[UNK]": 0, "a": 1}
    return tiny_model("llama"), PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")))


def _tree(root: Path) -> dict:
    """Every entry under root and its content, but tintc's lock files (empty, beside the output)."""
    return {str(p.relative_to(root)): (os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*")) if not p.name.endswith(".tintc-lock")}


PLANTED = {
    "a file of the user's": lambda out, victim: (out / "notes.txt").write_text("mine"),
    "a link to the user's file": lambda out, victim: (out / "config.json").symlink_to(victim),
    "a link under another name": lambda out, victim: (out / "tokenizer.json").symlink_to(victim),
    "a folder of the user's": lambda out, victim: (out / "data").mkdir(),
}


@pytest.mark.parametrize("case", PLANTED)
def test_a_folder_holding_anything_else_is_refused_and_left_as_it_was(tmp_path, tiny, case):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "model"
    out.mkdir()
    PLANTED[case](out, victim)
    before = _tree(tmp_path)
    with pytest.raises(OutputError, match="which tintc did not write there"):
        write_converted(*tiny, out, source="test")
    assert _tree(tmp_path) == before


def test_a_conversion_writes_a_complete_set_with_its_marker(tmp_path, tiny):
    out = write_converted(*tiny, tmp_path / "model", source="test")
    names = {p.name for p in out.iterdir()}
    assert {COMPLETE, "model.safetensors", "tokenizer.json", MANIFEST} <= names


def _package(tmp_path: Path, monkeypatch) -> Path:
    """An importable package whose __init__ leaves a marker if it ever runs."""
    root = tmp_path / "site"
    package = root / "tintc_fake_models"
    (package / "sub").mkdir(parents=True)
    marker = tmp_path / "imported"
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "secret.gguf").write_bytes(b"GGUF")
    (package / "escape.gguf").symlink_to(tmp_path / "secret.gguf")
    monkeypatch.syspath_prepend(str(root))
    return marker


def test_the_package_is_found_without_running_its_code(tmp_path, monkeypatch):
    marker = _package(tmp_path, monkeypatch)
    assert package_file("tintc_fake_models", "model.gguf").read_bytes() == b"GGUF"
    with pytest.raises(ConfigError, match="--package: got 'tintc_fake_models.sub'; allowed: the name of an "
                                          "installed top-level package"):
        package_file("tintc_fake_models.sub", "model.gguf")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../secret.gguf", "escape.gguf", str(Path("/etc/hostname")), "sub", ".", ""])
def test_file_stays_inside_the_package(tmp_path, monkeypatch, name):
    _package(tmp_path, monkeypatch)
    with pytest.raises(ConfigError, match=f"file {name!r} is not in package 'tintc_fake_models'; allowed: "
                                          "model.gguf"):
        package_file("tintc_fake_models", name)
