"""Partition the joint graph into the forward and backward graphs.

memopt realises its memory decisions through the tags torch's partitioner already honours —
``node.meta["recompute"]`` (``CheckpointPolicy.MUST_SAVE`` / ``MUST_RECOMPUTE``) and
``node.meta["should_offload"]`` — rather than a partitioner of its own (see DESIGN.md). Until the
scheduler sets any tag, this is torch's min-cut rematerialization partition, the same one Inductor uses by
default, so memopt's graphs are Inductor's graphs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import torch
import torch.fx
from torch._functorch.partitioners import min_cut_rematerialization_partition

from memopt.cost_model.estimate import estimate_node, packing_time_s, transfer_time_s
from memopt.cost_model.profile import DeviceProfile
from memopt.errors import MemoptError
from memopt.passes.rewrite import fake_call, fake_result
from memopt.schedule.model import ScheduleProblem, build_problem
from memopt.schedule.problem import (
    Evaluation,
    Plan,
    candidates,
    protect_unrepeatable,
    redrawn_random,
    rerun_forward_ops,
    returned_values,
    saved_values,
)
from memopt.schedule.simulate import PACKED_SUFFIX, aliased_argument, simulate_step
from memopt.schedule.streams import exposed_transfer_s, issue_order, reload_issues, value_bytes

HOST_SUFFIX = "_host"              # a saved value's host copy: <name>_host


def partition_joint(joint_gm: torch.fx.GraphModule, joint_inputs: Sequence[object], *, num_fwd_outputs: int,
                    static_lifetime_input_indices: list[int] | None = None,
                    ) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """torch's min-cut partition of ``joint_gm``, with the ops that draw random numbers and the collectives
    saved, never recomputed (:func:`memopt.schedule.problem.protect_unrepeatable`)."""
    protect_unrepeatable(joint_gm)
    fw_gm, bw_gm = min_cut_rematerialization_partition(
        joint_gm, joint_inputs, compiler="inductor", num_fwd_outputs=num_fwd_outputs,
        static_lifetime_input_indices=static_lifetime_input_indices)
    _fill_rng_values(fw_gm, bw_gm)
    _hoist_saved_views(fw_gm)
    redrawn = redrawn_random(fw_gm, bw_gm)
    if redrawn:
        raise MemoptError(
            f"the partition recomputes {len(redrawn)} random op(s) in the backward ({', '.join(redrawn[:5])}), "
            "which would draw new numbers and make the gradients wrong; this is a bug in memopt (or in "
            "torch's partitioner, pytorch/pytorch#190758): please report it with the dumps (dump_dir)")
    return fw_gm, bw_gm


def _hoist_saved_views(fw_gm: torch.fx.GraphModule) -> None:
    """Make each view the forward makes only to save it (or to make such a view) right after its inputs.

    Note [Saved views are made where their base is]
    The joint graph holds the views the backward reads of forward values (attention's probabilities
    transposed for a matmul's backward, a softmax output ``detach``-ed) in its backward part, so torch's
    partitioner, which keeps the joint graph's order, makes them at the forward's end. A view costs no
    memory and its base is alive from its making anyway, so where it is made changes no live byte; but
    an offload copies a saved value where it is made, and made at the forward's end, every layer's
    copies queue there, behind no compute, instead of running beside the layer's forward (on GPT-2 XL
    at the knapsack's peak, memopt's plan offloaded 2 values; with the views made early, 170). Made
    right after its base, the
    copy can start as soon as the base exists (the scheduler still frees the storage only after its
    last read: Note [Freed windows]).
    """
    graph = fw_gm.graph
    output = graph.output_node()

    def saved_only(node: torch.fx.Node) -> bool:
        if node.op != "call_function" or aliased_argument(node) is None:
            return False
        target = node.target
        if isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable:
            return False
        return all(user is output or saved_only(user) for user in node.users)

    order = {n: float(i) for i, n in enumerate(graph.nodes)}
    moved: set[torch.fx.Node] = set()
    for node in list(graph.nodes):
        if not saved_only(node) or not node.all_input_nodes:
            continue
        at = max(node.all_input_nodes, key=lambda n: order[n])
        # After the views already moved behind the same input, so that views of views stay in order.
        while at.next in moved and at.next is not node:
            at = at.next
        if at.next is node:
            continue
        at.append(node)
        after = node.next
        order[node] = (order[at] + order[after]) / 2 if after in order else order[at] + 0.5
        moved.add(node)
    graph.lint()
    fw_gm.recompile()


def _fill_rng_values(*graphs: torch.fx.GraphModule) -> None:
    """torch's RNG functionalization (an op tagged ``nondeterministic_seeded`` that a cut recomputes, e.g.
    attention without dropout) wraps it in ``run_and_save_rng_state`` / ``run_with_rng_state`` nodes
    without fake values; memopt's simulator and cost model size every node from its ``meta["val"]``."""
    wrappers = (torch._prims.rng_prims.run_and_save_rng_state, torch._prims.rng_prims.run_with_rng_state)
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in wrappers and "val" not in node.meta:
                node.meta["val"] = fake_result(node, "val")


