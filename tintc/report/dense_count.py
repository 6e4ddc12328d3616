"""The standard view counted as the paper counts: every block's projections as dense matrices over
the stream width D_sim (backends/torch/standard.py), computed from shapes alone.

Two conventions, both reported (README "The parameter report"):
- **ours**: the stream holds everything the TinT keeps, stored activations included: D_sim is the
  token fields' width as allocated (backends/torch/allocate.py) plus the widest prefix row; with
  tint.passes.shared_rows the rows share token coordinates: max(width, rows_at + widest row).
- both also with the standard view's low-rank option: a projection that touches k stream
  coordinates stored as two factors [n, k]·[k, D_sim] where that is smaller (exact).
- **the reference's**: the reference code keeps the activations its backward needs in Python lists,
  outside the stream and the count. Here: a value written or read in a forward phase and next read
  in a backward or descent phase travels on a skip edge in between; D_sim is the widest working set
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
from backends.torch.standard_plan import StreamPlan, plan
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
                                 "dense": _dense(stream, d_ref), "skip_edges": len(edges),
                                 "skip_edge_width": sum(e["width"] for e in edges), "edges": edges},
    }


def _dense(stream: StreamPlan, d_sim: int) -> dict:
    """Dense parameters over d_sim by block kind; "factored": with every projection that touches k
    coordinates stored as [n, k]·[k, D_sim] where smaller (exact; the standard view's low-rank option)."""
    by_kind, factored = Counter(), Counter()
    for b in stream.blocks:
        by_kind[b.kind] += b.dense_parameters(d_sim, stream.one)
        factored[b.kind] += b.dense_parameters(d_sim, stream.one, factored=True)
    return {"total": sum(by_kind.values()), "by_kind": dict(sorted(by_kind.items())),
            "factored": sum(factored.values()), "factored_by_kind": dict(sorted(factored.items()))}


def working_set(program: Program, below: int | None = None) -> tuple[int, list[dict]]:
    """The widest set of token-stream coordinates in the stream at once when stored activations
    travel on skip edges, and those edges (width, from the call that last touched the coordinates in
    a forward phase to the backward or descent call that reads them next). A coordinate is in the
    stream from an access to the next read of it; from an access to a write it is free. The accesses
    are backends/torch/liveness.py's. `below`: only coordinates under it (shared rows: the values
    kept apart from the rows)."""
    calls = program.calls
    end = len(calls)
    phase = torch.tensor([0 if c.phase == "forward" else 1 if c.phase in ("backward", "descent") else 2
                          for c in calls] + [2])
    accesses = Accesses(program.width, [(f.start, f.width) for f in program.inputs.values()])
    delta = torch.zeros(end + 3, dtype=torch.long)  # coverage of calls −1 … end, at index call + 1
    edges = Counter()

    def points(at: torch.Tensor) -> None:
        delta.index_add_(0, at + 1, torch.ones_like(at))
        delta.index_add_(0, at + 2, -torch.ones_like(at))

    def cover(idx: torch.Tensor, b: int) -> None:
        """Coordinates read at b: in the stream since their last access a, at a itself if that was a
        write not counted yet (by a read at a); only at both ends on a skip edge."""
        idx = idx[accesses.written(idx) & (idx < (program.width if below is None else below))]
        a, first = accesses.last_access(idx), accesses.unread_write(idx)
        points(a[first])
        skip = (a >= 0) & (phase[a.clamp(min=0)] == 0) & (phase[b] == 1)
        through = a[~skip]  # (a, b]
        delta.index_add_(0, through + 2, torch.ones_like(through))
        delta[b + 2] -= len(through)
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
