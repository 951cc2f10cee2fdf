"""Running CP-SAT: deterministic solves, and a probe that keeps a crash of its interleaved search away.

OR-Tools is imported here and nowhere else (:func:`ortools`); the models are built by
:mod:`memopt.schedule.fronts`, :mod:`memopt.schedule.outer`, :mod:`memopt.schedule.refine` and
:mod:`memopt.schedule.cpsat`.
"""

from __future__ import annotations

from typing import Any

from memopt.errors import MemoptError


def ortools() -> Any:
    try:
        from ortools.sat.python import cp_model
    except ImportError as err:  # pragma: no cover - ortools is a dependency
        raise MemoptError("the memory scheduler needs OR-Tools: pip install ortools") from err
    return cp_model


def deterministic(solver: Any, workers: int, seconds: float) -> None:
    """Note [Deterministic solves]: the same graph and options must give the same plan, run after run,
    whatever else loads the machine. CP-SAT's parallel portfolio and its wall-clock limit are not
    reproducible; its interleaved search with a deterministic time limit is (the wall-clock limit stays,
    at ten times that, as a guard far enough that a loaded machine does not reach it first)."""
    solver.parameters.num_workers = workers
    solver.parameters.interleave_search = True
    solver.parameters.max_deterministic_time = float(seconds)
    solver.parameters.max_time_in_seconds = 10.0 * float(seconds)
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


def solve(model: Any, workers: int, seconds: float, callback: Any = None) -> tuple[Any, int, float]:
    """(solver, status, deterministic seconds spent) of ``model``: the probe of Note [A crash in CP-SAT's
    interleaved search], then, when it settles nothing, the deterministic interleaved search with
    ``workers``."""
    cp_model = ortools()
    probe = cp_model.CpSolver()
    deterministic(probe, 1, min(PROBE_MAX_S, PROBE_SHARE * seconds))
    probe.parameters.interleave_search = False
    status = probe.Solve(model, callback) if callback is not None else probe.Solve(model)
    spent = float(probe.response_proto.deterministic_time)
    if status in (cp_model.INFEASIBLE, cp_model.MODEL_INVALID, cp_model.OPTIMAL):
        return probe, status, spent
    solver = cp_model.CpSolver()
    deterministic(solver, workers, seconds)
    status = solver.Solve(model, callback) if callback is not None else solver.Solve(model)
    return solver, status, spent + float(solver.response_proto.deterministic_time)
