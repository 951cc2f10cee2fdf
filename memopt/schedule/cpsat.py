"""The CP-SAT scheduler: minimise the added time of a plan subject to the budget on peak live bytes.

Pure: a :class:`~memopt.schedule.model.ScheduleProblem` and a budget in, a plan (value -> choice) out.
OR-Tools is imported here and nowhere else.

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
import itertools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from memopt.errors import MemoptError
from memopt.schedule.model import OFFLOAD, RECOMPUTE, Item, Option, ScheduleProblem
from memopt.schedule.streams import NS, Copy, CopyQueue

TRANSFER_TIE_BREAK = 0.01      # cost per second of transfer volume, so unneeded offloads are not chosen
MIN_LAYERS_TO_DECOMPOSE = 4
FRONT_LEVELS = 10
SPAN_LEVELS = 2               # levels of bytes freed up to a horizon (fewer: they add outer choices)
# Layers whose values one refinement step decides again (Note [Refining the decomposed plan]). On GPT-2
# XL's model at the knapsack-0.5 peak, from the outer plan's 2.94 ms, with 15 s to refine: 2.85 ms with 3
# layers a step, 2.81 with 6, 2.77 with 12, 2.75 with 24 (in 21 s: its steps overran the limit).
REFINE_LAYERS = 12
REFINE_ROUNDS = 3             # passes over the layers, while a pass still gains
# The refinement's time, a share of the solve's time limit on top of it (CP-SAT's deterministic time, as
# the limit is). Taken from the outer model's limit instead, it left GPT-2 XL's outer solve a far weaker
# plan (4.57 ms against 3.71).
REFINE_SHARE = 0.75
# A pass that takes off less than this share of the plan's added time is the last one.
REFINE_MIN_GAIN = 0.005
# One step's limit: most steps are settled by the single-worker probe (10% of it: Note [A crash in
# CP-SAT's interleaved search]), which solves these small models faster than the interleaved search.
REFINE_STEP_S = 4.0


@dataclasses.dataclass(frozen=True)
class _Point:
    """One plan of a layer: a choice per value (its items in order), with its totals."""

    choices: tuple[int, ...]     # per value: the index of its option, or -1 to keep it
    recompute_ns: int
    out_ns: int
    in_ns: int
    ahead_ns: int = 0            # of ``in_ns``, the reloads issued a segment ahead


@dataclasses.dataclass
class _Var:
    set_id: int                 # the one-hot set it belongs to (a layer, or one value)
    label: tuple[Any, ...]      # ("layer", group, point index) or ("value", item index, option index)
    cost_ns: int                # recompute time
    out_ns: int
    in_ns: int
    copies: tuple[Copy, ...]    # what it puts on the copy stream


@dataclasses.dataclass
class _Outer:
    """The outer model as plain arrays: rows ``const + A @ y <= budget``."""

    variables: list[_Var]
    exactly_one: list[bool]               # per set: a layer must pick a plan; a value may keep
    sets: list[list[int]]
    const: np.ndarray                     # (rows,)
    matrix: np.ndarray                    # (rows, vars)
    layer_vars: dict[str, list[int]]      # layer -> its plan variables
    patterns: dict[tuple[str, int], np.ndarray]   # (layer, pattern) -> bytes freed per plan (units)
    row_patterns: list[list[tuple[str, int]]]     # per row: the other layers' patterns it subtracts
    queue: CopyQueue                      # the copy stream's rows over the variables
    unit: int                             # bytes per model unit
    groups: dict[str, list[Item]]         # layer -> its items in order
    points: dict[str, list[_Point]]       # layer -> the plans it may choose
    individual: list[Item]
    classes: int
    conflicts: list[list[int]]            # at most one of each list (choices in different sets)


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


def _cp_model() -> Any:
    try:
        from ortools.sat.python import cp_model
    except ImportError as err:  # pragma: no cover - ortools is a dependency
        raise MemoptError("the memory scheduler needs OR-Tools: pip install ortools") from err
    return cp_model


# --------------------------------------------------------------------------------------------------------
# Layers and their fronts
# --------------------------------------------------------------------------------------------------------


def _signature(items: Sequence[Item]) -> tuple[Any, ...]:
    return tuple((i.pattern, i.nbytes, tuple((o.kind, round(o.time_s * NS), round(o.out_s * NS), o.freed, o.ahead)
                                             for o in i.options)) for i in items)


def _point_of(items: Sequence[Item], choices: tuple[int, ...]) -> _Point:
    rec = out = back = ahead = 0
    for item, choice in zip(items, choices):
        if choice < 0:
            continue
        option = item.options[choice]
        rec += round(option.time_s * NS)
        out += round(option.out_s * NS)
        back += round(option.in_s * NS)
        ahead += round(option.in_s * NS) if option.ahead else 0
    return _Point(choices, rec, out, back, ahead)


def _deterministic(solver: Any, workers: int, seconds: float) -> None:
    """Note [Deterministic solves]: the same graph and options must give the same plan, run after run,
    whatever else loads the machine. CP-SAT's parallel portfolio and its wall-clock limit are not
    reproducible; its interleaved search with a deterministic time limit is (the wall-clock limit stays,
    at three times that, as a guard)."""
    solver.parameters.num_workers = workers
    solver.parameters.interleave_search = True
    solver.parameters.max_deterministic_time = float(seconds)
    solver.parameters.max_time_in_seconds = 3.0 * float(seconds)
    solver.parameters.random_seed = 0
    # Note [A crash in CP-SAT's interleaved search]: the subsolver that proved infeasibility while loading.
    solver.parameters.ignore_subsolvers.append("max_lp")


# Note [A crash in CP-SAT's interleaved search]
# OR-Tools 9.15 aborts the process ("Check failed: heuristics.fixed_search != nullptr") when, in its
# interleaved search, a subsolver proves the model infeasible while it is still loading: seen on a tiny
# Llama's outer model at a budget below the model's reach (the "max_lp" subsolver, whose LP relaxation
# is the strongest), and on a monolithic 8B outer model. An abort cannot be caught, and it would end the
# user's training run. So the interleaved search runs without "max_lp" (the model above then solves:
# INFEASIBLE), and every solve first runs a short single-worker probe (no interleaving, deterministic
# too): a model it proves infeasible or solves to optimality is answered there, and only the rest go to
# the interleaved search. Small models (a layer's front) are mostly answered by the probe, which makes
# them cheaper, not dearer.
PROBE_SHARE = 0.1              # of a solve's deterministic time limit, at most PROBE_MAX_S
PROBE_MAX_S = 1.0


def _solve(model: Any, workers: int, seconds: float, callback: Any = None) -> tuple[Any, int, float]:
    """(solver, status, deterministic seconds spent) of ``model``: the probe of Note [A crash in CP-SAT's
    interleaved search], then, when it settles nothing, the deterministic interleaved search with
    ``workers``."""
    cp_model = _cp_model()
    probe = cp_model.CpSolver()
    _deterministic(probe, 1, min(PROBE_MAX_S, PROBE_SHARE * seconds))
    probe.parameters.interleave_search = False
    status = probe.Solve(model, callback) if callback is not None else probe.Solve(model)
    spent = float(probe.response_proto.deterministic_time)
    if status in (cp_model.INFEASIBLE, cp_model.MODEL_INVALID, cp_model.OPTIMAL):
        return probe, status, spent
    solver = cp_model.CpSolver()
    _deterministic(solver, workers, seconds)
    status = solver.Solve(model, callback) if callback is not None else solver.Solve(model)
    return solver, status, spent + float(solver.response_proto.deterministic_time)


def _undominated(items: Sequence[Item], points: Sequence[_Point],
                 external: frozenset[tuple[int, int]]) -> list[_Point]:
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


def _front(problem: ScheduleProblem, items: Sequence[Item], conflicts: Sequence[tuple[int, int, int, int]],
           external: frozenset[tuple[int, int]], workers: int) -> list[_Point]:
    """Plans of one layer that trade freed bytes, local peak, recompute time and transfer volume.
    ``conflicts``: (value, option, value, option) index pairs within the layer that exclude each other;
    ``external``: (value, option) choices that exclude a choice outside the layer."""
    cp_model = _cp_model()
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
    found: dict[tuple[int, ...], _Point] = {}
    keep_all = tuple(-1 for _ in items)
    found[keep_all] = _point_of(items, keep_all)
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
        solver, status, _ = _solve(model, workers, 2.0)
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
            solver, status, _ = _solve(model, workers, 2.0)
            if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
                continue
            if objective == "peak":      # the lowest local peak, at the lowest time for it
                model.Add(peak <= int(solver.Value(peak)))
                model.Minimize(rec + vol)
                solver, status, _ = _solve(model, workers, 2.0)
                if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
                    continue
            choices = tuple(next((j for j in range(len(item.options)) if solver.Value(x[i, j])), -1)
                            for i, item in enumerate(items))
            found.setdefault(choices, _point_of(items, choices))
    return _undominated(items, list(found.values()), external)


# --------------------------------------------------------------------------------------------------------
# The outer model
# --------------------------------------------------------------------------------------------------------


def _build_outer(problem: ScheduleProblem, budget: int, workers: int, decompose: bool,
                 progress: Callable[[str], None]) -> _Outer:
    optioned = [i for i in problem.items if i.options]
    groups: dict[str, list[Item]] = {}
    for item in optioned:
        if item.group is not None:
            groups.setdefault(item.group, []).append(item)
    if not decompose or len(groups) < MIN_LAYERS_TO_DECOMPOSE:
        groups = {}
    individual = [i for i in optioned if i.group is None or i.group not in groups]
    for items in groups.values():
        items.sort(key=lambda i: i.made)

    # Fronts, one per class of identical layers.
    classes: dict[tuple[Any, ...], list[str]] = {}
    for name, items in groups.items():
        classes.setdefault(_signature(items), []).append(name)
    all_conflicts = problem.conflicts()
    points: dict[str, list[_Point]] = {}
    for members in classes.values():
        start = time.perf_counter()
        representative = groups[members[len(members) // 2]]
        position = {item.name: i for i, item in enumerate(representative)}
        local = [(position[w], representative[position[w]].options.index(a),
                  position[u], representative[position[u]].options.index(b))
                 for w, a, u, b in all_conflicts if w in position and u in position]
        external = frozenset((position[v], representative[position[v]].options.index(o))
                             for w, a, u, b in all_conflicts if (w in position) != (u in position)
                             for v, o in ((w, a), (u, b)) if v in position)
        key = ("front", tuple(item.name for item in representative))
        if key not in problem.memo:
            problem.memo[key] = _front(problem, representative, local, external, workers)
        front: list[_Point] = problem.memo[key]  # type: ignore[assignment]
        for name in members:
            points[name] = [_point_of(groups[name], p.choices) for p in front]
        progress(f"layer class {members[0]} (x{len(members)}): {len(front)} plans on its front "
                 f"({time.perf_counter() - start:.1f} s)")

    unit = 1 << max(0, max(problem.base, default=0).bit_length() - 40)
    variables: list[_Var] = []
    sets: list[list[int]] = []
    exactly_one: list[bool] = []
    layer_vars: dict[str, list[int]] = {}
    for name, items in groups.items():
        ids = []
        for k, point in enumerate(points[name]):
            ids.append(len(variables))
            copies = tuple(c for item, j in zip(items, point.choices) if j >= 0
                           and (c := problem.copy_of(item, item.options[j])) is not None)
            variables.append(_Var(len(sets), ("layer", name, k), point.recompute_ns, point.out_ns,
                                  point.in_ns, copies))
        layer_vars[name] = ids
        sets.append(ids)
        exactly_one.append(True)
    item_vars: dict[int, list[tuple[int, Item, Any]]] = {}
    for index, item in enumerate(individual):
        ids = []
        for j, option in enumerate(item.options):
            ids.append(len(variables))
            item_vars.setdefault(index, []).append((len(variables), item, option))
            copy = problem.copy_of(item, option)
            variables.append(_Var(len(sets), ("value", index, j), round(option.time_s * NS),
                                  round(option.out_s * NS), round(option.in_s * NS),
                                  (copy,) if copy is not None else ()))
        sets.append(ids)
        exactly_one.append(False)

    # Rows (Note [Layer classes and fronts]): events that could exceed the budget, grouped by the layer
    # the event runs in (its plan decides a constant per plan), the other layers' freeing patterns and
    # the other values' active choices.
    over = np.array([t for t, base in enumerate(problem.base) if base > budget], dtype=np.int64)
    base = np.array(problem.base, dtype=np.int64)
    pattern_ids: dict[str, np.ndarray] = {}           # layer -> pattern index at each event of ``over``
    patterns: dict[tuple[str, int], np.ndarray] = {}
    freed_at: dict[str, list[np.ndarray]] = {}        # layer -> bytes freed per plan, per pattern
    for name, items in groups.items():
        choices = np.array([p.choices for p in points[name]], dtype=np.int64).reshape(-1, len(items))
        cuts = sorted({t for item in items for o in item.options for t in (o.start + 1, o.end)})
        vectors: dict[bytes, int] = {}
        table: list[np.ndarray] = []
        segment_pattern = []
        for cut in cuts:
            freed = np.zeros(len(points[name]), dtype=np.int64)
            for i, item in enumerate(items):
                for j, o in enumerate(item.options):
                    if o.start < cut < o.end:
                        freed += np.where(choices[:, i] == j, item.freed_by(o), 0)
            signature = freed.tobytes()
            if signature not in vectors:
                vectors[signature] = len(table)
                table.append(freed)
            segment_pattern.append(vectors[signature])
        freed_at[name] = table
        segment = np.searchsorted(np.array(cuts), over, side="right") - 1
        at = np.where(segment >= 0, np.array(segment_pattern + [0])[np.maximum(segment, 0)], -1)
        empty = np.array([not vector.any() for vector in table] + [True])    # index -1: before any cut
        pattern_ids[name] = np.where(empty[at], -1, at)
        for index, vector in enumerate(table):
            patterns[name, index] = vector // unit
    names = list(groups)
    column = {name: i for i, name in enumerate(names)}
    owners = np.array([column.get(problem.point_group[t], -1) for t in over.tolist()], dtype=np.int64)
    layer_patterns = np.stack([pattern_ids[g] for g in names], axis=1) if names else \
        np.zeros((len(over), 0), dtype=np.int64)
    owner_pattern = np.where(owners >= 0, layer_patterns[np.arange(len(over)), np.maximum(owners, 0)]
                             if names else -1, -1)
    others_key = layer_patterns.copy()
    if names:
        others_key[np.arange(len(over))[owners >= 0], owners[owners >= 0]] = -2   # the owner: per plan
    value_vars = [(var, o) for entries in item_vars.values() for var, _, o in entries]
    active = np.array([[o.start < t < o.end for _, o in value_vars] for t in over.tolist()],
                      dtype=np.int64).reshape(len(over), len(value_vars))
    keys = np.concatenate([owners[:, None], others_key, active], axis=1)
    unique, inverse = np.unique(keys, axis=0, return_inverse=True) if len(over) else (keys, keys[:, 0])
    inverse = np.asarray(inverse).reshape(-1)
    rows: dict[tuple[Any, ...], list[int]] = {}
    rows_owner_patterns: dict[tuple[Any, ...], list[int]] = {}
    for k, key_row in enumerate(unique):
        in_row = np.nonzero(inverse == k)[0]
        owner = names[int(key_row[0])] if key_row[0] >= 0 else None
        others = tuple((g, int(key_row[1 + i])) for i, g in enumerate(names) if key_row[1 + i] >= 0)
        values = tuple(var for (var, _), on in zip(value_vars, key_row[1 + len(names):]) if on)
        rows[owner, others, values] = over[in_row].tolist()
        rows_owner_patterns[owner, others, values] = owner_pattern[in_row].tolist()

    n = len(variables)
    const, matrix, row_patterns = [], [], []
    for row_key, ts in rows.items():
        owner, others, values = row_key
        row = np.zeros(n, dtype=np.int64)
        if owner is None:
            const.append(-(-int(base[ts].max()) // unit))
        else:
            const.append(0)
            worst = np.full(len(points[owner]), np.iinfo(np.int64).min // 2, dtype=np.int64)
            for t, pattern in zip(ts, rows_owner_patterns[row_key]):
                worst = np.maximum(worst, int(base[t]) - (freed_at[owner][pattern] if pattern >= 0 else 0))
            row[layer_vars[owner]] = -(-worst // unit)
        for g, pattern in others:
            row[layer_vars[g]] -= patterns[g, pattern]
        for var in values:
            label = variables[var].label
            item = individual[label[1]]
            row[var] -= item.freed_by(item.options[label[2]]) // unit
        matrix.append(row)
        row_patterns.append(list(others))

    queue = CopyQueue(problem.compute_s, problem.forward_end, problem.segment_starts,
                      [v.copies for v in variables])

    # Choices in different sets that exclude each other (Note [Freed windows] in model.py).
    holders: dict[tuple[str, Any], list[int]] = {}
    for name, ids in layer_vars.items():
        for var, point in zip(ids, points[name]):
            for item, choice in zip(groups[name], point.choices):
                if choice >= 0:
                    holders.setdefault((item.name, item.options[choice]), []).append(var)
    for entries in item_vars.values():
        for var, item, option in entries:
            holders.setdefault((item.name, option), []).append(var)
    conflicts = []
    for w, a, u, b in all_conflicts:
        left, right = holders.get((w, a), []), holders.get((u, b), [])
        if left and right and variables[left[0]].set_id != variables[right[0]].set_id:
            conflicts.append(sorted(set(left) | set(right)))
    conflicts = [list(c) for c in dict.fromkeys(tuple(c) for c in conflicts)]

    return _Outer(variables, exactly_one, sets, np.array(const, dtype=np.int64),
                  np.array(matrix, dtype=np.int64).reshape(len(const), n), layer_vars, patterns,
                  row_patterns, queue, unit, groups, points, individual, len(classes),
                  conflicts)


class _Arrays:
    """The outer model's costs and rows as arrays, with a zero column ``n`` standing for "keep"."""

    def __init__(self, outer: _Outer, budget: int) -> None:
        variables = outer.variables
        n = len(variables)
        self.n = n
        self.matrix = np.concatenate([outer.matrix, np.zeros((outer.matrix.shape[0], 1), np.int64)], 1)
        self.const = outer.const
        self.limit = budget // outer.unit
        vol = np.array([v.out_ns + v.in_ns for v in variables] + [0], dtype=np.float64)
        self.cost = np.array([v.cost_ns for v in variables] + [0], dtype=np.float64) \
            + TRANSFER_TIE_BREAK * vol
        self.queue = outer.queue
        self.copy_rows = np.concatenate([outer.queue.rows, np.zeros((outer.queue.rows.shape[0], 1), np.int64)], 1)

    def exposed(self, load: np.ndarray) -> np.ndarray:
        """The copy stream's stall for row loads (rows x moves)."""
        return self.queue.stall(load)

    def cost_of(self, y: np.ndarray) -> float:
        full = np.append(y, 0)
        return float(self.cost @ full + self.exposed((self.copy_rows @ full)[:, None])[0])


