"""`tintc bench` on a tiny gpt2, one short length, one run: what it counts equals a compile made here,
and each measurement is a warm-up then the median of its runs, counted on a fake clock (benchmarks
are not tests: no time is asserted)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from tintc import bench, pipeline
from tintc.cli import app
from tintc.config import load_config
from tests.models import TINY


def _config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps({"model": {"family": "gpt2", "config": TINY["gpt2"]},
                                "tint": {"prefixes": 8, "max_length": 32, "approximations": "paper"},
                                "output": "out"}))
    return path


def test_bench_measures_the_tint_and_the_direct_evaluation(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the measuring processes inherit it: no thread start-up on 2 cores
    result = CliRunner().invoke(app, ["bench", str(_config(tmp_path)), "--lengths", "16,64", "--repeats", "1",
                                      "--batch", "2"])
    assert result.exit_code == 0, result.output
    assert "skipped T=64: above the TinT's max_length 32" in result.output
    assert "(paper rules)" in result.output and "batch 2" in result.output and "tokens/s" in result.output
    out = tmp_path / "out"
    bench = json.loads((out / "bench.json").read_text())
    assert bench["rules"] == "paper" and bench["batch"] == 2
    tint = pipeline.compile_tint(load_config(tmp_path / "tiny.yaml")).tint  # what the child compiled
    program, compiled = tint.program, bench["compile"]
    assert (compiled["width"], compiled["calls"], compiled["primitives"], compiled["max_length"]) == (
        program.width, len(program.calls), len(program.layers), program.max_length)
    assert compiled["parameters"] == sum(p.numel() for p in tint.parameters())
    assert [row["length"] for row in bench["runs"]] == [16]
    row = bench["runs"][0]
    for part in ("tint", "direct"):
        assert row[part]["runs"] == 1
        # the resident size before the runs, the first run's peak, all runs' peak: the kernel folds each
        # thread's RSS changes into the figures it reports lazily (up to 64 pages a thread; measured 0.03 MiB
        # apart), so each may read those pages below the one before it
        slack = 64 * torch.get_num_threads() * 4096 / 2**20
        assert row[part]["peak_repeated_mib"] >= row[part]["peak_mib"] - slack
        assert row[part]["peak_mib"] >= row[part]["base_mib"] - slack > 0
    assert row["time_ratio"] == row["tint"]["seconds"] / row["direct"]["seconds"]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "tint_model.py").exists()  # the TinT runs were of the emitted package
    cost = bench["exactness"]  # each rule set compiled and timed at T=256, capped at the max length 32
    assert cost["length"] == 32 and cost["repeats"] == 1
    assert [row["name"] for row in cost["rows"]] == ["paper rules", "attention exact", "layer_norm exact",
                                                      "activation exact", "all exact"]
    assert cost["rows"][0]["calls"] == len(program.calls)  # the config's rules are the paper's
    assert all(row["calls"] > cost["rows"][0]["calls"] for row in cost["rows"][1:])  # each exact rule adds calls
    assert "Cost of exactness" in result.output


def test_the_tints_predicted_peak_is_for_the_batch_it_runs(tmp_path, monkeypatch):
    from tintc import memory

    seen = []

    def record(shape, length, batch=1, holds_package=True):
        seen.append((length, batch, holds_package))
        raise RuntimeError("recorded")  # stop before the package is loaded

    monkeypatch.setattr(memory, "run_prediction", record)
    (tmp_path / "run.json").write_text(json.dumps({"shape": {}}))
    with pytest.raises(RuntimeError, match="recorded"):
        bench.measure_tint(tmp_path, 64, 1, batch=4)
    assert seen == [(64, 4, False)]


def test_bench_refuses_bad_lengths(tmp_path):
    result = CliRunner().invoke(app, ["bench", str(_config(tmp_path)), "--lengths", "16,x"])
    assert result.exit_code == 2
    assert "--lengths: got '16,x'; allowed: comma-separated numbers" in result.output


def test_bench_keeps_a_foreign_report_unless_forced(tmp_path, monkeypatch):
    """bench writes the package and report under `output` as compile does: a file tintc did not write is
    refused by name, and `--force` reaches the compile step too."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.md").write_text("my notes\n")
    args = ["bench", str(_config(tmp_path)), "--lengths", "16", "--repeats", "1", "--no-exactness"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "report.md" in refused.output and "--force" in refused.output
    assert (tmp_path / "out" / "report.md").read_text() == "my notes\n"
    forced = CliRunner().invoke(app, args + ["--force"])
    assert forced.exit_code == 0, forced.output
    assert (tmp_path / "out" / "report.md").read_text() != "my notes\n"


def _fake_clock(monkeypatch, durations):
    """time.perf_counter for tintc.bench, advanced only by the measured function: each call takes the
    next of `durations` seconds. Returns the function and the list of its calls."""
    now, calls = [0.0], []
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])

    def work():
        now[0] += durations[len(calls)]
        calls.append(now[0])

    return work, calls


