"""A norm's gain and bias (γ⊙x̂ + β, γ⊙y, (1 + w)⊙y) are read from its prefix token by linear attention,
one head per coordinate (backends/torch/lower.py `_gained`), as multi-head attention inside a group
(primitives.Attention(heads=n)): γ is never copied into the stream. The primitive is n heads side by side,
and with shared rows only one side of a Gate's product is kept apart from the rows (allocate.unshareable)."""

from __future__ import annotations

import pytest
import torch

from backends.torch import allocate
from backends.torch.primitives import Attention, Gate
from backends.torch.program import TOKENS
from backends.torch.stream_io import stream_block
from tests.test_shared_rows import ON, _compile


def _one_head_per_group(layer: Attention, xq, xk, xv) -> torch.Tensor:
    """The same heads as separate groups of a one-head attention (the reference for heads > 1)."""
    n = layer.heads
    part = lambda w, h: w[h * (w.shape[0] // n):(h + 1) * (w.shape[0] // n)]  # noqa: E731
    outs = []
    for h in range(n):
        one = Attention(part(layer.w_q, h), part(layer.w_k, h), part(layer.w_v, h),
                        layer.w_o[:, h * (layer.w_v.shape[0] // n):(h + 1) * (layer.w_v.shape[0] // n)],
                        softmax=layer.softmax, mask=layer.mask)
        outs.append(one(xq, xk, xv))
    return sum(outs)


@pytest.mark.parametrize("softmax,mask,keys", [(False, "full", 1), (False, "full", 5), (True, "causal", 6),
                                               (False, "causal", 6)])
def test_heads_inside_a_group_are_the_heads_side_by_side(softmax, mask, keys):
    gen = torch.Generator().manual_seed(5)
    n, dq, dv = 4, 3, 2
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    layer = Attention(r(n * dq, 7), r(n * dq, 5), r(n * dv, 5), r(6, n * dv), softmax=softmax, mask=mask, heads=n)
    xq, xk, xv = r(2, 6, 3, 1, 7), r(2, keys, 3, 1, 5), r(2, keys, 1, 1, 5)  # values shared by the groups
    got, want = layer(xq, xk, xv), _one_head_per_group(layer, xq, xk, xv)
    assert got.shape == want.shape == (2, 6, 3, 1, 6)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert not layer.sums(-3, xq, xk, xv)  # its heads never add into one field


def test_heads_that_do_not_split_evenly_are_refused():
    with pytest.raises(ValueError, match="heads=4"):
        Attention(torch.eye(6), torch.eye(6), torch.eye(6), torch.eye(6), softmax=False, mask="full", heads=4)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_norm_gains_are_read_from_the_prefix_token_never_copied(family):
    """Every call that reads a norm's block into the token stream is a multi-head gain call whose values
    are the token's constant 1: no call writes γ into the token stream (a copy of [γ, β] was 2·D
    coordinates beside x̂ at the widest point)."""
    _, _, compiled = _compile(family, {})
    program = compiled.tint.program
    norm_blocks = {name for name, b in program.layout.blocks.items() if b.kind == "layer_norm"}
    reading = [c for c in program.calls if c.write.stream == TOKENS
               and any("@" in r.stream and stream_block(r.stream)[0] in norm_blocks for r in c.reads)]
    assert reading
    for call in reading:
        layer = program.layers[call.layer]
        assert isinstance(layer, Attention) and layer.heads > 1
        q, k, v = call.reads
        assert q.stream == TOKENS and k.stream == v.stream != TOKENS
        assert all(sum(f.width for f in g) == 1 for g in v.groups)  # the constant, not γ or β


def test_a_product_keeps_one_side_apart_from_the_rows_the_narrower(monkeypatch):
    """η⊙x (the descent's learning rate, one coordinate) keeps η apart, not x: a product is 0 at a
    prefix position where one side is. Before, both sides were kept apart."""
    seen = {}
    unshareable = allocate.unshareable

    def spy(program, owner):
        seen.update(program=program, owner=owner, apart=unshareable(program, owner))
        return seen["apart"]
    monkeypatch.setattr(allocate, "unshareable", spy)
    _compile("gpt2", {}, ON)
    program, owner, apart = seen["program"], seen["owner"], seen["apart"]
    lr = owner(program.inputs["lr"])
    sides = [[{owner(f) for g in r.groups for f in g} for r in c.reads[:2] if r.stream == TOKENS]
             for c in program.calls if isinstance(program.layers[c.layer], Gate)]
    times_lr = [s for s in sides if s[0] == {lr}]
    assert times_lr and lr in apart
    assert any(not s[1] <= apart for s in times_lr)  # some x shares coordinates with the rows
    assert all(any(side <= apart for side in s) for s in sides if s)  # every product has a side apart
