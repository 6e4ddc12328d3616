"""One call of the fast executor: gather the groups' inputs from the streams, run the primitive,
write each group's output into its field. Carried inside the emitted package.

Indexing the last axis of the wide token stream with an index tensor reads it at scattered places
(about 1 GB/s); the fields a call touches are few runs of side-by-side coordinates, and slices of
those runs copy at memory speed. So wirings are runs where there are few of them.
"""

import torch
from torch import nn

MAX_RUNS = 64  # beyond this many runs, one index operation beats a loop of slices


def coordinates(runs) -> list[int]:
    """The coordinates that (start, size) runs or fields cover, in order (repeats kept)."""
    return [i for start, size in runs for i in range(start, start + size)]


def coordinate_tensor(fields) -> torch.Tensor:
    """The distinct coordinates that (start, size) runs or fields cover, sorted, as a tensor."""
    fields = list(fields)
    if not fields:
        return torch.zeros(0, dtype=torch.long)
    return torch.unique(torch.cat([torch.arange(start, start + size) for start, size in fields]))


def runs_of(coords: list[int]) -> tuple:
    """((start, length), …): the maximal side-by-side stretches of `coords`, in their order."""
    runs = []
    for i in coords:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return tuple((start, length) for start, length in runs)


class Gather:
    """A read whose groups are not one side-by-side run: the distinct groups' coordinates (as runs,
    or an index tensor where runs would be many), then which distinct groups the groups read, as
    runs of side-by-side distinct groups (None: each its own, in order). Groups that repeat are
    gathered once; the picking copies slices, since indexing a group axis is as slow as the stream's."""

    def __init__(self, groups: list[list[int]]):
        distinct = list(dict.fromkeys(tuple(g) for g in groups))
        flat = [i for g in distinct for i in g]
        self.distinct, self.width = len(distinct), len(groups[0])
        runs = runs_of(flat)
        self.source = runs if len(runs) <= MAX_RUNS else torch.tensor(flat)  # runs: a tuple
        self.pick = None if len(distinct) == len(groups) else runs_of([distinct.index(tuple(g)) for g in groups])


def wiring(call: dict) -> tuple[list, object]:
    """A call's wiring (JSON form) as indices: per read, None for the whole stream, a
    (start, G, width, shared) run when the groups' fields lie side by side or are all the same
    field, else a Gather; the write as a side-by-side run, else [(start, length, offset)] runs
    of the stream and where they sit in the output, or a flat index where runs would be many."""
    def index(groups):
        flat = [i for fields in groups for i in coordinates(fields)]
        width = len(flat) // len(groups)
        if flat == list(range(flat[0], flat[0] + len(flat))):  # side by side: a view, no copy
            return (flat[0], len(groups), width, False)
        one = flat[:width]
        if one == list(range(one[0], one[0] + width)) and flat == one * len(groups):  # every group reads one field
            return (flat[0], len(groups), width, True)
        return Gather([flat[g * width:(g + 1) * width] for g in range(len(groups))])

    reads = [None if not groups else index(groups) for groups in call["reads"]]
    fields = call["write"]
    write = index([[field] for field in fields])
    if isinstance(write, tuple) and not write[3]:
        return reads, write
    flat = coordinates(fields)
    runs = runs_of(flat)
    if len(runs) > MAX_RUNS:
        return reads, torch.tensor(flat)
    offsets = [0]
    for _, length in runs[:-1]:
        offsets.append(offsets[-1] + length)
    return reads, [(start, length, offset) for (start, length), offset in zip(runs, offsets)]


def gather(stream, index):
    """[B, T, G, width] from a stream by a wiring index ([B, T, 1, width] when every group reads
    the same field: primitives broadcast it, so shared work is done once)."""
    if index is None:
        return stream.unsqueeze(2)
    if isinstance(index, tuple):
        start, groups, width, shared = index
        if shared:  # the same field for every group: one group that broadcasts against the others
            return stream[..., start : start + width].unsqueeze(-2)
        return stream[..., start : start + groups * width].unflatten(-1, (groups, width))
    if isinstance(index.source, tuple):
        x = torch.cat([stream[..., start : start + length] for start, length in index.source], -1)
    else:
        x = stream[..., index.source.to(stream.device)]
    x = x.unflatten(-1, (index.distinct, index.width))
    if index.pick is None or index.distinct == 1:  # one distinct group broadcasts, as a shared field
        return x
    return torch.cat([x[..., start : start + length, :] for start, length in index.pick], -2)


def apply(layer: nn.Module, reads: list, write, streams: list, into: torch.Tensor, gated: bool) -> torch.Tensor:
    """Run one call and return `into` with each group's output added to its field. A gated write
    first gates out what the field held (h ← (1−m)⊙h + Δ, m the field's indicator).

    This is the fast execution of one block of the standard view (backends/torch/standard.py, which
    builds and checks it): the gathers are the selections inside the block's Q, K, V or W_a, W_b,
    W_in; the write field is the selection inside O or W_o; a group is a head or a set of units;
    a new prefix-block version is the same positions after the residual add; the gate is the
    block's erase units (−h on a field whose value is dead)."""
    delta = layer(*(gather(s, index) for s, index in zip(streams, reads)))  # [B, T, G or 1, width]
    if isinstance(write, tuple):
        groups = write[1] * write[2] // delta.shape[-1]
    else:
        groups = (sum(length for _, length, _ in write) if isinstance(write, list) else write.numel()) // delta.shape[-1]
    delta = delta.expand(*delta.shape[:-2], groups, delta.shape[-1]).flatten(-2)  # [B, T, G·width]
    if isinstance(write, tuple):  # fields side by side, each written once
        start, groups, width, _ = write
        field = into[..., start : start + groups * width]
        if gated:
            field.copy_(delta)
        else:
            field.add_(delta)
        return into
    if isinstance(write, list):  # runs; a coordinate written by several groups gets their sum
        if gated:  # every run is cleared before any is added to
            for start, length, _ in write:
                into[..., start : start + length] = 0.0
        for start, length, offset in write:
            into[..., start : start + length] += delta[..., offset : offset + length]
        return into
    write = write.to(into.device)
    if gated:
        into[..., write] = 0.0
    return into.index_add_(-1, write, delta)
