"""The cost of exactness (tintc/report/exactness.py): every row is what a direct compile under its rules gives,
each exact rule costs more than the paper's approximation, and `tintc report --exactness` shows it."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from backends.torch.tint import TinT
from tintc import pipeline
from tintc.report.exactness import VARIANTS, cost_of_exactness
from tintc.report.counts import parameter_report
from tintc.report.render import exactness_table
from tests.models import MICRO, TINY, tiny_config, tiny_model

LLAMA_KINDS = ["attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down", "norm_gain"]
NAMES = ["paper rules", "attention exact", "layer_norm exact", "activation exact", "all exact"]
APPROXIMATE = {"attention": "stop_gradient", "layer_norm": "finite_difference", "activation": "finite_difference"}


def test_each_row_is_a_direct_compile_and_each_exact_rule_costs_more():
    cfg = tiny_config("llama", table=MICRO, prefixes=4, max_length=8, kinds=LLAMA_KINDS,
                      approximations={"attention": "exact"})
    model = tiny_model("llama", table=MICRO)
    result = cost_of_exactness(cfg, model)
    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows) == NAMES and result["length"] is None
    # like with like: the parameter report of a compile made from a config written with the row's rules
    for name, exact in VARIANTS:
        row = rows[name]
        assert row["rules"] == {**APPROXIMATE, **exact}
        assert row["kinds"] == (LLAMA_KINDS if row["rules"]["attention"] == "exact" else LLAMA_KINDS[2:])
        direct = parameter_report(pipeline.compile_tint(
            tiny_config("llama", table=MICRO, prefixes=4, max_length=8, kinds=row["kinds"],
                        approximations=row["rules"]), model))
        assert row["unique"] == direct["counts"]["unique"]["dense"], name
        assert row["unrolled"] == direct["counts"]["unrolled"]["dense"], name
        assert row["standard_view_dense"] == direct["standard_view"]["ours"]["dense"]["total"], name
        assert row["blocks"] == direct["standard_view"]["blocks"], name
        assert row["calls"] == direct["tint"]["calls"], name
    paper, everything = rows["paper rules"], rows["all exact"]
    for name in NAMES[1:4]:  # exact attention and activation add calls, blocks and the dense count; all
        for key in ("standard_view_dense", "calls", "blocks"):  # exact rules the most
            if name != "layer_norm exact":  # means, copies and one norm: as many calls as the difference, less dense
                assert paper[key] < rows[name][key], (name, key)
            assert rows[name][key] <= everything[key], (name, key)
    # (stored numbers are not ordered: they depend on how many projections are stored as diagonals or
    # selections, backends/torch/structured.py; an exact rule may store fewer than its approximation: on
    # this micro LLaMA every rule exact stores fewer than the paper's rules)
    title, columns, table = exactness_table(result)
    assert title.startswith("Cost of exactness") and "forward" not in " ".join(columns)
    assert table[1][:2] == ["attention exact", "config's"] and table[0][1] == "without attn_q, attn_k"
    assert table[4][5] == f"{everything['calls']:,} ({everything['calls'] / paper['calls']:.2f}×)"


def test_a_rule_without_a_construction_is_a_row_with_its_error_and_times_are_capped_at_the_max_length(monkeypatch):
    from backends.torch import lower_backward

    monkeypatch.delitem(lower_backward.EXACT_DERIVATIVES, "gelu")  # as if erf GELU had no exact construction
    table = {"gpt2": {**TINY["gpt2"], "activation_function": "gelu"}}
    cfg = tiny_config("gpt2", table=table, max_length=16)
    forwards = []  # the input shape of each TinT forward, and the TinT
    real_forward = TinT.forward
    monkeypatch.setattr(TinT, "forward", lambda self, ids, *a: forwards.append((tuple(ids.shape), self))
                        or real_forward(self, ids, *a))
    result = cost_of_exactness(cfg, tiny_model("gpt2", table=table), length=256, repeats=1)
    rows = {row["name"]: row for row in result["rows"]}
    assert "activation backward rule 'exact' for gelu has no TinT construction" in rows["activation exact"]["error"]
    assert "error" in rows["all exact"] and "error" not in rows["layer_norm exact"]
    assert result["length"] == 16 and result["repeats"] == 1  # the TinT's max length, not 256
    # each row that compiled: its own TinT, one warm-up and one timed forward on [1, 16] ids
    timed = [row for row in result["rows"] if "error" not in row]
    assert [shape for shape, _ in forwards] == [(1, 16)] * 2 * len(timed) and len(timed) == 3
    assert len({id(tint) for _, tint in forwards}) == len(timed)
    rendered = exactness_table(result)
    assert rendered[1][-1] == "forward s, T=16"
    assert rendered[2][3][2].startswith("no TinT: ")


def test_report_command_with_exactness(tmp_path):
    from tintc.cli import app

    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps({"model": {"family": "gpt2", "config": TINY["gpt2"]},
                                  "tint": {"prefixes": 8, "max_length": 16, "approximations": "paper"},
                                  "output": "out"}))
    result = CliRunner().invoke(app, ["report", str(config), "--exactness"])
    assert result.exit_code == 0, result.output
    assert "Cost of exactness" in result.output
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = written["exactness"]["rows"]
    assert [row["name"] for row in rows] == NAMES
    assert rows[0]["calls"] == written["tint"]["calls"]  # the config's rules are the paper's: the same TinT
    assert rows[0]["unique"] == written["counts"]["unique"]["dense"]
    assert "## Cost of exactness" in (tmp_path / "out" / "report.md").read_text()
