"""Every stream-narrowing lever at once (examples/gpt2-compact.yaml's passes): the standard view stays the
fast executor's function and exports as plain blocks, the TinT stays ĝ's, and the view is narrower and
holds fewer rows than with no lever."""

from __future__ import annotations

from collections import Counter

import pytest

from tintc.oracle.fidelity import example_input
from tintc.report.dense_count import dense_counts
from tests.helpers import EXACT_RULES
from tests.test_shared_rows import _compile, _view_against_fast
from tests.test_split_mlp import _run_against_g_hat
from tests.test_standard import VIEWS, expected_ops, op_histogram

# the micro models: hidden 16, 2 heads, T = 8 (attention_rows: 16 // 8 = 2 heads, so 1 is set); each head
# reads its whole row (head splitting off: the hidden size after split_mlp, Gemma 2's o its 24 inputs)
COMPACT = {"split_mlp": {"enabled": True}, "head_splitting": {"enabled": False}, "shared_rows": {"enabled": True},
           "attention_rows": {"enabled": True, "heads": 1}, "prefix_stacking": {"enabled": False}}
CASES = {"gpt2-paper": ("gpt2", {}), "opt-exact": ("opt", EXACT_RULES), "llama-paper": ("llama", {}),
         "gpt_neox-paper": ("gpt_neox", {}), "gemma2-exact": ("gemma2", EXACT_RULES)}


@pytest.mark.parametrize("case", CASES)
def test_the_compact_tint_is_g_hat_and_its_view_the_fast_executor(case):
    family, rules = CASES[case]
    cfg, model, compiled = _compile(family, rules, COMPACT)
    logits_error, prefix_error, _ = _view_against_fast(compiled, model)
    assert logits_error <= 1e-10 and prefix_error <= 1e-10
    logits, updates, moved = _run_against_g_hat(cfg, model, compiled)
    assert moved > 1e-3 and logits <= 1e-9 and updates <= 1e-9


def test_the_compact_view_exports_as_blocks_and_counts_fewer_rows_than_none():
    _, model, compiled = _compile("gpt2", {}, COMPACT)
    _, _, plain = _compile("gpt2", {})
    view = compiled.tint.standard()
    ids, train, _ = example_input(model.config.vocab_size, 6, 1, seed=1)
    h0 = view.embed(ids, train, compiled.tint.encode({n: p.detach() for n, p in model.named_parameters()}))
    assert Counter({op: n for op, n in op_histogram(view, 6, h0).items() if op not in VIEWS}) == expected_ops(view)
    compact, none = (dense_counts(c.tint.program, c.tint.layers)["reference_convention"] for c in (compiled, plain))
    assert compact["d_sim"] < none["d_sim"] and compact["dense"]["total"] < none["dense"]["total"]
