"""Low rank: exact factorisation where it is exact and smaller, an error report where it is not."""

from __future__ import annotations

import math

import torch

from backends.torch import runtime
from backends.torch.emit import import_package
from backends.torch.low_rank import factorise
from tintc import pipeline
from tintc.pipeline import emit
from tintc.oracle.fidelity import example_input
from tintc.report.counts import parameter_report
from tintc.report.render import to_markdown
from tests.helpers import check_round, params_of, tint_round
from tests.models import tiny_config, tiny_model


def test_a_low_rank_projection_is_factorised_exactly_and_a_full_rank_one_is_reported():
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(48, 2, generator=gen, dtype=torch.float64) @ torch.randn(2, 40, generator=gen,
                                                                                 dtype=torch.float64)
    layer = runtime.Gate(low, torch.eye(48, 40, dtype=torch.float64))
    x = torch.randn(3, 5, 2, 40, generator=gen, dtype=torch.float64)
    before = layer(x, x)
    log = factorise("gate", layer, rank=4)
    assert isinstance(layer.a, runtime.LowRank) and layer.a.left.shape == (48, 2) and layer.a.right.shape == (2, 40)
    assert not isinstance(layer.b, runtime.LowRank)  # rank 40 > 4
    assert (layer(x, x) - before).abs().max() < 1e-12
    (a, b) = log
    assert a == {"layer": "gate", "weight": "a", "shape": [48, 40], "rank": 2, "factorised": True}
    assert b["rank"] == 40 and not b["factorised"]
    assert math.isclose(b["truncation_error"], math.sqrt(36 / 40), rel_tol=1e-12)  # identity: equal singular values


def test_the_low_rank_pass_keeps_the_tint_exact_and_reports_every_projection():
    r = tint_round("gpt2", passes={"low_rank": {"enabled": True, "rank": 8}}, length=12, batch=1)
    compiled = r.compiled
    log = compiled.tint.program.low_rank
    projections = sum(sum(getattr(m, w) is not None and not isinstance(getattr(m, w), (runtime.Diagonal, runtime.DiagonalBlocks, runtime.Selection))
                          for w in runtime.WEIGHTS[type(m)]) for m in compiled.tint.layers.values())  # dense ones
    assert len(log) == projections > 0
    for entry in log:  # factorised exactly where the rank allows and it saves storage
        rows, cols = entry["shape"]
        assert entry["factorised"] == (entry["rank"] <= 8 and entry["rank"] * (rows + cols) < rows * cols)
    check_round(r, 1e-9)
    assert "Low rank:" in to_markdown(parameter_report(compiled))


def test_factorised_projections_survive_emission_bit_for_bit(tmp_path):
    cfg = tiny_config("gpt2", dtype="float64")
    model = tiny_model("gpt2", dtype=torch.float64)
    tint = pipeline.compile_tint(cfg, model).tint
    name = next(n for n in tint.layers if n.startswith("sum_"))
    weight = runtime.as_projection(tint.layers[name].weight).dense()  # [I, I]: written as I @ [I, I], exact
    delattr(tint.layers[name], "weight")
    tint.layers[name].weight = runtime.LowRank(torch.eye(weight.shape[0], dtype=weight.dtype), weight.detach())
    emit(tint, cfg, tmp_path)
    emitted = import_package(tmp_path).load(tmp_path)
    ids, train, _ = example_input(model.config.vocab_size, 12, 2, seed=2)
    prefixes = tint.encode(params_of(model))
    with torch.no_grad():
        assert torch.equal(emitted(ids, train, prefixes)[0], tint(ids, train, prefixes)[0])
    rows, cols = weight.shape
    assert f"LowRank(torch.empty({rows}, {rows}), torch.empty({rows}, {cols}))" in (tmp_path / "tint_model.py").read_text()
