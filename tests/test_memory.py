"""The memory model (tintc/memory.py): the predicted peak of a compile and of a TinT run against the
peak measured in a fresh process (VmHWM, a run's after its first run, through the bench's own measurement parts:
`python -m tintc.bench compile|tint`), within ±20%; and a compile from shapes that never reads the
aux weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ir.frontend
from ir.errors import ConfigError
from tintc import memory, pipeline
from tests.models import TINY, tiny_config

ROOT = Path(__file__).resolve().parent.parent
# wide enough that the terms the prediction adds (the aux model, the streams) are a good part of the peak
MID = {"gpt2": dict(TINY["gpt2"], n_embd=256, n_layer=6, n_head=4, vocab_size=8192, n_positions=256)}


def _part(*args) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "tintc.bench", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16: the output head widened on a CPU
def test_the_predicted_peaks_are_within_20_percent_of_the_measured(tmp_path, dtype):
    config = tmp_path / "mid.yaml"
    config.write_text(json.dumps({"model": {"family": "gpt2", "config": MID["gpt2"]},
                                  "tint": {"prefixes": 64, "max_length": 256, "dtype": dtype},
                                  "output": str(tmp_path / "out")}))
    compiled = _part("compile", config, tmp_path)
    assert "error" not in compiled, compiled
    assert compiled["predicted_peak_mib"] == pytest.approx(compiled["peak_mib"], rel=0.2)
    run = _part("tint", config, tmp_path, "--length", 256, "--repeats", 1)
    assert run["predicted_peak_mib"] == pytest.approx(run["peak_mib"], rel=0.2)


def test_a_compile_from_shapes_reads_no_weights_and_builds_no_whole_model(monkeypatch):
    cfg = tiny_config("gpt2", table={"gpt2": dict(TINY["gpt2"], n_layer=5)}, dtype="float64")
    built = []
    random_model = ir.frontend.random_model
    monkeypatch.setattr(ir.frontend, "random_model",
                        lambda *a, **k: built.append(k.get("layers")) or random_model(*a, **k))
    monkeypatch.setattr(ir.frontend, "load_model", lambda *a, **k: pytest.fail("a compile read the checkpoint"))
    monkeypatch.setattr(ir.frontend, "build_model", lambda *a, **k: pytest.fail("a compile built the aux model"))
    compiled = pipeline.compile_tint(cfg)
    assert built == [3] and compiled.aux_parameters == sum(p.numel() for p in ir.frontend.meta_model(
        "gpt2", pipeline.aux_config(cfg)).parameters())
    monkeypatch.undo()
    model = pipeline.load_aux_model(cfg)
    assert compiled.model is not model and compiled.model.config.n_layer == 5  # loaded at first use
    from_model = pipeline.compile_tint(cfg, model)  # the TinT traced from the model itself: the same
    assert compiled.tint.state_dict().keys() == from_model.tint.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(compiled.tint.state_dict().values(),
                                                 from_model.tint.state_dict().values()))


def test_a_run_that_would_not_fit_is_refused_naming_its_largest_term(monkeypatch):
    cfg = tiny_config("gpt2")
    compiled = pipeline.compile_tint(cfg)
    shape = memory.run_shape(compiled.tint.program)
    small = memory.run_prediction(shape, 8, holds_package=False)
    large = memory.run_prediction(shape, 32, 64, holds_package=False)
    for prediction, batch, tokens in ((small, 1, 8), (large, 64, 32 * 64)):  # the worst moment at this many tokens
        worst = max(tokens * held + batch * made for held, made in shape["moments"]) * shape["itemsize"]
        assert prediction.terms["token streams"] + prediction.terms["trained blocks' new versions"] == worst
    # more tokens weigh the stream more: the worst moment holds a stream at least as wide
    assert large.terms["token streams"] / (32 * 64) >= small.terms["token streams"] / 8
    monkeypatch.setattr(pipeline, "MEMORY_BUDGET", (small.total + large.total) // 2)  # ~50 MiB of streams apart
    with pytest.raises(ConfigError, match=r"--length, --batch: the TinT run \(T=32, batch 64\) would need about "
                                        r"[\d.]+ GiB, token streams [\d.]+ GiB the largest"):  # of the work: not the process
        pipeline.verify_on(cfg, compiled, 32, 64)


def test_a_final_logit_cap_over_a_real_vocabulary_is_refused_naming_the_cap(monkeypatch):
    """Gemma 2's capped head builds V × V identities (the softmax over the vocabulary): at a real
    vocabulary it is refused before any work, naming the config key; without the cap it fits."""
    gemma = dict(TINY["gemma2"], vocab_size=60_000)
    cfg = tiny_config("gemma2", table={"gemma2": gemma})
    monkeypatch.setattr(ir.frontend, "random_model", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ConfigError, match=r"model.config.final_logit_softcapping \(1.0\): the compile would need "
                                          r"about [\d.]+ GiB, final-logit cap's V × V identities [\d.]+ GiB the "
                                          r"largest; allowed: at most 24 GiB: .* V² \(V = 60000\)"):
        pipeline.compile_tint(cfg)
    uncapped = tiny_config("gemma2", table={"gemma2": dict(gemma, final_logit_softcapping=None)})
    prediction = memory.compile_prediction(uncapped, pipeline.aux_config(uncapped))
    assert memory.CAPPED_HEAD not in prediction.terms and prediction.total < 2 * 2**30
