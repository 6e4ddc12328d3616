"""The emitted package: it runs with torch and safetensors alone, matches the oracle and the
in-memory TinT bit for bit, runs under torch.compile, and is the same bytes for the same config."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file

from backends.torch import runtime
from backends.torch.checks import FINGERPRINT
from backends.torch.emit import import_package
from tintc.files import MANIFEST, write_files
from tintc import pipeline
from tintc.pipeline import emit
from tintc.oracle.fidelity import example_input
from tests.helpers import check_round, compile_tiny, params_of, rel_err, run_round
from tests.models import tiny_model

PACKAGE = {"tint_model.py", "weights.safetensors", "tint_config.json"}
OUTPUTS = {"traced.ir", "train.ir", "report.json", "report.md", "report.png", "timings.json"}  # beside the package


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """tiny gpt2 in float64, compiled and saved by the pipeline (the package and the IR dumps)."""
    cfg, model, compiled = compile_tiny("gpt2")
    out = tmp_path_factory.mktemp("gpt2-package")
    cfg = cfg.model_copy(update={"output": str(out)})
    paths = pipeline.save(compiled, cfg)
    return cfg, model, compiled, out, paths


def test_compile_writes_the_package_and_the_ir_dumps(gpt2):
    cfg, model, compiled, out, paths = gpt2
    assert {Path(p).name for p in paths} == PACKAGE | OUTPUTS
    assert {p.name for p in out.iterdir()} == PACKAGE | OUTPUTS | {MANIFEST}  # no temporary file left
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.new-")]
    state = compiled.tint.state_dict()
    with safetensors.safe_open(out / "weights.safetensors", "pt") as stored:
        assert set(stored.keys()) == set(state)
        assert all(torch.equal(stored.get_tensor(k), state[k]) for k in state)
    source = (out / "tint_model.py").read_text()
    config = (out / "tint_config.json").read_text()
    for text in (source, config):
        assert str(out) not in text and str(Path.cwd()) not in text  # paths are relative to the package
    assert not re.search(r"^\s*(from|import) (tintc|ir|backends|transformers|pickle)\b", source, re.M)
    assert "torch.load" not in source
    program = compiled.tint.program
    used = {type(m).__name__ for m in program.layers.values()}
    classes = set(re.findall(r"^class (\w+)\(nn\.Module\)", source, re.M))  # the runtime's, and the TinT
    view = {"AttentionBlock", "MLPBlock", "NormBlock", "Stack", "StandardTinT"}  # backends/torch/standard.py
    assert used <= classes == {c.__name__ for c in runtime.PRIMITIVES} | {"Diagonal", "DiagonalBlocks", "LowRank", "Selection", "TinT"} | view
    comments = re.findall(r"^        # %(\S+): (\w+), (\w+)$", source, re.M)
    assert comments == [(c.node, c.op, c.phase) for c in program.calls]
    assert json.loads(config)["layout"]["blocks"]["h0.q"]["refs"]["weight"] == {
        "name": "transformer.h.0.attn.c_attn.weight", "transpose": True, "rows": [0, 32]}


# The child sees the package and torch's (and safetensors') site-packages only: -I drops the
# environment and the user site, -S the site hook that would run the editable install's finder.
# A regular install would put tintc in site-packages itself, so the repository's packages are
# blocked too: the package must run without them.
CHILD = """
import importlib.abc, json, sys
sys.path[:0] = {paths!r}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tintc", "ir", "backends", "tests", "transformers"):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, Block())
try:
    import tintc
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("tintc is importable in the child")
import torch
from safetensors.torch import load_file, save_file
import tint_model

tint = tint_model.load()
case = load_file("case.safetensors")
theta = {{k.removeprefix("theta."): v for k, v in case.items() if k.startswith("theta.")}}
with torch.no_grad():
    logits, prefixes = tint(case["input_ids"], case["train_mask"], tint.encode(theta))
