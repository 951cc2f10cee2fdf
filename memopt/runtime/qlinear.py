"""Quantized linears: the module ``memopt.prepare`` puts in place of a targeted linear, and its ops.

Note [Quantized linears]
~~~~~~~~~~~~~~~~~~~~~~~~
With ``options["quantize"]``, ``memopt.prepare`` replaces each targeted linear by a
:class:`QuantizedLinear` holding its frozen weight as NF4 or int8 buffers (Note [NF4 layout] in
:mod:`memopt.runtime.quant`); the full-precision weight is dropped. Its forward is the plain reference
``F.linear(x, memopt::dequantize_<fmt>(storage...), bias)``: eager PyTorch runs it as it reads (a full
dequantized weight per call, kept by autograd for the input gradient, as PEFT + bitsandbytes' dense
fallback does), and Dynamo records the same two steps. In the joint graph the ``fuse_dequant`` pass
(:mod:`memopt.passes.fuse_dequant`) replaces every matmul that reads the dequantized weight, the
forward's ``x @ W.T`` and the backward's ``grad @ W``, by one ``memopt::<fmt>_mm`` call, after which
nothing dequantizes a whole weight.

``memopt::<fmt>_mm(x, storage..., transposed)`` is ``x @ W.T`` (``transposed=False``: ``(..., in) ->
(..., out)``) or ``x @ W`` (``transposed=True``). Its CPU kernel dequantizes :data:`TILE_VALUES` weight
values at a time into a row tile and multiplies by it, so its scratch memory is one tile whatever the
weight's size; on CUDA it is memopt's Triton kernel (:mod:`memopt.codegen.nf4_matmul`,
:mod:`memopt.codegen.int8_matmul`), which dequantizes in registers. Both are exact against the
dequantize-then-matmul reference up to summation order. The ops have fake kernels (``torch.compile``
and ``memopt plan`` trace them) and an autograd formula for ``x`` (the weight is frozen).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from memopt.runtime.quant import (
    ABSMAX_BLOCK,
    NF4_BLOCK,
    Int8Weight,
    NF4Weight,
    dequantize_int8,
    dequantize_nf4,
    nf4_values,
    quantize_int8,
    quantize_nf4,
)

__all__ = ["QUANTIZED_FORMATS", "TILE_VALUES", "QuantizedLinear", "int8_mm", "nf4_mm", "nf4_mm_lora"]

QUANTIZED_FORMATS = ("nf4", "int8")
TILE_VALUES = 1 << 20          # weight values the CPU kernels dequantize at a time


def _nf4(codes: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None, offset: torch.Tensor | None,
         shape: list[int], dtype: torch.dtype) -> NF4Weight:
    """The storage tensors of a graph call as an :class:`NF4Weight` (``absmax`` is the 8-bit code of the
    block maxima under double quantization, i.e. when ``absmax2`` is given)."""
    if absmax2 is None:
        return NF4Weight(codes, absmax, None, None, None, torch.Size(shape), dtype)
    return NF4Weight(codes, None, absmax, absmax2, offset, torch.Size(shape), dtype)


def _nf4_rows(q: NF4Weight, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of the NF4 weight ``q``, fp32; row boundaries must fall on 64-blocks."""
    cols = q.shape[1]
    return nf4_values(q, start * cols, stop * cols).view(stop - start, cols)