def _replace_saved(fw_gm: torch.fx.GraphModule, bw_gm: torch.fx.GraphModule, names: frozenset[str], *,
                   num_user_outputs: int, op: torch._ops.OpOverload, args: tuple[str, ...], suffix: str,
                   tag: str) -> list[tuple[torch.fx.Node, torch.fx.Node, torch.Tensor]]:
    """Save ``op(value, *args)`` instead of each saved value in ``names``: the forward makes it right
    after the value, and the backward's input is renamed to match. Returns, per backward input that is
    read, (input, its first reader, the value it used to be) for the caller to rebuild the value."""
    output = fw_gm.graph.output_node()
    returned = output.args[0]
    values = list(returned) if isinstance(returned, (list, tuple)) else [returned]
    nodes = {n.name: n for n in fw_gm.graph.nodes}
    made: dict[str, torch.fx.Node] = {}
    for index in range(num_user_outputs, len(values)):
        value = values[index]
        if not isinstance(value, torch.fx.Node) or value.name not in names:
            continue
        if value.name not in made:
            with fw_gm.graph.inserting_after(nodes[value.name]):
                # Saved values pair with the backward's inputs by name: both sides use <name><suffix>.
                node = fw_gm.graph.create_node("call_function", op, (value, *args),
                                               name=f"{value.name}{suffix}")
            node.meta["val"] = fake_call(op, value.meta["val"], *args)
            node.meta["memopt_pass"] = tag
            made[value.name] = node
        values[index] = made[value.name]
    output.args = (tuple(values),)
    fw_gm.graph.lint()
    fw_gm.recompile()

    order = {n: i for i, n in enumerate(bw_gm.graph.nodes)}
    pending = []
    for placeholder in [n for n in bw_gm.graph.nodes if n.op == "placeholder" and n.name in made]:
        source = made[placeholder.name]
        value = placeholder.meta["val"]
        placeholder.meta["val"] = source.meta["val"]
        placeholder._rename(source.name)
        if placeholder.name != source.name:
            raise RuntimeError(f"cannot name the backward input {placeholder.name!r} {source.name!r}")
        users = sorted(placeholder.users, key=lambda n: order[n])
        if users:
            pending.append((placeholder, users[0], value))
    return pending


