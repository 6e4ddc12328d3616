"""The standard view of micro rows of tests/models.py (LLaMA, GPT-NeoX) equals the fast executor and the
oracle, and the example configs of the LLaMA and GPT-NeoX families compile with their shapes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tintc import pipeline
from tintc.config import load_config
from tests.helpers import EXACT_RULES, check_round, compile_tiny, rel_err, run_round
from tests.models import MICRO
from tests.test_tint import KINDS

EXAMPLES = Path(__file__).parent.parent / "examples"
# (family, model overrides, rules): the exact rules need no new sublayer kind
VIEWS = {
    "llama": ("llama", {}, {}),
    "llama-every-rule-exact": ("llama", {}, EXACT_RULES),
    "neox-parallel": ("gpt_neox", {"use_parallel_residual": True}, {}),
    "neox-sequential": ("gpt_neox", {"use_parallel_residual": False}, {}),
}


@pytest.mark.parametrize("view", VIEWS)
def test_standard_view_of_a_micro_model_equals_the_fast_executor_and_the_oracle(view):
    family, overrides, rules = VIEWS[view]
    kinds = (["attn_q", "attn_k"] if rules else []) + KINDS[family]
    cfg, model, compiled = compile_tiny(family, table=MICRO, overrides=overrides, prefixes=4, max_length=8,
                                        kinds=kinds, approximations=rules)
    r = run_round(cfg, model, compiled, against="exact" if rules else "g_hat", length=8)
    standard = compiled.tint.standard()
    assert {b.kind for b in standard.plan.blocks} <= {"attention", "mlp", "norm"}
    with torch.no_grad():
        logits, prefixes = standard(r.ids, r.train, compiled.tint.encode(r.params))
    assert rel_err(logits, r.logits) <= 1e-9  # the fast executor
    check_round(replace(r, logits=logits, decoded=compiled.tint.decode(prefixes)), 1e-9)  # the view's own result against the oracle


def test_the_llama_example_compiles_with_widths_that_divide_the_gated_mlp():
    """examples/llama-tiny.yaml: D = 96, inner width 256; the default head width is their gcd, 32."""
    compiled = pipeline.compile_tint(load_config(EXAMPLES / "llama-tiny.yaml"))
    widths = {n.attrs.get("head_width") for n in compiled.train_graph.nodes() if n.kind == "linear"}
    assert widths == {32}


def test_the_pythia_example_compiles():
    """examples/pythia-tiny.yaml: head_dim 16, rotary_pct 0.25, parallel residual, untied head."""
    compiled = pipeline.compile_tint(load_config(EXAMPLES / "pythia-tiny.yaml"))
    assert compiled.graph.attrs["family"] == "gpt_neox"
    assert {n.attrs["rotary_dim"] for n in compiled.graph.nodes() if n.kind == "attention"} == {4}
    assert "h1.branches" in compiled.graph and not compiled.tint.program.layout.tied
