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
    """One boolean of the outer model: a layer's plan (``layer``, and ``choice`` its front point) or one
    value's option (``item`` its index in :attr:`Outer.individual`, ``choice`` the option's index)."""

    set_id: int                 # the one-hot set it belongs to (a layer, or one value)
    cost_ns: int                # recompute time
    out_ns: int
    in_ns: int
    copies: tuple[Copy, ...]    # what it puts on the copy stream
    choice: int
    layer: str | None = None
    item: int = -1


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

    def option_of(self, variable: Variable) -> tuple[Item, Option]:
        """The value and option a value's variable stands for."""
        item = self.individual[variable.item]
        return item, item.options[variable.choice]


def build_outer(problem: ScheduleProblem, budget: int, workers: int, decompose: bool,
                progress: Callable[[str], None]) -> Outer:
    """The outer model of ``problem`` for ``budget`` (Note [Layer classes and fronts]): the layers'
    fronts, the variables, the peak rows over the events that could exceed the budget, the copy stream's
    rows and the conflicts between choices."""
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
    conflicts = problem.conflicts()
    points, classes = _fronts(problem, groups, conflicts, workers, progress)
    unit = 1 << max(0, max(problem.base, default=0).bit_length() - 40)
    def queue(copies: list[tuple[Copy, ...]]) -> CopyQueue:
        return CopyQueue(problem.compute_s, problem.forward_end, problem.segment_starts, copies)

    outer = Outer([], [], [], np.zeros(0, np.int64), np.zeros((0, 0), np.int64), {}, {}, [], queue([]), unit,
                  groups, points, individual, classes, [])
    _variables(outer, problem)
    _peak_rows(outer, problem, budget)
    outer.queue = queue([v.copies for v in outer.variables])
    outer.conflicts = _conflicts(outer, conflicts)
    return outer


