"""What keeps the stream's working set narrow without changing a number: gradient contributions summed as
they arrive (ir/passes/autodiff.py), and each forward pass deriving its own x̂, γ/β copies and tables
(backends/torch/lower.py) rather than holding the previous pass's through a backward pass; and, in the
standard view, erasures folded into units that already write their coordinates (standard_plan.py)."""

from __future__ import annotations

import pytest

from tests.test_shared_rows import _compile, _view_against_fast

SPLIT = {"split_mlp": {"enabled": True}}


def test_gradient_contributions_are_summed_as_they_arrive():
    """The split OPT micro's ln_mlp gets one ∂ per sub-MLP: each is added to the running sum before the
    next sub-MLP's backward starts, so at most one waits in the stream."""
    _, _, compiled = _compile("opt", {}, SPLIT)
    nodes = compiled.train_graph.nodes()
    where = {n.name: i for i, n in enumerate(nodes)}
    sums = [n for n in nodes if n.kind == "add" and ".grad" in n.name and "ln_mlp" in n.name]
    assert len(sums) == 2 * 3  # 2 layers, 4 sub-MLPs: 3 sums each
    for node in sums:
        contribution = where[node.inputs[1]]
        between = nodes[contribution + 1 : where[node.name]]
        assert not [n.name for n in between if n.kind.endswith("_backward")], node.name


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_no_value_of_a_forward_pass_waits_through_the_backward_for_the_evaluation(family):
    """The evaluation reads nothing made before it but the input layer's fields and the embedding (the
    input of both passes): x̂ of the embedding, the untrained final norm's γ/β copy and the rotary tables
    are made again."""
    _, _, compiled = _compile(family, {})
    program = compiled.tint.program
    first_eval = next(i for i, c in enumerate(program.calls) if c.phase == "eval")
    held = set()
    for i, call in enumerate(program.calls[first_eval:], first_eval):
        read, _ = call.token_fields()
        for v in program.values:
            if v.born < first_eval and v.live_at(i) and any(s < v.field.stop and v.field.start < s + w for s, w in read):
                held.add(v.name)
    assert held and all(name.startswith("input ") or name in ("%embed@0", "%tok_embed@0") for name in held), held


def test_erasures_fold_into_units_that_already_write_the_coordinate(monkeypatch):
    """A gated write's −h_c joins the input of the unit on the constant branch that writes c (a linear
    map's, a Gate's linear term) instead of units of its own: fewer units, the same view."""
    from backends.torch import standard_plan

    def erase_units(compiled) -> tuple[int, int]:
        blocks = compiled.tint.standard().plan.blocks
        return (sum(u.n for b in blocks for u in b.units if u.b and isinstance(u.b[0], str)),
                sum(b.width for b in blocks if b.kind == "mlp"))

    _, model, compiled = _compile("gpt2", {}, SPLIT)
    folded, units = erase_units(compiled)
    logits_error, prefix_error, _ = _view_against_fast(compiled, model)
    assert logits_error <= 1e-10 and prefix_error <= 1e-10
    monkeypatch.setattr(standard_plan, "_fold_erasure", lambda u, coords, sigma_one: (u, coords))
    unfolded, units_unfolded = erase_units(compiled)
    assert folded < unfolded and units_unfolded - units == unfolded - folded


def test_products_take_the_erasure_of_the_coordinate_they_overwrite(monkeypatch):
    """η⊙x written over x: (a·h)(b·h) − h_c = (a·h − one)(b·h) where b reads h_c alone, so the product's
    own unit erases the dead x (no erase units); the view stays the fast executor. Without the fold the
    same writes need erase units."""
    from backends.torch import standard_plan

    def erase_units(compiled) -> int:
        return sum(u.n for b in compiled.tint.standard().plan.blocks for u in b.units
                   if u.b and isinstance(u.b[0], str))

    _, model, compiled = _compile("gpt2", {}, SPLIT)
    folded = erase_units(compiled)
    logits_error, prefix_error, _ = _view_against_fast(compiled, model)
    assert logits_error <= 1e-10 and prefix_error <= 1e-10
    monkeypatch.setattr(standard_plan, "_fold_into_product", lambda u, coords, one: (u, coords))
    assert erase_units(compiled) > folded


def test_erase_heads_attend_each_token_to_itself(monkeypatch):
    """Each erase block is one linear head whose query and key are the one-hot positions under the causal
    token mask (score 1 on the diagonal, 0 elsewhere) and whose value is −h_c. With +h_c the view is wrong."""
    from backends.torch import standard_plan

    _, model, compiled = _compile("gpt2", {}, SPLIT)
    program = compiled.tint.program
    positions = ((program.inputs["positions"].start, program.inputs["positions"].width),)
    erase = [b for b in compiled.tint.standard().plan.blocks if b.node == "erase"]
    assert erase and all(b.kind == "attention" and not b.softmax and b.mask == ("tokens", "tokens", True)
                         and len(b.heads) == 1 and b.heads[0].q == b.heads[0].k == (None, positions)
                         and b.heads[0].v[0] == "negate" for b in erase)
    real = standard_plan._erase_head
    monkeypatch.setattr(standard_plan, "_erase_head",
                        lambda coords, pos: standard_plan.Head(*(lambda h: (h.q, h.k, (None, h.v[1]), h.o))(real(coords, pos))))
    logits_error, prefix_error, _ = _view_against_fast(compiled, model)
    assert max(logits_error, prefix_error) > 1e-3
