"""The cross-entropy's backward as one op: ``memopt::cross_entropy_backward``.

Note [Cross-entropy backward]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
``F.cross_entropy(logits, target)`` is ``nll_loss(log_softmax(logits), target)``; its backward in the
joint graph is two full-vocabulary ops: ``nll_loss_backward`` makes a ``tokens x vocab`` gradient that is
zero except at each token's target, and ``_log_softmax_backward_data`` turns it into the logits'
gradient ``g - exp(log_probs) * sum(g)``. At a 128k vocabulary both are as large as the fp32 logits
(250 MiB for 512 tokens), and both are alive together. With one target per row the sum is the target's
coefficient ``-c``, so the gradient is ``exp(log_probs) * c`` with ``c`` subtracted at the target:

    c = grad_output / total_weight  (mean), grad_output (sum), grad_output[row] (none); 0 where ignored

This op computes it into one output (``exp``, then in place a multiply and a scatter-add), so the
backward holds one vocabulary-sized tensor where it held two. It matches the two ops up to rounding
(the same products and sums, in another order at the target only); the tests compare gradients against
eager PyTorch. :mod:`memopt.passes.fuse_cross_entropy` puts it in the joint graph.
"""

from __future__ import annotations

import torch

_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}    # ATen's reduction codes


@torch.library.custom_op("memopt::cross_entropy_backward", mutates_args=())
def cross_entropy_backward(grad_output: torch.Tensor, log_probs: torch.Tensor, target: torch.Tensor,
                           reduction: int, ignore_index: int, total_weight: torch.Tensor,
                           dtype: torch.dtype) -> torch.Tensor:
    """The gradient of ``nll_loss(log_probs, target)`` with respect to ``log_softmax``'s input
    (Note [Cross-entropy backward]). ``log_probs``: ``(rows, classes)`` or ``(classes,)``; ``dtype``:
    the dtype of ``log_softmax``'s input, the gradient's dtype."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"memopt::cross_entropy_backward: reduction {reduction} is not one of ATen's "
                         f"codes {sorted(_REDUCTIONS)}")
    flat = log_probs.reshape(-1, log_probs.shape[-1])
    rows = target.reshape(-1)
    if reduction == 0:
        coefficient = grad_output.reshape(-1).to(flat.dtype)
    elif reduction == 1:
        coefficient = (grad_output / total_weight).to(flat.dtype).expand(flat.shape[0])
    else:
        coefficient = grad_output.to(flat.dtype).expand(flat.shape[0])
    counted = rows != ignore_index
    coefficient = torch.where(counted, coefficient, torch.zeros((), dtype=flat.dtype, device=flat.device))
    out = flat.exp()
    out.mul_(coefficient[:, None])
    out.scatter_add_(1, torch.where(counted, rows, 0)[:, None], -coefficient[:, None])
    return out.view(log_probs.shape).to(dtype)


@cross_entropy_backward.register_fake
def _(grad_output: torch.Tensor, log_probs: torch.Tensor, target: torch.Tensor, reduction: int,
      ignore_index: int, total_weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return log_probs.new_empty(log_probs.shape, dtype=dtype)
