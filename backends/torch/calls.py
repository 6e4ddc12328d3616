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


def merged(fields) -> tuple:
    """((start, length), …): the side-by-side stretches that (start, size) fields cover, in their order
    (runs_of of their coordinates, computed from the fields: a wiring is built from a few fields, not
    from the thousands of coordinates they cover)."""
    runs = []
    for start, size in fields:
        if size <= 0:
            continue
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1][1] += size
        else:
            runs.append([start, size])
    return tuple((start, length) for start, length in runs)


def _index(runs) -> torch.Tensor:
    """The coordinates of (start, length) runs, in order, as an index tensor."""
    if not runs:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(start, start + length) for start, length in runs])


def _distinct(groups: list[tuple]) -> tuple[list[tuple], object]:
    """The distinct groups (each its merged runs) in order of first appearance, and how the groups
    repeat them."""
    distinct = list(dict.fromkeys(groups))
    number = {g: i for i, g in enumerate(distinct)}
    return distinct, repeats([number[g] for g in groups], len(distinct))


def _grid_axes(pattern, distinct: int, grid: tuple[int, int]):
    """Which axes of the call's grid (S, C) a read or write varies along: "sc" (each group its own),
    "s" (each distinct group C times in a row), "c" (all C distinct groups S times over), "" (one
    group for all), or None where its pattern is none of these (it is spread to every group)."""
    rows, cols = grid
    if distinct == 1:
        return ""
    if pattern is None:
        return "sc"
    if isinstance(pattern, tuple):
        kind, r = pattern
        if kind == "interleave" and r == cols and distinct == rows:
            return "s"
        if kind == "tile" and distinct == cols and r == rows:
            return "c"
    return None


