"""How far one dynamic-evaluation run is from another (DESIGN §1: errors reported as measured).

The evaluated positions are those whose next token lies in the test segment: the
positions whose predictions training is meant to improve.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def eval_mask(train_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: position t is evaluated when token t+1 exists and is not a train token."""
    m = torch.zeros_like(train_mask, dtype=torch.bool)
    m[:, :-1] = ~train_mask.bool()[:, 1:]
    return m


def test_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Mean next-token cross-entropy over evaluated positions, and its perplexity."""
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2).double(), input_ids[:, 1:], reduction="none")
    mean = ce[mask[:, :-1]].mean().item()
    return mean, math.exp(mean)


def logit_change_errors(run, ref, mask: torch.Tensor) -> dict[str, float]:
    """Compare two GDResults that start from the same θ: Δ = logits_after − logits_before."""
    da = (run.logits - run.logits_before)[mask].double()
    db = (ref.logits - ref.logits_before)[mask].double()
    ref_norm = db.norm().item()
    return {
        "delta_rel_err": (da - db).norm().item() / ref_norm if ref_norm > 0 else float("nan"),
        "delta_cosine": F.cosine_similarity(da.flatten(), db.flatten(), dim=0).item() if ref_norm > 0 else float("nan"),
        "logits_max_abs": (run.logits[mask] - ref.logits[mask]).abs().max().item(),
    }


def update_errors(run, ref, before: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per trained tensor: ‖Δθ_run − Δθ_ref‖ / ‖Δθ_ref‖ over all sequences (params [B, *shape])."""
    errors = {}
    for name in ref.trained:
        ua = (run.params[name] - before[name]).double()
        ub = (ref.params[name] - before[name]).double()
        errors[name] = (ua - ub).norm().item() / ub.norm().item() if ub.norm() > 0 else float("nan")
    return errors
