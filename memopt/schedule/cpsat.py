"""The CP-SAT scheduler: minimise the added time of a plan subject to the budget on peak live bytes.

Pure: a :class:`~memopt.schedule.model.ScheduleProblem` and a budget in, a plan (value -> choice) out.
OR-Tools is imported in :mod:`memopt.schedule.solver` and nowhere else.

Note [Layer classes and fronts]
A monolithic model (one boolean per value and choice, one constraint per event) does not scale: a
32-layer model has hundreds of values and thousands of events, each constraint over every value whose
window covers it. The model is decomposed along the repeated layers the module stack shows
(:func:`memopt.names.layer_of`):

1. *Classes.* Layers whose values match one for one (place in the layer, bytes, choices and costs) form
   a class. For one layer of each class a small CP-SAT model finds its front: plans of that layer that
   trade freed bytes, the layer's own peak, recompute time and transfer volume (lowest time for each
   level of freed bytes, with and without counting transfers, and lowest local peak). Levels are asked
   of the bytes a plan frees at some time and of the bytes it frees at every time up to a horizon (just
   past the highest event between the layer's forward and backward, usually the loss's backward, and
   the layer's backward): windows close at different times (an offload may come back when the backward
   starts or ahead of the layer's backward), and a plan that frees all its bytes only until the
   backward starts does nothing for a peak in the loss's backward. Plans that another beats at every
   time and in every cost are dropped. Every layer of the class chooses one of these plans.
2. *Outer model.* At an event ``t``, a layer is *absent* (no window of it covers ``t``), *between* (``t``
   lies outside its own forward and backward: it frees what the plan's windows covering ``t`` free, one
   integer per plan and pattern of windows) or *partial* (``t`` lies in its own forward or backward).
   Events with the same partial layer and the same between layers' patterns form one constraint: the
   worst event's live bytes given the partial layer's plan (a constant per plan) minus the freed bytes
   of the between layers minus what values outside any layer free. Where two layers are partial, only
   the larger is modelled; the other's freeing is ignored, which can only overestimate the peak.
3. *Transfers.* One copy stream serves every offload, a queue whose reloads are issued at the
   backward's segment boundaries: its rows (:class:`memopt.schedule.streams.CopyQueue`, Note [Reloads
   start at segment boundaries]) give the stall the runtime will see.
4. *Refinement.* The outer model's plan is then decided again several layers at a time, everything else
   fixed (Note [Refining the decomposed plan]): the fronts are coarse, the best plans are not alike
   across layers.

Values outside repeated layers (embeddings, the head, the loss) are decided one by one in the outer
model; a graph without repeated layers is all such values: the monolithic model, which is small there.
The hint is a greedy solution of the same outer model (cheapest added time per byte of violation
removed, then dropping what the budget does not need), so the solver starts feasible whenever the greedy
is, and its answer is never worse than the hint in the model.
"""


from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from memopt.schedule.model import Option, ScheduleProblem
from memopt.schedule.outer import TRANSFER_TIE_BREAK, Arrays, Outer, assignment_of, build_outer, greedy_hint, plan_of
from memopt.schedule.refine import REFINE_SHARE, refine_plan
from memopt.schedule.solver import ortools, solve
from memopt.schedule.streams import NS

@dataclasses.dataclass
class SolveStats:
    status: str
    objective_s: float | None         # the model's added time of the answer
    bound_s: float | None
    gap: float | None                 # (objective - bound) / objective
    hint_objective_s: float | None
    seconds: float
    layers: int
    classes: int
    front_points: int
    variables: int
    rows: int
    mode: str                         # "time" (meet the budget) or "peak" (lowest peak: infeasible)
    hint_source: str = "greedy"       # where the warm start came from
    # Added time the refinement took off the outer model's answer, in its own models, which also price
    # transfer volume a little (TRANSFER_TIE_BREAK; Note [Refining the decomposed plan]); objective,
    # bound and gap are the outer model's.
    refined_s: float = 0.0
    deterministic_s: float = 0.0      # CP-SAT's deterministic time spent on the model (refinement not included)

    def to_json(self) -> dict[str, Any]:
        def short(x: float | None) -> float | None:
            return None if x is None else float(f"{x:.6g}")
        return {"status": self.status, "mode": self.mode, "objective_s": short(self.objective_s),
                "bound_s": short(self.bound_s), "gap": short(self.gap),
                "hint_objective_s": short(self.hint_objective_s), "seconds": short(self.seconds),
                "layers": self.layers, "classes": self.classes, "front_points": self.front_points,
                "variables": self.variables, "rows": self.rows, "hint_source": self.hint_source,
                "refined_s": short(self.refined_s), "deterministic_s": short(self.deterministic_s)}


