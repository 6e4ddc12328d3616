"""Register allocation for the token stream: values whose lives do not overlap share coordinates.

The lowering gives every value its own field. A value lives from the call that writes it
to the last call that reads it (inputs from the start; the final hidden state to the
end: program.lives, the one liveness analysis). Walking the calls in order, each value takes the lowest free range of its width
once the values read for the last time are freed (by a per-position call: before its own
output is placed, so it may write over its inputs; by attention or a norm: after), so the
stream is only as wide as the values alive at once. A write gates out what its field held before (h ← (1−m)⊙h + Δ,
m the field's indicator), so reused coordinates need no clearing layer.

With `shared_rows` (tint.passes.shared_rows), the standard view places the prefix and vocabulary
rows on coordinates that token fields use too: prefix and token positions are distinct positions,
so a coordinate can hold a weight row at a prefix position and an activation at a token position.
That is exact only for values that no block reads ungated at a prefix position (`unshareable`).
Those take one pool of coordinates [0, U); the others a second pool above it, where the rows
start (Program.rows_at = U): the standard view's D_sim is U + max(second pool, widest row)
instead of the token fields' width + the widest row. The fast executor keeps its streams apart
and computes the same numbers either way.
"""

from __future__ import annotations

import bisect
from dataclasses import replace

from .primitives import MLP, PER_POSITION, Gate, Norm
from .program import TOKENS, Field, Program, Read, Write, lives
from .standard_plan import vanishes_at_zero


def allocate(program: Program, shared_rows: bool = False) -> Program:
    values = lives(program)
    starts = [v.field.start for v in values]

    def owner(f: Field):
        """The value whose field contains f (before allocation, values do not share coordinates)."""
        return values[bisect.bisect_right(starts, f.start) - 1]

    apart = unshareable(program, owner) if shared_rows else set(values)

    births: dict[int, list] = {}  # call -> the values it writes first, in the order of its write groups
    for i, call in enumerate(program.calls):
        if call.write.stream == TOKENS:
            for f in call.write.groups:
                v = owner(f)
                if v.born == i and v not in births.setdefault(i, []):
                    births[i].append(v)
    dying: dict[int, list] = {}
    for v in values:
        dying.setdefault(v.last, []).append(v)

    pools = {True: _Ranges(), False: _Ranges()}  # values kept apart from the rows, and shareable ones

    def take(v) -> int:
        return pools[v in apart].take(v.field.width)

    def release(v) -> None:
        pools[v in apart].release(placed[v], v.field.width)

    placed = {owner(f): take(owner(f)) for f in program.inputs.values()}
    for v in dying.get(-1, []):
        release(v)
    for i, call in enumerate(program.calls):
        # a per-position call (a gated MLP in the standard view) may write where its last reads were:
        # its block erases them in the same residual add; attention and norm blocks cannot
        in_place = isinstance(program.layers[call.layer], PER_POSITION)
        for v in dying.get(i, []):
            if v.born < i and in_place:
                release(v)
        for v in births.get(i, []):
            placed[v] = take(v)
        for v in dying.get(i, []):
            if v.born == i or not in_place:  # written and never read again, or read for the last time
                release(v)
    rows_at = pools[True].width  # the shareable pool sits above the other
    placed = {v: start + (0 if v in apart else rows_at) for v, start in placed.items()}

    def move(f: Field) -> Field:
        v = owner(f)
        return Field(placed[v] + f.start - v.field.start, f.width)

    def move_read(r: Read) -> Read:
        return r if r.stream != TOKENS else Read(TOKENS, tuple(tuple(move(f) for f in g) for g in r.groups))

    def move_write(w: Write) -> Write:
        return w if w.stream != TOKENS else Write(TOKENS, tuple(move(f) for f in w.groups), w.base)

    calls = [replace(c, reads=tuple(move_read(r) for r in c.reads), write=move_write(c.write))
             for c in program.calls]
    return replace(program, width=rows_at + pools[False].width, calls=calls,
                   inputs={k: move(f) for k, f in program.inputs.items()}, logits=move(program.logits),
                   values=[replace(v, field=move(v.field)) for v in values], rows_at=rows_at if shared_rows else None)


def unshareable(program: Program, owner) -> set:
    """The values that must not share coordinates with the prefix rows: those that a standard-view block
    would read at a prefix position without a gate. Attention is gated by its mask (queries, keys and
    values only at positions of their kind); a gated MLP's unit σ(a·h) ⊙ (b·h) is gated where one
    branch is the constant one (0 at prefix positions; σ(0) = 0 on the a side) or reads only
    coordinates that are 0 there. So kept apart: the constant one itself; what a norm reads
    (LN(row) ≠ 0); both inputs of a Gate's product; what an MLP whose σ(0) ≠ 0 writes (the erase
    units of its write, σ(one)·(−h), would reach a prefix position's row)."""
    apart = {owner(program.inputs["one"])}
    for call in program.calls:
        layer = program.layers[call.layer]
        reads = {Norm: call.reads, Gate: call.reads[:2]}.get(type(layer), ())
        apart |= {owner(f) for r in reads if r.stream == TOKENS for g in r.groups for f in g}
        if isinstance(layer, MLP) and not vanishes_at_zero(layer.fn) and call.write.stream == TOKENS:
            apart |= {owner(f) for f in call.write.groups}
    return apart


class _Ranges:
    """Free coordinate ranges of the stream: first fit, neighbours merged on release."""

    def __init__(self):
        self.free: list[tuple[int, int]] = []  # (start, width), sorted by start
        self.width = 0

    def take(self, width: int) -> int:
        for k, (start, size) in enumerate(self.free):
            if size >= width:
                self.free[k : k + 1] = [(start + width, size - width)] if size > width else []
                return start
        self.width += width
        return self.width - width

    def release(self, start: int, width: int) -> None:
        bisect.insort(self.free, (start, width))
        merged: list[tuple[int, int]] = []
        for s, w in self.free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + w)
            else:
                merged.append((s, w))
        self.free = merged
