"""int8 dequant-matmul in Triton: ``x @ W.T`` or ``x @ W`` with W stored int8 with one fp32 scale per
row (LLM.int8()'s vector-wise weight quantization, :mod:`memopt.runtime.quant`), dequantized in
registers a tile at a time.

As in :mod:`memopt.codegen.nf4_matmul`, the kernel multiplies ``x (M, R)`` by a logical ``V (R, C)``,
``V = W.T`` for the forward and ``V = W`` for the input gradient, whose element ``(r, c)`` is
``codes[flat] * scale[row]`` with ``flat = r * stride_r + c * stride_c`` and ``row = flat // K``.
Accumulation is fp32; any M, N, K (ragged edges masked).

:func:`reference` is the plain-PyTorch meaning: dequantize, then matmul.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from memopt.codegen.triton_kernels import Tiles, check_tiles, dot_dtype, jit

__all__ = ["TILES", "int8_matmul", "reference"]

TILES = Tiles(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=3)


def _int8_matmul_kernel(x_ptr, codes_ptr, scale_ptr, out_ptr, M, R, C, K, stride_r, stride_c,
                        stride_xm, stride_xr, stride_om, stride_oc,
                        DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, R, BLOCK_K):
        offs_r = start + tl.arange(0, BLOCK_K)
        x_mask = (offs_m[:, None] < M) & (offs_r[None, :] < R)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_r[None, :] * stride_xr, mask=x_mask, other=0.0)
        v_mask = (offs_r[:, None] < R) & (offs_c[None, :] < C)
        flat = offs_r[:, None].to(tl.int64) * stride_r + offs_c[None, :].to(tl.int64) * stride_c
        code = tl.load(codes_ptr + flat, mask=v_mask, other=0).to(tl.float32)
        scale = tl.load(scale_ptr + flat // K, mask=v_mask, other=0.0)
        v = code * scale
        acc += tl.dot(x.to(tl.float32).to(DOT), v.to(DOT), input_precision="ieee")
    out_mask = (offs_m[:, None] < M) & (offs_c[None, :] < C)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_c[None, :] * stride_oc,
             acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def int8_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, *, transposed: bool = False,
                tiles: Tiles = TILES) -> torch.Tensor:
    """``x @ W.T`` (``x @ W`` when ``transposed``) for ``W = codes * scale[:, None]``."""
    rows, cols = int(codes.shape[0]), int(codes.shape[1])
    reduce, out_cols = (rows, cols) if transposed else (cols, rows)
    if x.shape[-1] != reduce:
        raise ValueError(f"int8_matmul: x has {x.shape[-1]} columns, the weight {rows}x{cols} needs {reduce}")
    check_tiles(tiles, operand_bytes=x.element_size())
    lead = x.shape[:-1]
    x2 = x.reshape(-1, reduce)
    m = x2.shape[0]
    codes = codes.contiguous()
    out = torch.empty(m, out_cols, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, tiles.block_m), triton.cdiv(out_cols, tiles.block_n))
    jit(_int8_matmul_kernel)[grid](
        x2, codes, scale, out, m, reduce, out_cols, cols, cols if transposed else 1, 1 if transposed else cols,
        x2.stride(0), x2.stride(1), out.stride(0), out.stride(1), DOT=dot_dtype(x.dtype),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out.view(*lead, out_cols)


def reference(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """What :func:`int8_matmul` computes, in plain PyTorch: the weight dequantized in the input's dtype,
    products accumulated in fp32, the input's dtype out."""
    w = (codes.float() * scale[:, None]).to(x.dtype).float()
    return (x.float() @ (w if transposed else w.t())).to(x.dtype)
