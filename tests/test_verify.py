"""The verifier: a sound graph passes; each kind of corruption is reported naming the node,
all problems at once; declared weights are checked against the model's parameters."""

import pytest
import torch

from ir.frontend import trace
from ir.graph import WeightRef
from ir.verify import verify
from ir.errors import IRError
from tests.models import tiny_model


@pytest.fixture(scope="module")
def traced():
    model = tiny_model("gpt2")
    return trace(model), dict(model.named_parameters())


@pytest.fixture
def g(traced):
    return traced[0].copy()


def problems_of(graph, params=None) -> list[str]:
    with pytest.raises(IRError) as info:
        verify(graph, params)
    return info.value.problems


def test_sound_graph_passes(traced):
    graph, params = traced
    assert verify(graph) is graph
    assert verify(graph, params) is graph


def _unknown_kind(g):
    g.node("h0.act").kind = "softmax"


def _wrong_arity(g):
    g.node("h0.q").inputs = ("h0.ln_attn", "embed")


def _missing_attribute(g):
    del g.node("h0.attn").attrs["heads"]


def _wrong_attribute_type(g):
    g.node("h0.attn").attrs["heads"] = "4"


def _bool_is_not_int(g):
    g.node("h0.attn").attrs["head_dim"] = True


def _unknown_attribute(g):
    g.node("h1.ln_mlp").attrs["colour"] = "red"


def _undeclared_weight(g):
    g.node("h1.o").weights["weight"] = WeightRef("transformer.h.1.attn.nowhere.weight", transpose=True)


def _rows_out_of_range(g):
    g.node("h0.v").weights["weight"] = WeightRef("transformer.h.0.attn.c_attn.weight", True, (64, 128))


def _input_width_differs(g):
    g.node("h0.mlp_out").inputs = ("h0.ln_mlp",)  # [T, 32] into a [32, 128] weight


def _declared_shape_wrong(g):
    g.node("h1.mlp_in").shape = ("T", 64)


def _rank0_input(g):
    g.node("h0.ln_mlp").shape = ()


def _two_outputs(g):
    g.add("out2", "output", ["logits"], ("T", 64))


def _missing_weight_slot(g):
    del g.node("ln_final").weights["gain"]


def _bad_activation(g):
    g.node("h1.act").attrs["fn"] = "swish"


CORRUPTIONS = [
    (_unknown_kind, "node %h0.act (softmax): unknown op kind; allowed: input, embed"),
    (_wrong_arity, "node %h0.q (linear): takes 1 inputs, got 2"),
    (_missing_attribute, "node %h0.attn (attention): missing attribute 'heads' (int)"),
    (_wrong_attribute_type, "node %h0.attn (attention): attribute heads='4' is not int"),
    (_bool_is_not_int, "node %h0.attn (attention): attribute head_dim=True is not int"),
    (_unknown_attribute, "node %h1.ln_mlp (layer_norm): unknown attribute 'colour'; allowed: module"),
    (_undeclared_weight, "node %h1.o (linear): weight @transformer.h.1.attn.nowhere.weight.T is not a declared"),
    (_rows_out_of_range, "node %h0.v (linear): rows 64:128 of transformer.h.0.attn.c_attn.weight out of range 0:96"),
    (_input_width_differs, "node %h0.mlp_out (linear): input width 32 does not match weight [32, 128]"),
    (_declared_shape_wrong, "node %h1.mlp_in (linear): shape ['T', 64] but the op gives ['T', 128]"),
    (_rank0_input, "node %h0.mlp_in (linear): cannot take inputs of shapes [[]]"),
    (_two_outputs, "graph gpt2: needs exactly one output op, has 2"),
    (_missing_weight_slot, "node %ln_final (layer_norm): missing weight slot 'gain'"),
    (_bad_activation, "node %h1.act (activation): fn='swish'; allowed: gelu_tanh, gelu, relu, silu"),
]


@pytest.mark.parametrize("corrupt, message", CORRUPTIONS, ids=[c.__name__.strip("_") for c, _ in CORRUPTIONS])
def test_corruption_is_reported_naming_the_node(g, corrupt, message):
    corrupt(g)
    problems = problems_of(g)
    assert any(p.startswith(message) for p in problems), problems


def test_only_the_corrupted_node_is_reported(g):
    _wrong_attribute_type(g)
    assert problems_of(g) == ["node %h0.attn (attention): attribute heads='4' is not int"]


def test_several_problems_are_listed_at_once(g):
    _unknown_kind(g)
    _rows_out_of_range(g)
    _two_outputs(g)
    with pytest.raises(IRError) as info:
        verify(g)
    err = info.value
    assert len(err.problems) == 3
    assert str(err).startswith("graph gpt2 is not valid: 3 problems")
    assert [p.split(":")[0] for p in err.problems] == ["node %h0.v (linear)", "node %h0.act (softmax)", "graph gpt2"]


def test_params_with_a_wrong_shape_or_missing_are_reported(traced):
    graph, params = traced
    bad = dict(params)
    bad["transformer.wpe.weight"] = torch.zeros(16, 32)
    del bad["transformer.ln_f.bias"]
    assert problems_of(graph, bad) == [
        "weight @transformer.wpe.weight: declared [32, 32], model has [16, 32]",
        "weight @transformer.ln_f.bias: not among the model's parameters",
    ]
