"""The TinT of a tiny GPT-NeoX (Pythia: parallel residual or not, partial rotary, q|k|v interleaved
per head, biased layer norms, GELU MLP, untied head) against the ĝ oracle, and the invariants that
make it a TinT (DESIGN §2)."""

from __future__ import annotations

import pytest
import torch

from tintc import pipeline
from tintc.oracle.fidelity import example_input
from tintc.oracle.reference import TrainSettings, approx_gd, exact_gd
from tests.models import MICRO, tiny_config, tiny_model

KINDS = ["attn_v", "attn_o", "mlp_in", "mlp_out", "norm_gain", "norm_bias"]
TRAINED = {"input_layernorm", "post_attention_layernorm", "query_key_value", "dense", "dense_h_to_4h",
           "dense_4h_to_h"}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _compiled(table=None, seed=0, parallel=True, **tint):
    kw = {} if table is None else {"table": table}
    cfg = tiny_config("gpt_neox", dtype="float64", **{"kinds": KINDS, **tint}, **kw)
    model = tiny_model("gpt_neox", dtype=torch.float64, seed=seed, use_parallel_residual=parallel, **kw)
    return cfg, model, pipeline.compile_tint(cfg, model)


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
@pytest.mark.parametrize("steps,layers,loss", [(1, "all", "context"), (2, "all", "label_only"),
                                               (1, "top-1", "label_only"), (2, "top-1", "context")])
def test_neox_tint_equals_the_oracle_in_float64(parallel, steps, layers, loss):
    cfg, model, compiled = _compiled(parallel=parallel, steps=steps, layers=layers, loss=loss)
    assert ("h0.branches" in compiled.graph) == parallel
    ids, train, labels = example_input(model.config.vocab_size, 16, 2, seed=1)
    labels = labels if loss == "label_only" else None
    params = {n: p.detach() for n, p in model.named_parameters()}
    oracle = approx_gd(compiled.graph, params, ids, train, TrainSettings.from_config(cfg, 2), labels)
    with torch.no_grad():
        logits, prefixes = compiled.tint(ids, train, compiled.tint.encode(params), labels)
    assert _rel(oracle.logits, oracle.logits_before) > 1e-3  # the steps changed the model
    assert _rel(logits, oracle.logits) <= 1e-9
    assert _rel(logits - oracle.logits_before, oracle.logits - oracle.logits_before) <= 1e-9
    decoded = compiled.tint.decode(prefixes)
    assert {n.rsplit(".", 2)[-2] for n in oracle.trained} == TRAINED
    for name in oracle.trained:  # query_key_value: only v's rows of every head move
        assert _rel(decoded[name] - params[name], oracle.params[name] - params[name]) <= 1e-9, name
    for name in set(params) - set(oracle.trained):
        assert torch.equal(decoded[name], params[name].expand_as(decoded[name])), name


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
@pytest.mark.parametrize("steps,layers,loss", [(1, "all", "context"), (2, "top-1", "label_only")])
def test_neox_tint_with_every_rule_exact_is_exact_gd(parallel, steps, layers, loss):
    """Every rule exact (erf GELU's derivative by the five-point difference, partial rotary in the
    score gradient), q and k trained, against autograd through the HF model (measured: logits
    ≤4e-14, updates ≤3.4e-13)."""
    exact_rules = {"attention": "exact", "layer_norm": "exact", "activation": "exact"}
    cfg, model, compiled = _compiled(parallel=parallel, steps=steps, layers=layers, loss=loss,
                                     kinds=["attn_q", "attn_k", *KINDS], approximations=exact_rules)
    ids, train, labels = example_input(model.config.vocab_size, 16, 2, seed=1)
    labels = labels if loss == "label_only" else None
    params = {n: p.detach() for n, p in model.named_parameters()}
    exact = exact_gd(model, compiled.graph, ids, train, TrainSettings.from_config(cfg, 2), labels)
    with torch.no_grad():
        logits, prefixes = compiled.tint(ids, train, compiled.tint.encode(params), labels)
    assert _rel(exact.logits, exact.logits_before) > 1e-3
    assert _rel(logits, exact.logits) <= 1e-9
    assert _rel(logits - exact.logits_before, exact.logits - exact.logits_before) <= 1e-9
    decoded = compiled.tint.decode(prefixes)
    heads = model.config.num_attention_heads
    for name in exact.trained:
        update = exact.params[name] - params[name]
        assert _rel(decoded[name] - params[name], update) <= 1e-9, name
        if name.endswith("query_key_value.weight"):  # rows per head: q, k, v; q and k learn too
            assert update.reshape(heads, 3, -1)[:, :2].abs().max() > 1e-5, name


