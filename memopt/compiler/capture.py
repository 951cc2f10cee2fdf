"""Capture: from Dynamo's graph to compiled forward and backward functions.

``compile_graph`` runs the model-graph passes, then hands the graph to AOTAutograd, whose partition hook
(:class:`JointStage`) is where memopt does its work on the joint forward+backward graph: joint passes,
cost annotation, partition, simulation, dumps. The same hook serves both code generators:

- ``codegen="eager"``: ``aot_autograd`` with ``partition_fn=JointStage`` and compilers that run the FX
  graphs with the boxed calling convention (inputs freed as soon as they are dead).
- ``codegen="inductor"``: ``compile_fx`` with ``config_patches={"custom_partitioner_fn": JointStage}``,
  which keeps Inductor's own decompositions and joint-graph passes before ours.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.fx
from torch._inductor.custom_graph_pass import CustomPartitionerFn

from memopt.compiler.dump import Dumper, timeline_json, timeline_svg
from memopt.compiler.partition import Realiser, partition_joint, realise_plan
from memopt.compiler.plan_cache import CachedPlan, PlanCache, cache_root, stage_identity
from memopt.compiler.runner import MemoptPassWarning, PassRecord, run_passes
from memopt.config import MemoptConfig
from memopt.cost_model.estimate import annotate_costs, op_class
from memopt.cost_model.profile import COST_MODEL_VERSION, DeviceProfile, profile_origin
from memopt.errors import MemoptPassError
from memopt.names import GraphInput, joint_graph_inputs, layer_of
from memopt.passes.base import Pass, PassContext
from memopt.schedule.budget import budget_bytes, check_budget, unreached
from memopt.schedule.problem import (
    DECISION_KEY,
    NOTHING,
    Evaluation,
    Plan,
    ScheduleResult,
    apply_recompute_tags,
    apply_save_tags,
    communicates,
    draws_random,
    forward_region,
)
from memopt.schedule.search import search_plan
from memopt.schedule.simulate import (
    MemoryEvent,
    MemoryTimeline,
    simulate_joint,
    simulate_step,
)

_T = TypeVar("_T")


@dataclasses.dataclass
class GraphReport:
    """What memopt did with one captured graph; kept on the backend for tests, `memopt plan` and tools."""

    graph_id: str
    codegen: str
    inputs: tuple[GraphInput, ...]                     # per Dynamo graph input: kind, qualified name
    passes: list[PassRecord] = dataclasses.field(default_factory=list)
    joint: torch.fx.GraphModule | None = None          # after the joint passes
    forward: torch.fx.GraphModule | None = None        # partitioned (or the inference graph)
    backward: torch.fx.GraphModule | None = None
    num_user_outputs: int = 0
    primal_kinds: tuple[str, ...] = ()                 # per forward-graph input
    memory: MemoryTimeline | None = None               # the simulated step, nothing outside the graphs
    predicted_time_s: float | None = None              # forward + backward on the cost profile
    budget_bytes: int | None = None                    # the memory budget resolved to bytes
    budget_unreached: str | None = None                # a fraction no plan reached: what the warning said
    held_outside_bytes: int = 0                        # what the step's other graphs hold (byte budgets)
    schedule: ScheduleResult | None = None             # what the scheduler chose, with a budget
    # Realises and models plans on the joint graph as it was scheduled (Realiser.problem, realise_plan).
    realiser: Realiser | None = dataclasses.field(default=None, repr=False)
    # Where the budget's plan came from: "hit", "miss" or "stale" (Note [The plan cache]), or "compiled
    # step": AOTAutograd's cache handed back the whole step and the stage did not run (no graphs above).
    plan_cache: str | None = None
    # Plans the captured joint graph again under other options, as it is priced now (memopt plan --max-seq).
    # ``lowest``: the least memory the scheduler can plan, whatever it costs (memopt.max_seq's question);
    # "checkpointed": that plan when it is known to be checkpointing (no baseline partition).
    # ``reuse_partitions``: Note [Reusing partitions across lengths].
    replan: Callable[..., None] | None = dataclasses.field(default=None, repr=False)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def input_kinds(self) -> tuple[str, ...]:
        return tuple(i.kind for i in self.inputs)

    def simulate(self, extra_resident: dict[str, int] | None = None) -> MemoryTimeline:
        """Simulate this graph's step again with bytes held outside it (optimizer states, ...)."""
        if self.forward is None:
            raise RuntimeError(f"graph {self.graph_id} has not been partitioned yet (no backward run?)")
        return simulate_step(self.forward, self.backward, input_kinds=self.primal_kinds,
                             num_user_outputs=self.num_user_outputs, extra_resident=extra_resident)