@dataclasses.dataclass
class Solved:
    plan: dict[str, Option]           # value -> how it is freed (kept values absent)
    hint: dict[str, Option]
    hint_feasible: bool               # in the model
    stats: SolveStats
    unrefined: dict[str, Option] | None = None   # the outer model's plan, when refinement changed it


class _Progress:
    """Reports the incumbent and the bound while CP-SAT solves, at most once a second."""

    def __init__(self, progress: Callable[[str], None], unit: str, scale: float) -> None:
        self.progress, self.unit, self.scale = progress, unit, scale
        self.start = time.perf_counter()
        self.last = -1.0

    def report(self, objective: float, bound: float, force: bool = False) -> None:
        now = time.perf_counter() - self.start
        if not force and now - self.last < 1.0:
            return
        self.last = now
        gap = (objective - max(0.0, bound)) / objective if objective > 0 else 0.0
        self.progress(f"CP-SAT {now:5.1f} s: incumbent {objective / self.scale:.6g} {self.unit}, bound "
                      f"{bound / self.scale:.6g} {self.unit} (gap {gap:.1%})")


# The objective's unit: a hundredth of a nanosecond, so the transfer tie-break (TRANSFER_TIE_BREAK of a
# transfer's nanoseconds) is an integer.
SCALE = 100


@dataclasses.dataclass
class _Answer:
    """One CP-SAT solve of the outer model."""

    status: str
    chosen: np.ndarray                # the assignment (the hint when the solve found none)
    objective: float                  # in the objective's unit (NaN when no solution)
    bound: float
    peak_mode: bool                   # the objective was the peak, not the added time
    deterministic_s: float            # CP-SAT's deterministic time spent

    @property
    def solved(self) -> bool:
        return self.status in ("OPTIMAL", "FEASIBLE")


