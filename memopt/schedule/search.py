"""From a budget to a verified plan: the CP-SAT model, its greedy hint, and checks by exact simulation.

Pure like the rest of the schedule room: partitioning and simulating a plan is the caller's
``evaluate``. The order of work:

1. The linear model of the baseline plan (:mod:`memopt.schedule.model`) is solved with CP-SAT
   (:mod:`memopt.schedule.cpsat`), warm-started from its greedy solution.
2. The solver's plan and the greedy hint are each realised and simulated. The model does not see
   everything (the partitioner adjusting its cut around the tags, a recomputation's temporaries, reloads
   delayed on a busy copy stream); when the measured peak is over the budget, the model is solved again
   with its budget lowered by the overshoot, or by what it missed of that plan's peak when that is
   more, up to ``max_rounds`` times (:class:`SearchPolicy`); and when no plan with offloads verifies,
   or the best one verified dearer than the model priced it, once more with recomputation alone.
3. When no plan so far meets the budget, on graphs small enough that a partition is cheap, the
   partition-verified greedy (:func:`memopt.schedule.greedy.schedule_greedy`) runs: it sees what the
   model misses.
4. The plan that meets the budget with the least predicted added time wins. When none does, CP-SAT
   looks for the lowest peak instead, and the lowest measured peak goes into the error.

Each step is a :class:`Strategy` of :data:`STRATEGIES`, tried in that order when it applies, with the
reason it is tried; the thresholds are one :class:`SearchPolicy`.

Note [Seeding from PyTorch's knapsack]
The linear model chooses among the values the baseline partition saves. torch's knapsack
(``activation_memory_budget``, a share of the saved bytes it may remove) can cut elsewhere: save a
matmul's output and recompute the pointwise chain after it, where the baseline saves that chain's
outputs. Neither view contains the other, and the knapsack's peak is not monotonic in its share. So when
the caller can realise plans on the knapsack's cut, its partitions at a few shares are verified as they
are: a grid of four on graphs a partition is cheap for, else the budget's own share and the one halfway
to 1 (only the former beyond ``knapsack_pair_max_nodes``: a partition of a 128-layer graph takes
~25 s), and, while no knapsack cut meets the budget, a share or two below them
(``knapsack_steps_below``). On the small graphs the cheapest cut over the budget also becomes a
second base, modelled and solved like the baseline (plans on it recompute the knapsack's ops plus their
own). That model is less exact than the baseline's (with the tags in place the knapsack chooses again
around them), so verification decides, and on large graphs, where one more solve and its verification
cost half a minute and the model erred most (a 128-layer Llama: predicted far below what verified; on a
48-layer GPT-2 XL at 0.5 its best plan on the 0.768 cut verified at 5.39 ms against the 0.487 cut's
5.04), it is not built. The cheapest verified plan of all wins: never worse than PyTorch's own answer at
the shares tried, better where the model finds a way. The knapsack is an optional attempt: if torch's
partitioner refuses a cut (with memopt's tags on it, it can), the search reports it and goes on with the
plans it has. Nor is it tried once a plan meets the budget adding no time to the baseline's (offloads
that hide behind compute): a knapsack cut saves less than the partitioner's own and only recomputes more,
and each costs a partition (on an 8-layer tiny Llama at 0.5, four of them were half the search).
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


@dataclasses.dataclass(frozen=True)
class SearchPolicy:
    """The search's thresholds."""

    # Solves per base, each with the model's budget lowered by what the last plan missed.
    max_rounds: int = 3
    # Graphs up to this many joint nodes get the partition-verified greedy, the knapsack grid and its
    # second base (a partition of a tiny Llama takes ~0.1 s on the 2-core CPU; of a 32-layer 7B, ~6 s).
    partition_greedy_max_nodes: int = 4000
    # torch's knapsack shares tried on those graphs (Note [Seeding from PyTorch's knapsack]).
    knapsack_grid: tuple[float, ...] = (0.9, 0.75, 0.5, 0.25)
    # Larger graphs try two shares up to this many joint nodes (a 7B Llama's 7.4k: ~4 s a partition),
    # one above.
    knapsack_pair_max_nodes: int = 12000
    # On those larger graphs, shares this far below the lowest one tried, while no knapsack cut meets.
    knapsack_steps_below: tuple[float, ...] = (0.05, 0.1)
    # A verified plan dearer than the model priced it by more than this share (and 0.1 ms): the model
    # missed something of it, and recomputation alone, which it prices best, is solved too.
    model_tolerance: float = 0.1


