"""The copy stream: where reloads start and how much of their time the compute stream waits for.

Golden tests on hand-built graphs with known op times: an FX graph of three ops at 1 s each, offloads
and reloads of known sizes at a transfer speed of 1 byte per second."""

from __future__ import annotations

import torch
import torch.fx

import memopt.runtime.offload  # noqa: F401 - registers the memopt:: ops
from memopt.cost_model.estimate import NodeCost
from memopt.schedule.streams import exposed_transfer_s, reload_points


def _cost(seconds: float) -> NodeCost:
    return NodeCost(out_bytes=0, read_bytes=0, flops=0, time_s=seconds)


def _chain(graph: torch.fx.Graph, x: torch.fx.Node, ops: int, seconds: float) -> list[torch.fx.Node]:
    out = []
    for _ in range(ops):
        x = graph.call_function(torch.ops.aten.relu.default, (x,))
        x.meta["memopt_cost"] = _cost(seconds)
        out.append(x)
    return out


def _one_way(nbytes: int) -> float:
    return float(nbytes)          # 1 byte per second: a 4-byte float32 scalar takes 4 s


def _graphs(reload_before: int) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """Forward: x -> 3 ops, offloading the first op's output (a 4-byte scalar). Backward: 3 ops, the
    reload issued before op ``reload_before`` and waited for before the last op."""
    fw = torch.fx.Graph()
    x = fw.placeholder("x")
    x.meta["val"] = torch.empty(())
    ops = _chain(fw, x, 3, 1.0)
    with fw.inserting_after(ops[0]):
        host = fw.call_function(torch.ops.memopt.offload.default, (ops[0],), name="v_host")
    ops[0].meta["val"] = torch.empty(())
    fw.output((ops[-1], host))
    bw = torch.fx.Graph()
    h = bw.placeholder("v_host")
    t = bw.placeholder("t")
    body = _chain(bw, t, 3, 1.0)
    with bw.inserting_before(body[reload_before]):
        back = bw.call_function(torch.ops.memopt.reload.default, (h, torch.device("cpu")))
    back.meta["val"] = torch.empty(())
    with bw.inserting_before(body[-1]):
        bw.call_function(torch.ops.memopt.wait_reload.default, (back,))
    bw.output((body[-1],))
    return torch.fx.GraphModule({}, fw), torch.fx.GraphModule({}, bw)


def test_exposed_time_is_the_wait_not_the_copy() -> None:
    # The offload (4 s) runs while the forward's last two ops run (2 s) and spills 2 s into the
    # backward. The reload (4 s) starts when both the copy stream and the compute stream reach it.
    fw, bw = _graphs(reload_before=0)
    # Compute: fw 3 s; bw starts at 3. Copy: offload 1..5, reload 5..9. Wait before bw op 3 (at 5 s):
    # 4 s exposed.
    assert exposed_transfer_s(fw, bw, _one_way) == 4.0
    fw, bw = _graphs(reload_before=2)
    # Reload issued at 5 s of compute (before bw op 3), done at 9: the wait is 4 s as well.
    assert exposed_transfer_s(fw, bw, _one_way) == 4.0


def test_nothing_is_exposed_when_compute_covers_the_copies() -> None:
    fw, bw = _graphs(reload_before=0)
    assert exposed_transfer_s(fw, bw, lambda nbytes: 0.25 * nbytes) == 0.0   # 1 s each way


def test_reloads_are_scheduled_backwards_on_one_stream() -> None:
    graph = torch.fx.Graph()
    t = graph.placeholder("t")
    ops = _chain(graph, t, 8, 1.0)                      # op i starts at i seconds
    # Two reloads due at op 6 (2 s each): the later one takes 4..6, the earlier 2..4.
    first, second = reload_points(graph, [(ops[6], 2.0), (ops[6], 2.0)])
    starts = sorted([ops.index(first), ops.index(second)])
    assert starts == [2, 4]
    # Alone, a 3 s reload due at op 5 starts at op 2; a reload is never placed after its use, and
    # one that cannot be covered starts at the first op.
    (alone,) = reload_points(graph, [(ops[5], 3.0)])
    assert ops.index(alone) == 2
    (early,) = reload_points(graph, [(ops[1], 5.0)])
    assert early is ops[0]
