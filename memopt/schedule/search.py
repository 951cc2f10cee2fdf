"""From a budget to a verified plan: the CP-SAT model, its greedy hint, and checks by exact simulation.

Pure like the rest of the schedule room: partitioning and simulating a plan is the caller's
``evaluate``. The order of work:

1. The linear model of the baseline plan (:mod:`memopt.schedule.model`) is solved with CP-SAT
   (:mod:`memopt.schedule.cpsat`), warm-started from its greedy solution.
2. The solver's plan and the greedy hint are each realised and simulated. The model does not see
   everything (the partitioner adjusting its cut around the tags, a recomputation's temporaries, reloads
   delayed on a busy copy stream); when the measured peak is over the budget, the model is solved again
   with its budget lowered by the overshoot, or by what it missed of that plan's peak when that is
   more, up to :data:`MAX_ROUNDS` times, and when no plan with
   offloads verifies, once more with recomputation alone.
3. When no plan so far meets the budget, on graphs small enough that a partition is cheap, the
   partition-verified greedy (:func:`memopt.schedule.greedy.schedule_greedy`) runs: it sees what the
   model misses.
4. The plan that meets the budget with the least predicted added time wins. When none does, CP-SAT
   looks for the lowest peak instead, and the lowest measured peak goes into the error.

Note [Seeding from PyTorch's knapsack]
The linear model chooses among the values the baseline partition saves. torch's knapsack
(``activation_memory_budget``, a share of the saved bytes it may remove) can cut elsewhere: save a
matmul's output and recompute the pointwise chain after it, where the baseline saves that chain's
outputs. Neither view contains the other, and the knapsack's peak is not monotonic in its share. So when
the caller can realise plans on the knapsack's cut, its partitions at a few shares are verified as they
are: a grid of four on graphs a partition is cheap for, else the budget's own share and the one halfway
to 1 (only the former beyond :data:`KNAPSACK_PAIR_MAX_NODES`: a partition of a 128-layer graph takes
~25 s), and, while no knapsack cut meets the budget, a share or two below them
(:data:`KNAPSACK_STEPS_BELOW`). On the small graphs the cheapest cut over the budget also becomes a
second base, modelled and solved like the baseline (plans on it recompute the knapsack's ops plus their
own). That model is less exact than the baseline's (with the tags in place the knapsack chooses again
around them), so verification decides, and on large graphs, where one more solve and its verification
cost half a minute and the model erred most (a 128-layer Llama: predicted far below what verified; on a
48-layer GPT-2 XL at 0.5 its best plan on the 0.768 cut verified at 5.39 ms against the 0.487 cut's
5.04), it is not built. The cheapest verified plan of all wins: never worse than PyTorch's own answer at
the shares tried, better where the model finds a way. The knapsack is an optional attempt: if torch's
partitioner refuses a cut (with memopt's tags on it, it can), the search reports it and goes on with the
plans it has.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from memopt.schedule.cpsat import solve_schedule
from memopt.schedule.greedy import schedule_greedy
from memopt.schedule.model import COMPRESS, OFFLOAD, RECOMPUTE, Choices, ScheduleProblem
from memopt.schedule.problem import NOTHING, Evaluate, Evaluation, ScheduleResult

MAX_ROUNDS = 3
# Graphs up to this many joint nodes also get the partition-verified greedy (a partition of a tiny
# Llama takes ~0.1 s on the 2-core CPU; of a 32-layer 7B joint graph, ~6 s).
PARTITION_GREEDY_MAX_NODES = 4000
# torch's knapsack shares tried (Note [Seeding from PyTorch's knapsack]): a grid on graphs a partition
# is cheap for, else the two around the budget's own share.
KNAPSACK_GRID = (0.9, 0.75, 0.5, 0.25)
# Larger graphs try two shares up to this many joint nodes (a 7B Llama's 7.4k: ~4 s a partition), one above.
KNAPSACK_PAIR_MAX_NODES = 12000
# On those larger graphs, shares this far below the lowest one tried, while no knapsack cut meets the budget.
KNAPSACK_STEPS_BELOW = (0.05, 0.1)


def search_plan(evaluate: Evaluate, build: Callable[[Evaluation], ScheduleProblem],
                baseline: Evaluation, budget_bytes: int, *, graph_nodes: int, time_limit_s: float,
                progress: Callable[[str], None] = lambda message: None, knapsack: bool = False) -> ScheduleResult:
    """The best verified plan for ``budget_bytes`` (see the module docstring). ``build`` models a
    verified plan (:func:`memopt.schedule.model.build_problem`); with ``knapsack``, ``evaluate`` can
    realise plans on torch's knapsack cut too (Note [Seeding from PyTorch's knapsack])."""
    if baseline.peak_bytes <= budget_bytes:
        return ScheduleResult(baseline, baseline, baseline, budget_bytes, True, 1, method="baseline",
                              attempts=[_attempt("baseline", baseline, budget_bytes)])
    attempts: list[tuple[str, Evaluation]] = [("baseline", baseline)]
    modelled: dict[str, float] = {}        # label -> the model's added time of that plan, base included
    evaluations = 1
    problem = baseline_problem = build(baseline)
    share, base = 1.0, baseline            # the cut the problem being solved is modelled on

    def verify(label: str, plan: Choices) -> Evaluation:
        nonlocal evaluations
        evaluations += 1
        found = evaluate(problem.plan_of(plan), share)
        attempts.append((label, found))
        modelled[label] = base.added_time_s + problem.added_time_s(plan)
        progress(f"{label}: recompute {sum(1 for o in plan.values() if o.kind == RECOMPUTE)}, offload "
                 f"{sum(1 for o in plan.values() if o.kind == OFFLOAD)}, compress "
                 f"{sum(1 for o in plan.values() if o.kind == COMPRESS)} values -> simulated peak "
                 f"{found.peak_bytes} B ({'meets' if found.peak_bytes <= budget_bytes else 'over'} the "
                 f"budget {budget_bytes} B), added time {found.added_time_s:.6g} s")
        return found

    solves: list[dict[str, Any]] = []      # every CP-SAT solve's statistics, in order

    def solve_and_verify(model: ScheduleProblem, name: str, base: Evaluation) -> None:
        target = budget_bytes
        for round_ in range(MAX_ROUNDS):
            solved = solve_schedule(model, target, time_limit_s=time_limit_s, progress=progress)
            label = name if round_ == 0 else f"{name} (model budget lowered by {budget_bytes - target} B)"
            solves.append({"model": label, **solved.stats.to_json()})
            found = verify(label, solved.plan)
            fitting = found if found.peak_bytes <= budget_bytes else None
            if fitting is None and solved.unrefined is not None:
                # The refinement (Note [Refining the decomposed plan]) works in the same model, and what
                # that model misses it can make worse: the outer model's own plan is measured too. When
                # it fits, the search goes on with it (another round, its budget lowered, found a
                # dearer plan on GPT-2 XL: 3.81 ms against 3.75).
                unrefined = verify(f"{label}: before refinement", solved.unrefined)
                fitting = unrefined if unrefined.peak_bytes <= budget_bytes else None
            fits = fitting is not None
            # The hint (greedy, usually) is verified too when no plan fitted, or the one that fitted
            # verified dearer than the model prices the hint: the model is optimistic about offloads
            # (Llama-2-7B: a plan of 1.9 ms in the model verified at 17 ms), and the hint may then be the
            # better plan. Otherwise it is unlikely to be (plans verify about as dear as the model prices
            # them, or dearer, beside what the modelled cut recomputes anyway), and verifying it takes
            # 20 s on a 128-layer graph.
            hint_s = solved.stats.hint_objective_s
            if round_ == 0 and solved.hint != solved.plan and (
                    fitting is None or hint_s is None or fitting.added_time_s - base.added_time_s > hint_s):
                verify(f"{name}: {solved.stats.hint_source} hint", solved.hint)
            if fits or solved.stats.status not in ("OPTIMAL", "FEASIBLE"):
                break
            # Lower the model's budget by the overshoot, and at least by what the model missed of this
            # plan's peak: lowering by the overshoot alone can return the same plan when the model
            # already placed it that far below (GPT-2 XL with offloads: reloads the model starts later).
            missed = found.peak_bytes - model.peak_bytes(solved.plan)
            target = min(target - (found.peak_bytes - budget_bytes), budget_bytes - missed)
            if target <= 0:
                break

    def _seed_from_knapsack() -> None:
        nonlocal problem, share, evaluations, base
        over: list[tuple[float, Evaluation]] = []
        shares = _knapsack_shares(baseline, budget_bytes, graph_nodes)
        # The knapsack's peak is not monotonic in its share, and the budget's own share is an estimate:
        # on large graphs a share a step or two below is tried while no knapsack cut meets the budget.
        lower = [round(min(shares) - step, 3) for step in KNAPSACK_STEPS_BELOW
                 if min(shares) - step > 0] if graph_nodes > PARTITION_GREEDY_MAX_NODES else []
        met = False
        for fraction in shares + lower:
            if met and fraction in lower:
                break
            seeded = evaluate(NOTHING, fraction)
            evaluations += 1
            label = f"pytorch knapsack ({fraction:.3g})"
            attempts.append((label, seeded))
            progress(f"{label}: simulated peak {seeded.peak_bytes} B, added time {seeded.added_time_s:.6g} s")
            if seeded.peak_bytes > budget_bytes:
                over.append((fraction, seeded))
            met = met or seeded.peak_bytes <= budget_bytes
        best = min((e.added_time_s for _, e in attempts if e.peak_bytes <= budget_bytes), default=math.inf)
        if graph_nodes <= PARTITION_GREEDY_MAX_NODES and over and min(e.added_time_s for _, e in over) < best:
            # The cheapest cut over the budget, with what the model adds to it (which only adds time:
            # a cut already dearer than a verified plan cannot lead to a better one).
            base_share, seeded = min(over, key=lambda o: (o[1].added_time_s, o[1].peak_bytes))
            problem, share, base = build(seeded), base_share, seeded
            solve_and_verify(problem, f"cp-sat on the knapsack's cut ({base_share:.3g})", seeded)
            problem, share, base = baseline_problem, 1.0, baseline

    solve_and_verify(problem, "cp-sat", baseline)
    if knapsack:
        try:
            _seed_from_knapsack()
        except Exception as err:  # noqa: BLE001 - an optional attempt: the plans so far stand
            # torch's partitioner can refuse a knapsack cut with memopt's tags on it; the attempts
            # already verified are unaffected, and the search goes on without this base.
            problem, share, base = baseline_problem, 1.0, baseline
            progress(f"PyTorch's knapsack as a base failed ({type(err).__name__}: {err}); going on without it")
    if not any(e.peak_bytes <= budget_bytes for _, e in attempts) and any(
            o.kind != RECOMPUTE for item in problem.items for o in item.options):
        # The model's offload windows are the least exact part of it (reload timing on a busy copy
        # stream): when no plan with offloads (or compression) verified, try recomputation alone.
        recompute_only = dataclasses.replace(problem, memo={}, items=[
            dataclasses.replace(item, options=tuple(o for o in item.options if o.kind == RECOMPUTE))
            for item in problem.items])
        solve_and_verify(recompute_only, "cp-sat, recompute only", baseline)
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
        solves.append({"model": "cp-sat lowest peak", **lowest.stats.to_json()})
        verify("cp-sat lowest peak", lowest.plan)
    method, chosen = min(meets or attempts, key=lambda a: (a[1].added_time_s, a[1].peak_bytes) if meets
                         else (a[1].peak_bytes, a[1].added_time_s))
    lowest_peak = min((e for _, e in attempts), key=lambda e: e.peak_bytes)
    return ScheduleResult(chosen, baseline, lowest_peak, budget_bytes, bool(meets), evaluations,
                          method=method,
                          attempts=[_attempt(label, e, budget_bytes, modelled.get(label)) for label, e in attempts],
                          solver=solves[0] if solves else None, solves=solves)


def _knapsack_shares(baseline: Evaluation, budget_bytes: int, graph_nodes: int) -> list[float]:
    # The share of the saved bytes the budget keeps, were the peak to fall byte for byte with them; the
    # knapsack's share is of the range it can remove, so its cut falls deeper than that.
    own = 1.0 - (baseline.peak_bytes - budget_bytes) / max(baseline.timeline.saved_activation_bytes, 1)
    if graph_nodes <= PARTITION_GREEDY_MAX_NODES:
        return list(KNAPSACK_GRID)
    own = round(min(max(own, 0.05), 0.95), 3)
    return [own, round(own / 2 + 0.5, 3)] if graph_nodes <= KNAPSACK_PAIR_MAX_NODES else [own]


def _attempt(label: str, found: Evaluation, budget_bytes: int, model_s: float | None = None) -> dict[str, Any]:
    """One verified plan, for the dumps: ``model_added_s`` is what the linear model priced it at (the
    base cut's own recomputation included), when it came from the model."""
    return {"method": label, "peak_bytes": found.peak_bytes, "meets_budget": found.peak_bytes <= budget_bytes,
            "added_time_s": float(f"{found.added_time_s:.6g}"),
            "model_added_s": None if model_s is None else float(f"{model_s:.6g}"),
            "recompute": len(found.recompute), "offload": len(found.offload), "compress": len(found.compress)}
