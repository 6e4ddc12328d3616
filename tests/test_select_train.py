"""select_train: the exact ops and slots it marks, a second run changes nothing, the input
is not mutated, the marked graph still dumps, parses, verifies and matches HF; and
run_passes names a failing pass and the ones before it."""

import pytest

from ir.frontend import trace
from ir.passes import PassResult, run_passes
from ir.passes.select_train import select_train, trained_refs
from ir.text import dump, parse
from ir.verify import verify
from ir.errors import PassError
from tests.models import tiny_model
from tests.test_interpret import max_logit_error

OPTIONS = dict(layers=[1], kinds=["attn_v", "norm_bias"])


@pytest.fixture(scope="module", params=["gpt2", "opt"])
def traced(request):
    model = tiny_model(request.param)
    return model, trace(model)


def train_marks(graph) -> dict[str, str]:
    return {n.name: n.attrs["train"] for n in graph.nodes() if "train" in n.attrs}


def test_marks_exactly_v_and_the_layer_norm_biases_of_the_chosen_layer(traced):
    model, graph = traced
    result = select_train(graph, **OPTIONS)
    assert isinstance(result, PassResult) and result.changed
    assert train_marks(result.graph) == {"h1.v": "weight,bias", "h1.ln_attn": "bias", "h1.ln_mlp": "bias"}
    # nothing else changed: with the train marks removed the graphs are equal
    stripped = result.graph.copy()
    for node in stripped.nodes():
        node.attrs.pop("train", None)
    assert stripped == graph


def test_trained_refs_are_the_marked_weights():
    graph = trace(tiny_model("gpt2"))
    refs = [str(r) for r in trained_refs(select_train(graph, **OPTIONS).graph)]
    assert refs == [
        "@transformer.h.1.ln_1.bias",
        "@transformer.h.1.attn.c_attn.weight.T[64:96]",
        "@transformer.h.1.attn.c_attn.bias[64:96]",
        "@transformer.h.1.ln_2.bias",
    ]


def test_second_run_is_a_no_op_and_the_input_is_not_mutated(traced):
    model, graph = traced
    before = dump(graph)
    first = select_train(graph, **OPTIONS)
    assert dump(graph) == before and not train_marks(graph)
    second = select_train(first.graph, **OPTIONS)
    assert second.changed is False
    assert second.graph == first.graph and dump(second.graph) == dump(first.graph)
    assert second.graph is not first.graph


def test_a_narrower_selection_removes_old_marks(traced):
    model, graph = traced
    marked = select_train(graph, **OPTIONS).graph
    narrower = select_train(marked, layers=[1], kinds=["attn_v"])
    assert narrower.changed
    assert train_marks(narrower.graph) == {"h1.v": "weight,bias"}


def test_opt_without_biases_marks_only_present_slots():
    graph = trace(tiny_model("opt", enable_bias=False))
    marks = train_marks(select_train(graph, layers=[0], kinds=["attn_v", "mlp_in"]).graph)
    assert marks == {"h0.v": "weight", "h0.mlp_in": "weight"}


def test_marked_graph_round_trips_verifies_and_matches_hf(traced):
    model, graph = traced
    marked = select_train(graph, **OPTIONS).graph
    params = dict(model.named_parameters())
    text = dump(marked)
    back = parse(text)
    assert back == marked and dump(back) == text
    verify(back, params)
    assert max_logit_error(model, back, 16) <= 1e-5


def test_unknown_kind_is_refused(traced):
    model, graph = traced
    with pytest.raises(PassError) as info:
        select_train(graph, layers=[1], kinds=["attn_v", "attn_qk"])
    assert info.value.problems[0].startswith("unknown parameter kinds ['attn_qk']; allowed: attn_q, attn_k")


def test_run_passes_applies_and_verifies(traced):
    model, graph = traced
    out = run_passes(graph, [(select_train, OPTIONS)])
    assert train_marks(out) == train_marks(select_train(graph, **OPTIONS).graph)


def broken(graph):
    raise RuntimeError("boom")


def breaks_the_graph(graph):
    out = graph.copy()
    out.node("h0.attn").attrs["heads"] = 3
    return PassResult(out, True)


def test_run_passes_names_the_failing_pass_and_those_before_it(traced):
    model, graph = traced
    with pytest.raises(PassError) as info:
        run_passes(graph, [(select_train, OPTIONS), (broken, {})])
    assert info.value.headline == "pass broken failed (passes before it: select_train)"
    assert info.value.problems == ["RuntimeError: boom"]

    with pytest.raises(PassError) as info:
        run_passes(graph, [(select_train, dict(layers=[0], kinds=["nope"]))])
    assert info.value.headline == "pass select_train failed (passes before it: none)"
    assert "unknown parameter kinds ['nope']" in info.value.problems[0]


def test_run_passes_verifies_after_each_pass(traced):
    model, graph = traced
    with pytest.raises(PassError) as info:
        run_passes(graph, [(select_train, OPTIONS), (select_train, OPTIONS), (breaks_the_graph, {})])
    assert info.value.headline == "pass breaks_the_graph failed (passes before it: select_train, select_train)"
    assert info.value.problems == [
        "node %h0.attn (attention): q must be [T, 24] (heads*head_dim) and k, v [T, 24] (kv_heads*head_dim), "
        "got [['T', 32], ['T', 32], ['T', 32]]"]