def _measure(gm: torch.fx.GraphModule) -> dict[str, Any]:
    timeline = simulate_joint(gm)
    return {"saved_activation_bytes": timeline.saved_activation_bytes, "peak_bytes": timeline.peak_bytes}


def _primal_kinds(fw_gm: torch.fx.GraphModule, primal_kinds: Sequence[str]) -> tuple[str, ...]:
    """Kinds of the forward graph's inputs, matched to AOTAutograd's ``primals_<i>`` names."""
    kinds = []
    for node in fw_gm.graph.nodes:
        if node.op != "placeholder":
            continue
        index = -1
        if node.name.startswith("primals_") and node.name[len("primals_"):].isdigit():
            index = int(node.name[len("primals_"):]) - 1
        kinds.append(primal_kinds[index] if 0 <= index < len(primal_kinds) else "input")
    return tuple(kinds)


def _offload_all(evaluate: Callable[[Plan], Evaluation], baseline: Evaluation, limit: int | None,
                 ) -> ScheduleResult:
    """``offload: "all"``: every saved activation that can go to the host does, whatever it costs; a
    check of the offload runtime (streams, events, host pool), not a schedule. ``limit``: the budget's
    bytes, if one was given."""
    chosen = evaluate(Plan(offload=_offloadable(baseline)))
    return ScheduleResult(chosen, baseline, chosen, chosen.peak_bytes if limit is None else limit,
                          feasible=limit is None or chosen.peak_bytes <= limit, evaluations=2, method="offload-all")


def _offloadable(baseline: Evaluation) -> frozenset[str]:
    """The values the baseline saves that can go to the host and free something there."""
    return frozenset(c.name for c in baseline.candidates if c.offload_time_s != float("inf") and not c.held)


def _lowest(evaluate: Callable[[Plan], Evaluation], baseline: Evaluation, limit: int | None,
            gm: torch.fx.GraphModule, offload: bool, host_bytes: int | None) -> ScheduleResult:
    """The least memory memopt plans for, whatever it costs (the question ``memopt plan --max-seq``
    asks of a length, Note [Searching the longest length]). When the host can hold every value the
    baseline saves, they are all offloaded (method "offloaded"): each comes back right before its use,
    which holds less at once than recomputing a layer. When it cannot, :func:`_checkpoint_plan`
    ("checkpointed"). The baseline itself when it is lower (short sequences)."""
    saved = sum(c.nbytes for c in baseline.candidates if not c.held)
    if offload and (host_bytes is None or saved <= host_bytes):
        # Each reloaded where its use's segment starts: the least held at once.
        offloaded = _offloadable(baseline)
        plan, method = Plan(offload=offloaded, reload_in_segment=offloaded), "offloaded"
    else:
        plan, method = _checkpoint_plan(gm, offload), "checkpointed"
    chosen = evaluate(plan)
    if baseline.peak_bytes <= chosen.peak_bytes:           # short sequences: nothing to gain
        chosen, method = baseline, "baseline"
    return ScheduleResult(chosen, baseline, chosen, chosen.peak_bytes if limit is None else limit,
                          feasible=limit is None or chosen.peak_bytes <= limit, evaluations=2, method=method)


def _checkpoint_plan(gm: torch.fx.GraphModule, offload: bool) -> Plan:
    """Each repeated layer recomputed in the backward (:func:`_checkpointed`), and what the backward still
    needs from the forward (the layers' inputs, mostly) offloaded, as far as the host bound goes
    (Note [Bounded host memory] in memopt/compiler/partition.py), as Unsloth's offloaded checkpointing does; recomputation alone when ``offload``
    is off."""
    recompute, _ = _checkpointed(gm)
    activations = frozenset(n.name for n in gm.graph.nodes if n.op == "call_function")
    offloaded = activations - recompute if offload else frozenset()
    return Plan(recompute, offloaded, reload_in_segment=offloaded)


