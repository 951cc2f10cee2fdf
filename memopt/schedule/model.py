"""The scheduling problem as a linear model over the baseline plan's memory timeline.

Pure: the annotated joint graph and the baseline partition (simulated) in, a :class:`ScheduleProblem`
out. The solver (:mod:`memopt.schedule.cpsat`) decides on it; whatever it decides is then realised
through the partitioner's tags and measured exactly (Note [Plans are realised through the partitioner's
tags] in :mod:`memopt.schedule.problem`).

Note [Freed windows]
The baseline simulation gives the live bytes after every node of the step. A saved value ``v`` of
``b`` bytes is made at event ``p``, last read by the forward at ``lf``, and first read by the backward
at ``f``. Kept, it is live from ``p`` to its last backward use. Recomputed, the forward still makes it
(its forward readers need it) but drops it after ``lf``, and the backward makes it again just before
``f``: it frees ``b`` bytes for the events strictly between ``lf`` and ``f``. Offloaded, it frees them
between ``lf`` and where its reload is issued: the start of ``f``'s segment of the backward, or of the
segment before (Note [Reloads start at segment boundaries] in :mod:`memopt.schedule.streams`).
So every choice is a window of freed bytes, and the live bytes of a plan at event ``t`` are the
baseline's minus the windows that cover ``t``: the budget is one linear constraint per event.

A saved value may be a view of a storage that other ops read after the view is made (memopt's
partition step makes the views the forward makes only to save, a transpose of attention's
probabilities for its matmul's backward, right after their base: Note [Saved views are made where
their base is] in :mod:`memopt.compiler.partition`). Its storage is alive until its last *read* (by an
op that is not a view of it), so every window starts there at the earliest: recomputed, the view is not
made and the storage goes after that read; offloaded or compressed, the view is copied where it is made,
and the storage still goes only after that read.

Recomputing ``v`` re-runs its op and the ops between it and values the backward has anyway (saved
values and graph inputs): its *recompute set*, whose time is the recompute cost. The saved values that
set reads must be available when it runs, so a value another recomputation reads is freed only until
that recomputation's time (its window ends at the earliest such ``f``), whether or not the reader is
recomputed: conservative, and exact when nothing reads it. The backward has a value anyway when a
saved value shares its storage (a softmax output the partitioner saves ``detach``-ed): a recompute set
reads it through that saved alias rather than re-running the ops that made it. The partitioner may then
save the alias it reads beside the saved value (one storage), and an offload or compression of the saved
value frees nothing while the reader is recomputed: the model does not see this, the verification does
(excluding those pairs outright cost more than it saved: on GPT-2 XL at the knapsack-0.5 peak the outer
model's best plan went from 3.71 to 4.30 ms, and no plan it had verified over the budget); the
refinement, whose small models it does not slow, excludes them (Note [Refining the decomposed plan]:
without, a refined GPT-2 XL plan measured 208 MB over the budget). A recompute
set of a value in a repeated layer may reach ops outside every layer (the causal mask that every layer's
attention reads, ~25 ops from positions): the backward runs such an op once for all the recomputations
that need it, so a layer's value is charged for the ops of layers only (the one re-run it leaves out,
the verification counts). Nor is it charged for ops the modelled cut's backward runs again anyway:
torch's min-cut recomputes cheap pointwise ops around what it saves (tanh-GELU's ``0.5 * x`` and
``1 + tanh(...)``), and the backward runs each once; charged again, GPT-2's GELU output cost twice what
recomputing it adds, and refined plans verified up to 0.25 ms dearer than the model said. What the
model cannot see (the partitioner changing the rest of its cut around a tag, a recomputation's own
temporaries) the verification measures.
"""

from __future__ import annotations

import bisect
import dataclasses
import operator
from collections.abc import Callable, Mapping

import torch
import torch.fx

from memopt.names import layer_of
from memopt.schedule.problem import (
    Candidate,
    Plan,
    _unrecomputable_reason,
    forward_region,
    rerun_forward_ops,
)
from memopt.schedule.simulate import (
    MemoryEvent,
    MemoryTimeline,
    aliased_argument,
    storage_root,
)
from memopt.schedule.streams import NS, Copy, segments

