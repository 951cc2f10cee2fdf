"""Memory simulator: replay a training step's graphs and give the live bytes after every node.

Pure: FX graphs with ``meta["val"]`` in, a :class:`MemoryTimeline` out. Nothing executes and nothing is
allocated, so it runs on fake tensors for a 70B model as well as on a real tiny one.

Note [What the simulator models]
The unit is the *storage*, not the tensor: a view (an op whose schema says its return aliases an argument,
``getitem`` of such a tuple, an in-place op's return) adds no bytes and keeps its base alive. Every other
op allocates a fresh storage of ``untyped_storage().nbytes()`` for each tensor it returns. A storage dies
when the last value referring to it dies, and a value dies right after its last use in the graph — which
is exactly what FX's code generator emits (``x = None`` after the last use) and what the boxed calling
convention allows for the graph's inputs (``args_list.clear()``). Values nothing uses die right after
they are made. The peak is taken after each node's outputs exist and before its dead inputs go, because
that is when both are live.

A training step is forward then backward:
- The forward's inputs (parameters, buffers, user inputs) are held by their owners for the whole step.
- The forward returns the user outputs (held by the caller until the step ends; e.g. ``out.logits``
  while ``out.loss.backward()`` runs) and the saved activations, which the backward frees at their last use
  (AOTAutograd clears ``ctx.saved_tensors`` before running the boxed backward).
- The backward's incoming gradients (tangents) exist when it starts and, like the saved activations,
  are freed at their last use in the backward (AOTAutograd passes both in the cleared boxed list).
- The backward's outputs are the parameter gradients. The autograd engine keeps each one as ``.grad``
  when its strides match the parameter's, and otherwise copies it into the parameter's layout (a clone
  of the same size, then the original is freed), as ``AccumulateGrad`` does.
- Bytes outside the graphs that the caller knows about (optimizer states, gradients that already exist)
  are passed in as ``extra_resident`` and counted throughout.

What it cannot see: scratch memory an op allocates inside itself (a CPU flash-attention's per-thread
buffers, a BLAS workspace), allocator rounding and fragmentation (on CUDA the caching allocator rounds
to 512 bytes and keeps freed blocks reserved; the figure here is allocated bytes), and anything the
caller holds that is not declared.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx

from memopt.cost_model.bytes import hint_int, shape_env_of, storage_nbytes

PACKED_SUFFIX = "_packed"   # the name of a compressed activation's packed copy: ``<value>_packed``
# Before torch 2.13 the compiled backward's caller keeps the tangents (its ``*flat_args``) until the
# backward returns (measured on 2.11: a logits-sized zero tangent outlived its last reader, and the tracked
# peak exceeded the simulated one by it); 2.13 frees each at its last use. 2.12 is assumed to be as 2.11.
TANGENTS_HELD = tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 13)

# The offload host pool (memopt::offload's outputs): counted apart from device memory.
HOST = "host"


def _is_host_output(node: torch.fx.Node) -> bool:
    """memopt::offload returns host-pool memory (matched by name: no import of the runtime needed)."""
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "memopt" \
        and target._opname == "offload"


# Categories of live bytes, in the order reports list them.
CATEGORIES: tuple[str, ...] = (
    "parameters", "buffers", "inputs", "optimizer_states", "gradients", "saved_activations", "outputs",
    "temporaries",
)


@dataclasses.dataclass(frozen=True)
class MemoryEvent:
    phase: str          # "forward", "backward", "accumulate_grad" or "joint"
    node: str           # the FX node's name
    live_bytes: int     # live bytes after the node's outputs exist, before its dead inputs are freed


@dataclasses.dataclass
class MemoryTimeline:
    peak_bytes: int
    peak_phase: str
    peak_node: str
    breakdown: dict[str, int]            # live bytes per category at the peak
    events: list[MemoryEvent]
    saved_activation_bytes: int          # bytes the forward hands to the backward (unique storages)
    resident_bytes: int                  # live at the start of the step (inputs + extra_resident)
    host_peak_bytes: int = 0             # the most the offload host pool held (not device memory)
    largest_at_peak: list[tuple[str, str, int]] = dataclasses.field(default_factory=list)
    # (node that made it, category, bytes): the biggest storages alive at the peak

    def summary(self) -> dict[str, Any]:
        return {
            "peak_bytes": self.peak_bytes,
            "peak_at": f"{self.peak_phase}:{self.peak_node}",
            "breakdown": dict(self.breakdown),
            "saved_activation_bytes": self.saved_activation_bytes,
            "resident_bytes": self.resident_bytes,
        }


# --------------------------------------------------------------------------------------------------------
# Aliasing
# --------------------------------------------------------------------------------------------------------


def _tensors(val: object) -> list[torch.Tensor | None]:
    """The tensor slots of a node's value, positionally (None where a slot is not a tensor)."""
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        return [v if isinstance(v, torch.Tensor) else None for v in val]
    return []


