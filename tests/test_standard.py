"""The standard view (backends/torch/standard.py): the TinT as a plain stack of transformer blocks
equals the fast executor and the ĝ oracle, and its exported graph holds only block operations."""

from __future__ import annotations

import functools
import itertools
from collections import Counter

import pytest
import torch

from backends.torch.standard import AttentionBlock, MLPBlock
from ir.activations import ACTIVATIONS
from tintc import pipeline
from tintc.oracle.fidelity import example_input
from tintc.oracle.reference import TrainSettings, approx_gd
from tests.models import MICRO, tiny_config, tiny_model

KINDS = ["attn_v", "attn_o", "mlp_in", "mlp_out", "norm_gain", "norm_bias"]


def _passes(stacking, splitting, partition, sharing):
    return {"prefix_stacking": {"enabled": stacking}, "head_splitting": {"enabled": splitting, "width": 8},
            "sub_mlp": {"enabled": partition, "width": 8}, "block_sharing": {"enabled": sharing}}


def _compile(family, switches=(True,) * 4, passes_low_rank=False, **tint):
    passes = {**_passes(*switches), "low_rank": {"enabled": passes_low_rank}}
    cfg = tiny_config(family, table=MICRO, dtype="float64", prefixes=4, max_length=8, passes=passes,
                      **{"kinds": KINDS, **tint})
    model = tiny_model(family, dtype=torch.float64, table=MICRO)
    return cfg, model, pipeline.compile_tint(cfg, model)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


CASES = ([("opt", s, 1, "context") for s in itertools.product([True, False], repeat=4)]
         + [(f, s, 2, "context") for f in ("gpt2", "opt") for s in ((True,) * 4, (False,) * 4)]
         + [("gpt2", (True,) * 4, 1, "context"), ("gpt2", (True,) * 4, 1, "label_only")])


@pytest.mark.parametrize("family,switches,steps,loss", CASES)
def test_standard_view_equals_the_fast_executor_and_the_oracle(family, switches, steps, loss):
    cfg, model, compiled = _compile(family, switches, steps=steps, loss=loss)
    ids, train, labels = example_input(model.config.vocab_size, 8, 2, seed=1)
    labels = labels if loss == "label_only" else None
    params = {n: p.detach() for n, p in model.named_parameters()}
    prefixes = compiled.tint.encode(params)
    view = compiled.tint.standard()
    with torch.no_grad():
        fast_logits, _ = compiled.tint(ids, train, prefixes, labels)
        logits, new_prefixes = view(ids, train, prefixes, labels)
    oracle = approx_gd(compiled.graph, params, ids, train, TrainSettings.from_config(cfg, 2), labels)
    assert _rel(oracle.logits, oracle.logits_before) > 1e-3  # the steps changed the model
    assert _rel(logits, fast_logits) <= 1e-9
    assert _rel(logits, oracle.logits) <= 1e-9
    decoded = compiled.tint.decode(new_prefixes)
    for name in oracle.trained:
        update = oracle.params[name] - params[name]
        assert _rel(decoded[name] - params[name], update) <= 1e-8, name


EXACT = {"attention": "exact", "layer_norm": "exact", "activation": "exact"}


GATED_KINDS = ["attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down", "norm_gain"]


@pytest.mark.parametrize("family,rules", [("opt", {"attention": "exact"}), ("opt", EXACT), ("gpt2", EXACT),
                                          ("llama", EXACT)])
