"""tint.passes.split_mlp: an FFN runs as F/w sub-MLPs of width w (ir/passes/split_mlp.py). The TinT
stays ĝ's and the fast executor's function on the micro models of every MLP form (plain, gated, parallel
residual, post-norm), its prefix rows narrow to w inputs, and θ' decodes back into whole HF tensors."""

from __future__ import annotations

import pytest
import torch

from ir.errors import PassError
from ir.passes import split_mlp as split_module
from ir.text import dump, parse
from tintc import pipeline
from tintc.oracle.fidelity import example_input
from tintc.oracle.reference import TrainSettings, approx_gd
from tests.helpers import EXACT_RULES, rel_err
from tests.test_shared_rows import _compile, _view_against_fast

ON = {"split_mlp": {"enabled": True}}  # w = the hidden size (16): 4 sub-MLPs of the OPT micro's 64, 2 of 32
CASES = {"gpt2-paper": ("gpt2", {}), "opt-exact": ("opt", EXACT_RULES), "llama-exact": ("llama", EXACT_RULES),
         "gpt_neox-paper": ("gpt_neox", {}), "gemma2-exact": ("gemma2", EXACT_RULES)}


def _widest_linear_block(compiled) -> int:
    return max(b.width for b in compiled.tint.program.layout.blocks.values() if b.kind == "linear")


def _run_against_g_hat(cfg, model, compiled) -> tuple[float, float, float]:
    """(logits error against ĝ, worst updated-tensor error against ĝ, how far the steps moved the logits)."""
    _, _, run = _view_against_fast(compiled, model)
    oracle = approx_gd(compiled.graph, run["params"], run["ids"], run["train"], TrainSettings.from_config(cfg, 2))
    with torch.no_grad():
        _, prefixes = compiled.tint(run["ids"], run["train"], compiled.tint.encode(run["params"]))
    decoded = compiled.tint.decode(prefixes)
    # [B, *shape]; a key bias's gradient is 0 in exact arithmetic (softmax ignores it): ĝ's is rounding
    moved = [n for n in run["params"] if (oracle.params[n] - run["params"][n]).abs().max() > 1e-12]
    worst = max(rel_err(decoded[n] - run["params"][n], oracle.params[n] - run["params"][n]) for n in moved)
    return rel_err(run["logits"], oracle.logits), worst, rel_err(oracle.logits, oracle.logits_before)


@pytest.mark.parametrize("case", CASES)
def test_split_mlp_keeps_the_tint_g_hat_and_the_standard_view_the_fast_executor(case):
    family, rules = CASES[case]
    cfg, model, compiled = _compile(family, rules, ON)
    _, _, whole = _compile(family, rules)
    chunks = [n.name for n in compiled.train_graph.nodes() if n.kind == "linear" and ".c1" in n.name]
    assert chunks  # the pass had work to do
    assert _widest_linear_block(compiled) < _widest_linear_block(whole)  # prefix rows of w inputs, not F
    logits_error, prefix_error, _ = _view_against_fast(compiled, model)
    assert logits_error <= 1e-10 and prefix_error <= 1e-10
    logits, updates, moved = _run_against_g_hat(cfg, model, compiled)
    assert moved > 1e-3  # the steps changed the model
    assert logits <= 1e-9 and updates <= 1e-9


def test_sub_mlps_that_read_the_wrong_columns_are_caught(monkeypatch):
    """Sub-MLP c's output projection given the columns of sub-MLP c + 1: the logits go off ĝ's."""
    real = split_module._cols
    monkeypatch.setattr(split_module, "_cols", lambda ref, c, width: real(ref, (c + 1) % 4, width))
    cfg, model, compiled = _compile("gpt2", {}, ON)  # 4 sub-MLPs of 16
    _, _, run = _view_against_fast(compiled, model)
    oracle = approx_gd(compiled.graph, run["params"], run["ids"], run["train"], TrainSettings.from_config(cfg, 2))
    assert rel_err(run["logits"], oracle.logits) > 1e-3


def test_the_split_graph_round_trips_as_text_and_names_its_column_chunks():
    cfg, model, compiled = _compile("opt", {}, ON)
    graph = compiled.train_graph
    text = dump(graph)
    assert "fc2.weight[:,16:32]" in text and "fc1.weight[16:32]" in text
    assert parse(text) == graph


def test_the_sub_mlps_add_into_the_residual_one_by_one():
    """An FFN read only by a residual add: each sub-MLP's output joins the residual in turn (the add's
    name on the last sum), so no partial sum of the FFN is held beside the residual."""
    _, _, compiled = _compile("gpt2", {}, ON)
    graph = compiled.train_graph
    inputs = {n.name: list(n.inputs) for n in graph.nodes()}
    assert "h0.mlp_out@0" not in inputs
    assert inputs["h0.mlp_out.sum0@0"] == ["h0.resid_attn@0", "h0.mlp_out.c0@0"]
    assert inputs["h0.resid_mlp@0"] == ["h0.mlp_out.sum2@0", "h0.mlp_out.c3@0"]


def test_a_width_that_divides_no_ffn_is_refused_and_one_as_wide_as_the_ffn_changes_nothing():
    with pytest.raises(PassError, match=r"split_mlp\.width: got 24, which does not divide the inner width 64"):
        _compile("opt", {}, {"split_mlp": {"enabled": True, "width": 24}})
    cfg, _, compiled = _compile("opt", {}, {"split_mlp": {"enabled": True, "width": 64}})
    _, _, whole = _compile("opt", {})
    assert dump(compiled.train_graph) == dump(whole.train_graph)
    assert pipeline.summary(compiled.train_graph) == pipeline.summary(whole.train_graph)


def test_the_emitted_package_encodes_and_decodes_column_chunks(tmp_path):
    """The package's own encoder and decoder read `cols` (GPT-2's c_proj and OPT's fc2 both cut by columns)."""
    from backends.torch.emit import import_package
    from tintc.pipeline import emit

    for family in ("gpt2", "opt"):
        cfg, model, compiled = _compile(family, {}, ON)
        out = tmp_path / family
        emit(compiled, cfg, out)
        package = import_package(out).load(out)
        params = {n: p.detach() for n, p in model.named_parameters()}
        prefixes = package.encode(params)
        assert all(torch.equal(a, b) for a, b in zip(prefixes.values(), compiled.tint.encode(params).values()))
        assert all(torch.equal(package.decode(prefixes)[n], p) for n, p in params.items())
        ids, train, _ = example_input(model.config.vocab_size, 8, 1, seed=2)
        with torch.no_grad():
            logits, new = package(ids, train, prefixes)
            expected, _ = compiled.tint(ids, train, prefixes)
        assert rel_err(logits, expected) <= 1e-12
