"""Register allocation for the token stream: values whose lives do not overlap share coordinates.

The lowering gives every value its own field. A value lives from the call that writes it
to the last call that reads it (inputs from the start; the final hidden state to the
end: program.lives, the one liveness analysis). Walking the calls in order, each value takes the lowest free range of its width
once the values read for the last time are freed (by a per-position call: before its own
output is placed, so it may write over its inputs; by attention or a norm: after), so the
stream is only as wide as the values alive at once. A write gates out what its field held before (h ← (1−m)⊙h + Δ,
m the field's indicator), so reused coordinates need no clearing layer.

Values that outlive the training (born before the first backward or descent call, read after the
last: the norms' values that the evaluation reads again) take a pool of their own below the others. So
the coordinates above the still-live values of the layers not yet differentiated fall free as the
backward walks down the layers, and the fast executor lets the stream's tail go there (`narrowing`):
it holds the stream up to where the last value still needed ends, not where the widest point of the
program did. Likewise a prefix block's version that no later call reads is dropped (`released`).

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
from .stream_io import stream_block


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

    training = [i for i, call in enumerate(program.calls) if call.phase in ("backward", "descent")]
    lasting = {v for v in values if training and v.born < training[0] and v.last > training[-1]}
    # per pool (kept apart from the rows or not, outlives the training or not) its free ranges
    pools = {(a, o): _Ranges() for a in (True, False) for o in (True, False)}

    def pool(v) -> tuple[bool, bool]:
        return v in apart, v in lasting

    def take(v) -> int:
        return pools[pool(v)].take(v.field.width)

    def release(v) -> None:
        pools[pool(v)].release(placed[v], v.field.width)

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
    # in the stream, bottom up: kept apart and lasting, kept apart, shareable and lasting, shareable
    order = [(True, True), (True, False), (False, True), (False, False)]
    offset = dict(zip(order, [sum(pools[k].width for k in order[:n]) for n in range(len(order))]))
    rows_at = offset[(False, True)]  # the shareable pools sit above the others
    placed = {v: start + offset[pool(v)] for v, start in placed.items()}

    def move(f: Field) -> Field:
        v = owner(f)
        return Field(placed[v] + f.start - v.field.start, f.width)

    def move_read(r: Read) -> Read:
        return r if r.stream != TOKENS else Read(TOKENS, tuple(tuple(move(f) for f in g) for g in r.groups))

    def move_write(w: Write) -> Write:
        return w if w.stream != TOKENS else Write(TOKENS, tuple(move(f) for f in w.groups), w.base)

    calls = [replace(c, reads=tuple(move_read(r) for r in c.reads), write=move_write(c.write))
             for c in program.calls]
    moved = [replace(v, field=move(v.field)) for v in values]
    width = sum(p.width for p in pools.values())
    return replace(program, width=width, calls=calls, inputs={k: move(f) for k, f in program.inputs.items()},
                   logits=move(program.logits), values=moved, rows_at=rows_at if shared_rows else None,
                   narrowing=narrowing(moved, len(calls), width), released=released(program))


NARROW_STEP = 1 / 64  # let the stream's tail go each time a 64th of its width falls free


def narrowing(values, calls: int, width: int) -> dict[int, int]:
    """{call: width}: before these calls the fast executor lets go of the token stream beyond its first
    `width` coordinates (stream_io.release_beyond: never read again, so their pages go back to the
    system, in place), each time the values read at or after the call (and the output head's) end a
    NARROW_STEP of the width below where they ended at the last cut. The stream narrows as the backward
    walks down the layers while the new block versions pile up: at the SmolLM2-360M shape (T 256, paper
    rules) the run's worst moment, stream and new versions together, falls from 1,815 to 1,197 MiB (47
    cuts, each a madvise per position)."""
    ends = [0] * (calls + 1)  # per call, where the last value read there or later ends
    for v in values:
        at = min(v.last, calls)
        ends[at] = max(ends[at], v.field.stop)
    for i in range(calls - 1, -1, -1):
        ends[i] = max(ends[i], ends[i + 1])
    cuts, current = {}, width
    for i in range(calls):
        if ends[i] <= current - NARROW_STEP * width:
            cuts[i] = current = ends[i]
    return cuts


def released(program: Program) -> dict[int, tuple[str, ...]]:
    """{call: streams}: after these calls the fast executor drops the prefix-block versions that descents
    made (version ≥ 1) which no later call reads or copies and which are not final: a run of S steps holds
    at most two versions of a block at a time, not S + 1."""
    last = {}
    for i, call in enumerate(program.calls):
        for name in [r.stream for r in call.reads] + [call.write.base]:
            if name is not None and "@" in name and stream_block(name)[1] > 0:
                last[name] = i
    after = {}
    for name, i in last.items():
        if name not in program.final_blocks.values():
            after.setdefault(i, []).append(name)
    return {i: tuple(sorted(names)) for i, names in sorted(after.items())}


def versions_held(program: Program) -> list[int]:
    """Per call, the elements of the new prefix-block versions held while it runs (a descent's new
    version, a copy of the last one, beside those not yet released), and after the last call."""
    def size(stream: str) -> int:
        block = program.layout.blocks[stream_block(stream)[0]]
        return block.tokens * block.width

    held, out = 0, []
    for i, call in enumerate(program.calls):
        held += size(call.write.stream) if call.write.base is not None else 0
        out.append(held)
        held -= sum(size(name) for name in program.released.get(i, ()))
    return out + [held]


def unshareable(program: Program, owner) -> set:
    """The values that must not share coordinates with the prefix rows: those that a standard-view block
    would read at a prefix position without a gate. Attention is gated by its mask (queries, keys and
    values only at positions of their kind); a gated MLP's unit σ(a·h) ⊙ (b·h) is gated where one
    branch is the constant one (0 at prefix positions; σ(0) = 0 on the a side) or reads only
    coordinates that are 0 there: those kept apart (no block writes a nonzero at a prefix position
    below the rows). So kept apart: the constant one itself; what a norm reads (LN(row) ≠ 0); what an
    MLP whose σ(0) ≠ 0 writes (the erase units of its write, σ(one)·(−h), would reach a prefix
    position's row); and one input of each Gate's product, the narrower where neither is apart yet
    (η⊙x keeps η apart, not x)."""
    apart = {owner(program.inputs["one"])}
    products = []  # per Gate call, the values of each side of its product
    for call in program.calls:
        layer = program.layers[call.layer]
        if isinstance(layer, Norm):
            apart |= {owner(f) for r in call.reads if r.stream == TOKENS for g in r.groups for f in g}
        elif isinstance(layer, Gate):
            products.append([{owner(f) for g in r.groups for f in g} for r in call.reads[:2] if r.stream == TOKENS])
        elif isinstance(layer, MLP) and not vanishes_at_zero(layer.fn) and call.write.stream == TOKENS:
            apart |= {owner(f) for f in call.write.groups}
    for sides in products:  # (a side read from a prefix block is not 0 at a prefix position)
        if sides and not any(side <= apart for side in sides):
            apart |= min(sides, key=lambda side: sum(v.field.width for v in side))
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
