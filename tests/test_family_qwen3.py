"""Qwen3 (Qwen3ForCausalLM): a Qwen2 whose q and k are RMS-normalised per head before the rotary
embedding (`q_norm`, `k_norm`: one gain of head_dim shared by every head, kind qk_norm_gain), with a
head_dim that is not hidden/heads. The trace, the oracles, and the TinT built from a `save_pretrained`
folder against ĝ and against Hugging Face's own autograd."""

from __future__ import annotations

import pytest
import torch

from ir.errors import ConfigError, FrontendError
from ir.frontend import trace
from ir.passes.select_train import kinds_of
from tests.families import EXACT_RULES, compiled_from_folder, float32_errors, oracles_agree, rel, run, tint_agrees
from tests.models import tiny_config, tiny_model
from tests.test_interpret import max_logit_error

ALL_KINDS = ["attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down", "norm_gain", "qk_norm_gain"]
PAPER_RULE_KINDS = ["attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down", "norm_gain"]


def test_qwen3_normalises_each_q_and_k_head_with_one_gain():
    model = tiny_model("qwen3", dtype=torch.float64)
    graph = trace(model)
    q_norm, k_norm = graph.node("h0.ln_q"), graph.node("h0.ln_k")
    assert (q_norm.kind, q_norm.inputs, q_norm.attrs["heads"], q_norm.shape) == ("rms_norm", ("h0.q",), 4, ("T", 64))
    assert (k_norm.inputs, k_norm.attrs["heads"], k_norm.shape) == (("h0.k",), 2, ("T", 32))  # grouped-query k
    assert graph.weight_shapes["model.layers.0.self_attn.q_norm.weight"] == (16,)  # one head's width
    attention = graph.node("h0.attn")
    assert attention.inputs == ("h0.ln_q", "h0.ln_k", "h0.v")
    assert (attention.attrs["head_dim"], attention.attrs["scale"]) == (16, 16 ** -0.5)  # head_dim, not 32/4
    assert graph.node("h0.o").shape == ("T", 32) and graph.attrs["d_model"] == 32
    assert tuple(kinds_of(graph)) == tuple(ALL_KINDS)
    assert max_logit_error(model, graph, 16) <= 1e-10


def test_qwen3_exact_gd_and_g_hat_with_every_rule_exact_agree():
    """The two oracles: autograd through the HF model and the IR interpreter with every rule exact,
    every kind trained (the per-head q/k norm gains too)."""
    exact = oracles_agree("qwen3", ALL_KINDS)
    assert any(".q_norm." in name for name in exact.trained) and any(".k_norm." in name for name in exact.trained)


def test_qwen3_q_k_norm_gains_need_the_exact_attention_rule():
    with pytest.raises(ConfigError) as info:
        tiny_config("qwen3", kinds=["attn_v", "qk_norm_gain"])
    assert "tint.train.kinds: got qk_norm_gain with approximations.attention: stop_gradient" in info.value.problems[0]


def test_qwen3_sliding_window_is_refused_by_name():
    model = tiny_model("qwen3", use_sliding_window=True, sliding_window=8)
    with pytest.raises(FrontendError, match="use_sliding_window=True is not supported; allowed: False"):
        trace(model)


def test_qwen3_from_its_folder_with_the_papers_rules_equals_g_hat(tmp_path):
    """fp64, one step, context loss, all layers. Measured: logit change 5.6e-13, updates ≤ 1.5e-12."""
    cfg, compiled = compiled_from_folder("qwen3", tmp_path, "float64", PAPER_RULE_KINDS, {})
    g_hat, logits, decoded, params = run(cfg, compiled, "g_hat")
    assert rel(g_hat.logits, g_hat.logits_before) > 1e-3
    tint_agrees(g_hat, logits, decoded, params, 1e-9)


def test_qwen3_q_k_norm_gains_with_the_papers_norm_rule_equal_g_hat(tmp_path):
    """The per-head norms' finite-difference backward and their gains' descent (exact attention, so that
    they get a gradient). Measured: logit change 8.6e-13, updates ≤ 8.3e-12."""
    cfg, compiled = compiled_from_folder("qwen3", tmp_path, "float64", ALL_KINDS, {"attention": "exact"})
    g_hat, logits, decoded, params = run(cfg, compiled, "g_hat")
    assert any(".q_norm." in name for name in g_hat.trained)
    tint_agrees(g_hat, logits, decoded, params, 1e-9)


def test_qwen3_from_its_folder_with_every_rule_exact_is_hugging_faces_autograd(tmp_path):
    """Measured: logit change 5.8e-16, updates ≤ 1.7e-13 (the q_norm gain)."""
    cfg, compiled = compiled_from_folder("qwen3", tmp_path, "float64", ALL_KINDS, EXACT_RULES)
    exact, logits, decoded, params = run(cfg, compiled, "exact")
    assert rel(exact.logits, exact.logits_before) > 1e-2
    tint_agrees(exact, logits, decoded, params, 1e-9)


def test_qwen3_in_float32_with_the_papers_rules_is_at_the_float32_floor(tmp_path):
    """As `tintc verify` shows it, the float32 TinT against ĝ in float64 beside the floor (ĝ in float32).
    Measured: logit change 1.5e-4 beside 1.6e-4, worst update 7.9e-4 beside 7.3e-4 (the finite
    differences at N = 1000 amplify either one's rounding)."""
    tint, floor = float32_errors(*compiled_from_folder("qwen3", tmp_path, "float32", PAPER_RULE_KINDS, {}))
    assert tint["delta_rel_err"] <= 5 * floor["delta_rel_err"] and tint["worst_update_rel"] <= 5 * floor["worst_update_rel"]


def test_qwen3_in_float32_with_every_rule_exact_is_at_the_float32_floor(tmp_path):
    tint, floor = float32_errors(*compiled_from_folder("qwen3", tmp_path, "float32", ALL_KINDS, EXACT_RULES))
    assert floor["delta_rel_err"] < 1e-5 and tint["delta_rel_err"] <= 5 * floor["delta_rel_err"]
    assert tint["worst_update_rel"] <= 5 * floor["worst_update_rel"]