def apply_offload(fw_gm: torch.fx.GraphModule, bw_gm: torch.fx.GraphModule, names: frozenset[str], *,
                  num_user_outputs: int, in_segment: frozenset[str] = frozenset()) -> None:
    """Offload the saved values ``names``: the forward copies each to the host pool right after making
    it and saves the host copy; the backward issues its reload one segment ahead of its first use's
    segment (where that segment starts, for the values in ``in_segment``), and waits right before that
    use (Note [Reloads start at segment boundaries] in :mod:`memopt.schedule.streams`)."""
    import memopt.runtime.offload  # noqa: F401 - registers the memopt:: ops

    if not names:
        return
    reload_op = torch.ops.memopt.reload.default
    wait_op = torch.ops.memopt.wait_reload.default
    pending = _replace_saved(fw_gm, bw_gm, names, num_user_outputs=num_user_outputs,
                             op=torch.ops.memopt.offload.default, args=(), suffix=HOST_SUFFIX,
                             tag="schedule:offload")
    uses = [first for _, first, _ in pending]
    ahead = [placeholder.name.removesuffix(HOST_SUFFIX) not in in_segment for placeholder, _, _ in pending]
    issues = reload_issues(bw_gm.graph, uses, ahead)
    reloaded = {}
    for index in issue_order(uses, ahead, bw_gm.graph):    # all reloads first: a wait delays what follows
        placeholder, _, device_val = pending[index]
        with bw_gm.graph.inserting_before(issues[index]):
            node = bw_gm.graph.call_function(reload_op, (placeholder, device_val.device))
        node.meta["val"] = fake_call(reload_op, placeholder.meta["val"], device_val.device)
        node.meta["memopt_pass"] = "schedule:offload"
        reloaded[index] = node
    for index, (placeholder, first, _) in enumerate(pending):
        with bw_gm.graph.inserting_before(first):
            waited = bw_gm.graph.call_function(wait_op, (reloaded[index],))
        waited.meta["val"] = None
        waited.meta["memopt_pass"] = "schedule:offload"
        placeholder.replace_all_uses_with(reloaded[index], delete_user_cb=lambda n: n is not reloaded[index])
    bw_gm.graph.lint()
    bw_gm.recompile()


def apply_compress(fw_gm: torch.fx.GraphModule, bw_gm: torch.fx.GraphModule, names: frozenset[str], *,
                   num_user_outputs: int, fmt: str) -> None:
    """Store the saved values ``names`` compressed: the forward packs each right after making it and
    saves the packed copy (``<name>_packed``); the backward unpacks it right before its first use."""
    import memopt.runtime.compress  # noqa: F401 - registers the memopt:: ops

    if not names:
        return
    decompress_op = torch.ops.memopt.decompress.default
    pending = _replace_saved(fw_gm, bw_gm, names, num_user_outputs=num_user_outputs,
                             op=torch.ops.memopt.compress.default, args=(fmt,), suffix=PACKED_SUFFIX,
                             tag="schedule:compress")
    for placeholder, first, val in pending:
        args = (list(val.shape), list(val.stride()), val.dtype, fmt)
        with bw_gm.graph.inserting_before(first):
            unpacked = bw_gm.graph.call_function(decompress_op, (placeholder, *args))
        unpacked.meta["val"] = fake_call(decompress_op, placeholder.meta["val"], *args)
        unpacked.meta["memopt_pass"] = "schedule:compress"
        placeholder.replace_all_uses_with(unpacked, delete_user_cb=lambda n: n is not unpacked)
    bw_gm.graph.lint()
    bw_gm.recompile()


@dataclasses.dataclass(frozen=True)
class Realiser:
    """What realising a plan on one joint graph needs besides the plan (see :func:`realise_plan`)."""

    joint: torch.fx.GraphModule                 # priced: its nodes carry ``memopt_cost``
    # The partition with these nodes tagged for recomputation, on torch's knapsack cut at this share
    # of the saved bytes when below 1 (the caller may keep partitions: Note [Reusing partitions across
    # lengths] in memopt/compiler/capture.py).
    partition: Callable[[frozenset[str], float], tuple[torch.fx.GraphModule, torch.fx.GraphModule]]
    num_user_outputs: int
    input_kinds: Callable[[torch.fx.GraphModule], tuple[str, ...]]   # of a forward graph's inputs
    profile: DeviceProfile
    fused_costs: bool = False
    offload: bool = True                        # whether the options allow offload at all
    host_bytes: int | None = None               # Note [Bounded host memory]
    compress_format: str | None = None          # "int8" / "fp8" when the options allow compression
    forward: frozenset[str] = frozenset()       # the joint graph's forward ops (forward_region)

    def transfer_s(self, nbytes: int) -> float:
        return transfer_time_s(nbytes, self.profile)

    def problem(self, base: Evaluation) -> ScheduleProblem:
        """The scheduler's linear model of the plans on ``base``'s cut (:func:`memopt.schedule.model.build_problem`),
        with the transfers and the packing the options allow, priced as :func:`realise_plan` prices them."""
        compression = None if self.compress_format is None else \
            (lambda nbytes, packed: packing_time_s(nbytes, packed, self.profile))
        return build_problem(self.joint, base.forward, base.backward, base.timeline, base.candidates,
                             self.transfer_s if self.offload else None, compression)

    @functools.cached_property
    def op_times(self) -> dict[str, float]:
        """The joint graph's op times by name, as priced (read once, for every plan realised)."""
        return {node.name: node.meta["memopt_cost"].time_s for node in self.joint.graph.nodes
                if "memopt_cost" in node.meta}


