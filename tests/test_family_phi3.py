"""Phi-3 (Phi3ForCausalLM): a LLaMA whose q|k|v are row ranges of one `qkv_proj` and whose gate|up
are row ranges of one `gate_up_proj`. The trace, the refusals, and the TinT built from a
`save_pretrained` folder against Hugging Face's own autograd (every rule exact) and against ĝ
(the paper's rules), in float64 and in float32."""

from __future__ import annotations

import pytest
import torch

from ir.errors import ConfigError, FrontendError
from ir.frontend import trace
from ir.text import dump
from tests.families import EXACT_RULES, compiled_from_folder, float32_errors, rel, run, tint_agrees
from tests.models import tiny_config, tiny_model
from tintc import pipeline
from tests.test_interpret import max_logit_error

ALL_KINDS = ["attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down", "norm_gain"]
Q, K, V = (0, 32), (32, 48), (48, 64)  # rows of qkv_proj: 4 query heads and 2 k/v heads of 8
GATE, UP = (0, 64), (64, 128)  # rows of gate_up_proj: intermediate_size 64


def test_phi3_parts_are_row_ranges_of_the_fused_weights():
    graph = trace(tiny_model("phi3", dtype=torch.float64))
    rows = {role: graph.node(f"h0.{role}").weights["weight"].rows for role in ("q", "k", "v", "mlp_gate", "mlp_up")}
    assert rows == {"q": Q, "k": K, "v": V, "mlp_gate": GATE, "mlp_up": UP}
    assert graph.node("h0.act").inputs == ("h0.mlp_gate",)  # silu of the first half, times the second
    assert graph.node("h0.gated").inputs == ("h0.mlp_up", "h0.act")
    assert "weight=@model.layers.0.self_attn.qkv_proj.weight[48:64]" in dump(graph)  # as `tintc inspect` shows it


def test_phi3_partial_rotary_is_read_from_the_trace():
    """Phi-4-mini (a Phi3ForCausalLM) rotates 3/4 of each head: partial_rotary_factor."""
    model = tiny_model("phi3", dtype=torch.float64, partial_rotary_factor=0.5)
    graph = trace(model)
    assert {n.attrs["rotary_dim"] for n in graph.nodes() if n.kind == "attention"} == {4}
    assert max_logit_error(model, graph, 16) <= 1e-10


def test_phi3_settings_without_a_construction_are_refused_by_name():
    """A sliding window (Phi-3-mini's config has 2047) is traced, and refused as Mistral's is when traced for a
    longer TinT; a window as long as the TinT hides no key and is dropped."""
    model = tiny_model("phi3", dtype=torch.float64, sliding_window=8)
    graph = trace(model)
    assert {n.attrs.get("window") for n in graph.nodes() if n.kind == "attention"} == {8}
    assert max_logit_error(model, graph, 16) <= 1e-10  # 16 tokens > 8: the window changes the logits
    with pytest.raises(ConfigError) as info:
        pipeline.trace(tiny_config("phi3", max_length=16), model)
    assert info.value.problems == ["model.config.sliding_window: got 8, shorter than the TinT's max length 16; "
                                   "allowed: a window of at least tint.max_length (or none)"]
    compiled = pipeline.compile_tint(tiny_config("phi3", max_length=8, kinds=["attn_v"]), model)
    assert not any("window" in n.attrs for n in compiled.graph.nodes())  # as long as the TinT: no window
    longrope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4, "long_factor": [1.0] * 4,
                "original_max_position_embeddings": 16}
    with pytest.raises(FrontendError) as info:
        trace(tiny_model("phi3", rope_parameters=longrope))
    assert info.value.problems == ["model.rotary_emb: rope_parameters.rope_type='longrope' (rope scaling) is not "
                                   "supported; allowed: default"]


def _compiled_from_folder(tmp_path, dtype: str, kinds=ALL_KINDS, approximations=EXACT_RULES):
    return compiled_from_folder("phi3", tmp_path, dtype, kinds, approximations)


def test_phi3_from_its_folder_with_every_rule_exact_is_hugging_faces_autograd(tmp_path):
    """fp64, one SGD step, context loss, all layers, every kind: the logit change and every decoded
    update against autograd through the HF model (its RMSNorm without the float32 cast, as compiled).
    Measured: logit change 2e-14, updates ≤ 2e-13."""
    cfg, compiled = _compiled_from_folder(tmp_path, "float64")
    exact, logits, decoded, params = run(cfg, compiled, "exact")
    change = exact.logits - exact.logits_before
    assert rel(change, exact.logits_before) > 1e-2  # the step moved the model
    assert rel(logits - exact.logits_before, change) <= 1e-9
    assert len(exact.trained) == 2 * 6  # per layer: 2 norms, qkv_proj, o_proj, gate_up_proj, down_proj
    for name in exact.trained:
        update = exact.params[name] - params[name]
        assert rel(decoded[name] - params[name], update) <= 1e-9, name
        if name.endswith("qkv_proj.weight"):  # q and k learn too (updates are [batch, *shape])
            assert all(update[:, a:b].abs().max() > 1e-5 for a, b in (Q, K, V)), name


def test_phi3_with_the_papers_rules_equals_g_hat_and_moves_only_the_trained_rows(tmp_path):
    """attn_v and mlp_up of fused weights: the update is zero outside the v rows and the up rows."""
    kinds = ["attn_v", "attn_o", "mlp_up", "mlp_down", "norm_gain"]
    cfg, compiled = _compiled_from_folder(tmp_path, "float64", kinds, approximations={})
    g_hat, logits, decoded, params = run(cfg, compiled, "g_hat")
    assert rel(g_hat.logits, g_hat.logits_before) > 1e-3
    tint_agrees(g_hat, logits, decoded, params, 1e-9)
    for layer in range(2):
        qkv = f"model.layers.{layer}.self_attn.qkv_proj.weight"
        gate_up = f"model.layers.{layer}.mlp.gate_up_proj.weight"
        for name, (start, stop) in ((qkv, V), (gate_up, UP)):
            update = decoded[name] - params[name]  # [batch, rows, columns]
            assert update[:, start:stop].abs().max() > 1e-5, name
            assert torch.equal(update[:, :start], torch.zeros_like(update[:, :start])), name
            assert torch.equal(update[:, stop:], torch.zeros_like(update[:, stop:])), name


def test_phi3_in_float32_is_at_the_float32_floor(tmp_path):
    """As `tintc verify` shows it: the float32 TinT against ĝ in float64 beside the floor, ĝ in float32
    against ĝ in float64 (every rule exact). Measured: logit change 7.3e-7 beside a floor of 2.3e-7;
    the worst update 1.9e-4 beside 1.9e-4."""
    tint, floor = float32_errors(*_compiled_from_folder(tmp_path, "float32"))
    assert floor["delta_rel_err"] < 1e-5 and tint["delta_rel_err"] <= 5 * floor["delta_rel_err"]
    assert tint["worst_update_rel"] <= 5 * floor["worst_update_rel"]
