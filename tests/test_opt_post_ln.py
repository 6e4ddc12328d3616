"""Post-LN OPT (OPT-350m's layout: the norm after each residual add, no final norm, and the
embeddings projected in and out): the trace gives its dataflow and the oracles agree (its TinT
against them: the "opt-post-ln" variant of tests/test_tint.py)."""

from __future__ import annotations

import pytest
import torch

from ir.frontend import trace
from tintc.oracle.reference import EXACT, TrainSettings, approx_gd, exact_gd
from tests.models import tiny_model
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
