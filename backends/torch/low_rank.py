"""Low rank: store a primitive's projection as two factors where that is exact and smaller.

A projection W [out, in] of exact rank k <= r (singular values above float precision) is
replaced by factors [out, k] and [k, in] when those hold fewer numbers. Every other
projection stays dense, and the log says why, with the relative error that a rank-r
truncation would have made, so the trade is visible without being taken.
"""

from __future__ import annotations

import torch
from torch import nn

from .primitives import projections
from .projection import LowRank


def factorise(name: str, module: nn.Module, rank: int) -> list[dict]:
    """Factorise the projections of `module` in place; one log entry per projection."""
    log = []
    for attr, p in projections(module).items():
        if p is None or p.kind != "dense":
            continue
        w, (out, inp) = p.weight, p.shape
        u, s, vh = torch.linalg.svd(w.detach().double(), full_matrices=False)
        k = int((s > s.max() * max(out, inp) * torch.finfo(torch.float64).eps).sum()) if s.numel() else 0
        entry = {"layer": name, "weight": attr, "shape": [out, inp], "rank": k, "factorised": False}
        if k <= rank and k * (out + inp) < p.count():
            left, right = (u[:, :k] * s[:k]).to(w.dtype), vh[:k].to(w.dtype)
            delattr(module, attr)  # a parameter's name takes a module only once it is free
            setattr(module, attr, LowRank(left, right))
            entry["factorised"] = True
        else:
            tail = s[rank:]
            entry["truncation_error"] = float(tail.norm() / s.norm()) if s.norm() > 0 else 0.0
        log.append(entry)
    return log