def test_standard_view_of_the_exact_rules(family, rules):
    """Every exact construction as plain blocks: tanh-GELU' (gpt2), ReLU' (opt), SiLU' and RMSNorm (llama)."""
    kinds = GATED_KINDS if family == "llama" else ["attn_q", "attn_k", *KINDS]
    cfg, model, compiled = _compile(family, steps=1, approximations=rules, kinds=kinds)
    ids, train, _ = example_input(model.config.vocab_size, 8, 2, seed=1)
    params = {n: p.detach() for n, p in model.named_parameters()}
    prefixes = compiled.tint.encode(params)
    view = compiled.tint.standard()
    with torch.no_grad():
        fast_logits, _ = compiled.tint(ids, train, prefixes)
        logits, _ = view(ids, train, prefixes)
    oracle = approx_gd(compiled.graph, params, ids, train, TrainSettings.from_config(cfg, 2))
    assert _rel(logits, fast_logits) <= 1e-9 and _rel(logits, oracle.logits) <= 1e-9
    if family == "gpt2" and rules == EXACT:  # tanh units (the exact gelu_tanh derivative) in the export too
        histogram = op_histogram(view, 8, view.embed(ids, train, prefixes))
        assert histogram["aten.tanh.default"] > 0
        assert Counter({op: n for op, n in histogram.items() if op not in VIEWS}) == expected_ops(view)


# -- the exported graph ------------------------------------------------------------------------
VIEWS = {"aten.mT.default", "aten.numpy_T.default", "aten.select.int", "aten.unsqueeze.default",
         "aten.unflatten.int", "aten.flatten.using_ints"}  # views: no arithmetic


def expected_ops(view) -> Counter:
    """The ATen ops the blocks compute: per attention block 6 matrix products (q, k, v, scores,
    weights·v, O), the mask, the sum over heads and a softmax if it has one; per gated MLP 3
    products, the activation and the ⊙; per norm 2 products and the layer norm; one more product
    per factored projection; each block one residual add."""
    ops = Counter()
    for b, module in zip(view.plan.blocks, view.stack.blocks):
        ops["aten.matmul.default"] += sum(s is not None for n, s in vars(module)["_parameters"].items()
                                          if n.startswith("s_"))  # a factored projection: one more product
        ops["aten.add.Tensor"] += 1
        if b.kind == "attention":
            ops.update({"aten.matmul.default": 6, "aten.masked_fill.Scalar": 1, "aten.sum.dim_IntList": 1})
            ops["aten.softmax.int"] += b.softmax
        elif b.kind == "mlp":
            ops.update({"aten.matmul.default": 3, "aten.mul.Tensor": 1})
            ops.update(activation_ops(b.act))
        else:
            ops.update({"aten.matmul.default": 2, "aten.layer_norm.default": 1})
    return ops


@functools.cache
def activation_ops(act: str) -> Counter:
    """The ATen ops of one activation of ir/activations.py, exported alone (tanh-GELU is its formula,
    op by op, as the executor computes it; the identity has none)."""
    class Activation(torch.nn.Module):
        def forward(self, x):
            return ACTIVATIONS[act](x)

    exported = torch.export.export(Activation(), (torch.ones(2, 3, dtype=torch.float64),))
    return Counter(str(n.target) for n in exported.graph.nodes if n.op == "call_function")


def op_histogram(view, length: int, h0) -> Counter:
    exported = torch.export.export(view.stack, (h0, view.masks(length)))
    return Counter(str(n.target) for n in exported.graph.nodes if n.op == "call_function")


@pytest.fixture(scope="module")
def exported_view():
    cfg, model, compiled = _compile("gpt2")
    ids, train, _ = example_input(model.config.vocab_size, 6, 1, seed=1)
    params = {n: p.detach() for n, p in model.named_parameters()}
    view = compiled.tint.standard()
    return view, view.embed(ids, train, compiled.tint.encode(params))


def test_the_exported_standard_view_holds_only_block_operations(exported_view):
    view, h0 = exported_view
    histogram = op_histogram(view, 6, h0)
    assert set(histogram) - VIEWS - set(expected_ops(view)) == set()
    assert Counter({op: n for op, n in histogram.items() if op not in VIEWS}) == expected_ops(view)
    assert {b.kind for b in view.plan.blocks} == {"attention", "mlp", "norm"}


def test_the_export_check_catches_an_op_patched_in_between_blocks(exported_view, monkeypatch):
    view, h0 = exported_view
    original = MLPBlock.forward
    monkeypatch.setattr(MLPBlock, "forward", lambda self, h: original(self, h) * 1.0)  # arithmetic on the stream
    histogram = op_histogram(view, 6, h0)
    assert Counter({op: n for op, n in histogram.items() if op not in VIEWS}) != expected_ops(view)


