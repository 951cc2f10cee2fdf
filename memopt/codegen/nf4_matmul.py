"""NF4 dequant-matmul in Triton: ``x @ W.T`` or ``x @ W`` with W read as NF4 and dequantized in
registers, a tile at a time, never whole; optionally ``+ scale * xa @ B.T`` (LoRA's up projection) in the
same kernel's epilogue.

The weight W ``(N, K)`` is stored flat in NF4 (Note [NF4 layout] in :mod:`memopt.runtime.quant`). The
kernel multiplies ``x (M, R)`` by a logical matrix ``V (R, C)`` whose element ``(r, c)`` is W's flat
element ``r * stride_r + c * stride_c``: ``V = W.T`` (``stride_r = 1, stride_c = K``) for the forward,
``V = W`` (``K, 1``) for the input gradient. For each element it loads the code byte (``flat // 2``,
the even element in the high nibble), looks the level up in the 16-entry NF4 table and multiplies by
its block's maximum (``flat // 64``; decoded from its 8-bit code under double quantization:
``map[q] * absmax2[block // 256] + offset``). Accumulation is fp32. Any M, N, K (ragged edges masked)
whose N * K is a multiple of 64.

:func:`reference` is the plain-PyTorch meaning: dequantize, then matmul.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import triton
import triton.language as tl

from memopt.codegen.triton_kernels import (
    Tiles,
    check_tiles,
    dot_dtype,
    jit,
    next_power_of_two,
)
from memopt.runtime.quant import NF4_LEVELS, NF4Weight, dequantize_nf4, dynamic_map_on

__all__ = ["TILES", "nf4_matmul", "reference"]

TILES = Tiles(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=3)


def _nf4_matmul_kernel(x_ptr, codes_ptr, absmax_ptr, absmax2_ptr, offset_ptr, map_ptr, levels_ptr,
                       xa_ptr, b_ptr, out_ptr, M, R, C, stride_r, stride_c,
                       stride_xm, stride_xr, stride_am, stride_ar, stride_bc, stride_br, stride_om, stride_oc,
                       lora_scale, RANK,
                       DOUBLE_QUANT: tl.constexpr, HAS_LORA: tl.constexpr, DOT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_RANK: tl.constexpr):
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
        byte = tl.load(codes_ptr + flat // 2, mask=v_mask, other=0).to(tl.int32)
        nibble = tl.where(flat % 2 == 0, byte >> 4, byte & 15)
        level = tl.load(levels_ptr + nibble)
        block = flat // 64
        if DOUBLE_QUANT:
            qmax = tl.load(absmax_ptr + block, mask=v_mask, other=0).to(tl.int32)
            maxima = tl.load(map_ptr + qmax) * tl.load(absmax2_ptr + block // 256, mask=v_mask, other=0.0) \
                + tl.load(offset_ptr)
        else:
            maxima = tl.load(absmax_ptr + block, mask=v_mask, other=0.0)
        v = tl.where(v_mask, level * maxima, 0.0)
        acc += tl.dot(x.to(tl.float32).to(DOT), v.to(DOT), input_precision="ieee")
    if HAS_LORA:
        offs_k = tl.arange(0, BLOCK_RANK)
        a_mask = (offs_m[:, None] < M) & (offs_k[None, :] < RANK)
        xa = tl.load(xa_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ar, mask=a_mask, other=0.0)
        b_mask = (offs_k[:, None] < RANK) & (offs_c[None, :] < C)
        bt = tl.load(b_ptr + offs_c[None, :] * stride_bc + offs_k[:, None] * stride_br, mask=b_mask, other=0.0)
        acc += lora_scale * tl.dot(xa.to(tl.float32).to(DOT), bt.to(tl.float32).to(DOT), input_precision="ieee")
    out_mask = (offs_m[:, None] < M) & (offs_c[None, :] < C)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_c[None, :] * stride_oc,
             acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def nf4_matmul(x: torch.Tensor, q: NF4Weight, *, transposed: bool = False, lora: tuple[torch.Tensor, torch.Tensor,
               float] | None = None, tiles: Tiles = TILES) -> torch.Tensor:
    """``x @ W.T`` (``x @ W`` when ``transposed``) for the NF4 weight ``q``, plus ``scale * xa @ B.T``
    when ``lora = (xa, B, scale)`` (``xa = x @ A.T``, ``(..., r)``; ``B`` ``(N, r)``; forward only)."""
    rows, cols = int(q.shape[0]), int(q.shape[1])
    reduce, out_cols = (rows, cols) if transposed else (cols, rows)
    if x.shape[-1] != reduce:
        raise ValueError(f"nf4_matmul: x has {x.shape[-1]} columns, the weight {rows}x{cols} needs {reduce}")
    if lora is not None and transposed:
        raise ValueError("nf4_matmul: the LoRA epilogue is for the forward (transposed=False) only")
    check_tiles(tiles, operand_bytes=x.element_size())
    lead = x.shape[:-1]
    x2 = x.reshape(-1, reduce)
    m = x2.shape[0]
    out = torch.empty(m, out_cols, dtype=x.dtype, device=x.device)
    double = q.qabsmax is not None
    device = x.device
    absmax = q.qabsmax if double else q.absmax
    assert absmax is not None
    absmax2 = q.absmax2 if double else absmax
    offset = q.offset if double else absmax
    if lora is not None:
        xa, b, scale = lora
        xa = xa.reshape(m, -1)
        rank = int(b.shape[1])
    else:
        xa, b, scale, rank = x2, x2, 0.0, 1
    grid = (triton.cdiv(m, tiles.block_m), triton.cdiv(out_cols, tiles.block_n))
    jit(_nf4_matmul_kernel)[grid](
        x2, q.codes, absmax, absmax2, offset, dynamic_map_on(device), NF4_LEVELS.to(device),
        xa, b, out, m, reduce, out_cols, cols if transposed else 1, 1 if transposed else cols,
        x2.stride(0), x2.stride(1), xa.stride(0), xa.stride(1), b.stride(0), b.stride(1),
        out.stride(0), out.stride(1), float(scale), rank,
        DOUBLE_QUANT=double, HAS_LORA=lora is not None, DOT=dot_dtype(x.dtype),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        BLOCK_RANK=next_power_of_two(rank), num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out.view(*lead, out_cols)


def reference(x: torch.Tensor, q: NF4Weight, *, transposed: bool = False,
              lora: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> Any:
    """What :func:`nf4_matmul` computes, in plain PyTorch: the weight dequantized in the input's dtype
    (the kernel's ``tl.dot`` operands), products accumulated in fp32, the input's dtype out."""
    w = dequantize_nf4(dataclasses.replace(q, dtype=x.dtype)).float()
    out = x.float() @ (w if transposed else w.t())
    if lora is not None:
        xa, b, scale = lora
        out = out + scale * (xa.float() @ b.float().t())
    return out.to(x.dtype)