# A recompute set larger than this is left to the partitioner (the value is kept or offloaded). An
# attention softmax whose mask is not saved needs ~60 ops (the mask built again from positions).
MAX_RECOMPUTE_OPS = 96
KEEP = "keep"
RECOMPUTE = "recompute"
OFFLOAD = "offload"
COMPRESS = "compress"
# Tensors smaller than this are not worth a compress kernel and its scales.
MIN_COMPRESS_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class Option:
    """One way of freeing a saved value: ``nbytes`` fewer live bytes at events ``start < t < end``."""

    kind: str                    # RECOMPUTE, OFFLOAD or COMPRESS
    start: int
    end: int
    time_s: float = 0.0          # recompute: the ops' predicted time; compress: packing + unpacking
    out_s: float = 0.0           # offload: the copy to the host, issued where the value is made
    in_s: float = 0.0            # offload: the copy back, issued at ``end``, due at ``due``
    freed: int | None = None     # bytes it frees, when not all of the value's (compress keeps a packed copy)
    due: int = -1                # offload: the event that first reads the value again
    ahead: bool = False          # offload: issued a segment ahead of ``due``'s (else where it starts)


@dataclasses.dataclass(frozen=True)
class Item:
    """A saved value of the baseline partition and the ways to free it."""

    name: str
    nbytes: int
    made: int                            # event index where the forward makes it
    first_backward_use: int
    group: str | None                    # the repeated layer it belongs to ("model.layers.3"), if any
    pattern: str                         # its place in the layer, the layer index stripped
    options: tuple[Option, ...]
    recompute_set: tuple[str, ...] = ()  # joint-graph nodes recomputing it re-runs, itself last
    reads: tuple[str, ...] = ()          # saved values (items) that recompute set reads
    reads_alias: tuple[str, ...] = ()    # of those, the ones it reads through another alias of them
    members: tuple[str, ...] = ()        # the saved values sharing its storage (itself included)

    def freed_by(self, option: Option) -> int:
        return self.nbytes if option.freed is None else option.freed


Choices = dict[str, Option]              # value -> how it is freed (kept values absent)