def test_the_standard_view_has_no_overwrite_every_block_adds(exported_view):
    """Each block's output is its input plus the sublayer's: zeroing the sublayer leaves h unchanged."""
    view, h0 = exported_view
    for block in list(view.stack.blocks)[:20]:
        saved = {n: p.detach().clone() for n, p in block.named_parameters()}
        with torch.no_grad():
            for p in block.parameters():
                p.zero_()
            out = block(h0, view.masks(6)[0]) if isinstance(block, AttentionBlock) else block(h0)
            for n, p in block.named_parameters():
                p.copy_(saved[n])
        assert torch.equal(out, h0)


def test_the_emitted_package_builds_the_same_standard_view(tmp_path):
    from backends.torch.emit import import_package
    from tintc.pipeline import emit

    cfg, model, compiled = _compile("opt", steps=1)
    emit(compiled, cfg, tmp_path)
    package = import_package(tmp_path)
    ids, train, _ = example_input(model.config.vocab_size, 8, 1, seed=2)
    prefixes = compiled.tint.encode({n: p.detach() for n, p in model.named_parameters()})
    with torch.no_grad():
        expected, _ = compiled.tint(ids, train, prefixes)
        logits, _ = package.standard(tmp_path)(ids, train, prefixes)
    assert _rel(logits, expected) <= 1e-9


# -- the dense counts (tintc/report/dense_count.py) ---------------------------------------------------
def test_the_dense_count_equals_the_built_standard_view():
    from tintc.report.dense_count import dense_counts

    _, _, compiled = _compile("gpt2", steps=1)
    counts = dense_counts(compiled.tint.program, compiled.tint.layers)
    view = compiled.tint.standard()
    assert counts["ours"]["d_sim"] == view.plan.d_sim == view.stack.blocks[0].w_a.shape[-1]
    assert counts["ours"]["dense"]["total"] == sum(p.numel() for p in view.parameters())
    assert counts["blocks"] == len(view.stack.blocks)
    factored = compiled.tint.standard(factored=True)
    assert counts["ours"]["dense"]["factored"] == sum(p.numel() for p in factored.parameters())
    assert counts["ours"]["dense"]["factored"] < counts["ours"]["dense"]["total"]


def test_the_reference_convention_counts_positions_beside_and_sums_as_python_adds():
    """By hand, coordinate sets per head, unit group and norm group: what reads the one-hot positions is
    charged [its rows, T] for them and [its rows, D_sim] for what else it reads, if anything; a sum's block
    counts only erase units (a Python add in the reference); every other projection [its rows, D_sim]."""
    from backends.torch.calls import coordinates
    from backends.torch.standard_plan import run_width
    from tintc.report.dense_count import dense_counts, standard_plan

    _, _, compiled = _compile("gpt2", steps=1)
    program, layers = compiled.tint.program, compiled.tint.layers
    reference = dense_counts(program, layers)["reference_convention"]
    d, dense = reference["d_sim"], reference["dense"]
    field = program.inputs["positions"]
    positions = set(range(field.start, field.stop))
    assert not any(set(coordinates(c.token_fields()[1])) & positions for c in program.calls)  # they live to the end
    one, calls, total, sums, charged = program.inputs["one"].start, iter(program.calls), 0, 0, 0
    for b in standard_plan(program, layers).blocks:
        if b.node != "erase" and next(calls).op == "residual":
            own = sum(u.n for u in b.units if not (u.b and isinstance(u.b[0], str)))
            sums += 3 * own * d
            total += 3 * (b.width - own) * d
            continue
        if b.kind == "attention":
            reads = [(h.size(p), getattr(h, p)[1]) for p in "qkv" for h in b.heads]
        elif b.kind == "mlp":
            reads = [(u.n, side[1] if side else ((one, 1),)) for u in b.units for side in (u.a, u.b)]
        else:
            reads = [(run_width(runs), runs) for runs, _ in b.heads]
        for size, runs in reads:
            read = set(coordinates(runs))
            charged += size * len(positions) * bool(read & positions)
            total += size * len(positions) * bool(read & positions) + size * d * bool(read - positions)
        total += b.rows()["o"] * d
    assert sums == dense["python_sums"] > 0 and charged == dense["position_maps"] > 0
    assert total == dense["total"]


