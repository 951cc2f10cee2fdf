"""From a budget to a verified plan: the CP-SAT model, its greedy hint, and checks by exact simulation.

Pure like the rest of the schedule room: partitioning and simulating a plan is the caller's
``evaluate``. The order of work:

1. The linear model of the baseline plan (:mod:`memopt.schedule.model`) is solved with CP-SAT
   (:mod:`memopt.schedule.cpsat`), warm-started from its greedy solution.
2. The solver's plan and the greedy hint are each realised and simulated. The model does not see
   everything (the partitioner adjusting its cut around the tags, a recomputation's temporaries, reloads
   delayed on a busy copy stream); when the measured peak is over the budget, the model is solved again
   with its budget lowered by the overshoot, up to :data:`MAX_ROUNDS` times, and when no plan with
   offloads verifies, once more with recomputation alone.
3. When no plan so far meets the budget, on graphs small enough that a partition is cheap, the
   partition-verified greedy (:func:`memopt.schedule.greedy.schedule_greedy`) runs: it sees what the
   model misses.
4. The plan that meets the budget with the least predicted added time wins. When none does, CP-SAT
   looks for the lowest peak instead, and the lowest measured peak goes into the error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from memopt.schedule.cpsat import solve_schedule
from memopt.schedule.greedy import Evaluation, Plan, ScheduleResult, schedule_greedy
from memopt.schedule.model import COMPRESS, OFFLOAD, RECOMPUTE, Option, ScheduleProblem

MAX_ROUNDS = 3
# Graphs up to this many joint nodes also get the partition-verified greedy (a partition of a tiny
# Llama takes ~0.1 s on the 2-core CPU; of a 32-layer 7B joint graph, ~6 s).
PARTITION_GREEDY_MAX_NODES = 4000


def search_plan(evaluate: Callable[[Plan], Evaluation], problem: ScheduleProblem, baseline: Evaluation,
                budget_bytes: int, *, graph_nodes: int, time_limit_s: float,
                progress: Callable[[str], None] = lambda message: None) -> ScheduleResult:
    """The best verified plan for ``budget_bytes`` (see the module docstring)."""
    if baseline.peak_bytes <= budget_bytes:
        return ScheduleResult(baseline, baseline, baseline, budget_bytes, True, 1, method="baseline",
                              attempts=[_attempt("baseline", baseline, budget_bytes)])
    attempts: list[tuple[str, Evaluation]] = [("baseline", baseline)]
    evaluations = 1

    def verify(label: str, plan: dict[str, Option]) -> Evaluation:
        nonlocal evaluations
        evaluations += 1
        found = evaluate((problem.recompute_nodes(plan), problem.offloaded(plan), problem.compressed(plan)))
        attempts.append((label, found))
        progress(f"{label}: recompute {sum(1 for o in plan.values() if o.kind == RECOMPUTE)}, offload "
                 f"{sum(1 for o in plan.values() if o.kind == OFFLOAD)}, compress "
                 f"{sum(1 for o in plan.values() if o.kind == COMPRESS)} values -> simulated peak "
                 f"{found.peak_bytes} B ({'meets' if found.peak_bytes <= budget_bytes else 'over'} the "
                 f"budget {budget_bytes} B), added time {found.added_time_s:.6g} s")
        return found

    stats: dict[str, Any] | None = None

    def solve_and_verify(model: ScheduleProblem, name: str) -> None:
        nonlocal stats
        target = budget_bytes
        for round_ in range(MAX_ROUNDS):
            solved = solve_schedule(model, target, time_limit_s=time_limit_s, progress=progress)
            stats = stats or solved.stats.to_json()
            label = name if round_ == 0 else f"{name} (model budget lowered by {budget_bytes - target} B)"
            found = verify(label, solved.plan)
            if round_ == 0 and solved.hint != solved.plan:
                verify(f"{name}: {solved.stats.hint_source} hint", solved.hint)
            if found.peak_bytes <= budget_bytes or solved.stats.status not in ("OPTIMAL", "FEASIBLE"):
                break
            target -= found.peak_bytes - budget_bytes
            if target <= 0:
                break

    solve_and_verify(problem, "cp-sat")
    if not any(e.peak_bytes <= budget_bytes for _, e in attempts) and any(
            o.kind != RECOMPUTE for item in problem.items for o in item.options):
        # The model's offload windows are the least exact part of it (reload timing on a busy copy
        # stream): when no plan with offloads (or compression) verified, try recomputation alone.
        recompute_only = dataclasses.replace(problem, memo={}, items=[
            dataclasses.replace(item, options=tuple(o for o in item.options if o.kind == RECOMPUTE))
            for item in problem.items])
        solve_and_verify(recompute_only, "cp-sat, recompute only")
    if graph_nodes <= PARTITION_GREEDY_MAX_NODES and not any(
            e.peak_bytes <= budget_bytes for _, e in attempts):
        greedy = schedule_greedy(evaluate, budget_bytes, progress=progress)
        evaluations += greedy.evaluations
        attempts.append(("partition greedy", greedy.chosen))
        if greedy.lowest is not greedy.chosen:
            attempts.append(("partition greedy (lowest peak)", greedy.lowest))
    meets = [(label, e) for label, e in attempts if e.peak_bytes <= budget_bytes]
    if not meets:
        lowest = solve_schedule(problem, budget_bytes, time_limit_s=time_limit_s, minimise_peak=True,
                                progress=progress)
        verify("cp-sat lowest peak", lowest.plan)
    method, chosen = min(meets or attempts, key=lambda a: (a[1].added_time_s, a[1].peak_bytes) if meets
                         else (a[1].peak_bytes, a[1].added_time_s))
    lowest_peak = min((e for _, e in attempts), key=lambda e: e.peak_bytes)
    return ScheduleResult(chosen, baseline, lowest_peak, budget_bytes, bool(meets), evaluations,
                          method=method, attempts=[_attempt(label, e, budget_bytes) for label, e in attempts],
                          solver=stats)


def _attempt(label: str, found: Evaluation, budget_bytes: int) -> dict[str, Any]:
    return {"method": label, "peak_bytes": found.peak_bytes, "meets_budget": found.peak_bytes <= budget_bytes,
            "added_time_s": float(f"{found.added_time_s:.6g}"), "recompute": len(found.recompute),
            "offload": len(found.offload), "compress": len(found.compress)}
