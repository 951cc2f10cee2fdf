"""The scheduling problem: which saved activations to keep and which to recompute.

Pure: the annotated joint graph and a partition in, candidates out. A candidate is a value the forward
hands to the backward in the current partition, with its bytes and what recomputing it costs (its own
op time from the cost model, ``node.meta["memopt_cost"]``).

Note [Plans are realised through the partitioner's tags]
memopt does not partition on its own: a plan tags joint-graph nodes with ``CheckpointPolicy`` values,
which torch's min-cut partitioner honours (``MUST_RECOMPUTE``: an infinite edge to the sink, the node is
recomputed in the backward; ``MUST_SAVE``: banned from recompute). The partitioner then makes the rest
of the cut consistent (if a recomputed node's input is neither saved nor recomputable, it saves it), and
the simulator measures the result exactly. A plan is judged by that measurement, never by the sum of the
bytes it hoped to free.

Note [Towards the CP-SAT model]
The CP-SAT scheduler builds on these candidates: :mod:`memopt.schedule.model` turns the baseline
partition into a linear model (Note [Freed windows]), :mod:`memopt.schedule.cpsat` solves it by layer
classes, and :mod:`memopt.schedule.search` verifies what it returns by one partition and one exact
simulation per plan. The partition-verified greedy (:mod:`memopt.schedule.greedy`) remains a last
resort on small graphs.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
import torch.fx
from torch.utils.checkpoint import CheckpointPolicy

from memopt.cost_model.bytes import storage_nbytes
from memopt.passes.base import call_argument
from memopt.schedule.simulate import MemoryTimeline, backward_nodes, storage_root

HELD = "returned by the forward as well: the caller holds it through the backward"
# The meta key memopt writes its decision into, beside torch's own "recompute" tag, so that memopt's
# tags can be told apart from (and never overwrite) a user's selective-checkpointing tags.
DECISION_KEY = "memopt_schedule"


@dataclasses.dataclass(frozen=True)
class Candidate:
    name: str                   # the joint-graph node the backward reads
    nbytes: int                 # bytes of its storage
    recompute_time_s: float     # predicted time of recomputing it once (its own op)
    recomputable: bool
    why_not: str | None = None  # why it cannot be recomputed, when it cannot
    offload_time_s: float = float("inf")   # predicted host-device time, out and back (inf: not allowed)
    held: bool = False          # the forward returns it too: alive whatever the plan (nothing to free)

    def choice(self) -> tuple[str, float] | None:
        """The cheaper way to free this value, with its predicted cost; None if there is none."""
        options = [("offload", self.offload_time_s)] if self.offload_time_s != float("inf") else []
        if self.recomputable:
            options.append(("recompute", self.recompute_time_s))
        return min(options, key=lambda o: (o[1], o[0])) if options else None

    @property
    def cost_per_byte(self) -> float:
        chosen = self.choice()
        return (chosen[1] if chosen else float("inf")) / max(self.nbytes, 1)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a schedule does with the saved values: the joint-graph nodes to recompute in the backward,
    the saved values to offload to the host and to store compressed. An offloaded value is reloaded one
    segment ahead of its first use, or where that use's segment starts when ``reload_in_segment`` names it
    (Note [Reloads start at segment boundaries] in :mod:`memopt.schedule.streams`)."""

    recompute: frozenset[str] = frozenset()
    offload: frozenset[str] = frozenset()
    compress: frozenset[str] = frozenset()
    reload_in_segment: frozenset[str] = frozenset()


NOTHING = Plan()


@dataclasses.dataclass
class Evaluation:
    """A plan as realised (partitioned, rewritten) and simulated."""

    plan: Plan                           # as realised: offloads and compression of values this cut saves
    timeline: MemoryTimeline
    candidates: list[Candidate]          # the values this partition saves (next round's choices)
    added_time_s: float                  # predicted recompute + exposed transfer + compression time
    forward: torch.fx.GraphModule
    backward: torch.fx.GraphModule
    share: float = 1.0                   # < 1: on torch's knapsack cut at that share of the saved bytes

    @property
    def peak_bytes(self) -> int:
        return self.timeline.peak_bytes

    @property
    def recompute(self) -> frozenset[str]:
        return self.plan.recompute

    @property
    def offload(self) -> frozenset[str]:
        return self.plan.offload

    @property
    def compress(self) -> frozenset[str]:
        return self.plan.compress