def realise_plan(plan: Plan, share: float, realiser: Realiser) -> Evaluation:
    """Realise ``plan`` and measure it: tag and partition the joint graph (on torch's knapsack cut at
    ``share`` when below 1), rewrite the offloaded and compressed values, simulate the step, and price
    what it adds (the forward ops the backward runs again, the copy stream's stall, packing).
    Offloads are kept to what the cut saves and the host pool holds, compression to what the cut saves."""
    n = realiser.num_user_outputs
    fw, bw = realiser.partition(plan.recompute, share)
    saved_list = saved_values(fw, n)
    saved = frozenset(saved_list)
    offload = within_host(fw, plan.offload & saved, realiser.host_bytes)
    apply_offload(fw, bw, offload, num_user_outputs=n, in_segment=plan.reload_in_segment)
    compress = plan.compress & saved if realiser.compress_format is not None else frozenset()
    if compress:
        apply_compress(fw, bw, compress, num_user_outputs=n, fmt=realiser.compress_format or "int8")
    timeline = simulate_step(fw, bw, input_kinds=realiser.input_kinds(fw), num_user_outputs=n)
    priced = realiser.op_times
    added = sum(priced[node.name] if node.name in priced else
                estimate_node(node, realiser.profile, fused=realiser.fused_costs).time_s
                for node in rerun_forward_ops(bw, realiser.forward))
    added += exposed_transfer_s(fw, bw, realiser.transfer_s)
    added += sum(packing_time_s(value_bytes(node), value_bytes(node.args[0]), realiser.profile)
                 for node in fw.graph.nodes if node.meta.get("memopt_pass") == "schedule:compress")
    found = candidates(realiser.joint, saved_list, realiser.transfer_s if realiser.offload else None,
                       returned_values(fw, n))
    realised = Plan(plan.recompute, offload, compress, plan.reload_in_segment & offload)
    return Evaluation(realised, timeline, found, added, fw, bw, share)


def within_host(fw_gm: torch.fx.GraphModule, offload: frozenset[str], host_bytes: int | None) -> frozenset[str]:
    """The values of ``offload`` that the host pool holds within ``host_bytes``, taken in forward order.

    Note [Bounded host memory]
    Every offloaded value waits in the host pool from its copy in the forward to its reload in the
    backward, so at the boundary the pool holds them all: ``host_memory`` bounds their sum. A plan is
    realised with the offloads that fit, in the forward's order (the first layers' values are reloaded
    last, so their host copies are the ones that hide the most), and the rest stay on the device: the
    simulated peak of that plan says whether it still meets the budget, and the search goes on from
    there, so every plan memopt verifies, runs or reports keeps to the bound.
    """
    if host_bytes is None or not offload:
        return offload
    kept, total = [], 0
    for node in fw_gm.graph.nodes:
        if node.name in offload:
            nbytes = value_bytes(node)
            if total + nbytes <= host_bytes:
                kept.append(node.name)
                total += nbytes
    return frozenset(kept)