@dataclasses.dataclass
class ScheduleProblem:
    events: list[MemoryEvent]
    base: list[int]                      # live bytes after each event in the baseline plan
    compute_s: list[float]               # op time of each event's node
    items: list[Item]
    forward_end: int                     # index of the last forward event
    point_group: list[str | None]        # the repeated layer each event's node belongs to
    # Events where the backward's segments start (Note [Reloads start at segment boundaries]).
    segment_starts: list[int] = dataclasses.field(default_factory=list)
    # Whether conflicts() also excludes reads through an alias of an offloaded or compressed value.
    alias_conflicts: bool = False
    # The solver's work that does not depend on the budget (layer fronts), kept between its solves.
    memo: dict[object, object] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def live_bytes(self, plan: Mapping[str, Option]) -> list[int]:
        """The live bytes after each event when ``plan`` is applied, in this model."""
        delta = [0] * (len(self.base) + 1)
        for item in self.items:
            option = plan.get(item.name)
            if option is not None and option.end - option.start > 1:
                delta[option.start + 1] -= item.freed_by(option)
                delta[option.end] += item.freed_by(option)
        out, running = [], 0
        for base, d in zip(self.base, delta):
            running += d
            out.append(base + running)
        return out

    def peak_bytes(self, plan: Mapping[str, Option]) -> int:
        return max(self.live_bytes(plan), default=0)

    def recompute_nodes(self, plan: Mapping[str, Option]) -> frozenset[str]:
        return frozenset(n for item in self.items if (o := plan.get(item.name)) is not None
                         and o.kind == RECOMPUTE for n in item.recompute_set)

    def offloaded(self, plan: Mapping[str, Option]) -> frozenset[str]:
        return frozenset(name for name, option in plan.items() if option.kind == OFFLOAD)

    def compressed(self, plan: Mapping[str, Option]) -> frozenset[str]:
        return frozenset(name for name, option in plan.items() if option.kind == COMPRESS)

    def plan_of(self, choices: Mapping[str, Option]) -> Plan:
        """The plan ``choices`` make, to be realised."""
        return Plan(self.recompute_nodes(choices), self.offloaded(choices), self.compressed(choices),
                    frozenset(n for n, o in choices.items() if o.kind == OFFLOAD and not o.ahead))

    def copy_of(self, item: Item, option: Option) -> Copy | None:
        """``option``'s copies on the copy stream, when it offloads ``item``."""
        if option.kind != OFFLOAD:
            return None
        return Copy(item.made, round(option.out_s * NS), option.due, option.ahead, round(option.in_s * NS))

    def added_time_s(self, choices: Mapping[str, Option]) -> float:
        """``choices``' added time in this model: recompute and compression time, and the copy stream's
        stall (Note [Reloads start at segment boundaries])."""
        from memopt.schedule.streams import CopyQueue

        by_name = {item.name: item for item in self.items}
        copies = [[c] for name, o in choices.items() if (c := self.copy_of(by_name[name], o)) is not None]
        queue = CopyQueue(self.compute_s, self.forward_end, self.segment_starts, copies)
        stall = float(queue.stall(queue.rows.sum(axis=1, keepdims=True))[0]) / NS if copies else 0.0
        return sum(o.time_s for o in choices.values()) + stall

    def conflicts(self) -> list[tuple[str, Option, str, Option]]:
        """Pairs of choices that cannot go together: recomputing ``w`` (option ``a``) reads ``u``, and
        ``u``'s option ``b`` brings it back only after that recomputation runs; with
        :attr:`alias_conflicts`, also when ``b`` offloads or compresses ``u`` and ``w`` reads it through
        another alias (Note [Freed windows])."""
        by_name = {item.name: item for item in self.items}
        out = []
        for w in self.items:
            for a in w.options:
                if a.kind != RECOMPUTE:
                    continue
                for name in w.reads:
                    u = by_name.get(name)
                    if u is None or u is w:
                        continue
                    through = self.alias_conflicts and name in w.reads_alias
                    out += [(w.name, a, u.name, b) for b in u.options
                            if b.end > a.end or (through and b.kind != RECOMPUTE)]
        return out


def _alias_closure(node: torch.fx.Node) -> list[torch.fx.Node]:
    """``node`` and every node that shares its storage by being a view (or getitem) of it."""
    out, stack = [], [node]
    while stack:
        n = stack.pop()
        out.append(n)
        for user in n.users:
            if user.op == "call_function" and (aliased_argument(user) is n or (
                    user.target is operator.getitem and user.args[0] is n)):
                stack.append(user)
    return out


