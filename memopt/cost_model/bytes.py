"""Bytes of tensors, kept symbolic where the shapes are.

Sizes under ``tracing_mode="symbolic"`` (or a FakeTensorMode with a ShapeEnv) are ``torch.SymInt``s whose
``node.expr`` is a sympy expression over the ShapeEnv's symbols (``s0`` for a dynamic batch, ...). The
``*_expr`` functions return those expressions so that a plan can say "this activation is ``8*s0*s1``
bytes"; :func:`hint_int` and :func:`value_nbytes` turn them into the numbers of the example inputs.

Nothing here adds a guard to a ShapeEnv: comparisons on symbolic sizes (``is_contiguous()``, ``size == 0``)
would install guards and could specialise the user's graph, so the structure is inspected on the sympy
expressions themselves.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import sympy
import torch
import torch.fx

from memopt.errors import MemoptUnsupportedError

if TYPE_CHECKING:
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

__all__ = [
    "hint_int",
    "hints_of",
    "set_hints",
    "shape_env_of",
    "storage_nbytes",
    "storage_nbytes_expr",
    "tensor_nbytes_expr",
    "value_nbytes",
]


def _to_expr(x: int | torch.SymInt) -> sympy.Expr:
    if isinstance(x, torch.SymInt):
        return sympy.sympify(x.node.expr)
    return sympy.Integer(int(x))


def _check_strided(t: torch.Tensor, what: str) -> None:
    # Sparse and nested layouts have no (size, stride) span; guessing a number would make the plan lie.
    if t.layout != torch.strided:
        raise MemoptUnsupportedError(
            f"{what}: tensor has layout {t.layout}; the cost model sizes only strided (dense) tensors. "
            "Convert it to dense before compiling, or keep this part of the model outside torch.compile."
        )


def tensor_nbytes_expr(t: torch.Tensor) -> sympy.Expr:
    """Bytes of the memory the tensor's own view spans, as a sympy expression.

    A contiguous tensor spans ``numel * itemsize``; a strided view spans
    ``(1 + sum((size_i - 1) * stride_i)) * itemsize`` (0 if any size is 0), so a transposed tensor counts
    its whole extent and an expanded one (stride 0) only the memory it really reads. Symbolic sizes and
    strides stay symbols; plain ints become ``sympy.Integer``.
    """
    _check_strided(t, "tensor_nbytes_expr")
    sizes = [_to_expr(s) for s in t.size()]
    strides = [_to_expr(s) for s in t.stride()]
    itemsize = sympy.Integer(t.dtype.itemsize)
    numel = sympy.Mul(*sizes)

    if any(s.is_zero for s in sizes):
        return sympy.Integer(0)
    if _is_contiguous_expr(sizes, strides):
        return numel * itemsize

    span = sympy.Integer(1) + sympy.Add(*[(s - 1) * st for s, st in zip(sizes, strides)])
    # Expanding turns a dense permutation such as 4*s1*(s0 - 1) + 4*s1 back into 4*s0*s1, which is what a
    # reader of a plan expects; sizes are polynomials of small degree, so this stays cheap.
    nbytes = sympy.expand(span * itemsize)
    if all(s.is_positive for s in sizes):
        return nbytes
    # An unbacked size (from a data-dependent op) may be 0; the span formula would then overcount.
    return sympy.Piecewise((sympy.Integer(0), sympy.Eq(numel, 0)), (nbytes, True))


def _is_contiguous_expr(sizes: Sequence[sympy.Expr], strides: Sequence[sympy.Expr]) -> bool:
    """Row-major contiguity decided on the expressions (structurally), without touching a ShapeEnv."""
    expected = sympy.Integer(1)
    for size, stride in zip(reversed(sizes), reversed(strides)):
        # The stride of a size-1 dimension is never used to address memory.
        if size != 1 and sympy.expand(stride - expected) != 0:
            return False
        expected = expected * size
    return True


def storage_nbytes_expr(t: torch.Tensor) -> sympy.Expr:
    """Bytes of the untyped storage the tensor lives in (what keeping it alive keeps alive).

    A view of a large base keeps the whole base alive (see DESIGN.md: "a saved slice that is a view keeps
    its whole base alive"), so this is the number a memory plan must use for a saved view.
    """
    _check_strided(t, "storage_nbytes_expr")
    try:
        nbytes = t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        # Tensors without a reachable storage (some wrapper subclasses, functional tensors) still tell
        # us their offset and span; the storage is at least that large.
        offset = _to_expr(t.storage_offset()) * t.dtype.itemsize
        return sympy.expand(offset + tensor_nbytes_expr(t))
    return sympy.expand(_to_expr(nbytes))


def shape_env_of(val: object) -> ShapeEnv | None:
    """The ShapeEnv behind a fake tensor, a SymInt, or the first one found in a tuple/list of them."""
    if isinstance(val, torch.SymInt):
        return val.node.shape_env
    if isinstance(val, torch.Tensor):
        fake_mode = getattr(val, "fake_mode", None)
        shape_env = getattr(fake_mode, "shape_env", None)
        if shape_env is not None:
            return shape_env
        # A tensor built from SymInts outside a fake mode (e.g. a meta tensor) still carries them.
        strided = (*val.stride(), val.storage_offset()) if val.layout == torch.strided else ()
        for s in (*val.size(), *strided):
            if isinstance(s, torch.SymInt):
                return s.node.shape_env
        return None
    if isinstance(val, (tuple, list)):
        for item in val:
            found = shape_env_of(item)
            if found is not None:
                return found
    return None


def hint_int(expr: sympy.Expr | int | torch.SymInt, shape_env: ShapeEnv | None = None) -> int:
    """Evaluate a size expression at the ShapeEnv's hints (the example inputs' values).

    ``expr`` may be a sympy expression, a ``torch.SymInt`` (its own ShapeEnv is used when none is given)
    or a plain int. Raises :class:`MemoptUnsupportedError` naming the symbols that have no hint, which
    happens for sizes that depend on data (``nonzero``, ``unique``, boolean masks).
    """
    if isinstance(expr, bool):
        return int(expr)
    if isinstance(expr, int):
        return expr
    if isinstance(expr, torch.SymInt):
        if shape_env is None:
            shape_env = expr.node.shape_env
        expr = expr.node.expr
    expr = sympy.sympify(expr)

    free = sorted(expr.free_symbols, key=str)
    if free:
        hints: dict[sympy.Symbol, sympy.Integer] = {}
        if shape_env is not None:
            # Unbacked symbols get a value only when real tensors were propagated; use it when present.
            hints.update(getattr(shape_env, "unbacked_var_to_val", None) or {})
            # torch 2.13 renamed var_to_val (kept as a deprecated alias) to backed_var_to_val.
            backed = getattr(shape_env, "backed_var_to_val", None)
            hints.update(backed if backed is not None else shape_env.var_to_val)
        missing = [str(s) for s in free if s not in hints]
        if missing:
            where = (
                "no ShapeEnv was given to look them up in; pass the ShapeEnv that created them "
                "(fake_tensor.fake_mode.shape_env)"
                if shape_env is None
                else "the ShapeEnv has no hint for them, so they depend on data "
                "(nonzero, unique, masked_select, a boolean mask index, ...)"
            )
            raise MemoptUnsupportedError(
                f"cannot evaluate the size expression {expr} to a number: symbol(s) "
                f"{', '.join(missing)} have no value ({where}). memopt plans with the example inputs' "
                "sizes; make that size static (e.g. pad to a fixed length) or mark it with "
                "torch._check so that it has a bound."
            )
        expr = expr.xreplace({s: hints[s] for s in free})

    if expr.is_Integer:
        return int(expr)
    if expr.is_number and expr == sympy.floor(expr):
        return int(sympy.floor(expr))
    raise MemoptUnsupportedError(
        f"the size expression evaluated to {expr}, which is not an integer; a byte or element count "
        "must be one. This is a bug in the graph's shape metadata or in memopt: please report it with "
        "the graph dump."
    )


def _hinted_tensor_nbytes(t: torch.Tensor, shape_env: ShapeEnv | None) -> int:
    # Same formula as tensor_nbytes_expr, on the hinted ints: value_nbytes runs on every node of large
    # graphs, and building then expanding a sympy expression per node would dominate annotation time.
    _check_strided(t, "value_nbytes")
    sizes = [hint_int(s, shape_env) for s in t.size()]
    if any(s == 0 for s in sizes):
        return 0
    strides = [hint_int(s, shape_env) for s in t.stride()]
    span = 1 + sum((s - 1) * st for s, st in zip(sizes, strides))
    return span * t.dtype.itemsize


def _iter_tensors(val: object) -> Iterable[torch.Tensor]:
    if isinstance(val, torch.Tensor):
        yield val
    elif isinstance(val, (tuple, list)):
        for item in val:
            yield from _iter_tensors(item)


def storage_nbytes(t: torch.Tensor) -> int:
    """Bytes of the storage ``t`` lives in, evaluated at the hints (the example inputs' sizes)."""
    return hint_int(storage_nbytes_expr(t), shape_env_of(t))


def value_nbytes(val: Any, shape_env: ShapeEnv | None = None) -> int:
    """Bytes of an FX node's ``meta["val"]``, evaluated at the hints.

    ``val`` may be a tensor, a (nested) tuple/list of tensors, a SymInt or None; non-tensors count 0 and
    each tensor counts the span of its own view (:func:`tensor_nbytes_expr`). The ShapeEnv is taken from
    the fake tensors when not given.
    """
    total = 0
    for t in _iter_tensors(val):
        env = shape_env if shape_env is not None else shape_env_of(t)
        total += _hinted_tensor_nbytes(t, env)
    return total


def hints_of(shape_env: ShapeEnv) -> dict[sympy.Symbol, sympy.Integer]:
    """The ShapeEnv's table of its backed symbols' hints (the example inputs' sizes)."""
    table = getattr(shape_env, "backed_var_to_val", None)
    return shape_env.var_to_val if table is None else table             # torch < 2.13: var_to_val


def set_hints(shape_env: ShapeEnv, values: dict[sympy.Symbol, int], graphs: Iterable[torch.fx.GraphModule]) -> None:
    """Price symbolic graphs at other sizes: ``values`` become the hints of their (backed) symbols.

    Note [Planning every length from one capture]
    A graph captured with a symbolic sequence length is the graph of every length: its nodes do not
    change with it, only their sizes, which are expressions in the length's symbol. memopt prices sizes
    at the ShapeEnv's hints (:func:`hint_int`), so changing the symbol's hint re-prices every byte and
    FLOP in the graph without tracing anything again; ``memopt plan --max-seq`` plans each candidate
    length that way. Two caches hold the old value and are refreshed here: the ShapeEnv's own
    (``_update_version_counter``), and the hint each ``SymInt``'s node keeps from its creation, which
    torch's partitioner reads (for every SymInt in the graphs' ``meta["val"]``: sizes, strides, storage
    offsets, SymInt values). Nothing else changes: no guard is added. The graph is the step's at the
    lengths where the capture's guards hold (Dynamo's assumptions, such as "at least two blocks"), which
    ``--max-seq`` checks before it prices one.
    """
    table = hints_of(shape_env)
    for symbol, value in values.items():
        if symbol not in table:
            raise MemoptUnsupportedError(f"symbol {symbol} is not a backed size of this ShapeEnv; it has no hint to set")
        table[symbol] = sympy.Integer(value)
    shape_env._update_version_counter()
    for gm in graphs:
        for node in gm.graph.nodes:
            for sym in _symints(node.meta.get("val")):
                if sym.node.shape_env is shape_env and sym.node.expr.free_symbols & values.keys():
                    sym.node._hint = hint_int(sym.node.expr, shape_env)


def _symints(val: object) -> Iterable[torch.SymInt]:
    if isinstance(val, torch.SymInt):
        yield val
    elif isinstance(val, torch.Tensor):
        sizes = [*val.size(), val.numel()] + ([*val.stride(), val.storage_offset()]
                                              if val.layout == torch.strided else [])
        yield from (s for s in sizes if isinstance(s, torch.SymInt))
    elif isinstance(val, (tuple, list)):
        for item in val:
            yield from _symints(item)
