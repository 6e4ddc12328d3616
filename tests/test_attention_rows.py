"""tint.passes.attention_rows: the stop-gradient attention backward makes its attention rows a head
group at a time (ir/passes/attention_rows.py). The TinT stays ĝ's and the standard view the fast
executor's function, and the widest point of the stream narrows."""

from __future__ import annotations

import pytest

from tintc.report.dense_count import working_set
from tests.test_shared_rows import _compile, _view_against_fast
from tests.test_split_mlp import _run_against_g_hat

ON = {"attention_rows": {"enabled": True, "heads": 1}}  # the micro models have 2 heads


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])  # learned positions, rotary, grouped-query
def test_rows_by_head_keep_the_tint_g_hat_and_the_view_the_fast_executor(family):
    cfg, model, compiled = _compile(family, {}, ON)
    _, _, whole = _compile(family, {})
    layers = [c.layer for c in compiled.tint.program.calls if c.layer.startswith("attention_rows")]
    whole_layers = [c.layer for c in whole.tint.program.calls if c.layer.startswith("attention_rows")]
    assert len(layers) == 2 * len(whole_layers) > 0  # one call per head
    logits_error, prefix_error, _ = _view_against_fast(compiled, model)
    assert logits_error <= 1e-10 and prefix_error <= 1e-10
    logits, updates, moved = _run_against_g_hat(cfg, model, compiled)
    assert moved > 1e-3 and logits <= 1e-9 and updates <= 1e-9


def test_rows_by_head_narrow_the_working_set_and_the_exact_rule_is_left_whole():
    """The tiny GPT-2 with 8 heads at T = 64: its widest point is the attention backward's 8·64 rows."""
    from tests.helpers import compile_tiny

    def widest(heads):
        passes = {"attention_rows": {"enabled": heads is not None, "heads": heads}}
        compiled = compile_tiny("gpt2", overrides={"n_head": 8, "n_positions": 64}, max_length=64, passes=passes)[2]
        return working_set(compiled.tint.program)[0]

    assert widest(2) < widest(None) - 4 * 64  # the rows of 2 heads, not 8: the next peak is higher
    _, _, exact = _compile("gpt2", {"attention": "exact"}, ON)
    assert not [n for n in exact.train_graph.nodes() if "row_heads" in n.attrs]