def _can_rerun(node: torch.fx.Node) -> bool:
    """Whether the backward may run ``node`` again: a deterministic, non-mutating aten op (or an element
    of one's outputs) that the user's checkpoint policy does not pin."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        source = node.args[0]
        return isinstance(source, torch.fx.Node) and _can_rerun(source)
    reason = _unrecomputable_reason(node)
    return reason is None or reason == "not a single tensor"


def _recompute_set(node: torch.fx.Node, available: Mapping[str, str], order: Mapping[torch.fx.Node, int],
                   ) -> tuple[list[torch.fx.Node], set[str], set[str]] | None:
    """The joint nodes recomputing ``node`` re-runs (in graph order), the available values they read,
    and those of them read through another alias; None when it cannot be recomputed within
    :data:`MAX_RECOMPUTE_OPS` ops. ``available`` maps a node to the available value it can be read from
    (itself, or a saved value sharing its storage: Note [Freed windows])."""
    chosen: dict[torch.fx.Node, None] = {}
    reads: set[str] = set()
    aliased: set[str] = set()
    root = storage_root(node)
    stack = [node]
    while stack:
        n = stack.pop()
        if n in chosen:
            continue
        if not _can_rerun(n):
            return None
        chosen[n] = None
        if len(chosen) > MAX_RECOMPUTE_OPS:
            return None
        for arg in n.all_input_nodes:
            if arg.op == "placeholder":
                continue
            source = available.get(arg.name)
            # A value sharing the recomputed value's own storage is not there to read from.
            if source is not None and arg is not node and (source == arg.name or storage_root(arg) is not root):
                reads.add(source)
                if source != arg.name:
                    aliased.add(source)
            else:
                stack.append(arg)
    return sorted(chosen, key=lambda n: order[n]), reads, aliased


def _compressed_bytes(node: torch.fx.Node) -> int | None:
    """Bytes of the packed copy of ``node``'s value, or None when it is not worth or not able to be
    compressed (not floating point, symbolic sizes, small, or a view that does not own its storage)."""
    from memopt.runtime.compress import COMPRESSIBLE, packed_nbytes

    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dtype not in COMPRESSIBLE:
        return None
    if not all(isinstance(s, int) for s in (*val.shape, *val.stride())):
        return None
    nbytes = val.numel() * val.element_size()
    if nbytes < MIN_COMPRESS_BYTES or val.untyped_storage().nbytes() != nbytes:
        return None
    return packed_nbytes(val.shape)


def build_problem(joint_gm: torch.fx.GraphModule, fw_gm: torch.fx.GraphModule, bw_gm: torch.fx.GraphModule,
                  timeline: MemoryTimeline, found: list[Candidate],
                  transfer_time_s: Callable[[int], float] | None,
                  compress_time_s: Callable[[int, int], float] | None = None) -> ScheduleProblem:
    """The linear model of the baseline plan (Note [Freed windows]); ``transfer_time_s`` (bytes ->
    seconds one way) allows offload, ``compress_time_s`` ((bytes, packed bytes) -> seconds to pack and
    unpack) allows compression (lossy: only when the user asked for it)."""
    built = _Builder(joint_gm, fw_gm, bw_gm, timeline, found)
    built.spans()
    built.group_by_storage()
    ends = built.ends()
    items = [built.item(name, members, ends[name], transfer_time_s, compress_time_s)
             for name, members in built.members_of.items()]
    return ScheduleProblem(events=built.events, base=[e.live_bytes for e in built.events],
                           compute_s=built.compute_s, items=items, forward_end=built.forward_end,
                           point_group=built.point_group, segment_starts=built.starts)


class _Builder:
    """The phases of :func:`build_problem`, sharing the graphs and what each phase found."""

    def __init__(self, joint_gm: torch.fx.GraphModule, fw_gm: torch.fx.GraphModule, bw_gm: torch.fx.GraphModule,
                 timeline: MemoryTimeline, found: list[Candidate]) -> None:
        self.events, self.found = timeline.events, found
        self.nbytes = {c.name: c.nbytes for c in found}
        self.index = {(e.phase, e.node): i for i, e in enumerate(self.events)}
        self.forward_end = max((i for i, e in enumerate(self.events) if e.phase == "forward"), default=0)
        nodes_by_phase = {phase: {n.name: n for n in gm.graph.nodes}
                          for phase, gm in (("forward", fw_gm), ("backward", bw_gm))}
        self.fw_nodes, self.bw_nodes = nodes_by_phase["forward"], nodes_by_phase["backward"]
        self.compute_s, self.point_group = [], []
        for event in self.events:
            node = nodes_by_phase.get(event.phase, {}).get(event.node)
            cost = node.meta.get("memopt_cost") if node is not None else None
            self.compute_s.append(float(cost.time_s) if cost is not None else 0.0)
            self.point_group.append(layer_of(node)[0] if node is not None else None)
        first_backward = self.forward_end + 1
        self.starts = [first_backward + i for i in segments(self.point_group[first_backward:])]
        self.joint_nodes = {n.name: n for n in joint_gm.graph.nodes}
        self.joint_order = {n: i for i, n in enumerate(joint_gm.graph.nodes)}
        self.available = {n.name: n.name for n in bw_gm.graph.nodes if n.op == "placeholder"}
        # A saved value's storage holds every value that views it: a recomputation that needs the
        # softmax whose detached alias is saved reads that alias rather than re-running the scores.
        for c in found:
            for alias in _alias_closure(storage_root(self.joint_nodes[c.name])):
                self.available.setdefault(alias.name, c.name)
        self.available.update((c.name, c.name) for c in found)
        # Forward ops the modelled cut's backward runs again already (torch's min-cut recomputes cheap
        # pointwise ops, tanh-GELU's 0.5 * x and 1 + tanh(...)): a recomputation that needs them too adds
        # nothing for them, the backward runs each once (Note [Freed windows]).
        self.rerun_already = {n.name for n in rerun_forward_ops(bw_gm, forward_region(joint_gm))}

    def spans(self) -> None:
        """Per saved value: where it is made, last read by the forward and first by the backward; its
        storage's last forward read; and its recompute set."""
        index = self.index
        self.span: dict[str, tuple[int, int, int]] = {}
        self.storage_read: dict[str, int] = {}
        self.recompute: dict[str, tuple[list[torch.fx.Node], set[str], set[str]]] = {}
        for c in self.found:
            fw_node, placeholder = self.fw_nodes.get(c.name), self.bw_nodes.get(c.name)
            if fw_node is None or placeholder is None or c.held:
                continue
            made = index.get(("forward", c.name))
            uses = [index[("backward", u.name)] for a in _alias_closure(placeholder) for u in a.users
                    if ("backward", u.name) in index]
            if made is None or not uses:
                continue
            # A saved view (a transpose of attention's probabilities) is often made at the forward's end,
            # only to be saved; its storage was last *read* much earlier. Recomputed, the view is not made
            # and the storage goes after that read (Note [Freed windows]).
            root = storage_root(fw_node)
            aliases = _alias_closure(root)
            own = aliases if root is fw_node else _alias_closure(fw_node)
            fw_uses = [index[("forward", u.name)] for a in own for u in a.users if ("forward", u.name) in index]
            self.span[c.name] = (made, max([made, *fw_uses]), min(uses))
            alias_set = set(aliases)
            read_at = [index[("forward", u.name)] for a in aliases for u in a.users
                       if u not in alias_set and ("forward", u.name) in index]
            self.storage_read[c.name] = max([index.get(("forward", root.name), made), *read_at])
            found_set = _recompute_set(self.joint_nodes[c.name], self.available, self.joint_order)
            if found_set is not None:
                self.recompute[c.name] = found_set

    def group_by_storage(self) -> None:
        """Values sharing a storage (views of one base the backward reads several of) are freed together
        or not at all: one item, recomputed together, never offloaded (each view would copy the storage)."""
        bases: dict[str, list[str]] = {}
        for c in self.found:
            bases.setdefault(storage_root(self.joint_nodes[c.name]).name, []).append(c.name)
        span = self.span
        self.members_of: dict[str, list[str]] = {}       # item name -> the saved values it stands for
        item_of: dict[str, str] = {}
        for names in bases.values():
            present = sorted((n for n in names if n in span), key=lambda n: (span[n][0], n))
            if present:
                self.members_of[present[0]] = present
                item_of.update((n, present[0]) for n in present)
        self.item_span = {name: (min(span[m][0] for m in ms), max(span[m][1] for m in ms),
                                 min(span[m][2] for m in ms)) for name, ms in self.members_of.items()}
        self.item_recompute: dict[str, tuple[list[torch.fx.Node], set[str]]] = {}
        self.item_aliased: dict[str, set[str]] = {}
        for name, ms in self.members_of.items():
            if all(m in self.recompute for m in ms):
                ops = sorted({n for m in ms for n in self.recompute[m][0]}, key=lambda n: self.joint_order[n])
                reads = {item_of[r] for m in ms for r in self.recompute[m][1] if r in item_of} - {name}
                self.item_recompute[name] = (ops, reads)
                self.item_aliased[name] = {item_of[r] for m in ms for r in self.recompute[m][2]
                                           if r in item_of} - {name}

    def ends(self) -> dict[str, list[int]]:
        """Per item, the events by which it may have to be back (Note [Freed windows]): its own first
        use; the earliest recomputation that may read it (a value a recomputation reads must be back by
        the time that recomputation runs, and that is as early as the recomputations that read *its*
        result: a chain, a residual stream, is recomputed all at once where its last link is first
        needed); and the first uses of the recomputations that read it directly (often well after the
        chain's earliest link: those ends let a value stay freed across a peak between the chain's start
        and its readers). Which one applies is the solver's business (conflicts)."""
        needed_by = {name: span[2] for name, span in self.item_span.items()}
        changed = True
        while changed:
            changed = False
            for name, (_, reads) in self.item_recompute.items():
                for read in reads:
                    if needed_by[name] < needed_by[read]:
                        needed_by[read] = needed_by[name]
                        changed = True
        readers_first_use: dict[str, set[int]] = {}
        for name, (_, reads) in self.item_recompute.items():
            for read in reads:
                readers_first_use.setdefault(read, set()).add(self.item_span[name][2])
        return {name: sorted({span[2], needed_by[name]} | {t for t in readers_first_use.get(name, ()) if t < span[2]})
                for name, span in self.item_span.items()}

    def item(self, name: str, members: list[str], ends: list[int], transfer_time_s: Callable[[int], float] | None,
             compress_time_s: Callable[[int, int], float] | None) -> Item:
        """The item of saved value ``name`` (and the ``members`` sharing its storage), with its options."""
        nbytes = self.nbytes[name]
        made, last_fw, first_bw = self.item_span[name]
        # A saved view may be made before its base's last read (Note [Saved views are made where their
        # base is]): copied or packed there, its storage is still freed only after that read.
        storage_last = max(self.storage_read[m] for m in members)
        copied = max(last_fw, storage_last)
        options = self._recompute_options(name, storage_last, ends)
        if transfer_time_s is not None and len(members) == 1:
            options += self._offload_options(copied, ends, transfer_time_s(nbytes))
        packed = _compressed_bytes(self.fw_nodes[name]) if compress_time_s is not None and len(members) == 1 else None
        if packed is not None and compress_time_s is not None:
            options += [Option(COMPRESS, copied, end, time_s=compress_time_s(nbytes, packed),
                               freed=nbytes - packed) for end in ends]
        options = list(dict.fromkeys(o for o in options if o.end - o.start > 1))
        layer, pattern = layer_of(self.joint_nodes[name])
        target = self.joint_nodes[name].target
        recomputed = self.item_recompute.get(name)
        return Item(name=name, nbytes=nbytes, made=made, first_backward_use=first_bw, group=layer,
                    pattern=f"{pattern}:{getattr(target, '__name__', target)}", options=tuple(options),
                    recompute_set=tuple(n.name for n in recomputed[0]) if recomputed else (),
                    reads=tuple(sorted(recomputed[1])) if recomputed else (),
                    reads_alias=tuple(sorted(self.item_aliased.get(name, ()))), members=tuple(members))

    def _recompute_options(self, name: str, storage_last: int, ends: list[int]) -> list[Option]:
        if name not in self.item_recompute:
            return []
        ops, _ = self.item_recompute[name]
        # Ops outside every layer (the causal mask every layer's attention reads) are re-run once in the
        # backward for all the layers that recompute through them: a layer's value is charged for its
        # layers' ops only (Note [Freed windows]).
        in_layers = layer_of(self.joint_nodes[name])[0] is not None
        seconds = sum(float(n.meta["memopt_cost"].time_s) for n in ops if "memopt_cost" in n.meta
                      and n.name not in self.rerun_already and not (in_layers and layer_of(n)[0] is None))
        # Not made at all, a saved value frees its storage after the storage's last read (no view of it
        # is needed any longer: the item stands for every saved value sharing it).
        return [Option(RECOMPUTE, storage_last, end, time_s=seconds) for end in ends]

    def _offload_options(self, copied: int, ends: list[int], one_way: float) -> list[Option]:
        """Reloads issued where the due event's segment starts, or where the one before it does (Note
        [Reloads start at segment boundaries])."""
        options = []
        for end in ends:
            segment = bisect.bisect_right(self.starts, end) - 1
            for ahead in (False, True)[:2 if segment > 0 else 1]:
                issue = self.starts[segment - ahead] if segment >= 0 else end
                options.append(Option(OFFLOAD, copied, min(issue, end), out_s=one_way, in_s=one_way,
                                      due=end, ahead=ahead))
        return options