@dataclasses.dataclass
class ScheduleResult:
    """What scheduling chose, with the baseline and the lowest peak any verified plan reached."""

    chosen: Evaluation                   # the plan to run: the budget's, or the lowest peak found
    baseline: Evaluation                 # nothing recomputed beyond the partitioner's own choices
    lowest: Evaluation                   # the lowest peak any evaluated plan reached
    budget_bytes: int
    feasible: bool
    evaluations: int
    method: str = "greedy"               # which search found ``chosen``
    attempts: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # every plan verified
    solver: dict[str, Any] | None = None  # the first CP-SAT solve's statistics (on the baseline), when it ran
    solves: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # every CP-SAT solve, in order

    def decisions(self) -> list[dict[str, Any]]:
        """Per value the baseline partition or the chosen one saves: bytes, choice, cost and why (for
        schedule.json)."""
        kept = {c.name for c in self.chosen.candidates}
        by = "the CP-SAT plan" if self.method.startswith("cp-sat") else f"the {self.method} plan"
        cut = (f"torch's knapsack cut (activation_memory_budget={self.chosen.share:.3g})"
               if self.chosen.share < 1.0 else "the partitioner")
        values = {c.name: c for c in [*self.baseline.candidates, *self.chosen.candidates]}
        rows = []
        for c in sorted(values.values(), key=lambda c: (-c.nbytes, c.name)):
            if c.name in self.chosen.compress:
                choice, why = "compress", f"stored compressed to meet the budget by {by} (lossy, allowed)"
            elif c.name in self.chosen.offload:
                choice, why = "offload", f"freed to meet the budget by {by}; its reload hides behind compute"
            elif c.name in self.chosen.recompute:
                choice, why = "recompute", f"freed to meet the budget by {by}"
            elif c.name in kept:
                choice = "keep"
                why = c.why_not or ("the budget is met without recomputing it"
                                    if self.feasible else "recomputing did not lower the peak")
            else:
                choice, why = "recompute", f"{cut} recomputes it around memopt's decisions"
            rows.append({"name": c.name, "bytes": c.nbytes, "choice": choice,
                         "recompute_time_s": float(f"{c.recompute_time_s:.6g}"),
                         "offload_time_s": (None if c.offload_time_s == float("inf")
                                            else float(f"{c.offload_time_s:.6g}")),
                         "why": why})
        return rows




class Evaluate(Protocol):
    """Partition and simulate a plan; ``share`` < 1 puts it on torch's knapsack cut at that share of
    the saved bytes (Note [Seeding from PyTorch's knapsack] in :mod:`memopt.schedule.search`)."""

    def __call__(self, plan: Plan, share: float = 1.0, /) -> Evaluation: ...


def draws_random(node: torch.fx.Node) -> bool:
    """Whether running ``node`` again would draw new random numbers: an op tagged
    ``nondeterministic_seeded`` whose drop probability (``p`` / ``dropout_p``), if it has one, is not 0."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) \
            or torch.Tag.nondeterministic_seeded not in target.tags:
        return False
    for argument in target._schema.arguments:
        if argument.name in ("p", "dropout_p"):
            return bool(call_argument(node, argument.name) != 0)
    return True


def communicates(node: torch.fx.Node) -> bool:
    """Whether ``node`` is a collective (or waits for one): an op of torch's functional collectives."""
    target = node.target
    return node.op == "call_function" and isinstance(target, torch._ops.OpOverload) \
        and target.namespace in ("_c10d_functional", "c10d_functional", "_dtensor")


def protect_unrepeatable(joint_gm: torch.fx.GraphModule) -> None:
    """Tag every op that must run once ``MUST_SAVE``, so that no cut recomputes it. An op that draws
    random numbers (unless the user's checkpoint policy tagged it): torch's min-cut partitioner bans its
    recomputation, but its knapsack (``activation_memory_budget`` < 1) can trade the ban away, and the
    backward then draws a new dropout mask: silently wrong gradients (pytorch/pytorch#190758); a user's
    ``MUST_RECOMPUTE`` tag is honoured, as torch then replays the op's RNG state. And a collective: run
    again in the backward it would communicate again, costing a transfer the plan did not price, and hang
    every rank whose plan did not choose it too."""
    for node in joint_gm.graph.nodes:
        if communicates(node) or (draws_random(node) and (node.meta.get("recompute") is None
                                                          or DECISION_KEY in node.meta)):
            node.meta[DECISION_KEY] = "save"
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE


def redrawn_random(fw_gm: torch.fx.GraphModule, bw_gm: torch.fx.GraphModule) -> list[str]:
    """Random ops of the forward that the backward runs again, drawing new numbers (names)."""
    forward = {n.name for n in fw_gm.graph.nodes if draws_random(n)}
    return [n.name for n in bw_gm.graph.nodes if n.name in forward and draws_random(n)]


def forward_region(joint_gm: torch.fx.GraphModule) -> frozenset[str]:
    """Names of the joint graph's ops that eager PyTorch runs in the forward: not those AOTAutograd
    traced while running the backward (``partitioner_tag`` ``"is_backward"``), nor any op that depends on
    a tangent. A derivative's ops that read forward values only (GELU's ``3 * x ** 2``, the transposes of
    weights) depend on no tangent, yet eager runs them in the backward: the backward running them is no
    recomputation (Note [Counting recomputation] in benchmarks/bench_schedule.py)."""
    backward = backward_nodes(joint_gm.graph)
    return frozenset(n.name for n in joint_gm.graph.nodes if n.op == "call_function" and n not in backward
                     and n.meta.get("partitioner_tag") != "is_backward")


