"""Structured weights: a primitive's projection that is a diagonal matrix, or a selection with
one nonzero per row, is stored as such (projection.Diagonal, projection.Selection) and applied as an
elementwise product, or a gather and a product.

Most of a TinT's projections are identities, scalings (−η, 1/N), masks of units or signed
copies ([I; −I]): as dense matrices they were most of the fast executor's arithmetic (an n-wide
identity costs n multiply-adds per number it passes on). The cheaper forms give the same
numbers, since the matrix product only adds exact zeros; the standard view and the dense counts
see the same matrices.
"""

from __future__ import annotations

import torch
from torch import nn

from .primitives import projections
from .projection import Diagonal, Selection


def _structured(w: torch.Tensor) -> nn.Module | None:
    """The Diagonal or Selection that stands for `w` exactly, or None."""
    if w.shape[0] == w.shape[1] and torch.equal(w, torch.diag(torch.diagonal(w))):
        diagonal = torch.diagonal(w)
        return Diagonal(diagonal, identity=bool((diagonal == 1).all()))
    if bool(((w != 0).sum(1) == 1).all()):
        index = (w != 0).to(torch.int8).argmax(1)
        return Selection(index, w.gather(1, index[:, None])[:, 0], w.shape[1])
    return None


def compact(module: nn.Module) -> int:
    """Store every dense projection of `module` that is diagonal, or a selection, in that form,
    in place; return how many were."""
    changed = 0
    for attr, w in projections(module).items():
        if w is None or w.kind != "dense" or w.weight.dim() != 2:
            continue
        structured = _structured(w.weight.detach())
        if structured is not None:
            delattr(module, attr)  # a parameter's name takes a module only once it is free
            setattr(module, attr, structured)
            changed += 1
    return changed
