"""The TinT of a tiny LLaMA (RMSNorm, rotary positions, grouped-query attention, SiLU-gated MLP,
tied embeddings) against the ĝ oracle, and the invariants that make it a TinT (DESIGN §2)."""

from __future__ import annotations

import pytest
import torch

from tintc.errors import PassError
from tintc import pipeline
from tintc.fidelity import example_input
from tintc.reference import TrainSettings, approx_gd
from tests.models import MICRO, tiny_config, tiny_model

KINDS = ["attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down", "norm_gain"]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _compiled(table=None, seed=0, family="llama", **tint):
    kw = {} if table is None else {"table": table}
    cfg = tiny_config(family, dtype="float64", **{"kinds": KINDS, **tint}, **kw)
    model = tiny_model(family, dtype=torch.float64, seed=seed, **kw)
    return cfg, model, pipeline.compile_tint(cfg, model)


def _check(compiled, oracle, prefixes, logits, params):
    assert _rel(oracle.logits, oracle.logits_before) > 1e-3  # the steps changed the model
    assert _rel(logits, oracle.logits) <= 1e-9
    assert _rel(logits - oracle.logits_before, oracle.logits - oracle.logits_before) <= 1e-9
    decoded = compiled.tint.decode(prefixes)
    assert {n.rsplit(".", 2)[-2] for n in oracle.trained} == {"input_layernorm", "post_attention_layernorm", "v_proj",
                                                              "o_proj", "gate_proj", "up_proj", "down_proj"}
    for name in oracle.trained:
        assert _rel(decoded[name] - params[name], oracle.params[name] - params[name]) <= 1e-9, name
    for name in set(params) - set(oracle.trained):
        assert torch.equal(decoded[name], params[name].expand_as(decoded[name])), name


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("layers", ["all", "top-1"])
@pytest.mark.parametrize("loss", ["context", "label_only"])
def test_llama_tint_equals_the_oracle_in_float64(steps, layers, loss, family="llama"):
    cfg, model, compiled = _compiled(family=family, steps=steps, layers=layers, loss=loss)
    ids, train, labels = example_input(model.config.vocab_size, 16, 2, seed=1)
    labels = labels if loss == "label_only" else None
    params = {n: p.detach() for n, p in model.named_parameters()}
    oracle = approx_gd(compiled.graph, params, ids, train, TrainSettings.from_config(cfg, 2), labels)
    with torch.no_grad():
        logits, prefixes = compiled.tint(ids, train, compiled.tint.encode(params), labels)
    _check(compiled, oracle, prefixes, logits, params)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])  # q/k/v biases and an untied head; no window
@pytest.mark.parametrize("steps,layers,loss", [(1, "all", "context"), (2, "top-1", "label_only")])
def test_qwen2_and_mistral_tints_equal_the_oracle_in_float64(family, steps, layers, loss):
    test_llama_tint_equals_the_oracle_in_float64(steps, layers, loss, family)


def test_four_query_heads_on_one_kv_head():
    """∂v of the one k/v head sums over its four query heads."""
    table = {"llama": {**MICRO["llama"], "num_attention_heads": 4, "num_key_value_heads": 1}}
    cfg, model, compiled = _compiled(table=table, max_length=16, prefixes=4)
    assert {n.attrs.get("kv_heads") for n in compiled.graph.nodes() if n.kind == "attention"} == {1}
    ids, train, _ = example_input(model.config.vocab_size, 12, 2, seed=1)
    params = {n: p.detach() for n, p in model.named_parameters()}
    oracle = approx_gd(compiled.graph, params, ids, train, TrainSettings.from_config(cfg, 2))
    with torch.no_grad():
        logits, prefixes = compiled.tint(ids, train, compiled.tint.encode(params))
    _check(compiled, oracle, prefixes, logits, params)


def test_llama_tint_weights_do_not_depend_on_the_aux_weights():
    first = _compiled(seed=0)[2].tint.state_dict()
    poisoned = tiny_model("llama", dtype=torch.float64, seed=1)
    with torch.no_grad():
        for p in poisoned.parameters():
            p.mul_(-3.0)
    second = pipeline.compile_tint(tiny_config("llama", dtype="float64", kinds=KINDS), poisoned).tint.state_dict()
    assert first.keys() == second.keys() and len(first) > 0
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_standard_view_of_a_micro_llama_equals_the_fast_executor():
    cfg, model, compiled = _compiled(table=MICRO, prefixes=4, max_length=8)
    ids, train, _ = example_input(model.config.vocab_size, 8, 2, seed=1)
    params = {n: p.detach() for n, p in model.named_parameters()}
    prefixes = compiled.tint.encode(params)
    with torch.no_grad():
        fast, _ = compiled.tint(ids, train, prefixes)
        logits, _ = compiled.tint.standard()(ids, train, prefixes)
    assert _rel(logits, fast) <= 1e-9


def test_exact_attention_with_rotary_positions_is_refused():
    cfg = tiny_config("llama", kinds=["attn_v"], approximations={"attention": "exact"})
    with pytest.raises(PassError) as info:
        pipeline.compile_tint(cfg, tiny_model("llama"))
    assert info.value.problems[0] == ("node %h0.attn (model.layers.0.self_attn): attention: exact has no TinT "
                                      "construction for rotary or grouped-query attention; allowed: attention: "
                                      "stop_gradient")


def test_the_example_compiles_with_widths_that_divide_the_gated_mlp():
    """examples/llama-tiny.yaml: D = 96, inner width 256; the default head width is their gcd, 32."""
    from pathlib import Path

    from tintc.config import load_config

    cfg = load_config(Path(__file__).parent.parent / "examples" / "llama-tiny.yaml")
    compiled = pipeline.compile_tint(cfg)
    widths = {n.attrs.get("head_width") for n in compiled.train_graph.nodes() if n.kind == "linear"}
    assert widths == {32}


@pytest.mark.parametrize("steps,layers,loss", [(1, "all", "context"), (2, "top-1", "label_only")])
def test_exact_rmsnorm_and_silu_rules_equal_the_oracle(steps, layers, loss):
    """layer_norm: exact (RMSNorm's ∂x divided by rms(x) through an uncentred layer-norm probe) and
    activation: exact (silu' from a sigmoid unit and products)."""
    exact = {"layer_norm": "exact", "activation": "exact"}
    cfg, model, compiled = _compiled(steps=steps, layers=layers, loss=loss, approximations=exact)
    ids, train, labels = example_input(model.config.vocab_size, 16, 2, seed=1)
    labels = labels if loss == "label_only" else None
    params = {n: p.detach() for n, p in model.named_parameters()}
    oracle = approx_gd(compiled.graph, params, ids, train, TrainSettings.from_config(cfg, 2), labels)
    with torch.no_grad():
        logits, prefixes = compiled.tint(ids, train, compiled.tint.encode(params), labels)
    _check(compiled, oracle, prefixes, logits, params)
