"""Time and traffic of each node of an aten-level graph, against a device profile (a roofline).

Note [Roofline per node]
~~~~~~~~~~~~~~~~~~~~~~~~
Each kernel is assumed to run at the slower of its two limits: arithmetic (FLOPs over the matmul peak for
its input dtype) and memory (bytes read plus bytes written over the memory bandwidth), plus a fixed
launch overhead. Only ops PyTorch's flop counter counts (matmuls, convolutions, attention) are given an
arithmetic limit; elementwise and reduction ops are memory-bound on every device memopt targets, so
their FLOPs would never decide the time. Each limit is the profile's peak times the share of it a kernel
of that class and size reaches (Note [Efficiency curves] in profile.py): matmuls by their FLOPs and input
dtype (fused attention as its own class, against the same matmul peak), the rest by the bytes they move,
as a reduction when the output has fewer elements than the largest input and as elementwise otherwise.
Built-in profiles have datasheet peaks and no curves, so their absolute times are optimistic; `memopt
tune` measures both.

Note [Fused costs]
~~~~~~~~~~~~~~~~~~
Inductor (``codegen="inductor"`` or ``"triton"``) fuses chains of elementwise and reduction ops into
one kernel, often into the kernel that consumes them: their intermediates are never written and the chain
launches once, not once per op. Costed one kernel per op, recomputing an RMSNorm (six ops) would look
six launches dearer than recomputing the matmul after it, the opposite of what runs, and the scheduler
would recompute FLOPs to spare pointwise work Inductor does for the price of its reads. So with
``fused=True`` an aten/prims op whose FLOPs PyTorch's counter does not count costs the time to read its
inputs and nothing else: no launch, no write (the fused group's one launch and final write are not
charged; reads of intermediates that stay in registers are: the two errors point opposite ways and are
small beside a matmul). Matmuls, attention and every non-aten op (memopt's own, custom kernels) keep
their full cost. The eager code generator runs every node as its own kernel: ``fused=False``. The few
aten ops without FLOPs that Inductor runs as library calls instead (``sort``, ``topk``, ``cumsum``,
``_embedding_bag``, ...) are underpriced by this; in the tiny Llama's and GPT-2's joint graphs the only
one is a ``cumsum`` over the position ids.

Note [Which nodes launch nothing]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Views (every return of the op's schema aliases an input without writing it: ``view``, ``t``,
``expand``, ``slice``, ``split``, ``detach``, ...), ``getitem`` on a multi-output node, placeholders,
``get_attr`` and the output node move 0 bytes and cost 0 time; but a view run op by op (``fused=False``,
the eager code generator) is still a call through the dispatcher, as dear as a launch on a CPU (2-3 us,
a twentieth of a tiny Llama's eager step), so it costs the launch overhead there. ``_unsafe_view``
carries no alias annotation but is a reshape that never copies (AOTAutograd emits it after
``bmm``/``mm`` decompositions), so it is treated as a view. Allocation-only ops (``empty*``) write
nothing and launch nothing: they cost 0 time but their output bytes are counted as allocated.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import torch
import torch.fx

from memopt.cost_model.bytes import hint_int, value_nbytes
from memopt.cost_model.flops import node_flops
from memopt.cost_model.profile import MEMORY_CLASSES, DeviceProfile, dtype_name
from memopt.errors import MemoptError, MemoptUnsupportedError

__all__ = [
    "COST_META_KEY",
    "NodeCost",
    "annotate_costs",
    "estimate_node",
    "graph_time_s",
    "op_class",
    "transfer_time_s",
]

# node.meta key under which annotate_costs stores each node's NodeCost.
COST_META_KEY = "memopt_cost"

_aten = torch.ops.aten

# See Note [Which nodes launch nothing].
_VIEWS_WITHOUT_ALIAS_INFO = frozenset({_aten._unsafe_view.default})
_ALLOCATION_ONLY = frozenset({
    _aten.empty.memory_format,
    _aten.empty_strided.default,
    _aten.empty_like.default,
    _aten.new_empty.default,
    _aten.new_empty_strided.default,
})


@dataclasses.dataclass(frozen=True)
class NodeCost:
    """What one node costs. Byte counts are at the example inputs' sizes (ShapeEnv hints)."""

    # Bytes of the tensors the node produces: written by a kernel, or held by a placeholder / get_attr.
    # 0 for views, getitem and the output node, which only alias memory produced elsewhere.
    out_bytes: int
    # Bytes of the distinct input tensors a kernel reads; 0 for nodes that launch nothing.
    read_bytes: int
    # FLOPs counted by PyTorch's flop formulas (0 for ops they do not count).
    flops: int
    # Predicted run time in seconds (roofline plus launch overhead; 0 for nodes that launch nothing).
    time_s: float


