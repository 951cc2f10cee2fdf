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


def layer_front(problem: ScheduleProblem, items: Sequence[Item], conflicts: Sequence[tuple[int, int, int, int]],
           external: frozenset[tuple[int, int]], workers: int) -> list[Point]:
    """Plans of one layer that trade freed bytes, local peak, recompute time and transfer volume.
    ``conflicts``: (value, option, value, option) index pairs within the layer that exclude each other;
    ``external``: (value, option) choices that exclude a choice outside the layer."""
    cp_model = ortools()
    # One constraint per distinct set of covering windows, at the worst event with that set.
    cuts = sorted({t for item in items for o in item.options for t in (o.start + 1, o.end)})
    worst: dict[tuple[tuple[int, int], ...], int] = {}
    for lo, hi in zip(cuts, cuts[1:]):
        active = tuple((i, j) for i, item in enumerate(items) for j, o in enumerate(item.options)
                       if o.start < lo < o.end)
        if active:
            worst[active] = max(worst.get(active, 0), max(problem.base[lo:hi]))
    events = list(worst)
    total = sum(item.nbytes for item in items)
    found: dict[tuple[int, ...], Point] = {}
    keep_all = tuple(-1 for _ in items)
    found[keep_all] = point_of(items, keep_all)
    if not events:
        return list(found.values())
    peak_hint = max(worst.values())
    # What the layer frees while other layers run, which the outer model sees (Note [Layer classes and
    # fronts]): windows open and close at different times between the layer's forward and its backward
    # (a value last read by the next layer; an offload reloaded when the backward starts, or ahead of the
    # layer's backward), so the bytes a plan frees all that time can be far fewer than its total. Levels
    # are also asked of the bytes freed at every cut from when every value could be away to a horizon:
    # just past the highest event between the layer's forward and its backward (the loss's backward,
    # in a language model: plans that keep the layer's bytes away through the step's peak), and the
    # layer's own backward.
    freeable = max(min(o.start for o in item.options) for item in items)  # every value can be away
    due = min(item.first_backward_use for item in items)
    group = items[0].group
    outside = [t for t in range(freeable + 1, due) if problem.point_group[t] != group]
    spans = []
    if outside:
        highest = max(outside, key=problem.base.__getitem__)
        spans = [sorted({t for t in (freeable + 1, highest, *cuts) if freeable < t < horizon})
                 for horizon in sorted({highest + 1, due})]
    # Fronts with every choice, and with recomputation alone: more kinds of choice must never leave
    # the layer fewer good plans than recomputation alone gives it.
    kinds = {o.kind for item in items for o in item.options}
    filters = [kinds] + ([{RECOMPUTE}] if len(kinds) > 1 and RECOMPUTE in kinds else [])

    def build(allowed: set[str], span: list[int] | None) -> tuple[Any, dict[tuple[int, int], Any], Any, Any]:
        """The layer's model: its choices, the bytes it frees (``span``: the least at any of its cuts)
        and its local peak."""
        model = cp_model.CpModel()
        x: dict[tuple[int, int], Any] = {}
        for i, item in enumerate(items):
            for j in range(len(item.options)):
                x[i, j] = model.NewBoolVar(f"x{i}_{j}")
                if item.options[j].kind not in allowed:
                    model.Add(x[i, j] == 0)
            model.AddAtMostOne([x[i, j] for j in range(len(item.options))])
        for i, a, k, b in conflicts:
            model.AddBoolOr([x[i, a].Not(), x[k, b].Not()])
        freed = model.NewIntVar(0, total, "freed")
        if span is None:
            model.Add(freed <= sum(items[i].freed_by(items[i].options[j]) * v for (i, j), v in x.items()))
        for t in span or ():
            model.Add(freed <= sum(items[i].freed_by(items[i].options[j]) * v for (i, j), v in x.items()
                                   if items[i].options[j].start < t < items[i].options[j].end))
        peak = model.NewIntVar(0, peak_hint, "peak")
        for active in events:
            model.Add(worst[active] - sum(items[i].freed_by(items[i].options[j]) * x[i, j]
                                          for i, j in active) <= peak)
        return model, x, freed, peak

    for allowed, span in itertools.product(filters, [None, *spans]):
        # Levels up to the most this kind of plan can free, so that the most is on the front.
        model, _, freed, _ = build(allowed, span)
        model.Maximize(freed)
        solver, status, _ = solve(model, workers, 2.0)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE) or solver.Value(freed) == 0:
            continue
        most = int(solver.Value(freed))
        steps = FRONT_LEVELS if span is None else SPAN_LEVELS
        for level, objective in itertools.product(sorted({most * j // steps for j in range(1, steps + 1)}),
                                                  ("time", "recompute", "hidden", "peak")):
            model, x, freed, peak = build(allowed, span)
            model.Add(freed >= level)
            rec = sum(round(items[i].options[j].time_s * NS) * v for (i, j), v in x.items())
            vol = sum(round((items[i].options[j].out_s + items[i].options[j].in_s) * NS) * v
                      for (i, j), v in x.items())
            own = sum(round(items[i].options[j].in_s * NS) * v for (i, j), v in x.items()
                      if not items[i].options[j].ahead)
            if objective == "time":
                model.Minimize(rec + vol)
            elif objective == "hidden":          # reloads issued ahead hide behind the segment before
                model.Minimize(rec + vol + own)
            elif objective == "recompute":
                model.Minimize(rec * 1000 + vol)
            else:
                model.Minimize(peak)
            solver, status, _ = solve(model, workers, 2.0)
            if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
                continue
            if objective == "peak":      # the lowest local peak, at the lowest time for it
                model.Add(peak <= int(solver.Value(peak)))
                model.Minimize(rec + vol)
                solver, status, _ = solve(model, workers, 2.0)
                if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
                    continue
            choices = tuple(next((j for j in range(len(item.options)) if solver.Value(x[i, j])), -1)
                            for i, item in enumerate(items))
            found.setdefault(choices, point_of(items, choices))
    return undominated(items, list(found.values()), external)
