"""The fast executor's cheaper forms of the same arithmetic (structured weights, backends/torch/
structured.py, and the run wirings of backends/torch/runtime.py) give the numbers of the plain
forms they replace."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backends.torch import runtime
from backends.torch.structured import compact
from tintc import pipeline
from tintc.oracle.fidelity import example_input
from tests.models import tiny_config, tiny_model


KINDS = {"gpt2": ["attn_v", "attn_o", "mlp_in", "mlp_out"], "llama": ["attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down"]}


def _compiled(family):
    cfg = tiny_config(family, dtype="float64", kinds=KINDS[family])
    model = tiny_model(family, dtype=torch.float64)
    ids, train, _ = example_input(model.config.vocab_size, 16, 2, seed=1)
    prefixes = pipeline.compile_tint(cfg, model).tint.encode({n: p.detach() for n, p in model.named_parameters()})
    return cfg, model, ids, train, prefixes


def test_compact_keeps_the_matrix_it_replaces():
    eye = torch.eye(5, dtype=torch.float64)
    mirror = torch.cat([eye, -2.0 * eye])[torch.tensor([0, 7, 2, 9, 4, 5, 6, 1, 8, 3])]  # signed copies, shuffled
    gate = runtime.Gate(3.0 * torch.eye(10, dtype=torch.float64), mirror, torch.ones(10, 5, dtype=torch.float64))
    xa, x = torch.randn(2, 4, 3, 10, dtype=torch.float64), torch.randn(2, 4, 3, 5, dtype=torch.float64)
    before = gate(xa, x, x)
    assert compact(gate) == 2
    assert isinstance(gate.a, runtime.Diagonal) and isinstance(gate.b, runtime.Selection)
    assert isinstance(gate.c, nn.Parameter)  # five nonzeros a row: stays a matrix
    assert torch.equal(gate(xa, x, x), before)  # the products only dropped exact zeros
    assert torch.equal(gate.b.dense(), mirror)
    assert compact(runtime.Linear(torch.ones(4, 6))) == 0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_structured_weights_give_the_tint_of_dense_matrices_bit_for_bit(family):
    cfg, model, ids, train, prefixes = _compiled(family)
    tint = pipeline.compile_tint(cfg, model).tint
    with torch.no_grad():
        fast, _ = tint(ids, train, prefixes)
    restored = 0
    for module in tint.layers.values():
        for attr in runtime.WEIGHTS[type(module)]:
            w = getattr(module, attr)
            if isinstance(w, (runtime.Diagonal, runtime.Selection)):
                dense = torch.diag(w.diagonal) if isinstance(w, runtime.Diagonal) else w.dense()
                delattr(module, attr)
                setattr(module, attr, nn.Parameter(dense.detach(), requires_grad=False))
                restored += 1
    assert restored >= 20  # identities, scalings, masks and signed copies are most of a TinT's projections
    with torch.no_grad():
        dense, _ = tint(ids, train, prefixes)
    assert torch.equal(fast, dense)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_run_wirings_equal_index_wirings(family, monkeypatch):
    cfg, model, ids, train, prefixes = _compiled(family)
    tint = pipeline.compile_tint(cfg, model).tint
    kinds = {type(r).__name__ for reads, write in tint._wiring for r in [*reads, write]}
    assert {"Gather", "list"} <= kinds  # reads gathered as runs, writes added as runs
    with torch.no_grad():
        by_runs, _ = tint(ids, train, prefixes)
    monkeypatch.setattr(runtime, "MAX_RUNS", 0)  # every wiring an index tensor, as before runs
    tint = pipeline.compile_tint(cfg, model).tint
    assert not any(isinstance(w, list) for _, w in tint._wiring)
    with torch.no_grad():
        by_index, _ = tint(ids, train, prefixes)
    # equal up to the order in which a coordinate written by several groups sums them
    assert ((by_runs - by_index).norm() / by_index.norm()).item() <= 1e-14
