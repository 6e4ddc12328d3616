"""BLOOM (BloomForCausalLM): ALiBi instead of a position embedding (head h's score of key j gets m_h·j:
in the TinT a constant 1 appended to each q head and m_h·j, a linear map of the one-hot position, to
each k head), a layer norm on the embeddings, q|k|v interleaved per head in one `query_key_value`
(each part a row range with a period: training attn_v moves only the v rows), BLOOM's own tanh GELU
(gelu_bloom), a tied head. The trace, the oracles, and the TinT built from a `save_pretrained` folder
against ĝ and against Hugging Face's own autograd."""

from __future__ import annotations

import pytest
import torch
from transformers.models.bloom import modeling_bloom

from ir import rules
from ir.activations import gelu_bloom, gelu_tanh
from ir.errors import FrontendError
from ir.frontend import trace
from ir.passes.select_train import kinds_of
from ir.text import dump
from tests.families import EXACT_RULES, compiled_from_folder, example, float32_errors, rel, run, tint_agrees
from tests.models import tiny_config, tiny_model
from tests.test_exact_hf import hf_in_float64
from tests.test_interpret import max_logit_error
from tintc import pipeline
from tintc.oracle.reference import TrainSettings, exact_gd

ALL_KINDS = ["attn_q", "attn_k", "attn_v", "attn_o", "mlp_in", "mlp_out", "norm_gain", "norm_bias"]
PAPER_KINDS = ["attn_v", "attn_o", "mlp_in", "mlp_out", "norm_bias"]
HEAD_DIM = 8  # hidden 32, 4 heads: query_key_value rows are [q|k|v] of 8 for each head in turn


def test_bloom_trace_has_alibi_an_embedding_norm_and_interleaved_q_k_v():
    model = tiny_model("bloom", dtype=torch.float64)
    graph = trace(model)
    assert graph.node("ln_embed").inputs == ("tok_embed",) and graph.node("h0.ln_attn").inputs == ("ln_embed",)
    assert not [n for n in graph.nodes() if n.kind == "pos_embed"]
    attention = graph.node("h0.attn")
    assert (attention.attrs["positions"], attention.attrs["heads"], attention.attrs["head_dim"]) == ("alibi", 4, 8)
    rows = {r: (graph.node(f"h0.{r}").weights["weight"].rows, graph.node(f"h0.{r}").weights["weight"].period)
            for r in ("q", "k", "v")}
    assert rows == {"q": ((0, 8), 24), "k": ((8, 16), 24), "v": ((16, 24), 24)}  # of every 24 rows (one head)
    assert graph.node("h0.act").attrs["fn"] == "gelu_bloom"
    assert "positions=\"alibi\"" in dump(graph) and "fn=\"gelu_bloom\"" in dump(graph)  # as `tintc inspect` shows it
    assert tuple(kinds_of(graph)) == tuple(ALL_KINDS)
    assert max_logit_error(model, graph, 16) <= 1e-10


def test_bloom_gelu_is_its_own_and_not_gpt2s():
    """BLOOM writes √(2/π) as 0.79788456: gelu_bloom is its module to the bit; gelu_tanh differs by ~1e-9."""
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    assert torch.equal(gelu_bloom(x), modeling_bloom.BloomGelu()(x))
    assert 1e-11 < (gelu_tanh(x) - gelu_bloom(x)).abs().max() < 1e-8


@pytest.mark.parametrize("heads", [1, 2, 4, 6, 8, 12, 16, 20])
def test_alibi_slopes_are_hugging_faces(heads):
    """Powers of two and the interleaved slopes of other head counts (bloom-560m has 16, bloom-7b1 32)."""
    assert torch.equal(rules.alibi_slopes(heads), modeling_bloom._get_alibi_slopes(heads, torch.device("cpu")))
    mask = torch.ones(1, 10, dtype=torch.long)
    expected = modeling_bloom.build_alibi_tensor(mask, heads, torch.float64).view(heads, 10)
    assert torch.equal(rules.alibi_bias(heads, 10, torch.float64), expected)


def test_bloom_settings_without_a_construction_are_refused_by_name():
    with pytest.raises(FrontendError) as info:
        trace(tiny_model("bloom", apply_residual_connection_post_layernorm=True))
    assert info.value.problems == ["transformer.h.*: apply_residual_connection_post_layernorm=True (the residual "
                                   "taken after the norm) is not supported; allowed: False"]
    with pytest.raises(FrontendError) as info:
        trace(tiny_model("bloom", pretraining_tp=2, slow_but_exact=True))
    assert info.value.problems[0].startswith("transformer.h.*.self_attention.dense: slow_but_exact=True with "
                                             "pretraining_tp=2")


