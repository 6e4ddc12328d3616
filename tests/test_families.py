"""The LLaMA family (LLaMA, Qwen2, Mistral) through the tracing frontend and the oracles:
what the trace finds (GQA, rotary, biases per projection, tied or untied head, sliding
window), the settings refused, and ĝ against exact GD (logits against HF are in
test_interpret.py, local checkpoints and dump → parse in test_frontend.py and test_text.py)."""

from __future__ import annotations

import pytest
import torch

from ir.frontend import trace
from ir.interpret import Interpreter
from ir.passes import run_passes
from ir.passes.autodiff import autodiff
from ir.passes.select_train import kinds_of, select_train
from ir.text import dump, parse
from tintc import pipeline
from ir.errors import ConfigError, FrontendError, PassError
from tintc.oracle.reference import EXACT, TrainSettings, approx_gd, exact_gd, with_approximations
from tintc.oracle.fidelity import example_input
from tests.models import tiny_config, tiny_model
from tests.test_interpret import max_logit_error
from tests.helpers import params_of, traced_tiny

GATED_KINDS = ("attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down", "norm_gain")


def test_llama_trace_has_grouped_query_rotary_attention_and_a_gated_mlp():
    graph = trace(tiny_model("llama"))
    attn = graph.node("h0.attn").attrs
    assert (attn["heads"], attn["kv_heads"], attn["head_dim"]) == (4, 2, 8)
    assert (attn["positions"], attn["rotary_dim"], attn["rope_theta"]) == ("rope", 8, 10000.0)
    assert graph.node("h0.k").shape == ("T", 16)
    assert [n.kind for n in graph.nodes() if n.attrs.get("layer") == 0] == [
        "rms_norm", "linear", "linear", "linear", "attention", "linear", "add",
        "rms_norm", "linear", "activation", "linear", "mul", "linear", "add"]
    assert graph.node("h0.gated").inputs == ("h0.act", "h0.mlp_up")
    assert graph.node("logits").weights["weight"].name == "model.embed_tokens.weight"  # tied


def test_qwen2_has_q_k_v_biases_only_and_an_untied_head():
    graph = trace(tiny_model("qwen2"))
    biased = {n.attrs["role"] for n in graph.nodes() if n.kind == "linear" and "bias" in n.weights}
    assert biased == {"q", "k", "v"}
    assert graph.node("logits").weights["weight"].name == "lm_head.weight"


