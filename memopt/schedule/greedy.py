"""Greedy scheduling (recompute or offload) under a peak-memory budget, verified by exact simulation.

The partition-verified greedy: on small graphs, the last resort of :func:`memopt.schedule.search.search_plan`
when no plan of the CP-SAT model verifies (the model's own warm start is a greedy over the model, in
:mod:`memopt.schedule.cpsat`). Cheapest seconds per byte first, in batches sized to the remaining excess, each batch realised through the
partitioner's tags and measured with the simulator (Note [Plans are realised through the partitioner's
tags] in :mod:`memopt.schedule.problem`). When the budget is met, recomputations that turn out not to be
needed are dropped again, most expensive first.

The schedule room stays pure: partitioning and simulating a plan is the caller's ``evaluate``.
"""

from __future__ import annotations

from collections.abc import Callable

from memopt.schedule.problem import NOTHING, Candidate, Evaluation, Plan, ScheduleResult


def schedule_greedy(evaluate: Callable[[Plan], Evaluation], budget_bytes: int, *,
                       max_evaluations: int = 60, max_prune_tries: int = 8,
                       progress: Callable[[str], None] = lambda message: None) -> ScheduleResult:
    """Choose values to recompute or offload until the simulated peak is within ``budget_bytes``."""
    count = 0
    known: dict[str, Candidate] = {}     # every candidate any partition offered, by name

    def run(plan: Plan) -> Evaluation:
        nonlocal count
        count += 1
        evaluation = evaluate(plan)
        for candidate in evaluation.candidates:
            known.setdefault(candidate.name, candidate)
        return evaluation

    baseline = run(NOTHING)
    if baseline.peak_bytes <= budget_bytes:
        return ScheduleResult(baseline, baseline, baseline, budget_bytes, True, count)
    lowest = baseline
    # Two ways to size the batches: to the bytes still over budget (few recomputations, when that
    # works), then by halves of what is left (finds lower peaks when the first gets stuck).
    for size_to_excess in (True, False):
        found, best = _grow(baseline, budget_bytes, run, size_to_excess, max_evaluations,
                            lambda: count, progress)
        if best.peak_bytes < lowest.peak_bytes:
            lowest = best
        if found is not None:
            pruned = _prune(found, budget_bytes, run, known, min(max_prune_tries, max_evaluations - count))
            return ScheduleResult(pruned, baseline, lowest, budget_bytes, True, count)
    return ScheduleResult(lowest, baseline, lowest, budget_bytes, False, count)


def _grow(start: Evaluation, budget_bytes: int, run: Callable[[Plan], Evaluation],
          size_to_excess: bool, max_evaluations: int, evaluations: Callable[[], int],
          progress: Callable[[str], None]) -> tuple[Evaluation | None, Evaluation]:
    """Grow a recompute plan from ``start``; returns (a plan within budget or None, the lowest plan).

    Note [Growing a recompute plan]: recomputing everything at once rarely helps (a chain recomputed
    from the graph's inputs is live all at once at the start of the backward), so the plan grows in
    batches, cheapest seconds per byte first (at most half the choices at a time), and a batch is kept
    only when the simulated peak goes down. A batch that does not help is halved; a single value that
    does not help is left kept.
    """
    current = start
    rejected: set[str] = set()
    batch = 0
    while evaluations() < max_evaluations:
        done = current.recompute | current.offload
        options = sorted((c for c in current.candidates if c.choice() is not None
                          and c.name not in rejected and c.name not in done),
                         key=lambda c: (c.cost_per_byte, -c.nbytes, c.name))
        if not options:
            break
        if batch == 0:
            batch = len(options)
            if size_to_excess:
                excess, freed, batch = current.peak_bytes - budget_bytes, 0, 0
                for candidate in options:
                    batch += 1
                    freed += candidate.nbytes
                    if freed >= excess:
                        break
            batch = max(1, min(batch, len(options) // 2))
        take = options[:batch]
        chosen = {c.name: c.choice() for c in take}
        trial = run(Plan(current.recompute | {n for n, o in chosen.items() if o and o[0] == "recompute"},
                         current.offload | {n for n, o in chosen.items() if o and o[0] == "offload"},
                         current.compress))
        better = trial.peak_bytes < current.peak_bytes
        progress(f"recompute {len(trial.recompute)}, offload {len(trial.offload)} values: peak {trial.peak_bytes} B "
                 f"({'kept' if better else 'rejected'}; budget {budget_bytes} B, {evaluations()} evaluations)")
        if better:
            current = trial
            if current.peak_bytes <= budget_bytes:
                return current, current
            batch = 0                    # size the next batch to what is left
        elif batch > 1:
            batch //= 2
        else:
            rejected.add(take[0].name)
    return None, current


def _prune(feasible: Evaluation, budget_bytes: int, run: Callable[[Plan], Evaluation],
           known: dict[str, Candidate], tries: int) -> Evaluation:
    """Drop recomputations and offloads the budget does not need, the most expensive first."""
    def cost(name: str) -> float:
        chosen = known[name].choice() if name in known else None
        return chosen[1] if chosen else 0.0

    best = feasible
    for name in sorted(feasible.recompute | feasible.offload, key=lambda n: (-cost(n), n))[:max(tries, 0)]:
        trial = run(Plan(best.recompute - {name}, best.offload - {name}, best.compress))
        if trial.peak_bytes <= budget_bytes and trial.added_time_s <= best.added_time_s:
            best = trial
    return best
