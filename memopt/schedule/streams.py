"""Copies between host and device on a stream of their own: where a reload starts, what waiting costs.

Note [Exposed transfer time]
An offload copies a value to the host right after it is made, on a copy stream, while the compute
stream goes on; a reload is started ahead of the value's first backward use and waited for right before
it. The copy stream does one copy at a time, so copies queue behind each other, and the compute stream
stalls only when it reaches a wait whose copy has not finished. The time a plan adds by offloading is
that stall, not the copies' duration. :func:`exposed_transfer_s` replays the two streams over the
partitioned graphs with the cost model's op times; the forward's copies may run on into the backward
(the host copy is read back only by its own reload).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import torch
import torch.fx

from memopt.cost_model.bytes import storage_nbytes


def _op_name(node: torch.fx.Node) -> str | None:
    target = node.target
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "memopt":
        return str(target._opname)
    return None


def _op_time(node: torch.fx.Node) -> float:
    cost = node.meta.get("memopt_cost")
    return float(cost.time_s) if cost is not None else 0.0


def value_bytes(node: torch.fx.Node) -> int:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return 0
    return storage_nbytes(val)


def prefetch_point(first_use: torch.fx.Node, seconds: float) -> torch.fx.Node:
    """The node before which to start a reload so that the compute until ``first_use`` (by the cost
    model) covers ``seconds`` of transfer; never before the graph's inputs."""
    at, covered = first_use, 0.0
    while covered < seconds and at.prev.op not in ("placeholder", "root"):
        at = at.prev
        covered += _op_time(at)
    return at


def reload_points(graph: torch.fx.Graph, reloads: list[tuple[torch.fx.Node, float]]) -> list[torch.fx.Node]:
    """For reloads (first use, seconds of transfer), the nodes before which to start each, so that the
    copy stream, one copy at a time, finishes each before its use: scheduled backwards from the
    latest deadline, a reload ends where the next one must start (Note [Exposed transfer time]).
    Never before the graph's first op: what cannot be covered there is exposed."""
    ops = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    if not ops:
        return [use for use, _ in reloads]
    start_at: dict[torch.fx.Node, float] = {}
    clock = 0.0
    for node in ops:
        start_at[node] = clock
        clock += _op_time(node)
    times = [start_at[n] for n in ops]
    position = {n: i for i, n in enumerate(ops)}
    starts: dict[int, torch.fx.Node] = {}
    free_until = float("inf")      # the copy stream is busy from here on with later reloads
    for index in sorted(range(len(reloads)), key=lambda i: -start_at.get(reloads[i][0], 0.0)):
        use, seconds = reloads[index]
        deadline = start_at.get(use, 0.0)
        finish = min(deadline, free_until)
        # Starting earlier than one extra transfer ahead of its own prefetch point holds memory for
        # nothing when the stream is saturated: the wait is exposed either way (and the scheduler's
        # model assumes reloads start near their own prefetch points).
        begin = max(finish - seconds, deadline - 2 * seconds)
        free_until = min(free_until, begin)
        # The last op that starts no later than ``begin`` (and not after the use itself).
        last = bisect.bisect_right(times, begin) - 1
        starts[index] = ops[max(0, min(last, position.get(use, len(ops) - 1)))]
    return [starts[i] for i in range(len(reloads))]


def exposed_transfer_s(fw_gm: torch.fx.GraphModule, bw_gm: torch.fx.GraphModule | None,
                       transfer_time_s: Callable[[int], float]) -> float:
    """Seconds the compute stream waits for memopt's offloads and reloads (Note [Exposed transfer
    time]): 0 when every copy hides behind compute."""
    compute = copy = 0.0          # when each stream is next free
    pure = 0.0                    # compute time alone
    ready: dict[str, float] = {}  # host copy or reloaded value -> when its copy is done
    graphs = [g for g in (fw_gm, bw_gm) if g is not None]
    for graph in graphs:
        for node in graph.graph.nodes:
            if node.op != "call_function":
                continue
            op = _op_name(node)
            if op == "offload":
                copy = max(copy, compute) + transfer_time_s(value_bytes(node.args[0]))
                ready[node.name] = copy
            elif op == "reload":
                source = node.args[0]
                start = max(copy, compute, ready.get(getattr(source, "name", ""), 0.0))
                copy = start + transfer_time_s(value_bytes(node))
                ready[node.name] = copy
            elif op == "wait_reload":
                compute = max(compute, ready.get(getattr(node.args[0], "name", ""), 0.0))
            else:
                seconds = _op_time(node)
                compute += seconds
                pure += seconds
    return max(0.0, compute - pure)