def rerun_forward_ops(bw_gm: torch.fx.GraphModule, forward_names: set[str] | frozenset[str],
                      ) -> list[torch.fx.Node]:
    """The backward's nodes that run a forward op again: those named after a forward (joint-graph) node,
    and torch's ``run_with_rng_state`` wrappers of a recomputed seeded op (they take new names)."""
    rerun = torch._prims.rng_prims.run_with_rng_state
    return [n for n in bw_gm.graph.nodes if n.op == "call_function"
            and (n.name in forward_names or n.target is rerun)]


def _unrecomputable_reason(node: torch.fx.Node) -> str | None:
    if node.op != "call_function":
        return f"{node.op} (an input of the graph)"
    target = node.target
    if target is operator.getitem:
        return "an element of a multi-output op (recompute the op instead)"
    if not isinstance(target, torch._ops.OpOverload):
        return f"not an aten op ({target})"
    # Any seeded op, even one that draws nothing (attention with dropout_p = 0): recomputing it makes
    # torch thread an RNG state through the step, which memopt's simulator and cost model follow, but
    # plans that re-run attention made Inductor's tracked peak worse (a tiny Llama at 0.5: 25.4 MB
    # instead of 24.9 MB against a 23.7 MB plan), so memopt does not choose it yet.
    if torch.Tag.nondeterministic_seeded in target.tags:
        return "random: recomputing it would draw different numbers"
    if communicates(node):
        return "a collective: recomputing it would communicate again"
    if target._schema.is_mutable:
        return "mutates its inputs"
    if node.meta.get("recompute") is not None and DECISION_KEY not in node.meta:
        return "tagged by the user's checkpoint policy"
    if not isinstance(node.meta.get("val"), torch.Tensor):
        return "not a single tensor"
    return None


def saved_values(fw_gm: torch.fx.GraphModule, num_user_outputs: int) -> list[str]:
    """Names of the values the forward saves for the backward (tensors only)."""
    outputs = fw_gm.graph.output_node().args[0]
    values = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    return [v.name for v in values[num_user_outputs:]
            if isinstance(v, torch.fx.Node) and isinstance(v.meta.get("val"), torch.Tensor)]


def returned_values(fw_gm: torch.fx.GraphModule, num_user_outputs: int) -> list[str]:
    """Names of the values the forward returns to the caller (not saved for the backward)."""
    outputs = fw_gm.graph.output_node().args[0]
    values = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    return [v.name for v in values[:num_user_outputs] if isinstance(v, torch.fx.Node)]


def candidates(joint_gm: torch.fx.GraphModule, saved: list[str],
               transfer_time_s: Callable[[int], float] | None = None,
               returned: Iterable[str] = ()) -> list[Candidate]:
    """The saved values of a partition, as scheduling candidates (graph inputs and their views excluded:
    they cost no activation memory). ``transfer_time_s`` (bytes -> seconds one way) allows offload.
    ``returned``: the values the forward also returns to the caller, who holds them through the
    backward: a saved value sharing their storage is neither recomputed nor offloaded (it frees nothing)."""
    nodes = {n.name: n for n in joint_gm.graph.nodes}
    held = {storage_root(nodes[name]) for name in returned if name in nodes}
    out: list[Candidate] = []
    seen: set[str] = set()
    for name in saved:
        node = nodes.get(name)
        if node is None or name in seen:
            continue
        seen.add(name)
        if storage_root(node).op == "placeholder":
            continue
        val = node.meta["val"]
        cost = node.meta.get("memopt_cost")
        nbytes = storage_nbytes(val)
        if storage_root(node) in held:
            out.append(Candidate(name=name, nbytes=nbytes, recompute_time_s=0.0, recomputable=False,
                                 why_not=HELD, held=True))
            continue
        out.append(Candidate(
            name=name,
            nbytes=nbytes,
            recompute_time_s=float(cost.time_s) if cost is not None else 0.0,
            recomputable=_unrecomputable_reason(node) is None,
            why_not=_unrecomputable_reason(node),
            offload_time_s=2 * transfer_time_s(nbytes) if transfer_time_s is not None else float("inf")))
    return out


def apply_save_tags(joint_gm: torch.fx.GraphModule, save: frozenset[str]) -> None:
    """Tag ``save`` MUST_SAVE as memopt's decision (cleared by :func:`apply_recompute_tags`); leave the
    user's tags alone."""
    for node in joint_gm.graph.nodes:
        if node.name in save and (node.meta.get("recompute") is None or DECISION_KEY in node.meta):
            node.meta[DECISION_KEY] = "save"
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE


def apply_recompute_tags(joint_gm: torch.fx.GraphModule, recompute: frozenset[str]) -> None:
    """Tag ``recompute`` MUST_RECOMPUTE; clear memopt's earlier tags (:func:`protect_unrepeatable`'s are made
    again at every partition); leave the user's tags alone."""
    for node in joint_gm.graph.nodes:
        if DECISION_KEY in node.meta:
            del node.meta[DECISION_KEY]
            node.meta.pop("recompute", None)
        if node.name in recompute:
            node.meta[DECISION_KEY] = "recompute"
            node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