# Ops that return a view of their first argument although their schema does not say so.
# ``_unsafe_view`` is how decompositions reshape a fresh result (e.g. matmul's output) without a copy.
_UNANNOTATED_VIEWS = frozenset({torch.ops.aten._unsafe_view.default})


def aliased_argument(node: torch.fx.Node) -> torch.fx.Node | None:
    """The argument node whose storage ``node``'s (first) output shares, if the op is a view or in-place.

    Read from the operator schema (``Tensor(a)`` on a return and an argument), not from a list of names,
    so new view ops are handled without code changes; ``_UNANNOTATED_VIEWS`` lists the exceptions.
    """
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return None
    if target in _UNANNOTATED_VIEWS:
        first = node.args[0] if node.args else None
        return first if isinstance(first, torch.fx.Node) else None
    schema = target._schema
    if not schema.returns or schema.returns[0].alias_info is None:
        return None
    alias_set = schema.returns[0].alias_info.before_set
    for index, arg in enumerate(schema.arguments):
        info = arg.alias_info
        if info is None:
            continue
        # ``Tensor(a)`` returns share the argument's set. A ``Tensor(a)[]`` return (split, unbind, chunk)
        # reaches Python with an empty set; its argument is then marked ``Tensor(a -> *)``.
        if not (info.before_set & alias_set or (not alias_set and "*" in info.after_set)):
            continue
        value = node.kwargs[arg.name] if arg.name in node.kwargs else (
            node.args[index] if index < len(node.args) else None)
        if isinstance(value, torch.fx.Node):
            return value
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.fx.Node):
            return value[0]
    return None


class _Live:
    """Live storages with reference counts, and running totals per category."""

    def __init__(self) -> None:
        self.size: dict[int, int] = {}
        self.category: dict[int, str] = {}
        self.origin: dict[int, str] = {}
        self.refs: dict[int, int] = {}
        self.total = 0
        self.by_category = dict.fromkeys(CATEGORIES, 0)
        self.host = 0               # the offload host pool: not device memory, reported apart
        self.host_peak = 0
        self._next = 0

    def new(self, nbytes: int, category: str, origin: str) -> int:
        sid = self._next
        self._next += 1
        self.size[sid], self.category[sid], self.origin[sid], self.refs[sid] = nbytes, category, origin, 0
        if category == HOST:
            self.host += nbytes
            self.host_peak = max(self.host_peak, self.host)
        else:
            self.total += nbytes
            self.by_category[category] += nbytes
        return sid

    def acquire(self, sids: Iterable[int]) -> None:
        for sid in sids:
            self.refs[sid] += 1

    def release(self, sids: Iterable[int]) -> None:
        for sid in sids:
            self.refs[sid] -= 1
            if self.refs[sid] == 0:
                if self.category[sid] == HOST:
                    self.host -= self.size[sid]
                else:
                    self.total -= self.size[sid]
                    self.by_category[self.category[sid]] -= self.size[sid]
                del self.refs[sid]

    def largest(self, n: int = 5) -> list[tuple[str, str, int]]:
        alive = sorted((s for s in self.refs if self.category[s] != HOST),
                       key=lambda s: (-self.size[s], self.origin[s]))[:n]
        return [(self.origin[s], self.category[s], self.size[s]) for s in alive]


class _Recorder:
    """Keeps the timeline and the peak."""

    def __init__(self, live: _Live) -> None:
        self.live = live
        self.events: list[MemoryEvent] = []
        self.peak = -1
        self.peak_phase = self.peak_node = ""
        self.breakdown: dict[str, int] = {}
        self.largest: list[tuple[str, str, int]] = []

    def record(self, phase: str, node: str) -> None:
        total = self.live.total
        self.events.append(MemoryEvent(phase, node, total))
        if total > self.peak:
            self.peak, self.peak_phase, self.peak_node = total, phase, node
            self.breakdown = {k: v for k, v in self.live.by_category.items() if v}
            self.largest = self.live.largest()


