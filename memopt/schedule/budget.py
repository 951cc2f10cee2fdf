"""Memory budgets against a simulated step: resolving fractions, and saying why a budget cannot be met.

Note [What a budget limits]
A budget constrains the *peak* live bytes of the whole step as the compiled graphs hold them
(parameters, buffers, inputs, gradients, activations and temporaries), not only the saved set. Memory
the backend cannot see (optimizer states, other models) is not part of it. A fractional budget ``f``
allows ``f`` of the unoptimised plan's saved activation bytes on top of everything else at its peak. A
budget that no plan meets is reported as infeasible, with what occupies the lowest peak found, never
overrun in silence.
"""

from __future__ import annotations

from memopt.config import MemoryBudget
from memopt.errors import MemoptInfeasibleBudget
from memopt.schedule.simulate import CATEGORIES, MemoryTimeline
from memopt.units import format_bytes


def budget_bytes(budget: MemoryBudget, unoptimised: MemoryTimeline) -> int:
    """The peak limit in bytes that ``budget`` means for this step."""
    if budget.nbytes is not None:
        return budget.nbytes
    fraction = budget.fraction if budget.fraction is not None else 1.0
    released = (1.0 - fraction) * unoptimised.saved_activation_bytes
    return int(unoptimised.peak_bytes - released)


def describe_peak(timeline: MemoryTimeline) -> str:
    parts = [f"{name.replace('_', ' ')} {format_bytes(timeline.breakdown[name])}"
             for name in CATEGORIES if timeline.breakdown.get(name)]
    largest = ", ".join(f"{origin} ({category.replace('_', ' ')}, {format_bytes(size)})"
                        for origin, category, size in timeline.largest_at_peak[:3])
    return (f"at {timeline.peak_phase}:{timeline.peak_node}: " + ", ".join(parts)
            + (f"; largest tensors: {largest}" if largest else ""))


def check_budget(limit: int, budget: MemoryBudget, lowest: MemoryTimeline, tried: str,
                 offload_allowed: bool = True, compress_allowed: bool = True) -> None:
    """Raise :class:`MemoptInfeasibleBudget` when even the lowest plan found exceeds ``limit`` bytes."""
    if lowest.peak_bytes > limit:
        fixes = "raise the budget, " + ("" if offload_allowed else "allow offload (options offload='auto'), ") \
            + ("" if compress_allowed else "allow lossy compression of saved activations (options "
               "compress_activations='int8' or 'fp8'), ") \
            + "lower the batch size or sequence length, or train fewer weights (adapters)"
        raise MemoptInfeasibleBudget(
            f"memory budget {format_bytes(limit)} ({budget}) cannot be met: the smallest peak memopt "
            f"can reach is {format_bytes(lowest.peak_bytes)} ({tried}), {describe_peak(lowest)}. "
            f"To fit: {fixes}.",
            min_peak_bytes=lowest.peak_bytes, breakdown=lowest.breakdown)
