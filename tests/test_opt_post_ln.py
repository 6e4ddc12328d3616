"""Post-LN OPT (OPT-350m's layout: the norm after each residual add, no final norm, and the
embeddings projected in and out): the trace gives its dataflow, the oracles agree, and
its TinT equals the ĝ oracle."""

from __future__ import annotations

import pytest
import torch

from ir.frontend import trace
from tintc import pipeline
from tintc.oracle.fidelity import example_input
from tintc.oracle.reference import EXACT, TrainSettings, approx_gd, exact_gd
from tests.models import tiny_config, tiny_model
from tests.test_interpret import TOLERANCE, max_logit_error

POST_LN = dict(do_layer_norm_before=False, word_embed_proj_dim=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_post_ln_opt_with_projections_matches_hf_logits(dtype):
    model = tiny_model("opt", dtype=dtype, **POST_LN)
    graph = trace(model)
    assert max_logit_error(model, graph, 16) <= TOLERANCE[dtype]
    assert graph.node("project_in").shape == ("T", 32) and graph.node("project_out").shape == ("T", 16)
    assert graph.node("h0.ln_attn").inputs == ("h0.resid_attn",)  # the norm follows the residual add
    assert graph.node("h1.resid_mlp").inputs == ("h1.ln_attn", "h1.mlp_out")
    assert graph.node("logits").inputs == ("project_out",) and "ln_final" not in graph
    assert graph.attrs["d_model"] == 32  # the stream, not the 16-wide embeddings


def test_post_ln_exact_rules_equal_exact_gd():
    model = tiny_model("opt", dtype=torch.float64, do_layer_norm_before=False)
    graph = trace(model)
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1))
    train = torch.arange(16)[None] < 8
    settings = TrainSettings(lr=0.05, kinds=("attn_v", "attn_o", "mlp_in", "mlp_out", "norm_bias"),
                             approximations=EXACT)
    exact = exact_gd(model, graph, ids, train, settings)
    approx = approx_gd(graph, {n: p.detach() for n, p in model.named_parameters()}, ids, train, settings)
    assert (exact.logits - exact.logits_before).abs().max() > 1e-3
    assert (approx.logits - exact.logits).abs().max() < 1e-10


KINDS = ["attn_v", "attn_o", "mlp_in", "mlp_out", "norm_bias", "norm_gain"]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("steps,layers,loss", [(1, "all", "context"), (2, "all", "context"),
                                               (1, "top-1", "label_only"), (2, "top-1", "label_only")])
def test_post_ln_tint_equals_the_oracle_in_float64(steps, layers, loss):
    """The norms after the residual adds, project_in (16 -> 32) and project_out (32 -> 16, then the tied
    16-wide head): the loss gradient is taken at project_out's output and flows back through it."""
    cfg = tiny_config("opt", dtype="float64", kinds=KINDS, steps=steps, layers=layers, loss=loss)
    model = tiny_model("opt", dtype=torch.float64, **POST_LN)
    compiled = pipeline.compile_tint(cfg, model)
    ids, train, labels = example_input(model.config.vocab_size, 16, 2, seed=1)
    labels = labels if loss == "label_only" else None
    params = {n: p.detach() for n, p in model.named_parameters()}
    oracle = approx_gd(compiled.graph, params, ids, train, TrainSettings.from_config(cfg, 2), labels)
    with torch.no_grad():
        logits, prefixes = compiled.tint(ids, train, compiled.tint.encode(params), labels)
    assert _rel(oracle.logits, oracle.logits_before) > 1e-4  # the steps changed the model
    assert _rel(logits, oracle.logits) <= 1e-9
    assert _rel(logits - oracle.logits_before, oracle.logits - oracle.logits_before) <= 1e-9
    decoded = compiled.tint.decode(prefixes)
    assert len(oracle.trained) == (24 if layers == "all" else 12)
    for name in oracle.trained:
        assert _rel(decoded[name] - params[name], oracle.params[name] - params[name]) <= 1e-9, name
    for name in set(params) - set(oracle.trained):
        assert torch.equal(decoded[name], params[name].expand_as(decoded[name])), name


@pytest.mark.parametrize("steps,layers,loss", [(1, "all", "context"), (2, "top-1", "label_only")])
def test_post_ln_tint_with_every_rule_exact_is_exact_gd(steps, layers, loss):
    """Every rule exact, q and k trained too, against autograd through the HF model (measured: logits
    ≤6e-13, updates ≤7.3e-11)."""
    exact_rules = {"attention": "exact", "layer_norm": "exact", "activation": "exact"}
    cfg = tiny_config("opt", dtype="float64", kinds=["attn_q", "attn_k", *KINDS], steps=steps, layers=layers,
                      loss=loss, approximations=exact_rules)
    model = tiny_model("opt", dtype=torch.float64, **POST_LN)
    compiled = pipeline.compile_tint(cfg, model)
    ids, train, labels = example_input(model.config.vocab_size, 16, 2, seed=1)
    labels = labels if loss == "label_only" else None
    params = {n: p.detach() for n, p in model.named_parameters()}
    exact = exact_gd(model, compiled.graph, ids, train, TrainSettings.from_config(cfg, 2), labels)
    with torch.no_grad():
        logits, prefixes = compiled.tint(ids, train, compiled.tint.encode(params), labels)
    assert _rel(exact.logits, exact.logits_before) > 1e-4
    assert _rel(logits, exact.logits) <= 1e-9
    assert _rel(logits - exact.logits_before, exact.logits - exact.logits_before) <= 1e-9
    decoded = compiled.tint.decode(prefixes)
    assert any(".q_proj." in n for n in exact.trained) and any(".k_proj." in n for n in exact.trained)
    for name in exact.trained:
        update, got = exact.params[name] - params[name], decoded[name] - params[name]
        if name.endswith("k_proj.bias"):  # softmax ignores a shift of a whole score row: its gradient is 0
            assert update.abs().max() < 1e-15 and got.abs().max() < 1e-15, name
        else:
            assert _rel(got, update) <= 1e-9, name