def test_neox_encode_decode_round_trip_keeps_the_interleaved_q_k_v():
    _, model, compiled = _compiled()
    params = {n: p.detach() for n, p in model.named_parameters()}
    decoded = compiled.tint.decode(compiled.tint.encode(params))
    assert decoded.keys() == params.keys()
    assert all(torch.equal(decoded[n], params[n]) for n in params)


def test_neox_tint_weights_do_not_depend_on_the_aux_weights():
    first = _compiled(seed=0)[2].tint.state_dict()
    poisoned = tiny_model("gpt_neox", dtype=torch.float64, seed=1)
    with torch.no_grad():
        for p in poisoned.parameters():
            p.mul_(-3.0)
    second = pipeline.compile_tint(tiny_config("gpt_neox", dtype="float64", kinds=KINDS), poisoned).tint.state_dict()
    assert first.keys() == second.keys() and len(first) > 0
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_standard_view_of_a_micro_neox_equals_the_fast_executor_and_the_oracle(parallel):
    cfg, model, compiled = _compiled(table=MICRO, parallel=parallel, prefixes=4, max_length=8)
    ids, train, _ = example_input(model.config.vocab_size, 8, 2, seed=1)
    params = {n: p.detach() for n, p in model.named_parameters()}
    prefixes = compiled.tint.encode(params)
    with torch.no_grad():
        fast, _ = compiled.tint(ids, train, prefixes)
        logits, new_prefixes = compiled.tint.standard()(ids, train, prefixes)
    oracle = approx_gd(compiled.graph, params, ids, train, TrainSettings.from_config(cfg, 2))
    assert _rel(logits, fast) <= 1e-9 and _rel(logits, oracle.logits) <= 1e-9
    decoded = compiled.tint.decode(new_prefixes)
    for name in oracle.trained:
        assert _rel(decoded[name] - params[name], oracle.params[name] - params[name]) <= 1e-9, name


def test_the_pythia_example_compiles():
    """examples/pythia-tiny.yaml: head_dim 16, rotary_pct 0.25, parallel residual, untied head."""
    from pathlib import Path

    from tintc.config import load_config

    cfg = load_config(Path(__file__).parent.parent / "examples" / "pythia-tiny.yaml")
    compiled = pipeline.compile_tint(cfg)
    assert compiled.graph.attrs["family"] == "gpt_neox"
    assert {n.attrs["rotary_dim"] for n in compiled.graph.nodes() if n.kind == "attention"} == {4}
    assert "h1.branches" in compiled.graph and not compiled.tint.program.layout.tied


def test_two_checkpoints_in_one_batch():
    """Batched prefixes: the periodic q|k|v rows are encoded and decoded per sequence."""
    cfg, model_a, compiled = _compiled(layers="top-1")
    model_b = tiny_model("gpt_neox", dtype=torch.float64, seed=1)
    tint = compiled.tint
    params = [{n: p.detach() for n, p in m.named_parameters()} for m in (model_a, model_b)]
    encoded = [tint.encode(p) for p in params]
    batched = {k: torch.stack([encoded[0][k], encoded[1][k]]) for k in encoded[0]}
    ids, train, _ = example_input(model_a.config.vocab_size, 16, 2, seed=1)
    with torch.no_grad():
        logits, prefixes = tint(ids, train, batched)
    decoded = tint.decode(prefixes)
    for i, theta in enumerate(params):
        one = slice(i, i + 1)
        oracle = approx_gd(compiled.graph, theta, ids[one], train[one], TrainSettings.from_config(cfg, 2))
        assert _rel(logits[one], oracle.logits) <= 1e-9
        assert "gpt_neox.layers.1.attention.query_key_value.weight" in oracle.trained
        for name in oracle.trained:
            assert _rel(decoded[name][i] - theta[name], oracle.params[name][0] - theta[name]) <= 1e-9, name
