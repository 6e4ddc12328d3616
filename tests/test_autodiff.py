"""The autodiff pass: exact structure, idempotence, and the training graph against the oracle."""

from __future__ import annotations

import pytest
import torch

from ir.frontend import trace
from ir.interpret import Interpreter
from ir.passes import run_passes
from ir.passes.autodiff import autodiff
from ir.passes.select_train import select_train
from ir.text import dump, parse
from tintc.oracle.fidelity import example_input
from tintc.oracle.reference import EXACT, PAPER_KINDS, TrainSettings, approx_gd, exact_gd, with_approximations
from tests.models import tiny_model


def _training_graph(graph, layers, kinds, steps=1, lr=0.05, **rules):
    return run_passes(graph, [(select_train, {"layers": layers, "kinds": list(kinds)}),
                              (autodiff, {"steps": steps, "lr": lr, **rules})])


def _ops(graph, kind):
    return sorted(n.name for n in graph.nodes() if n.kind == kind)


def test_structure_of_one_step_on_the_top_layer():
    graph = trace(tiny_model("gpt2"))
    tg = _training_graph(graph, [1], PAPER_KINDS)
    assert _ops(tg, "linear_descent") == ["h1.mlp_in.descent@0", "h1.mlp_out.descent@0", "h1.o.descent@0",
                                          "h1.v.descent@0"]
    assert _ops(tg, "layer_norm_descent") == ["h1.ln_attn.descent@0", "h1.ln_mlp.descent@0"]
    assert _ops(tg, "loss_grad") == ["ln_final.grad_loss@0"]
    assert _ops(tg, "attention_backward") == ["h1.attn.bwd@0"]
    # nothing below the trained layer gets a gradient, and q/k get none through stop-gradient
    backward = [n for n in tg.nodes() if n.kind.endswith("_backward")]
    assert all(n.attrs["layer"] in (1, -1) for n in backward)
    assert not any(n.name.startswith(("h1.q.bwd", "h1.k.bwd")) for n in backward)
    # the evaluation reuses layer 0's forward (its weights never change) and reads version 1 above it
    assert "h0.mlp_out@1" not in tg and "h1.mlp_out@1" in tg
    assert str(tg.node("h1.mlp_out@1").weights["weight"]).endswith("#1")
    assert [n.name for n in tg.nodes() if n.kind == "output"] == ["out@1"]


def test_second_run_changes_nothing_and_input_is_not_mutated():
    graph = select_train(trace(tiny_model("opt")), [0, 1], list(PAPER_KINDS)).graph
    before = dump(graph)
    first = autodiff(graph, steps=1, lr=0.1)
    assert first.changed and dump(graph) == before
    second = autodiff(first.graph, steps=1, lr=0.1)
    assert not second.changed and second.graph is first.graph


def test_training_graph_round_trips_through_text():
    tg = _training_graph(trace(tiny_model("gpt2")), [0, 1], PAPER_KINDS + ("norm_gain",), steps=2)
    assert parse(dump(tg)) == tg


ALL_KINDS = ("attn_q", "attn_k", "attn_v", "attn_o", "mlp_in", "mlp_out", "norm_gain", "norm_bias")


@pytest.mark.parametrize("family", ["gpt2", "opt"])
@pytest.mark.parametrize("steps", [1, 2])
def test_with_every_rule_exact_the_training_graph_is_exact_gd(family, steps):
    """attention_score_backward carries the gradient through the scores: W_Q and W_K learn, and every
    layer below receives the full gradient."""
    model = tiny_model(family, dtype=torch.float64)
    graph = trace(model)
    tg = _training_graph(graph, [0, 1], ALL_KINDS, steps=steps, attention="exact", layer_norm="exact",
                         activation="exact")
    assert sum(n.kind == "attention_score_backward" for n in tg.nodes()) == 2 * 2 * steps  # q and k, 2 layers
    ids, train, _ = example_input(graph.attrs["vocab"], 16, 2, seed=1)
    params = {n: p.detach() for n, p in model.named_parameters()}
    settings = TrainSettings(lr=0.05, steps=steps, layers=(0, 1), kinds=ALL_KINDS, approximations=EXACT)
    exact = exact_gd(model, graph, ids, train, settings)
    result = Interpreter(tg).execute(params, ids, train)
    assert (result.logits - exact.logits).abs().max() < 1e-10
    query = next(n for n in exact.trained if "q_proj.weight" in n or "c_attn.weight" in n)
    assert (exact.params[query] - params[query]).abs().max() > 1e-4  # the queries moved
    for name in exact.trained:
        assert (result.params[name] - exact.params[name]).abs().max() < 1e-10, name


@pytest.mark.parametrize("family", ["gpt2", "opt", "gpt_neox"])  # gpt_neox: q|k|v rows of every head
@pytest.mark.parametrize("layers,steps,loss,kinds", [
    ((0, 1), 1, "context", PAPER_KINDS),
    ((1,), 2, "label_only", PAPER_KINDS + ("norm_gain",)),
    ((0, 1), 2, "context", ("attn_v", "mlp_out")),
])
def test_training_graph_equals_the_approximate_oracle(family, layers, steps, loss, kinds):
    model = tiny_model(family, dtype=torch.float64)
    graph = trace(model)
    tg = _training_graph(graph, list(layers), kinds, steps=steps)
    ids, train, labels = example_input(graph.attrs["vocab"], 16, 2, seed=1)
    params = {n: p.detach() for n, p in model.named_parameters()}
    settings = TrainSettings(lr=0.05, steps=steps, layers=layers, kinds=kinds, loss=loss)
    oracle = approx_gd(graph, params, ids, train, settings, labels)
    result = Interpreter(tg).execute(params, ids, train, labels if loss == "label_only" else None)
    assert (oracle.logits - oracle.logits_before).abs().max() > 1e-2  # the steps moved the logits
    assert (result.logits - oracle.logits).abs().max() < 1e-11
    for name in oracle.trained:
        assert (result.params[name] - oracle.params[name]).abs().max() < 1e-11
    untouched = set(params) - set(oracle.trained)
    assert all(torch.equal(result.params[n], params[n].expand_as(result.params[n])) for n in untouched)


def test_exact_rules_equal_exact_gd_where_attention_is_not_crossed():
    # Training only the top MLP linears: the gradient never passes through attention, so with exact
    # layer-norm and activation rules the training graph computes exact GD.
    model = tiny_model("gpt2", dtype=torch.float64)
    graph = trace(model)
    tg = _training_graph(graph, [1], ("mlp_in", "mlp_out"), layer_norm="exact", activation="exact")
    ids, train, _ = example_input(graph.attrs["vocab"], 16, 2, seed=1)
    settings = TrainSettings(lr=0.05, layers=(1,), kinds=("mlp_in", "mlp_out"), approximations=EXACT)
    exact = exact_gd(model, graph, ids, train, settings)
    result = Interpreter(tg).execute({n: p.detach() for n, p in model.named_parameters()}, ids, train)
    assert (result.logits - exact.logits).abs().max() < 1e-11
    # ...while the default finite differences differ from it, as measured by the oracle
    approx = approx_gd(graph, {n: p.detach() for n, p in model.named_parameters()}, ids, train,
                       with_approximations(settings, layer_norm="finite_difference"))
    assert (approx.logits - exact.logits).abs().max() > 1e-9
