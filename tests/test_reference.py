"""The oracle against plain autograd / torch.optim, and its approximations against their limits."""

from __future__ import annotations

import copy

import pytest
import torch

from ir.passes.select_train import kinds_of
from ir.rules import loss_weights
from tintc.oracle import metrics
from tintc.oracle.fidelity import fidelity_rows
from tintc.oracle.reference import (
    EXACT,
    FiniteDifferenceActivation,
    FiniteDifferenceLayerNorm,
    TrainSettings,
    approx_gd,
    exact_gd,
    stop_gradient_attention,
    summed_loss,
    with_approximations,
)
from tests.helpers import params_of, rel_err, traced_tiny

# every kind of GPT-2 and OPT (the gated-MLP kinds belong to the LLaMA family)
ALL_KINDS = ("attn_q", "attn_k", "attn_v", "attn_o", "mlp_in", "mlp_out", "norm_gain", "norm_bias")


def test_loss_weights_mark_pairs_inside_the_train_segment():
    train = torch.tensor([[1, 1, 1, 0, 0]], dtype=torch.bool)
    assert loss_weights(train).tolist() == [[True, True, False, False, False]]
    labels = torch.tensor([[0, 0, 1, 0, 1]], dtype=torch.bool)
    assert loss_weights(train, labels).tolist() == [[False, True, False, False, False]]


@pytest.mark.parametrize("family,kinds,layers", [("gpt2", ALL_KINDS, (1,)), ("opt", None, None)])
def test_exact_gd_equals_torch_optim_sgd(family, kinds, layers):
    model, graph, ids, train, _ = traced_tiny(family)
    settings = TrainSettings(lr=0.05, steps=2, layers=layers, **({"kinds": kinds} if kinds else {}))
    result = exact_gd(model, graph, ids, train, settings)
    assert len(result.trained) > 0
    before = params_of(model)
    for b in range(ids.shape[0]):  # each sequence trains its own copy of the model
        sgd_model = copy.deepcopy(model)
        named = dict(sgd_model.named_parameters())
        # With these kinds every trained tensor is trained whole, so plain SGD on them is the oracle.
        optimiser = torch.optim.SGD([named[n] for n in result.trained], lr=0.05)
        for _ in range(2):
            optimiser.zero_grad()
            summed_loss(sgd_model(ids[b : b + 1]).logits, ids[b : b + 1], loss_weights(train[b : b + 1])).backward()
            optimiser.step()
        for name in result.trained:
            assert rel_err(result.params[name][b] - before[name], named[name].detach() - before[name]) < 1e-12
        with torch.no_grad():
            assert (result.logits[b : b + 1] - sgd_model(ids[b : b + 1]).logits).abs().max() < 1e-12
    untouched = set(before) - set(result.trained)
    assert all(torch.equal(result.params[n], before[n].expand_as(result.params[n])) for n in untouched)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
@pytest.mark.parametrize("layers,steps,loss", [(None, 1, "context"), ((1,), 2, "context"), (None, 2, "label_only")])
def test_approximate_gd_with_exact_rules_equals_exact_gd(family, layers, steps, loss):
    model, graph, ids, train, labels = traced_tiny(family)
    settings = TrainSettings(lr=0.05, steps=steps, layers=layers, kinds=ALL_KINDS, loss=loss, approximations=EXACT)
    exact = exact_gd(model, graph, ids, train, settings, labels)
    approx = approx_gd(graph, params_of(model), ids, train, settings, labels)
    assert (exact.logits - exact.logits_before).abs().max() > 1e-3  # training moved the logits
    assert (approx.logits - exact.logits).abs().max() < 1e-10
    for name in exact.trained:
        assert (approx.params[name] - exact.params[name]).abs().max() < 1e-12