def storage_root(node: torch.fx.Node) -> torch.fx.Node:
    """The node that made the storage ``node``'s value lives in (``node`` itself unless it is a view or
    an in-place op: :func:`aliased_argument` followed to its end)."""
    while (parent := aliased_argument(node)) is not None:
        node = parent
    return node


def _storage_bytes(t: torch.Tensor) -> int:
    # Symbolic sizes (a dynamic batch or sequence) are evaluated with their hints: the example's sizes.
    return storage_nbytes(t)


# --------------------------------------------------------------------------------------------------------
# Replaying one graph
# --------------------------------------------------------------------------------------------------------


def _last_uses(graph: torch.fx.Graph) -> dict[torch.fx.Node, list[torch.fx.Node]]:
    """For each node, the values whose last use it is (what FX's codegen sets to None after it)."""
    seen: set[torch.fx.Node] = set()
    dies_after: dict[torch.fx.Node, list[torch.fx.Node]] = {n: [] for n in graph.nodes}
    for node in reversed(graph.nodes):
        for arg in node.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                dies_after[node].append(arg)
    return dies_after


def _replay(gm: torch.fx.GraphModule, phase: str, live: _Live, rec: _Recorder,
            placeholder_storages: Sequence[list[int]], moved: Sequence[bool],
            category_of: Callable[[torch.fx.Node, int], str]) -> list[list[int]]:
    """Run ``gm``'s nodes over ``live``; returns the storage ids of each graph output, with one reference
    each that now belongs to the caller.

    ``moved[i]`` says whether the caller hands its reference to input ``i`` over to the graph (the graph
    frees it at its last use: saved activations in the backward); otherwise the caller keeps holding it
    and the graph never frees it (parameters, user inputs, tangents).
    """
    graph = gm.graph
    storages: dict[torch.fx.Node, list[int]] = {}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(placeholder_storages):
        raise ValueError(f"{phase} graph has {len(placeholders)} inputs, {len(placeholder_storages)} given")
    dies_after = _last_uses(graph)
    held: set[torch.fx.Node] = set()
    for node, sids, is_moved in zip(placeholders, placeholder_storages, moved):
        storages[node] = sids
        if not is_moved:
            held.add(node)
        elif not node.users:
            live.release(sids)
    outputs: list[list[int]] = []
    for node in graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            for out in _flat_outputs(node):
                sids = storages.get(out, []) if isinstance(out, torch.fx.Node) else []
                live.acquire(sids)
                outputs.append(sids)
            live.release(s for arg in dies_after[node] if arg not in held for s in storages[arg])
            break
        storages[node] = _output_storages(node, storages, live, category_of)
        live.acquire(storages[node])
        rec.record(phase, node.name)
        dead = [arg for arg in dies_after[node] if arg not in held]
        if not node.users:
            dead.append(node)
        live.release(s for arg in dead for s in storages[arg])
    return outputs


def _output_storages(node: torch.fx.Node, storages: Mapping[torch.fx.Node, list[int]], live: _Live,
                     category_of: Callable[[torch.fx.Node, int], str]) -> list[int]:
    if node.op != "call_function":
        # get_attr constants and call_module results: treat as fresh allocations (conservative).
        tensors = _tensors(node.meta.get("val"))
        return [live.new(_storage_bytes(t), category_of(node, i), node.name)
                for i, t in enumerate(tensors) if t is not None]
    if node.target is operator.getitem:
        parent, index = node.args[0], node.args[1]
        if isinstance(parent, torch.fx.Node) and isinstance(index, int):
            parent_sids = storages.get(parent, [])
            slots = _slot_storages(parent, parent_sids)
            sid = slots.get(index)
            return [] if sid is None else [sid]
        return []
    base = aliased_argument(node)
    if base is not None:
        # A view or an in-place op: its outputs live in the base's storage.
        base_sids = storages.get(base, [])
        count = sum(t is not None for t in _tensors(node.meta.get("val"))) or 1
        return [base_sids[0]] * count if base_sids else []
    category = (lambda i: HOST) if _is_host_output(node) else (lambda i: category_of(node, i))
    return [live.new(_storage_bytes(t), category(i), node.name)
            for i, t in enumerate(_tensors(node.meta.get("val"))) if t is not None]