def _checkpointed(gm: torch.fx.GraphModule) -> tuple[frozenset[str], frozenset[str]]:
    """Every forward op inside a repeated layer that may run again, but for what leaves the layer: per-layer
    activation checkpointing, attention included (a seeded op that draws nothing; the scheduler's own
    plans leave it alone, Note in :func:`memopt.schedule.problem._unrecomputable_reason`); and what leaves
    a layer for another, to be saved. What the layers hand each other is saved (or offloaded), never
    recomputed: the min-cut would otherwise be free to recompute it from the embedding up, every layer
    at the backward's start (it did so with token elimination's ``scatter_add`` on the residual stream)."""
    forward = forward_region(gm)
    layer: dict[torch.fx.Node, str | None] = {}
    for node in reversed(gm.graph.nodes):      # readers first: a function's op (rotary) takes its reader's
        users = {layer[u] for u in node.users if u.name in forward}
        layer[node] = layer_of(node)[0] or (next(iter(users)) if len(users) == 1 else None)
    chosen, leaving = set(), set()
    for node in gm.graph.nodes:
        target = node.target
        if node.name not in forward or not isinstance(target, torch._ops.OpOverload) \
                or target._schema.is_mutable or draws_random(node) or communicates(node) \
                or (node.meta.get("recompute") is not None and DECISION_KEY not in node.meta) \
                or layer[node] is None:
            continue
        if all(layer[u] == layer[node] for u in node.users if u.name in forward):
            chosen.add(node.name)
        elif isinstance(node.meta.get("val"), torch.Tensor):
            leaving.add(node.name)
    return frozenset(chosen), frozenset(leaving)


def _priced_copy(gm: torch.fx.GraphModule, costs: dict[str, Any]) -> torch.fx.GraphModule:
    """A copy of ``gm`` (its nodes' metadata copied one level deep) whose nodes carry ``costs`` by name,
    the joint graph's as priced now; a node the joint graph does not have is priced again later."""
    copied = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    for node in copied.graph.nodes:
        if node.name in costs:
            node.meta["memopt_cost"] = costs[node.name]
        else:
            node.meta.pop("memopt_cost", None)
    return copied