_FREE = NodeCost(out_bytes=0, read_bytes=0, flops=0, time_s=0.0)


def _is_view(op: torch._ops.OpOverload) -> bool:
    if op in _VIEWS_WITHOUT_ALIAS_INFO:
        return True
    returns = op._schema.returns
    return bool(returns) and all(
        r.alias_info is not None and not r.alias_info.is_write for r in returns
    )


def _has_tensor(val: object) -> bool:
    if isinstance(val, torch.Tensor):
        return True
    if isinstance(val, (tuple, list)):
        return any(_has_tensor(v) for v in val)
    return False


def _first_tensor(val: object) -> torch.Tensor | None:
    if isinstance(val, torch.Tensor):
        return val
    if isinstance(val, (tuple, list)):
        for item in val:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _val(node: torch.fx.Node, reader: torch.fx.Node) -> Any:
    if "val" not in node.meta:
        who = "" if node is reader else f" (read by '{reader.name}')"
        raise MemoptUnsupportedError(
            f"node '{node.name}'{who} has no meta['val']; the cost model sizes tensors from fake-tensor "
            "metadata. Run torch.fx.passes.fake_tensor_prop.FakeTensorProp on the graph (or trace it with "
            "make_fx / AOTAutograd, which set it) before costing it."
        )
    return node.meta["val"]


def _get_attr_value(node: torch.fx.Node) -> Any:
    if "val" in node.meta:
        return node.meta["val"]
    # get_attr nodes of traced graphs often lack meta["val"]; the attribute itself is the value.
    value: Any = node.graph.owning_module
    for part in str(node.target).split("."):
        if not hasattr(value, part):
            raise MemoptUnsupportedError(
                f"get_attr node '{node.name}' refers to '{node.target}', which its graph module does not "
                "have and which has no meta['val']; the graph is inconsistent. Run gm.graph.lint() and "
                "check the pass that created this node."
            )
        value = getattr(value, part)
    return value


def _input_dtype(node: torch.fx.Node) -> torch.dtype | None:
    # The matmul peak depends on the operand dtype, not the result's (_scaled_mm: fp8 in, bf16 out).
    for arg in node.all_input_nodes:
        t = _first_tensor(arg.meta.get("val"))
        if t is not None:
            return t.dtype
    return None


def estimate_node(node: torch.fx.Node, profile: DeviceProfile, *, fused: bool = False) -> NodeCost:
    """Roofline cost of one node; see Note [Roofline per node], Note [Which nodes launch nothing] and,
    with ``fused``, Note [Fused costs]."""
    if node.op == "output":
        return _FREE
    if node.op == "placeholder":
        return dataclasses.replace(_FREE, out_bytes=value_nbytes(_val(node, node)))
    if node.op == "get_attr":
        return dataclasses.replace(_FREE, out_bytes=value_nbytes(_get_attr_value(node)))
    if node.target is operator.getitem:
        return _FREE
    if isinstance(node.target, torch._ops.OpOverload) and _is_view(node.target):
        # Op by op, a view is still a dispatched call (Note [Which nodes launch nothing]).
        return _FREE if fused else dataclasses.replace(_FREE, time_s=profile.launch_overhead_s)

    out_val = _val(node, node)
    if not _has_tensor(out_val):
        # SymInt arithmetic and size queries (sym_size, sym_numel, operator.mul on SymInts) run on the
        # host while tracing or as scalar code; they launch no kernel.
        return _FREE
    out_bytes = value_nbytes(out_val)
    if node.target in _ALLOCATION_ONLY:
        return dataclasses.replace(_FREE, out_bytes=out_bytes)

    # all_input_nodes is deduplicated: x + x reads x once.
    read_bytes = sum(value_nbytes(_val(arg, node)) for arg in node.all_input_nodes)
    flops = node_flops(node)
    kernel_class = op_class(node, flops) if profile.efficiency else ""     # no curves: every class at peak
    if fused and flops == 0 and _fusable(node.target):
        return NodeCost(out_bytes=out_bytes, read_bytes=read_bytes, flops=0,
                        time_s=_memory_time(read_bytes, kernel_class, profile))
    memory_time = _memory_time(read_bytes + out_bytes, kernel_class, profile)
    if flops > 0:
        dtype = _input_dtype(node) or torch.float32
        rate = profile.matmul_flops_for(dtype) * profile.efficiency_at(kernel_class, flops)
        kernel_time = max(flops / rate, memory_time)
    else:
        kernel_time = memory_time
    return NodeCost(
        out_bytes=out_bytes,
        read_bytes=read_bytes,
        flops=flops,
        time_s=kernel_time + profile.launch_overhead_s,
    )


