"""prune_backprop: the backward computes only the gradients that train, and saves only what they need.

AOTAutograd already leaves out the gradients of parameters that do not require one. This pass does what
it cannot see (Note [Sparse backprop] in :mod:`memopt.sparse`), on any joint graph:

- **Slices** (``slice_of_matmul``). A trained slice of a weight enters as ``index_copy(W, d, idx, S)``,
  so autograd computes the dense weight gradient and selects from it:
  ``index_select(t(mm(t(dY), X)), d, idx)``. The selection is pushed into the matmul, through any
  transposes: columns select the columns of ``X``, rows the rows of ``t(dY)``::

      before:  dW = mm(t(dY), X)                 # (out, in): the whole gradient
               dS = index_select(dW, 1, idx)     # X saved whole for it
      after:   Xs = index_select(X, 1, idx)      # made in the forward, right after X: a copy
               dS = mm(t(dY), Xs)                # (out, k): only Xs is saved

  The copy is made in the forward when nothing else in the backward reads ``X`` (a saved view would
  keep all of ``X`` alive), and in the backward from ``X`` otherwise.
- **Weights re-formed** (``reformed_weights``). The weight the model reads, ``index_copy(W, d, idx,
  S)``, is a weight-sized tensor made from parameters; the backward's input gradient reads it. It is
  tagged to be recomputed, so the backward makes it again rather than the step holding a copy of every
  sliced weight from the forward to the backward.
- **ReLU masks** (``relu_masks``). ``threshold_backward(g, y, t)`` reads ``y`` only for ``y > t``; when
  nothing else in the backward reads ``y`` (the next layer's weight is frozen or trains its bias only),
  the forward saves the boolean mask ``y > t`` (one byte per element) and the backward applies it with
  ``where``.
- **Frozen by policy** (``frozen_gradients``). A parameter that ``options["sparse_backprop"]`` freezes but
  that still requires a gradient (a model compiled without ``memopt.prepare``) gets None for its gradient
  (the optimizer then skips it) and the nodes that computed it go.

Then every node no output needs is removed, with the activations saved only for it. Values are
unchanged: each selected gradient is the dense gradient's slice, to summation order.

Stats: ``frozen_gradients``, ``slice_of_matmul``, ``reformed_weights``, ``relu_masks``, ``nodes_removed``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch.utils.checkpoint import CheckpointPolicy

from memopt.names import gradient_outputs
from memopt.passes.base import Pass, PassContext, PassResult
from memopt.passes.rewrite import eliminate_dead_code, is_transpose, make_node, replace_node
from memopt.schedule.simulate import aliased_argument, backward_nodes

_aten = torch.ops.aten


def _frozen_gradients(gm: torch.fx.GraphModule, ctx: PassContext) -> list[int]:
    """Output positions of the gradients of parameters the policy freezes."""
    config = ctx.config.sparse_backprop
    if config is None or config.auto:
        return []
    from memopt.sparse import canonical_name, frozen_by_policy

    names = [canonical_name(i.name) if i.name else "" for i in ctx.inputs]
    frozen = frozen_by_policy([n for n, i in zip(names, ctx.inputs) if i.kind == "parameter"], config)
    return [out for out, primal in gradient_outputs(gm).items() if names[primal] in frozen]


def _aliases(node: torch.fx.Node) -> list[torch.fx.Node]:
    """``node``'s storage root and every view of it."""
    while (parent := aliased_argument(node)) is not None:
        node = parent
    out, stack = [], [node]
    while stack:
        n = stack.pop()
        out.append(n)
        stack += [u for u in n.users if u.op == "call_function" and aliased_argument(u) is n]
    return out


def _read_in_backward(node: torch.fx.Node, backward: set[torch.fx.Node], besides: torch.fx.Node) -> bool:
    """Whether anything in the backward but ``besides`` (and views) reads ``node``'s storage."""
    aliases = _aliases(node)
    return any(u in backward and u is not besides and u not in aliases for a in aliases for u in a.users)


def _selection(node: torch.fx.Node) -> tuple[Any, int, Any] | None:
    """(source, dim, index) of a selection along one dimension of a matrix: ``index_select(x, d, idx)``,
    or ``x[:, idx]`` as Inductor's decompositions write it (``index.Tensor(x, [None, idx])``)."""
    if node.target is _aten.index_select.default:
        source, dim, index = node.args
        return (source, dim % 2, index) if isinstance(dim, int) else None
    if node.target is _aten.index.Tensor:
        source, indices = node.args
        given = [i for i, x in enumerate(indices) if x is not None]           # type: ignore[arg-type]
        if len(indices) <= 2 and len(given) == 1:                            # type: ignore[arg-type]
            return source, given[0], indices[given[0]]                       # type: ignore[index]
    return None


