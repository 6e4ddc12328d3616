"""The quick smoke test that was the README's main job: `tintc compile` and `tintc verify` of
examples/gpt2-tiny.yaml, as a user runs them (the README's main job is now SmolLM2's eval)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from tintc.cli import app

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "gpt2-tiny.yaml"


def test_the_tiny_gpt2_example_compiles_and_verifies(tmp_path):
    config = tmp_path / "gpt2-tiny.yaml"
    text = EXAMPLE.read_text()
    assert "output: ../build/gpt2-tiny" in text
    config.write_text(text.replace("output: ../build/gpt2-tiny", "output: out"))
    compiled = CliRunner().invoke(app, ["compile", str(config)])
    assert compiled.exit_code == 0, compiled.output
    assert {"tint_model.py", "weights.safetensors", "tint_config.json", "report.md"} <= {
        p.name for p in (tmp_path / "out").iterdir()}
    verified = CliRunner().invoke(app, ["verify", str(config)], env={"COLUMNS": "200"})
    assert verified.exit_code == 0, verified.output
    rows = {line.split("│")[1].strip(): float(line.split("│")[2]) for line in verified.output.splitlines()
            if line.count("│") > 3 and "e-" in line}
    assert set(rows) == {"construction: TinT vs ĝ oracle", "TinT (float32) vs ĝ in float64",
                         "the float32 floor: ĝ (float32) vs ĝ in float64", "approximation: ĝ vs exact GD"}
    assert rows["TinT (float32) vs ĝ in float64"] <= 2 * rows["the float32 floor: ĝ (float32) vs ĝ in float64"]
