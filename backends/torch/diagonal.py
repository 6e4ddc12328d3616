"""Diagonal weights: a primitive's square projection that is zero off its diagonal is stored as
that diagonal (runtime.Diagonal) and applied as an elementwise product.

Most of a TinT's projections are identities, scalings (−η, 1/N) or masks of units: as dense
matrices they were most of the fast executor's arithmetic (an n-wide identity costs n
multiply-adds per number it passes on). The product gives the same numbers, since the matrix
product only adds exact zeros; the standard view and the dense counts see the same matrix.
"""

from __future__ import annotations

import torch
from torch import nn

from .runtime import WEIGHTS, Diagonal


def diagonalise(module: nn.Module) -> int:
    """Store every dense square projection of `module` that is zero off its diagonal as its
    diagonal, in place; return how many were."""
    changed = 0
    for attr in WEIGHTS[type(module)]:
        w = getattr(module, attr)
        if not isinstance(w, nn.Parameter) or w.dim() != 2 or w.shape[0] != w.shape[1]:
            continue
        diagonal = torch.diagonal(w.detach())
        if torch.equal(w.detach(), torch.diag(diagonal)):
            delattr(module, attr)  # a parameter's name takes a module only once it is free
            setattr(module, attr, Diagonal(diagonal))
            changed += 1
    return changed
