"""``memopt::linear_cross_entropy``: an LM head and its cross-entropy without the logits.

Note [Linear cross-entropy]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
A language model's loss is ``cross_entropy(hidden @ weight.T, target)``: the logits are ``tokens x
vocabulary`` (at 128k words and 64K tokens, 32 GiB in fp32), and autograd saves the log-probabilities, as
large, for the backward. This op computes the loss a slice of tokens at a time and keeps only
each token's log-sum-exp: the forward makes one slice's logits, takes their log-softmax and the
targets' negative log-likelihood, and adds it to the sum; the backward makes each slice's logits again,
turns them into their gradient (``softmax - one_hot``, times the incoming gradient, zero where the target
is ignored) and multiplies it into the gradients of ``hidden``, ``weight`` and ``bias``. What exists at
once is one slice's logits and gradient, whatever the sequence length: Cut Cross-Entropy's and Liger's
fused linear cross-entropy's idea, at the granularity PyTorch's own kernels allow.

It returns the *sum* of the counted tokens' losses (and the log-sum-exps it saves); a mean is that sum
over the count of counted tokens, computed in the graph (:mod:`memopt.passes.loss_head`). The values are
the unfused graph's up to rounding: each slice runs the same ops on the same rows, and only the order of
the sums over slices changes. The weight's gradient is accumulated over slices in fp32 and cast once.
The op's scratch (one slice's logits, in their dtype and in fp32, and their gradient) is inside it, where
the memory simulator cannot see it: :func:`slice_rows` keeps it near ``SCRATCH_BYTES``.

On CUDA (and on CPU with ``MEMOPT_TRITON_CPU=1``) both ops run memopt's Triton kernels instead (Note
[Fused linear cross-entropy kernels]), which make the logits a tile at a time in registers and write
none: no scratch beyond the fp32 gradients, and the logits kept in fp32 whatever ``dtype`` says (a bf16
model's logits are rounded to bf16 before the loss by the reference, not by the kernels).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from memopt.codegen.triton_kernels import kernels_run_on

__all__ = ["SCRATCH_BYTES", "linear_cross_entropy", "slice_rows"]

SCRATCH_BYTES = 256 * 2**20
"""About what one slice's fp32 logits may take; the op's whole scratch is a small multiple of it."""


def slice_rows(tokens: int, vocabulary: int, chunks: int) -> int:
    """Tokens per slice: ``tokens / chunks``, and no more than fit ``SCRATCH_BYTES`` of fp32 logits."""
    return max(1, min(-(-tokens // chunks), SCRATCH_BYTES // (4 * vocabulary)))


def _check(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunks: int) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] \
            or target.shape != (hidden.shape[0],) or chunks < 1:
        raise ValueError(f"memopt::linear_cross_entropy: expected hidden (N, H), weight (V, H), target (N,) "
                         f"and chunks >= 1; got {tuple(hidden.shape)}, {tuple(weight.shape)}, "
                         f"{tuple(target.shape)}, chunks={chunks}")


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
            ) -> torch.Tensor:
    return F.linear(hidden, weight, bias).to(dtype)


@torch.library.custom_op("memopt::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         target: torch.Tensor, ignore_index: int, dtype: torch.dtype, chunks: int,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over counted tokens of ``cross_entropy(linear(hidden, weight, bias).to(dtype), target)``,
    each token's log-sum-exp in fp32), in :func:`slice_rows` slices (Note [Linear cross-entropy])."""
    _check(hidden, weight, target, chunks)
    if kernels_run_on(hidden.device):
        from memopt.codegen import linear_cross_entropy as kernels

        losses, lse = kernels.forward(hidden.contiguous(), weight.contiguous(), bias, target, ignore_index)
        return losses.sum().to(dtype), lse
    rows = slice_rows(hidden.shape[0], weight.shape[0], chunks)
    total = hidden.new_zeros((), dtype=torch.float32)
    lse = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        logits = _logits(hidden[start:start + rows], weight, bias, dtype)
        log_probs = F.log_softmax(logits, dim=-1)
        total += F.nll_loss(log_probs, target[start:start + rows], ignore_index=ignore_index, reduction="sum")
        lse[start:start + rows] = (logits - log_probs)[:, 0]      # log-sum-exp = logit - log-probability
    return total.to(dtype), lse


