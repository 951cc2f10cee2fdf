"""The fronts of the repeated layers: the plans of one layer the outer model chooses among.

Step 1 of Note [Layer classes and fronts] (:mod:`memopt.schedule.cpsat`): for one layer of each class of
identical layers, small CP-SAT models find the plans that trade the bytes a layer frees (at some time, and
at every time up to a horizon), its own peak, recompute time and transfer volume; the plans another
beats at every time and in every cost are dropped.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from memopt.schedule.model import RECOMPUTE, Item, ScheduleProblem
from memopt.schedule.solver import ortools, solve
from memopt.schedule.streams import NS

FRONT_LEVELS = 10
SPAN_LEVELS = 2               # levels of bytes freed up to a horizon (fewer: they add outer choices)


@dataclasses.dataclass(frozen=True)
class Point:
    """One plan of a layer: a choice per value (its items in order), with its totals."""

    choices: tuple[int, ...]     # per value: the index of its option, or -1 to keep it
    recompute_ns: int
    out_ns: int
    in_ns: int
    ahead_ns: int = 0            # of ``in_ns``, the reloads issued a segment ahead


def layer_signature(items: Sequence[Item]) -> tuple[Any, ...]:
    return tuple((i.pattern, i.nbytes, tuple((o.kind, round(o.time_s * NS), round(o.out_s * NS), o.freed, o.ahead)
                                             for o in i.options)) for i in items)


def point_of(items: Sequence[Item], choices: tuple[int, ...]) -> Point:
    rec = out = back = ahead = 0
    for item, choice in zip(items, choices):
        if choice < 0:
            continue
        option = item.options[choice]
        rec += round(option.time_s * NS)
        out += round(option.out_s * NS)
        back += round(option.in_s * NS)
        ahead += round(option.in_s * NS) if option.ahead else 0
    return Point(choices, rec, out, back, ahead)


def undominated(items: Sequence[Item], points: Sequence[Point],
                 external: frozenset[tuple[int, int]]) -> list[Point]:
    """``points`` without those another point beats: it frees at least as many bytes at every cut of the
    layer's windows (which is all the outer model sees of a plan's bytes), costs no more recompute time
    and transfer, and takes no choice ``external`` lists (it excludes a choice outside the layer) that
    the beaten point does not also take."""
    cuts = sorted({t for item in items for o in item.options for t in (o.start + 1, o.end)})
    freed = np.array([[sum(items[i].freed_by(items[i].options[j]) for i, j in enumerate(p.choices)
                           if j >= 0 and items[i].options[j].start < t < items[i].options[j].end)
                       for t in cuts] for p in points], dtype=np.int64).reshape(len(points), len(cuts))
    # Reloads issued in segment and ahead use different compute to hide behind: neither beats the other.
    costs = np.array([(p.recompute_ns, p.out_ns, p.in_ns - p.ahead_ns, p.ahead_ns) for p in points],
                     dtype=np.int64).reshape(-1, 4)
    taken = [{(i, j) for i, j in enumerate(p.choices) if (i, j) in external} for p in points]
    kept = []
    for a in range(len(points)):
        beaten = False
        for b in range(len(points)):
            if b == a or not (freed[b] >= freed[a]).all() or not (costs[b] <= costs[a]).all() \
                    or not taken[b] <= taken[a]:
                continue
            # equal points: the first stays
            if (freed[b] > freed[a]).any() or (costs[b] < costs[a]).any() or taken[b] < taken[a] or b < a:
                beaten = True
                break
        if not beaten:
            kept.append(points[a])
    return kept


class _LayerModel:
    """The CP-SAT models of one layer's plans: its choices, the bytes a plan frees (at some time, or at
    every cut of a span), and its local peak (one row per distinct set of covering windows, at the
    worst event with that set)."""

    def __init__(self, problem: ScheduleProblem, items: Sequence[Item],
                 conflicts: Sequence[tuple[int, int, int, int]]) -> None:
        self.items, self.conflicts = items, conflicts
        self.cuts = sorted({t for item in items for o in item.options for t in (o.start + 1, o.end)})
        self.worst: dict[tuple[tuple[int, int], ...], int] = {}
        for lo, hi in zip(self.cuts, self.cuts[1:]):
            active = tuple((i, j) for i, item in enumerate(items) for j, o in enumerate(item.options)
                           if o.start < lo < o.end)
            if active:
                self.worst[active] = max(self.worst.get(active, 0), max(problem.base[lo:hi]))

    def spans(self, problem: ScheduleProblem) -> list[list[int]]:
        """What the layer frees while other layers run, which the outer model sees (Note [Layer classes
        and fronts]): windows open and close at different times between the layer's forward and its
        backward (a value last read by the next layer; an offload reloaded when the backward starts, or
        ahead of the layer's backward), so the bytes a plan frees all that time can be far fewer than its
        total. Levels are also asked of the bytes freed at every cut from when every value could be away
        to a horizon: just past the highest event between the layer's forward and its backward (the
        loss's backward, in a language model: plans that keep the layer's bytes away through the step's
        peak), and the layer's own backward."""
        items = self.items
        freeable = max(min(o.start for o in item.options) for item in items)  # every value can be away
        due = min(item.first_backward_use for item in items)
        outside = [t for t in range(freeable + 1, due) if problem.point_group[t] != items[0].group]
        if not outside:
            return []
        highest = max(outside, key=problem.base.__getitem__)
        return [sorted({t for t in (freeable + 1, highest, *self.cuts) if freeable < t < horizon})
                for horizon in sorted({highest + 1, due})]

    def build(self, allowed: set[str], span: list[int] | None) -> tuple[Any, dict[tuple[int, int], Any], Any, Any]:
        """The layer's model: its choices, the bytes it frees (``span``: the least at any of its cuts)
        and its local peak."""
        items, model = self.items, ortools().CpModel()
        x: dict[tuple[int, int], Any] = {}
        for i, item in enumerate(items):
            for j in range(len(item.options)):
                x[i, j] = model.NewBoolVar(f"x{i}_{j}")
                if item.options[j].kind not in allowed:
                    model.Add(x[i, j] == 0)
            model.AddAtMostOne([x[i, j] for j in range(len(item.options))])
        for i, a, k, b in self.conflicts:
            model.AddBoolOr([x[i, a].Not(), x[k, b].Not()])
        freed = model.NewIntVar(0, sum(item.nbytes for item in items), "freed")
        if span is None:
            model.Add(freed <= sum(items[i].freed_by(items[i].options[j]) * v for (i, j), v in x.items()))
        for t in span or ():
            model.Add(freed <= sum(items[i].freed_by(items[i].options[j]) * v for (i, j), v in x.items()
                                   if items[i].options[j].start < t < items[i].options[j].end))
        peak = model.NewIntVar(0, max(self.worst.values()), "peak")
        for active, bytes_ in self.worst.items():
            model.Add(bytes_ - sum(items[i].freed_by(items[i].options[j]) * x[i, j] for i, j in active) <= peak)
        return model, x, freed, peak

    def objective(self, x: dict[tuple[int, int], Any], kind: str) -> Any:
        """What a front plan minimises (besides ``"peak"``): recompute time and transfer volume, with
        recomputation weighed far above transfers ("recompute"), or reloads issued in segment counted
        twice ("hidden": those issued ahead hide behind the segment before)."""
        options = {(i, j): self.items[i].options[j] for i, j in x}
        rec = sum(round(options[key].time_s * NS) * v for key, v in x.items())
        vol = sum(round((options[key].out_s + options[key].in_s) * NS) * v for key, v in x.items())
        own = sum(round(options[key].in_s * NS) * v for key, v in x.items() if not options[key].ahead)
        return {"time": rec + vol, "recompute": rec * 1000 + vol, "hidden": rec + vol + own}[kind]