def test_the_low_rank_option_factorises_the_standard_view_exactly():
    """tint.passes.low_rank: each projection of the standard view that touches k coordinates is stored
    as [n, k]·[k, D_sim]; the counts fall and the output stays that of the fast executor."""
    _, model, compiled = _compile("opt", steps=1, passes_low_rank=True)
    view = compiled.tint.standard()
    dense = compiled.tint.standard(factored=False)
    factored = [s for b, p in zip(view.stack.blocks, view.plan.blocks) if isinstance(b, AttentionBlock)
                and p.node != "erase" for s in (b.s_q, b.s_k, b.s_v, b.s_o)]  # an erase head's Q, K: T×T, dense
    assert sum(s is not None for s in factored) > len(factored) / 2  # most projections factorised
    assert sum(p.numel() for p in view.parameters()) < sum(p.numel() for p in dense.parameters())
    ids, train, _ = example_input(model.config.vocab_size, 8, 2, seed=4)
    prefixes = compiled.tint.encode({n: p.detach() for n, p in model.named_parameters()})
    with torch.no_grad():
        expected, _ = compiled.tint(ids, train, prefixes)
        logits, _ = view(ids, train, prefixes)
    assert _rel(logits, expected) <= 1e-9


def _working_set_by_hand(program):
    """The reference convention's working set, one coordinate at a time: a coordinate is in the stream
    from an access to its next read, except between a forward access and a later phase's read (only at
    both ends) and before a sum's read (the sum is a Python add there: at neither end but the first);
    the positions are not in it while they live."""
    calls, end = program.calls, len(program.calls)
    pos = program.inputs["positions"]
    dies = next((i for i, c in enumerate(calls) if any(s < pos.stop and pos.start < s + w
                                                      for s, w in c.token_fields()[1])), end)
    events = {c: [(-1, "w")] for f in program.inputs.values() for c in range(f.start, f.stop)}
    for i, call in enumerate(calls):
        for r in call.reads:
            if r.stream == "tokens":
                for c in {c for g in r.groups for f in g for c in range(f.start, f.stop)}:
                    events.setdefault(c, []).append((i, "r"))
        if call.write.stream == "tokens":
            for c in {c for f in call.write.groups for c in range(f.start, f.stop)}:
                events.setdefault(c, []).append((i, "w"))
    for f in (program.logits, program.inputs["one"]):
        for c in range(f.start, f.stop):
            events[c].append((end, "r"))
    alive = Counter()
    for c, ev in events.items():
        if pos.start <= c < pos.stop:
            ev = [e for e in ev if e[0] >= dies]
        covered = set()
        for (a, _), (b, kind) in zip(ev, ev[1:]):
            if kind == "r":
                python_sum = a >= 0 and b < end and calls[b].op == "residual"
                skip = a >= 0 and b < end and calls[a].phase == "forward" and calls[b].phase != "forward"
                covered |= {a} if python_sum else {a, b} if skip else set(range(a, b + 1))
        alive.update(covered)
    return max(alive.values())


def test_the_working_set_matches_a_coordinate_by_coordinate_count():
    from tintc.report.dense_count import working_set

    _, _, compiled = _compile("opt", steps=2)
    program = compiled.tint.program
    widest, edges = working_set(program)
    assert widest == _working_set_by_hand(program)
    assert edges and widest < program.width  # stored activations leave the stream
    phases, ops = {c.node: c.phase for c in program.calls}, {c.node: c.op for c in program.calls}
    assert all(ops[e["to"]] == "residual" or phases[e["from"]] == "forward" != phases[e["to"]] for e in edges)
    assert any(phases[e["to"]] == "eval" for e in edges)  # the evaluation's input: from the forward's start
    assert any(ops[e["to"]] == "residual" and phases[e["from"]] != "forward" for e in edges)  # a backward sum