@linear_cross_entropy.register_fake
def _forward_fake(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                  ignore_index: int, dtype: torch.dtype, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check(hidden, weight, target, chunks)
    return hidden.new_empty((), dtype=dtype), hidden.new_empty(hidden.shape[0], dtype=torch.float32)


@torch.library.custom_op("memopt::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                                  bias: torch.Tensor | None, target: torch.Tensor, lse: torch.Tensor,
                                  ignore_index: int, dtype: torch.dtype, chunks: int, weight_grad: bool,
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`linear_cross_entropy`'s sum for ``hidden``, ``weight`` and ``bias`` (the last two
    empty unless ``weight_grad``), each slice's logits made again (Note [Linear cross-entropy])."""
    if kernels_run_on(hidden.device):
        from memopt.codegen import linear_cross_entropy as kernels

        dh, dw, db = kernels.backward(grad, hidden.contiguous(), weight.contiguous(), bias, target, lse,
                                      ignore_index, weight_grad)
        empty = weight.new_empty(0)
        return (dh.to(hidden.dtype), dw.to(weight.dtype) if dw is not None else empty,
                db.to(weight.dtype) if db is not None else empty)
    rows = slice_rows(hidden.shape[0], weight.shape[0], chunks)
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros(weight.shape if weight_grad else (0,), dtype=torch.float32, device=weight.device)
    grad_bias = torch.zeros(bias.shape if weight_grad and bias is not None else (0,), dtype=torch.float32,
                            device=weight.device)
    coefficient = grad.to(torch.float32)
    for start in range(0, hidden.shape[0], rows):
        rows_hidden, rows_target = hidden[start:start + rows], target[start:start + rows]
        logits = _logits(rows_hidden, weight, bias, dtype).to(torch.float32)
        counted = rows_target != ignore_index
        grad_logits = torch.exp(logits - lse[start:start + rows, None])       # softmax
        grad_logits.mul_(torch.where(counted, coefficient, 0.0)[:, None])
        grad_logits.scatter_add_(1, torch.where(counted, rows_target, 0)[:, None],
                                 torch.where(counted, -coefficient, 0.0)[:, None])
        grad_logits = grad_logits.to(dtype).to(hidden.dtype)                 # through the casts' backward
        grad_hidden[start:start + rows] = grad_logits @ weight
        if weight_grad:
            grad_weight += (grad_logits.t() @ rows_hidden).to(torch.float32)
            if bias is not None:
                grad_bias += grad_logits.sum(0, dtype=torch.float32)
    return grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)


@linear_cross_entropy_backward.register_fake
def _backward_fake(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   target: torch.Tensor, lse: torch.Tensor, ignore_index: int, dtype: torch.dtype, chunks: int,
                   weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.empty_like(hidden), weight.new_empty(weight.shape if weight_grad else (0,)),
            weight.new_empty(bias.shape if weight_grad and bias is not None else (0,)))


def _setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    hidden, weight, bias, target, ignore_index, dtype, chunks = inputs
    ctx.save_for_backward(hidden, weight, bias, target, output[1])
    ctx.options = (ignore_index, dtype, chunks)


def _backward(ctx: Any, grad: torch.Tensor, _grad_lse: torch.Tensor | None) -> tuple[Any, ...]:
    hidden, weight, bias, target, lse = ctx.saved_tensors
    weight_grad = bool(ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
    grad_hidden, grad_weight, grad_bias = linear_cross_entropy_backward(
        grad, hidden, weight, bias, target, lse, *ctx.options, weight_grad)
    return (grad_hidden, grad_weight if ctx.needs_input_grad[1] else None,
            grad_bias if ctx.needs_input_grad[2] else None, None, None, None, None)


linear_cross_entropy.register_autograd(_backward, setup_context=_setup)


def _register_flops() -> None:
    """FLOPs for the cost model: the head's matmul forward; again, its input's and (when trained) its
    weight's gradient backward (the softmax and the sums are bandwidth, not FLOPs)."""
    from torch.utils.flop_counter import register_flop_formula

    def forward_flops(hidden_shape: Any, weight_shape: Any, *args: Any, **kwargs: Any) -> int:
        return 2 * hidden_shape[0] * hidden_shape[1] * weight_shape[0]

    def backward_flops(grad_shape: Any, hidden_shape: Any, weight_shape: Any, *args: Any, **kwargs: Any) -> int:
        weight_grad = bool(args[-1]) if args else bool(kwargs.get("weight_grad"))
        return (3 if weight_grad else 2) * forward_flops(hidden_shape, weight_shape)

    register_flop_formula(torch.ops.memopt.linear_cross_entropy)(forward_flops)
    register_flop_formula(torch.ops.memopt.linear_cross_entropy_backward)(backward_flops)


_register_flops()
