"""Partition the joint graph into the forward and backward graphs.

memopt realises its memory decisions through the tags torch's partitioner already honours —
``node.meta["recompute"]`` (``CheckpointPolicy.MUST_SAVE`` / ``MUST_RECOMPUTE``) and
``node.meta["should_offload"]`` — rather than a partitioner of its own (see DESIGN.md). Until the
scheduler sets any tag, this is torch's min-cut rematerialization partition, the same one Inductor uses by
default, so memopt's graphs are Inductor's graphs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.fx
from torch._functorch.partitioners import min_cut_rematerialization_partition

from memopt.cost_model.bytes import storage_nbytes
from memopt.errors import MemoptError
from memopt.passes.rewrite import fake_call, fake_result
from memopt.schedule.problem import protect_unrepeatable, redrawn_random
from memopt.schedule.simulate import PACKED_SUFFIX, aliased_argument
from memopt.schedule.streams import reload_points


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
                  num_user_outputs: int, transfer_time_s: Callable[[int], float]) -> None:
    """Offload the saved values ``names``: the forward copies each to the host pool right after making
    it and saves the host copy; the backward reloads it ahead of its first use — early enough that the
    compute in between (by the cost model) covers the transfer, the copies queued one after another
    (:func:`memopt.schedule.streams.reload_points`) — and waits right before that use."""
    import memopt.runtime.offload  # noqa: F401 - registers the memopt:: ops

    if not names:
        return
    reload_op = torch.ops.memopt.reload.default
    wait_op = torch.ops.memopt.wait_reload.default
    pending = _replace_saved(fw_gm, bw_gm, names, num_user_outputs=num_user_outputs,
                             op=torch.ops.memopt.offload.default, args=(), suffix="_host",
                             tag="schedule:offload")
    starts = reload_points(bw_gm.graph, [(first, transfer_time_s(storage_nbytes(val))) for _, first, val in pending])
    for (placeholder, first, device_val), at in zip(pending, starts):
        with bw_gm.graph.inserting_before(at):
            reloaded = bw_gm.graph.call_function(reload_op, (placeholder, device_val.device))
        with bw_gm.graph.inserting_before(first):
            waited = bw_gm.graph.call_function(wait_op, (reloaded,))
        reloaded.meta["val"] = fake_call(reload_op, placeholder.meta["val"], device_val.device)
        waited.meta["val"] = None
        for node in (reloaded, waited):
            node.meta["memopt_pass"] = "schedule:offload"
        placeholder.replace_all_uses_with(reloaded, delete_user_cb=lambda n: n is not reloaded)
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