def test_top_layer_training_leaves_lower_layers_alone():
    model, graph, ids, train, _ = traced_tiny("opt")
    result = exact_gd(model, graph, ids, train, TrainSettings(lr=0.05, layers=(1,), kinds=ALL_KINDS))
    assert result.trained and all(".layers.1." in n for n in result.trained)


def test_gpt2_value_only_training_updates_only_the_value_slice_of_c_attn():
    model, graph, ids, train, _ = traced_tiny("gpt2")
    result = exact_gd(model, graph, ids, train, TrainSettings(lr=0.05, kinds=("attn_v",)))
    name = "transformer.h.0.attn.c_attn.weight"  # [in, q|k|v]
    update = result.params[name] - params_of(model)[name]  # [B, in, 3·in]
    d = update.shape[-2]
    assert update[..., : 2 * d].abs().max() == 0
    assert update[..., 2 * d :].abs().max() > 0


def _approx_error(family, scale, **rule):
    model, graph, ids, train, _ = traced_tiny(family)
    kinds = tuple(kinds_of(graph))  # every kind this family has
    settings = with_approximations(TrainSettings(lr=0.05, kinds=kinds, approximations=EXACT), scale=scale, **rule)
    exact = exact_gd(model, graph, ids, train, settings)
    approx = approx_gd(graph, params_of(model), ids, train, settings)
    return metrics.logit_change_errors(approx, exact, metrics.eval_mask(train))["delta_rel_err"]


@pytest.mark.parametrize("family,rule", [("gpt2", {"layer_norm": "finite_difference"}),
                                          ("gpt2", {"activation": "finite_difference"}),
                                          ("opt", {"layer_norm": "finite_difference"}),
                                          ("llama", {"layer_norm": "finite_difference"}),  # RMSNorm
                                          ("llama", {"activation": "finite_difference"})])  # the gate's SiLU
def test_finite_difference_error_falls_linearly_in_one_over_n(family, rule):
    errors = [_approx_error(family, n, **rule) for n in (1e2, 1e3, 1e4)]
    assert errors[0] > 1e-6  # the approximation is visible at N=100
    for coarse, fine in zip(errors, errors[1:]):
        assert 7 < coarse / fine < 13  # first order: 10x larger N, 10x smaller error


def test_stop_gradient_freezes_query_and_key():
    model, graph, ids, train, _ = traced_tiny("gpt2")
    settings = TrainSettings(lr=0.05, kinds=ALL_KINDS, approximations=with_approximations(
        TrainSettings(approximations=EXACT), attention="stop_gradient").approximations)
    result = approx_gd(graph, params_of(model), ids, train, settings)
    name = "transformer.h.1.attn.c_attn.weight"
    update = result.params[name] - params_of(model)[name]  # [B, in, 3·in]
    d = update.shape[-2]
    assert update[..., : 2 * d].abs().max() == 0  # W_Q and W_K get no gradient
    assert update[..., 2 * d :].abs().max() > 0
    exact = exact_gd(model, graph, ids, train, settings)
    assert (exact.params[name] - params_of(model)[name])[..., : 2 * d].abs().max() > 0


def test_finite_difference_layer_norm_matches_autograd_in_the_limit():
    gen = torch.Generator().manual_seed(0)
    x, dy = torch.randn(2, 5, 8, generator=gen, dtype=torch.float64), torch.randn(2, 5, 8, generator=gen, dtype=torch.float64)
    gain, bias = torch.randn(8, generator=gen, dtype=torch.float64), torch.randn(8, generator=gen, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, gain, bias)]
    torch.nn.functional.layer_norm(leaves[0], (8,), leaves[1], leaves[2], 1e-5).backward(dy)
    approx = [t.clone().requires_grad_() for t in (x, gain, bias)]
    FiniteDifferenceLayerNorm.apply(*approx, 1e-5, 1e6).backward(dy)
    assert rel_err(approx[0].grad, leaves[0].grad) < 1e-5
    assert torch.allclose(approx[1].grad, leaves[1].grad, rtol=1e-12, atol=1e-12)  # gain/bias grads are exact
    assert torch.allclose(approx[2].grad, leaves[2].grad, rtol=1e-12, atol=1e-12)


