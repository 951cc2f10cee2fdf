"""FLOPs of aten-level FX nodes, from their shape metadata alone.

The formulas are PyTorch's own (``torch.utils.flop_counter.flop_registry``, the table ``FlopCounterMode``
uses), so memopt and ``FlopCounterMode`` agree on what an op costs. They are applied to the shapes in
``meta["val"]`` of the arguments and the output; no op runs.

Note [Concrete shapes for flop formulas]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The registry's formulas are plain Python over sizes, and some of them compare sizes (the attention
formulas assert that batch and head counts agree). Fed SymInts, those comparisons would install guards in
the user's ShapeEnv and could specialise a dynamic graph just because we costed it. So every tensor is
replaced, before the formula sees it, by a meta tensor of the same dtype whose sizes and strides are the
hinted ints; the formula then does integer arithmetic only. The cost is the example inputs' cost, which
is what the scheduler plans with anyway.

Note [Causal attention FLOPs]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
torch's attention formulas count every (query, key) pair, ``is_causal`` or not. The fused kernels that
memopt plans for (flash and memory-efficient, on CUDA and the CPU flash kernel alike) skip the key
blocks above the diagonal, so a causal attention does the work of the pairs it keeps: with the
top-left alignment torch uses, query ``i`` sees ``min(i + 1, keys)`` keys. memopt scales the formula by
that share of pairs, about half at any long sequence (the partly masked diagonal blocks a kernel still
computes are one block per query row: under 1% past 16K tokens, and not counted). This is where memopt
and ``FlopCounterMode`` disagree on purpose: the planned step time of a long-context step is mostly
attention, and counting the masked half would double it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from memopt.cost_model.bytes import hint_int, shape_env_of
from memopt.errors import MemoptUnsupportedError

__all__ = ["causal_pairs", "flop_formula_for", "node_flops"]

_aten = torch.ops.aten


# Ops the registry misses but memopt sees, mapped to the registered twin whose formula they share.
# On CPU, ``scaled_dot_product_attention`` lowers to ``_scaled_dot_product_flash_attention_for_cpu``,
# which is not in torch's table (FlopCounterMode reports 0 for attention on CPU), and the "plan on a
# laptop" path traces on CPU: without these, CPU graphs would look free of attention work. Each op's
# argument order matches its twin's formula (query, key, value, ... / grad_out, query, key, value, ...).
_TWINS: dict[Any, Any] = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _aten._scaled_dot_product_flash_attention,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        _aten._scaled_dot_product_flash_attention_backward
    ),
    _aten._scaled_dot_product_fused_attention_overrideable: _aten._scaled_dot_product_flash_attention,
    _aten._scaled_dot_product_fused_attention_overrideable_backward: (
        _aten._scaled_dot_product_flash_attention_backward
    ),
    # int8 x int8 -> int32 matmul (int8 weight paths); the mm formula depends on shapes only.
    _aten._int_mm: _aten.mm,
}


def flop_formula_for(op: torch._ops.OpOverload) -> Callable[..., Any] | None:
    """The flop formula used for ``op`` (keyed by its overload packet), or None if it is not counted."""
    # Imported here: torch.utils.flop_counter tries to import Triton at import time, and importing memopt
    # must stay light (STYLE.md: heavy imports stay lazy). Read on every call so formulas registered later
    # with torch.utils.flop_counter.register_flop_formula (e.g. by memopt's runtime ops) are seen.
    from torch.utils import flop_counter

    registry: dict[Any, Callable[..., Any]] = flop_counter.flop_registry
    packet = op.overloadpacket
    formula = registry.get(packet)
    if formula is None and packet in _TWINS:
        formula = registry.get(_TWINS[packet])
    return formula


def _concrete(val: Any, node: torch.fx.Node) -> Any:
    """A value with every tensor swapped for a hinted meta tensor and every SymInt for its hint.

    See Note [Concrete shapes for flop formulas].
    """
    if isinstance(val, torch.Tensor):
        env = shape_env_of(val)
        sizes = [hint_int(s, env) for s in val.size()]
        strides = [hint_int(s, env) for s in val.stride()]
        return torch.empty_strided(sizes, strides, dtype=val.dtype, device="meta")
    if isinstance(val, torch.SymInt):
        return hint_int(val)
    if isinstance(val, torch.SymBool):
        hint = val.node.hint
        if hint is None:
            raise MemoptUnsupportedError(
                f"node '{node.name}' ({node.target}) takes a data-dependent boolean argument "
                f"({val.node.expr}); the cost model cannot choose a flop formula branch without its value. "
                "Make that flag a constant."
            )
        return bool(hint)
    if isinstance(val, torch.SymFloat):
        raise MemoptUnsupportedError(
            f"node '{node.name}' ({node.target}) takes a symbolic float argument; the cost model cannot "
            "evaluate flop formulas over SymFloats. Make that value a constant."
        )
    if isinstance(val, tuple):
        return tuple(_concrete(v, node) for v in val)
    if isinstance(val, list):
        return [_concrete(v, node) for v in val]
    return val


def _arg_value(arg: Any, node: torch.fx.Node) -> Any:
    if isinstance(arg, torch.fx.Node):
        if "val" not in arg.meta:
            raise MemoptUnsupportedError(
                f"node '{node.name}' ({node.target}) reads '{arg.name}', which has no meta['val']; the "
                "cost model needs fake-tensor metadata on every node. Run "
                "torch.fx.passes.fake_tensor_prop.FakeTensorProp on the graph (or trace it with make_fx / "
                "AOTAutograd, which set it) before costing it."
            )
        return _concrete(arg.meta["val"], node)
    if isinstance(arg, (tuple, list)):
        items = [_arg_value(a, node) for a in arg]
        return tuple(items) if isinstance(arg, tuple) else items
    if isinstance(arg, dict):
        return {k: _arg_value(v, node) for k, v in arg.items()}
    return _concrete(arg, node)


def node_flops(node: torch.fx.Node) -> int:
    """FLOPs of one aten-level node, 0 for ops PyTorch's flop counter does not count.

    Counted: everything in ``torch.utils.flop_counter.flop_registry`` (mm, addmm, bmm, baddbmm,
    _scaled_mm, convolution and its backward, the fused attention ops forward and backward, ...) plus the
    CPU attention ops (see ``_TWINS``). Non-``call_function`` nodes and targets that are not
    ``OpOverload``s (getitem, SymInt arithmetic, higher-order ops) count 0, but for torch's RNG wrappers
    (``run_and_save_rng_state`` / ``run_with_rng_state``), which count as the op they run.
    """
    if node.op != "call_function":
        return 0
    target: object = node.target
    call_args = node.args
    rng = torch._prims.rng_prims
    # torch's RNG functionalization wraps a recomputed seeded op: (op, *args) and (state, op, *args).
    if target is rng.run_and_save_rng_state:
        target, call_args = call_args[0], call_args[1:]
    elif target is rng.run_with_rng_state:
        target, call_args = call_args[1], call_args[2:]
    if not isinstance(target, torch._ops.OpOverload):
        return 0
    formula = flop_formula_for(target)
    if formula is None:
        return 0
    if "val" not in node.meta:
        raise MemoptUnsupportedError(
            f"node '{node.name}' ({node.target}) has no meta['val']; the cost model counts FLOPs from "
            "shape metadata. Run torch.fx.passes.fake_tensor_prop.FakeTensorProp on the graph first."
        )
    args = _arg_value(call_args, node)
    kwargs = _arg_value(dict(node.kwargs), node)
    out = _concrete(node.meta["val"], node)
    if node.target is rng.run_and_save_rng_state:
        out = out[1]                                   # (the RNG state, the op's result)
    flops = formula(*args, **kwargs, out_val=out)
    if isinstance(flops, torch.SymInt):
        flops = hint_int(flops)
    kept, pairs = _causal_share(target, call_args, node)
    return int(flops) * kept // pairs


def _causal_share(target: torch._ops.OpOverload, call_args: Any, node: torch.fx.Node) -> tuple[int, int]:
    """(pairs computed, pairs counted) of a causal attention, (1, 1) for any other op
    (Note [Causal attention FLOPs]); integers, as FLOP counts pass 2**53 at long sequences."""
    names = [a.name for a in target._schema.arguments]
    if "is_causal" not in names or "query" not in names or "key" not in names:
        return 1, 1

    def argument(name: str) -> Any:
        index = names.index(name)
        if index < len(call_args):
            return call_args[index]
        return node.kwargs.get(name, target._schema.arguments[index].default_value)

    if argument("is_causal") is not True:
        return 1, 1
    query, key = (argument(name) for name in ("query", "key"))
    queries = hint_int(query.meta["val"].shape[-2])
    keys = hint_int(key.meta["val"].shape[-2])
    return (causal_pairs(queries, keys), queries * keys) if queries and keys else (1, 1)


def causal_pairs(queries: int, keys: int) -> int:
    """(query, key) pairs a causal attention keeps, top-left aligned: query ``i`` sees ``min(i + 1, keys)``."""
    full = min(queries, keys)               # queries 0 .. full-1 see i + 1 keys; the rest see every key
    return full * (full + 1) // 2 + (queries - full) * keys