decoded = tint.decode(prefixes)
save_file({{"logits": logits, **{{"theta." + k: v.contiguous() for k, v in decoded.items()}}}}, "result.safetensors")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("tintc", "ir", "backends", "transformers"))))
"""


def test_the_package_runs_alone_and_matches_the_oracle(gpt2, tmp_path):
    cfg, model, compiled, out, _ = gpt2
    r = run_round(cfg, model, compiled)
    save_file({"input_ids": r.ids, "train_mask": r.train, **{"theta." + k: v for k, v in r.params.items()}},
              str(tmp_path / "case.safetensors"))
    sites = sorted({str(Path(m.__file__).parents[1]) for m in (torch, safetensors)})
    code = textwrap.dedent(CHILD.format(paths=[str(out), *sites]))
    done = subprocess.run([sys.executable, "-I", "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    result = load_file(str(tmp_path / "result.safetensors"))
    assert result["logits"].dtype == torch.float64
    package = {k.removeprefix("theta."): v for k, v in result.items() if k.startswith("theta.")}
    check_round(replace(r, logits=result["logits"], decoded=package), 1e-9)  # checked as the in-memory TinT is


@pytest.mark.parametrize("family,dtype,model_overrides,tint", [
    ("gpt2", "float64", {}, {}),
    ("opt", "float32", {"tie_word_embeddings": False}, {"loss": "label_only", "steps": 2}),
    ("gemma2", "float64", {}, {}),  # the output head's soft-cap, tint_config.json's "logit_softcap"
    ("llama", "bfloat16", {}, {"approximations": "exact"}),  # stored in bfloat16, encode() casts θ to it
])
def test_the_emitted_module_equals_the_in_memory_tint_bit_for_bit(tmp_path, family, dtype, model_overrides, tint):
    cfg, model, compiled = compile_tiny(family, dtype, overrides=model_overrides, **tint)
    emit(compiled, cfg, tmp_path)
    emitted, in_memory = import_package(tmp_path).load(tmp_path), compiled.tint
    # two checkpoints, one per sequence, and labels: the batched paths of both modules
    other = params_of(tiny_model(family, dtype=cfg.torch_dtype, seed=1, **model_overrides))
    prefixes = {k: torch.stack([a, b]) for (k, a), b in zip(in_memory.encode(params_of(model)).items(),
                                                            in_memory.encode(other).values())}
    assert all(torch.equal(a, b) for a, b in zip(emitted.encode(other).values(), in_memory.encode(other).values()))
    ids, train, labels = example_input(model.config.vocab_size, 16, 2, seed=1)
    labels = labels if tint.get("loss") == "label_only" else None  # a context TinT refuses a label mask
    with torch.no_grad():
        logits, new = emitted(ids, train, prefixes, labels)
        logits_ref, new_ref = in_memory(ids, train, prefixes, labels)
    assert logits.dtype == cfg.tint_dtype == next(iter(new.values())).dtype
    assert torch.equal(logits, logits_ref)
    assert new.keys() == new_ref.keys()
    assert all(torch.equal(new[k], new_ref[k]) for k in new_ref)
    decoded, decoded_ref = emitted.decode(new), in_memory.decode(new_ref)
    assert decoded.keys() == decoded_ref.keys() and all(torch.equal(decoded[k], decoded_ref[k]) for k in decoded)


def test_the_same_config_gives_a_byte_identical_package(tmp_path):
    for run in ("a", "b"):
        cfg, _, compiled = compile_tiny("gpt2")
        emit(compiled, cfg, tmp_path / run)
    for name in PACKAGE:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_torch_compile_runs_the_emitted_module(tmp_path):
    # one layer keeps dynamo's tracing short
    cfg, model, compiled = compile_tiny("gpt2", overrides={"n_layer": 1})
    emit(compiled, cfg, tmp_path)
    tint = import_package(tmp_path).load(tmp_path)
    ids, train, _ = example_input(model.config.vocab_size, 16, 1, seed=1)
    prefixes = tint.encode(params_of(model))
    with torch.no_grad():
        logits_ref, new_ref = tint(ids, train, prefixes)
        logits, new = torch.compile(tint, backend="aot_eager", fullgraph=True)(ids, train, prefixes)
    assert rel_err(logits, logits_ref) <= 1e-12
    assert new.keys() == new_ref.keys() and new[FINGERPRINT].shape == new_ref[FINGERPRINT].shape
    assert all(rel_err(new[k], new_ref[k]) <= 1e-12 for k in new_ref if k != FINGERPRINT)


def test_a_failed_write_leaves_what_was_there(tmp_path):
    write_files(tmp_path, {"tint_model.py": "old"})

    def fail(path):
        path.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_files(tmp_path, {"tint_model.py": "new", "weights.safetensors": fail})
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST, "tint_model.py"]
    assert not [p for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}.new-")]
    assert (tmp_path / "tint_model.py").read_text() == "old"
