"""The copy stream: where reloads are issued and how much of their time the compute stream waits for.

Golden tests on hand-built graphs with known op times (1 s an op, transfers at 1 byte per second), and
a property: on random plans over a layered backward, the linear rows the scheduler solves with
(:class:`memopt.schedule.streams.CopyQueue`) give the stall the runtime's replay of the same graphs
gives (:func:`memopt.schedule.streams.exposed_transfer_s`), Note [Reloads start at segment boundaries]."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode

import memopt.runtime.offload  # noqa: F401 - registers the memopt:: ops
from memopt.compiler.partition import apply_offload
from memopt.cost_model.estimate import NodeCost
from memopt.schedule.streams import NS, Copy, CopyQueue, exposed_transfer_s, reload_issues, segments


_FAKE = FakeTensorMode()


def _fake(*shape: int) -> torch.Tensor:
    """A fake float32 tensor (what graphs carry as ``meta["val"]``): 4 bytes an element."""
    with _FAKE:
        return torch.empty(shape)


def _cost(seconds: float) -> NodeCost:
    return NodeCost(out_bytes=0, read_bytes=0, flops=0, time_s=seconds)


def _chain(graph: torch.fx.Graph, x: torch.fx.Node, ops: int, seconds: float,
           layers: list[str | None] | None = None) -> list[torch.fx.Node]:
    out = []
    for i in range(ops):
        x = graph.call_function(torch.ops.aten.relu.default, (x,))
        x.meta["memopt_cost"] = _cost(seconds)
        x.meta["val"] = _fake()
        layer = layers[i] if layers is not None else None
        if layer is not None:
            x.meta["nn_module_stack"] = {"m": (f"model.layers.{layer}", object)}
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


def test_segments_are_runs_of_one_layer() -> None:
    # Ops outside every layer (None) join the segment they fall in; the loss's ops start the first.
    assert segments([None, None, "3", "3", None, "2", "2", "1", None]) == [0, 5, 7]
    assert segments(["0"]) == [0] and segments([]) == []


def test_a_stray_op_of_another_layer_does_not_start_a_segment() -> None:
    # Layer 0's op recomputed inside layer 2's run joins that segment; layer 1's starts at its first op.
    assert segments([None, "2", "2", "0", "2", None, "1", "1", "1", "0", "0"]) == [0, 6, 9]
    # Strays either side of a boundary: it goes where the fewest ops sit in another layer's segment,
    # the latest such place on a tie.
    assert segments(["1", "0", "1", "1", "0", "0"]) == [0, 4]
    assert segments(["2", "2", "1", "2", "1", "1", "0", "0"]) == [0, 4, 6]


def test_reloads_are_issued_where_the_segment_of_their_use_starts() -> None:
    graph = torch.fx.Graph()
    ops = _chain(graph, graph.placeholder("t"), 7, 1.0, [None, "2", "2", "1", "1", "0", "0"])
    # Use in layer 1's segment (ops 3-4): in segment at op 3, one ahead at op 0 (the loss's segment,
    # which the first layer joins: it starts at op 0).
    assert reload_issues(graph, [ops[4], ops[4]], [False, True]) == [ops[3], ops[0]]
    assert reload_issues(graph, [ops[6], ops[6]], [False, True]) == [ops[5], ops[3]]
    # The first segment has none before it: ahead is in segment there.
    assert reload_issues(graph, [ops[1]], [True]) == [ops[0]]


def _layered_step(layers: int, per_layer: int, seed: int, strays: bool = False,
                  ) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule, list[str], list[float]]:
    """A forward of ``layers`` x ``per_layer`` ops making one saved value each (random sizes), and a
    backward running the layers in reverse, each op reading the value its forward twin made. Returns the
    graphs (every value saved), the saved names and the op times of the step in order."""
    rng = random.Random(seed)
    fw = torch.fx.Graph()
    x = fw.placeholder("x")
    x.meta["val"] = _fake()
    names, times = [], []
    saved = []
    for layer in range(layers):
        for _ in range(per_layer):
            seconds = rng.choice([0.5, 1.0, 2.0])
            (x,) = _chain(fw, x, 1, seconds, [str(layer)])
            x.meta["val"] = _fake(rng.choice([1, 2, 4, 8]))             # 4-32 bytes: 4-32 s each way
            saved.append(x)
            times.append(seconds)
    fw.output((x, *saved))
    bw = torch.fx.Graph()
    placeholders = []
    for node in saved:
        p = bw.placeholder(node.name)
        p.meta["val"] = node.meta["val"]
        placeholders.append(p)
        names.append(node.name)
    t = bw.placeholder("tangents_1")
    t.meta["val"] = _fake()
    y = t
    for _ in range(2):                                    # the loss's backward: outside every layer
        (y,) = _chain(bw, y, 1, 3.0)
        times.append(3.0)
    for index in reversed(range(len(saved))):
        seconds = rng.choice([0.5, 1.0, 2.0])
        y = bw.call_function(torch.ops.aten.add.Tensor, (y, placeholders[index]))
        y.meta.update(memopt_cost=_cost(seconds), val=_fake(),
                      nn_module_stack={"m": (f"model.layers.{index // per_layer}", object)})
        times.append(seconds)
        if strays and index % per_layer == per_layer - 1 and index // per_layer > 0:
            # A recomputed op of layer 0 (its causal mask) where this layer's backward needs it.
            y = bw.call_function(torch.ops.aten.mul.Tensor, (y, 1.0))
            y.meta.update(memopt_cost=_cost(0.0), val=_fake(), nn_module_stack={"m": ("model.layers.0", object)})
    bw.output((y,))
    return torch.fx.GraphModule({}, fw), torch.fx.GraphModule({}, bw), names, times


@pytest.mark.parametrize("strays", [False, True])
@pytest.mark.parametrize("seed", range(8))
def test_the_models_rows_give_the_stall_the_runtime_replays(seed: int, strays: bool) -> None:
    """Random offloads, each reloaded in segment or one ahead: the queue's rows and the replay of the
    rewritten graphs give the same stall (golden: the replay is the runtime's order of copies). With
    ``strays``, the rewritten backward also runs an op of layer 0 inside every other layer's run (a
    recomputation), which the model's baseline does not have: the segments, and the stall, stay the same."""
    layers, per_layer = 4, 3
    fw, bw, names, times = _layered_step(layers, per_layer, seed, strays)
    rng = random.Random(100 + seed)
    chosen = [n for n in names if rng.random() < 0.6]
    in_segment = frozenset(n for n in chosen if rng.random() < 0.5)
    sizes = {n.name: n.meta["val"].untyped_storage().nbytes() for n in fw.graph.nodes if n.name in names}
    # The model's events: the forward's ops, then the backward's, as the simulator lists them.
    forward_end = layers * per_layer - 1
    bw_layers = [None, None] + [str(i // per_layer) for i in reversed(range(len(names)))]
    starts = [forward_end + 1 + s for s in segments(bw_layers)]
    made = {name: i for i, name in enumerate(names)}
    due = {name: forward_end + 1 + 2 + (len(names) - 1 - i) for i, name in enumerate(names)}
    copies = [[Copy(made[n], round(sizes[n] * NS), due[n], n not in in_segment, round(sizes[n] * NS))]
              for n in chosen]
    queue = CopyQueue(times, forward_end, starts, copies)
    modelled = float(queue.stall(queue.rows.sum(axis=1, keepdims=True))[0]) / NS if copies else 0.0

    apply_offload(fw, bw, frozenset(chosen), num_user_outputs=1, in_segment=in_segment)
    replayed = exposed_transfer_s(fw, bw, _one_way)
    assert modelled == pytest.approx(replayed, abs=1e-6), (chosen, in_segment)


def test_the_queue_prices_a_saturated_stream() -> None:
    """Three values of 4 s each way, offloaded after the forward's first op and reloaded ahead for the
    start of the backward's second segment (6 s of compute before it): the copies out leave 9 s queued
    when the backward starts (12 s against 3 s of compute after their issue), and the reloads, queued
    behind them at the first segment's start, finish 9 + 12 - 6 = 15 s after their use is reached."""
    compute = [1.0] * 4 + [6.0, 1.0, 1.0]          # forward 4 ops; backward: segment 0 (6 s), segment 1
    starts = [4, 5]
    copies = [[Copy(0, round(4 * NS), 5, True, round(4 * NS))] for _ in range(3)]
    queue = CopyQueue(compute, 3, starts, copies)
    loads = queue.rows.sum(axis=1, keepdims=True)
    # Forward: 3 copies out (12 s) issued after op 0, 3 s of compute after: 9 s backlog at the backward.
    # Backward: 9 s backlog + 12 s of reloads, due 6 s after their issue: 15 s late.
    assert float(queue.stall(loads)[0]) / NS == pytest.approx(15.0)
    _, stalls, backlogs = queue.trace(loads)
    assert [float(b[0]) / NS for b in backlogs] == pytest.approx([9.0, 15.0])
    assert [float(z[0]) / NS for z in stalls] == pytest.approx([0.0, 15.0])
    assert np.array_equal(queue.stall(np.zeros_like(loads)), np.zeros(1))