def _greedy(outer: _Outer, budget: int, deadline_s: float = 10.0) -> tuple[np.ndarray, bool]:
    """A complete assignment of the outer model: repeatedly take the move (one layer's plan or one
    value's choice changed) with the least added time per unit of budget violation removed; once the
    budget is met, take the moves that save the most time and keep it met. Stops after
    ``deadline_s`` seconds with what it has (the solver goes on from there)."""
    arrays = _Arrays(outer, budget)
    n = arrays.n
    choice = []                       # per set: the chosen variable, or n for "keep"
    for ids, exact in zip(outer.sets, outer.exactly_one):
        choice.append(min(ids, key=lambda v: (outer.variables[v].cost_ns + outer.variables[v].out_ns, v))
                      if exact else n)
    news: list[int] = []
    owners: list[int] = []
    for s, (ids, exact) in enumerate(zip(outer.sets, outer.exactly_one)):
        for target in [*ids] + ([] if exact else [n]):
            news.append(target)
            owners.append(s)
    news_arr = np.array(news, dtype=np.int64)
    clash = np.zeros((n + 1, n + 1), dtype=np.int64)
    for group in outer.conflicts:
        for i in group:
            for j in group:
                if i != j:
                    clash[i, j] = 1

    def state() -> np.ndarray:
        y = np.zeros(n + 1, dtype=np.int64)
        for c in choice:
            y[c] = 1
        y[n] = 0
        return y

    def evaluate() -> tuple[np.ndarray, np.ndarray, np.ndarray, float, int]:
        y = state()
        olds_arr = np.array([choice[s] for s in owners], dtype=np.int64)
        lhs = arrays.const + arrays.matrix @ y
        over = np.maximum(0, lhs - arrays.limit)
        delta = arrays.matrix[:, news_arr] - arrays.matrix[:, olds_arr]
        new_over = np.maximum(0, lhs[:, None] + delta - arrays.limit).sum(0)
        load = arrays.copy_rows @ y
        moved = load[:, None] + arrays.copy_rows[:, news_arr] - arrays.copy_rows[:, olds_arr]
        base_cost = float(arrays.cost @ y + arrays.exposed(load[:, None])[0])
        new_cost = arrays.cost @ y + arrays.cost[news_arr] - arrays.cost[olds_arr] + arrays.exposed(moved)
        allowed = (clash[news_arr] @ y == 0) & (news_arr != olds_arr)
        return olds_arr, np.where(allowed, new_over, np.iinfo(np.int64).max), new_cost, base_cost, \
            int(over.sum())

    # Start from the best uniform plan (every layer of a class the same front point, the usual
    # "checkpoint every layer" shape) when it is closer to the budget than keeping everything.
    layer_sets = [s for s, exact in enumerate(outer.exactly_one) if exact]
    widest = max((len(outer.sets[s]) for s in layer_sets), default=0)
    best_start = (evaluate()[4], arrays.cost_of(state()[:n]), list(choice))
    for k in range(widest):
        trial = list(choice)
        for s in layer_sets:
            trial[s] = outer.sets[s][min(k, len(outer.sets[s]) - 1)]
        saved_choice, choice[:] = list(choice), trial
        y_trial = state()
        key = (evaluate()[4], arrays.cost_of(y_trial[:n]), trial)
        clashes = int(y_trial @ clash @ y_trial)
        choice[:] = saved_choice
        if not clashes and key[:2] < best_start[:2]:
            best_start = key
    choice[:] = best_start[2]
    deadline = time.perf_counter() + deadline_s
    for _ in range(4 * len(outer.sets) + 10):
        olds_arr, new_over, new_cost, base_cost, over = evaluate()
        if over == 0 or time.perf_counter() > deadline:
            break
        reduced = over - new_over
        useful = reduced > 0
        if not useful.any():
            break
        score = np.where(useful, (new_cost - base_cost) / np.maximum(reduced, 1), np.inf)
        best = int(np.lexsort((-reduced, score))[0])
        choice[owners[best]] = news[best]
    olds_arr, new_over, new_cost, base_cost, over = evaluate()
    feasible = over == 0
    while feasible and len(news) and time.perf_counter() < deadline:
        saving = np.where(new_over == 0, base_cost - new_cost, 0.0)
        best = int(np.argmax(saving))
        if saving[best] <= 1e-9:
            break
        choice[owners[best]] = news[best]
        olds_arr, new_over, new_cost, base_cost, over = evaluate()
    return state()[:n], feasible


