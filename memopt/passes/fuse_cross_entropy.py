"""fuse_cross_entropy: the cross-entropy's two full-vocabulary backward ops become one.

In the joint graph, ``_log_softmax_backward_data(nll_loss_backward(g, log_probs, target, ...), log_probs)``
becomes ``memopt::cross_entropy_backward(g, log_probs, target, ...)`` (Note [Cross-entropy backward] in
:mod:`memopt.runtime.cross_entropy`): the ``tokens x vocab`` gradient that is zero but for the targets is
never made, so the loss's backward holds one vocabulary-sized tensor per slice of tokens where it held
two. For a Llama-3 QLoRA step (batch 2 x 2048, 8 slices) that is 250 MiB off the step's peak, which
sits in the loss's backward. Only a pair the loss made alone is rewritten: no class weights, the
``nll_loss_backward`` read by that ``_log_softmax_backward_data`` and nothing else, on the same
log-probabilities (through ``detach`` nodes), over the last dimension.

Stats: ``fused`` (pairs rewritten).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

import memopt.runtime.cross_entropy  # noqa: F401  (registers memopt::cross_entropy_backward)
from memopt.passes.base import Pass, PassContext, PassResult, call_argument
from memopt.passes.rewrite import replace_node

_aten = torch.ops.aten


def _undetached(node: Any) -> Any:
    """``node`` with any chain of ``detach`` taken off (autograd reads saved outputs through them)."""
    while isinstance(node, torch.fx.Node) and node.target is _aten.detach.default:
        node = node.args[0]
    return node


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    graph = gm.graph
    fused = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not _aten._log_softmax_backward_data.default:
            continue
        grad, log_probs, dim, dtype = (call_argument(node, name)
                                       for name in ("grad_output", "output", "dim", "input_dtype"))
        if not (isinstance(grad, torch.fx.Node) and grad.op == "call_function"
                and grad.target is _aten.nll_loss_backward.default and len(grad.users) == 1):
            continue
        g, nll_log_probs, target, weight, reduction, ignore_index, total_weight = (
            call_argument(grad, name) for name in
            ("grad_output", "self", "target", "weight", "reduction", "ignore_index", "total_weight"))
        val = node.meta["val"]
        if _undetached(nll_log_probs) is not _undetached(log_probs) or weight is not None or val.dim() not in (1, 2) \
                or dim not in (val.dim() - 1, -1):
            continue
        replace_node(node, torch.ops.memopt.cross_entropy_backward.default,
                     (g, log_probs, target, reduction, ignore_index, total_weight, dtype))
        graph.erase_node(grad)
        fused += 1
    if fused:
        graph.lint()
        gm.recompile()
    return PassResult(gm, fused > 0, {"fused": fused})


FUSE_CROSS_ENTROPY = Pass("fuse_cross_entropy", "joint", run)