class JointStage(CustomPartitionerFn):
    """The partition hook: joint passes, cost annotation, partition, simulation and dumps."""

    def __init__(self, config: MemoptConfig, profile: DeviceProfile, passes: Sequence[Pass],
                 report: GraphReport, dumper: Dumper,
                 progress: Callable[[str], None] = lambda message: None, *, fused_costs: bool = False) -> None:
        self.config, self.profile, self.passes = config, profile, tuple(passes)
        self.fused_costs = fused_costs          # Note [Fused costs]
        self.report, self.dumper, self.progress = report, dumper, progress
        self.primal_kinds: tuple[str, ...] = ()
        # Note [Reusing partitions across lengths]: partitions kept by (recompute, knapsack share), when reused.
        self.partitions: dict[tuple[frozenset[str], float], tuple[torch.fx.GraphModule, torch.fx.GraphModule]] = {}
        self.reuse_partitions = False
        self.checkpointed: tuple[frozenset[str], frozenset[str]] | None = None     # _checkpointed of the joint graph
        self.node_times: dict[str, list[dict[str, Any]]] = {}       # dump_node_times, by graph kind
        self.timelines: dict[str, list[MemoryEvent]] = {}            # for the dump's memory_timeline.json
        self.timeline_budget: int | None = None

    def __call__(self, gm: torch.fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any,
                 ) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
        num_fwd_outputs = int(kwargs["num_fwd_outputs"])
        static = kwargs.get("static_lifetime_input_indices")
        primals = joint_inputs[0] if joint_inputs and isinstance(joint_inputs[0], (list, tuple)) else []
        inputs = joint_graph_inputs(gm, self.report.inputs, primals)
        self.primal_kinds = tuple(i.kind for i in inputs)
        self.progress(f"joint graph captured ({len(gm.graph.nodes)} nodes); running joint-graph passes")
        if self.dumper.enabled:
            self.dumper.stage("joint", gm, kind="joint", status="captured",
                              stats={"nodes": len(gm.graph.nodes), "predicted": _measure(gm)})
            self.timelines["joint graph, before its passes"] = simulate_joint(gm).events
        ctx = PassContext(config=self.config, stage="joint", profile=self.profile, inputs=inputs)
        start = time.perf_counter()
        gm, records = run_passes(gm, self.passes, ctx, self.dumper, measure=_measure)
        self.report.passes.extend(records)
        self.report.seconds["joint_passes"] = time.perf_counter() - start
        if self.dumper.enabled:
            self.timelines["joint graph, after its passes"] = simulate_joint(gm).events

        self._plan(gm, joint_inputs, num_fwd_outputs, static, self.config)
        fake_mode = torch._guards.detect_fake_mode()

        def replan(config: MemoptConfig, lowest: bool | str = False, *, reuse_partitions: bool = False) -> None:
            # Later, outside AOTAutograd's tracing: its fake mode, which torch's partitioner looks up when
            # it threads an RNG state through a recomputed seeded op (attention).
            self.reuse_partitions = reuse_partitions
            with torch._guards.tracing(torch._guards.TracingContext(fake_mode)):
                self._plan(gm, joint_inputs, num_fwd_outputs, static, config, lowest)

        self.report.replan = replan
        assert self.report.forward is not None
        return self.report.forward, self.report.backward  # type: ignore[return-value]

    def _plan(self, gm: torch.fx.GraphModule, joint_inputs: Sequence[object], num_fwd_outputs: int,
              static: list[int] | None, config: MemoptConfig, lowest: bool | str = False) -> None:
        """Cost model, partition (scheduled under ``config``'s budget or offload, or for the lowest peak)
        and simulation of the joint graph, as it is priced now (Note [Planning every length from one
        capture])."""
        self.progress(f"cost model ({self.profile.name}): bytes, FLOPs and time per node")
        start = time.perf_counter()
        self._analysis("cost model", lambda: annotate_costs(gm, self.profile, fused=self.fused_costs))
        self.report.seconds["cost_model"] = time.perf_counter() - start

        self.progress("partitioning into forward and backward graphs")
        start = time.perf_counter()
        self.report.schedule, self.report.budget_bytes = None, None
        self.timeline_budget = None           # a plan made before (report.replan) leaves no budget line
        for key in ("step before scheduling", "step after scheduling"):
            self.timelines.pop(key, None)
        if config.memory_budget is None and config.offload != "all" and not lowest:
            # A plan made before (report.replan) is undone.
            fw_gm, bw_gm = self._partition(gm, joint_inputs, num_fwd_outputs, static, frozenset())
            apply_recompute_tags(gm, frozenset())
        else:
            fw_gm, bw_gm = self._schedule(gm, joint_inputs, num_fwd_outputs, static, config, lowest)
        self.report.seconds["partition"] = time.perf_counter() - start
        self.report.joint = gm
        self._finish(fw_gm, bw_gm, num_fwd_outputs)

    def _schedule(self, gm: torch.fx.GraphModule, joint_inputs: Sequence[object], num_fwd_outputs: int,
                  static: list[int] | None, config: MemoptConfig, lowest: bool | str = False,
                  ) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
        """Recompute or offload saved values until the step's simulated peak meets the memory budget."""
        budget = config.memory_budget
        realiser = Realiser(
            gm, lambda recompute, share: self._partition(gm, joint_inputs, num_fwd_outputs, static, recompute, share),
            num_fwd_outputs, lambda fw: _primal_kinds(fw, self.primal_kinds), self.profile,
            fused_costs=self.fused_costs, offload=config.offload is not False, host_bytes=config.host_memory,
            compress_format=config.compress_activations, forward=forward_region(gm))
        self.report.realiser = realiser
        transfer = realiser.transfer_s if realiser.offload else None
        cache: dict[tuple[Plan, float], Evaluation] = {}

        def evaluate(plan: Plan, share: float = 1.0) -> Evaluation:
            # share < 1: on torch's knapsack cut at that share (Note [Seeding from PyTorch's knapsack]).
            if (plan, share) not in cache:
                cache[(plan, share)] = realise_plan(plan, share, realiser)
            return cache[(plan, share)]

        if lowest == "checkpointed":             # known to be the lowest at this length: no baseline needed
            chosen = evaluate(_checkpoint_plan(gm, offload=transfer is not None))
            self.report.schedule = ScheduleResult(chosen, chosen, chosen, chosen.peak_bytes, feasible=True,
                                                  evaluations=1, method="checkpointed")
            apply_recompute_tags(gm, chosen.recompute)
            return chosen.forward, chosen.backward
        baseline = evaluate(NOTHING)
        limit = baseline.peak_bytes if budget is None else budget_bytes(budget, baseline.timeline,
                                                                         self.report.held_outside_bytes)
        self.progress(f"scheduling: baseline peak {baseline.peak_bytes} B, budget {limit} B")
        if lowest:
            result = _lowest(evaluate, baseline, None if budget is None else limit, gm,
                             offload=transfer is not None, host_bytes=config.host_memory)
        elif config.offload == "all":
            result = _offload_all(evaluate, baseline, None if budget is None else limit)
        else:
            result = self._search(gm, config, evaluate, lambda: search_plan(
                evaluate, realiser.problem, baseline, limit, graph_nodes=len(gm.graph.nodes),
                time_limit_s=config.solver_time_limit_s, progress=self.progress, knapsack=True), baseline, limit)
        apply_recompute_tags(gm, result.chosen.recompute)   # the joint graph shows the chosen plan
        self.report.schedule = result
        tried = (f"recomputing {len(result.lowest.recompute)}, offloading {len(result.lowest.offload)} and "
                 f"compressing {len(result.lowest.compress)} values")
        if budget is not None:
            self.report.budget_unreached = unreached(limit, budget, result.lowest.timeline, tried)
        if self.dumper.enabled:
            self._dump_schedule(gm, config, limit, result)
        if not result.feasible:
            self.dumper.finish()
            assert budget is not None
            check_budget(limit, budget, result.lowest.timeline, tried,
                         offload_allowed=transfer is not None, compress_allowed=config.compress_activations is not None)
        self.report.budget_bytes = None if budget is None else limit
        return result.chosen.forward, result.chosen.backward

    def _search(self, gm: torch.fx.GraphModule, config: MemoptConfig, evaluate: Callable[[Plan, float], Evaluation],
                search: Callable[[], ScheduleResult], baseline: Evaluation, limit: int) -> ScheduleResult:
        """``search()``'s plan, or the one a process before found for this graph, options, profile and
        budget, realised again (Note [The plan cache] in memopt/compiler/plan_cache.py)."""
        root = cache_root(config.plan_cache)
        if root is None or baseline.peak_bytes <= limit:
            return search()
        cache = PlanCache(root)
        key = PlanCache.key(gm, config, self.profile, f"budget {limit}")
        entry = cache.get(key)
        if entry is not None:
            chosen = evaluate(entry.plan, entry.share)
            if chosen.peak_bytes == entry.peak_bytes:
                self.report.plan_cache = "hit"
                self.progress(f"plan from the cache ({cache.path(key)}): {entry.method}")
                return ScheduleResult(chosen, baseline, min(chosen, baseline, key=lambda e: e.peak_bytes), limit,
                                      entry.feasible, evaluations=2, method=entry.method, attempts=entry.attempts,
                                      solver=entry.solves[0] if entry.solves else None, solves=entry.solves)
            self.progress(f"the cached plan peaks at {chosen.peak_bytes} B, not the {entry.peak_bytes} B it "
                          "was cached at: searching again")
        self.report.plan_cache = "stale" if entry is not None else "miss"
        result = search()
        cache.put(key, CachedPlan.of(result))
        return result

    def _dump_schedule(self, gm: torch.fx.GraphModule, config: MemoptConfig, limit: int,
                       result: ScheduleResult) -> None:
        """schedule.json (each decision with its layer) and the timelines before and after scheduling."""
        budget, baseline = config.memory_budget, result.baseline
        layers = {n.name: layer_of(n)[0] for n in gm.graph.nodes}
        self.dumper.write_json("schedule.json", {
            "budget": str(budget), "budget_bytes": limit, "feasible": result.feasible,
            "held_by_other_graphs_bytes": self.report.held_outside_bytes,
            "unreached": self.report.budget_unreached,
            "baseline_peak_bytes": baseline.peak_bytes, "peak_bytes": result.chosen.peak_bytes,
            "lowest_peak_bytes": result.lowest.peak_bytes,
            "added_time_s": float(f"{result.chosen.added_time_s:.6g}"), "profile": self.profile.name,
            "profile_origin": profile_origin(self.profile, config.cost_profile),
            "evaluations": result.evaluations, "method": result.method, "solver": result.solver,
            "solves": result.solves, "attempts": result.attempts,
            "candidates": [{**row, "layer": layers.get(row["name"])} for row in result.decisions()]})
        self.timelines["step before scheduling"] = baseline.timeline.events
        self.timelines["step after scheduling"] = result.chosen.timeline.events
        self.timeline_budget = limit
        self.dumper.write_text("memory_timeline.svg", timeline_svg(
            {"before scheduling": [(e.phase, e.live_bytes) for e in baseline.timeline.events],
             "after scheduling": [(e.phase, e.live_bytes) for e in result.chosen.timeline.events]},
            limit, f"{self.report.graph_id}: live bytes of one step (budget {budget})"))

    def _partition(self, gm: torch.fx.GraphModule, joint_inputs: Sequence[object], num_fwd_outputs: int,
                   static: list[int] | None, recompute: frozenset[str], share: float = 1.0,
                   ) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
        """torch's partition of ``gm`` with ``recompute`` tagged (on its knapsack cut at ``share`` when
        below 1), or copies of the one kept (Note [Reusing partitions across lengths]).

        Note [Reusing partitions across lengths]
        A partition is half the time a plan of an 8B model takes on 2 cores (a plan on a fresh one 30 s,
        on a kept one 14 s), and the sizes reach it only through the choices of torch's min-cut (which
        values to save, which to recompute, of those no tag decides), which rarely move with the length:
        on the 8B model in QLoRA, every length from 4K to 570K tokens is priced byte for byte the same on
        a partition kept from 4K (or from 65K, checkpointed) as on its own. So ``memopt plan --max-seq``
        keeps each partition it makes, by its recompute tags, and re-prices copies of it at the next
        lengths (the offloaded plan reuses the baseline's: offloads are applied after the partition);
        its answer is then asked again on fresh partitions, and searched again without reuse if they
        disagree. Copies, because offloads and compression are applied to the graphs in place; and their
        nodes take the joint graph's costs as priced now.
        """
        key = (recompute, share)
        if not self.reuse_partitions or key not in self.partitions:
            apply_recompute_tags(gm, recompute)
            if recompute:
                if self.checkpointed is None:
                    self.checkpointed = _checkpointed(gm)
                if recompute == self.checkpointed[0]:          # the checkpointed plan: save the layers' outputs
                    apply_save_tags(gm, self.checkpointed[1])
            with contextlib.ExitStack() as stack:
                if share < 1.0:
                    stack.enter_context(torch._functorch.config.patch(activation_memory_budget=share))
                fw, bw = partition_joint(gm, joint_inputs, num_fwd_outputs=num_fwd_outputs,
                                         static_lifetime_input_indices=static)
            if not self.reuse_partitions:
                return fw, bw
            self.partitions[key] = (fw, bw)
        costs = {n.name: n.meta["memopt_cost"] for n in gm.graph.nodes if "memopt_cost" in n.meta}
        return tuple(_priced_copy(g, costs) for g in self.partitions[key])  # type: ignore[return-value]

    def _finish(self, fw_gm: torch.fx.GraphModule, bw_gm: torch.fx.GraphModule | None,
                num_user_outputs: int) -> None:
        report = self.report
        report.forward, report.backward, report.num_user_outputs = fw_gm, bw_gm, num_user_outputs
        report.primal_kinds = _primal_kinds(fw_gm, self.primal_kinds or report.input_kinds)
        self.progress("simulating the step's memory")
        start = time.perf_counter()
        report.memory = self._analysis("memory simulation", report.simulate)
        report.seconds["simulate"] = time.perf_counter() - start
        graphs = [g for g in (fw_gm, bw_gm) if g is not None]
        # Partitioned nodes carry the joint graph's costs; only graphs that never were joint need them.
        for graph in graphs:
            if any("memopt_cost" not in n.meta for n in graph.graph.nodes if n.op == "call_function"):
                self._analysis("cost model", lambda: annotate_costs(graph, self.profile,
                                                                   fused=self.fused_costs))
        report.predicted_time_s = sum(
            node.meta["memopt_cost"].time_s for graph in graphs
            for node in graph.graph.nodes if "memopt_cost" in node.meta)
        summary: dict[str, Any] = report.memory.summary() if report.memory is not None else {}
        summary["predicted_time_s"] = float(f"{report.predicted_time_s:.6g}")
        summary["profile"] = self.profile.name
        self.dumper.stage("forward", fw_gm, kind="partition", status="partitioned",
                          stats={"nodes": len(fw_gm.graph.nodes), "memory": summary})
        if bw_gm is not None:
            self.dumper.stage("backward", bw_gm, kind="partition", status="partitioned",
                              stats={"nodes": len(bw_gm.graph.nodes), "memory": summary})
        if self.dumper.folder is not None:
            from memopt.codegen.triton_kernels import kernel_sources

            sources = self._analysis("kernel sources", lambda: kernel_sources(graphs)) or {}
            for name, source in sources.items():
                self.dumper.write_text(f"kernel_{name}", source)     # the Triton kernels these graphs call
        for name, seconds in report.seconds.items():
            self.dumper.timing(name, seconds)
        if self.dumper.enabled and report.memory is not None:
            timelines = dict(self.timelines)
            if "step after scheduling" not in timelines:          # else the same line twice
                timelines["step as compiled"] = report.memory.events
            self.dumper.write_json("memory_timeline.json", timeline_json(timelines, self.timeline_budget))
        self.dumper.finish()

    def _analysis(self, what: str, run: Callable[[], _T]) -> _T | None:
        """Run an analysis that informs but does not change the graphs; a failure must not stop
        training: warn and go on without it (raise with strict=True)."""
        try:
            return run()
        except Exception as err:  # the documented fallback; the cause is reported
            reason = f"{type(err).__name__}: {err}"
            if self.config.strict:
                raise MemoptPassError(f"{what} failed on graph {self.report.graph_id}: {reason}") from err
            warnings.warn(
                f"memopt: {what} failed on graph {self.report.graph_id} ({reason}); the graph runs as "
                "partitioned, without memopt's prediction" + (
                    " and without the memory budget check" if self.config.memory_budget else "")
                + ". Set options={'strict': True} to raise instead.", MemoptPassWarning, stacklevel=2)
            return None

    def timed(self, gm: torch.fx.GraphModule, run: Callable[..., Any]) -> Callable[..., Any]:
        """``run``, whose first steps record node times into the dump when asked (Note [Recording node
        times] in memopt/runtime/node_times.py)."""
        if not self.config.dump_node_times or not self.dumper.enabled:
            return run
        from memopt.runtime.node_times import NodeTimer

        # A backward graph takes the outputs' gradients ("tangents") as inputs.
        kind = "backward" if any(n.op == "placeholder" and n.name.startswith("tangents")
                                 for n in gm.graph.nodes) else "forward"
        return NodeTimer(gm, run, self.config.dump_node_times,
                         lambda times, device: self._write_node_times(kind, gm, times, device))

    def _write_node_times(self, kind: str, gm: torch.fx.GraphModule, times: dict[str, float],
                          device: torch.device) -> None:
        from memopt.cost_model.tune import NODE_TIMES, device_name

        rows = []
        for node in gm.graph.nodes:
            cost = node.meta.get("memopt_cost")
            if node.name not in times or cost is None:
                continue
            moves = cost.flops > 0 or cost.read_bytes + cost.out_bytes > 0
            kernel_class = op_class(node, cost.flops) if moves else "none"      # "none": a view, a scalar
            work = cost.flops if cost.flops > 0 else cost.read_bytes + cost.out_bytes
            rows.append({"graph": kind, "name": node.name, "target": str(node.target), "op_class": kernel_class,
                         "work": work, "seconds": float(f"{times[node.name]:.4g}"),
                         "predicted_s": float(f"{cost.time_s:.4g}")})
        self.node_times[kind] = rows
        self.dumper.write_json(NODE_TIMES, {
            "cost_model": COST_MODEL_VERSION, "device": device_name(device), "profile": self.profile.name,
            "steps": self.config.dump_node_times,
            "clock": "torch.profiler device time" if device.type == "cuda" else "host clock around each node",
            "nodes": [row for part in ("forward", "backward") for row in self.node_times.get(part, [])]})

    def inference(self, gm: torch.fx.GraphModule) -> None:
        """Record an inference-only graph (no backward)."""
        self.primal_kinds = self.report.input_kinds
        outputs = gm.graph.output_node().args[0]
        self._finish(gm, None, len(outputs) if isinstance(outputs, (list, tuple)) else 1)

    def __deepcopy__(self, memo: dict[int, Any]) -> JointStage:
        # Inductor deep-copies its config, this hook included. The hook is where this graph's report is
        # collected: a copy would collect it where nobody looks.
        return self

    def uuid(self) -> Any | None:
        # Inductor's FX graph cache reads the hook's identity from its pickle (__reduce__), not from here.
        return None

    @property
    def reusable(self) -> bool:
        """Whether AOTAutograd's cache may hand back this graph's compiled step without running this stage
        (Note [Inductor's caches and the joint stage]): not when the stage's side effects are asked for
        (dumps, verification, node times), nor for a byte budget (the step's graphs share it through
        what each holds, which only a run of the stage measures), nor with the plan cache off."""
        config, budget = self.config, self.config.memory_budget
        return (cache_root(config.plan_cache) is not None and not self.dumper.enabled and not config.verify
                and not config.dump_node_times and (budget is None or budget.nbytes is None))

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        # Note [Inductor's caches and the joint stage]
        # Inductor keys its FX graph cache, and AOTAutograd its own, by pickling Inductor's config, this
        # hook included. Pickled as its identity (memopt's version, the options, the profile, the passes,
        # the horizontal fusion limit it compiles under, the plan cache's folder), the forward and
        # backward graphs hit Inductor's cache in the next process, and where the stage is
        # :attr:`reusable`, the whole compiled step hits AOTAutograd's: the stage is then skipped, and its
        # report says so (``plan_cache = "compiled step"``: no graphs, no memory timeline). Elsewhere
        # AOTAutograd's cache is off for memopt's compiles (memopt.codegen.inductor). The plan cache's
        # folder is part of the identity so that a step is reused only from where its plan was kept (each
        # test plans in a folder of its own).
        from memopt.codegen import inductor

        fusion = inductor.MAX_HORIZONTAL_FUSION_DISTANCE if self.config.memory_budget is not None else None
        return _cache_key_only, (stage_identity(self.config, self.profile, [p.name for p in self.passes],
                                                self.fused_costs, fusion),)


