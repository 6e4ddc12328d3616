"""The lowered TinT as data: a program of calls over streams, each reading and writing fields.

Streams: the token stream "tokens" ([B, T, width]), the unembedding "unembed" ([B, V, D])
and the prefix block versions "block@n" ([B, K, block width]). A field is a range of a
stream's coordinates; a call applies one shared primitive to G groups, each gathering
its inputs from fields and adding its output to a field.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

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
    values: list[Field]  # every value's field, in allocation order (for register allocation)
    low_rank: list[dict]  # with tint.passes.low_rank: each projection, its rank, factorised or not
    factored: bool = False  # tint.passes.low_rank: the standard view factorises its projections too


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
    }
