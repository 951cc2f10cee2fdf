"""The LM head and its cross-entropy in Triton, forward and backward, without writing the logits.

Note [Fused linear cross-entropy kernels]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
``forward(hidden, weight, bias, target)``: one program per block of ``BLOCK_N`` tokens walks the
vocabulary ``BLOCK_V`` words at a time, each tile of logits made in registers (``hidden @ weight.T`` over
``BLOCK_K`` columns at a time, fp32 accumulation) and folded at once into a running maximum and sum of
exponentials (the online log-sum-exp), and the target's logit picked out as its tile passes; what it
writes is each token's log-sum-exp and loss, ``N`` floats each.

``backward(...)``: one program per (token block, vocabulary block) makes its tile of logits again, turns
it into the gradient ``(softmax - one_hot) * c`` (``c``: the incoming gradient, zero where the target is
ignored), and adds ``tile @ weight`` into the hidden states' gradient and ``tile.T @ hidden`` into the
weight's (and the tile's column sums into the bias's), with fp32 atomic adds, ``BLOCK_K`` columns at a
time: Cut Cross-Entropy's scheme. Nothing vocabulary-sized is ever written; the gradients are fp32
buffers the caller casts. Atomic adds make the order of the sums, and so the last bits, vary between
runs on a GPU; the values are the reference's up to rounding (tests: the interpreter, odd shapes,
ignored targets).

The tiles' rules (powers of two, at least 16 for ``tl.dot``) are checked by :func:`check_tiles`, since
the interpreter does not enforce them. :func:`reference_forward` / :func:`reference_backward` are the same
computations in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memopt.codegen.triton_kernels import Tiles, check_tiles, dot_dtype, jit

__all__ = ["TILES", "backward", "forward", "reference_backward", "reference_forward"]

TILES = Tiles(block_m=16, block_n=64, block_k=32)     # (tokens, words, hidden columns) per tile


def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, n, v, h, stride_h, stride_w,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                 DOT: tl.constexpr):
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, h, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=(rows[:, None] < n) & (ks[None, :] < h),
                    other=0.0).to(tl.float32)
        wt = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None], mask=(cols[None, :] < v) & (ks[:, None] < h),
                     other=0.0).to(tl.float32)
        acc += tl.dot(a.to(DOT), wt.to(DOT), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < v, other=0.0).to(tl.float32)[None, :]
    return acc


def _forward_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, loss_ptr, n, v, h, stride_h, stride_w, ignore_index,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                    DOT: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    target = tl.load(t_ptr + rows, mask=rows < n, other=ignore_index).to(tl.int64)
    top = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    picked = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, v, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        logits = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, n, v, h, stride_h, stride_w,
                              BLOCK_N, BLOCK_V, BLOCK_K, HAS_BIAS, DOT)
        logits = tl.where(cols[None, :] < v, logits, float("-inf"))
        new_top = tl.maximum(top, tl.max(logits, axis=1))
        total = total * tl.exp(top - new_top) + tl.sum(tl.exp(logits - new_top[:, None]), axis=1)
        top = new_top
        picked += tl.sum(tl.where(cols[None, :] == target[:, None], logits, 0.0), axis=1)
    lse = top + tl.log(total)
    tl.store(lse_ptr + rows, lse, mask=rows < n)
    tl.store(loss_ptr + rows, tl.where(target != ignore_index, lse - picked, 0.0), mask=rows < n)


def _backward_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, dh_ptr, dw_ptr, db_ptr, n, v, h, stride_h,
                     stride_w, ignore_index, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                     HAS_BIAS: tl.constexpr, WEIGHT_GRAD: tl.constexpr, DOT: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    target = tl.load(t_ptr + rows, mask=rows < n, other=ignore_index).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=rows < n, other=0.0)
    coefficient = tl.where(target != ignore_index, tl.load(g_ptr).to(tl.float32), 0.0)
    logits = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, n, v, h, stride_h, stride_w,
                          BLOCK_N, BLOCK_V, BLOCK_K, HAS_BIAS, DOT)
    grad = tl.where(cols[None, :] < v, tl.exp(logits - lse[:, None]), 0.0)
    grad = (grad - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)) * coefficient[:, None]
    if HAS_BIAS and WEIGHT_GRAD:
        tl.atomic_add(db_ptr + cols, tl.sum(grad, axis=0), mask=cols < v)
    for k0 in range(0, h, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        w_mask = (cols[:, None] < v) & (ks[None, :] < h)
        w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=w_mask, other=0.0).to(tl.float32)
        h_mask = (rows[:, None] < n) & (ks[None, :] < h)
        tl.atomic_add(dh_ptr + rows[:, None] * h + ks[None, :],
                      tl.dot(grad.to(DOT), w.to(DOT), input_precision="ieee"), mask=h_mask)
        if WEIGHT_GRAD:
            a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=h_mask, other=0.0).to(tl.float32)
            tl.atomic_add(dw_ptr + cols[:, None] * h + ks[None, :],
                          tl.dot(tl.trans(grad).to(DOT), a.to(DOT), input_precision="ieee"), mask=w_mask)


def _check(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] \
            or target.shape != (hidden.shape[0],) or (bias is not None and bias.shape != (weight.shape[0],)):
        raise ValueError(f"linear cross-entropy: expected hidden (N, H), weight (V, H), bias (V,) and target "
                         f"(N,); got {tuple(hidden.shape)}, {tuple(weight.shape)}, "
                         f"{None if bias is None else tuple(bias.shape)}, {tuple(target.shape)}")
    if hidden.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("linear cross-entropy: hidden and weight need contiguous rows (stride 1 in H)")


def _launch_args(hidden: torch.Tensor) -> dict[str, object]:
    check_tiles(TILES)
    return {"BLOCK_N": TILES.block_m, "BLOCK_V": TILES.block_n, "BLOCK_K": TILES.block_k,
            "DOT": dot_dtype(hidden.dtype)}


def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
            ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(each token's loss, each token's log-sum-exp), fp32, 0 loss where the target is ignored."""
    _check(hidden, weight, bias, target)
    n, h = hidden.shape
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
    if n:
        args = _launch_args(hidden)
        jit(_forward_kernel)[(triton.cdiv(n, TILES.block_m),)](
            hidden, weight, bias if bias is not None else weight, target, lse, loss, n, weight.shape[0], h,
            hidden.stride(0), weight.stride(0), ignore_index, HAS_BIAS=bias is not None, **args)
    return loss, lse