def _cache_key_only(identity: str) -> None:
    raise RuntimeError(f"memopt's joint stage is pickled only into cache keys ({identity}); it cannot be loaded")


def _boxed_eager(gm: torch.fx.GraphModule) -> Callable[..., Any]:
    """Run an FX graph as is, with the boxed calling convention so its inputs can be freed early."""
    from torch.fx.graph import _BoxedCodeGen

    gm.graph.set_codegen(_BoxedCodeGen())
    gm.recompile()
    forward = gm.forward

    def run(args: list[Any]) -> Any:
        return forward(args)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run


def compile_joint(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], stage: JointStage) -> Callable[..., Any]:
    """Hand a model graph to AOTAutograd with memopt's joint stage, for the configured code generator."""
    if stage.config.codegen == "eager":
        from torch._dynamo.backends.common import aot_autograd

        def fw_compiler(fw_gm: torch.fx.GraphModule, inputs: Sequence[Any]) -> Callable[..., Any]:
            return stage.timed(fw_gm, _boxed_eager(fw_gm))

        def inference_compiler(fw_gm: torch.fx.GraphModule, inputs: Sequence[Any]) -> Callable[..., Any]:
            stage.inference(fw_gm)
            return _boxed_eager(fw_gm)

        return aot_autograd(fw_compiler=fw_compiler, bw_compiler=fw_compiler,
                            inference_compiler=inference_compiler, partition_fn=stage,
                            keep_inference_input_mutations=True)(gm, example_inputs)
    # "inductor" and "triton": Inductor generates the code; under "triton" the passes emit memopt's ops
    # where memopt has its own kernels (token elimination's gather and scatter-add).
    from memopt.codegen.inductor import compile_with_inductor

    return compile_with_inductor(gm, example_inputs, stage, keep_plan=stage.config.memory_budget is not None,
                                 reuse=stage.reusable)