def grid_of(patterns: list, groups: int) -> tuple[int, int]:
    """The call's group grid (S, C), S·C = G: groups g = s·C + c, C taken from the first read or write
    whose groups repeat in a row (C = r) or tile (C = distinct groups); (G, 1) where none does."""
    for pattern, distinct in patterns:
        if isinstance(pattern, tuple) and distinct > 1:  # one group for all (distinct 1) says nothing of C
            kind, r = pattern
            return (groups // r, r) if kind == "interleave" else (r, distinct)
    return groups, 1


def _strided(distinct: list[tuple], width: int):
    """(start, stride) when each distinct group is one run and the runs start at even strides no
    narrower than a group (a view of the stream), else None."""
    if any(len(g) != 1 for g in distinct):
        return None
    starts = [g[0][0] for g in distinct]
    stride = starts[1] - starts[0] if len(starts) > 1 else width
    if stride < width or starts != list(range(starts[0], starts[0] + stride * len(starts), stride)):
        return None
    return starts[0], stride


def _overlap(runs) -> bool:
    """Whether any two (start, length) runs share a coordinate."""
    ordered = sorted(runs)
    return any(start < prev_start + prev_length
               for (prev_start, prev_length), (start, _) in zip(ordered, ordered[1:]))


def _spread(x: torch.Tensor, pattern) -> torch.Tensor:
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


def _summed(delta: torch.Tensor, pattern, distinct: int) -> torch.Tensor:
    """[…, G, width] -> […, D, width]: the groups that write one field summed (_spread's adjoint)."""
    if pattern is None:
        return delta
    if isinstance(pattern, tuple):
        kind, r = pattern
        return delta.unflatten(-2, (distinct, r)).sum(-2) if kind == "interleave" else \
            delta.unflatten(-2, (r, distinct)).sum(-3)
    out = delta.new_zeros(*delta.shape[:-2], distinct, delta.shape[-1])
    return out.index_add_(-2, pattern.to(delta.device), delta)


class Gather:
    """One read of a call: per group the coordinates it gathers. The distinct groups are read once (a
    view where they lie at even strides, else their runs, or an index tensor where runs would be
    many) and laid on the call's grid [B, T, S or 1, C or 1, width]: a read that varies along one
    axis of the grid, or none, is not copied along the other (primitives broadcast it)."""

    def __init__(self, groups: list[tuple] | None, grid: tuple[int, int]):
        self.grid, self.whole = grid, groups is None
        if self.whole:  # the whole stream, one group for all
            return
        distinct, self.pick = _distinct(groups)
        self.distinct, self.width = len(distinct), sum(length for _, length in groups[0])
        self.axes = _grid_axes(self.pick, self.distinct, grid)
        self.strided = _strided(distinct, self.width)
        runs = merged(run for g in distinct for run in g)
        self.source = runs if len(runs) <= MAX_RUNS else _index(runs)  # runs: a tuple

    def read(self, stream: torch.Tensor) -> torch.Tensor:
        if self.whole:
            return stream[..., None, None, :]
        if self.strided is not None:  # windows of the stream at even steps: a view
            start, stride = self.strided
            x = stream[..., start : start + (self.distinct - 1) * stride + self.width].unfold(-1, self.width, stride)
        elif isinstance(self.source, tuple):
            x = torch.cat([stream[..., start : start + length] for start, length in self.source], -1)
            x = x.unflatten(-1, (self.distinct, self.width))
        else:
            x = stream[..., self.source.to(stream.device)].unflatten(-1, (self.distinct, self.width))
        rows, cols = self.grid
        if self.axes is None:  # no grid structure: every group its copy
            return _spread(x, self.pick).unflatten(-2, (rows, cols))
        return x.unflatten(-2, (rows if "s" in self.axes else 1, cols if "c" in self.axes else 1))


class Scatter:
    """The write of a call: per group the field its output goes to. Outputs on the call's grid are
    summed over the axis along which groups share a field, or over the groups sharing one (`repeats`);
    then the distinct fields are placed, each coordinate once: as runs of the stream, or by an index
    tensor where runs would be many or distinct fields overlap (their sum is added). Nothing else of
    the stream is touched."""

    def __init__(self, groups: list[tuple], grid: tuple[int, int]):
        distinct, self.sum = _distinct(groups)
        self.grid, self.distinct = grid, len(distinct)
        self.axes = _grid_axes(self.sum, self.distinct, grid)
        runs = merged(run for g in distinct for run in g)
        self.overlap = _overlap(runs)
        if self.overlap or len(runs) > MAX_RUNS:
            self.target = _index(runs)
        else:
            offsets = [0]
            for _, length in runs[:-1]:
                offsets.append(offsets[-1] + length)
            self.target = [(start, length, offset) for (start, length), offset in zip(runs, offsets)]

    @property
    def summed_axis(self) -> int | None:
        """The grid axis of the output (-3: S, -2: C) whose groups add into one field, where one is."""
        return {"s": -2, "c": -3}.get(self.axes)

    def reduced(self, delta: torch.Tensor, summed: bool = False) -> torch.Tensor:
        """delta [B, T, S or 1, C or 1, width] -> [B, T, D·width]: one output per distinct field (summed:
        delta already holds the sum along summed_axis)."""
        rows, cols = self.grid
        if summed:
            kept = (rows, 1) if self.axes == "s" else (1, cols)
            return delta.expand(*delta.shape[:-3], *kept, delta.shape[-1]).flatten(-3)
        full = delta.expand(*delta.shape[:-3], rows, cols, delta.shape[-1])
        if self.axes == "s":
            return full.sum(-2).flatten(-2)
        if self.axes == "c":
            return full.sum(-3).flatten(-2)
        if self.axes == "":
            return full.sum((-3, -2))
        return _summed(full.flatten(-3, -2), self.sum, self.distinct).flatten(-2)

    def write(self, into: torch.Tensor, delta: torch.Tensor, gated: bool, summed: bool = False) -> torch.Tensor:
        """delta [B, T, S or 1, C or 1, width] into its fields; gated: replacing what they held."""
        delta = self.reduced(delta, summed)
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


def wiring(call: dict) -> tuple[list, Scatter]:
    """A call's wiring (JSON form): per read a Gather (an empty read: the whole stream), and the write's
    Scatter, all on one grid of the call's groups."""
    def groups_of(groups) -> list[tuple]:
        return [merged(fields) for fields in groups]

    reads = [groups_of(groups) if groups else None for groups in call["reads"]]
    write = groups_of([[field] for field in call["write"]])
    patterns = [_distinct(g)[1::-1] for g in [write, *reads] if g is not None]
    grid = grid_of([(pattern, len(distinct)) for pattern, distinct in patterns], len(write))
    return [Gather(groups, grid) for groups in reads], Scatter(write, grid)


def gather(stream, index: Gather):
    """[B, T, S or 1, C or 1, width] from a stream: the read on the call's grid."""
    return index.read(stream)


def apply(layer: nn.Module, reads: list, write, streams: list, into: torch.Tensor, gated: bool) -> torch.Tensor:
    """Run one call and return `into` with each group's output added to its field. A gated write
    first gates out what the field held (h ← (1−m)⊙h + Δ, m the field's indicator).

    This is the fast execution of one block of the standard view (backends/torch/standard.py, which
    builds and checks it): the gathers are the selections inside the block's Q, K, V or W_a, W_b,
    W_in; the write field is the selection inside O or W_o; a group is a head or a set of units;
    a new prefix-block version is the same positions after the residual add; the gate is the
    block's erase units (−h on a field whose value is dead)."""
    gathered = [gather(s, index) for s, index in zip(streams, reads)]
    axis = write.summed_axis
    if axis is not None and hasattr(layer, "sums") and layer.sums(axis, *gathered):  # the heads summed inside
        return write.write(into, layer(*gathered, summed=axis), gated, summed=True)
    return write.write(into, layer(*gathered), gated)  # delta: [B, T, S or 1, C or 1, width]
