"""Memory budgets against a simulated step: resolving fractions, and saying why a budget cannot be met.

Note [What a budget limits]
A budget constrains the *peak* live bytes of the whole step as the compiled graphs hold them
(parameters, buffers, inputs, gradients, activations and temporaries), not only the saved set. Memory
the backend cannot see (optimizer states, other models) is not part of it. A fractional budget ``f``
allows ``f`` of the unoptimised plan's saved activation bytes on top of everything else at its peak.

Note [A fraction is a wish, bytes are a limit]
A budget in bytes that no plan meets raises :class:`MemoptInfeasibleBudget`, with what occupies the
lowest peak found: the user named a limit the device imposes, and a plan over it would fail later, out
of memory. A fraction asks for a trade-off, not a limit: where a step peaks in its backward among
gradients and temporaries (a small graph, a graph split off by a graph break), ``f`` of the saved bytes
can be unreachable even at 0.5. Such a step gets the lowest peak the search found, and one warning per
graph with both numbers and what occupies that peak (schedule.json records it); it is never overrun in
silence. The fraction 0 asks for that lowest peak outright, and does not warn. PyTorch's
``activation_memory_budget`` is a fraction too, of the activation bytes its knapsack may keep, and never
fails: it reaches what its cut can.
"""

from __future__ import annotations

import warnings

from memopt.config import MemoryBudget
from memopt.errors import MemoptInfeasibleBudget
from memopt.schedule.simulate import CATEGORIES, MemoryTimeline
from memopt.units import format_bytes


def budget_bytes(budget: MemoryBudget, unoptimised: MemoryTimeline, held_outside: int = 0) -> int:
    """The peak limit in bytes that ``budget`` means for this graph; a byte budget less what the step's
    other graphs hold while it runs (``held_outside``, Note [A byte budget is the step's]
    below)."""
    if budget.nbytes is not None:
        return budget.nbytes - held_outside
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


def unreached(limit: int, budget: MemoryBudget, lowest: MemoryTimeline, tried: str) -> str | None:
    """What the warning says when ``budget`` is a fraction whose ``limit`` the lowest plan misses; nothing
    for the fraction 0, which asks for the lowest peak."""
    if budget.nbytes is not None or lowest.peak_bytes <= limit or budget.fraction == 0.0:
        return None
    return (f"memopt: memory budget {budget} means a peak of {format_bytes(limit)} here, which no plan "
            f"reaches: planning the lowest peak found, {format_bytes(lowest.peak_bytes)} ({tried}), "
            f"{describe_peak(lowest)}")


def check_budget(limit: int, budget: MemoryBudget, lowest: MemoryTimeline, tried: str,
                 offload_allowed: bool = True, compress_allowed: bool = True) -> None:
    """When even the lowest plan found exceeds ``limit`` bytes: for a byte budget, raise
    :class:`MemoptInfeasibleBudget`; for a fraction, warn (Note [A fraction is a wish, bytes are a
    limit])."""
    if lowest.peak_bytes <= limit:
        return
    if budget.nbytes is None:
        message = unreached(limit, budget, lowest, tried)
        if message is not None:
            warnings.warn(message, UserWarning, stacklevel=3)
        return
    fixes = "raise the budget, " + ("" if offload_allowed else "allow offload (options offload='auto'), ") \
        + ("" if compress_allowed else "allow lossy compression of saved activations (options "
           "compress_activations='int8' or 'fp8'), ") \
        + "lower the batch size or sequence length, or train fewer weights (adapters)"
    raise MemoptInfeasibleBudget(
        f"memory budget {format_bytes(limit)} ({budget}) cannot be met: the smallest peak memopt "
        f"can reach is {format_bytes(lowest.peak_bytes)} ({tried}), {describe_peak(lowest)}. "
        f"To fit: {fixes}.",
        min_peak_bytes=lowest.peak_bytes, breakdown=lowest.breakdown)


class StepLedger:
    """What each of a step's graphs (one per Dynamo frame) holds while the others run.

    Note [A byte budget is the step's]
    Dynamo may split a step into several graphs (graph breaks), each compiled on its own. A fraction is
    applied to each graph's own saved activations, so the step's saved activations shrink by the same
    fraction. A byte budget limits the step's peak: each graph is planned under the budget less what
    the step's other graphs, as far as this backend has compiled them, hold while it runs: their
    parameters and the activations they save (a parameter two graphs read counts in each: a graph names
    its parameters from its own frame's module, so two graphs' names cannot be matched). Graphs are
    compiled in the order the first step reaches them, so the ones before a graph are all counted; a
    graph's plan counts the later ones it has seen (after a recompile) too, which errs on the safe side.
    It is not exact, and memopt says so when it first shares a budget: the gradients of later graphs,
    alive during a graph's backward, are not seen by its plan, and a graph Dynamo compiles once for a
    layer's frame and runs for every layer is counted once.
    A backend object keeps one ledger; ``backend="memopt"``, which makes a backend per graph, shares one
    per options object, that is per torch.compile call (memopt/compiler/backend.py).
    """

    def __init__(self) -> None:
        self.frames: dict[str, int] = {}
        self.warned = False

    def warn_once(self, frame: str) -> None:
        if self.warned or not set(self.frames) - {frame}:
            return
        self.warned = True
        warnings.warn(
            "memopt: Dynamo split the step into several graphs (graph breaks); a byte budget is shared among "
            "them as each is compiled: each graph is planned under the budget less what the graphs compiled "
            "before it hold, counted once per graph, though a graph Dynamo reuses for every layer runs once "
            "per layer. For an exact byte budget remove the breaks (torch.compile(..., fullgraph=True) names "
            "them), or give a fraction, which each graph meets on its own", UserWarning, stacklevel=3)

    def held_outside(self, frame: str) -> int:
        return sum(held for key, held in self.frames.items() if key != frame)

    def record(self, frame: str, held_bytes: int) -> None:
        """``frame``'s graph holds ``held_bytes`` (its parameters and saved activations) while others run."""
        self.frames[frame] = held_bytes