POLICY = SearchPolicy()


class _Search:
    """What the strategies share: the plans verified so far, and the model being solved."""

    def __init__(self, evaluate: Evaluate, build: Callable[[Evaluation], ScheduleProblem], baseline: Evaluation,
                 budget_bytes: int, graph_nodes: int, time_limit_s: float, progress: Callable[[str], None],
                 knapsack: bool, policy: SearchPolicy) -> None:
        self.evaluate, self.build, self.baseline, self.budget = evaluate, build, baseline, budget_bytes
        self.graph_nodes, self.time_limit_s, self.progress = graph_nodes, time_limit_s, progress
        self.knapsack, self.policy = knapsack, policy
        self.attempts: list[tuple[str, Evaluation]] = [("baseline", baseline)]
        self.modelled: dict[str, float] = {}   # label -> the model's added time of it, base included
        self.solves: list[dict[str, Any]] = []  # every CP-SAT solve's statistics, in order
        self.evaluations = 1
        self.problem = self.baseline_problem = build(baseline)
        self.share, self.base = 1.0, baseline   # the cut the problem being solved is modelled on

    @property
    def small(self) -> bool:
        return self.graph_nodes <= self.policy.partition_greedy_max_nodes

    def free(self) -> bool:
        """Whether a verified plan meets the budget adding no time to the baseline's (offloads that hide)."""
        return any(e.added_time_s <= self.baseline.added_time_s * (1 + 1e-9) for _, e in self.met())

    def met(self) -> list[tuple[str, Evaluation]]:
        return [(label, e) for label, e in self.attempts if e.peak_bytes <= self.budget]

    def verify(self, label: str, plan: Choices) -> Evaluation:
        self.evaluations += 1
        found = self.evaluate(self.problem.plan_of(plan), self.share)
        self.attempts.append((label, found))
        self.modelled[label] = self.base.added_time_s + self.problem.added_time_s(plan)
        kinds = [sum(1 for o in plan.values() if o.kind == kind) for kind in (RECOMPUTE, OFFLOAD, COMPRESS)]
        self.progress(f"{label}: recompute {kinds[0]}, offload {kinds[1]}, compress {kinds[2]} values -> "
                      f"simulated peak {found.peak_bytes} B ({'meets' if found.peak_bytes <= self.budget else 'over'} "
                      f"the budget {self.budget} B), added time {found.added_time_s:.6g} s")
        return found

    def solve(self, model: ScheduleProblem, label: str, target: int, **kwargs: Any) -> Any:
        solved = solve_schedule(model, target, time_limit_s=self.time_limit_s, progress=self.progress, **kwargs)
        self.solves.append({"model": label, **solved.stats.to_json()})
        return solved

    def result(self) -> ScheduleResult:
        meets = self.met()
        method, chosen = min(meets or self.attempts, key=lambda a: (a[1].added_time_s, a[1].peak_bytes) if meets
                             else (a[1].peak_bytes, a[1].added_time_s))
        lowest = min((e for _, e in self.attempts), key=lambda e: e.peak_bytes)
        return ScheduleResult(chosen, self.baseline, lowest, self.budget, bool(meets), self.evaluations,
                              method=method, solver=self.solves[0] if self.solves else None, solves=self.solves,
                              attempts=[_attempt(label, e, self.budget, self.modelled.get(label))
                                        for label, e in self.attempts])