def test_finite_difference_activation_matches_autograd_in_the_limit():
    gen = torch.Generator().manual_seed(0)
    x, dy = torch.randn(50, generator=gen, dtype=torch.float64), torch.randn(50, generator=gen, dtype=torch.float64)
    for fn, torch_fn in (("gelu", torch.nn.functional.gelu), ("relu", torch.nn.functional.relu)):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch_fn(a).backward(dy)
        FiniteDifferenceActivation.apply(b, fn, 1e7).backward(dy)
        assert (a.grad - b.grad).abs().max() < 1e-6


def test_stop_gradient_attention_gives_value_gradient_only():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = stop_gradient_attention(q, k, v, 0.5, causal=True)
    scores = (q @ k.transpose(-1, -2) * 0.5).masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), float("-inf"))
    expected = scores.softmax(-1) @ v
    assert torch.allclose(out, expected, atol=1e-14)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    assert dq is None and dk is None
    assert torch.allclose(dv, scores.softmax(-1).transpose(-1, -2) @ torch.ones_like(out), atol=1e-14)


def test_fidelity_rows_report_zero_error_only_for_the_exact_mode():
    model, graph, ids, train, labels = traced_tiny("gpt2")
    rows = fidelity_rows(model, graph, ids, train, TrainSettings(lr=0.05), labels)
    by_name = {r.name.split(" (")[0]: r for r in rows}
    assert by_name["ĝ all exact"].errors["delta_rel_err"] < 1e-9
    assert by_name["ĝ configured"].errors["delta_rel_err"] > 1e-6
    assert by_name["exact GD"].test_ce != by_name["base θ_0"].test_ce


def test_exact_gd_can_skip_the_forward_with_theta_0():
    model, graph, ids, train, _ = traced_tiny("opt")
    settings = TrainSettings(lr=0.05)
    full, lean = exact_gd(model, graph, ids, train, settings), exact_gd(model, graph, ids, train, settings, before=False)
    assert lean.logits_before is None and torch.equal(lean.logits, full.logits)


@pytest.mark.parametrize("family,kinds,steps,rules", [
    ("gpt2", ("attn_v", "mlp_in"), 2, EXACT),  # exact attention: q and k have gradients that the mask drops
    ("llama", ("attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down"), 1, TrainSettings().approximations)])
def test_g_hat_in_place_equals_g_hat_and_overwrites_only_its_own_theta(family, kinds, steps, rules):
    """scripts/verify_at_scale.py's ĝ: each trained tensor steps as soon as its gradient is complete,
    over θ's own storage (GPT-2's value slice of c_attn through its mask), the same numbers bit for bit."""
    model, graph, ids, train, _ = traced_tiny(family)
    settings = TrainSettings(lr=0.05, steps=steps, kinds=kinds, approximations=rules)
    ids, train = ids[:1], train[:1]
    reference = approx_gd(graph, params_of(model), ids, train, settings)
    own = {n: p.clone() for n, p in params_of(model).items()}
    storage = {n: p.data_ptr() for n, p in own.items()}
    in_place = approx_gd(graph, own, ids, train, settings, in_place=True)
    assert in_place.trained == reference.trained and len(reference.trained) >= 3
    assert torch.equal(in_place.logits, reference.logits) and torch.equal(in_place.logits_before, reference.logits_before)
    for name in reference.params:
        assert torch.equal(in_place.params[name], reference.params[name])
        assert in_place.params[name].data_ptr() == storage[name]  # θ_N written over θ
        assert torch.equal(own[name], reference.params[name][0])
    with pytest.raises(ValueError, match="a batch of 2 sequences; allowed: 1"):
        approx_gd(graph, own, *traced_tiny(family)[2:4], settings, in_place=True)
