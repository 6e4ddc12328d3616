"""The lowered TinT as data: a program of calls over streams, each reading and writing fields.

Streams: the token stream "tokens" ([B, T, width]), the unembedding "unembed" ([B, V, D])
and the prefix block versions (`block_stream(block, n)`, [B, K, block width]). A field is a range
of a stream's coordinates; a call applies one shared primitive to G groups, each gathering
its inputs from fields and adding its output to a field. A value is a named field of the token
stream with its live range (liveness.py, once, before allocation); its writes are gated (they
replace what the field held), while a new prefix-block version adds to a copy of the last.
`lint` checks the invariants the executor and the standard view rely on.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as default

import torch
from torch import nn

from ir.errors import BackendError

from .liveness import NEVER, Accesses
from .prefixes import Layout, layout_json

TOKENS = "tokens"


@dataclass(frozen=True)
class Field:
    start: int
    width: int

    @property
    def stop(self) -> int:
        return self.start + self.width

    def part(self, offset: int, width: int) -> "Field":
        return Field(self.start + offset, width)

    def chunks(self, width: int) -> list["Field"]:
        return [self.part(i, width) for i in range(0, self.width, width)]


@dataclass(frozen=True)
class Value:
    """A value of the token stream: its name (the training-graph op that makes it, or the input), its
    field, and its live range: from the call that first writes it (−1: the input layer) to the last
    call that reads it (len(calls): the output head; a value never read dies where it is born).
    Token writes are gated: a value replaces what its field held."""
    name: str
    field: Field
    born: int | None = None  # None until program.lives has run
    last: int | None = None
    gated: bool = True

    def live_at(self, call: int) -> bool:
        """Whether a read at `call` finds this value."""
        return self.born < call <= self.last


@dataclass(frozen=True)
class Read:
    stream: str  # "tokens", "unembed", or a prefix block version "h0.q@1"
    groups: tuple[tuple[Field, ...], ...] = ()  # per group, the fields gathered in order; () = the whole stream


@dataclass(frozen=True)
class Write:
    stream: str
    groups: tuple[Field, ...]  # per group, the field its output is added to (repeats add up)
    base: str | None = None  # a new block version starts as a copy of this one


@dataclass(frozen=True)
class Call:
    layer: str  # the shared primitive in Program.layers
    reads: tuple[Read, ...]  # one per primitive input
    write: Write
    node: str  # the training-graph op this call simulates
    op: str  # linear | activation | attention | norm | loss | residual
    phase: str  # forward | backward | descent | eval

    def token_fields(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(fields read, fields written) of the token stream, as (start, width)."""
        read = [(f.start, f.width) for r in self.reads if r.stream == TOKENS for g in r.groups for f in g]
        return read, [(f.start, f.width) for f in self.write.groups] if self.write.stream == TOKENS else []


@dataclass
class Program:
    width: int  # D_sim: the token stream's width
    max_length: int  # T_max: the longest input (one-hot positions)
    inputs: dict[str, Field]  # the input layer's fields
    calls: list[Call]
    layers: dict[str, nn.Module]  # shared primitives by name
    logits: Field  # the evaluation's final hidden state, read by the output head
    final_blocks: dict[str, str]  # block -> the stream of its last version
    layout: Layout
    values: list[Value]  # every token value, in allocation order
    low_rank: list[dict]  # with tint.passes.low_rank: each projection, its rank, factorised or not
    factored: bool = False  # tint.passes.low_rank: the standard view factorises its projections too
    lr: float = 1e-3  # η where forward is given none (the config's tint.train.lr); an input, not in any weight
    logit_softcap: float | None = None  # the output head's c·tanh(z/c), as the aux model's head (Gemma 2)
    rows_at: int | None = None  # tint.passes.shared_rows: the standard view's first row coordinate (None: width)
    narrowing: dict[int, int] = default(default_factory=dict)  # call -> the token stream's live width from there on (allocate.py)
    released: dict[int, tuple] = default(default_factory=dict)  # call -> block versions never read after it (allocate.py)


def head_reads(program: Program) -> list[Field]:
    """What the output head reads at the end: the logits' value and, for the standard view, the constant
    one (its gated MLPs' constant branch) and the one-hot positions (its erase heads attend by them)."""
    positions = program.inputs.get("positions")  # hand-built programs may have none
    return [program.logits, program.inputs["one"]] + ([positions] if positions is not None else [])


def lives(program: Program) -> list[Value]:
    """program.values with their live ranges, from the accesses of a program whose values tile the
    token stream without sharing coordinates (before allocation), the output head's reads (head_reads)
    at the end."""
    end = len(program.calls)
    accesses = Accesses(program.width, [(f.start, f.width) for f in program.inputs.values()])
    for i, call in enumerate(program.calls):
        read, written = call.token_fields()
        accesses.read(i, set(read))
        accesses.write(i, set(written))
    accesses.read(end, [(f.start, f.width) for f in head_reads(program)])
    widths = torch.tensor([v.field.width for v in program.values])
    if [v.field.start for v in program.values] != (widths.cumsum(0) - widths).tolist() or widths.sum() != program.width:
        raise BackendError("program.lives: the values do not tile the token stream (run it before allocation)")
    owner = torch.repeat_interleave(torch.arange(len(widths)), widths)  # [width]: the value of each coordinate
    unwritten = torch.iinfo(torch.long).max
    first = accesses.first_write.masked_fill(accesses.first_write == NEVER, unwritten)
    born = torch.full((len(widths),), unwritten).scatter_reduce(0, owner, first, "amin")
    last = torch.full((len(widths),), NEVER).scatter_reduce(0, owner, accesses.last_read, "amax")
    out = []
    for v, b, l in zip(program.values, born.tolist(), last.tolist()):
        if b == unwritten:
            raise BackendError(f"value {v.name} (tokens[{v.field.start}:{v.field.stop}]) is never written")
        out.append(Value(v.name, v.field, b, max(b, l), v.gated))
    return out


def call_json(call: Call) -> dict:
    """A call's wiring as plain data: per read, per group, the [start, width] fields gathered
    (an empty list: the whole stream); per group the field written; whether the write is gated;
    the primitive, the streams read and written, and the training-graph op and phase."""
    return {"reads": [[[[f.start, f.width] for f in fields] for fields in r.groups] for r in call.reads],
            "write": [[f.start, f.width] for f in call.write.groups], "gated": call.write.base is None,
            "layer": call.layer, "streams": [r.stream for r in call.reads], "target": call.write.stream,
            "node": call.node, "phase": call.phase}


def program_json(program: Program) -> dict:
    """The program as plain data (tint_config.json without its format tag): sizes, input fields,
    the logits field, the prefix layout and every call's wiring."""
    return {
        "width": program.width,
        "max_length": program.max_length,
        "inputs": {name: [f.start, f.width] for name, f in program.inputs.items()},
        "logits": [program.logits.start, program.logits.width],
        "layout": layout_json(program.layout),
        "calls": [call_json(c) for c in program.calls],
        "low_rank": program.factored,
        "lr": program.lr,
    } | ({"logit_softcap": program.logit_softcap} if program.logit_softcap is not None else {}) \
      | ({"rows_at": program.rows_at} if program.rows_at is not None else {}) \
      | ({"narrowing": {str(i): w for i, w in program.narrowing.items()}} if program.narrowing else {})  # only where set
