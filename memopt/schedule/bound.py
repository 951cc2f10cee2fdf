"""How little added time any plan of the solver's model can have: a lower bound, to judge a plan by.

Note [A lower bound on the added time]
Every plan of the model meets the budget at every event, and at an event ``t`` the values it frees there
(options whose window covers ``t``, Note [Freed windows]) must make up ``base[t] - budget``. Dropping
every constraint but that one, and letting each item be chosen in part, leaves a fractional knapsack:

- recomputing (or compressing) an item frees its bytes at its option's time, so the cheapest per byte
  go first;
- offloading adds no time, but the solver's model has every copy out done by the end of the backward's
  first segment (Note [A drained copy stream] in :mod:`memopt.schedule.streams`): the copies out of all
  offloads together fit in the compute up to there, so offloads free at most that many seconds of copy
  stream's worth of bytes. (Physically the same holds at a peak where the backward starts: a device
  buffer is free only once its copy to the host is done.)

An item may be counted both ways (offloaded and recomputed), which only lowers the bound. The bound is
the largest over the events where the baseline is over the budget (at most :data:`EVENTS` of them, the
highest first). It holds for every plan the CP-SAT model admits, so a plan within a few percent of it is
nearly the best that model has, and a target below it cannot be met without changing the model (the
graph, the cost profile, or what may be freed). The greedy hint, priced by the whole queue, may leave
copies out queued past that segment, and such a plan can go below the bound: the model frees a value
where its copy is issued, not where the copy is done.
"""

from __future__ import annotations

import numpy as np

from memopt.schedule.model import OFFLOAD, ScheduleProblem

EVENTS = 64


def added_time_bound_s(problem: ScheduleProblem, budget: int) -> float:
    """Seconds that every plan of ``problem`` meeting ``budget`` adds to the base cut's own at least
    (Note [A lower bound on the added time]); ``inf`` when no plan of it can meet the budget."""
    base = np.asarray(problem.base, dtype=np.float64)
    over = np.flatnonzero(base > budget)
    if not len(over):
        return 0.0
    events = over[np.argsort(-base[over], kind="stable")[:EVENTS]]
    options = _Options(problem)
    starts = problem.segment_starts
    window = float(np.sum(problem.compute_s[:starts[1]] if len(starts) > 1 else problem.compute_s))
    return max(options.bound_at(int(t), base[t] - budget, window) for t in events)


class _Options:
    """Every option of every item as arrays, one entry per option."""

    def __init__(self, problem: ScheduleProblem) -> None:
        rows = [(i, o) for i, item in enumerate(problem.items) for o in item.options]
        self.items = len(problem.items)
        self.item = np.array([i for i, _ in rows], dtype=np.int64)
        self.start, self.end = (np.array([getattr(o, f) for _, o in rows], dtype=np.int64) for f in ("start", "end"))
        self.freed = np.array([problem.items[i].freed_by(o) for i, o in rows], dtype=np.float64)
        self.cost = np.array([o.time_s for _, o in rows], dtype=np.float64)
        self.offload = np.array([o.kind == OFFLOAD for _, o in rows], dtype=bool)
        self.out_s = np.array([o.out_s for _, o in rows], dtype=np.float64)

    def bound_at(self, t: int, need: float, window: float) -> float:
        """The fractional knapsack at event ``t``: offloads first, up to ``window`` seconds of copies out,
        then the other options covering ``t`` by cost per byte."""
        item, freed, cost, offload, out_s = self.item, self.freed, self.cost, self.offload, self.out_s
        covers = (self.start < t) & (t < self.end)
        moved = covers & offload & (out_s > 0)
        # Per item, the copy out that frees the most bytes per second of copy stream.
        rate = np.zeros(self.items)
        np.maximum.at(rate, item[moved], freed[moved] / out_s[moved])
        copied = np.zeros(self.items)
        np.maximum.at(copied, item[covers & offload], freed[covers & offload])
        free_bytes = 0.0
        left = window
        for i in np.argsort(-rate, kind="stable"):
            if rate[i] <= 0 or left <= 0:
                break
            take = min(copied[i], left * rate[i])
            free_bytes += take
            left -= take / rate[i]
        free_bytes += float(np.sum(copied[rate == 0]))   # copies that take no time
        if free_bytes >= need:
            return 0.0
        priced = covers & ~offload & (freed > 0)
        per_byte = np.full(self.items, np.inf)
        np.minimum.at(per_byte, item[priced], cost[priced] / freed[priced])
        # Each byte at the item's cheapest rate, up to the most any of its options frees: never dearer
        # than any mix of its options.
        bytes_of = np.zeros(self.items)
        np.maximum.at(bytes_of, item[priced], freed[priced])
        total, short = 0.0, need - free_bytes
        for i in np.argsort(per_byte, kind="stable"):
            if short <= 0 or not np.isfinite(per_byte[i]):
                break
            take = min(bytes_of[i], short)
            total += take * per_byte[i]
            short -= take
        return total if short <= 0 else float("inf")
