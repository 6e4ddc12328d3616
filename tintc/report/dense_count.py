"""The standard view counted as the paper counts: every block's projections as dense matrices over
the stream width D_sim (backends/torch/standard.py), computed from shapes alone.

Two conventions, both reported (README "The parameter report"):
- **ours**: the stream holds everything the TinT keeps, stored activations included: D_sim is the
  token fields' width as allocated (backends/torch/allocate.py) plus the widest prefix row; with
  tint.passes.shared_rows the rows share token coordinates: max(width, rows_at + widest row).
- both also with the standard view's low-rank option: a projection that touches k stream
  coordinates stored as two factors [n, k]·[k, D_sim] where that is smaller (exact).
- **the reference's**: what the reference code keeps in Python stays outside the stream and the count:
  the activations its backward needs (Python lists), the first trained layer's input from the first
  forward to the final one (`continued_forward_state`), the one-hot positions (passed to every module
  beside the stream as `position_embeddings`; its maps over them are small maps), and every sum (a
  residual, the sub-MLP outputs, gradient contributions: Python adds). Here: a value written or read in
  a forward phase and next read in a later phase (backward, descent or evaluation) travels on a skip
  edge in between; a sum's operands travel outside the stream up to it, and its block is not counted
  but for erase units it holds; while the positions live they are not in the stream, and a head or unit
  group that reads them is charged a dense map over the T positions. D_sim is the widest working set
  (the values in the stream at once, which a dense projection may place anywhere) plus the widest
  prefix row, and every skip edge is listed; with shared rows, the rows need only be apart from the
  values kept apart from them: max(working set, their working set + widest row).
"""

from __future__ import annotations

from collections import Counter

import torch

from backends.torch.calls import coordinate_tensor
from backends.torch.liveness import Accesses
from backends.torch.program import Program, program_json
from backends.torch.standard_plan import BlockPlan, StreamPlan, covered_width, factored_size, plan, run_width
from backends.torch.view_budget import check_plan_budget


def standard_plan(program: Program, layers) -> StreamPlan:
    return plan(program_json(program), layers)


