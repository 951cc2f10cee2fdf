"""split_dropout: a dropout becomes its random mask and a deterministic multiply, so that the multiply
can be recomputed.

``aten.native_dropout(x, p, train)`` returns ``(y, mask)`` with ``y = x * mask * scale``. It draws random
numbers, so no cut may run it again (:func:`memopt.schedule.problem.protect_unrepeatable`): whatever the backward
reads of it must be saved. Its backward reads ``mask`` (``native_dropout_backward``), and usually ``y``
too (a matmul after the dropout needs its input: attention's dropped probabilities, the size of the
scores, in fp32). This pass rewrites every reader of ``y`` to read ``native_dropout_backward(x, mask,
scale)`` instead: the op that applies a saved mask (to the gradient, in the backward) computes exactly
``x * mask * scale`` in one kernel, with no temporary. The dropout still runs once in the forward and
draws the same mask; ``y`` is then a pointwise function of ``x`` and a bool mask, which the schedule (and
torch's partitioner) may recompute. Only the mask, one byte per element, must be saved.

Values are unchanged. ``scale`` is rounded as each device's dropout kernel rounds it: the CPU kernel
scales by ``1 / (1 - p)`` in the tensor's dtype (a bf16 ``y`` is ``x * bf16(scale)``), the CUDA kernel
in fp32, and ``native_dropout_backward`` takes the scale as a double, so on CPU the pass rounds it to
the dtype first. The tests check that CPU results are bitwise those of eager PyTorch.

Stats: ``dropouts`` (rewritten), ``masks_made`` (a ``getitem`` for the mask that the graph did not have).
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from memopt.passes.base import Pass, PassContext, PassResult
from memopt.passes.rewrite import make_node

_aten = torch.ops.aten


def dropout_scale(p: float, dtype: torch.dtype, device: torch.device) -> float:
    """``1 / (1 - p)`` as ``native_dropout``'s kernel on ``device`` applies it to a ``dtype`` tensor."""
    scale = 1.0 / (1.0 - p)
    if device.type == "cpu" and dtype.is_floating_point:
        return float(torch.tensor(scale, dtype=dtype))
    return scale


def _element(node: torch.fx.Node, index: int) -> torch.fx.Node | None:
    return next((u for u in node.users if u.target is operator.getitem and u.args[1] == index), None)


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    graph = gm.graph
    stats = {"dropouts": 0, "masks_made": 0}
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not _aten.native_dropout.default:
            continue
        x, p = node.args[0], float(node.args[1])
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
        y = _element(node, 0)
        if y is None or not y.users or train is False or not 0.0 < p < 1.0 or not isinstance(x, torch.fx.Node):
            continue
        val = x.meta["val"]
        mask = _element(node, 1)
        if mask is None:
            with graph.inserting_after(y):
                mask = graph.call_function(operator.getitem, (node, 1))
            mask.meta.update({k: v for k, v in y.meta.items() if k != "val"})
            mask.meta["val"] = node.meta["val"][1]
            stats["masks_made"] += 1
        with graph.inserting_after(max(y, mask, key=lambda n: order.get(n, order[y] + 1))):
            # The dropout's place in the model (module stack, seq_nr) for the layer classes of the schedule.
            applied = make_node(graph, _aten.native_dropout_backward.default,
                                (x, mask, dropout_scale(p, val.dtype, val.device)), like=y)
        y.replace_all_uses_with(applied)
        graph.erase_node(y)
        stats["dropouts"] += 1
    if stats["dropouts"]:
        graph.lint()
        gm.recompile()
    return PassResult(gm, stats["dropouts"] > 0, stats)


SPLIT_DROPOUT = Pass("split_dropout", "joint", run)
