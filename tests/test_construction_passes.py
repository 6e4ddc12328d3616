"""The optimisation passes: exact structural change, idempotence, and the TinT still equal to ĝ
with each pass on and off (DESIGN §4; issue: every pass leaves the construction error at float
precision)."""

from __future__ import annotations

import itertools

import pytest

from ir.frontend import trace
from ir.passes import run_passes
from ir.passes.autodiff import autodiff
from ir.passes.block_sharing import block_sharing
from ir.passes.head_splitting import head_splitting
from ir.passes.prefix_stacking import prefix_stacking
from ir.passes.select_train import select_train
from ir.passes.sub_mlp import sub_mlp
from ir.text import dump, parse
from tintc import pipeline
from ir.errors import PassError
from tintc.oracle.reference import PAPER_KINDS
from tests.helpers import check_round, tint_round
from tests.models import tiny_config, tiny_model


@pytest.fixture(scope="module")
def training_graph():
    graph = trace(tiny_model("opt"))  # d_model 32, FFN 128
    return run_passes(graph, [(select_train, {"layers": [0, 1], "kinds": list(PAPER_KINDS)}),
                              (autodiff, {"steps": 1, "lr": 0.1})])


def _attrs(graph, attr):
    return {n.name: n.attrs[attr] for n in graph.nodes() if attr in n.attrs}


def _check_pass(graph, fn, attr, expected, **options):
    result = fn(graph, **options)
    assert result.changed and attr not in dump(graph)  # the input is not mutated
    assert _attrs(result.graph, attr) == expected
    again = fn(result.graph, **options)
    assert not again.changed and dump(again.graph) == dump(result.graph)
    assert parse(dump(result.graph)) == result.graph


def test_prefix_stacking_sets_k_on_every_op_reading_a_linear_weight(training_graph):
    linear_ops = [n for n in training_graph.nodes() if n.kind in ("linear", "linear_backward", "linear_descent")]
    assert len(linear_ops) > 12
    _check_pass(training_graph, prefix_stacking, "prefixes", {n.name: 8 for n in linear_ops}, prefixes=8)
    unstacked = prefix_stacking(training_graph, prefixes=None).graph
    assert unstacked.node("h0.mlp_in@0").attrs["prefixes"] == 128 and unstacked.node("h0.q@0").attrs["prefixes"] == 32
    with pytest.raises(PassError, match=r"node %h0.q@0 .*output width 32 is not divisible by tint.prefixes=5"):
        prefix_stacking(training_graph, prefixes=5)


def test_head_splitting_sets_the_input_chunk(training_graph):
    linear_ops = [n for n in training_graph.nodes() if n.kind in ("linear", "linear_backward", "linear_descent")]
    _check_pass(training_graph, head_splitting, "head_width", {n.name: 16 for n in linear_ops}, width=16)
    whole = head_splitting(training_graph, width=None).graph
    assert whole.node("h0.mlp_out@0").attrs["head_width"] == 128 and whole.node("h0.q@0").attrs["head_width"] == 32
    with pytest.raises(PassError, match=r"input width 32 is not divisible"):
        head_splitting(training_graph, width=24)


def test_sub_mlp_partitions_elementwise_ops_where_the_width_divides(training_graph):
    result = sub_mlp(training_graph, width=16).graph
    marked = _attrs(result, "group_width")
    assert marked["h0.act@0"] == 16 and marked["h1.act.bwd@0"] == 16 and marked["h0.resid_attn@0"] == 16
    assert "h0.q@0" not in marked and "h0.attn@0" not in marked  # linear and attention ops are not elementwise
    _check_pass(training_graph, sub_mlp, "group_width", marked, width=16)
    assert _attrs(sub_mlp(training_graph, width=None).graph, "group_width")["h0.act@0"] == 128


def test_block_sharing_is_a_graph_attribute(training_graph):
    result = block_sharing(training_graph, enabled=False)
    assert result.changed and result.graph.attrs["share_blocks"] is False and "share_blocks" not in training_graph.attrs
    assert not block_sharing(result.graph, enabled=False).changed


def _passes(stacking, splitting, partition, sharing):
    return {"prefix_stacking": {"enabled": stacking}, "head_splitting": {"enabled": splitting, "width": 16},
            "sub_mlp": {"enabled": partition, "width": 16}, "block_sharing": {"enabled": sharing}}


COMBINATIONS = [("opt", s) for s in itertools.product([True, False], repeat=4)] + [
    ("gpt2", (True,) * 4), ("gpt2", (False,) * 4)]


@pytest.mark.parametrize("family,switches", COMBINATIONS)
def test_every_combination_of_passes_keeps_the_tint_exact(family, switches):
    check_round(tint_round(family, passes=_passes(*switches), steps=2, length=12, batch=1), 1e-9)


def test_the_passes_change_what_they_claim():
    model = tiny_model("gpt2")

    def program(**switches):
        return pipeline.compile_tint(tiny_config("gpt2", passes=_passes(**switches)), model).tint

    full = program(stacking=True, splitting=True, partition=True, sharing=True)
    unshared = program(stacking=True, splitting=True, partition=True, sharing=False)
    assert len(unshared.layers) == len(unshared.program.calls) > len(full.layers)
    unsplit = program(stacking=True, splitting=False, partition=True, sharing=True)
    assert unsplit.layers["linear_forward_32_8"].w_q.shape == (33, 33)  # one head per row slot reads all of x
    assert full.layers["linear_forward_16_8"].w_q.shape == (17, 17)
    unstacked = program(stacking=False, splitting=True, partition=True, sharing=True)
    assert unstacked.program.layout.blocks["h0.mlp_in"].tokens == 128  # one row per prefix token
    assert full.program.layout.blocks["h0.mlp_in"].tokens == 8
    whole = program(stacking=True, splitting=True, partition=False, sharing=True)
    assert "activation_gelu_tanh_128" in whole.layers and "activation_gelu_tanh_16" in full.layers