def test_a_rope_theta_other_than_the_default_is_read_from_the_config():
    model = tiny_model("llama", rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    graph = trace(model)
    assert graph.node("h1.attn").attrs["rope_theta"] == 500.0
    assert max_logit_error(model, graph, 16) <= 1e-5


def test_rope_scaling_is_refused_with_the_allowed_types():
    model = tiny_model("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(FrontendError) as info:
        trace(model)
    assert info.value.problems == ["model.rotary_emb: rope_parameters.rope_type='linear' (rope scaling) is not "
                                   "supported; allowed: default"]


def test_mistral_sliding_window_is_an_attention_attribute_and_matches_hf():
    model = tiny_model("mistral", sliding_window=4)
    graph = trace(model)
    assert {n.attrs.get("window") for n in graph.nodes() if n.kind == "attention"} == {4}
    assert max_logit_error(model, graph, 16) <= 1e-5  # 16 > 4: the window changes the logits


def test_mistral_window_shorter_than_the_tint_is_refused():
    cfg = tiny_config("mistral", max_length=16)
    with pytest.raises(ConfigError) as info:
        pipeline.trace(cfg, tiny_model("mistral", sliding_window=8))
    assert info.value.problems == ["model.config.sliding_window: got 8, shorter than the TinT's max length 16; "
                                   "allowed: a window of at least tint.max_length (or none)"]
    assert pipeline.trace(cfg, tiny_model("mistral", sliding_window=16)).attrs["family"] == "mistral"


def test_kinds_a_family_lacks_are_refused_with_the_allowed_list():
    graph = trace(tiny_model("llama"))
    assert tuple(kinds_of(graph)) == GATED_KINDS
    with pytest.raises(PassError) as info:
        select_train(graph, [0, 1], ["attn_v", "mlp_in", "norm_bias"])
    assert info.value.problems == [
        "parameter kinds ['mlp_in', 'norm_bias'] do not exist in this llama model; allowed: " + ", ".join(GATED_KINDS)]


def test_a_window_as_long_as_the_tint_is_no_window():
    """Query t sees keys j with t − j < window: with window ≥ tint.max_length that is every earlier key, so the
    compile drops the window (before issue 26 it refused it)."""
    cfg = tiny_config("mistral", kinds=["attn_v"], max_length=16)
    compiled = pipeline.compile_tint(cfg, tiny_model("mistral", sliding_window=16))
    assert not any("window" in n.attrs for n in compiled.graph.nodes())
    with pytest.raises(PassError) as info:  # the pass itself still has no construction of a window
        autodiff(trace(tiny_model("mistral", sliding_window=16)), 1, 0.1)
    assert info.value.problems[0] == ("node %h0.attn (model.layers.0.self_attn): attention with a window has no "
                                      "TinT construction yet; allowed: the ops of GPT-2, OPT, LLaMA and GPT-NeoX")


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_approximate_gd_with_exact_rules_equals_exact_gd(family):
    model, graph, ids, train, labels = traced_tiny(family)
    settings = TrainSettings(lr=0.05, steps=2, kinds=GATED_KINDS, approximations=EXACT)
    exact = exact_gd(model, graph, ids, train, settings)
    approx = approx_gd(graph, params_of(model), ids, train, settings)
    assert (exact.logits - exact.logits_before).abs().max() > 1e-2  # training moved the logits
    assert (approx.logits - exact.logits).abs().max() < 1e-10
    for name in exact.trained:
        assert (approx.params[name] - exact.params[name]).abs().max() < 1e-12


def test_stop_gradient_with_grouped_query_attention_sums_over_the_sharing_heads():
    model, graph, ids, train, _ = traced_tiny("llama", length=8, batch=1)
    settings = TrainSettings(lr=0.05, layers=(1,), kinds=("attn_v",), approximations=EXACT)
    stop = with_approximations(settings, attention="stop_gradient")
    exact, approx = (approx_gd(graph, params_of(model), ids, train, s) for s in (settings, stop))
    name = "model.layers.1.self_attn.v_proj.weight"  # the top layer: v's gradient needs no score gradient
    assert torch.allclose(approx.params[name], exact.params[name], rtol=0, atol=1e-12)
    assert (approx.params[name] - params_of(model)[name]).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("steps", [1, 2])
def test_with_every_rule_exact_the_training_graph_is_exact_gd(family, steps):
    """attention_score_backward under rotary positions and grouped-query attention: the score gradient of
    the rotated q and k, ∂q and ∂k rotated back (Rᵀ), ∂k summed over the query heads of its k/v head.
    The graph as compiled (pipeline.trace: a float64 TinT's RMSNorm normalises in float64)."""
    model = tiny_model(family, dtype=torch.float64)
    graph = pipeline.trace(tiny_config(family, dtype="float64"), model)
    tg = run_passes(graph, [(select_train, {"layers": [0, 1], "kinds": list(GATED_KINDS)}),
                            (autodiff, {"steps": steps, "lr": 0.05, "attention": "exact", "layer_norm": "exact",
                                        "activation": "exact"})])
    assert parse(dump(tg)) == tg  # the rope and kv_heads attributes of the score backward survive the text
    scores = [n for n in tg.nodes() if n.kind == "attention_score_backward"]
    assert len(scores) == 2 * 2 * steps  # q and k, 2 layers
    assert {n.shape for n in scores if n.attrs["wrt"] == "k"} == {("T", 2 * 8)}  # 2 k/v heads of 8
    ids, train, _ = example_input(graph.attrs["vocab"], 16, 2, seed=1)
    params = params_of(model)
    settings = TrainSettings(lr=0.05, steps=steps, kinds=GATED_KINDS, approximations=EXACT)
    exact = exact_gd(model, graph, ids, train, settings)
    result = Interpreter(tg).execute(params, ids, train)
    assert (result.logits - exact.logits).abs().max() < 1e-10
    for name in exact.trained:
        assert (result.params[name] - exact.params[name]).abs().max() < 1e-10, name
        if ".q_proj." in name or ".k_proj." in name:
            assert (exact.params[name] - params[name]).abs().max() > 1e-5, name  # the queries and keys moved


def test_exact_gd_normalises_as_the_graph_says():
    """HF's RMSNorm rounds to float32 inside a float64 model. The compiled graph drops that cast, and
    exact GD on it runs the HF model with its RMSNorm in float64 (the interpreter's ĝ with every rule
    exact is then the same to rounding); on the traced graph, which keeps the cast, HF's as it is."""
    model = tiny_model("llama", dtype=torch.float64)
    traced, compiled = trace(model), pipeline.trace(tiny_config("llama", dtype="float64"), model)
    assert {n.attrs.get("upcast") for n in traced.nodes() if n.kind == "rms_norm"} == {"float32"}
    assert {n.attrs.get("upcast") for n in compiled.nodes() if n.kind == "rms_norm"} == {None}
    ids, train, _ = example_input(traced.attrs["vocab"], 16, 2, seed=1)
    settings = TrainSettings(lr=0.05, kinds=GATED_KINDS, approximations=EXACT)
    hf_cast, wide = (exact_gd(model, g, ids, train, settings) for g in (traced, compiled))
    approx = approx_gd(compiled, params_of(model), ids, train, settings)
    assert (wide.logits - approx.logits).abs().max() < 1e-12
    assert (hf_cast.logits - wide.logits).abs().max() > 1e-9  # the float32 rounding is real
    assert (hf_cast.logits - approx_gd(traced, params_of(model), ids, train, settings).logits).abs().max() < 1e-12
    assert not any("forward" in vars(m) for m in model.modules())  # the HF modules are as they were


# -- GPT-NeoX (Pythia) ------------------------------------------------------------------------
NEOX_KINDS = ("attn_q", "attn_k", "attn_v", "attn_o", "mlp_in", "mlp_out", "norm_gain", "norm_bias")


def test_gpt_neox_parallel_residual_sums_attention_and_mlp_then_adds_the_stream():
    graph = trace(tiny_model("gpt_neox"))
    assert graph.node("h0.ln_mlp").inputs == ("tok_embed",)  # the MLP reads the block input, as attention does
    assert graph.node("h0.branches").inputs == ("h0.o", "h0.mlp_out")
    assert graph.node("h0.resid").inputs == ("tok_embed", "h0.branches")
    assert graph.node("h1.ln_attn").inputs == graph.node("h1.ln_mlp").inputs == ("h0.resid",)
    assert graph.node("logits").weights["weight"].name == "lm_head.weight"  # untied
    sequential = trace(tiny_model("gpt_neox", use_parallel_residual=False))
    assert sequential.node("h0.ln_mlp").inputs == ("h0.resid_attn",) and "h0.branches" not in sequential


def test_gpt_neox_q_k_v_are_per_head_row_slices_of_the_fused_projection():
    """query_key_value's rows are [q|k|v] per head: q of head h is rows 24h..24h+7 (head_dim 8)."""
    model = tiny_model("gpt_neox")
    graph = trace(model)
    fused = model.gpt_neox.layers[0].attention.query_key_value.weight.detach()
    params = dict(model.named_parameters())
    for i, role in enumerate("qkv"):
        ref = graph.node(f"h0.{role}").weights["weight"]
        assert (ref.rows, ref.period) == ((8 * i, 8 * i + 8), 24)
        expected = torch.cat([fused[24 * h + 8 * i: 24 * h + 8 * i + 8] for h in range(4)])
        assert torch.equal(ref.resolve(params), expected)


@pytest.mark.parametrize("rotary_pct, rotary_dim", [(0.25, 2), (0.5, 4), (1.0, 8)])
def test_gpt_neox_partial_rotary_is_read_from_the_trace(rotary_pct, rotary_dim):
    model = tiny_model("gpt_neox", rotary_pct=rotary_pct, dtype=torch.float64)
    graph = trace(model)
    assert {n.attrs["rotary_dim"] for n in graph.nodes() if n.kind == "attention"} == {rotary_dim}
    assert max_logit_error(model, graph, 16) <= 1e-10


def test_gpt_neox_kinds_and_refusals():
    graph = trace(tiny_model("gpt_neox"))
    assert tuple(kinds_of(graph)) == NEOX_KINDS
    with pytest.raises(PassError) as info:
        select_train(graph, [0, 1], ["attn_v", "mlp_up"])
    assert info.value.problems == [
        "parameter kinds ['mlp_up'] do not exist in this gpt_neox model; allowed: " + ", ".join(NEOX_KINDS)]
    with pytest.raises(FrontendError) as info:
        trace(tiny_model("gpt_neox", hidden_act="gelu_fast"))
    assert info.value.problems == ["gpt_neox.layers.*.mlp.act: hidden_act='gelu_fast' is not supported; allowed: "
                                   "gelu_new, gelu_pytorch_tanh, gelu, relu"]


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_gpt_neox_approximate_gd_with_exact_rules_equals_exact_gd(parallel):
    model = tiny_model("gpt_neox", dtype=torch.float64, use_parallel_residual=parallel)
    graph = trace(model)
    ids, train, _ = traced_tiny("gpt_neox")[2:]
    settings = TrainSettings(lr=0.05, steps=2, kinds=NEOX_KINDS, approximations=EXACT)
    exact = exact_gd(model, graph, ids, train, settings)
    approx = approx_gd(graph, params_of(model), ids, train, settings)
    assert (exact.logits - exact.logits_before).abs().max() > 1e-2  # training moved the logits
    assert (approx.logits - exact.logits).abs().max() < 1e-10
    assert "gpt_neox.layers.0.attention.query_key_value.weight" in exact.trained
    for name in exact.trained:
        assert (approx.params[name] - exact.params[name]).abs().max() < 1e-12