def _push_selection(select: torch.fx.Node, backward: set[torch.fx.Node]) -> bool:
    """``index_select(transposes(mm(A, B)), d, idx)`` -> ``transposes(mm(A[idx], B))`` or
    ``transposes(mm(A, B[:, idx]))``."""
    found = _selection(select)
    if found is None or not isinstance(found[0], torch.fx.Node):
        return False
    source, dim, index = found
    val = source.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 2:
        return False
    flips, matmul = 0, source
    while is_transpose(matmul) and len(matmul.users) == 1:
        flips, matmul = flips ^ 1, matmul.args[0]
    if not (isinstance(matmul, torch.fx.Node) and matmul.target is _aten.mm.default and len(matmul.users) == 1):
        return False
    side = dim ^ flips                                  # 0: rows of the product (of A); 1: columns (of B)
    operand = matmul.args[side]
    assert isinstance(operand, torch.fx.Node)
    graph = select.graph
    early = operand not in backward and not _read_in_backward(operand, backward, matmul)
    at = operand if operand.op != "placeholder" else next(n for n in graph.nodes if n.op != "placeholder").prev
    with graph.inserting_after(at) if early else graph.inserting_before(matmul):
        # The selection in the op the graph already uses (Inductor lowers ``index``, not ``index_select``).
        picked = make_node(graph, _aten.index_select.default, (operand, side, index), like=operand) \
            if select.target is _aten.index_select.default else \
            make_node(graph, _aten.index.Tensor, (operand, [None, index] if side else [index]), like=operand)
    with graph.inserting_before(select):
        args = (picked, matmul.args[1]) if side == 0 else (matmul.args[0], picked)
        out = make_node(graph, _aten.mm.default, args, like=matmul)
        if flips:
            out = make_node(graph, _aten.t.default, (out,), like=select)
    select.replace_all_uses_with(out)
    graph.erase_node(select)
    return True


# A slice written into a weight: ``index_copy``, or ``index_put`` as Inductor's decompositions write it.
_WRITES = (_aten.index_copy.default, _aten.index_put.default)


def _tag_reformed_weights(graph: torch.fx.Graph, backward: set[torch.fx.Node]) -> int:
    """Tag a slice written into a parameter (:data:`_WRITES`) that the backward reads MUST_RECOMPUTE."""
    count = 0
    for node in graph.nodes:
        if node.target not in _WRITES or node in backward or node.meta.get("recompute"):
            continue
        base = node.args[0]
        if isinstance(base, torch.fx.Node) and base.op == "placeholder" and _read_in_backward(node, backward, node):
            node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            count += 1
    return count


def _undetached(node: Any) -> Any:
    while isinstance(node, torch.fx.Node) and node.target in (_aten.detach.default, _aten.alias.default):
        node = node.args[0]
    return node


def _mask_relu(node: torch.fx.Node, backward: set[torch.fx.Node]) -> bool:
    """``threshold_backward(g, y, t)`` -> ``where(y > t, g, 0)`` with ``y > t`` made in the forward."""
    grad, output, threshold = node.args
    y = _undetached(output)
    if not isinstance(y, torch.fx.Node) or y in backward or _read_in_backward(y, backward, node):
        return False
    graph = node.graph
    with graph.inserting_after(y):
        mask = make_node(graph, _aten.gt.Scalar, (y, threshold), like=y)
    replace_node(node, _aten.where.ScalarOther, (mask, grad, 0.0))
    return True


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    graph = gm.graph
    stats = {"frozen_gradients": 0, "slice_of_matmul": 0, "reformed_weights": 0, "relu_masks": 0,
             "nodes_removed": 0}
    dropped = _frozen_gradients(gm, ctx)
    stats["frozen_gradients"] = len(dropped)
    stats["nodes_removed"] += len(eliminate_dead_code(gm, drop_outputs=dropped))
    backward = backward_nodes(graph)
    for node in [n for n in graph.nodes if _selection(n) is not None and n in backward]:
        stats["slice_of_matmul"] += _push_selection(node, backward)
    stats["nodes_removed"] += len(eliminate_dead_code(gm))
    backward = backward_nodes(graph)
    stats["reformed_weights"] = _tag_reformed_weights(graph, backward)
    for node in [n for n in graph.nodes if n.target is _aten.threshold_backward.default]:
        stats["relu_masks"] += _mask_relu(node, backward)
    stats["nodes_removed"] += len(eliminate_dead_code(gm))
    graph.lint()
    gm.recompile()
    return PassResult(gm, any(stats.values()), stats)


PRUNE_BACKPROP = Pass("prune_backprop", "joint", run, drops_gradients=True)
