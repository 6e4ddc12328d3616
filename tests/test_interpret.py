"""The IR interpreter is the oracle: on traced tiny models it reproduces the HF logits
(fp32 within 1e-5, fp64 within 1e-10), batched, at several sequence lengths."""

import pytest
import torch

from ir.frontend import trace
from ir.interpret import Interpreter
from tests.models import TINY, tiny_model

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def max_logit_error(model, graph, length: int, batch: int = 2, seed: int = 1) -> float:
    """Largest |interpreter - HF| logit difference on `batch` random sequences of `length`."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, graph.attrs["vocab"], (batch, length), generator=gen)
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
        got = Interpreter(graph).run(dict(model.named_parameters()), ids)
    assert got.shape == expected.shape == (batch, length, graph.attrs["vocab"])
    assert got.dtype == expected.dtype
    return (got - expected).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("family", sorted(TINY))
def test_interpreter_matches_hf_logits(family, dtype):
    model = tiny_model(family, dtype=dtype)
    graph = trace(model)
    max_len = graph.attrs["max_positions"]
    for length in (16, 5, max_len):  # 16 and 5 are shorter than the model's maximum
        assert max_logit_error(model, graph, length) <= TOLERANCE[dtype], (family, length)


def test_keep_returns_every_node_value():
    model = tiny_model("gpt2")
    graph = trace(model)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    logits, values = Interpreter(graph).run(dict(model.named_parameters()), ids, keep=True)
    assert list(values) == [n.name for n in graph.nodes()]
    assert torch.equal(values["out"], logits)
    for node in graph.nodes():  # every value has the node's shape, with T=7 and a batch of 2
        want = tuple(7 if d == "T" else d for d in node.shape)
        assert tuple(values[node.name].shape) == (2, *want), node.name


def test_interpreter_notices_a_changed_weight():
    """The check has teeth: perturbing one sliced weight (v of layer 1) moves the logits."""
    model = tiny_model("gpt2")
    graph = trace(model)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    before = Interpreter(graph).run(params, ids)
    # v columns of the fused Conv1D; random, since a constant shift is cancelled by the layer norm
    params["transformer.h.1.attn.c_attn.weight"][:, 64:96] += 0.1 * torch.randn(32, 32, generator=torch.Generator().manual_seed(4))
    after = Interpreter(graph).run(params, ids)
    assert (after - before).abs().max().item() > 1e-3
