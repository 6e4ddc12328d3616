"""The allocated program's lint (backends/torch/lint.py): it passes every compiled program, and it
names the call and the value of each broken invariant in a small program broken on purpose."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from backends.torch.lint import lint
from backends.torch.primitives import Attention, Linear
from backends.torch.program import TOKENS, Call, Field, Program, Read, Value, Write
from ir.errors import BackendError
from tintc import pipeline
from tests.models import tiny_config, tiny_model


def _call(i, reads, write, layer="linear"):
    return Call(layer, tuple(Read(TOKENS, ((f,),)) for f in reads), Write(TOKENS, (write,)), f"n{i}", "linear", "forward")


def _program(**change):
    """x → y → z → out by three per-position calls; z reuses x's coordinates (x dies at call 0) and out
    reuses y's (y's last read is call 1, before out is written by call 2)."""
    one, x, y, z, out = Field(0, 1), Field(1, 4), Field(5, 4), Field(1, 4), Field(5, 4)
    values = [Value("input one", one, -1, 3), Value("input x", x, -1, 0), Value("%y", y, 0, 1),
              Value("%z", z, 1, 2), Value("%out", out, 2, 3)]
    calls = [_call(0, [x], y), _call(1, [y], z), _call(2, [z], out)]
    layers = {"linear": Linear(torch.eye(4)),
              "attention": Attention(torch.eye(4), torch.eye(4), torch.eye(4), torch.eye(4), softmax=True, mask="causal")}
    program = Program(9, 4, {"one": one, "x": x}, calls, layers, out, {}, SimpleNamespace(blocks={"b": None}),
                      values, [])
    return replace(program, **change)


def test_lint_passes_a_well_formed_program():
    lint(_program())


def _broken_read():
    p = _program()
    return replace(p, calls=[*p.calls[:2], _call(2, [Field(5, 4)], Field(5, 4))])  # y, dead since call 1


def _write_over_a_live_value():
    p = _program()
    return replace(p, values=[*p.values[:3], replace(p.values[3], field=Field(0, 4)), p.values[4]],
                   calls=[*p.calls[:1], _call(1, [Field(5, 4)], Field(0, 4)), _call(2, [Field(0, 4)], Field(5, 4))])


def _in_place_attention():
    """z placed where y dies is allowed for a per-position call only: attention reads all positions."""
    p = _program()
    values = [*p.values[:3], replace(p.values[3], field=Field(5, 4)), replace(p.values[4], field=Field(1, 4))]
    calls = [p.calls[0], _call(1, [Field(5, 4)], Field(5, 4), layer="attention"), _call(2, [Field(5, 4)], Field(1, 4))]
    return replace(p, values=values, calls=calls, logits=Field(1, 4))


def _write_outside_a_value():
    p = _program()
    return replace(p, calls=[p.calls[0], _call(1, [Field(5, 4)], Field(1, 4)), _call(2, [Field(1, 4)], Field(6, 4))])


def _ungated_token_write():
    p = _program()
    return replace(p, calls=[p.calls[0], replace(p.calls[1], write=Write(TOKENS, (Field(1, 4),), "b@0")), p.calls[2]])


def _stale_block_version():
    """A descent (reading the constant one) that writes version 1 of block b from a copy of version 1."""
    p = _program()
    stale = Call("linear", (Read(TOKENS, ((Field(0, 1),),)),), Write("b@1", (Field(0, 4),), "b@1"), "d", "linear",
                 "descent")
    return replace(p, calls=[*p.calls[:2], stale, p.calls[2]],
                   values=[replace(p.values[0], last=4), *p.values[1:3], replace(p.values[3], last=3),
                           replace(p.values[4], born=3, last=4)])


def _cut_below_a_live_value():
    """The stream cut to 5 coordinates before call 2, which writes %out at 5:9."""
    return _program(narrowing={2: 5})


BROKEN = [
    (_broken_read, r"call 2 \(%n2, layer linear\) reads tokens\[5:9\], which holds no live value \(no value at 5\)"),
    (_write_over_a_live_value, r"call 1 \(%n1, layer linear\): value %z is placed on tokens\[0:4\] over value "
                               r"input one \(tokens\[0:1\]\), live from call -1 to call 3"),
    (_in_place_attention, r"call 1 \(%n1, layer attention\): value %z is placed on tokens\[5:9\] over value %y"),
    (_write_outside_a_value, r"call 2 \(%n2, layer linear\) writes tokens\[6:10\], which holds no live value"),
    (_ungated_token_write, r"call 1 \(%n1, layer linear\) adds to tokens without gating \(base b@0\)"),
    (_stale_block_version, r"call 2 \(%d, layer linear\) writes b@1 from b@1; allowed: version 1 from a copy of b@0"),
    (_cut_below_a_live_value, r"call 2 \(%n2, layer linear\) writes tokens\[5:9\], beyond the stream's width 5 "
                              r"\(cut before call 2\)"),
]


@pytest.mark.parametrize("broken,message", BROKEN, ids=[b.__name__.strip("_") for b, _ in BROKEN])
def test_lint_names_each_broken_invariant(broken, message):
    with pytest.raises(BackendError, match=message):
        lint(broken())


def test_lint_refuses_a_program_without_live_ranges():
    p = _program()
    with pytest.raises(BackendError, match="no live ranges"):
        lint(replace(p, values=[replace(v, born=None, last=None) for v in p.values]))


def test_lint_passes_a_compiled_tint_and_catches_a_value_moved_onto_a_live_one():
    program = pipeline.compile_tint(tiny_config("gpt2", dtype="float64"), tiny_model("gpt2", dtype=torch.float64)).tint.program
    lint(program)  # compile_tint ran it too
    one = program.inputs["one"]
    k, victim = next((k, v) for k, v in enumerate(program.values) if v.born >= 0 and v.field.width > 1)
    moved = Field(one.start, victim.field.width)  # over the constant one, live to the end
    values = [*program.values[:k], replace(victim, field=moved), *program.values[k + 1:]]
    with pytest.raises(BackendError, match=rf"value {victim.name} is placed on tokens\[{one.start}:"):
        lint(replace(program, values=values))