def dense_counts(program: Program, layers) -> dict:
    check_plan_budget(layers)
    stream = standard_plan(program, layers)
    working, edges = working_set(program)
    # shared rows: the rows need `rows` coordinates free of the values kept apart from them
    apart = working if program.rows_at is None else working_set(program, below=program.rows_at)[0]
    d_ref = max(working, apart + stream.rows)
    kinds = Counter(b.kind for b in stream.blocks)
    heads = sorted(b.width for b in stream.blocks if b.kind == "attention")
    return {
        "blocks": len(stream.blocks),
        "blocks_by_kind": dict(sorted(kinds.items())),
        "erase_blocks": sum(b.node == "erase" for b in stream.blocks),
        "heads_per_attention_block": {"min": heads[0], "median": heads[len(heads) // 2], "max": heads[-1]}
        if heads else None,
        "shared_rows": program.rows_at is not None,
        "ours": {"d_sim": stream.d_sim, "token_fields": stream.width, "prefix_rows": stream.rows,
                 "rows_at": stream.row_start, "dense": _dense(stream, stream.d_sim)},
        "reference_convention": {"d_sim": d_ref, "working_set": working, "working_set_apart": apart,
                                 "prefix_rows": stream.rows,
                                 "dense": _dense(stream, d_ref, reference=program),
                                 "skip_edges": len(edges),
                                 "skip_edge_width": sum(e["width"] for e in edges), "edges": edges},
    }


def _dense(stream: StreamPlan, d_sim: int, reference: Program | None = None) -> dict:
    """Dense parameters over d_sim by block kind; "factored": with every projection that touches k
    coordinates stored as [n, k]·[k, D_sim] where smaller (exact; the standard view's low-rank option).
    `reference`: the program, counted in the reference's convention: while the positions live they are
    not in the stream, and a head or unit group that reads them is charged a dense map over them instead
    (its rows × T) beside its map over the stream where it reads more ("position_maps": those charges);
    a sum is a Python add, its block not counted but for any erase units it holds ("python_sums": what
    the sums' own units would add)."""
    by_kind, factored, position_maps, python_sums = Counter(), Counter(), 0, 0
    positions, dies = _positions_life(reference) if reference is not None else (range(0), 0)
    call = 0
    for b in stream.blocks:
        if reference is not None and b.node != "erase" and reference.calls[call].op == "residual":
            erase = BlockPlan(b.kind, b.node, b.phase, act=b.act,
                              units=[u for u in b.units if u.erases])
            python_sums += b.dense_parameters(d_sim, stream.one) - erase.dense_parameters(d_sim, stream.one)
            b = erase
        if call >= dies:
            by_kind[b.kind] += b.dense_parameters(d_sim, stream.one)
            factored[b.kind] += b.dense_parameters(d_sim, stream.one, factored=True)
        else:
            charge, dense, small = _beside(b, stream.one, d_sim, positions)
            position_maps += charge
            by_kind[b.kind] += dense + charge
            factored[b.kind] += small + charge
        call += b.node != "erase"  # erase blocks come before the call they serve
    out = {"total": sum(by_kind.values()), "by_kind": dict(sorted(by_kind.items())),
           "factored": sum(factored.values()), "factored_by_kind": dict(sorted(factored.items()))}
    return out if reference is None else {**out, "position_maps": position_maps, "python_sums": python_sums}


def _beside(block, one: int, d_sim: int, positions: range) -> tuple[int, int, int]:
    """(the charge for the position maps, dense, factored) of a block whose reads of `positions` are maps
    over the T positions beside the stream: per head, unit group or norm group of each projection."""
    sizes, rows = block.group_sizes(), block.rows()
    charge = dense = small = 0
    for name, runs_lists in block.column_runs(one).items():
        if name not in sizes:  # a projection that writes
            dense += rows[name] * d_sim
            small += factored_size(rows[name], covered_width(runs_lists), d_sim)
            continue
        n, rest = 0, []
        for size, runs in zip(sizes[name], runs_lists):
            cut = [piece for r in runs for piece in _outside(r, positions)]
            charge += size * len(positions) * (sum(w for _, w in cut) < run_width(runs))
            if cut:
                n, rest = n + size, rest + [tuple(cut)]
        dense += n * d_sim
        small += factored_size(n, covered_width(rest), d_sim) if n else 0
    return charge, dense, small


def _outside(run: tuple[int, int], positions: range) -> list[tuple[int, int]]:
    """The parts of a run outside the positions' coordinates."""
    start, size = run
    stop = start + size
    pieces = [(start, min(stop, positions.start) - start), (max(start, positions.stop), stop - max(start, positions.stop))]
    return [(s, w) for s, w in pieces if w > 0]


def _positions_life(program: Program) -> tuple[range, int]:
    """The one-hot positions' coordinates, and the first call that writes over them (they live before it)."""
    field = program.inputs.get("positions")
    coords = range(0) if field is None else range(field.start, field.stop)
    rewrites = (i for i, call in enumerate(program.calls)
                if any(s < coords.stop and coords.start < s + w for s, w in call.token_fields()[1]))
    return coords, next(rewrites, len(program.calls))


def working_set(program: Program, below: int | None = None) -> tuple[int, list[dict]]:
    """The widest set of token-stream coordinates in the stream at once when stored activations
    travel on skip edges, and those edges (width, from the call that last touched the coordinates in
    a forward phase to the backward, descent or evaluation call that reads them next). A coordinate is in the
    stream from an access to the next read of it; from an access to a write it is free. The accesses
    are backends/torch/liveness.py's. The one-hot positions are not in it while they live (the
    reference passes them beside its stream). `below`: only coordinates under it (shared rows: the
    values kept apart from the rows)."""
    calls = program.calls
    end = len(calls)
    residual = [c.op == "residual" for c in calls] + [False]
    phase = torch.tensor([0 if c.phase == "forward" else 1 if c.phase in ("backward", "descent") else 2
                          for c in calls] + [2])
    accesses = Accesses(program.width, [(f.start, f.width) for f in program.inputs.values()])
    positions, dies = _positions_life(program)
    delta = torch.zeros(end + 3, dtype=torch.long)  # coverage of calls −1 … end, at index call + 1
    edges = Counter()

    def points(at: torch.Tensor) -> None:
        delta.index_add_(0, at + 1, torch.ones_like(at))
        delta.index_add_(0, at + 2, -torch.ones_like(at))

    def cover(idx: torch.Tensor, b: int) -> None:
        """Coordinates read at b: in the stream since their last access a, at a itself if that was a
        write not counted yet (by a read at a); only at both ends on a skip edge."""
        idx = idx[accesses.written(idx) & (idx < (program.width if below is None else below))]
        if b < dies:
            idx = idx[(idx < positions.start) | (idx >= positions.stop)]
        a, first = accesses.last_access(idx), accesses.unread_write(idx)
        points(a[first])
        skip = (a >= 0) & (((phase[a.clamp(min=0)] == 0) & (phase[b] >= 1) & (b < end)) | residual[b])
        through = a[~skip]  # (a, b]
        delta.index_add_(0, through + 2, torch.ones_like(through))
        delta[b + 2] -= len(through)
        if not residual[b]:
            points(torch.full((int(skip.sum()),), b))
        for a_, n in zip(*torch.unique(a[skip], return_counts=True)):
            edges[(calls[int(a_)].node, calls[b].node)] += int(n)
        accesses.read_coordinates(b, idx)

    for i, call in enumerate(calls):
        read, written = call.token_fields()
        if read:
            cover(coordinate_tensor(read), i)
        accesses.write(i, set(written))
    cover(coordinate_tensor([(f.start, f.width) for f in (program.logits, program.inputs["one"])]), end)
    widest = int(delta.cumsum(0).max())
    return widest, [{"from": a, "to": b, "width": n} for (a, b), n in edges.items()]
