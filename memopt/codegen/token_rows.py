"""Token elimination's two data movements in Triton, without a permuted copy of the sequence (LeMo's
"permutation-free" kernels): gather the kept tokens' rows, and add the attention output back at their
positions in place.

``gather_rows(x, index)``: ``x`` is ``(B, S, H)``, ``index`` ``(B, K)`` token positions; the result is
``(B, K, H)`` with ``out[b, j] = x[b, index[b, j]]``, read straight from ``x`` (any row stride).
``scatter_add_rows_(out, index, rows)``: ``out[b, index[b, j]] += rows[b, j]`` in place, ``out`` ``(B, S,
H)``; the indices of one batch row must be distinct (kept tokens are), so no two programs add to one row.
One program per (batch, kept token), a block of columns at a time; arithmetic in fp32, stored in the
tensor's dtype. :func:`reference_gather_rows` / :func:`reference_scatter_add_rows_` are the PyTorch ops.
"""

from __future__ import annotations

import torch
import triton.language as tl

from memopt.codegen.triton_kernels import jit, next_power_of_two

__all__ = ["gather_rows", "reference_gather_rows", "reference_scatter_add_rows_", "scatter_add_rows_"]

BLOCK = 1024          # columns a program handles per step (a power of two)


def _gather_kernel(x_ptr, index_ptr, out_ptr, kept, cols, stride_xb, stride_xs, stride_ob, stride_os,
                   BLOCK_C: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // kept
    source = tl.load(index_ptr + pid).to(tl.int64)
    for start in range(0, cols, BLOCK_C):
        offs = start + tl.arange(0, BLOCK_C)
        v = tl.load(x_ptr + b * stride_xb + source * stride_xs + offs, mask=offs < cols)
        tl.store(out_ptr + b * stride_ob + (pid % kept) * stride_os + offs, v, mask=offs < cols)


def _scatter_add_kernel(out_ptr, index_ptr, rows_ptr, kept, cols, stride_ob, stride_os, stride_rb, stride_rs,
                        BLOCK_C: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // kept
    target = tl.load(index_ptr + pid).to(tl.int64)
    for start in range(0, cols, BLOCK_C):
        offs = start + tl.arange(0, BLOCK_C)
        mask = offs < cols
        here = out_ptr + b * stride_ob + target * stride_os + offs
        add = tl.load(rows_ptr + b * stride_rb + (pid % kept) * stride_rs + offs, mask=mask).to(tl.float32)
        tl.store(here, (tl.load(here, mask=mask).to(tl.float32) + add).to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, index: torch.Tensor, what: str) -> None:
    if x.dim() != 3 or index.dim() != 2 or index.shape[0] != x.shape[0]:
        raise ValueError(f"{what}: expected x (B, S, H) and index (B, K); got {tuple(x.shape)} and "
                         f"{tuple(index.shape)}")
    if x.stride(-1) != 1:
        raise ValueError(f"{what}: the hidden dimension must be contiguous (stride 1); got strides {x.stride()}")


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, j]]`` for every ``b, j``: ``(B, K, H)``."""
    _check(x, index, "gather_rows")
    batch, kept, cols = x.shape[0], index.shape[1], x.shape[2]
    out = torch.empty(batch, kept, cols, dtype=x.dtype, device=x.device)
    if batch and kept and cols:
        flat = index.contiguous().view(-1)
        jit(_gather_kernel)[(batch * kept,)](x, flat, out, kept, cols, x.stride(0), x.stride(1), out.stride(0),
                                            out.stride(1), BLOCK_C=min(BLOCK, next_power_of_two(cols)))
    return out


def scatter_add_rows_(out: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out[b, index[b, j]] += rows[b, j]`` in place; returns ``out``."""
    _check(out, index, "scatter_add_rows_")
    if rows.shape != (out.shape[0], index.shape[1], out.shape[2]) or rows.stride(-1) != 1:
        raise ValueError(f"scatter_add_rows_: rows must be (B, K, H) = {(out.shape[0], index.shape[1], out.shape[2])} "
                         f"with contiguous H; got {tuple(rows.shape)}, strides {rows.stride()}")
    batch, kept, cols = out.shape[0], index.shape[1], out.shape[2]
    if batch and kept and cols:
        flat = index.contiguous().view(-1)
        jit(_scatter_add_kernel)[(batch * kept,)](out, flat, rows, kept, cols, out.stride(0), out.stride(1),
                                                 rows.stride(0), rows.stride(1),
                                                 BLOCK_C=min(BLOCK, next_power_of_two(cols)))
    return out


def reference_gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[2]))


def reference_scatter_add_rows_(out: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    added = out.float().scatter_add(1, index[..., None].expand(-1, -1, out.shape[2]), rows.float())
    return out.copy_(added.to(out.dtype))
