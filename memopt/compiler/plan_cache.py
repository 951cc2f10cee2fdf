"""The plan cache: a budget's plan kept on disk, so that the next process that compiles the same graph
with the same options, profile and memopt realises it instead of searching for it again.

Note [The plan cache]
~~~~~~~~~~~~~~~~~~~~~
Searching a plan (:func:`memopt.schedule.search.search_plan`) partitions and simulates several plans and
runs CP-SAT; the answer depends only on what goes into the key, so it is kept:

- **Key**: a SHA-256 of the joint graph as the search sees it (each node's op, target, arguments, the
  shape, dtype and strides of its value, and a user's checkpoint tag), the options that can change a plan
  (all but dumps, verification and this cache's own), every field of the cost profile, the budget in
  bytes (which counts what other graphs of the step hold), and the versions of memopt (its version and a
  hash of its source files, so that an edited checkout misses too), torch and OR-Tools. A change in any
  of them misses.
- **Value**: one JSON file per key: the plan (node names), the knapsack share it is cut on, the budget in
  bytes, the peak and added time it verified at, and the search's record (method, attempts, solves) for
  the dumps and reports.
- **A hit is checked**: the plan is realised (one partition, besides the baseline's) and its simulated
  peak must equal the one recorded; otherwise the entry is stale, the search runs, and its answer
  replaces the entry.
- **Location**: ``<root>/plans/<key>.json``, the root being the ``plan_cache`` option when it is a path,
  else ``$MEMOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/memopt``, else ``~/.cache/memopt``. The folder is
  safe to delete at any time (the next compile searches again); ``plan_cache: False`` turns it off. An
  unreadable entry is a miss; a folder that cannot be written is reported once and the compile goes on.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx

from memopt.config import MemoptConfig
from memopt.cost_model.profile import COST_MODEL_VERSION, DeviceProfile, profile_to_json
from memopt.schedule.problem import DECISION_KEY, Plan, ScheduleResult

__all__ = ["CachedPlan", "PlanCache", "cache_root", "memopt_version", "stage_identity"]

FORMAT = 1
# Options that change what is dumped or checked, not what is planned.
_NOT_PLANNING = frozenset({"dump_dir", "dump_node_times", "verify", "strict", "plan_cache"})


def cache_root(option: bool | str = True) -> Path | None:
    """The cache's folder for the ``plan_cache`` option (None: off); see Note [The plan cache]."""
    if option is False:
        return None
    if isinstance(option, str):
        return Path(option).expanduser()
    if os.environ.get("MEMOPT_CACHE_DIR"):
        return Path(os.environ["MEMOPT_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "memopt"


@dataclasses.dataclass(frozen=True)
class CachedPlan:
    """One entry: the plan, the cut it is on, what it verified at, and the search's record."""

    plan: Plan
    share: float
    budget_bytes: int
    peak_bytes: int
    added_time_s: float
    feasible: bool
    method: str
    attempts: list[dict[str, Any]]
    solves: list[dict[str, Any]]

    @classmethod
    def of(cls, result: ScheduleResult) -> CachedPlan:
        chosen = result.chosen
        return cls(chosen.plan, chosen.share, result.budget_bytes, chosen.peak_bytes, chosen.added_time_s,
                   result.feasible, result.method, result.attempts, result.solves)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["plan"] = {field: sorted(names) for field, names in out["plan"].items()}
        return {"format": FORMAT, **out}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CachedPlan:
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
        fields = {f.name for f in dataclasses.fields(cls)}
        plan = Plan(**{field: frozenset(names) for field, names in data["plan"].items()})
        return cls(**{**{k: v for k, v in data.items() if k in fields}, "plan": plan})


class PlanCache:
    """Plans by key in one folder; every failure to read is a miss, every failure to write a warning."""

    def __init__(self, root: Path) -> None:
        self.folder = root / "plans"
        self._warned = False

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str) -> CachedPlan | None:
        try:
            return CachedPlan.from_json(json.loads(self.path(key).read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, entry: CachedPlan) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            # Written whole, then renamed: a reader never sees half a file.
            with tempfile.NamedTemporaryFile("w", dir=self.folder, suffix=".tmp", delete=False) as out:
                json.dump(entry.to_json(), out)
            os.replace(out.name, self.path(key))
        except OSError as err:
            if not self._warned:
                self._warned = True
                warnings.warn(f"memopt: cannot write the plan cache at {self.folder} ({err}); plans are "
                              "searched again in every process. Set options={'plan_cache': PATH} or "
                              "MEMOPT_CACHE_DIR to a writable folder, or plan_cache=False.", stacklevel=2)

    @staticmethod
    def key(gm: torch.fx.GraphModule, config: MemoptConfig, profile: DeviceProfile, question: str) -> str:
        """The entry's key (Note [The plan cache]); ``question``: what was asked of the graph (the budget
        in bytes, which holds what other graphs of the step hold)."""
        digest = hashlib.sha256()
        options = {k: v for k, v in config.to_dict().items() if k not in _NOT_PLANNING}
        for part in (_versions(), json.dumps(options, sort_keys=True, default=str),
                     profile_to_json(profile), question):
            digest.update(part.encode())
            digest.update(b"\0")
        for node in gm.graph.nodes:
            digest.update(_describe(node).encode())
        return digest.hexdigest()


def stage_identity(config: MemoptConfig, profile: DeviceProfile, passes: list[str], fused_costs: bool,
                   fusion_distance: int | None) -> str:
    """What of memopt decides a compiled step, beyond the graph (Note [Inductor's caches and the joint
    stage] in memopt/compiler/capture.py); ``fusion_distance``: the horizontal fusion limit Inductor
    compiles the graphs under (memopt.codegen.inductor), None for Inductor's own."""
    return json.dumps({"memopt": memopt_version(), "options": config.to_dict(), "profile": profile_to_json(profile),
                       "passes": passes, "fused_costs": fused_costs, "fusion_distance": fusion_distance,
                       "plan_cache": str(cache_root(config.plan_cache))}, sort_keys=True, default=str)


def _describe(node: torch.fx.Node) -> str:
    """What of a node can change a plan: op, target, arguments, value, and a user's checkpoint tag."""
    args = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: f"%{n.name}")
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        value = f"{tuple(val.shape)}:{val.dtype}:{tuple(val.stride())}:{val.requires_grad}"
    else:
        value = repr(val) if isinstance(val, (int, float, bool, type(None))) else type(val).__name__
    tag = node.meta.get("recompute") if DECISION_KEY not in node.meta else None
    return f"{node.op}|{node.name}|{node.target}|{args}|{value}|{tag}\n"


@functools.lru_cache(maxsize=1)
def memopt_version() -> str:
    """memopt's version and a hash of its source files, so that an edited checkout is another memopt."""
    import memopt

    package = Path(memopt.__file__).parent
    sources = hashlib.sha256()
    for path in sorted(package.rglob("*")):
        if path.suffix in (".py", ".json") and path.is_file():
            sources.update(str(path.relative_to(package)).encode())
            sources.update(path.read_bytes())
    return f"memopt {memopt.__version__} {sources.hexdigest()[:16]}"


@functools.lru_cache(maxsize=1)
def _versions() -> str:
    from importlib.metadata import version

    return (f"{memopt_version()} cost model {COST_MODEL_VERSION} torch {torch.__version__} "
            f"ortools {version('ortools')}")