def _tiled_mm(x: torch.Tensor, rows: int, cols: int, weight_rows: Callable[[int, int], torch.Tensor],
              transposed: bool, align: int) -> torch.Tensor:
    """``x @ W.T`` (or ``x @ W`` when ``transposed``) for a ``(rows, cols)`` weight read a row tile at a
    time through ``weight_rows(start, stop)``; tiles are a multiple of ``align`` rows."""
    tile = max(align, TILE_VALUES // max(cols, 1) // align * align)
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    if not transposed:
        out = torch.empty(flat.shape[0], rows, dtype=x.dtype, device=x.device)
        for start in range(0, rows, tile):
            stop = min(rows, start + tile)
            torch.mm(flat, weight_rows(start, stop).to(x.dtype).t(), out=out[:, start:stop])
        return out.view(*lead, rows)
    acc = torch.zeros(flat.shape[0], cols, dtype=torch.float32, device=x.device)
    for start in range(0, rows, tile):
        stop = min(rows, start + tile)
        acc.addmm_(flat[:, start:stop].float(), weight_rows(start, stop).float())
    return acc.to(x.dtype).view(*lead, cols)


def _check_x(name: str, x: torch.Tensor, shape: list[int], transposed: bool) -> None:
    want = shape[0] if transposed else shape[1]
    if x.shape[-1] != want:
        raise ValueError(f"memopt::{name}: the input's last dimension is {x.shape[-1]}, the weight "
                         f"{tuple(shape)} needs {want} ({'x @ W' if transposed else 'x @ W.T'})")


def _on_triton(x: torch.Tensor) -> bool:
    """Whether a CPU call runs memopt's Triton kernel through Triton's interpreter (``MEMOPT_TRITON_CPU=1``,
    Note [Triton on a CPU-only machine]); CUDA calls reach the ``cuda`` kernels directly."""
    from memopt.codegen.triton_kernels import kernels_run_on

    return kernels_run_on(x.device)


def _mm_fake(x: torch.Tensor, shape: list[int], transposed: bool) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], shape[1] if transposed else shape[0])


# --- NF4 -------------------------------------------------------------------------------------------