def backward(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             target: torch.Tensor, lse: torch.Tensor, ignore_index: int, weight_grad: bool,
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """fp32 gradients of ``grad * sum(losses)`` for hidden, weight and bias (the last two None unless
    ``weight_grad``)."""
    _check(hidden, weight, bias, target)
    n, h = hidden.shape
    v = weight.shape[0]
    dh = torch.zeros(n, h, dtype=torch.float32, device=hidden.device)
    dw = torch.zeros(v, h, dtype=torch.float32, device=hidden.device) if weight_grad else None
    db = torch.zeros(v, dtype=torch.float32, device=hidden.device) if weight_grad and bias is not None else None
    if n:
        args = _launch_args(hidden)
        grid = (triton.cdiv(n, TILES.block_m), triton.cdiv(v, TILES.block_n))
        jit(_backward_kernel)[grid](
            hidden, weight, bias if bias is not None else weight, target, lse.contiguous(),
            grad.to(torch.float32).reshape(1), dh, dw if dw is not None else dh, db if db is not None else dh,
            n, v, h, hidden.stride(0), weight.stride(0), ignore_index, HAS_BIAS=bias is not None,
            WEIGHT_GRAD=weight_grad, **args)
    return dh, dw, db


def reference_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                      ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.nn.functional.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    lse = logits.logsumexp(-1)
    loss = torch.nn.functional.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    return loss, lse


def reference_backward(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, ...]:
    leaves = [t.detach().float().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    loss, _ = reference_forward(leaves[0], leaves[1], leaves[2] if bias is not None else None, target, ignore_index)
    return torch.autograd.grad(loss.sum() * grad.float(), leaves)
