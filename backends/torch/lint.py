"""The invariants of an allocated program, checked: the fast executor and the standard view both rely
on them, and register allocation is where they would break.

- no read of a dead field: every token field a call reads lies inside one value that is live there
  (written before, read no later than its last read), and holds that value (no other value was
  placed over it);
- no write over a live field: a value is placed only on coordinates whose values are dead (a
  per-position call may write where its own inputs die: its block erases them in the same residual
  add), and a call writes only inside values that are live there;
- every gated write erased: token writes are gated (the field's old contents are gated out; the
  standard view erases them), and a write to a prefix block is its next version, added to a copy
  of the current one, never gated;
- nothing read or written beyond a cut: after the fast executor lets the stream's tail go
  (Program.narrowing), every token field accessed lies below the cut.

`lint(program)` raises a BackendError naming the call, its training-graph op, the field and the value.
"""

from __future__ import annotations

import torch

from ir.errors import BackendError

from .primitives import PER_POSITION
from .program import TOKENS, Call, Field, Program, Value, head_reads
from .stream_io import block_stream, stream_block

FREE = -1


class _Occupancy:
    """Which value holds each token coordinate as the calls run (FREE: none)."""

    def __init__(self, program: Program):
        self.values = program.values
        self.holder = torch.full((program.width,), FREE, dtype=torch.long)
        self.index = {v: k for k, v in enumerate(program.values)}

    def place(self, v: Value, where: str) -> None:
        held = self.holder[v.field.start : v.field.stop]
        live = held[held != FREE]
        if len(live):
            other = self.values[int(live[0])]
            raise BackendError(f"{where}: value {v.name} is placed on tokens[{v.field.start}:{v.field.stop}] over "
                               f"value {other.name} (tokens[{other.field.start}:{other.field.stop}]), live from "
                               f"call {other.born} to call {other.last}; allowed: coordinates whose value is dead")
        held.fill_(self.index[v])

    def release(self, v: Value) -> None:
        held = self.holder[v.field.start : v.field.stop]
        held.masked_fill_(held == self.index[v], FREE)

    def check(self, f: Field, where: str, verb: str) -> None:
        """f lies inside the value that holds its first coordinate. (A value holds all of its field
        while it is placed: place refuses coordinates that another value holds.)"""
        k = int(self.holder[f.start])
        v = self.values[k] if k != FREE else None
        if v is None or not (v.field.start <= f.start and f.stop <= v.field.stop):
            raise BackendError(f"{where} {verb} tokens[{f.start}:{f.stop}], which holds no live value "
                               f"({'no value' if v is None else 'value ' + v.name} at {f.start}); allowed: "
                               "fields inside one value between its first write and its last read")


def _where(i: int, call: Call | None) -> str:
    return "the output head" if call is None else f"call {i} (%{call.node}, layer {call.layer})"


def lint(program: Program) -> None:
    """Raise a BackendError at the first violation of the invariants above (a program after allocate)."""
    if any(v.born is None for v in program.values):
        raise BackendError("lint: the program's values have no live ranges (lint runs after allocate)")
    occupancy = _Occupancy(program)
    births: dict[int, list[Value]] = {}
    dying: dict[int, list[Value]] = {}
    for v in program.values:
        births.setdefault(v.born, []).append(v)
        dying.setdefault(v.last, []).append(v)
    for v in births.get(-1, []):
        occupancy.place(v, "the input layer")
    for v in dying.get(-1, []):
        occupancy.release(v)
    version = {block: 0 for block in program.layout.blocks}
    width, cut = program.width, None
    for i, call in enumerate(program.calls):
        where = _where(i, call)
        if i in program.narrowing:
            width, cut = program.narrowing[i], i
        _check_narrowing(call.token_fields(), width, cut, where)
        for read in call.reads:
            if read.stream == TOKENS:
                for f in {f for group in read.groups for f in group}:
                    occupancy.check(f, where, "reads")
            elif read.stream != "unembed" and stream_block(read.stream)[1] != version[stream_block(read.stream)[0]]:
                raise BackendError(f"{where} reads {read.stream}, not its block's current version "
                                   f"{version[stream_block(read.stream)[0]]}; allowed: the current version")
        in_place = isinstance(program.layers[call.layer], PER_POSITION)
        for v in dying.get(i, []):
            if v.born < i and in_place:
                occupancy.release(v)
        for v in births.get(i, []):
            occupancy.place(v, where)
        _check_write(call, where, occupancy, version)
        for v in dying.get(i, []):
            if v.born == i or not in_place:
                occupancy.release(v)
    head = [(f.start, f.width) for f in head_reads(program)]
    _check_narrowing((head, []), width, cut, _where(len(program.calls), None))
    for f in head_reads(program):
        occupancy.check(f, _where(len(program.calls), None), "reads")


def _check_narrowing(fields: tuple[list, list], width: int, cut: int | None, where: str) -> None:
    """The (read, written) token fields lie inside the stream's first `width` coordinates, where it was
    cut to that before call `cut` (None: not cut yet; the value checks cover the whole stream)."""
    if cut is None:
        return
    for verb, accessed in zip(("reads", "writes"), fields):
        for start, size in accessed:
            if start + size > width:
                raise BackendError(f"{where} {verb} tokens[{start}:{start + size}], beyond the stream's width "
                                   f"{width} (cut before call {cut}); allowed: fields inside it")


def _check_write(call: Call, where: str, occupancy: _Occupancy, version: dict) -> None:
    write = call.write
    if write.stream == TOKENS:
        if write.base is not None:
            raise BackendError(f"{where} adds to tokens without gating (base {write.base}); allowed: gated token writes")
        for f in set(write.groups):
            occupancy.check(f, where, "writes")
        return
    block, new = stream_block(write.stream)
    current = block_stream(block, version[block])
    if new != version[block] + 1 or write.base != current:
        raise BackendError(f"{where} writes {write.stream} from {write.base}; allowed: version {version[block] + 1} "
                           f"from a copy of {current}")
    version[block] = new
