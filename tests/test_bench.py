"""`tintc bench` smoke test: a tiny gpt2, one short length, one run (benchmarks are not tests)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from tintc.cli import app
from tests.models import TINY


def _config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps({"model": {"family": "gpt2", "config": TINY["gpt2"]},
                                "tint": {"prefixes": 8, "max_length": 32}, "output": "out"}))
    return path


def test_bench_measures_the_tint_and_the_direct_evaluation(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the measuring processes inherit it: no thread start-up on 2 cores
    result = CliRunner().invoke(app, ["bench", str(_config(tmp_path)), "--lengths", "16,64", "--repeats", "1"])
    assert result.exit_code == 0, result.output
    assert "skipped T=64: above the TinT's max_length 32" in result.output
    out = tmp_path / "out"
    bench = json.loads((out / "bench.json").read_text())
    assert bench["compile"]["compile_seconds"] > 0 and bench["compile"]["peak_mib"] > 0
    assert [row["length"] for row in bench["runs"]] == [16]
    row = bench["runs"][0]
    for part in ("tint", "direct"):
        assert row[part]["runs"] == 1 and row[part]["seconds"] > 0
        assert row[part]["peak_mib"] >= row[part]["base_mib"] > 0
    assert row["time_ratio"] == row["tint"]["seconds"] / row["direct"]["seconds"]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "tint_model.py").exists()  # the TinT runs were of the emitted package
    cost = bench["exactness"]  # each rule set compiled and timed at T=256, capped at the max length 32
    assert cost["length"] == 32 and cost["repeats"] == 1
    assert [row["name"] for row in cost["rows"]] == ["paper rules", "attention exact", "layer_norm exact",
                                                      "activation exact", "all exact"]
    assert all(row["forward_seconds"] > 0 and row["calls"] > 0 for row in cost["rows"])
    assert "Cost of exactness" in result.output


def test_bench_refuses_bad_lengths(tmp_path):
    result = CliRunner().invoke(app, ["bench", str(_config(tmp_path)), "--lengths", "16,x"])
    assert result.exit_code == 2
    assert "--lengths: got '16,x'; allowed: comma-separated integers >= 2" in result.output


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
