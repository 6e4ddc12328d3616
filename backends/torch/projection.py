"""A primitive's projection W [out, in], in one of five stored forms with one interface.

    dense      the matrix itself (a bare tensor on the primitive; `as_projection` wraps it in Dense)
    diagonal   a square W that is zero off its diagonal (identities, scalings, masks of units),
               stored as that diagonal and applied as an elementwise product
    diagonal blocks  n × n blocks that are all diagonal (sums, differences, signed copies of fields),
               stored as their diagonals and applied as products and sums of the input's parts
    selection  one nonzero per row, W[i, index[i]] = coef[i] (signed copies such as [I; −I]),
               stored as both and applied as a gather and a product
    factored   W = left @ right, two factors (tint.passes.low_rank)

Each form has `apply` (x @ Wᵀ), `apply_transposed` (x @ W), `dense()` (the matrix), `count()`
(the numbers it stores), `kind` and `literal()` (its constructor with empty tensors, for the
emitted package). The structured forms give the same numbers as the matrix product, which only
adds exact zeros. Callers never ask which form they hold: `as_projection(w)` is the one dispatch.

Carried inside the emitted package (backends/torch/emit.py), so it imports only torch.
"""

import torch
from torch import nn


def widened(t: torch.Tensor) -> bool:
    """Whether products of `t` run in float32: bfloat16 on a CPU. The product is then rounded once to
    bfloat16, as a bfloat16 matrix unit that accumulates in float32 computes it; torch's own CPU bfloat16
    kernels ran 6× (mm) to 45× (bmm) slower than float32 on a machine without bfloat16 units (measured here)."""
    return t.dtype == torch.bfloat16 and t.device.type == "cpu"


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (widened: see `widened`)."""
    if widened(a):
        return (a.float() @ b.float()).to(a.dtype)
    return a @ b


def stored_parameter(t: torch.Tensor) -> nn.Parameter:
    """Every stored weight is its own tensor (constructions often reuse one identity matrix)."""
    return nn.Parameter(t.detach().clone(), requires_grad=False)


class Dense:
    """The matrix itself. Not a module: the primitive stores the bare parameter (its state-dict name
    is the primitive's attribute), and this view of it is made where it is applied."""

    kind = "dense"

    def __init__(self, weight: torch.Tensor):
        self.weight = weight  # [out, in]

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def apply(self, x):
        return matmul(x, self.weight.T)

    def apply_transposed(self, x):
        return matmul(x, self.weight)

    def dense(self) -> torch.Tensor:
        return self.weight

    def count(self) -> int:
        return self.weight.numel()

    def literal(self) -> str:
        return f"torch.empty{tuple(self.weight.shape)}"


class Diagonal(nn.Module):
    """A square projection stored as its diagonal. An identity (`identity`, fixed at construction like
    every TinT weight) is not applied at all."""

    kind = "diagonal"

    def __init__(self, diagonal: torch.Tensor, identity: bool = False):
        super().__init__()
        self.diagonal, self.identity = stored_parameter(diagonal), identity  # [n]

    @property
    def shape(self) -> torch.Size:  # the matrix's
        return torch.Size((len(self.diagonal), len(self.diagonal)))

    def apply(self, x):
        return x if self.identity else x * self.diagonal

    def apply_transposed(self, x):
        return self.apply(x)

    def dense(self) -> torch.Tensor:
        return torch.diag(self.diagonal)

    def count(self) -> int:
        return self.diagonal.numel()

    def literal(self) -> str:
        return f"Diagonal(torch.empty{tuple(self.diagonal.shape)}, identity={self.identity})"

    def extra_repr(self) -> str:
        return f"identity={self.identity}"


class Selection(nn.Module):
    """W[i, index[i]] = coef[i], every other entry 0; W is [n, columns]."""

    kind = "selection"

    def __init__(self, index: torch.Tensor, coef: torch.Tensor, columns: int):
        super().__init__()
        self.register_buffer("index", index.detach().to(torch.long).clone())  # [n]
        self.coef, self.columns = stored_parameter(coef), columns  # [n]

    @property
    def shape(self) -> torch.Size:  # the matrix's
        return torch.Size((len(self.coef), self.columns))

    def apply(self, x):
        return x[..., self.index] * self.coef

    def apply_transposed(self, x):
        return matmul(x, self.dense())

    def dense(self) -> torch.Tensor:
        w = torch.zeros(len(self.coef), self.columns, dtype=self.coef.dtype, device=self.coef.device)
        return w.scatter(1, self.index[:, None], self.coef[:, None])

    def count(self) -> int:
        return self.index.numel() + self.coef.numel()

    def literal(self) -> str:
        n = len(self.coef)
        return f"Selection(torch.empty({n}, dtype=torch.long), torch.empty({n}), {self.columns})"


class DiagonalBlocks(nn.Module):
    """W [p·n, m·n] whose n × n blocks are all diagonal (sums and differences of fields [I I], [I −I],
    signed copies [I; −I], a point and its finite-difference neighbours [I εI; I −εI]): stored as the
    blocks' diagonals [p, m, n] and applied as elementwise products and sums of the input's m parts,
    skipping the zero blocks and the products with ±1."""

    kind = "diagonal blocks"

    def __init__(self, diagonals: torch.Tensor, terms: tuple | None = None):
        super().__init__()
        self.diagonals = stored_parameter(diagonals)  # [p, m, n]
        self.terms = _block_terms(diagonals) if terms is None else terms  # ((i, k, "+" | "-" | "*"), …)

    @property
    def shape(self) -> torch.Size:  # the matrix's
        p, m, n = self.diagonals.shape
        return torch.Size((p * n, m * n))

    def apply(self, x):
        p, m, n = self.diagonals.shape
        parts = x.unflatten(-1, (m, n))
        rows = [None] * p
        for i, k, how in self.terms:  # in column order, as the matrix product adds them
            part = parts[..., k, :]
            if rows[i] is None:
                rows[i] = part if how == "+" else part * self.diagonals[i, k]
            elif how == "*":  # one rounding, as a fused multiply-add (a point's finite-difference neighbours)
                rows[i] = torch.addcmul(rows[i], part, self.diagonals[i, k])
            else:
                rows[i] = rows[i] + part if how == "+" else rows[i] - part
        rows = [x.new_zeros(*x.shape[:-1], n) if r is None else r for r in rows]
        if p > 1:
            return torch.cat(rows, -1)
        return rows[0].clone() if rows[0]._base is not None else rows[0]  # a lone + block: not a view of x

    def apply_transposed(self, x):
        return matmul(x, self.dense())

    def dense(self) -> torch.Tensor:
        p, m, n = self.diagonals.shape
        return torch.diag_embed(self.diagonals).transpose(1, 2).reshape(p * n, m * n)

    def count(self) -> int:
        return self.diagonals.numel()

    def literal(self) -> str:
        return f"DiagonalBlocks(torch.empty{tuple(self.diagonals.shape)}, {self.terms!r})"

    def extra_repr(self) -> str:
        return f"terms={self.terms}"


def _block_terms(diagonals: torch.Tensor) -> tuple:
    """The nonzero blocks (i, k) of [p, m, n] diagonals, each marked "+" (all 1), "-" (all −1) or "*"."""
    terms = []
    for i in range(diagonals.shape[0]):
        for k in range(diagonals.shape[1]):
            d = diagonals[i, k]
            if bool((d != 0).any()):
                terms.append((i, k, "+" if bool((d == 1).all()) else "-" if bool((d == -1).all()) else "*"))
    return tuple(terms)


class LowRank(nn.Module):
    """W = left @ right (tint.passes.low_rank)."""

    kind = "factored"

    def __init__(self, left: torch.Tensor, right: torch.Tensor):
        super().__init__()
        self.left, self.right = stored_parameter(left), stored_parameter(right)  # [out, r], [r, in]

    @property
    def shape(self) -> torch.Size:  # the matrix's
        return torch.Size((self.left.shape[0], self.right.shape[1]))

    def apply(self, x):
        return matmul(matmul(x, self.right.T), self.left.T)

    def apply_transposed(self, x):
        return matmul(matmul(x, self.left), self.right)

    def dense(self) -> torch.Tensor:
        return self.left @ self.right

    def count(self) -> int:
        return self.left.numel() + self.right.numel()

    def literal(self) -> str:
        return f"LowRank(torch.empty{tuple(self.left.shape)}, torch.empty{tuple(self.right.shape)})"


STRUCTURED = (Diagonal, DiagonalBlocks, Selection, LowRank)  # the forms stored as modules of their own


def as_projection(w):
    """The projection a primitive holds: a structured form as it is, a bare matrix as Dense."""
    return w if isinstance(w, STRUCTURED) else Dense(w)


def stored(w):
    """What a primitive stores for a projection given as a matrix, a structured form, or None."""
    return w if w is None or isinstance(w, STRUCTURED) else stored_parameter(w)
