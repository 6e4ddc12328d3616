"""The IR text form: dump -> parse is the identity, the golden tiny dump is stable, parse
errors name the line; and the DOT view has one node per op and one edge per input."""

import os
from pathlib import Path

import pytest

from ir.dot import to_dot
from ir.frontend import trace
from ir.text import dump, parse
from ir.verify import verify
from ir.errors import IRError

from tests.models import TINY, tiny_model

GOLDEN = Path(__file__).parent / "golden" / "gpt2-tiny.ir"


@pytest.fixture(scope="module", params=sorted(TINY))
def graph(request):
    return trace(tiny_model(request.param), f"{request.param}-tiny")


def test_dump_parse_gives_the_same_graph(graph):
    text = dump(graph)
    back = parse(text)
    assert back == graph
    assert verify(back) is back
    # attribute types survive (True == 1 in Python, so compare types too)
    for a, b in zip(graph.nodes(), back.nodes()):
        assert {k: type(v) for k, v in a.attrs.items()} == {k: type(v) for k, v in b.attrs.items()}


def test_print_parse_print_is_the_identity(graph):
    text = dump(graph)
    assert dump(parse(text)) == text
    assert len(text.splitlines()) == 1 + len(graph.weight_shapes) + len(graph)  # one line each


def test_golden_dump_of_one_layer_gpt2():
    text = dump(trace(tiny_model("gpt2", n_layer=1), "gpt2-tiny"))
    if os.environ.get("TINTC_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "IR dump changed; rerun with TINTC_UPDATE_GOLDEN=1 and review the diff"


# The traced graphs of GPT-2 and OPT are those the hand-written adapters built before the
# tracing frontend (opt-tiny.ir was dumped by them); llama-tiny.ir shows the LLaMA ops.
@pytest.mark.parametrize("family, golden, overrides", [
    ("opt", "opt-tiny.ir", dict(num_hidden_layers=1, enable_bias=False)),
    ("llama", "llama-tiny.ir", dict(num_hidden_layers=1)),
])
def test_golden_dumps_of_one_layer_models(family, golden, overrides):
    path = GOLDEN.parent / golden
    text = dump(trace(tiny_model(family, **overrides), f"{family}-tiny"))
    if os.environ.get("TINTC_UPDATE_GOLDEN") and family == "llama":
        path.write_text(text)
    assert text == path.read_text(), "IR dump changed; review the diff"


def _golden_lines():
    return GOLDEN.read_text().splitlines()


def _parse_error(lines) -> IRError:
    with pytest.raises(IRError) as info:
        parse("\n".join(lines) + "\n")
    return info.value


def test_malformed_line_is_named():
    lines = _golden_lines()
    lines[2] = "weight transformer.wpe.weight [32 32]"
    err = _parse_error(lines)
    assert len(err.problems) == 1
    assert err.problems[0].startswith("<ir>:3: expected `weight @NAME")


def test_first_line_must_be_the_graph_header():
    err = _parse_error(["%ids : [T] = input()"])
    assert err.problems[0].startswith("<ir>:1: the first line must be `graph")


def test_undefined_input_is_named():
    lines = _golden_lines()
    i = next(n for n, line in enumerate(lines) if line.startswith("%h0.o "))
    lines[i] = lines[i].replace("linear(%h0.attn)", "linear(%h0.nowhere)")
    err = _parse_error(lines)
    # the first problem is the bad line; later lines that use %h0.o are reported after it
    assert err.problems[0] == f"<ir>:{i + 1}: node 'h0.o': input 'h0.nowhere' is not defined before it"


@pytest.mark.parametrize("ref", ["@", "@transformer.h.0.attn.c_attn.weight.T[64:x]", "@w[0:8][8:16]"])
def test_bad_weight_reference_is_named(ref):
    lines = _golden_lines()
    i = next(n for n, line in enumerate(lines) if line.startswith("%h0.v "))
    lines[i] = lines[i].replace("@transformer.h.0.attn.c_attn.weight.T[64:96]", ref)
    err = _parse_error(lines)
    assert err.problems[0] == f"<ir>:{i + 1}: bad weight reference {ref!r}"


def test_every_bad_line_is_listed_with_the_source_name():
    lines = _golden_lines()
    lines[1] = "nonsense"
    lines[-1] = "%out : [T, 64] = output(%logits) module=unquoted text"
    with pytest.raises(IRError) as info:
        parse("\n".join(lines), source="model.ir")
    assert [p.split(": ")[0] for p in info.value.problems] == ["model.ir:2", f"model.ir:{len(lines)}"]


def test_dot_has_one_node_per_op_and_one_edge_per_input(graph):
    text = to_dot(graph)
    assert text.startswith("digraph ")
    body = text.splitlines()
    assert sum("[label=" in line for line in body) == len(graph)
    edges = [line.strip() for line in body if " -> " in line]
    expected = [f'"{src}" -> "{n.name}";' for n in graph.nodes() for src in n.inputs]
    assert edges == expected
    assert body[-1] == "}"
