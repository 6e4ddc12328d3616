"""Structured weights: a primitive's projection that is a diagonal matrix, a grid of diagonal blocks,
or a selection with one nonzero per row, is stored as such (projection.Diagonal, DiagonalBlocks,
Selection) and applied as elementwise products (and sums), or a gather and a product.

Most of a TinT's projections are identities, scalings (−η, 1/N), masks of units, signed copies
([I; −I]) or sums and differences of fields ([I I], [I −I]): as dense matrices they were most of
the fast executor's arithmetic (an n-wide identity costs n multiply-adds per number it passes on).
The cheaper forms give the same numbers, since the matrix product only adds exact zeros; the
standard view and the dense counts see the same matrices.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .primitives import projections
from .projection import Diagonal, DiagonalBlocks, Selection


def _structured(w: torch.Tensor) -> nn.Module | None:
    """The Diagonal, DiagonalBlocks or Selection that stands for `w` exactly, or None."""
    if w.shape[0] == w.shape[1] and torch.equal(w, torch.diag(torch.diagonal(w))):
        diagonal = torch.diagonal(w)
        return Diagonal(diagonal, identity=bool((diagonal == 1).all()))
    blocks = _diagonal_blocks(w)
    if blocks is not None:
        return DiagonalBlocks(blocks)
    if bool(((w != 0).sum(1) == 1).all()):
        index = (w != 0).to(torch.int8).argmax(1)
        return Selection(index, w.gather(1, index[:, None])[:, 0], w.shape[1])
    return None


def _diagonal_blocks(w: torch.Tensor) -> torch.Tensor | None:
    """[p, m, n]: the diagonals of w's n × n blocks, for the widest n (at least 2, at most 8 blocks)
    at which every block is diagonal; None where there is none."""
    rows, cols = w.shape
    for n in sorted(_divisors(math.gcd(rows, cols)), reverse=True):
        p, m = rows // n, cols // n
        if n < 2 or p * m > 8:
            break
        blocks = w.reshape(p, n, m, n).transpose(1, 2)  # [p, m, n, n]
        diagonals = torch.diagonal(blocks, dim1=-2, dim2=-1)
        if torch.equal(blocks, torch.diag_embed(diagonals)):
            return diagonals.contiguous()
    return None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


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