@torch.library.custom_op("memopt::dequantize_nf4", mutates_args=())
def dequantize_nf4_op(codes: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None,
                      offset: torch.Tensor | None, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """The whole weight, dequantized (the reference; ``fuse_dequant`` removes it from compiled graphs)."""
    return dequantize_nf4(_nf4(codes, absmax, absmax2, offset, shape, dtype))


@dequantize_nf4_op.register_fake
def _(codes: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None, offset: torch.Tensor | None,
      shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    return codes.new_empty(shape, dtype=dtype)


@torch.library.custom_op("memopt::nf4_mm", mutates_args=())
def nf4_mm(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None,
           offset: torch.Tensor | None, shape: list[int], transposed: bool) -> torch.Tensor:
    """``x @ W.T`` (``x @ W`` when ``transposed``) for the NF4 weight W of ``shape`` (Note [Quantized
    linears])."""
    q = _nf4(codes, absmax, absmax2, offset, shape, x.dtype)
    if _on_triton(x):
        return _nf4_triton(x, q, transposed, None)
    _check_x("nf4_mm", x, shape, transposed)
    align = NF4_BLOCK // math.gcd(shape[1], NF4_BLOCK)
    return _tiled_mm(x, shape[0], shape[1], lambda a, b: _nf4_rows(q, a, b), transposed, align)


@nf4_mm.register_kernel("cuda")
def _(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None,
      offset: torch.Tensor | None, shape: list[int], transposed: bool) -> torch.Tensor:
    return _nf4_triton(x, _nf4(codes, absmax, absmax2, offset, shape, x.dtype), transposed, None)


def _nf4_triton(x: torch.Tensor, q: NF4Weight, transposed: bool,
                lora: tuple[torch.Tensor, torch.Tensor, float] | None) -> torch.Tensor:
    from memopt.codegen.nf4_matmul import nf4_matmul

    _check_x("nf4_mm", x, list(q.shape), transposed)
    return nf4_matmul(x, q, transposed=transposed, lora=lora)


@torch.library.custom_op("memopt::nf4_mm_lora", mutates_args=())
def nf4_mm_lora(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None,
                offset: torch.Tensor | None, shape: list[int], xa: torch.Tensor, b: torch.Tensor,
                scale: float) -> torch.Tensor:
    """``x @ W.T + scale * xa @ b.T``: the NF4 forward with LoRA's up projection in its epilogue
    (``xa = x @ A.T``, computed apart because the backward keeps it for B's gradient). Only
    ``fuse_dequant`` makes it, after autograd, so it has no autograd formula."""
    if _on_triton(x):
        return _nf4_triton(x, _nf4(codes, absmax, absmax2, offset, shape, x.dtype), False, (xa, b, scale))
    out = nf4_mm(x, codes, absmax, absmax2, offset, shape, False)
    flat = out.view(-1, shape[0])
    flat.addmm_(xa.reshape(flat.shape[0], -1).to(out.dtype), b.t().to(out.dtype), alpha=scale)
    return out


@nf4_mm_lora.register_kernel("cuda")
def _(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None,
      offset: torch.Tensor | None, shape: list[int], xa: torch.Tensor, b: torch.Tensor,
      scale: float) -> torch.Tensor:
    return _nf4_triton(x, _nf4(codes, absmax, absmax2, offset, shape, x.dtype), False, (xa, b, scale))


@nf4_mm_lora.register_fake
def _(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None,
      offset: torch.Tensor | None, shape: list[int], xa: torch.Tensor, b: torch.Tensor,
      scale: float) -> torch.Tensor:
    return _mm_fake(x, shape, False)


@nf4_mm.register_fake
def _(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None,
      offset: torch.Tensor | None, shape: list[int], transposed: bool) -> torch.Tensor:
    return _mm_fake(x, shape, transposed)


def _nf4_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.storage = inputs[1:6]
    ctx.transposed = inputs[6]


def _nf4_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    return (nf4_mm(grad, *ctx.storage, not ctx.transposed), None, None, None, None, None, None)


nf4_mm.register_autograd(_nf4_backward, setup_context=_nf4_setup)


# --- int8 ------------------------------------------------------------------------------------------

@torch.library.custom_op("memopt::dequantize_int8", mutates_args=())
def dequantize_int8_op(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The whole int8 weight, dequantized (the reference; ``fuse_dequant`` removes it)."""
    return dequantize_int8(Int8Weight(codes, scale, dtype))


@dequantize_int8_op.register_fake
def _(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty_like(codes, dtype=dtype)


@torch.library.custom_op("memopt::int8_mm", mutates_args=())
def int8_mm(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``x @ W.T`` (``x @ W`` when ``transposed``) for the row-wise int8 weight W (Note [Quantized
    linears])."""
    shape = list(codes.shape)
    if _on_triton(x):
        return _int8_triton(x, codes, scale, transposed)
    _check_x("int8_mm", x, shape, transposed)
    return _tiled_mm(x, shape[0], shape[1], lambda a, b: codes[a:b].float() * scale[a:b, None],
                     transposed, 1)


@int8_mm.register_kernel("cuda")
def _(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, transposed: bool) -> torch.Tensor:
    return _int8_triton(x, codes, scale, transposed)


def _int8_triton(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, transposed: bool) -> torch.Tensor:
    from memopt.codegen.int8_matmul import int8_matmul

    _check_x("int8_mm", x, list(codes.shape), transposed)
    return int8_matmul(x, codes, scale, transposed=transposed)


@int8_mm.register_fake
def _(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, transposed: bool) -> torch.Tensor:
    return _mm_fake(x, list(codes.shape), transposed)


def _int8_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.storage = inputs[1:3]
    ctx.transposed = inputs[3]


def _int8_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    return (int8_mm(grad, *ctx.storage, not ctx.transposed), None, None, None)


int8_mm.register_autograd(_int8_backward, setup_context=_int8_setup)


# --- the module ------------------------------------------------------------------------------------

def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or t.is_meta


def _empty_nf4(weight: torch.Tensor, double_quant: bool) -> NF4Weight:
    """NF4 storage of ``weight``'s size with no values: for fake models (``memopt plan``), where only
    shapes matter and quantizing block by block would only cost time."""
    numel, device = weight.numel(), weight.device
    blocks = numel // NF4_BLOCK
    codes = torch.empty(numel // 2, dtype=torch.uint8, device=device)
    if not double_quant:
        return NF4Weight(codes, torch.empty(blocks, device=device), None, None, None, weight.shape, weight.dtype)
    return NF4Weight(codes, None, torch.empty(blocks, dtype=torch.uint8, device=device),
                     torch.empty(-(-blocks // ABSMAX_BLOCK), device=device), torch.empty((), device=device),
                     weight.shape, weight.dtype)


class QuantizedLinear(nn.Module):
    """A frozen linear whose weight is stored quantized (Note [Quantized linears]). Buffers:
    ``weight_codes`` and, for NF4, ``weight_absmax`` (fp32 per 64-block, or their 8-bit codes under
    double quantization, with ``weight_absmax2`` and ``weight_offset``); for int8, ``weight_scale``."""

    weight_absmax2: torch.Tensor | None
    weight_offset: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, fmt: str, dtype: torch.dtype,
                 bias: torch.Tensor | None, storage: dict[str, torch.Tensor | None]) -> None:
        super().__init__()
        if fmt not in QUANTIZED_FORMATS:
            raise ValueError(f"unknown quantized format {fmt!r}; expected one of {QUANTIZED_FORMATS}")
        self.in_features, self.out_features, self.fmt, self.dtype = in_features, out_features, fmt, dtype
        for name, tensor in storage.items():
            self.register_buffer(name, tensor)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, module: nn.Module, fmt: str, *, double_quant: bool = True,
                    fan_in_fan_out: bool = False) -> QuantizedLinear:
        """``module``'s weight quantized (stored ``(out, in)``; transformers' ``Conv1D`` is transposed
        first), its bias kept."""
        weight = cast(torch.Tensor, module.weight).detach()
        weight = weight.t() if fan_in_fan_out else weight
        out_features, in_features = int(weight.shape[0]), int(weight.shape[1])
        storage: dict[str, torch.Tensor | None]
        if fmt == "nf4":
            if weight.numel() % NF4_BLOCK:
                raise ValueError(f"NF4 needs a multiple of {NF4_BLOCK} weight values; this linear has "
                                 f"{weight.numel()} ({out_features} x {in_features})")
            q = _empty_nf4(weight, double_quant) if _is_fake(weight) else \
                quantize_nf4(weight, double_quant=double_quant)
            storage = {"weight_codes": q.codes,
                       "weight_absmax": q.qabsmax if q.qabsmax is not None else q.absmax,
                       "weight_absmax2": q.absmax2, "weight_offset": q.offset}
        elif fmt == "int8":
            if _is_fake(weight):
                storage = {"weight_codes": torch.empty(weight.shape, dtype=torch.int8, device=weight.device),
                           "weight_scale": torch.empty(out_features, device=weight.device)}
            else:
                q8 = quantize_int8(weight)
                storage = {"weight_codes": q8.codes, "weight_scale": q8.scale}
        else:
            raise ValueError(f"unknown quantized format {fmt!r}; expected one of {QUANTIZED_FORMATS}")
        bias = getattr(module, "bias", None)
        return cls(in_features, out_features, fmt, weight.dtype, bias, storage)

    def storage_args(self) -> tuple[Any, ...]:
        """The storage arguments of this weight's ``dequantize``/``mm`` ops (after ``x``)."""
        if self.fmt == "nf4":
            return (self.weight_codes, self.weight_absmax, self.weight_absmax2, self.weight_offset,
                    [self.out_features, self.in_features])
        return (self.weight_codes, self.weight_scale)

    def dequantized_weight(self) -> torch.Tensor:
        """The full ``(out, in)`` weight in its original dtype (the reference)."""
        if self.fmt == "nf4":
            return torch.ops.memopt.dequantize_nf4(*self.storage_args(), self.dtype)
        return torch.ops.memopt.dequantize_int8(*self.storage_args(), self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)

    def quantized_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt}, "
                f"dtype={self.dtype}, bias={self.bias is not None}")


def _register_flops() -> None:
    """FLOPs of the fused ops for the cost model: a matmul's ``2 * rows * in * out``."""
    from torch.utils.flop_counter import register_flop_formula

    def matmul_flops(x_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return 2 * math.prod(x_shape) * int(out_shape[-1])

    def lora_flops(x_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        xa_shape = args[5]
        return matmul_flops(x_shape, out_shape=out_shape) + matmul_flops(xa_shape, out_shape=out_shape)

    register_flop_formula([torch.ops.memopt.nf4_mm, torch.ops.memopt.int8_mm])(matmul_flops)
    register_flop_formula(torch.ops.memopt.nf4_mm_lora)(lora_flops)


_register_flops()