def _slot_storages(node: torch.fx.Node, sids: list[int]) -> dict[int, int]:
    """Map the tensor slots of a tuple-valued node to its storage ids, in order."""
    slots = [i for i, t in enumerate(_tensors(node.meta.get("val"))) if t is not None]
    if aliased_argument(node) is not None and sids:
        return {i: sids[0] for i in slots}
    return dict(zip(slots, sids))


# --------------------------------------------------------------------------------------------------------
# A training step: forward then backward
# --------------------------------------------------------------------------------------------------------

_KIND_CATEGORY = {"parameter": "parameters", "buffer": "buffers", "input": "inputs", "symint": "inputs"}


def _placeholder_vals(gm: torch.fx.GraphModule) -> list[object]:
    return [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]


def _output_nodes(gm: torch.fx.GraphModule) -> list[object]:
    return _flat_outputs(gm.graph.output_node())


def _flat_outputs(output: torch.fx.Node) -> list[object]:
    """The values a graph returns, flat (AOTAutograd's graphs return a tuple, make_fx's may not)."""
    value = output.args[0]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _obeys_layout(grad: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether ``AccumulateGrad`` can keep ``grad`` as it is (same strides as a dense parameter)."""
    if grad.shape != param.shape:
        return False
    if not (param.is_contiguous() or param.is_contiguous(memory_format=torch.channels_last)):
        return grad.is_contiguous()
    if grad.storage_offset() != 0:
        return False
    env = shape_env_of(grad) or shape_env_of(param)
    return all(hint_int(a, env) == hint_int(b, env) or hint_int(s, env) == 1
               for a, b, s in zip(grad.stride(), param.stride(), grad.shape))


def simulate_step(fw_gm: torch.fx.GraphModule, bw_gm: torch.fx.GraphModule | None, *,
                  input_kinds: Sequence[str], num_user_outputs: int,
                  extra_resident: Mapping[str, int] | None = None) -> MemoryTimeline:
    """Replay forward then backward (or only the forward when ``bw_gm`` is None).

    ``input_kinds`` gives, per forward input, "parameter", "buffer", "input" or "symint";
    ``num_user_outputs`` is how many leading forward outputs go to the caller (the rest are saved for the
    backward); ``extra_resident`` adds bytes held outside the graphs, by category (e.g. optimizer states).
    """
    live = _Live()
    rec = _Recorder(live)
    fw_vals = _placeholder_vals(fw_gm)
    fw_inputs = _hold_inputs(live, fw_vals, input_kinds, extra_resident or {})
    resident = live.total
    rec.record("start", "start")
    fw_outs = _output_nodes(fw_gm)
    fate = _fates(fw_outs, num_user_outputs)

    def fw_category(node: torch.fx.Node, slot: int) -> str:
        return fate.get(node.name, "temporaries")

    outs = _replay(fw_gm, "forward", live, rec, fw_inputs, [False] * len(fw_inputs), fw_category)
    saved = _saved_by_name(live, fw_outs[num_user_outputs:], outs[num_user_outputs:])
    saved_bytes = sum(live.size[s] for s in {s for sids in saved.values() for s in sids}
                      if live.category[s] == "saved_activations")
    if bw_gm is not None:
        _simulate_backward(bw_gm, live, rec, saved, input_kinds, fw_vals)
    else:
        for sids in saved.values():
            live.release(sids)
    # user_sids keep their reference: the caller holds the outputs to the end of the step.
    return MemoryTimeline(
        peak_bytes=rec.peak, peak_phase=rec.peak_phase, peak_node=rec.peak_node, breakdown=rec.breakdown,
        events=rec.events, saved_activation_bytes=saved_bytes, resident_bytes=resident,
        largest_at_peak=rec.largest, host_peak_bytes=live.host_peak)


def _base_of(node: torch.fx.Node) -> torch.fx.Node | None:
    if node.op == "call_function" and node.target is operator.getitem:
        parent = node.args[0]
        return parent if isinstance(parent, torch.fx.Node) else None
    return aliased_argument(node) if node.op == "call_function" else None


def _view_bases(node: torch.fx.Node) -> Iterator[torch.fx.Node]:
    """The nodes whose storage ``node`` views, nearest first."""
    base = _base_of(node)
    while base is not None:
        yield base
        base = _base_of(base)


def _hold_inputs(live: _Live, fw_vals: Sequence[object], input_kinds: Sequence[str],
                 extra_resident: Mapping[str, int]) -> list[list[int]]:
    """What is live before the step: bytes held outside the graphs, by category, and the forward's
    inputs, each held by its owner (module or caller) all step; the inputs' storages."""
    for category, nbytes in sorted(extra_resident.items()):
        if nbytes:
            live.acquire([live.new(int(nbytes), category, f"<{category}>")])
    if len(fw_vals) != len(input_kinds):
        raise ValueError(f"forward graph has {len(fw_vals)} inputs but {len(input_kinds)} input kinds given")
    fw_inputs: list[list[int]] = []
    for i, (val, kind) in enumerate(zip(fw_vals, input_kinds)):
        tensors = [t for t in _tensors(val) if t is not None]
        sids = [live.new(_storage_bytes(t), _KIND_CATEGORY.get(kind, "inputs"), f"input{i}") for t in tensors]
        live.acquire(sids)
        fw_inputs.append(sids)
    return fw_inputs


def _fates(fw_outs: Sequence[object], num_user_outputs: int) -> dict[str, str]:
    """Each forward storage's category comes from its fate: a saved activation from the moment it is
    made (the views' bases too)."""
    fate: dict[str, str] = {}
    for index, out in enumerate(fw_outs):
        if isinstance(out, torch.fx.Node):
            fate.setdefault(out.name, "outputs" if index < num_user_outputs else "saved_activations")
            for base in _view_bases(out):
                fate.setdefault(base.name, fate[out.name])
    return fate


def _saved_by_name(live: _Live, saved_outs: Sequence[object], outs: Sequence[list[int]]) -> dict[str, list[int]]:
    """Saved values by name: the partitioner names the backward's inputs after the forward values they
    receive, and the two orders differ (saved SymInts come last out of the forward, first into the
    backward)."""
    saved: dict[str, list[int]] = {}
    for out, sids in zip(saved_outs, outs):
        name = out.name if isinstance(out, torch.fx.Node) else f"<const{len(saved)}>"
        if name in saved:
            live.release(sids)       # the same value saved twice is held once
        else:
            saved[name] = sids
    return saved


def _simulate_backward(bw_gm: torch.fx.GraphModule, live: _Live, rec: _Recorder, saved: dict[str, list[int]],
                       input_kinds: Sequence[str], fw_vals: Sequence[object]) -> None:
    bw_placeholders = [n for n in bw_gm.graph.nodes if n.op == "placeholder"]
    _pair_rng_states(saved, bw_placeholders)
    # Tangents: made by the autograd engine (or AOTAutograd, for outputs the loss does not use) before
    # the backward runs.
    inputs: list[list[int]] = []
    for node in bw_placeholders:
        if node.name in saved:
            inputs.append(saved.pop(node.name))
        else:
            sids = [live.new(_storage_bytes(t), "temporaries", node.name)
                    for t in _tensors(node.meta.get("val")) if t is not None]
            live.acquire(sids)
            inputs.append(sids)
    for sids in saved.values():
        live.release(sids)           # saved but unused by the backward: ctx lets it go
    bw_outs_nodes = _output_nodes(bw_gm)
    grad_names = {out.name for out in bw_outs_nodes if isinstance(out, torch.fx.Node)}
    grad_bases = {base.name for out in bw_outs_nodes if isinstance(out, torch.fx.Node)
                  for base in _view_bases(out)}

    def bw_category(node: torch.fx.Node, slot: int) -> str:
        return "gradients" if node.name in grad_names or node.name in grad_bases else "temporaries"

    # AOTAutograd clears ctx.saved_tensors and hands saved values and tangents to the boxed backward in
    # one list that it clears: the backward graph holds the only references and frees each value at its
    # last use (measured: a tangent's bytes go when its last reader has run). Packed copies of compressed
    # activations are the exception: something in torch's runtime keeps one more reference to each until
    # the backward returns (measured with the tracker and sys.getrefcount: every other saved value goes
    # at its last use; no Python object refers to them, so the holder is in C++; not traced further).
    # They are counted alive until then, so that a plan with compression is simulated as it runs; so are
    # the tangents where the torch release holds them (TANGENTS_HELD).
    kept = [node.name.endswith(PACKED_SUFFIX) or (TANGENTS_HELD and node.name.startswith("tangents_"))
            for node in bw_placeholders]
    outs = _replay(bw_gm, "backward", live, rec, inputs, [not k for k in kept], bw_category)
    live.release(s for sids, k in zip(inputs, kept) if k for s in sids)
    _accumulate_grads(live, rec, outs, bw_outs_nodes, input_kinds, fw_vals)


def _pair_rng_states(saved: dict[str, list[int]], bw_placeholders: Sequence[torch.fx.Node]) -> None:
    """Name the backward's inputs in ``saved``: torch's RNG functionalization (a recomputed op tagged
    nondeterministic_seeded) passes each op's RNG state as a forward output and a backward input of
    different names, in the same order, after the other saved values: those are paired by position."""
    missing = [n.name for n in bw_placeholders if n.name not in saved and not n.name.startswith("tangents")]
    read = {n.name for n in bw_placeholders}
    unread = [name for name in saved if name not in read]
    if missing and len(unread) == len(missing):
        for name, state in zip(missing, unread):
            saved[name] = saved.pop(state)
        missing = []
    if missing:
        raise ValueError(f"backward inputs {missing[:5]} are neither saved by the forward nor tangents")


def _accumulate_grads(live: _Live, rec: _Recorder, outs: Sequence[list[int]], bw_outs_nodes: Sequence[object],
                      input_kinds: Sequence[str], fw_vals: Sequence[object]) -> None:
    """AccumulateGrad: keep each parameter's gradient, or copy it into the parameter's layout."""
    for index, (sids, out) in enumerate(zip(outs, bw_outs_nodes)):
        if not sids or index >= len(fw_vals) or not isinstance(out, torch.fx.Node):
            live.release(sids)
            continue
        grad, param = out.meta.get("val"), fw_vals[index]
        if input_kinds[index] != "parameter" or not isinstance(grad, torch.Tensor) or \
                not isinstance(param, torch.Tensor):
            live.release(sids)
            continue
        if not _obeys_layout(grad, param):
            clone = live.new(_storage_bytes(param), "gradients", f"{out.name}.clone")
            live.acquire([clone])
            rec.record("accumulate_grad", out.name)
            live.release(sids)

def simulate_joint(joint_gm: torch.fx.GraphModule) -> MemoryTimeline:
    """A coarse estimate on the unpartitioned joint graph, for pass statistics: the joint graph run as
    one program (forward nodes, then backward nodes), its inputs held throughout. Saved-activation bytes
    are the storages made by forward nodes (those that do not depend on a tangent) and read by backward
    nodes."""
    live = _Live()
    rec = _Recorder(live)
    placeholders = [n for n in joint_gm.graph.nodes if n.op == "placeholder"]
    inputs = []
    for node in placeholders:
        sids = [live.new(_storage_bytes(t), "inputs", node.name)
                for t in _tensors(node.meta.get("val")) if t is not None]
        live.acquire(sids)
        inputs.append(sids)
    resident = live.total
    backward = backward_nodes(joint_gm.graph)

    def category(node: torch.fx.Node, slot: int) -> str:
        used_in_bw = node not in backward and any(u in backward for u in node.users)
        return "saved_activations" if used_in_bw else "temporaries"

    _replay(joint_gm, "joint", live, rec, inputs, [False] * len(inputs), category)
    saved_bytes = _saved_bytes_joint(joint_gm, backward)
    return MemoryTimeline(
        peak_bytes=rec.peak, peak_phase=rec.peak_phase, peak_node=rec.peak_node, breakdown=rec.breakdown,
        events=rec.events, saved_activation_bytes=saved_bytes, resident_bytes=resident,
        largest_at_peak=rec.largest)


def backward_nodes(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Nodes that depend on a tangent input."""
    backward: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" and node.name.startswith("tangents"):
            backward.add(node)
        elif node.op not in ("placeholder", "output") and any(a in backward for a in node.all_input_nodes):
            backward.add(node)
    return backward


def _saved_bytes_joint(joint_gm: torch.fx.GraphModule, backward: set[torch.fx.Node]) -> int:
    seen: set[torch.fx.Node] = set()
    total = 0
    for node in joint_gm.graph.nodes:
        if node in backward or node.op in ("placeholder", "output"):
            continue
        if not any(u in backward for u in node.users):
            continue
        base = node
        while (parent := _base_of(base)) is not None:
            base = parent
        if base.op == "placeholder" or base in seen:
            continue
        seen.add(base)
        total += sum(_storage_bytes(t) for t in _tensors(base.meta.get("val")) if t is not None)
    return total
