"""Phi-3 (Phi3ForCausalLM): a LLaMA whose q|k|v are row ranges of one `qkv_proj` and whose gate|up
are row ranges of one `gate_up_proj`. The trace, the refusals, and the TinT built from a
`save_pretrained` folder against Hugging Face's own autograd (every rule exact) and against ĝ
(the paper's rules), in float64 and in float32."""

from __future__ import annotations

import json

import pytest
import torch

from ir.errors import FrontendError
from ir.frontend import trace
from ir.text import dump
from tintc import pipeline
from tintc.config import parse_config
from tintc.oracle.fidelity import example_input
from tintc.oracle.reference import TrainSettings, approx_gd, exact_gd
from tests.models import TINY, tiny_config, tiny_model

ALL_KINDS = ["attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down", "norm_gain"]
EXACT_RULES = {"attention": "exact", "layer_norm": "exact", "activation": "exact"}
Q, K, V = (0, 32), (32, 48), (48, 64)  # rows of qkv_proj: 4 query heads and 2 k/v heads of 8
GATE, UP = (0, 64), (64, 128)  # rows of gate_up_proj: intermediate_size 64


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _params(model):
    return {n: p.detach() for n, p in model.named_parameters()}


def test_phi3_parts_are_row_ranges_of_the_fused_weights():
    graph = trace(tiny_model("phi3", dtype=torch.float64))
    rows = {role: graph.node(f"h0.{role}").weights["weight"].rows for role in ("q", "k", "v", "mlp_gate", "mlp_up")}
    assert rows == {"q": Q, "k": K, "v": V, "mlp_gate": GATE, "mlp_up": UP}
    assert graph.node("h0.act").inputs == ("h0.mlp_gate",)  # silu of the first half, times the second
    assert graph.node("h0.gated").inputs == ("h0.mlp_up", "h0.act")
    assert "weight=@model.layers.0.self_attn.qkv_proj.weight[48:64]" in dump(graph)  # as `tintc inspect` shows it


def test_phi3_settings_without_a_construction_are_refused_by_name():
    with pytest.raises(FrontendError) as info:
        trace(tiny_model("phi3", sliding_window=8))
    assert info.value.problems == ["model.layers.*.self_attn: sliding_window=8 is not supported; allowed: None"]
    longrope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4, "long_factor": [1.0] * 4,
                "original_max_position_embeddings": 16}
    with pytest.raises(FrontendError) as info:
        trace(tiny_model("phi3", rope_parameters=longrope))
    assert info.value.problems == ["model.rotary_emb: rope_parameters.rope_type='longrope' (rope scaling) is not "
                                   "supported; allowed: default"]


def _compiled_from_folder(tmp_path, dtype: str, **tint):
    """A tiny random Phi-3 saved with save_pretrained, compiled from that folder."""
    tiny_model("phi3", dtype=torch.float64).save_pretrained(tmp_path / "phi3")
    section = {"prefixes": 8, "max_length": 32, "dtype": dtype, "train": {"lr": 0.05, "kinds": ALL_KINDS},
               "approximations": EXACT_RULES, **tint}
    text = json.dumps({"model": {"family": "phi3", "path": "phi3"}, "tint": section})
    cfg = parse_config(text, base_dir=tmp_path)
    return cfg, pipeline.compile_tint(cfg)


def _run(cfg, compiled, oracle):
    """(reference run, TinT logits, decoded weights, θ) on one fixed input; `oracle`: exact or ĝ."""
    model = compiled.model
    ids, train, _ = example_input(model.config.vocab_size, 16, 2, seed=1)
    params = _params(model)
    settings = TrainSettings.from_config(cfg, compiled.graph.attrs["n_layer"])
    if oracle == "exact":
        reference = exact_gd(model, compiled.graph, ids, train, settings)
    else:
        reference = approx_gd(compiled.graph, params, ids, train, settings)
    with torch.no_grad():
        logits, prefixes = compiled.tint(ids, train, compiled.tint.encode(params))
    return reference, logits, compiled.tint.decode(prefixes), params


def test_phi3_from_its_folder_with_every_rule_exact_is_hugging_faces_autograd(tmp_path):
    """fp64, one SGD step, context loss, all layers, every kind: the logit change and every decoded
    update against autograd through the HF model (its RMSNorm without the float32 cast, as compiled).
    Measured: logit change 2e-14, updates ≤ 2e-13."""
    cfg, compiled = _compiled_from_folder(tmp_path, "float64")
    exact, logits, decoded, params = _run(cfg, compiled, "exact")
    change = exact.logits - exact.logits_before
    assert _rel(change, exact.logits_before) > 1e-2  # the step moved the model
    assert _rel(logits - exact.logits_before, change) <= 1e-9
    assert len(exact.trained) == 2 * 6  # per layer: 2 norms, qkv_proj, o_proj, gate_up_proj, down_proj
    for name in exact.trained:
        update = exact.params[name] - params[name]
        assert _rel(decoded[name] - params[name], update) <= 1e-9, name
        if name.endswith("qkv_proj.weight"):  # q and k learn too (updates are [batch, *shape])
            assert all(update[:, a:b].abs().max() > 1e-5 for a, b in (Q, K, V)), name


def test_phi3_with_the_papers_rules_equals_g_hat_and_moves_only_the_trained_rows(tmp_path):
    """attn_v and mlp_up of fused weights: the update is zero outside the v rows and the up rows."""
    kinds = ["attn_v", "attn_o", "mlp_up", "mlp_down", "norm_gain"]
    cfg, compiled = _compiled_from_folder(tmp_path, "float64", train={"lr": 0.05, "kinds": kinds},
                                          approximations={})
    g_hat, logits, decoded, params = _run(cfg, compiled, "g_hat")
    assert _rel(g_hat.logits, g_hat.logits_before) > 1e-3
    assert _rel(logits - g_hat.logits_before, g_hat.logits - g_hat.logits_before) <= 1e-9
    for name in g_hat.trained:
        assert _rel(decoded[name] - params[name], g_hat.params[name] - params[name]) <= 1e-9, name
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
    cfg, compiled = _compiled_from_folder(tmp_path, "float32")
    ids, train, _ = example_input(TINY["phi3"]["vocab_size"], 16, 2, seed=1)
    result = pipeline.verify(cfg, compiled, ids, train)
    floor = result.rounding["delta_rel_err"]
    assert floor < 1e-5 and result.construction_vs_float64["delta_rel_err"] <= 5 * floor
    assert result.construction_vs_float64["worst_update_rel"] <= 5 * result.rounding["worst_update_rel"]
