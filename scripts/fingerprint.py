"""A compile's fingerprint, to show that a refactor changes nothing a user gets (bit for bit).

    python scripts/fingerprint.py examples/gpt2.yaml OUT_DIR [--without KEY ...] > before.json
    (change the code)  python scripts/fingerprint.py examples/gpt2.yaml OUT_DIR > after.json; diff before.json after.json

Compiles CONFIG with `tintc compile` (its `output` replaced by OUT_DIR), then prints sha256 prefixes of:
every tensor of weights.safetensors by name; tint_config.json without its package digest; report.json
without its `name` (the config file's) and any --without keys (a section added between the two runs);
and the emitted package's logits and decoded updates on a fixed input (64 seeded tokens, first half
train, prefixes encoded from the aux weights). The package's source may differ; these may not.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _tensor_digest(t: torch.Tensor) -> str:
    return _digest(t.detach().contiguous().cpu().numpy().tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--without", action="append", default=[], help="a report.json key to leave out")
    args = parser.parse_args()
    config, out = args.config.resolve(), args.out.resolve()
    data = yaml.safe_load(config.read_text())
    if "path" in data["model"]:
        data["model"]["path"] = str((config.parent / data["model"]["path"]).resolve())
    data["output"] = str(out)
    copy = out.with_suffix(".yaml")
    copy.write_text(yaml.safe_dump(data))
    tintc = Path(sys.executable).parent / "tintc"
    subprocess.run([str(tintc), "compile", str(copy), "--force"], check=True, stdout=sys.stderr)

    weights = load_file(str(out / "weights.safetensors"))
    package_config = json.loads((out / "tint_config.json").read_text())
    package_config.pop("package", None)  # the digests, which cover the source too
    report = json.loads((out / "report.json").read_text())
    for key in ["name", *args.without]:
        report.pop(key, None)

    spec = importlib.util.spec_from_file_location("fingerprinted_package", out / "tint_model.py")
    package = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(package)
    tint = package.load(str(out))
    from tintc.config import load_config
    from tintc.pipeline import load_aux_model

    aux = load_aux_model(load_config(copy))
    params = {name: p.detach() for name, p in aux.named_parameters()}
    length = 64
    ids = torch.randint(0, aux.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    train = torch.zeros(1, length, dtype=torch.bool)
    train[:, : length // 2] = True
    with torch.no_grad():
        logits, prefixes = tint(ids, train, tint.encode(params))
    print(json.dumps({
        "weights": {name: _tensor_digest(t) for name, t in sorted(weights.items())},
        "tint_config": _digest(json.dumps(package_config, sort_keys=True).encode()),
        "report": _digest(json.dumps(report, sort_keys=True).encode()),
        "logits": _tensor_digest(logits),
        "decoded": {name: _tensor_digest(t) for name, t in sorted(tint.decode(prefixes).items())},
    }, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
