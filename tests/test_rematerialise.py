"""tint.passes.rematerialise (ir/passes/rematerialise.py): the backward recomputes each layer's forward
from the layer's input. The training graph computes the same numbers, the TinT stays ĝ's and its standard
view the fast executor's, and the stream (everything in it: our convention) is narrower."""

from __future__ import annotations

import pytest
import torch

from ir.interpret import Interpreter
from ir.passes.autodiff import REMAT, aux_op, phase_of
from ir.passes.rematerialise import crosses_a_residual, rematerialise
from tintc import pipeline
from tintc.oracle.fidelity import example_input
from tintc.report.dense_count import dense_counts
from tests.helpers import EXACT_RULES
from tests.models import MICRO, tiny_config, tiny_model
from tests.test_compact import COMPACT
from tests.test_shared_rows import _compile, _view_against_fast
from tests.test_split_mlp import _run_against_g_hat

ON = {"rematerialise": {"enabled": True}}
# the micro models of every family; the exact rules read q, k and v again (the score gradient); llama: rotary
# tables, Gates, RMSNorm; gpt_neox: attention and MLP read one layer input (parallel residual)
CASES = {"gpt2-paper": ("gpt2", {}), "opt-exact": ("opt", EXACT_RULES), "llama-paper": ("llama", {}),
         "gpt_neox-paper": ("gpt_neox", {}), "gemma2-exact": ("gemma2", EXACT_RULES)}


def _training_graphs(family: str, steps: int):
    cfg = tiny_config(family, table=MICRO, dtype="float64", prefixes=4, max_length=8, steps=steps, passes=ON)
    traced = pipeline.trace(cfg, tiny_model(family, dtype=torch.float64, table=MICRO))
    remade = pipeline.train_graph(cfg, traced)
    cfg.tint.passes.rematerialise.enabled = False
    return pipeline.train_graph(cfg, traced), remade


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_backward_reads_no_forward_value_of_its_own_layer_and_computes_the_same(family):
    kept, remade = _training_graphs(family, steps=2)
    steps = remade.attrs["steps"]
    copies = [n for n in remade.nodes() if REMAT in n.name]
    assert copies and len(remade) == len(kept) + len(copies)
    for copy in copies:  # a copy of the forward op: same kind, settings and weight versions
        source = kept.node(f"{aux_op(copy.name)}@{copy.name.rsplit('@', 1)[1]}")
        assert (copy.kind, copy.attrs, copy.weights, copy.shape) == (source.kind, source.attrs, source.weights,
                                                                     source.shape)
    for node in remade.nodes():
        if phase_of(node, steps) in ("backward", "descent") and node.attrs.get("layer", -1) >= 0:
            for name in node.inputs:
                read = remade.node(name)
                assert not (phase_of(read, steps) == "forward" and read.attrs.get("layer") == node.attrs["layer"]), \
                    f"{node.name} reads {name}, kept from the forward pass"
    # a copy serves one sublayer: none is read past the next residual sum's gradient (what the FFN's backward
    # recomputed of the attention is made again for the attention's backward)
    order = {n.name: i for i, n in enumerate(remade.nodes())}
    crossings = [order[n.name] for n in remade.nodes() if crosses_a_residual(remade, n)]
    for copy in copies:
        end = min((c for c in crossings if c > order[copy.name]), default=len(order))
        assert all(order[r] <= end for r in remade.nx.successors(copy.name)), copy.name
    assert any(f"{REMAT}2@" in copy.name for copy in copies)
    assert rematerialise(remade, enabled=True).changed is False  # a second run changes nothing
    model = tiny_model(family, dtype=torch.float64, table=MICRO)
    params = {n: p.detach() for n, p in model.named_parameters()}
    ids, train, _ = example_input(model.config.vocab_size, 8, 2, seed=3)
    a, b = (Interpreter(g).execute(params, ids, train) for g in (kept, remade))
    assert torch.equal(a.logits, b.logits)  # the same ops on the same numbers, in the same order
    assert all(torch.equal(a.params[n], b.params[n]) for n in params)


def _kept_through_the_backward(compiled) -> set[str]:
    """The training-graph ops whose values (or values derived from them, as x̂: named for the op) the
    program writes in a forward phase and reads last in the backward."""
    program = compiled.tint.program
    calls = program.calls
    return {v.name.removeprefix("%") for v in program.values
            if v.born >= 0 and calls[v.born].phase == "forward" and v.last < len(calls)
            and calls[v.last].phase in ("backward", "descent")}


def _layer_inputs(graph) -> set[str]:
    """Ops outside the layers, and ops whose value an op of another layer reads."""
    return {n.name for n in graph.nodes() if n.attrs.get("layer", -1) < 0
            or any(graph.node(s).attrs.get("layer") != n.attrs["layer"] for s in graph.nx.successors(n.name))}


@pytest.mark.parametrize("case", CASES)
def test_rematerialised_tint_is_g_hat_its_view_the_fast_executor_and_its_stream_narrower(case):
    family, rules = CASES[case]
    cfg, model, compiled = _compile(family, rules, ON)
    _, _, kept = _compile(family, rules)
    assert any(REMAT in c.node for c in compiled.tint.program.calls)
    assert all(c.phase == "backward" for c in compiled.tint.program.calls if REMAT in c.node)
    logits_error, prefix_error, _ = _view_against_fast(compiled, model)
    assert logits_error <= 1e-10 and prefix_error <= 1e-10
    logits, updates, moved = _run_against_g_hat(cfg, model, compiled)
    assert moved > 1e-3 and logits <= 1e-9 and updates <= 1e-9
    assert compiled.tint.program.layout.blocks == kept.tint.program.layout.blocks  # a copy reads its op's block
    assert compiled.tint.program.width < kept.tint.program.width  # the fast executor's stream too
    assert _kept_through_the_backward(compiled) <= _layer_inputs(compiled.train_graph)
    ours, theirs = (dense_counts(c.tint.program, c.tint.layers)["ours"] for c in (compiled, kept))
    assert ours["d_sim"] < theirs["d_sim"] and ours["dense"]["total"] < theirs["dense"]["total"]


def test_with_every_lever_the_stream_holds_the_layer_inputs_and_one_sublayer():
    """The compact levers and rematerialisation together: what the forward keeps for the backward is the
    layer inputs; at the micro shapes the stream is narrower than the compact one's."""
    cfg, model, compiled = _compile("gpt2", {}, {**COMPACT, **ON})
    _, _, compact = _compile("gpt2", {}, COMPACT)
    logits_error, prefix_error, _ = _view_against_fast(compiled, model)
    assert logits_error <= 1e-10 and prefix_error <= 1e-10
    logits, updates, moved = _run_against_g_hat(cfg, model, compiled)
    assert moved > 1e-3 and logits <= 1e-9 and updates <= 1e-9
    assert _kept_through_the_backward(compiled) <= _layer_inputs(compiled.train_graph)
    ours, theirs = (dense_counts(c.tint.program, c.tint.layers)["ours"] for c in (compiled, compact))
    assert ours["d_sim"] < theirs["d_sim"] and ours["dense"]["total"] < theirs["dense"]["total"]
