"""The outer model: one plan per repeated layer (from its front) and one choice per other value, its peak
rows, the copy stream's rows, and a greedy solution of it (the solver's warm start).

Steps 2 and 3 of Note [Layer classes and fronts] (:mod:`memopt.schedule.cpsat`), as plain arrays: the
CP-SAT model is built from them in :func:`memopt.schedule.cpsat.solve_schedule`, the greedy evaluates
them with numpy.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from memopt.schedule.fronts import Point, layer_front, layer_signature, point_of
from memopt.schedule.model import Item, Option, ScheduleProblem
from memopt.schedule.streams import NS, Copy, CopyQueue

TRANSFER_TIE_BREAK = 0.01      # cost per second of transfer volume, so unneeded offloads are not chosen
MIN_LAYERS_TO_DECOMPOSE = 4


@dataclasses.dataclass
class Variable:
    set_id: int                 # the one-hot set it belongs to (a layer, or one value)
    label: tuple[Any, ...]      # ("layer", group, point index) or ("value", item index, option index)
    cost_ns: int                # recompute time
    out_ns: int
    in_ns: int
    copies: tuple[Copy, ...]    # what it puts on the copy stream


@dataclasses.dataclass
class Outer:
    """The outer model as plain arrays: rows ``const + A @ y <= budget``."""

    variables: list[Variable]
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
    points: dict[str, list[Point]]       # layer -> the plans it may choose
    individual: list[Item]
    classes: int
    conflicts: list[list[int]]            # at most one of each list (choices in different sets)


def build_outer(problem: ScheduleProblem, budget: int, workers: int, decompose: bool,
                 progress: Callable[[str], None]) -> Outer:
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
        classes.setdefault(layer_signature(items), []).append(name)
    all_conflicts = problem.conflicts()
    points: dict[str, list[Point]] = {}
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
            problem.memo[key] = layer_front(problem, representative, local, external, workers)
        front: list[Point] = problem.memo[key]  # type: ignore[assignment]
        for name in members:
            points[name] = [point_of(groups[name], p.choices) for p in front]
        progress(f"layer class {members[0]} (x{len(members)}): {len(front)} plans on its front "
                 f"({time.perf_counter() - start:.1f} s)")

    unit = 1 << max(0, max(problem.base, default=0).bit_length() - 40)
    variables: list[Variable] = []
    sets: list[list[int]] = []
    exactly_one: list[bool] = []
    layer_vars: dict[str, list[int]] = {}
    for name, items in groups.items():
        ids = []
        for k, point in enumerate(points[name]):
            ids.append(len(variables))
            copies = tuple(c for item, j in zip(items, point.choices) if j >= 0
                           and (c := problem.copy_of(item, item.options[j])) is not None)
            variables.append(Variable(len(sets), ("layer", name, k), point.recompute_ns, point.out_ns,
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
            variables.append(Variable(len(sets), ("value", index, j), round(option.time_s * NS),
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

    return Outer(variables, exactly_one, sets, np.array(const, dtype=np.int64),
                  np.array(matrix, dtype=np.int64).reshape(len(const), n), layer_vars, patterns,
                  row_patterns, queue, unit, groups, points, individual, len(classes),
                  conflicts)


class Arrays:
    """The outer model's costs and rows as arrays, with a zero column ``n`` standing for "keep"."""

    def __init__(self, outer: Outer, budget: int) -> None:
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


def greedy_hint(outer: Outer, budget: int, deadline_s: float = 10.0) -> tuple[np.ndarray, bool]:
    """A complete assignment of the outer model: repeatedly take the move (one layer's plan or one
    value's choice changed) with the least added time per unit of budget violation removed; once the
    budget is met, take the moves that save the most time and keep it met. Stops after
    ``deadline_s`` seconds with what it has (the solver goes on from there)."""
    arrays = Arrays(outer, budget)
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


def plan_of(outer: Outer, y: Sequence[int]) -> dict[str, Option]:
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


def assignment_of(outer: Outer, plan: Mapping[str, Option]) -> np.ndarray:
    """A monolithic outer model's assignment for ``plan``."""
    return np.array([int(plan.get(outer.individual[v.label[1]].name) == outer.individual[v.label[1]].options[v.label[2]])
                     for v in outer.variables])