def _solve_and_verify(search: _Search, model: ScheduleProblem, name: str) -> None:
    """Solve ``model`` and verify its plan, up to ``max_rounds`` times, each with the model's budget
    lowered by what the last plan missed; the plan before refinement and the hint are verified too
    when the refined plan does not meet the budget (or, for the hint, verified dearer than the model
    prices the hint: it may be the better plan)."""
    target, budget = search.budget, search.budget
    for round_ in range(search.policy.max_rounds):
        label = name if round_ == 0 else f"{name} (model budget lowered by {budget - target} B)"
        solved = search.solve(model, label, target)
        found = search.verify(label, solved.plan)
        fitting = found if found.peak_bytes <= budget else None
        if fitting is None and solved.unrefined is not None:
            # The refinement (Note [Refining the decomposed plan]) works in the same model, and what that
            # model misses it can make worse: the outer model's own plan is measured too.
            unrefined = search.verify(f"{label}: before refinement", solved.unrefined)
            fitting = unrefined if unrefined.peak_bytes <= budget else None
        hint_s = solved.stats.hint_objective_s
        if round_ == 0 and solved.hint != solved.plan and (
                fitting is None or hint_s is None or fitting.added_time_s - search.base.added_time_s > hint_s):
            search.verify(f"{name}: {solved.stats.hint_source} hint", solved.hint)
        if fitting is not None or solved.stats.status not in ("OPTIMAL", "FEASIBLE"):
            return
        # Lowered by the overshoot, and at least by what the model missed of this plan's peak: by the
        # overshoot alone the model can return the same plan when it placed it that far below.
        missed = found.peak_bytes - model.peak_bytes(solved.plan)
        target = min(target - (found.peak_bytes - budget), budget - missed)
        if target <= 0:
            return


def _cp_sat(search: _Search) -> None:
    _solve_and_verify(search, search.problem, "cp-sat")


def _knapsack_cuts(search: _Search) -> None:
    """Verify torch's knapsack cuts at a few shares, and on small graphs solve the model of the
    cheapest cut over the budget as a second base (Note [Seeding from PyTorch's knapsack])."""
    try:
        over = _verify_knapsack_cuts(search)
        best = min((e.added_time_s for _, e in search.met()), default=math.inf)
        if search.small and over and min(e.added_time_s for _, e in over) < best:
            # The cheapest cut over the budget, with what the model adds to it (which only adds time:
            # a cut already dearer than a verified plan cannot lead to a better one).
            share, seeded = min(over, key=lambda o: (o[1].added_time_s, o[1].peak_bytes))
            search.problem, search.share, search.base = search.build(seeded), share, seeded
            _solve_and_verify(search, search.problem, f"cp-sat on the knapsack's cut ({share:.3g})")
    except Exception as err:  # noqa: BLE001 - an optional attempt: the plans so far stand
        search.progress(f"PyTorch's knapsack as a base failed ({type(err).__name__}: {err}); going on without it")
    search.problem, search.share, search.base = search.baseline_problem, 1.0, search.baseline


def _verify_knapsack_cuts(search: _Search) -> list[tuple[float, Evaluation]]:
    """The knapsack's cuts at the policy's shares, verified; returns those over the budget."""
    policy, over, met = search.policy, [], False
    shares = _knapsack_shares(search.baseline, search.budget, search.graph_nodes, policy)
    # The knapsack's peak is not monotonic in its share, and the budget's own share is an estimate: on
    # large graphs a share a step or two below is tried while no knapsack cut meets the budget.
    lower = [] if search.small else [round(min(shares) - step, 3) for step in policy.knapsack_steps_below
                                     if min(shares) - step > 0]
    for fraction in shares + lower:
        if met and fraction in lower:
            break
        seeded = search.evaluate(NOTHING, fraction)
        search.evaluations += 1
        label = f"pytorch knapsack ({fraction:.3g})"
        search.attempts.append((label, seeded))
        search.progress(f"{label}: simulated peak {seeded.peak_bytes} B, added time {seeded.added_time_s:.6g} s")
        if seeded.peak_bytes > search.budget:
            over.append((fraction, seeded))
        met = met or seeded.peak_bytes <= search.budget
    return over


def _model_missed(search: _Search) -> bool:
    """Whether recomputation alone is worth a solve: the model has other choices, and no plan meets the
    budget, or the cheapest that does verified dearer than the model priced it."""
    if not any(o.kind != RECOMPUTE for item in search.problem.items for o in item.options):
        return False
    meets = search.met()
    if not meets:
        return True
    label, best = min(meets, key=lambda a: a[1].added_time_s)
    priced = search.modelled.get(label)
    return priced is not None and best.added_time_s - priced > max(1e-4, search.policy.model_tolerance * priced)


def _recompute_only(search: _Search) -> None:
    problem = search.problem
    alone = dataclasses.replace(problem, memo={}, items=[
        dataclasses.replace(item, options=tuple(o for o in item.options if o.kind == RECOMPUTE))
        for item in problem.items])
    _solve_and_verify(search, alone, "cp-sat, recompute only")


