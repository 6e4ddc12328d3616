"""tint.passes.shared_rows: the standard view places the prefix rows on token coordinates
(backends/torch/allocate.py), narrower, and stays the fast executor's function on the micro models of
every family; without the gates that keep the shared coordinates apart it does not."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from backends.torch import allocate, standard_plan
from backends.torch.calls import coordinates
from tintc import pipeline
from tintc.oracle.fidelity import example_input
from tintc.oracle.reference import TrainSettings, approx_gd
from tests.helpers import EXACT_RULES, rel_err
from tests.models import MICRO, tiny_config, tiny_model
from tests.test_standard import VIEWS, expected_ops, op_histogram
from tests.test_tint import KINDS

ON = {"shared_rows": {"enabled": True}}
# (family, rules): the exact rules bring the norms, Gates and sigmoid MLPs that must stay apart
CASES = {"opt-exact": ("opt", EXACT_RULES), "gpt2-paper": ("gpt2", {}), "llama-exact": ("llama", EXACT_RULES),
         "gpt_neox-paper": ("gpt_neox", {}), "gemma2-exact": ("gemma2", EXACT_RULES)}


def _compile(family: str, rules: dict, passes: dict | None = None):
    kinds = (["attn_q", "attn_k"] if rules else []) + KINDS.get(family, KINDS["llama"])
    cfg = tiny_config(family, table=MICRO, dtype="float64", prefixes=4, max_length=8, kinds=kinds,
                      approximations=rules, passes=passes or {})
    model = tiny_model(family, dtype=torch.float64, table=MICRO)
    return cfg, model, pipeline.compile_tint(cfg, model)


def _view_against_fast(compiled, model) -> tuple[float, float, dict]:
    """(logits error, worst new-prefix error) of the standard view against the fast executor, and
    the fast executor's logits and prefixes."""
    ids, train, _ = example_input(model.config.vocab_size, 8, 2, seed=1)
    params = {n: p.detach() for n, p in model.named_parameters()}
    prefixes = compiled.tint.encode(params)
    with torch.no_grad():
        fast, fast_prefixes = compiled.tint(ids, train, prefixes)
        logits, view_prefixes = compiled.tint.standard()(ids, train, prefixes)
    blocks = compiled.tint.program.layout.blocks
    worst = max(rel_err(view_prefixes[b], fast_prefixes[b]) for b in blocks)
    return rel_err(logits, fast), worst, {"logits": fast, "params": params, "ids": ids, "train": train}


@pytest.mark.parametrize("case", CASES)
def test_shared_rows_narrow_the_view_and_keep_it_the_fast_executor(case):
    family, rules = CASES[case]
    cfg, model, compiled = _compile(family, rules, ON)
    _, _, off = _compile(family, rules)
    program = compiled.tint.program
    assert program.rows_at is not None and off.tint.program.rows_at is None
    view = compiled.tint.standard()
    assert view.plan.d_sim < off.tint.standard().plan.d_sim  # narrower
    assert view.plan.row_start < program.width  # the rows lie on token coordinates
    # an erase unit σ(one)·(−h) in an MLP whose σ(0) ≠ 0 would take σ(0)·row off a prefix position's row
    erased = [c for b in view.plan.blocks if not standard_plan.vanishes_at_zero(b.act)
              for u in b.units if u.b and u.b[0] == "negate" for c in coordinates(u.b[1])]
    assert all(c < view.plan.row_start for c in erased)
    logits_error, prefix_error, run = _view_against_fast(compiled, model)
    assert logits_error <= 1e-10 and prefix_error <= 1e-10
    with torch.no_grad():  # the fast executor computes the same either way
        off_logits, _ = off.tint(run["ids"], run["train"], off.tint.encode(run["params"]))
    assert rel_err(run["logits"], off_logits) <= 1e-12
    oracle = approx_gd(compiled.graph, run["params"], run["ids"], run["train"], TrainSettings.from_config(cfg, 2))
    assert rel_err(oracle.logits, oracle.logits_before) > 1e-3  # the steps changed the model
    assert rel_err(run["logits"], oracle.logits) <= 1e-9


def test_without_the_gates_the_shared_view_is_wrong(monkeypatch):
    """Sharing every value's coordinates with the rows (no value kept apart but the constant one): norms
    and Gate products read the rows at prefix positions and write into them."""
    real = allocate.unshareable
    monkeypatch.setattr(allocate, "unshareable", lambda program, owner: {owner(program.inputs["one"])})
    _, model, compiled = _compile("llama", EXACT_RULES, ON)
    logits_error, prefix_error, _ = _view_against_fast(compiled, model)
    assert max(logits_error, prefix_error) > 1e-3
    monkeypatch.setattr(allocate, "unshareable", real)


def test_the_shared_view_exports_as_blocks_and_counts_as_built():
    from tintc.report.dense_count import dense_counts

    _, model, compiled = _compile("gpt2", {}, ON)
    view = compiled.tint.standard()
    ids, train, _ = example_input(model.config.vocab_size, 6, 1, seed=1)
    h0 = view.embed(ids, train, compiled.tint.encode({n: p.detach() for n, p in model.named_parameters()}))
    histogram = op_histogram(view, 6, h0)
    assert Counter({op: n for op, n in histogram.items() if op not in VIEWS}) == expected_ops(view)
    counts = dense_counts(compiled.tint.program, compiled.tint.layers)
    assert counts["shared_rows"] and counts["ours"]["d_sim"] == view.plan.d_sim == h0.shape[-1]
    assert counts["ours"]["dense"]["total"] == sum(p.numel() for p in view.parameters())
    ref = counts["reference_convention"]
    assert ref["d_sim"] == max(ref["working_set"], ref["working_set_apart"] + ref["prefix_rows"])
    assert ref["working_set_apart"] < ref["working_set"]


def test_the_emitted_package_builds_the_shared_view(tmp_path):
    """tint_config.json carries rows_at: the package's own standard view places the rows there too."""
    import json

    from backends.torch.emit import import_package
    from tintc.pipeline import emit

    cfg, model, compiled = _compile("opt", {}, ON)
    emit(compiled, cfg, tmp_path)
    assert json.loads((tmp_path / "tint_config.json").read_text())["rows_at"] == compiled.tint.program.rows_at
    ids, train, _ = example_input(model.config.vocab_size, 8, 1, seed=2)
    prefixes = compiled.tint.encode({n: p.detach() for n, p in model.named_parameters()})
    with torch.no_grad():
        expected, _ = compiled.tint(ids, train, prefixes)
        logits, _ = import_package(tmp_path).standard(tmp_path)(ids, train, prefixes)
    assert rel_err(logits, expected) <= 1e-10