def _plan_of(outer: _Outer, y: Sequence[int]) -> dict[str, Option]:
    plan: dict[str, Option] = {}
    for var, on in zip(outer.variables, y):
        if not on:
            continue
        if var.label[0] == "layer":
            _, name, k = var.label
            for item, choice in zip(outer.groups[name], outer.points[name][k].choices):
                if choice >= 0:
                    plan[item.name] = item.options[choice]
        else:
            item = outer.individual[var.label[1]]
            plan[item.name] = item.options[var.label[2]]
    return plan


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


def _cp_solve(outer: _Outer, arrays: _Arrays, hint: np.ndarray, budget: int, *, minimise_peak: bool,
              time_limit_s: float, workers: int, progress: Callable[[str], None],
              stop_at: int | None = None) -> tuple[str, np.ndarray, float, float, bool, float]:
    """Build and solve the outer model's CP-SAT: (status, assignment, objective, bound, peak mode,
    deterministic seconds spent)."""
    cp_model = _cp_model()
    model = cp_model.CpModel()
    n = len(outer.variables)
    y = [model.NewBoolVar(f"y{i}") for i in range(n)]
    for ids, exact in zip(outer.sets, outer.exactly_one):
        (model.AddExactlyOne if exact else model.AddAtMostOne)([y[i] for i in ids])
    for group in outer.conflicts:
        model.AddAtMostOne([y[i] for i in group])
    freed: dict[tuple[str, int], Any] = {}    # bytes a layer's plan frees in one of its patterns
    for (name, pattern), vector in outer.patterns.items():
        ids = outer.layer_vars[name]
        freed[name, pattern] = model.NewIntVar(0, int(vector.max(initial=0)), f"freed_{name}_{pattern}")
        model.Add(freed[name, pattern] == sum(int(c) * y[i] for c, i in zip(vector, ids) if c))
    limit = budget // outer.unit
    top_live = int(max(outer.const.max(initial=0), outer.matrix.max(initial=0))) + 1
    peak = model.NewIntVar(0, max(top_live, 1) * 2, "peak") if minimise_peak else None
    for r in range(len(outer.const)):
        row = outer.matrix[r]
        through_aux = {i for name, _ in outer.row_patterns[r] for i in outer.layer_vars[name]}
        terms = [int(row[i]) * y[i] for i in np.nonzero(row)[0] if i not in through_aux]
        lhs = int(outer.const[r]) + sum(terms) - sum(freed[key] for key in outer.row_patterns[r])
        model.Add(lhs <= (peak if peak is not None else limit))
    # Transfers: the copy stream's stall (Note [Reloads start at segment boundaries]).
    queue = outer.queue
    exposed: list[Any] = []
    aux: list[Any] = []
    if queue.rows.shape[0]:
        def load(row: int) -> Any:
            return sum(int(queue.rows[row, i]) * y[i] for i in np.nonzero(queue.rows[row])[0])

        stall, aux = queue.constrain(model, load, int(queue.rows.sum()) + 1)
        exposed.append(stall)
    tie = [round(TRANSFER_TIE_BREAK * 100 * (v.out_ns + v.in_ns)) for v in outer.variables]
    time_terms = sum(100 * v.cost_ns * y[i] for i, v in enumerate(outer.variables)) \
        + sum(100 * e for e in exposed) + sum(tie[i] * y[i] for i in range(n))
    if peak is not None:
        model.Minimize(peak)
    else:
        model.Minimize(time_terms)
    for i in range(n):
        model.AddHint(y[i], int(hint[i]))
    for (name, pattern), vector in outer.patterns.items():
        model.AddHint(freed[name, pattern], int(vector @ hint[outer.layer_vars[name]]))
    if aux:
        _, stall_hints, backlog_hints = queue.trace((queue.rows @ hint)[:, None])
        for var, value in zip(aux, [*stall_hints, backlog_hints[0]]):
            model.AddHint(var, int(round(float(value[0]))))
    if peak is not None:
        model.AddHint(peak, int(max(0, (outer.const + outer.matrix @ hint).max(initial=0))))

    unit, scale = ("B", 1.0 / outer.unit) if peak is not None else ("s", 100 * NS)
    reporter = _Progress(progress, unit, scale)

    class _Callback(cp_model.CpSolverSolutionCallback):  # type: ignore[name-defined]
        def on_solution_callback(self) -> None:
            reporter.report(self.ObjectiveValue(), self.BestObjectiveBound())
            if stop_at is not None and self.ObjectiveValue() <= stop_at:
                self.StopSearch()     # a plan within the budget is all this search is for

    solver, status, spent = _solve(model, workers, time_limit_s, _Callback())
    name = solver.StatusName(status)
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        chosen = np.array([int(solver.Value(v)) for v in y])
        objective, bound = solver.ObjectiveValue(), solver.BestObjectiveBound()
        reporter.report(objective, bound, force=True)
    else:
        chosen, objective, bound = hint, math.nan, math.nan
    return name, chosen, objective, bound, peak is not None, spent