def _partition_greedy(search: _Search) -> None:
    greedy = schedule_greedy(search.evaluate, search.budget, progress=search.progress)
    search.evaluations += greedy.evaluations
    search.attempts.append(("partition greedy", greedy.chosen))
    if greedy.lowest is not greedy.chosen:
        search.attempts.append(("partition greedy (lowest peak)", greedy.lowest))


def _lowest_peak(search: _Search) -> None:
    lowest = search.solve(search.problem, "cp-sat lowest peak", search.budget, minimise_peak=True)
    search.verify("cp-sat lowest peak", lowest.plan)


@dataclasses.dataclass(frozen=True)
class Strategy:
    """One step of the search: what it does, why it is tried, and when."""

    name: str
    why: str
    run: Callable[[_Search], None]
    applies: Callable[[_Search], bool]


STRATEGIES: tuple[Strategy, ...] = (
    Strategy("cp-sat", "the linear model of the baseline cut prices every plan of keep, recompute, offload "
             "and compress: its cheapest plan, verified", _cp_sat, lambda search: True),
    Strategy("pytorch knapsack", "torch's knapsack cuts where the baseline does not (Note [Seeding from "
             "PyTorch's knapsack]); not once a plan meets the budget at the baseline's own time: a knapsack "
             "cut only recomputes more than the partitioner's own", _knapsack_cuts,
             lambda search: search.knapsack and not search.free()),
    Strategy("recompute only", "the model prices recomputation best: when no plan with other choices "
             "verified, or the best verified dearer than priced", _recompute_only, _model_missed),
    Strategy("partition greedy", "it verifies every step, and sees what the model misses; on graphs a "
             "partition is cheap for", _partition_greedy, lambda search: search.small and not search.met()),
    Strategy("lowest peak", "no plan meets the budget: the lowest peak, for the error or the warning",
             _lowest_peak, lambda search: not search.met()),
)


def search_plan(evaluate: Evaluate, build: Callable[[Evaluation], ScheduleProblem],
                baseline: Evaluation, budget_bytes: int, *, graph_nodes: int, time_limit_s: float,
                progress: Callable[[str], None] = lambda message: None, knapsack: bool = False,
                policy: SearchPolicy = POLICY) -> ScheduleResult:
    """The best verified plan for ``budget_bytes``: each of :data:`STRATEGIES` that applies, in order,
    then the cheapest plan that meets the budget (see the module docstring). ``build`` models a verified
    plan (:func:`memopt.schedule.model.build_problem`); with ``knapsack``, ``evaluate`` can realise plans
    on torch's knapsack cut too (Note [Seeding from PyTorch's knapsack])."""
    if baseline.peak_bytes <= budget_bytes:
        return ScheduleResult(baseline, baseline, baseline, budget_bytes, True, 1, method="baseline",
                              attempts=[_attempt("baseline", baseline, budget_bytes)])
    search = _Search(evaluate, build, baseline, budget_bytes, graph_nodes, time_limit_s, progress, knapsack,
                     policy)
    for strategy in STRATEGIES:
        if strategy.applies(search):
            strategy.run(search)
    return search.result()


def _knapsack_shares(baseline: Evaluation, budget_bytes: int, graph_nodes: int, policy: SearchPolicy) -> list[float]:
    # The share of the saved bytes the budget keeps, were the peak to fall byte for byte with them; the
    # knapsack's share is of the range it can remove, so its cut falls deeper than that.
    own = 1.0 - (baseline.peak_bytes - budget_bytes) / max(baseline.timeline.saved_activation_bytes, 1)
    if graph_nodes <= policy.partition_greedy_max_nodes:
        return list(policy.knapsack_grid)
    own = round(min(max(own, 0.05), 0.95), 3)
    return [own, round(own / 2 + 0.5, 3)] if graph_nodes <= policy.knapsack_pair_max_nodes else [own]


def _attempt(label: str, found: Evaluation, budget_bytes: int, model_s: float | None = None) -> dict[str, Any]:
    """One verified plan, for the dumps: ``model_added_s`` is what the linear model priced it at (the
    base cut's own recomputation included), when it came from the model."""
    return {"method": label, "peak_bytes": found.peak_bytes, "meets_budget": found.peak_bytes <= budget_bytes,
            "added_time_s": float(f"{found.added_time_s:.6g}"),
            "model_added_s": None if model_s is None else float(f"{model_s:.6g}"),
            "recompute": len(found.recompute), "offload": len(found.offload), "compress": len(found.compress)}
