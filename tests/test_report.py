"""The parameter report (DESIGN §2.3): honest dense counts, nonzeros, breakdowns that sum, the files."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from tintc import pipeline
from tintc.report import counts as R
from tintc.report import render as V
from tintc.report.reference_counts import like_with_like
from tests.models import TINY, tiny_config, tiny_model
from tests.test_reference_counts import CONFIGS as REFERENCE_CONFIGS  # GPT-2, OPT-125M


def _compile(family, **overrides):
    return pipeline.compile_tint(tiny_config(family), tiny_model(family, **overrides))


@pytest.fixture(scope="module", params=["gpt2", "opt"])
def compiled(request):
    return _compile(request.param)


@pytest.fixture(scope="module")
def report(compiled):
    return R.parameter_report(compiled)


def _module_numel(module) -> int:
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())


def test_unique_is_everything_the_module_stores(compiled, report):
    tint = compiled.tint
    stored = list(tint.parameters()) + list(tint.buffers())
    assert report["counts"]["unique"]["dense"] == sum(t.numel() for t in stored)
    assert report["counts"]["unique"]["nonzero"] == sum(int(torch.count_nonzero(t)) for t in stored)
    assert report["counts"]["unique"]["bytes"] == sum(t.numel() * t.element_size() for t in stored)
    assert report["tint"]["primitives"] == len(tint.layers)


def test_unrolled_counts_each_call_in_full(compiled, report):
    tint = compiled.tint
    calls = tint.program.calls
    expected = sum(_module_numel(tint.layers[call.layer]) for call in calls)
    assert report["counts"]["unrolled"]["dense"] == expected
    assert report["tint"]["calls"] == len(calls)
    assert report["tint"]["width"] == tint.program.width
    assert report["tint"]["max_length"] == tint.program.max_length
    # block sharing: some primitive serves several calls, so the unrolled TinT is larger
    assert expected > report["counts"]["unique"]["dense"]
    nonzero = sum(int(torch.count_nonzero(t)) for call in calls
                  for t in [*tint.layers[call.layer].parameters(), *tint.layers[call.layer].buffers()])
    assert report["counts"]["unrolled"]["nonzero"] == nonzero


def test_unrolled_breakdowns_by_layer_and_op_and_phase(compiled, report):
    tint, tg = compiled.tint, compiled.train_graph
    by_layer, by_op, by_phase = {}, {}, {}
    for call in tint.program.calls:
        n = _module_numel(tint.layers[call.layer])
        layer = tg.node(call.node).attrs["layer"]
        key = "outside layers" if layer < 0 else f"layer {layer}"
        for d, k in ((by_layer, key), (by_op, call.op), (by_phase, call.phase)):
            d[k] = d.get(k, 0) + n
    b = report["breakdown"]["unrolled"]
    assert {k: v["dense"] for k, v in b["by_layer"].items()} == by_layer
    assert {k: v["dense"] for k, v in b["by_op"].items()} == by_op
    assert {k: v["dense"] for k, v in b["by_phase"].items()} == by_phase
    assert set(b["by_layer"]) == {"outside layers"} | {f"layer {i}" for i in range(compiled.graph.attrs["n_layer"])}
    assert set(b["by_phase"]) == {"forward", "backward", "descent", "eval"}


def _sums(breakdown: dict, total: dict, keys=("dense", "nonzero")):
    for key in keys:
        assert sum(v[key] for v in breakdown.values()) == total[key], key


def test_every_breakdown_sums_to_its_total(report):
    unrolled, unique = report["counts"]["unrolled"], report["counts"]["unique"]
    b = report["breakdown"]["unrolled"]
    for name in ("by_layer", "by_op", "by_phase"):
        _sums(b[name], unrolled, ("dense", "nonzero", "bytes"))
        assert sum(v["calls"] for v in b[name].values()) == report["tint"]["calls"]
    for outer, inner in (("by_phase_op", "by_phase"), ("by_layer_phase", "by_layer")):
        for key, parts in b[outer].items():
            _sums(parts, b[inner][key], ("dense", "nonzero", "calls"))
    for name in ("by_op", "by_phase"):
        _sums(report["breakdown"]["unique"][name], unique, ("dense", "nonzero", "bytes"))
    assert sum(p["unrolled"] for p in report["primitives"]) == unrolled["dense"]
    assert sum(p["dense"] for p in report["primitives"]) == unique["dense"]
    prefix_layers = report["breakdown"]["prefixes_by_layer"]
    assert sum(v["numel"] for v in prefix_layers.values()) == report["prefixes"]["numel"]
    assert sum(v["tokens"] for v in prefix_layers.values()) == report["prefixes"]["tokens"]


def test_nonzeros_never_exceed_dense(report):
    def walk(x):
        if isinstance(x, dict):
            if "dense" in x and "nonzero" in x:
                assert 0 <= x["nonzero"] <= x["dense"]
                yield 1
            for v in x.values():
                yield from walk(v)
        elif isinstance(x, list):
            for v in x:
                yield from walk(v)
    assert sum(walk(report)) > 20
    # the constructions are sparse: most stored entries are zero
    assert report["counts"]["unique"]["nonzero"] < report["counts"]["unique"]["dense"]


def test_aux_model_embedding_tables_and_prefixes(compiled, report):
    model = compiled.model
    assert report["aux_parameters"] == sum(p.numel() for p in model.parameters())  # tied weights once
    vocab = model.get_input_embeddings().weight.numel()
    positions = (model.transformer.wpe if report["family"] == "gpt2" else model.model.decoder.embed_positions)
    tables = report["embedding_tables"]
    assert tables == {"vocab": vocab, "positions": positions.weight.numel(), "total": vocab + positions.weight.numel()}
    plus = report["tint_plus_embedding_tables"]
    assert plus["unrolled"] == report["counts"]["unrolled"]["dense"] + tables["total"]
    assert plus["unique"] == report["counts"]["unique"]["dense"] + tables["total"]
    params = {n: p.detach() for n, p in model.named_parameters()}
    encoded = compiled.tint.encode(params)
    blocks = [t for name, t in encoded.items() if name not in ("vocab", "positions", "unembed", "tint_layout")]
    assert report["prefixes"]["blocks"] == len(blocks)
    assert report["prefixes"]["tokens"] == sum(t.shape[0] for t in blocks)
    assert report["prefixes"]["numel"] == sum(t.numel() for t in blocks)
    assert report["prefixes"]["encoder_output_numel"] == sum(t.numel() for t in encoded.values())
    assert report["reference"] is None  # tiny shapes: no reference figures


def test_untied_gpt2_counts_the_unembedding_too():
    compiled = _compile("gpt2", tie_word_embeddings=False)
    model = compiled.model
    report = R.parameter_report(compiled)
    tables = report["embedding_tables"]
    vocab, positions = model.transformer.wte.weight.numel(), model.transformer.wpe.weight.numel()
    assert tables["unembed"] == model.lm_head.weight.numel()
    assert tables["total"] == vocab + positions + model.lm_head.weight.numel()
    assert report["aux_parameters"] == sum(p.numel() for p in model.parameters())
    assert report["settings"]["tied_embeddings"] is False
    assert "aux embedding table: unembed" in V.to_markdown(report)


def test_tensors_stored_outside_the_primitives_are_counted_once():
    compiled = _compile("gpt2")
    compiled.tint.register_buffer("extra", torch.tensor([0.0, 1.0, 2.0]))
    report = R.parameter_report(compiled)
    base = R.parameter_report(_compile("gpt2"))
    for kind in ("unique", "unrolled"):
        assert report["counts"][kind]["dense"] == base["counts"][kind]["dense"] + 3
        assert report["counts"][kind]["nonzero"] == base["counts"][kind]["nonzero"] + 2
    assert report["counts"]["stored_outside_calls"]["dense"] == 3
    for name in ("by_layer", "by_op", "by_phase"):
        _sums(report["breakdown"]["unrolled"][name], report["counts"]["unrolled"])
    assert "stored outside the calls" in V.to_markdown(report)


def test_files_are_written_and_the_json_round_trips(report, tmp_path):
    paths = V.write_report(report, tmp_path / "out")
    assert [p.rsplit("/", 1)[1] for p in paths] == ["report.json", "report.md", "report.png"]
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.startswith("# Parameter report")
    assert f"{report['counts']['unrolled']['dense']:,}" in md and f"{report['counts']['unique']['dense']:,}" in md
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "out").glob("*.tmp*"))


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_reference_figures_shown_for_the_reference_shapes(family, report):
    full = json.loads(json.dumps(report))
    full["family"] = family
    full["aux"].update(d_model=768, n_layer=12)
    full["settings"].update(prefixes=256, steps=1, trained_layers=list(range(12)))
    full["breakdown"]["unrolled"]["by_layer_phase"].update(
        {f"layer {i}": full["breakdown"]["unrolled"]["by_layer_phase"]["layer 0"] for i in range(12)})
    full["reference"] = R._reference(full)
    assert full["reference"]["settings_match"]
    full["reference_counts"] = like_with_like(full, REFERENCE_CONFIGS[family])
    md = V.to_markdown(full).splitlines()
    figures = {"gpt2": ("1,476,796,914", "1,266,757,362", "13,088,046,834"),
               "opt": ("1,669,324,018", "1,458,484,978", "13,279,774,450")}[family]
    total, stored, dense = figures
    for figure, beside in ((stored, "| (1) as stored"), (dense, "| (2) dense over D_sim, activations outside")):
        rows = [line for line in md if figure in line]
        assert len(rows) == 1 and rows[0].startswith(beside)  # beside our count made like it, nowhere else
    rows = [line for line in md if total in line]  # the reference's own total mixes conventions: no ratio
    assert len(rows) == 1 and rows[0].startswith("| reference: as its code prints it") and rows[0].endswith("|  |")
    full["aux"]["n_layer"] = 6
    assert R._reference(full) is None


def test_report_command(tmp_path):
    """`tintc report` writes the report of the config's compile, the same as made here, and says where."""
    from tintc.cli import app
    from tintc.config import load_config

    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps({"model": {"family": "gpt2", "config": TINY["gpt2"]},
                                  "tint": {"prefixes": 8, "max_length": 16}, "output": "out"}))
    result = CliRunner().invoke(app, ["report", str(config)])
    assert result.exit_code == 0, result.output
    expected = R.parameter_report(pipeline.compile_tint(load_config(config)))
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written == json.loads(json.dumps(expected))
    assert written["name"] == "tiny" and written["tint"]["max_length"] == 16
    output = "".join(result.output.split())  # rich wraps long lines
    for name in ("report.json", "report.md", "report.png"):
        assert f"wrote{tmp_path / 'out' / name}" in output
    assert (tmp_path / "out" / "report.md").read_text() == V.to_markdown(expected)


def test_the_settings_name_the_passes_that_differ_from_the_defaults(report):
    assert report["settings"]["passes_changed"] == []
    assert "passes: the defaults" in V.to_markdown(report)
    cfg = tiny_config("gpt2", passes={"rematerialise": {"enabled": True}, "head_splitting": {"width": 16}})
    changed = R.parameter_report(pipeline.compile_tint(cfg, tiny_model("gpt2")))["settings"]
    assert changed["passes"]["rematerialise"] == {"enabled": True}
    assert changed["passes_changed"] == ["head_splitting.width = 16", "rematerialise.enabled = true"]
