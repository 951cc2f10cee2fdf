"""Compressed activations: custom ops that pack a saved tensor into int8 or fp8 and unpack it at use.

- ``memopt::compress(x, fmt) -> packed``: a flat ``uint8`` tensor holding one float32 scale per row
  (the last dimension is a row) followed by ``x`` quantised row by row.
- ``memopt::decompress(packed, size, stride, dtype, fmt) -> y``: ``x``'s values back, with ``x``'s
  shape, strides and dtype (the backward may read a saved value through its strides).

Note [Compression format]
Per row, ``scale = absmax / qmax`` and ``q = x / scale`` rounded to int8 (``qmax`` 127) or cast to
float8 e4m3 (``qmax`` 448). One packed tensor instead of two keeps the forward's saved values and the
backward's inputs one for one, which is how AOTAutograd pairs them. Compression is lossy: the error is
bounded by the format (int8: half a step of ``absmax / 127`` per element; SQNR about 40 dB on Gaussian
data; fp8 e4m3: about 30 dB), measured in ``tests/test_compress.py``. Scales are taken over a row's finite
values; non-finite elements come back as ``-inf`` (masks), the rest of the row unharmed. The ops work
through the rows in blocks, in the tensor's memory order (a saved value may be a transposed view: it is
never copied whole), so their scratch memory stays small and the simulator's view of them (their inputs
and outputs) stays true. The scheduler compresses only when
``compress_activations`` allows it. On CUDA (and on CPU with ``MEMOPT_TRITON_CPU=1``) int8 runs memopt's
Triton kernels (:mod:`memopt.codegen.compress_rows`), which produce the same bytes; fp8 stays in PyTorch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from memopt.codegen.triton_kernels import kernels_run_on

FORMATS: dict[str, tuple[torch.dtype, float]] = {
    "int8": (torch.int8, 127.0),
    "fp8": (torch.float8_e4m3fn, 448.0),
}
COMPRESSIBLE = (torch.float32, torch.bfloat16, torch.float16)
_TINY = 1e-30       # the scale of an all-zero row (any positive value decodes zeros to zeros)
_CHUNK_ELEMENTS = 1 << 14
# Non-finite elements (an attention mask's -inf) are stored as a code no finite value uses and come
# back as -inf; +inf and NaN are not kept (a NaN activation has made the loss NaN already).
_NONFINITE_INT8 = -128
_NONFINITE_FP8 = float("nan")


def rows_of(size: Sequence[int]) -> tuple[int, int]:
    """(rows, row length) of a tensor of ``size``: the last dimension is a row."""
    if len(size) == 0:
        return 1, 1
    cols = int(size[-1])
    numel = 1
    for s in size:
        numel *= int(s)
    return (numel // cols if cols else 0), cols


def packed_nbytes(size: Sequence[int]) -> int:
    """Bytes of ``compress``'s output for a tensor of ``size`` (one byte per element plus 4 per row)."""
    rows, cols = rows_of(size)
    return rows * cols + 4 * rows


