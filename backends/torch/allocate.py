"""Register allocation for the token stream: values whose lives do not overlap share coordinates.

The lowering gives every value its own field. A value lives from the call that writes it
to the last call that reads it (inputs from the start; the final hidden state to the
end: program.lives, the one liveness analysis). Walking the calls in order, each value takes the lowest free range of its width
once the values read for the last time are freed (by a per-position call: before its own
output is placed, so it may write over its inputs; by attention or a norm: after), so the
stream is only as wide as the values alive at once. A write gates out what its field held before (h ← (1−m)⊙h + Δ,
m the field's indicator), so reused coordinates need no clearing layer.
"""

from __future__ import annotations

import bisect
from dataclasses import replace

from .primitives import PER_POSITION
from .program import TOKENS, Field, Program, Read, Write, lives


def allocate(program: Program) -> Program:
    values = lives(program)
    starts = [v.field.start for v in values]

    def owner(f: Field):
        """The value whose field contains f (before allocation, values do not share coordinates)."""
        return values[bisect.bisect_right(starts, f.start) - 1]

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

    ranges = _Ranges()
    placed = {owner(f): ranges.take(f.width) for f in program.inputs.values()}
    for v in dying.get(-1, []):
        ranges.release(placed[v], v.field.width)
    for i, call in enumerate(program.calls):
        # a per-position call (a gated MLP in the standard view) may write where its last reads were:
        # its block erases them in the same residual add; attention and norm blocks cannot
        in_place = isinstance(program.layers[call.layer], PER_POSITION)
        for v in dying.get(i, []):
            if v.born < i and in_place:
                ranges.release(placed[v], v.field.width)
        for v in births.get(i, []):
            placed[v] = ranges.take(v.field.width)
        for v in dying.get(i, []):
            if v.born == i or not in_place:  # written and never read again, or read for the last time
                ranges.release(placed[v], v.field.width)

    def move(f: Field) -> Field:
        v = owner(f)
        return Field(placed[v] + f.start - v.field.start, f.width)

    def move_read(r: Read) -> Read:
        return r if r.stream != TOKENS else Read(TOKENS, tuple(tuple(move(f) for f in g) for g in r.groups))

    def move_write(w: Write) -> Write:
        return w if w.stream != TOKENS else Write(TOKENS, tuple(move(f) for f in w.groups), w.base)

    calls = [replace(c, reads=tuple(move_read(r) for r in c.reads), write=move_write(c.write))
             for c in program.calls]
    return replace(program, width=ranges.width, calls=calls, inputs={k: move(f) for k, f in program.inputs.items()},
                   logits=move(program.logits), values=[replace(v, field=move(v.field)) for v in values])


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
