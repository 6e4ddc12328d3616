"""The size of the standard view's plan, estimated from the primitives' shapes before it is built.

The plan (standard.plan, used by the dense counts and by standard()) holds every primitive's
projection as the dense matrix it stands for, once per primitive. Its size is known from the
primitives alone; past a budget (default: half the machine's memory) the caller is refused with
both numbers before anything is allocated. standard() then checks the view's own, far larger
size (checks.within_view_budget) between the plan and the dense blocks.
"""

from __future__ import annotations

from ir.errors import BackendError

from .checks import VIEW_BUDGET_FRACTION, memory_bytes
from .primitives import projections


def plan_bytes(layers) -> int:
    """Bytes of the plan's dense matrices: each primitive's projections once, in their dtype."""
    total = 0
    for layer in layers.values():
        size = next((t.element_size() for t in layer.parameters()), 0)
        total += size * sum(p.shape[0] * p.shape[1] for p in projections(layer).values() if p is not None)
    return total


def check_plan_budget(layers, budget: int | None = None) -> None:
    """A BackendError naming both sizes when the plan would not fit in the budget."""
    if budget is None:
        memory = memory_bytes()
        budget = None if memory is None else int(memory * VIEW_BUDGET_FRACTION)
    size = plan_bytes(layers)
    if budget is not None and size > budget:
        raise BackendError(f"dense counts: the standard view's plan would hold {size / 2**30:.1f} GiB of dense "
                          f"projections; allowed: at most the budget of {budget / 2**30:.1f} GiB (half this "
                          "machine's memory)")
