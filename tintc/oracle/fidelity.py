"""The fidelity table: base vs exact GD vs each approximate backward rule, measured.

Every row is one dynamic-evaluation run on the same input; its errors are measured
against exact GD (the approximation error of DESIGN §1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.table import Table

from tintc.oracle import metrics
from tintc.oracle.reference import TrainSettings, approx_gd, exact_gd, with_approximations


@dataclass
class Row:
    name: str
    test_ce: float
    test_ppl: float
    errors: dict[str, float]  # logit-change errors vs exact GD; empty for the references
    worst_update: tuple[str, float] | None  # the trained tensor with the largest update error


def approximation_modes(settings: TrainSettings) -> list[tuple[str, TrainSettings]]:
    """The configured rules, each rule alone, and all exact (which must match exact GD)."""
    a = settings.approximations
    modes = [(f"ĝ configured (attention={a.attention}, layer_norm={a.layer_norm}, activation={a.activation})",
              settings)]
    exact = with_approximations(settings, **{k: "exact" for k in ("attention", "layer_norm", "activation")})
    modes.append(("ĝ attention stop_gradient only", with_approximations(exact, attention="stop_gradient")))
    modes.append((f"ĝ layer_norm finite_difference only (N={a.scale:g})",
                  with_approximations(exact, layer_norm="finite_difference")))
    modes.append((f"ĝ activation finite_difference only (N={a.scale:g})",
                  with_approximations(exact, activation="finite_difference")))
    modes.append(("ĝ all exact", exact))
    return modes


def fidelity_rows(model, graph, input_ids, train_mask, settings: TrainSettings, label_mask=None) -> list[Row]:
    params = {n: p.detach() for n, p in model.named_parameters()}
    evaluated = metrics.eval_mask(train_mask)
    exact = exact_gd(model, graph, input_ids, train_mask, settings, label_mask)
    rows = [
        Row("base θ_0 (no training)", *metrics.test_loss(exact.logits_before, input_ids, evaluated), {}, None),
        Row("exact GD (autograd, HF model)", *metrics.test_loss(exact.logits, input_ids, evaluated), {}, None),
    ]
    for name, mode in approximation_modes(settings):
        run = approx_gd(graph, params, input_ids, train_mask, mode, label_mask)
        updates = metrics.update_errors(run, exact, params)
        worst = max(updates.items(), key=lambda kv: kv[1]) if updates else None
        rows.append(Row(name, *metrics.test_loss(run.logits, input_ids, evaluated),
                        metrics.logit_change_errors(run, exact, evaluated), worst))
    return rows


def render(rows: list[Row], title: str) -> Table:
    table = Table(title=title)
    for col in ("run", "test CE", "test ppl", "‖Δ−Δexact‖/‖Δexact‖", "cos(Δ,Δexact)", "max|logits−exact|",
                "worst update rel err"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for r in rows:
        e = r.errors
        cells = [f"{e['delta_rel_err']:.3e}", f"{e['delta_cosine']:.6f}", f"{e['logits_max_abs']:.3e}"] if e else ["—"] * 3
        worst = f"{r.worst_update[1]:.3e} ({r.worst_update[0]})" if r.worst_update else "—"
        table.add_row(r.name, f"{r.test_ce:.5f}", f"{r.test_ppl:.3f}", *cells, worst)
    return table


def example_input(vocab: int, length: int, batch: int = 1, train_fraction: float = 0.5, label_every: int = 4,
                  seed: int = 0):
    """A seeded random input: ids [B, T], a train prefix, and a label on every k-th token."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, length), generator=gen)
    train_mask = torch.zeros(batch, length, dtype=torch.bool)
    train_mask[:, : int(length * train_fraction)] = True
    label_mask = torch.zeros(batch, length, dtype=torch.bool)
    label_mask[:, label_every - 1 :: label_every] = True
    return input_ids, train_mask, label_mask
