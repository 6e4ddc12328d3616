"""Register allocation for the token stream: values whose lives do not overlap share coordinates.

The lowering gives every value its own field. A value lives from the call that writes it
to the last call that reads it (inputs from the start; the final hidden state to the
end). Walking the calls in order, each value takes the lowest free range of its width
once the values read for the last time are freed (by a per-position call: before its own
output is placed, so it may write over its inputs; by attention or a norm: after), so the
stream is only as wide as the values alive at once. A write gates out what its field held before (h ← (1−m)⊙h + Δ,
m the field's indicator), so reused coordinates need no clearing layer.
"""

from __future__ import annotations

import bisect
from dataclasses import replace

from .program import TOKENS, Field, Program, Read, Write
from .runtime import Gate, Linear, MLP

PER_POSITION = (Linear, MLP, Gate)


def allocate(program: Program) -> Program:
    starts = [v.start for v in program.values]

    def owner(f: Field) -> Field:
        """The value whose field contains f."""
        return program.values[bisect.bisect_right(starts, f.start) - 1]

    born = {v: -1 for v in program.inputs.values()}  # the input layer writes before call 0
    last = dict(born)
    for i, call in enumerate(program.calls):
        if call.write.stream == TOKENS:
            for f in call.write.groups:
                born.setdefault(owner(f), i)
        for read in call.reads:
            if read.stream == TOKENS:
                for f in (f for fields in read.groups for f in fields):
                    last[owner(f)] = i
    last[owner(program.logits)] = len(program.calls)  # the output head reads it at the end
    last[program.inputs["one"]] = len(program.calls)  # the standard view's gated MLPs read it as their constant

    ranges = _Ranges()
    placed = {v: ranges.take(v.width) for v in program.inputs.values()}
    dying: dict[int, list[Field]] = {}
    for v, i in born.items():
        dying.setdefault(max(i, last.get(v, i)), []).append(v)
    births: dict[int, list[Field]] = {}
    for v, i in born.items():
        births.setdefault(i, []).append(v)
    for v in dying.get(-1, []):
        ranges.release(placed[v], v.width)
    for i, call in enumerate(program.calls):
        # a per-position call (a gated MLP in the standard view) may write where its last reads were:
        # its block erases them in the same residual add; attention and norm blocks cannot
        in_place = isinstance(program.layers[call.layer], PER_POSITION)
        for v in dying.get(i, []):
            if born[v] < i and in_place:
                ranges.release(placed[v], v.width)
        for v in births.get(i, []):
            placed[v] = ranges.take(v.width)
        for v in dying.get(i, []):
            if born[v] == i or not in_place:  # written and never read again, or read for the last time
                ranges.release(placed[v], v.width)

    def move(f: Field) -> Field:
        v = owner(f)
        return Field(placed[v] + f.start - v.start, f.width)

    def move_read(r: Read) -> Read:
        return r if r.stream != TOKENS else Read(TOKENS, tuple(tuple(move(f) for f in g) for g in r.groups))

    def move_write(w: Write) -> Write:
        return w if w.stream != TOKENS else Write(TOKENS, tuple(move(f) for f in w.groups), w.base)

    calls = [replace(c, reads=tuple(move_read(r) for r in c.reads), write=move_write(c.write))
             for c in program.calls]
    return replace(program, width=ranges.width, calls=calls, inputs={k: move(f) for k, f in program.inputs.items()},
                   logits=move(program.logits), values=[move(v) for v in program.values])


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