def layer_front(problem: ScheduleProblem, items: Sequence[Item], conflicts: Sequence[tuple[int, int, int, int]],
                external: frozenset[tuple[int, int]], workers: int) -> list[Point]:
    """Plans of one layer that trade freed bytes, local peak, recompute time and transfer volume: for
    each level of freed bytes, the cheapest plan by each objective and the lowest local peak; with every
    choice, and with recomputation alone (more kinds of choice must never leave the layer fewer good
    plans than recomputation alone gives it). ``conflicts``: (value, option, value, option) index pairs
    within the layer that exclude each other; ``external``: (value, option) choices that exclude a
    choice outside the layer."""
    layer = _LayerModel(problem, items, conflicts)
    keep_all = tuple(-1 for _ in items)
    found: dict[tuple[int, ...], Point] = {keep_all: point_of(items, keep_all)}
    if not layer.worst:
        return list(found.values())
    kinds = {o.kind for item in items for o in item.options}
    filters = [kinds] + ([{RECOMPUTE}] if len(kinds) > 1 and RECOMPUTE in kinds else [])
    for allowed, span in itertools.product(filters, [None, *layer.spans(problem)]):
        # Levels up to the most this kind of plan can free, so that the most is on the front.
        model, _, freed, _ = layer.build(allowed, span)
        model.Maximize(freed)
        solver, status, _ = solve(model, workers, 2.0)
        if not _solved(status) or solver.Value(freed) == 0:
            continue
        most, steps = int(solver.Value(freed)), FRONT_LEVELS if span is None else SPAN_LEVELS
        for level, objective in itertools.product(sorted({most * j // steps for j in range(1, steps + 1)}),
                                                  ("time", "recompute", "hidden", "peak")):
            choices = _cheapest(layer, allowed, span, level, objective, workers)
            if choices is not None:
                found.setdefault(choices, point_of(items, choices))
    return undominated(items, list(found.values()), external)


def _solved(status: int) -> bool:
    cp_model = ortools()
    return status in (cp_model.OPTIMAL, cp_model.FEASIBLE)


def _cheapest(layer: _LayerModel, allowed: set[str], span: list[int] | None, level: int, objective: str,
              workers: int) -> tuple[int, ...] | None:
    """The layer's plan freeing at least ``level`` bytes that minimises ``objective`` ("peak": the lowest
    local peak, at the lowest time for it); None when the solve finds none."""
    model, x, freed, peak = layer.build(allowed, span)
    model.Add(freed >= level)
    model.Minimize(peak if objective == "peak" else layer.objective(x, objective))
    solver, status, _ = solve(model, workers, 2.0)
    if not _solved(status):
        return None
    if objective == "peak":
        model.Add(peak <= int(solver.Value(peak)))
        model.Minimize(layer.objective(x, "time"))
        solver, status, _ = solve(model, workers, 2.0)
        if not _solved(status):
            return None
    return tuple(next((j for j in range(len(item.options)) if solver.Value(x[i, j])), -1)
                 for i, item in enumerate(layer.items))
