"""Refining the outer model's plan several layers at a time (Note [Refining the decomposed plan])."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

from memopt.schedule.model import OFFLOAD, Option, ScheduleProblem

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


def refine_plan(problem: ScheduleProblem, budget: int, plan: dict[str, Option], *, time_limit_s: float,
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
    runtime's (Note [Reloads start at segment boundaries]). The passes alternate two kinds of blocks
    (:func:`layer_blocks`): adjacent layers, which see what neighbours share, then layers spread over the
    depth. The copy stream's window is the whole forward, and where it is full, giving one layer an
    offload means taking one from another, often far away (an early layer recomputes a cheap value it
    offloaded, so that a late one can offload instead of recomputing its softmax): only a block that
    holds both layers can make that trade. On GPT-2 XL at the knapsack-0.5 peak, with the time for a
    second pass (34 s of refinement against the default 11), its spread blocks took the plan from 3.160
    to 2.932 ms, the monolithic model's best after 906 s (CP-SAT's bound 2.897); spread blocks first
    reached only 3.026. The passes stop when two in a row (one of each kind) take off less than
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
    seen: dict[frozenset[str], int] = {}   # block -> changes when it was last decided
    quiet = 0                      # passes in a row that took off too little (one of each kind: stop)
    for round_ in range(REFINE_ROUNDS):
        gained_before = gained
        blocks = layer_blocks(layers, round_)
        for index, block in enumerate(blocks):
            if seen.get(frozenset(block)) == changes:
                continue           # nothing changed since it was last decided: the same model
            if spent >= time_limit_s:
                progress(f"refining: stopped at the time limit, in pass {round_ + 1} at block {index + 1} of "
                         f"{len(blocks)}")
                break
            plan, step, seconds = refine_step(problem, budget, plan, block, conflicts, workers,
                                               min(REFINE_STEP_S, time_limit_s - spent))
            gained += step
            spent += seconds
            changes += step > 0
            seen[frozenset(block)] = changes
        progress(f"refining: pass {round_ + 1} took off {gained - gained_before:.6g} s")
        quiet = quiet + 1 if gained - gained_before <= REFINE_MIN_GAIN * added_s else 0
        if quiet == 2 or spent >= time_limit_s:
            break
    progress(f"refined {REFINE_LAYERS} layers at a time: {gained:.6g} s less added time "
             f"({time.perf_counter() - started:.1f} s; {spent:.1f} s of CP-SAT's deterministic time)")
    return plan, gained


def layer_blocks(layers: Sequence[str], round_: int) -> list[set[str]]:
    """The blocks of :data:`REFINE_LAYERS` layers that pass ``round_`` decides again, one after another:
    runs of adjacent layers in even passes, layers spread over the depth (layer k in block k mod the
    number of blocks) in odd ones."""
    count = -(-len(layers) // REFINE_LAYERS)
    if round_ % 2 == 0:
        return [set(layers[k * REFINE_LAYERS:(k + 1) * REFINE_LAYERS]) for k in range(count)]
    return [set(layers[k::count]) for k in range(count)]


def refine_step(problem: ScheduleProblem, budget: int, plan: dict[str, Option], block: set[str],
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
    from memopt.schedule.cpsat import solve_schedule     # the step is a solve of its own

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