def test_bloom_compiles_with_its_default_kinds_and_a_default_length():
    """No position table: tint.max_length defaults to 256 (ALiBi sets no limit); the default kinds are the
    paper's (biased layer norms, a plain MLP)."""
    cfg = tiny_config("bloom")
    assert cfg.tint.train.kinds == PAPER_KINDS
    graph = pipeline.trace(cfg, tiny_model("bloom"))
    assert graph.attrs["max_positions"] == 4096 and cfg.max_length(graph.attrs["max_positions"]) == 32


def test_bloom_from_its_folder_with_the_papers_rules_equals_g_hat_and_moves_only_the_v_rows(tmp_path):
    """fp64, one step, context loss, all layers. Measured: logit change 6.0e-12, updates ≤ 1.1e-11."""
    cfg, compiled = compiled_from_folder("bloom", tmp_path, "float64", PAPER_KINDS, {})
    g_hat, logits, decoded, params = run(cfg, compiled, "g_hat")
    assert rel(g_hat.logits, g_hat.logits_before) > 1e-3
    tint_agrees(g_hat, logits, decoded, params, 1e-9)
    for layer in range(2):
        name = f"transformer.h.{layer}.self_attention.query_key_value.weight"
        update = (decoded[name] - params[name]).view(2, 4, 3, HEAD_DIM, 32)  # [batch, head, q|k|v, row, column]
        assert update[:, :, 2].abs().max() > 1e-6, name
        assert torch.equal(update[:, :, :2], torch.zeros_like(update[:, :, :2])), name  # q and k rows untouched


def test_bloom_with_exact_attention_equals_g_hat(tmp_path):
    """Every kind (q and k through the ALiBi scores), exact attention, the paper's norm and GELU rules.
    Measured: logit change 6.3e-12, updates ≤ 1.3e-11."""
    cfg, compiled = compiled_from_folder("bloom", tmp_path, "float64", ALL_KINDS, {"attention": "exact"})
    g_hat, logits, decoded, params = run(cfg, compiled, "g_hat")
    tint_agrees(g_hat, logits, decoded, params, 1e-9)


def test_bloom_from_its_folder_with_every_rule_exact_is_hugging_faces_autograd(tmp_path):
    """HF's BLOOM computes its softmax in float32 (and its GELU backward with its own constants): the oracle
    runs its modeling file with those casts read as float64 (tests/test_exact_hf.py), else the float32
    rounding (3e-8) is what is measured."""
    cfg, compiled = compiled_from_folder("bloom", tmp_path, "float64", ALL_KINDS, EXACT_RULES)
    model = compiled.model
    ids, train = example("bloom")
    params = {n: p.detach() for n, p in model.named_parameters()}
    with torch.no_grad():
        logits, prefixes = compiled.tint(ids, train, compiled.tint.encode(params))
    decoded = compiled.tint.decode(prefixes)
    with hf_in_float64(model):
        exact = exact_gd(model, compiled.graph, ids, train, TrainSettings.from_config(cfg, 2), norms_as_graph=False)
    assert rel(exact.logits, exact.logits_before) > 1e-3
    tint_agrees(exact, logits, decoded, params, 1e-9)


def test_bloom_in_float32_with_the_papers_rules_is_at_the_float32_floor(tmp_path):
    """As `tintc verify` shows it. Measured: logit change 6.5e-3 beside a floor of 7.1e-3 (the finite
    differences at N = 1000 amplify the rounding), worst update 9.5e-3 beside 1.1e-2."""
    tint, floor = float32_errors(*compiled_from_folder("bloom", tmp_path, "float32", PAPER_KINDS, {}))
    assert tint["delta_rel_err"] <= 5 * floor["delta_rel_err"] and tint["worst_update_rel"] <= 5 * floor["worst_update_rel"]


def test_bloom_in_float32_with_every_rule_exact_is_at_the_float32_floor(tmp_path):
    """Measured: logit change 1.76e-5 beside a floor of 1.72e-5 (the step moves the logits by 1%, so their
    change carries ~1e-5 of float32 rounding), worst update 1.6e-3 beside the same."""
    tint, floor = float32_errors(*compiled_from_folder("bloom", tmp_path, "float32", ALL_KINDS, EXACT_RULES))
    assert floor["delta_rel_err"] < 1e-4 and tint["delta_rel_err"] <= 5 * floor["delta_rel_err"]
    assert tint["worst_update_rel"] <= 5 * floor["worst_update_rel"]