def _check(fmt: str) -> tuple[torch.dtype, float]:
    if fmt not in FORMATS:
        raise ValueError(f"memopt::compress: unknown format {fmt!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[fmt]


def _blocks(size: Sequence[int], stride: Sequence[int]) -> Iterator[list[tuple[int, int, int]]]:
    """Blocks of whole rows of a tensor of ``size`` and ``stride`` (the last dimension is a row), each
    a list of ``(dim, start, length)`` narrowings, in the tensor's memory order and of about
    _CHUNK_ELEMENTS elements (at least a row): the same narrowings of the tensor, of its codes and of
    its scales are views, so the ops' scratch stays near a block whatever the tensor's size and strides
    (a saved value may be a transposed view: the ops never copy it whole)."""
    dims = sorted(range(len(size) - 1), key=lambda d: -stride[d])      # outermost in memory first
    total = math.prod(size)

    def walk(k: int, prefix: list[tuple[int, int, int]], numel: int) -> Iterator[list[tuple[int, int, int]]]:
        if k == len(dims) or numel <= _CHUNK_ELEMENTS:
            yield prefix
            return
        d = dims[k]
        inner = numel // size[d]
        if inner <= _CHUNK_ELEMENTS or k == len(dims) - 1:
            step = max(1, _CHUNK_ELEMENTS // max(inner, 1))
            for start in range(0, size[d], step):
                yield [*prefix, (d, start, min(step, size[d] - start))]
        else:
            for start in range(size[d]):
                yield from walk(k + 1, [*prefix, (d, start, 1)], inner)

    if total:
        yield from walk(0, [], total)


def _narrow(t: torch.Tensor, block: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    for dim, start, length in block:
        t = t.narrow(dim, start, length)
    return t


@torch.library.custom_op("memopt::compress", mutates_args=())
def compress(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Pack ``x`` (see the module notes)."""
    qdtype, qmax = _check(fmt)
    if x.dtype not in COMPRESSIBLE:
        raise ValueError(f"memopt::compress: {x.dtype} is not compressible; expected one of {COMPRESSIBLE}")
    if fmt == "int8" and kernels_run_on(x.device):
        from memopt.codegen.compress_rows import compress_int8

        return compress_int8(x)
    rows, cols = rows_of(x.shape)
    packed = torch.empty(packed_nbytes(x.shape), dtype=torch.uint8, device=x.device)
    source = x.detach() if x.dim() else x.detach().view(1)
    size = list(source.shape)
    scales = packed[:4 * rows].view(torch.float32).view(size[:-1])
    quantised = packed[4 * rows:].view(qdtype).view(size)
    for block in _blocks(size, source.stride()):
        values = _narrow(source, block).float()
        finite = torch.isfinite(values)
        absmax = torch.where(finite, values.abs(), 0.0).amax(dim=-1, keepdim=True) if cols else \
            values.new_zeros(*values.shape[:-1], 1)
        scale = (absmax / qmax).clamp_min(_TINY)
        scaled = torch.where(finite, values / scale, 0.0)
        if qdtype == torch.int8:
            codes = scaled.round().clamp(-qmax, qmax).to(torch.int8)
            codes[~finite] = _NONFINITE_INT8
        else:
            codes = torch.where(finite, scaled, _NONFINITE_FP8).to(qdtype)
        _narrow(quantised, block).copy_(codes)
        _narrow(scales, block).copy_(scale.squeeze(-1))
    return packed


@compress.register_fake
def _compress_fake(x: torch.Tensor, fmt: str) -> torch.Tensor:
    _check(fmt)
    return x.new_empty(packed_nbytes(x.shape), dtype=torch.uint8)


@torch.library.custom_op("memopt::decompress", mutates_args=())
def decompress(packed: torch.Tensor, size: list[int], stride: list[int], dtype: torch.dtype,
               fmt: str) -> torch.Tensor:
    """Unpack what ``compress`` packed, into a tensor of ``size``, ``stride`` and ``dtype``."""
    qdtype, _ = _check(fmt)
    if fmt == "int8" and kernels_run_on(packed.device) and list(stride) == list(
            torch.empty(size, device="meta").stride()):
        from memopt.codegen.compress_rows import decompress_int8

        return decompress_int8(packed, size, dtype)
    rows, _ = rows_of(size)
    out = torch.empty_strided(size, stride, dtype=dtype, device=packed.device)
    target = out if out.dim() else out.view(1)
    shape = list(target.shape)
    scales = packed[:4 * rows].view(torch.float32).view(*shape[:-1], 1)
    quantised = packed[4 * rows:].view(qdtype).view(shape)
    for block in _blocks(shape, target.stride()):
        codes = _narrow(quantised, block)
        values = codes.float() * _narrow(scales, block)
        nonfinite = codes == _NONFINITE_INT8 if qdtype == torch.int8 else torch.isnan(codes.float())
        _narrow(target, block).copy_(torch.where(nonfinite, -torch.inf, values))
    return out


@decompress.register_fake
def _decompress_fake(packed: torch.Tensor, size: list[int], stride: list[int], dtype: torch.dtype,
                     fmt: str) -> torch.Tensor:
    return torch.empty_strided(size, stride, dtype=dtype, device=packed.device)