@pytest.mark.parametrize("repeats,durations,runs,median", [
    (3, [5.0, 1.0, 3.0, 2.0], 3, 2.0),  # the warm-up (5 s) is not counted
    (None, [10.0, 1.0, 2.0, 3.0], 3, 2.0),  # auto: 30 s budget / 10 s warm-up = 3 runs
    (None, [0.5] + [1.0] * 5, 5, 1.0),  # auto: at most 5
    (None, [100.0, 7.0], 1, 7.0),  # auto: at least 1
])
def test_a_measurement_is_a_warm_up_then_the_median_of_its_runs(monkeypatch, repeats, durations, runs, median):
    work, calls = _fake_clock(monkeypatch, durations)
    peaks = iter([100.0, 150.0])  # the peak read after the warm-up, then after every run
    monkeypatch.setattr(bench, "_peak_mib", lambda: next(peaks))
    timed = bench._timed(work, repeats)
    assert len(calls) == 1 + runs == len(durations)
    assert timed == {"seconds": median, "runs": runs, "warmup_seconds": durations[0], "peak_mib": 100.0,
                     "peak_repeated_mib": 150.0}


def test_the_direct_measurement_is_exact_gd_without_the_forward_before(tmp_path, monkeypatch):
    from tintc.oracle import reference

    seen = []
    exact_gd = reference.exact_gd
    monkeypatch.setattr(reference, "exact_gd", lambda *a, **k: seen.append((a[2].shape, k)) or exact_gd(*a, **k))
    (tmp_path / "run.json").write_text(json.dumps({"vocab": TINY["gpt2"]["vocab_size"], "seed": 0,
                                                   "label_only": False}))
    result = bench.measure_direct(str(_config(tmp_path)), tmp_path, length=16, repeats=2)
    assert result["runs"] == 2
    assert seen == [((1, 16), {"before": False})] * 3  # a warm-up and two runs on [1, T] ids


def test_a_bfloat16_bench_runs_no_exactness_part_and_says_why(tmp_path, monkeypatch):
    """The cost of exactness compares the exact rules with the paper's, which a bfloat16 TinT refuses: the
    part is not started, and the notes say why; the direct run is the aux model's, in float32."""
    path = tmp_path / "bf16.yaml"
    path.write_text(json.dumps({"model": {"family": "gpt2", "config": TINY["gpt2"]},
                                "tint": {"prefixes": 8, "max_length": 32, "dtype": "bfloat16"}, "output": "out"}))
    parts = []
    monkeypatch.setattr(bench, "_child", lambda args: parts.append(args[0]) or (
        {"max_length": 32} if args[0] == "compile" else {"seconds": 1.0, "peak_mib": 1.0}))
    result = bench.run(path, lengths=(16,), repeats=1)
    assert parts == ["compile", "tint", "direct"]
    assert (result["dtype"], result["direct_dtype"]) == ("bfloat16", "float32")
    assert "not measured: a bfloat16 TinT runs the exact rules only" in result["exactness"]["error"]


def test_a_failed_direct_run_keeps_the_tints_figures(tmp_path):
    """A part that fails (a 1B direct run killed for memory) is a note; the other part's figures are
    still printed and written, and bench.json is written even when no row has both parts."""
    from rich.console import Console

    tint = {"seconds": 2.0, "runs": 1, "warmup_seconds": 2.5, "peak_mib": 900.0, "predicted_peak_mib": 950.0,
            "base_mib": 400.0, "threads": 2}
    result = {"config": "big", "family": "opt", "dtype": "float32", "torch": "x", "rules": "paper", "batch": 1,
              "threads": 2, "skipped": [], "exactness": None,
              "compile": {"compile_seconds": 1.0, "emit_seconds": 1.0, "peak_mib": 500.0,
                          "predicted_peak_mib": 520.0, "width": 10, "calls": 3, "parameters": 7, "max_length": 256},
              "runs": [{"length": 256, "tint": tint, "direct": {"error": "direct process exited with code -9: "}}]}
    bench.save(result, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "bench.json").read_text())["runs"][0]["tint"] == tint
    assert (tmp_path / "out" / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    console = Console(width=200, record=True)
    console.print(bench.table(result))
    printed = console.export_text()
    assert "2" in printed and "128" in printed and "900" in printed and "950" in printed  # s, tokens/s, peaks
    assert "T=256 direct: direct process exited with code -9" in bench.notes(result)[1]
