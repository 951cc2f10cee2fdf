"""Activation compression in Triton: the ``memopt::compress`` / ``memopt::decompress`` pair for int8,
one program per row (Note [Compression format] in :mod:`memopt.runtime.compress`).

``compress``: per row, the absolute maximum over finite values, ``scale = max(absmax / 127, 1e-30)``,
then ``q = round_half_even(x / scale)`` clamped to ±127, non-finite elements stored as -128; the scales
(fp32, one per row) and the codes go into one flat ``uint8`` tensor, scales first, exactly as the PyTorch
op lays them out, so either side of the pair can be swapped for the other. ``decompress``: ``q * scale``,
-128 back to ``-inf``. Rounding is written out (floor, then the tie to the even neighbour) because it
must match ``torch.round`` bit for bit and the interpreter has no ``rint``.

:func:`reference_compress` / :func:`reference_decompress` are the PyTorch ops themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton.language as tl

from memopt.codegen.triton_kernels import jit, next_power_of_two
from memopt.runtime.compress import packed_nbytes, rows_of

__all__ = ["BLOCK", "compress_int8", "decompress_int8", "reference_compress", "reference_decompress"]

BLOCK = 1024          # columns a program handles per step (a power of two)


def _compress_kernel(x_ptr, scale_ptr, q_ptr, cols, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    absmax = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for start in range(0, cols, BLOCK_C):
        offs = start + tl.arange(0, BLOCK_C)
        x = tl.load(x_ptr + row * cols + offs, mask=offs < cols, other=0.0).to(tl.float32)
        finite = tl.abs(x) < float("inf")          # False for inf, -inf and NaN
        absmax = tl.maximum(absmax, tl.where(finite, tl.abs(x), 0.0))
    scale = tl.maximum(tl.max(absmax, axis=0) / 127.0, 1e-30)
    tl.store(scale_ptr + row, scale)
    for start in range(0, cols, BLOCK_C):
        offs = start + tl.arange(0, BLOCK_C)
        x = tl.load(x_ptr + row * cols + offs, mask=offs < cols, other=0.0).to(tl.float32)
        finite = tl.abs(x) < float("inf")          # False for inf, -inf and NaN
        v = tl.where(finite, x / scale, 0.0)
        low = tl.floor(v)
        frac = v - low
        odd = (low - 2.0 * tl.floor(low * 0.5)) != 0.0
        r = tl.where((frac > 0.5) | ((frac == 0.5) & odd), low + 1.0, low)
        r = tl.minimum(tl.maximum(r, -127.0), 127.0)
        q = tl.where(finite, r, -128.0).to(tl.int32).to(tl.int8)
        tl.store(q_ptr + row * cols + offs, q, mask=offs < cols)


def _decompress_kernel(scale_ptr, q_ptr, out_ptr, cols, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(scale_ptr + row)
    for start in range(0, cols, BLOCK_C):
        offs = start + tl.arange(0, BLOCK_C)
        q = tl.load(q_ptr + row * cols + offs, mask=offs < cols, other=0)
        v = tl.where(q == -128, float("-inf"), q.to(tl.float32) * scale)
        tl.store(out_ptr + row * cols + offs, v.to(out_ptr.dtype.element_ty), mask=offs < cols)


def _block(cols: int) -> int:
    return min(BLOCK, next_power_of_two(cols))


def compress_int8(x: torch.Tensor) -> torch.Tensor:
    """``memopt::compress(x, "int8")``, in Triton."""
    rows, cols = rows_of(x.shape)
    packed = torch.empty(packed_nbytes(x.shape), dtype=torch.uint8, device=x.device)
    if rows and cols:
        source = x.detach().contiguous()
        jit(_compress_kernel)[(rows,)](source, packed[:4 * rows].view(torch.float32),
                                      packed[4 * rows:].view(torch.int8), cols, BLOCK_C=_block(cols))
    elif rows:
        packed[:4 * rows].view(torch.float32).fill_(1e-30)
    return packed


def decompress_int8(packed: torch.Tensor, size: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """``memopt::decompress(packed, size, contiguous strides, dtype, "int8")``, in Triton."""
    rows, cols = rows_of(size)
    out = torch.empty(list(size), dtype=dtype, device=packed.device)
    if rows and cols:
        jit(_decompress_kernel)[(rows,)](packed[:4 * rows].view(torch.float32), packed[4 * rows:].view(torch.int8),
                                        out, cols, BLOCK_C=_block(cols))
    return out


def reference_compress(x: torch.Tensor) -> torch.Tensor:
    from memopt.runtime.compress import compress

    return compress(x, "int8")


def reference_decompress(packed: torch.Tensor, size: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    from memopt.runtime.compress import decompress

    out = torch.empty(list(size), dtype=dtype)
    return decompress(packed, list(size), list(out.stride()), dtype, "int8")
