"""The fast executor's cheaper forms of the same arithmetic (the stored forms of a projection,
backends/torch/projection.py, chosen by structured.py and low_rank.py; the run wirings of
backends/torch/calls.py) give the numbers of the plain forms they replace."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import torch
from torch import nn

from backends.torch import calls, runtime
from backends.torch.projection import Dense, Diagonal, DiagonalBlocks, LowRank, Selection, as_projection
from backends.torch.structured import compact
from tintc import pipeline
from tintc.oracle.fidelity import example_input
from tests.models import tiny_config, tiny_model


KINDS = {"gpt2": ["attn_v", "attn_o", "mlp_in", "mlp_out"], "llama": ["attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down"]}


def _compiled(family):
    cfg = tiny_config(family, dtype="float64", kinds=KINDS[family])
    model = tiny_model(family, dtype=torch.float64)
    ids, train, _ = example_input(model.config.vocab_size, 16, 2, seed=1)
    prefixes = pipeline.compile_tint(cfg, model).tint.encode({n: p.detach() for n, p in model.named_parameters()})
    return cfg, model, ids, train, prefixes


def _forms():
    """One projection of each stored form, its matrix written out by hand, and the numbers it stores."""
    gen = torch.Generator().manual_seed(0)
    diagonal = torch.randn(5, generator=gen, dtype=torch.float64)
    index, coef = torch.tensor([3, 0, 3, 1]), torch.randn(4, generator=gen, dtype=torch.float64)
    selected = torch.zeros(4, 5, dtype=torch.float64)
    selected[torch.arange(4), index] = coef
    left, right = torch.randn(4, 2, generator=gen, dtype=torch.float64), torch.randn(2, 5, generator=gen, dtype=torch.float64)
    matrix = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    d = torch.randn(2, 2, generator=gen, dtype=torch.float64)
    blocks = torch.zeros(6, 4, dtype=torch.float64)  # [[I, diag(d0)], [0, −I], [diag(d1), I]], 2 × 2 blocks
    blocks[[0, 1, 4, 5], [0, 1, 2, 3]] = 1.0
    blocks[[0, 1], [2, 3]], blocks[[2, 3], [2, 3]], blocks[[4, 5], [0, 1]] = d[0], -1.0, d[1]
    diagonals = torch.stack([torch.stack([torch.ones(2), d[0]]), torch.stack([torch.zeros(2), -torch.ones(2)]),
                             torch.stack([d[1], torch.ones(2)])]).to(torch.float64)
    return [("dense", Dense(matrix), matrix, 20), ("diagonal", Diagonal(diagonal), torch.diag(diagonal), 5),
            ("diagonal blocks", DiagonalBlocks(diagonals), blocks, 12),
            ("identity", Diagonal(torch.ones(5, dtype=torch.float64), identity=True), torch.eye(5, dtype=torch.float64), 5),
            ("selection", Selection(index, coef, 5), selected, 8), ("factored", LowRank(left, right), left @ right, 18)]


@pytest.mark.parametrize("name,form,matrix,stored", _forms(), ids=[f[0] for f in _forms()])
def test_every_projection_form_applies_expands_and_counts_the_matrix_it_stands_for(name, form, matrix, stored):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, matrix.shape[1], generator=gen, dtype=torch.float64)
    y = torch.randn(2, 3, matrix.shape[0], generator=gen, dtype=torch.float64)
    assert torch.equal(form.dense(), matrix)
    assert tuple(form.shape) == tuple(matrix.shape)
    assert form.count() == stored
    assert torch.allclose(form.apply(x), x @ matrix.T, rtol=0, atol=1e-14)
    assert torch.allclose(form.apply_transposed(y), y @ matrix, rtol=0, atol=1e-14)
    assert as_projection(form if name != "dense" else matrix).kind == form.kind


def test_compact_keeps_the_matrix_it_replaces():
    gen = torch.Generator().manual_seed(0)
    eye = torch.eye(5, dtype=torch.float64)
    mirror = torch.cat([eye, -2.0 * eye])[torch.tensor([0, 7, 2, 9, 4, 5, 6, 1, 8, 3])]  # signed copies, shuffled
    gate = runtime.Gate(3.0 * torch.eye(10, dtype=torch.float64), mirror, torch.ones(10, 5, dtype=torch.float64))
    xa = torch.randn(2, 4, 3, 10, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 4, 3, 5, generator=gen, dtype=torch.float64)
    before = gate(xa, x, x)
    assert compact(gate) == 2
    forms = runtime.projections(gate)
    assert [forms[w].kind for w in ("a", "b", "c")] == ["diagonal", "selection", "dense"]  # c: five nonzeros a row
    assert isinstance(gate.c, nn.Parameter)  # a dense projection stays the bare parameter (its state-dict name)
    assert torch.equal(gate(xa, x, x), before)  # the products only dropped exact zeros
    assert torch.equal(forms["b"].dense(), mirror)
    assert compact(runtime.Linear(torch.ones(4, 6))) == 0
    difference = runtime.Linear(torch.cat([eye, -eye], 1))  # [I −I]: a difference of two fields
    x2 = torch.randn(2, 4, 3, 10, generator=gen, dtype=torch.float64)
    before = difference(x2)
    assert compact(difference) == 1 and runtime.projections(difference)["weight"].kind == "diagonal blocks"
    assert torch.equal(difference(x2), before) and torch.equal(difference(x2), x2[..., :5] - x2[..., 5:])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_structured_weights_give_the_tint_of_dense_matrices_bit_for_bit(family):
    cfg, model, ids, train, prefixes = _compiled(family)
    tint = pipeline.compile_tint(cfg, model).tint
    with torch.no_grad():
        fast, _ = tint(ids, train, prefixes)
    restored = 0
    for module in tint.layers.values():
        for attr, w in runtime.projections(module).items():
            if w is not None and w.kind in ("diagonal", "selection"):
                delattr(module, attr)
                setattr(module, attr, nn.Parameter(w.dense().detach(), requires_grad=False))
                restored += 1
    assert restored >= 20  # identities, scalings, masks and signed copies are most of a TinT's projections
    with torch.no_grad():
        dense, _ = tint(ids, train, prefixes)
    assert torch.equal(fast, dense)


@pytest.mark.parametrize("family,dtype", [("gpt2", "float32"), ("llama", "float64"), ("gemma2", "float32"),
                                          ("bloom", "float64")])
def test_products_with_one_hot_positions_skipped_give_the_products_bit_for_bit(family, dtype):
    """Attention's `positional` input (a prefix block's one-hot positions, or the token positions) is not
    multiplied by: every rule exact, every kind trained (the linear maps' forward, backward and descent, the
    exact attention backward's rows and score products, the next-token shift, Gemma 2's capped softmax)."""
    from tests.helpers import compile_tiny, params_of

    gated = ["attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down", "norm_gain"]
    kinds = gated if family in ("llama", "gemma2") else ["attn_q", "attn_k", "attn_v", "attn_o", "mlp_in", "mlp_out",
                                                          "norm_gain", "norm_bias"]
    cfg, model, compiled = compile_tiny(family, dtype, kinds=kinds, approximations="exact")
    tint = compiled.tint
    ids, train, _ = example_input(model.config.vocab_size, 16, 2, seed=1)
    prefixes = tint.encode(params_of(model))
    with torch.no_grad():
        skipped, new = tint(ids, train, prefixes)
    sides = {}
    for module in tint.layers.values():
        if isinstance(module, runtime.Attention) and module.positional:
            sides[module.positional] = sides.get(module.positional, 0) + 1
            module.positional = None
    assert set(sides) == {"queries", "keys", "values"}, sides
    with torch.no_grad():
        multiplied, new_multiplied = tint(ids, train, prefixes)
    assert torch.equal(skipped, multiplied)
    assert all(torch.equal(new[k], new_multiplied[k]) for k in new if k != "tint_layout")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_run_wirings_equal_index_wirings(family, monkeypatch):
    cfg, model, ids, train, prefixes = _compiled(family)
    tint = pipeline.compile_tint(cfg, model).tint
    gathers = [r for reads, _ in tint._wiring for r in reads if not r.whole]
    assert any(r.strided for r in gathers) and any(isinstance(r.source, tuple) for r in gathers)
    with torch.no_grad():
        by_runs, _ = tint(ids, train, prefixes)
    monkeypatch.setattr(calls, "MAX_RUNS", 0)  # every wiring an index tensor, as before runs
    monkeypatch.setattr(calls, "_strided", lambda distinct, width: None)  # no strided views
    tint = pipeline.compile_tint(cfg, model).tint
    assert not any(isinstance(w.target, list) for _, w in tint._wiring)
    with torch.no_grad():
        by_index, _ = tint(ids, train, prefixes)
    # equal up to the order in which a coordinate written by several groups sums them
    assert ((by_runs - by_index).norm() / by_index.norm()).item() <= 1e-14


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_grid_wirings_equal_a_copy_per_group(family, monkeypatch):
    """Heads that share a read on the call's grid (not copied per head, folded into larger products)
    and outputs summed on the grid give the TinT of one group axis with every head its own copy. The
    rules are exact here: the finite differences' 1/N would scale the products' rounding by N."""
    cfg = tiny_config(family, dtype="float64", kinds=KINDS[family],
                      approximations={"layer_norm": "exact", "activation": "exact"})
    model = tiny_model(family, dtype=torch.float64)
    ids, train, _ = example_input(model.config.vocab_size, 16, 2, seed=1)
    tint = pipeline.compile_tint(cfg, model).tint
    prefixes = tint.encode({n: p.detach() for n, p in model.named_parameters()})
    assert any(w.axes in ("s", "c") for _, w in tint._wiring)  # heads adding into one field, summed on the grid
    assert any(r.axes in ("s", "c") for reads, _ in tint._wiring for r in reads if not r.whole)  # one chunk for many
    with torch.no_grad():
        on_grid, _ = tint(ids, train, prefixes)
    monkeypatch.setattr(calls, "grid_of", lambda patterns, groups: (groups, 1))  # one group axis
    tint = pipeline.compile_tint(cfg, model).tint
    assert not any(r.axes in ("s", "c") for reads, _ in tint._wiring for r in reads if not r.whole)
    assert not any(w.summed_axis for _, w in tint._wiring)  # no heads summed inside a product
    with torch.no_grad():
        per_group, _ = tint(ids, train, prefixes)
    assert ((on_grid - per_group).norm() / per_group.norm()).item() <= 1e-14


@pytest.mark.parametrize("axis", [-3, -2])
@pytest.mark.parametrize("case", ["values shared", "queries shared", "values per head", "weights shared"])
def test_linear_attention_sums_its_heads_inside_its_products(axis, case):
    """Attention(softmax=False).forward(..., summed=axis) is the sum of its heads along that group axis:
    the scores summed (values one for all heads: the linear map's forward), or the weights and values
    side by side (its backward), or one side summed first where the other does not vary along the axis."""
    gen = torch.Generator().manual_seed(3)
    grid = [3, 4]  # S, C
    q_varies, k_varies, v_varies = {"values shared": (True, True, False), "queries shared": (False, True, False),
                                    "values per head": (True, True, True), "weights shared": (False, False, True)}[case]
    def make(t, varies):
        shape = [2, t, *grid, 5]
        if not varies:
            shape[axis] = 1
        return torch.randn(*shape, generator=gen, dtype=torch.float64)
    xq, xk, xv = make(6, q_varies), make(4, k_varies), make(4, v_varies)
    w = lambda: torch.randn(5, 5, generator=gen, dtype=torch.float64)
    layer = runtime.Attention(w(), w(), w(), w(), softmax=False, mask="full")
    assert layer.sums(axis, xq, xk, xv)
    per_head = layer(xq, xk, xv)
    per_head = per_head.expand(*per_head.shape[:2], *grid, 5).sum(axis, keepdim=True)
    summed = layer(xq, xk, xv, summed=axis)
    assert summed.shape == per_head.shape
    assert torch.allclose(summed, per_head, rtol=0, atol=1e-12)
    assert not runtime.Attention(w(), w(), w(), w(), softmax=True, mask="full").sums(axis, xq, xk, xv)


def _wiring_cases():
    """(read groups, write fields) as the lowering makes them: heads of a linear map reading chunks with
    the constant (each chunk read by several heads, tiled or interleaved) and adding into one output
    field per row, units at even strides of a prefix block, groups in no order, fields that overlap,
    a read that repeats on another grid than the write's."""
    def chunks(order):
        return [[(8 * ch, 8), (70, 1)] for ch in order]
    tiled = [(100 + 8 * s, 8) for s in range(4) for _ in range(3)]
    return {"tiled chunks with a constant": (chunks([0, 1, 2] * 4), tiled),
            "interleaved chunks": ([[(8 * s, 8)] for s in range(4) for _ in range(3)],
                                   [(100 + 8 * c, 8) for _ in range(4) for c in range(3)]),
            "strided units": ([[(9 * u, 8)] for u in range(6)], [(9 * u, 8) for u in range(6)]),
            "any order": ([[(5 * g, 5)] for g in (3, 0, 3, 7, 1, 0)], [(5 * g, 5) for g in (3, 0, 3, 7, 1, 0)]),
            "overlapping fields": ([[(g, 6)] for g in (0, 4, 0, 9)], [(g, 6) for g in (0, 4, 0, 9)]),
            "many runs": ([[(2 * g, 1)] for g in range(80)], [(2 * g + 1, 1) for g in range(80)]),
            "another grid": ([[(8 * s, 8)] for s in range(6) for _ in range(2)], tiled)}


@pytest.mark.parametrize("name", list(_wiring_cases()))
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("shared_rows", [False, True])
def test_gather_and_write_equal_a_loop_over_groups(name, gated, shared_rows):
    """Each wiring's read, on the call's grid, is every group's coordinates in order; its write adds
    each group's output to its field (gated: to a field first cleared), the sums of repeated fields
    included, also where the output is one for every row of the grid (shared_rows)."""
    groups, fields = _wiring_cases()[name]
    gen = torch.Generator().manual_seed(0)
    stream = torch.randn(2, 3, 200, generator=gen, dtype=torch.float64)
    reads, write = calls.wiring({"reads": [groups], "write": fields})
    coords = [runtime.coordinates(g) for g in groups]
    expected = torch.stack([stream[..., c] for c in coords], -2)
    got = calls.gather(stream, reads[0])
    rows, cols = write.grid
    assert torch.equal(got.expand(2, 3, rows, cols, expected.shape[-1]).flatten(-3, -2), expected)
    width = fields[0][1]
    on_grid = torch.randn(2, 3, 1 if shared_rows else rows, cols, width, generator=gen, dtype=torch.float64)
    delta = on_grid.expand(2, 3, rows, cols, width).flatten(-3, -2)
    into = stream.clone()
    for start, size in fields if gated else []:
        into[..., start : start + size] = 0.0
    for (start, size), d in zip(fields, delta.unbind(-2)):
        into[..., start : start + size] += d
    got = calls.apply(lambda *inputs: on_grid, reads, write, [stream], stream.clone(), gated)
    assert torch.allclose(got, into, rtol=0, atol=1e-14)


def test_a_read_shared_by_every_group_does_not_set_the_grid():
    """A linear map's descent reads one prefix one-hot for all S·C heads, then ∂y by row (each C times in
    a row) and x by chunk (tiled S times): the grid is S × C, not 1 × S·C (which copied ∂y and x per head)."""
    S, C = 24, 3
    onehot, dy = [[(0, 4)]] * (S * C), [[(10 + 4 * s, 4)] for s in range(S) for _ in range(C)]
    x = [[(200 + 5 * c, 5)] for _ in range(S) for c in range(C)]
    write = [(1000 + 5 * g, 5) for g in range(S * C)]
    reads, scatter = calls.wiring({"reads": [onehot, dy, x], "write": write})
    assert scatter.grid == (S, C)
    assert [r.axes for r in reads] == ["", "s", "c"]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_stream_lets_go_of_what_is_never_read_again_and_computes_the_same(family, tmp_path):
    """Values that outlive the training sit below the others, so the backward frees the top of the
    stream layer by layer; the executor lets its pages go there (allocate.narrowing), in memory and as
    the emitted package, with the same numbers bit for bit as a run that keeps the whole stream."""
    from backends.torch.emit import import_package

    cfg, model, ids, train, prefixes = _compiled(family)
    cfg = cfg.model_copy(update={"output": str(tmp_path)})
    compiled = pipeline.compile_tint(cfg, model)
    tint = compiled.tint
    program = tint.program
    assert len(program.narrowing) >= 3 and min(program.narrowing.values()) < program.width / 2
    released = []
    original = runtime.release_beyond
    with torch.no_grad():
        runtime.release_beyond = lambda h, width: released.append(width) or original(h, width)
        try:
            narrow, new = tint(ids, train, prefixes)
        finally:
            runtime.release_beyond = original
    assert released == list(program.narrowing.values())
    pipeline.save(compiled, cfg)
    assert (tmp_path / "tint_model.py").read_text().count("release_beyond(h, ") == 1 + len(program.narrowing)  # and its def
    with torch.no_grad():
        packaged, packaged_new = import_package(tmp_path).load(tmp_path)(ids, train, prefixes)
    tint.program = replace(program, narrowing={})  # the whole stream to the end
    with torch.no_grad():
        whole, whole_new = tint(ids, train, prefixes)
    assert torch.equal(narrow, whole) and torch.equal(packaged, whole)
    assert all(torch.equal(new[k], whole_new[k]) and torch.equal(packaged_new[k], whole_new[k]) for k in new)


def test_a_multi_step_run_drops_the_block_versions_no_later_step_reads(tmp_path):
    """allocate.released: a descent's version that is not the final one is dropped after its last reader
    (the next step's descent, which copies it), in memory and in the emitted package, so a run of 3 steps
    holds at most 2 versions of a block at a time, not 3; the numbers are those of a run that keeps every
    version, bit for bit; the memory prediction's versions follow (allocate.versions_held)."""
    from backends.torch.allocate import versions_held
    from backends.torch.emit import import_package

    cfg = tiny_config("gpt2", dtype="float64", steps=3).model_copy(update={"output": str(tmp_path)})
    model = tiny_model("gpt2", dtype=torch.float64)
    ids, train, _ = example_input(model.config.vocab_size, 16, 2, seed=1)
    compiled = pipeline.compile_tint(cfg, model)
    tint = compiled.tint
    program, prefixes = tint.program, tint.encode({n: p.detach() for n, p in model.named_parameters()})

    def run():
        """The logits, the new prefixes, and the most versions (≥ 1) of one block held after any call."""
        most = 0
        with torch.no_grad():
            streams = tint.begin(ids, train, prefixes)
            for i in range(len(program.calls)):
                tint.run(streams, i, i + 1)
                blocks = [name.split("@")[0] for name in streams if "@" in name and not name.endswith("@0")]
                most = max([most] + [blocks.count(b) for b in blocks])
            return (*tint.finish(streams, prefixes), most)

    logits, new, most = run()
    pipeline.save(compiled, cfg)
    released = [stream for streams in program.released.values() for stream in streams]
    trained = [b for b, stream in program.final_blocks.items() if not stream.endswith("@0")]
    assert len(released) == 2 * len(trained) > 0  # versions 1 and 2 of each trained block
    assert (tmp_path / "tint_model.py").read_text().count("        del s[") == len(released)
    with torch.no_grad():
        packaged, packaged_new = import_package(tmp_path).load(tmp_path)(ids, train, prefixes)
    tint.program = replace(program, released={})  # every version kept
    whole, whole_new, most_whole = run()
    assert (most, most_whole) == (1, 3)  # after each call: the last version only (a descent's copy is dropped with it)
    assert max(versions_held(program)) < max(versions_held(tint.program)) == versions_held(tint.program)[-1]
    assert torch.equal(logits, whole) and torch.equal(packaged, whole)
    assert all(torch.equal(new[k], whole_new[k]) and torch.equal(packaged_new[k], whole_new[k]) for k in new)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pages are let go on Linux only")
def test_release_beyond_hands_back_the_whole_pages_past_the_width_and_keeps_the_rest():
    h = torch.ones(2, 8, 8192)  # rows of 32 KiB: eight pages each
    runtime.release_beyond(h, 1000)
    assert torch.equal(h[..., :1000], torch.ones(2, 8, 1000))
    # a released page reads as zeros; kept past 1000: the rest of its page, and the page the row ends in
    # (rows need not start on a page)
    kept = (h[..., 1000:] != 0).sum(-1)
    assert bool(kept.le(2 * 1024).all()) and bool(((h[..., 1000:] == 0).sum(-1) == 8192 - 1000 - kept).all())
    wide = torch.ones(2, 8, 8192)
    runtime.release_beyond(wide, 8192)  # nothing beyond: kept
    assert bool((wide == 1).all())