def _fronts(problem: ScheduleProblem, groups: dict[str, list[Item]], conflicts: list[tuple[str, Option, str, Option]],
            workers: int, progress: Callable[[str], None]) -> tuple[dict[str, list[Point]], int]:
    """Each layer's plans: the front of one layer of its class (kept in ``problem.memo`` between
    solves), as that layer's items; and the number of classes."""
    classes: dict[tuple[Any, ...], list[str]] = {}
    for name, items in groups.items():
        classes.setdefault(layer_signature(items), []).append(name)
    points: dict[str, list[Point]] = {}
    for members in classes.values():
        start = time.perf_counter()
        representative = groups[members[len(members) // 2]]
        position = {item.name: i for i, item in enumerate(representative)}
        local = [(position[w], representative[position[w]].options.index(a),
                  position[u], representative[position[u]].options.index(b))
                 for w, a, u, b in conflicts if w in position and u in position]
        external = frozenset((position[v], representative[position[v]].options.index(o))
                             for w, a, u, b in conflicts if (w in position) != (u in position)
                             for v, o in ((w, a), (u, b)) if v in position)
        key = ("front", tuple(item.name for item in representative))
        if key not in problem.memo:
            problem.memo[key] = layer_front(problem, representative, local, external, workers)
        front: list[Point] = problem.memo[key]  # type: ignore[assignment]
        for name in members:
            points[name] = [point_of(groups[name], p.choices) for p in front]
        progress(f"layer class {members[0]} (x{len(members)}): {len(front)} plans on its front "
                 f"({time.perf_counter() - start:.1f} s)")
    return points, len(classes)


def _variables(outer: Outer, problem: ScheduleProblem) -> None:
    """One variable per layer plan (exactly one a layer) and per value option (at most one a value)."""
    variables = outer.variables
    for name, items in outer.groups.items():
        ids = []
        for k, point in enumerate(outer.points[name]):
            ids.append(len(variables))
            copies = tuple(c for item, j in zip(items, point.choices) if j >= 0
                           and (c := problem.copy_of(item, item.options[j])) is not None)
            variables.append(Variable(len(outer.sets), point.recompute_ns, point.out_ns, point.in_ns, copies,
                                      choice=k, layer=name))
        outer.layer_vars[name] = ids
        outer.sets.append(ids)
        outer.exactly_one.append(True)
    for index, item in enumerate(outer.individual):
        ids = []
        for j, option in enumerate(item.options):
            ids.append(len(variables))
            copy = problem.copy_of(item, option)
            variables.append(Variable(len(outer.sets), round(option.time_s * NS), round(option.out_s * NS),
                                      round(option.in_s * NS), (copy,) if copy is not None else (),
                                      choice=j, item=index))
        outer.sets.append(ids)
        outer.exactly_one.append(False)


def _layer_patterns(outer: Outer, name: str, over: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """For layer ``name``: its pattern of windows at each event of ``over`` (-1: none covers it), and the
    bytes each plan frees per pattern; records the patterns (in units) on ``outer``."""
    items = outer.groups[name]
    choices = np.array([p.choices for p in outer.points[name]], dtype=np.int64).reshape(-1, len(items))
    cuts = sorted({t for item in items for o in item.options for t in (o.start + 1, o.end)})
    vectors: dict[bytes, int] = {}
    table: list[np.ndarray] = []
    segment_pattern = []
    for cut in cuts:
        freed = np.zeros(len(outer.points[name]), dtype=np.int64)
        for i, item in enumerate(items):
            for j, o in enumerate(item.options):
                if o.start < cut < o.end:
                    freed += np.where(choices[:, i] == j, item.freed_by(o), 0)
        vectors.setdefault(freed.tobytes(), len(vectors))
        if len(table) < len(vectors):
            table.append(freed)
        segment_pattern.append(vectors[freed.tobytes()])
    segment = np.searchsorted(np.array(cuts), over, side="right") - 1
    at = np.where(segment >= 0, np.array(segment_pattern + [0])[np.maximum(segment, 0)], -1)
    empty = np.array([not vector.any() for vector in table] + [True])    # index -1: before any cut
    for index, vector in enumerate(table):
        outer.patterns[name, index] = vector // outer.unit
    return np.where(empty[at], -1, at), table


def _peak_rows(outer: Outer, problem: ScheduleProblem, budget: int) -> None:
    """Rows (Note [Layer classes and fronts]): the events that could exceed the budget, grouped by the
    layer the event runs in (its plan decides a constant per plan), the other layers' freeing patterns
    and the other values' active choices; each row is its group's worst event."""
    over = np.array([t for t, base in enumerate(problem.base) if base > budget], dtype=np.int64)
    names = list(outer.groups)
    found = {name: _layer_patterns(outer, name, over) for name in names}
    column = {name: i for i, name in enumerate(names)}
    owners = np.array([column.get(problem.point_group[t], -1) for t in over.tolist()], dtype=np.int64)
    layer_patterns = np.stack([found[g][0] for g in names], axis=1) if names else \
        np.zeros((len(over), 0), dtype=np.int64)
    owner_pattern = np.where(owners >= 0, layer_patterns[np.arange(len(over)), np.maximum(owners, 0)]
                             if names else -1, -1)
    others_key = layer_patterns.copy()
    if names:
        others_key[np.arange(len(over))[owners >= 0], owners[owners >= 0]] = -2   # the owner: per plan
    value_vars = [v for v, var in enumerate(outer.variables) if var.layer is None]
    active = np.array([[outer.option_of(outer.variables[v])[1].start < t < outer.option_of(outer.variables[v])[1].end
                        for v in value_vars] for t in over.tolist()], dtype=np.int64).reshape(len(over), len(value_vars))
    keys = np.concatenate([owners[:, None], others_key, active], axis=1)
    unique, inverse = np.unique(keys, axis=0, return_inverse=True) if len(over) else (keys, keys[:, 0])
    inverse = np.asarray(inverse).reshape(-1)
    const, matrix = [], []
    for k, key_row in enumerate(unique):
        in_row = np.nonzero(inverse == k)[0]
        owner = names[int(key_row[0])] if key_row[0] >= 0 else None
        others = [(g, int(key_row[1 + i])) for i, g in enumerate(names) if key_row[1 + i] >= 0]
        row = np.zeros(len(outer.variables), dtype=np.int64)
        if owner is None:
            const.append(-(-int(np.array(problem.base)[over[in_row]].max()) // outer.unit))
        else:
            const.append(0)
            worst = np.full(len(outer.points[owner]), np.iinfo(np.int64).min // 2, dtype=np.int64)
            for t, pattern in zip(over[in_row].tolist(), owner_pattern[in_row].tolist()):
                worst = np.maximum(worst, problem.base[t] - (found[owner][1][pattern] if pattern >= 0 else 0))
            row[outer.layer_vars[owner]] = -(-worst // outer.unit)
        for g, pattern in others:
            row[outer.layer_vars[g]] -= outer.patterns[g, pattern]
        for v, on in zip(value_vars, key_row[1 + len(names):]):
            if on:
                item, option = outer.option_of(outer.variables[v])
                row[v] -= item.freed_by(option) // outer.unit
        matrix.append(row)
        outer.row_patterns.append(others)
    outer.const = np.array(const, dtype=np.int64)
    outer.matrix = np.array(matrix, dtype=np.int64).reshape(len(const), len(outer.variables))


def _conflicts(outer: Outer, conflicts: list[tuple[str, Option, str, Option]]) -> list[list[int]]:
    """Choices in different sets that exclude each other (Note [Freed windows] in model.py): at most one
    of each list."""
    holders: dict[tuple[str, Any], list[int]] = {}
    for v, var in enumerate(outer.variables):
        if var.layer is not None:
            for item, choice in zip(outer.groups[var.layer], outer.points[var.layer][var.choice].choices):
                if choice >= 0:
                    holders.setdefault((item.name, item.options[choice]), []).append(v)
        else:
            item, option = outer.option_of(var)
            holders.setdefault((item.name, option), []).append(v)
    found = []
    for w, a, u, b in conflicts:
        left, right = holders.get((w, a), []), holders.get((u, b), [])
        if left and right and outer.variables[left[0]].set_id != outer.variables[right[0]].set_id:
            found.append(sorted(set(left) | set(right)))
    return [list(c) for c in dict.fromkeys(tuple(c) for c in found)]


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


class _Moves:
    """The greedy's state: one chosen variable per set (``n``: keep), and every move (a set's choice
    changed to another variable) priced at once with numpy."""

    def __init__(self, outer: Outer, arrays: Arrays) -> None:
        self.outer, self.arrays, n = outer, arrays, arrays.n
        self.choice = [min(ids, key=lambda v: (outer.variables[v].cost_ns + outer.variables[v].out_ns, v))
                       if exact else n for ids, exact in zip(outer.sets, outer.exactly_one)]
        moves = [(s, target) for s, (ids, exact) in enumerate(zip(outer.sets, outer.exactly_one))
                 for target in [*ids] + ([] if exact else [n])]
        self.owners = [s for s, _ in moves]
        self.news = np.array([t for _, t in moves], dtype=np.int64)
        self.clash = np.zeros((n + 1, n + 1), dtype=np.int64)
        for group in outer.conflicts:
            for i in group:
                for j in group:
                    if i != j:
                        self.clash[i, j] = 1

    def state(self) -> np.ndarray:
        y = np.zeros(self.arrays.n + 1, dtype=np.int64)
        y[self.choice] = 1
        y[self.arrays.n] = 0
        return y

    def evaluate(self) -> tuple[np.ndarray, np.ndarray, float, int]:
        """(per move: the budget violation after it, or max int when it is not allowed; its cost), the
        current cost and the current violation."""
        arrays, y = self.arrays, self.state()
        olds = np.array([self.choice[s] for s in self.owners], dtype=np.int64)
        lhs = arrays.const + arrays.matrix @ y
        over = np.maximum(0, lhs - arrays.limit)
        delta = arrays.matrix[:, self.news] - arrays.matrix[:, olds]
        new_over = np.maximum(0, lhs[:, None] + delta - arrays.limit).sum(0)
        load = arrays.copy_rows @ y
        moved = load[:, None] + arrays.copy_rows[:, self.news] - arrays.copy_rows[:, olds]
        base_cost = float(arrays.cost @ y + arrays.exposed(load[:, None])[0])
        new_cost = arrays.cost @ y + arrays.cost[self.news] - arrays.cost[olds] + arrays.exposed(moved)
        allowed = (self.clash[self.news] @ y == 0) & (self.news != olds)
        return np.where(allowed, new_over, np.iinfo(np.int64).max), new_cost, base_cost, int(over.sum())

    def take(self, move: int) -> None:
        self.choice[self.owners[move]] = int(self.news[move])

    def start_uniform(self) -> None:
        """Start from the best uniform plan (every layer of a class the same front point, the usual
        "checkpoint every layer" shape) when it is closer to the budget than keeping everything."""
        outer, n = self.outer, self.arrays.n
        layer_sets = [s for s, exact in enumerate(outer.exactly_one) if exact]
        widest = max((len(outer.sets[s]) for s in layer_sets), default=0)
        best = (self.evaluate()[3], self.arrays.cost_of(self.state()[:n]), list(self.choice))
        for k in range(widest):
            saved, trial = list(self.choice), list(self.choice)
            for s in layer_sets:
                trial[s] = outer.sets[s][min(k, len(outer.sets[s]) - 1)]
            self.choice[:] = trial
            y = self.state()
            key = (self.evaluate()[3], self.arrays.cost_of(y[:n]), trial)
            clashes = int(y @ self.clash @ y)
            self.choice[:] = saved
            if not clashes and key[:2] < best[:2]:
                best = key
        self.choice[:] = best[2]


def greedy_hint(outer: Outer, budget: int, deadline_s: float = 10.0) -> tuple[np.ndarray, bool]:
    """A complete assignment of the outer model: repeatedly take the move (one layer's plan or one
    value's choice changed) with the least added time per unit of budget violation removed; once the
    budget is met, take the moves that save the most time and keep it met. Stops after
    ``deadline_s`` seconds with what it has (the solver goes on from there)."""
    moves = _Moves(outer, Arrays(outer, budget))
    moves.start_uniform()
    deadline = time.perf_counter() + deadline_s
    for _ in range(4 * len(outer.sets) + 10):
        new_over, new_cost, base_cost, over = moves.evaluate()
        if over == 0 or time.perf_counter() > deadline:
            break
        reduced = over - new_over
        useful = reduced > 0
        if not useful.any():
            break
        score = np.where(useful, (new_cost - base_cost) / np.maximum(reduced, 1), np.inf)
        moves.take(int(np.lexsort((-reduced, score))[0]))
    new_over, new_cost, base_cost, over = moves.evaluate()
    feasible = over == 0
    while feasible and len(moves.news) and time.perf_counter() < deadline:
        saving = np.where(new_over == 0, base_cost - new_cost, 0.0)
        best = int(np.argmax(saving))
        if saving[best] <= 1e-9:
            break
        moves.take(best)
        new_over, new_cost, base_cost, over = moves.evaluate()
    return moves.state()[:moves.arrays.n], feasible


def plan_of(outer: Outer, y: Sequence[int]) -> dict[str, Option]:
    plan: dict[str, Option] = {}
    for var, on in zip(outer.variables, y):
        if not on:
            continue
        if var.layer is not None:
            for item, choice in zip(outer.groups[var.layer], outer.points[var.layer][var.choice].choices):
                if choice >= 0:
                    plan[item.name] = item.options[choice]
        else:
            item, option = outer.option_of(var)
            plan[item.name] = option
    return plan


def assignment_of(outer: Outer, plan: Mapping[str, Option]) -> np.ndarray:
    """A monolithic outer model's assignment for ``plan``."""
    return np.array([int(plan.get(item.name) == option)
                     for item, option in (outer.option_of(v) for v in outer.variables)])
