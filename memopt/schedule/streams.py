"""Copies between host and device on a stream of their own: where a reload starts, what waiting costs.

Note [Exposed transfer time]
An offload copies a value to the host right after it is made, on the copy stream, while the compute
stream goes on; a reload is issued at a point of the backward and waited for right before the value's
first use. The copy stream does one copy at a time in the order they are issued, so copies queue behind
each other, and the compute stream stalls only when it reaches a wait whose copy has not finished. The
time a plan adds by offloading is that stall, not the copies' duration. :func:`exposed_transfer_s`
replays the two streams over the partitioned graphs with the cost model's op times; the forward's copies
may run on into the backward (the host copy is read back only by its own reload).

Note [Reloads start at segment boundaries]
The scheduler's model and the runtime must price a reload the same way, so the model decides where each
reload is issued and the runtime issues it there. The backward runs the repeated layers one after
another: its *segments* (:func:`segments`) hold one layer's ops each (ops outside every layer, and a
recomputed op of another layer run inside one, join the segment they fall in; the ops before the first
layer, the loss's backward, are the first). A reload is issued where the segment of its first use starts
(*in segment*), or where the segment before it starts (*one segment ahead*: it hides behind that
segment's compute, and holds its bytes that much longer). At one boundary the copies go in that order:
the segment's own reloads, then the next segment's, each by first use. The copy stream is then a queue
whose arrivals are known. When the compute reaches a boundary, the copies still queued are those issued a
segment ahead for this one (and, at the first, the forward's); a copy waited for at ``t`` is late by what
is queued before it and itself, less the compute from the boundary to ``t``, and the segment stalls by
its latest copy's lateness. The copy stream works on while the compute waits, so what is queued at the
next boundary is this one's backlog plus what was issued here, less the segment's compute and its stall
(never below 0), and the step's stall is the sum of its segments'. :class:`CopyQueue` writes this as
linear rows, which the CP-SAT model takes as constraints and its greedy evaluates with numpy; the
forward's copies, issued as their values are made, enter as the backlog at the backward's start. The
model's memory windows end where the reloads are issued, so a plan's peak and its added time are both the
runtime's, up to what the model does not see (a recomputation's own compute, which only hides more).

Note [A drained copy stream]
The queue's backlog carries from segment to segment, and a stall drains it (the copy stream works while
the compute waits): as CP-SAT constraints the chain is weak (its relaxation lets a stall stand in for
backlog), and on GPT-2 XL the solver ended 66% from its bound where it had ended 2% from it. So the
solver's model asks more of a plan: what is issued at a segment's start (and the forward's copies still
queued when the backward starts) must be done by the next segment's start. The backlog is then 0 at
every boundary after the first, a segment's stall is its own reloads' lateness alone, and the rows are
independent of each other. Plans that carry copies across a boundary are left out of the solver's
search (they rarely pay: a stall is added time, a recomputation usually costs less); the greedy that
warm-starts it, and every price of a plan, use the whole queue (:meth:`CopyQueue.stall`).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx

from memopt.cost_model.bytes import storage_nbytes
from memopt.names import layer_of

NS = 1e9                       # the model's time unit: nanoseconds


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


def segments(layers: Sequence[str | None]) -> list[int]:
    """Where each segment of the backward starts (Note [Reloads start at segment boundaries]), given the
    layer of each op in order (None: outside every layer). Index 0 always starts one.

    A backward with recomputations has strays: an op of one layer run inside another's (the causal mask
    that layer 0 builds and every layer's attention reads, recomputed where layer 44's backward needs
    it), and the model's baseline, which recomputes nothing, has none. So a segment is not a run: the
    layers go in the order of their ops' median positions, each segment holds one layer, and the
    boundaries are those that leave the fewest ops of another layer inside a segment (ops outside every
    layer count for none), each as late as that allows, which puts it at the layer's first op when there
    are no strays. Cut at every change of layer instead, one stray splits a segment in three and moves
    its reloads' issue points past where the model, reading the baseline, put them."""
    if not layers:
        return []
    positions: dict[str, list[int]] = {}
    for index, layer in enumerate(layers):
        if layer is not None:
            positions.setdefault(layer, []).append(index)
    order = sorted(positions, key=lambda layer: (positions[layer][len(positions[layer]) // 2], layer))
    if len(order) < 2:
        return [0]
    n, codes = len(layers), {layer: k for k, layer in enumerate(order)}
    code = np.array([-1 if layer is None else codes[layer] for layer in layers])
    at = np.arange(n + 1)
    # others[k][j]: ops of a layer other than k among the first j; a segment [i, j) of layer k holds
    # others[k][j] - others[k][i] strays. cost[j]: the fewest strays with the segments so far ending at j.
    others = np.zeros((len(order), n + 1), dtype=np.int64)
    others[:, 1:] = np.cumsum((code[None, :] >= 0) & (code[None, :] != np.arange(len(order))[:, None]), axis=1)
    big = np.int64(1 << 40)
    cost, back = others[0].copy(), []
    cost[0] = big                             # no segment is empty
    for k in range(1, len(order)):
        # Segment k starts at i < j: the least cost[i] - others[k][i] over i < j, the latest on ties.
        reach = cost - others[k]
        best = np.minimum.accumulate(reach)
        latest = np.maximum.accumulate(np.where(reach <= best, at, -1))
        cost = np.full(n + 1, big)
        cost[1:] = np.minimum(best[:-1] + others[k][1:], big)
        back.append(np.concatenate([[0], latest[:-1]]))
    starts, end = [], n
    for k in reversed(range(len(order) - 1)):
        end = int(back[k][end])
        starts.append(end)
    return [0, *reversed(starts)]


def reload_issues(graph: torch.fx.Graph, first_uses: Sequence[torch.fx.Node], ahead: Sequence[bool],
                  ) -> list[torch.fx.Node]:
    """For reloads by their first use in ``graph`` (a backward graph), the node before which to issue each:
    the start of the use's segment, or of the segment before it when ``ahead`` (Note [Reloads start at
    segment boundaries]). Issue them before each node in the order of :func:`issue_order`."""
    ops = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    if not ops:
        return list(first_uses)
    starts = segments([layer_of(n)[0] for n in ops])
    position = {n: i for i, n in enumerate(ops)}
    issued = []
    for use, early in zip(first_uses, ahead):
        segment = bisect.bisect_right(starts, position.get(use, len(ops) - 1)) - 1
        issued.append(ops[starts[max(0, segment - 1) if early else segment]])
    return issued


def issue_order(first_uses: Sequence[torch.fx.Node], ahead: Sequence[bool], graph: torch.fx.Graph) -> list[int]:
    """The order to issue reloads in, at one boundary: in-segment ones first, each kind by first use."""
    position = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(range(len(first_uses)), key=lambda i: (ahead[i], position.get(first_uses[i], 0), i))


@dataclasses.dataclass(frozen=True)
class Copy:
    """One offloaded value's two copies, as the model sees them: made at event ``made`` (the copy out is
    issued there), reloaded for event ``due``, ``ahead`` of its segment or not, in nanoseconds."""

    made: int
    out_ns: int
    due: int
    ahead: bool
    in_ns: int


class CopyQueue:
    """The copy stream as linear rows over choice variables (Note [Reloads start at segment boundaries]).

    ``copies[v]``: the copies variable ``v`` issues when chosen. :attr:`rows` (rows x variables) holds
    each row's load, linear in the choices; :meth:`stall` turns loads into the stall, and
    :meth:`constrain` writes the same into a CP-SAT model. The rows: per forward issue point, the copies
    out issued there or later (against the forward's compute after it); per segment, the reloads issued
    at its start for itself and for the next segment; and per due time, the reloads of one issue group
    due by then."""

    def __init__(self, compute_s: Sequence[float], forward_end: int, starts: Sequence[int],
                 copies: Sequence[Sequence[Copy]]) -> None:
        prefix = np.concatenate([[0], np.cumsum([round(s * NS) for s in compute_s])]).astype(np.int64)
        self.starts = list(starts) or [forward_end + 1]
        flat = [(v, c) for v, cs in enumerate(copies) for c in cs]
        owner = np.array([v for v, _ in flat], dtype=np.int64)
        made, out_ns, due, in_ns = (np.array([getattr(c, f) for _, c in flat], dtype=np.int64)
                                    for f in ("made", "out_ns", "due", "in_ns"))
        ahead = np.array([c.ahead for _, c in flat], dtype=bool)
        # The segment each reload is due in, and whether it is issued where the one before it starts.
        segment = np.maximum(0, np.searchsorted(np.array(self.starts), due, side="right") - 1)
        early = ahead & (segment > 0)
        rows: list[np.ndarray] = []

        def add(weights: np.ndarray) -> int:
            rows.append(np.bincount(owner, weights=weights, minlength=len(copies)).astype(np.int64))
            return len(rows) - 1

        fw_total = int(prefix[forward_end + 1])
        self.forward: list[tuple[int, int]] = []          # (row, compute after its issue point)
        for tau in np.unique(made).tolist():
            self.forward.append((add(np.where(made >= tau, out_ns, 0)), fw_total - int(prefix[tau + 1])))
        # Issued at a segment's start: its own reloads, and the next segment's issued ahead.
        self.issued = [(add(np.where((segment == s) & ~early, in_ns, 0)),
                        add(np.where((segment == s + 1) & early, in_ns, 0))) for s in range(len(self.starts))]
        self.windows = [int(prefix[b] - prefix[a]) for a, b in zip(self.starts, self.starts[1:])]
        # Per segment and due time t, with the compute from the segment's start to t: its own reloads
        # due by t (issued behind the backlog), and those issued ahead due after t (queued behind it).
        self.due: list[tuple[list[tuple[int, int]], list[tuple[int, int]]]] = []
        for s, start in enumerate(self.starts):
            own, ahead_here = (segment == s) & ~early, (segment == s) & early
            self.due.append((
                [(add(np.where(own & (due <= tau), in_ns, 0)), int(prefix[tau] - prefix[start]))
                 for tau in np.unique(due[own]).tolist()],
                [(add(np.where(ahead_here & (due > tau), in_ns, 0)), int(prefix[tau] - prefix[start]))
                 for tau in np.unique(due[ahead_here]).tolist()]))
        self.rows = np.array(rows, dtype=np.int64).reshape(len(rows), len(copies))

    def stall(self, loads: np.ndarray) -> np.ndarray:
        """The stall (ns) for row loads (rows x plans), one per plan."""
        return self.trace(loads)[0]

    def trace(self, loads: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """(the stall, the stall in each segment, the backlog at each segment's start; the first is the
        forward's copies still queued when the backward starts) for row loads (rows x plans)."""
        width = loads.shape[1:]
        backlog = np.zeros(width)
        for row, cap in self.forward:
            backlog = np.maximum(backlog, loads[row] - cap)
        stalls, backlogs = [], []
        for s in range(len(self.starts)):
            backlogs.append(backlog)
            own_rows, ahead_rows = self.due[s]
            stall = np.zeros(width)
            for row, slack in own_rows:
                stall = np.maximum(stall, backlog + loads[row] - slack)
            for row, slack in ahead_rows:
                stall = np.maximum(stall, backlog - loads[row] - slack)
            stalls.append(stall)
            if s < len(self.windows):
                own, ahead = self.issued[s]
                backlog = np.maximum(0, backlog + loads[own] + loads[ahead] - self.windows[s] - stall)
        return sum(stalls, np.zeros(width)), stalls, backlogs

    def constrain(self, model: Any, load: Callable[[int], Any], bound: int) -> tuple[Any, list[Any]]:
        """The stall as a CP-SAT expression over ``model``'s variables, with the stream drained at every
        segment boundary after the first (Note [A drained copy stream]), ``load(row)`` being a row's
        linear expression and ``bound`` an upper bound of any load; with the per-segment stall variables
        and the forward's backlog at the backward's start."""
        spill = model.NewIntVar(0, bound, "spill")
        for row, cap in self.forward:
            model.Add(spill >= load(row) - cap)
        stalls = []
        for s in range(len(self.starts)):
            stall = model.NewIntVar(0, bound, f"stall{s}")
            backlog = spill if s == 0 else 0
            for row, slack in self.due[s][0]:
                model.Add(stall >= backlog + load(row) - slack)
            stalls.append(stall)
            if s < len(self.windows):
                own, ahead = self.issued[s]
                model.Add(backlog + load(own) + load(ahead) <= self.windows[s])
        return sum(stalls), [*stalls, spill]


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