def _peak_rows(model: Any, outer: Outer, y: list[Any], minimise_peak: bool, budget: int) -> tuple[Any, dict[Any, Any]]:
    """The outer model's rows, each within the budget (in units) or, with ``minimise_peak``, the peak
    variable returned; a layer's freeing patterns go through one variable each (the bytes its plan frees
    there), returned by (layer, pattern)."""
    freed: dict[tuple[str, int], Any] = {}
    for (name, pattern), vector in outer.patterns.items():
        ids = outer.layer_vars[name]
        freed[name, pattern] = model.NewIntVar(0, int(vector.max(initial=0)), f"freed_{name}_{pattern}")
        model.Add(freed[name, pattern] == sum(int(c) * y[i] for c, i in zip(vector, ids) if c))
    top_live = int(max(outer.const.max(initial=0), outer.matrix.max(initial=0))) + 1
    peak = model.NewIntVar(0, max(top_live, 1) * 2, "peak") if minimise_peak else None
    for r in range(len(outer.const)):
        row = outer.matrix[r]
        through_aux = {i for name, _ in outer.row_patterns[r] for i in outer.layer_vars[name]}
        terms = [int(row[i]) * y[i] for i in np.nonzero(row)[0] if i not in through_aux]
        lhs = int(outer.const[r]) + sum(terms) - sum(freed[key] for key in outer.row_patterns[r])
        model.Add(lhs <= (peak if peak is not None else budget // outer.unit))
    return peak, freed


def _cp_solve(outer: Outer, hint: np.ndarray, budget: int, *, minimise_peak: bool, time_limit_s: float,
              workers: int, progress: Callable[[str], None], stop_at: int | None = None) -> _Answer:
    """Build and solve the outer model's CP-SAT: the least added time within the budget, or the lowest
    peak (``minimise_peak``; ``stop_at``: stop at the first plan whose peak is that low)."""
    cp_model = ortools()
    model = cp_model.CpModel()
    y = [model.NewBoolVar(f"y{i}") for i in range(len(outer.variables))]
    for ids, exact in zip(outer.sets, outer.exactly_one):
        (model.AddExactlyOne if exact else model.AddAtMostOne)([y[i] for i in ids])
    for group in outer.conflicts:
        model.AddAtMostOne([y[i] for i in group])
    peak, freed = _peak_rows(model, outer, y, minimise_peak, budget)
    queue, stall = outer.queue, None
    aux: list[Any] = []
    if queue.rows.shape[0]:         # the copy stream (Note [Reloads start at segment boundaries])
        stall, aux = queue.constrain(model, lambda row: sum(int(queue.rows[row, i]) * y[i]
                                                            for i in np.nonzero(queue.rows[row])[0]),
                                     int(queue.rows.sum()) + 1)
    tie = [round(TRANSFER_TIE_BREAK * SCALE * (v.out_ns + v.in_ns)) for v in outer.variables]
    model.Minimize(peak if peak is not None else
                   sum(SCALE * v.cost_ns * y[i] for i, v in enumerate(outer.variables))
                   + (SCALE * stall if stall is not None else 0) + sum(t * v for t, v in zip(tie, y)))
    _hints(model, outer, y, hint, freed, aux, peak)
    reporter = _Progress(progress, *(("B", 1.0 / outer.unit) if peak is not None else ("s", SCALE * NS)))

    class _Callback(cp_model.CpSolverSolutionCallback):  # type: ignore[name-defined]
        def on_solution_callback(self) -> None:
            reporter.report(self.ObjectiveValue(), self.BestObjectiveBound())
            if stop_at is not None and self.ObjectiveValue() <= stop_at:
                self.StopSearch()     # a plan within the budget is all this search is for

    solver, status, spent = solve(model, workers, time_limit_s, _Callback())
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return _Answer(solver.StatusName(status), hint, math.nan, math.nan, peak is not None, spent)
    reporter.report(solver.ObjectiveValue(), solver.BestObjectiveBound(), force=True)
    return _Answer(solver.StatusName(status), np.array([int(solver.Value(v)) for v in y]),
                   solver.ObjectiveValue(), solver.BestObjectiveBound(), peak is not None, spent)


def _hints(model: Any, outer: Outer, y: list[Any], hint: np.ndarray, freed: dict[Any, Any], aux: list[Any],
           peak: Any) -> None:
    """Every variable of the model hinted from the assignment ``hint``."""
    for i in range(len(y)):
        model.AddHint(y[i], int(hint[i]))
    for (name, pattern), vector in outer.patterns.items():
        model.AddHint(freed[name, pattern], int(vector @ hint[outer.layer_vars[name]]))
    if aux:
        _, stall_hints, backlog_hints = outer.queue.trace((outer.queue.rows @ hint)[:, None])
        for var, value in zip(aux, [*stall_hints, backlog_hints[0]]):
            model.AddHint(var, int(round(float(value[0]))))
    if peak is not None:
        model.AddHint(peak, int(max(0, (outer.const + outer.matrix @ hint).max(initial=0))))


@dataclasses.dataclass
class _Hint:
    """The solver's warm start: an assignment of the outer model, whether it meets the budget there, and
    where it came from."""

    y: np.ndarray
    feasible: bool
    source: str
    deterministic_s: float = 0.0      # CP-SAT's time spent finding it


def _hint(outer: Outer, arrays: Arrays, budget: int, *, minimise_peak: bool, start_from: Mapping[str, Option] | None,
          time_limit_s: float, workers: int, progress: Callable[[str], None]) -> _Hint:
    """The plan given (``start_from``, when the monolithic model holds it within the budget), else the
    greedy's; when that misses the budget, the first plan a lowest-peak search finds within it (Note [A
    feasible hint]: without one, CP-SAT can spend its whole limit looking for any plan)."""
    if start_from is not None and not minimise_peak and not outer.groups:
        given = assignment_of(outer, start_from)
        if (outer.const + outer.matrix @ given).max(initial=0) <= budget // outer.unit:
            return _Hint(given, True, "given plan")
    y, feasible = greedy_hint(outer, budget, min(10.0, time_limit_s / 2))
    hint = _Hint(y, feasible and not minimise_peak, "greedy")
    progress(f"CP-SAT: {len(outer.variables)} choices, {len(outer.const)} peak rows, {len(outer.groups)} "
             f"layers in {outer.classes} classes, {len(outer.individual)} other values; greedy hint "
             f"{'meets' if hint.feasible else 'misses'} the budget ({arrays.cost_of(y) / NS:.6g} s); limit "
             f"{time_limit_s:g} s, {workers} workers")
    if minimise_peak or hint.feasible:
        return hint
    progress("CP-SAT: looking for a plan within the budget first (lowest peak)")
    found = _cp_solve(outer, y, budget, minimise_peak=True, time_limit_s=time_limit_s / 2, workers=workers,
                      progress=progress, stop_at=budget // outer.unit)
    hint.deterministic_s = found.deterministic_s
    if found.solved and (outer.const + outer.matrix @ found.chosen).max(initial=0) <= budget // outer.unit:
        return _Hint(found.chosen, True, "lowest-peak search", found.deterministic_s)
    return hint


def _stats(outer: Outer, arrays: Arrays, answer: _Answer, hint: _Hint, seconds: float) -> SolveStats:
    objective_s = bound_s = gap = None
    if not answer.peak_mode and answer.solved:
        objective_s = answer.objective / (SCALE * NS)
        bound_s = max(0.0, answer.bound) / (SCALE * NS)          # every term is >= 0
        gap = (objective_s - bound_s) / objective_s if objective_s > 0 else 0.0
    return SolveStats(answer.status, objective_s, bound_s, gap,
                      arrays.cost_of(hint.y) / NS if hint.feasible else None, seconds, len(outer.groups),
                      outer.classes, sum(len(p) for p in outer.points.values()), len(outer.variables),
                      len(outer.const), "peak" if answer.peak_mode else "time", hint.source,
                      deterministic_s=answer.deterministic_s + hint.deterministic_s)


def solve_schedule(problem: ScheduleProblem, budget: int, *, time_limit_s: float = 15.0,
                   workers: int | None = None, decompose: bool = True, minimise_peak: bool = False,
                   refine: bool = True, start_from: Mapping[str, Option] | None = None,
                   progress: Callable[[str], None] = lambda message: None) -> Solved:
    """Choose keep / recompute / offload per value to minimise the added time with the model's peak
    within ``budget`` bytes (``minimise_peak``: the lowest peak instead, for infeasible budgets).
    ``refine``: refine a decomposed model's plan several layers at a time (Note [Refining the decomposed
    plan]), for up to ``REFINE_SHARE`` of ``time_limit_s`` more. ``start_from``: a plan to start
    from instead of the greedy one, when it meets the budget
    (monolithic models only: a decomposed model may not hold it)."""
    start = time.perf_counter()
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    outer = build_outer(problem, budget if not minimise_peak else -1, workers, decompose, progress)
    arrays = Arrays(outer, budget)
    hint = _hint(outer, arrays, budget, minimise_peak=minimise_peak, start_from=start_from,
                 time_limit_s=time_limit_s, workers=workers, progress=progress)
    answer = _cp_solve(outer, hint.y, budget, minimise_peak=minimise_peak, time_limit_s=time_limit_s,
                       workers=workers, progress=progress)
    if hint.feasible and not answer.peak_mode and (not answer.solved
                                                   or arrays.cost_of(answer.chosen) > arrays.cost_of(hint.y)):
        answer.chosen = hint.y        # never worse than the plan it started from
    stats = _stats(outer, arrays, answer, hint, time.perf_counter() - start)
    progress(f"CP-SAT {answer.status.lower()} in {stats.seconds:.1f} s" + (
        f": added time {stats.objective_s:.6g} s, bound {stats.bound_s:.6g} s, gap {stats.gap:.1%}"
        if stats.objective_s is not None and stats.gap is not None and stats.bound_s is not None else ""))
    plan = unrefined = plan_of(outer, answer.chosen.tolist())
    if refine and outer.groups and not answer.peak_mode and answer.solved:
        plan, refined_s = refine_plan(problem, budget, plan, time_limit_s=time_limit_s * REFINE_SHARE,
                                      workers=workers, progress=progress, added_s=stats.objective_s or 0.0)
        stats = dataclasses.replace(stats, seconds=time.perf_counter() - start, refined_s=refined_s)
    return Solved(plan, plan_of(outer, hint.y.tolist()), hint.feasible, stats,
                  unrefined if plan != unrefined else None)