def solve_schedule(problem: ScheduleProblem, budget: int, *, time_limit_s: float = 15.0,
                   workers: int | None = None, decompose: bool = True, minimise_peak: bool = False,
                   refine: bool = True, start_from: Mapping[str, Option] | None = None,
                   progress: Callable[[str], None] = lambda message: None) -> Solved:
    """Choose keep / recompute / offload per value to minimise the added time with the model's peak
    within ``budget`` bytes (``minimise_peak``: the lowest peak instead, for infeasible budgets).
    ``refine``: refine a decomposed model's plan several layers at a time (Note [Refining the decomposed
    plan]), for up to :data:`REFINE_SHARE` of ``time_limit_s`` more. ``start_from``: a plan to start
    from instead of the greedy one, when it meets the budget
    (monolithic models only: a decomposed model may not hold it)."""
    start = time.perf_counter()
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    outer = _build_outer(problem, budget if not minimise_peak else -1, workers, decompose, progress)
    arrays = _Arrays(outer, budget)
    given = None
    if start_from is not None and not minimise_peak and not outer.groups:
        given = _vector(outer, start_from)
        if (outer.const + outer.matrix @ given).max(initial=0) > budget // outer.unit:
            given = None
    if given is not None:
        hint, hint_feasible, hint_source = given, True, "given plan"
    else:
        greedy_s = min(10.0, time_limit_s / 2)
        hint, hint_feasible = _greedy(outer, budget, greedy_s) if not minimise_peak else (
            _greedy(outer, budget, greedy_s)[0], False)
        hint_source = "greedy"
    hint_cost = arrays.cost_of(hint)
    progress(f"CP-SAT: {len(outer.variables)} choices, {len(outer.const)} peak rows, {len(outer.groups)} "
             f"layers in {outer.classes} classes, {len(outer.individual)} other values; {hint_source} hint "
             f"{'meets' if hint_feasible else 'misses'} the budget ({hint_cost / NS:.6g} s); limit "
             f"{time_limit_s:g} s, {workers} workers")
    found = None
    if not minimise_peak and not hint_feasible:
        # Note [A feasible hint]: without one, CP-SAT can spend its whole limit looking for any plan.
        # Ask it for the lowest peak first, stopping at the first plan within the budget.
        progress("CP-SAT: looking for a plan within the budget first (lowest peak)")
        found = _cp_solve(outer, arrays, hint, budget, minimise_peak=True, time_limit_s=time_limit_s / 2,
                          workers=workers, progress=progress, stop_at=budget // outer.unit)
        y_found = found[1]
        if found[0] in ("OPTIMAL", "FEASIBLE") and \
                (outer.const + outer.matrix @ y_found).max(initial=0) <= budget // outer.unit:
            hint, hint_feasible, hint_cost = y_found, True, arrays.cost_of(y_found)
            hint_source = "lowest-peak search"
    refining = refine and bool(outer.groups) and not minimise_peak
    name, chosen, objective, bound, peak_mode, spent = _cp_solve(
        outer, arrays, hint, budget, minimise_peak=minimise_peak,
        time_limit_s=time_limit_s, workers=workers, progress=progress)
    n = len(outer.variables)
    if hint_feasible and not peak_mode and (name not in ("OPTIMAL", "FEASIBLE")
                                            or arrays.cost_of(chosen) > hint_cost):
        chosen = hint                 # never worse than the plan it started from
    seconds = time.perf_counter() - start
    if not peak_mode and name in ("OPTIMAL", "FEASIBLE"):
        objective_s: float | None = objective / (100 * NS)
        bound_s: float | None = max(0.0, bound) / (100 * NS)   # every term is >= 0
    else:
        objective_s = bound_s = None
    gap = None
    if objective_s is not None and bound_s is not None:
        gap = (objective_s - bound_s) / objective_s if objective_s > 0 else 0.0
    stats = SolveStats(name, objective_s, bound_s, gap, hint_cost / NS if hint_feasible else None, seconds,
                       len(outer.groups), outer.classes,
                       sum(len(p) for p in outer.points.values()), n, len(outer.const),
                       "peak" if peak_mode else "time", hint_source,
                       deterministic_s=spent + (found[5] if found is not None else 0.0))
    progress(f"CP-SAT {name.lower()} in {seconds:.1f} s" + (
        f": added time {objective_s:.6g} s, bound {bound_s:.6g} s, gap {gap:.1%}"
        if objective_s is not None and gap is not None and bound_s is not None else ""))
    plan = unrefined = _plan_of(outer, chosen.tolist())
    if refining and not peak_mode and name in ("OPTIMAL", "FEASIBLE"):
        plan, refined_s = _refine(problem, budget, plan, time_limit_s=time_limit_s * REFINE_SHARE,
                                  workers=workers, progress=progress, added_s=objective_s or 0.0)
        stats = dataclasses.replace(stats, seconds=time.perf_counter() - start, refined_s=refined_s)
    return Solved(plan, _plan_of(outer, hint.tolist()), hint_feasible, stats,
                  unrefined if plan != unrefined else None)


def _vector(outer: _Outer, plan: Mapping[str, Option]) -> np.ndarray:
    """A monolithic outer model's assignment for ``plan``."""
    return np.array([int(plan.get(outer.individual[v.label[1]].name) == outer.individual[v.label[1]].options[v.label[2]])
                     for v in outer.variables])


def _refine(problem: ScheduleProblem, budget: int, plan: dict[str, Option], *, time_limit_s: float,
            workers: int, progress: Callable[[str], None], added_s: float = 0.0,
            ) -> tuple[dict[str, Option], float]:
    """Note [Refining the decomposed plan]
    The outer model chooses each layer's plan from its class's front: a few dozen plans per layer, so
    the plans it reaches are coarse, and alike across the layers of a class. The best plans are not: on
    GPT-2 XL at PyTorch's knapsack-0.5 peak (48 layers, offload allowed) the monolithic model (4,815
    choices, minutes to solve) found plans with 29 different layer plans, where the outer model's best
    had 5, and 12% cheaper. So the outer model's plan is refined several layers at a time
    (:data:`REFINE_LAYERS`, with the values outside layers): their values are decided again in a
    monolithic model with every other choice fixed; the offloads outside the block stay in that model
    with their one option (the copy stream is shared), choices that would clash with a fixed choice
    (Note [Freed windows]: a recomputation reading a value away at that time, or reading through
    another alias a value offloaded or compressed) are left out, and the step starts from the current
    plan, so it never makes the plan worse. A step may add or move offloads: its copy stream is the
    runtime's (Note [Reloads start at segment boundaries]). The passes stop when one takes off less than
    :data:`REFINE_MIN_GAIN` of ``added_s`` (the plan's added time), or when the steps have spent
    ``time_limit_s`` of CP-SAT's deterministic time (a share of the solve's limit, :data:`REFINE_SHARE`,
    on top of it: the outer model needs its whole limit). Deterministic, so that the plan does not
    depend on the machine's load (Note [Deterministic solves]).
    """
    started = time.perf_counter()
    spent = 0.0                    # CP-SAT's deterministic seconds, over the steps
    order: dict[str, int] = {}
    for item in problem.items:
        if item.group is not None:
            order[item.group] = min(order.get(item.group, item.made), item.made)
    layers = sorted(order, key=order.__getitem__)
    conflicts = dataclasses.replace(problem, alias_conflicts=True, memo={}).conflicts()
    gained = 0.0                   # seconds of added time the steps took off, in their models
    changes = 0                    # steps that changed the plan so far
    seen: dict[int, int] = {}      # block -> changes when it was last decided
    for round_ in range(REFINE_ROUNDS):
        gained_before = gained
        for first in range(0, len(layers), REFINE_LAYERS):
            if seen.get(first) == changes:
                continue           # nothing changed since it was last decided: the same model
            if spent >= time_limit_s:
                progress(f"refining: stopped at the time limit, in pass {round_ + 1} at layer {first} of "
                         f"{len(layers)}")
                break
            plan, step, seconds = _refine_step(problem, budget, plan, set(layers[first:first + REFINE_LAYERS]),
                                               conflicts, workers, min(REFINE_STEP_S, time_limit_s - spent))
            gained += step
            spent += seconds
            changes += step > 0
            seen[first] = changes
        progress(f"refining: pass {round_ + 1} took off {gained - gained_before:.6g} s")
        if gained - gained_before <= REFINE_MIN_GAIN * added_s or spent >= time_limit_s:
            break
    progress(f"refined {REFINE_LAYERS} layers at a time: {gained:.6g} s less added time "
             f"({time.perf_counter() - started:.1f} s; {spent:.1f} s of CP-SAT's deterministic time)")
    return plan, gained


def _refine_step(problem: ScheduleProblem, budget: int, plan: dict[str, Option], block: set[str],
                 conflicts: Sequence[tuple[str, Option, str, Option]], workers: int,
                 seconds: float = REFINE_STEP_S) -> tuple[dict[str, Option], float, float]:
    """One step of Note [Refining the decomposed plan]: the values of the layers in ``block`` and those
    outside layers decided again, everything else fixed, in at most ``seconds`` of CP-SAT's deterministic
    time. Returns the plan, the added time it took off and the deterministic time it spent."""
    free = {item.name for item in problem.items if item.group in block or item.group is None}
    fixed = {name: option for name, option in plan.items() if name not in free}
    shared = {name for name, option in fixed.items() if option.kind == OFFLOAD}
    banned = {(w, a) for w, a, u, b in conflicts if w in free and fixed.get(u) == b} \
        | {(u, b) for w, a, u, b in conflicts if u in free and fixed.get(w) == a}
    items = [dataclasses.replace(item, options=tuple(o for o in item.options if (item.name, o) not in banned))
             if item.name in free else dataclasses.replace(item, options=(fixed[item.name],))
             for item in problem.items if item.name in free or item.name in shared]
    held = {name: option for name, option in fixed.items() if name not in shared}
    sub = dataclasses.replace(problem, items=items, memo={}, base=problem.live_bytes(held), alias_conflicts=True)
    current = {name: option for name, option in plan.items() if name in free or name in shared}
    solved = solve_schedule(sub, budget, time_limit_s=seconds, workers=workers, decompose=False,
                            refine=False, start_from=current)
    # The step's model holds every cost the block and the copy stream add (the fixed values'
    # recomputation is a constant), and its answer is never dearer than the plan it started from; when
    # the current plan does not fit that model (it should), the block is left as it is. A gain under a
    # nanosecond is rounding (the two costs are summed differently), not a better plan.
    objective, hint = solved.stats.objective_s, solved.stats.hint_objective_s
    candidate = {**held, **solved.plan}
    if solved.stats.hint_source != "given plan" or objective is None or hint is None or objective > hint - 1e-9 \
            or problem.peak_bytes(candidate) > budget:
        return plan, 0.0, solved.stats.deterministic_s
    return candidate, hint - objective, solved.stats.deterministic_s
