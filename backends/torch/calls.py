"""One call of the fast executor: gather the groups' inputs from the streams, run the primitive,
write each group's output into its field. Carried inside the emitted package.

Indexing the last axis of the wide token stream with an index tensor reads it at scattered places
(about 1 GB/s); the fields a call touches are few runs of side-by-side coordinates, or fields at
even strides (a view), and slices of those copy at memory speed. So wirings are views or runs where
they can be. Groups that repeat a field (heads of one simulated linear map read the same input chunk,
or add into the same output field) are gathered once and copied out, or summed on the group axis
before the write, so that a write touches each coordinate of its fields once and nothing else of
the stream.
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


def repeats(which: list[int], distinct: int):
    """How groups map to `distinct` distinct ones (`which`: each group's, numbered by first appearance):
    None, each its own; ("interleave", r), each r times in a row; ("tile", r), all of them r times
    over; else an index tensor."""
    r = len(which) // distinct
    if r * distinct == len(which):
        if r == 1:
            return None
        if which == [d for d in range(distinct) for _ in range(r)]:
            return ("interleave", r)
        if which == list(range(distinct)) * r:
            return ("tile", r)
    return torch.tensor(which)


def spread(x: torch.Tensor, pattern) -> torch.Tensor:
    """[…, D, width] -> […, G, width]: each group the distinct one it reads (repeats' inverse)."""
    if pattern is None:
        return x
    if isinstance(pattern, tuple):
        kind, r = pattern
        x = x.unsqueeze(-2 if kind == "interleave" else -3)
        shape = list(x.shape)
        shape[-2 if kind == "interleave" else -3] = r
        return x.expand(shape).flatten(-3, -2)
    return x.index_select(-2, pattern.to(x.device))


def summed(delta: torch.Tensor, pattern, distinct: int) -> torch.Tensor:
    """[…, G, width] -> […, D, width]: the groups that write one field summed (spread's adjoint)."""
    if pattern is None:
        return delta
    if isinstance(pattern, tuple):
        kind, r = pattern
        return delta.unflatten(-2, (distinct, r)).sum(-2) if kind == "interleave" else \
            delta.unflatten(-2, (r, distinct)).sum(-3)
    out = delta.new_zeros(*delta.shape[:-2], distinct, delta.shape[-1])
    return out.index_add_(-2, pattern.to(delta.device), delta)


def _distinct(groups: list[list[int]]) -> tuple[list[tuple], object]:
    """The distinct groups in order of first appearance, and how the groups repeat them."""
    distinct = list(dict.fromkeys(tuple(g) for g in groups))
    number = {g: i for i, g in enumerate(distinct)}
    return distinct, repeats([number[tuple(g)] for g in groups], len(distinct))


def _strided(distinct: list[tuple]):
    """(start, stride) when each distinct group is one run and the runs start at even strides no
    narrower than a group (a view of the stream), else None."""
    width = len(distinct[0])
    starts = [g[0] for g in distinct]
    if any(list(g) != list(range(g[0], g[0] + width)) for g in distinct):
        return None
    stride = starts[1] - starts[0] if len(starts) > 1 else width
    if stride < width or starts != list(range(starts[0], starts[0] + stride * len(starts), stride)):
        return None
    return starts[0], stride


class Gather:
    """A read whose groups are not one side-by-side run: the distinct groups (a strided view of the
    stream, else their runs, or an index tensor where runs would be many), then which distinct group
    each group reads (`repeats`). Groups that repeat are gathered once."""

    def __init__(self, groups: list[list[int]]):
        distinct, self.pick = _distinct(groups)
        self.distinct, self.width = len(distinct), len(groups[0])
        self.strided = _strided(distinct)
        flat = [i for g in distinct for i in g]
        runs = runs_of(flat)
        self.source = runs if len(runs) <= MAX_RUNS else torch.tensor(flat)  # runs: a tuple

    def read(self, stream: torch.Tensor) -> torch.Tensor:
        if self.strided is not None and stream.stride(-1) == 1:
            start, stride = self.strided
            x = stream.as_strided((*stream.shape[:-1], self.distinct, self.width), (*stream.stride()[:-1], stride, 1),
                                  stream.storage_offset() + start)
        elif isinstance(self.source, tuple):
            x = torch.cat([stream[..., start : start + length] for start, length in self.source], -1)
            x = x.unflatten(-1, (self.distinct, self.width))
        else:
            x = stream[..., self.source.to(stream.device)].unflatten(-1, (self.distinct, self.width))
        return x if self.distinct == 1 else spread(x, self.pick)  # one distinct group broadcasts


class Scatter:
    """A write whose groups are not distinct side-by-side fields: the groups that write one field are
    summed first (`repeats`), then the distinct fields are placed: as runs of the stream, or by an
    index tensor where runs would be many or where distinct fields overlap (their sum is added)."""

    def __init__(self, groups: list[list[int]]):
        distinct, self.sum = _distinct(groups)
        self.groups, self.distinct = len(groups), len(distinct)
        flat = [i for g in distinct for i in g]
        runs = runs_of(flat)
        self.overlap = len(set(flat)) < len(flat)
        if self.overlap or len(runs) > MAX_RUNS:
            self.target = torch.tensor(flat)
        else:
            offsets = [0]
            for _, length in runs[:-1]:
                offsets.append(offsets[-1] + length)
            self.target = [(start, length, offset) for (start, length), offset in zip(runs, offsets)]

    def write(self, into: torch.Tensor, delta: torch.Tensor, gated: bool) -> torch.Tensor:
        """delta [B, T, G, width] into its fields; gated: replacing what they held."""
        delta = summed(delta, self.sum, self.distinct).flatten(-2)
        if isinstance(self.target, list):  # distinct coordinates, each written once
            for start, length, offset in self.target:
                field, part = into[..., start : start + length], delta[..., offset : offset + length]
                field.copy_(part) if gated else field.add_(part)
            return into
        index = self.target.to(into.device)
        if gated and not self.overlap:
            return into.index_copy_(-1, index, delta)
        if gated:
            into[..., index] = 0.0
        return into.index_add_(-1, index, delta)


def wiring(call: dict) -> tuple[list, object]:
    """A call's wiring (JSON form) as indices: per read, None for the whole stream, a
    (start, G, width, shared) run when the groups' fields lie side by side or are all the same
    field, else a Gather; the write as a side-by-side run, else a Scatter."""
    def groups_of(groups) -> list[list[int]]:
        return [coordinates(fields) for fields in groups]

    def index(groups):
        flat = [i for fields in groups for i in coordinates(fields)]
        width = len(flat) // len(groups)
        if flat == list(range(flat[0], flat[0] + len(flat))):  # side by side: a view, no copy
            return (flat[0], len(groups), width, False)
        one = flat[:width]
        if one == list(range(one[0], one[0] + width)) and flat == one * len(groups):  # every group reads one field
            return (flat[0], len(groups), width, True)
        return None

    reads = [None if not groups else index(groups) or Gather(groups_of(groups)) for groups in call["reads"]]
    writes = [[field] for field in call["write"]]
    write = index(writes)
    if isinstance(write, tuple) and not write[3]:
        return reads, write
    return reads, Scatter(groups_of(writes))


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
    return index.read(stream)


def apply(layer: nn.Module, reads: list, write, streams: list, into: torch.Tensor, gated: bool) -> torch.Tensor:
    """Run one call and return `into` with each group's output added to its field. A gated write
    first gates out what the field held (h ← (1−m)⊙h + Δ, m the field's indicator).

    This is the fast execution of one block of the standard view (backends/torch/standard.py, which
    builds and checks it): the gathers are the selections inside the block's Q, K, V or W_a, W_b,
    W_in; the write field is the selection inside O or W_o; a group is a head or a set of units;
    a new prefix-block version is the same positions after the residual add; the gate is the
    block's erase units (−h on a field whose value is dead)."""
    delta = layer(*(gather(s, index) for s, index in zip(streams, reads)))  # [B, T, G or 1, width]
    if isinstance(write, tuple):  # fields side by side, each written once
        start, groups, width, _ = write
        delta = delta.expand(*delta.shape[:-2], groups, delta.shape[-1]).flatten(-2)  # [B, T, G·width]
        field = into[..., start : start + groups * width]
        if gated:
            field.copy_(delta)
        else:
            field.add_(delta)
        return into
    return write.write(into, delta.expand(*delta.shape[:-2], write.groups, delta.shape[-1]), gated)