def op_class(node: torch.fx.Node, flops: int | None = None) -> str:
    """The efficiency class of a kernel node (Note [Roofline per node]): ``matmul.<input dtype>`` when
    PyTorch's counter counts its FLOPs (``attention.<input dtype>`` for fused attention), else
    ``reduction`` or ``elementwise`` by its element counts."""
    if (node_flops(node) if flops is None else flops) > 0:
        kind = "attention" if "attention" in str(node.target) else "matmul"
        return f"{kind}.{dtype_name(_input_dtype(node) or torch.float32)}"
    out = _first_tensor(node.meta.get("val"))
    # At the hints: comparing symbolic sizes would add guards to the graph's ShapeEnv.
    largest = max((hint_int(t.numel()) for arg in node.all_input_nodes
                   if (t := _first_tensor(arg.meta.get("val"))) is not None), default=0)
    if out is not None and hint_int(out.numel()) < largest:
        return "reduction"
    return "elementwise"


def _memory_time(nbytes: int, kernel_class: str, profile: DeviceProfile) -> float:
    # A matmul's or attention's traffic streams like an elementwise op's.
    memory_class = kernel_class if kernel_class in MEMORY_CLASSES else "elementwise"
    return nbytes / (profile.memory_bandwidth * profile.efficiency_at(memory_class, nbytes))


def _fusable(target: Any) -> bool:
    # See Note [Fused costs]: what Inductor lowers to its own loops (aten and prims ops).
    return isinstance(target, torch._ops.OpOverload) and target.namespace in ("aten", "prims")


def annotate_costs(gm: torch.fx.GraphModule, profile: DeviceProfile, *, fused: bool = False,
                   ) -> dict[str, NodeCost]:
    """Store ``node.meta["memopt_cost"]`` on every node; return the costs by node name, in graph order.
    ``fused``: the graph runs through a fusing code generator (Note [Fused costs])."""
    costs: dict[str, NodeCost] = {}
    for node in gm.graph.nodes:
        cost = estimate_node(node, profile, fused=fused)
        node.meta[COST_META_KEY] = cost
        costs[node.name] = cost
    return costs


def graph_time_s(gm: torch.fx.GraphModule, profile: DeviceProfile) -> float:
    """Predicted time of running every node of the graph once, in order (annotates the graph)."""
    # fsum is exact, so the total does not depend on summation order or on float rounding drift.
    return math.fsum(cost.time_s for cost in annotate_costs(gm, profile).values())


def transfer_time_s(nbytes: int, profile: DeviceProfile) -> float:
    """Seconds to copy ``nbytes`` between host and device in one direction (what an offload pays)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise MemoptError(
            f"transfer_time_s got nbytes={nbytes!r}; expected a non-negative int byte count "
            "(evaluate symbolic sizes with memopt.cost_model.hint_int first)."
        )
    return nbytes / profile.host_device_bandwidth


def packing_time_s(nbytes: int, packed: int, profile: DeviceProfile) -> float:
    """Seconds to store a value of ``nbytes`` compressed to ``packed`` bytes and restore it: the pack
    reads the value and writes the packed copy, the unpack reads that and writes the value; two
    launches."""
    return 2 * (nbytes + packed) / profile.memory_bandwidth + 2 * profile.launch_overhead_s
