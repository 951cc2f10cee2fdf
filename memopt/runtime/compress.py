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
through the rows in chunks, so their scratch memory stays small and the simulator's view of them (their
inputs and outputs) stays true. The scheduler compresses only when
``compress_activations`` allows it. On CUDA (and on CPU with ``MEMOPT_TRITON_CPU=1``) int8 runs memopt's
Triton kernels (:mod:`memopt.codegen.compress_rows`), which produce the same bytes; fp8 stays in PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def _chunk_rows(cols: int) -> int:
    """Rows per chunk: the ops work a chunk at a time so that their scratch stays near _CHUNK_ELEMENTS
    float32 values, whatever the tensor's size (the simulator does not see scratch inside an op)."""
    return max(1, _CHUNK_ELEMENTS // max(cols, 1))


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
    scales = packed[:4 * rows].view(torch.float32)
    quantised = packed[4 * rows:].view(qdtype).view(rows, cols)
    source = x.detach().reshape(rows, cols)
    step = _chunk_rows(cols)
    for first in range(0, rows, step):
        values = source[first:first + step].float()
        finite = torch.isfinite(values)
        absmax = torch.where(finite, values.abs(), 0.0).amax(dim=1, keepdim=True) if cols else \
            values.new_zeros(values.shape[0], 1)
        scale = (absmax / qmax).clamp_min(_TINY)
        scaled = torch.where(finite, values / scale, 0.0)
        if qdtype == torch.int8:
            codes = scaled.round().clamp(-qmax, qmax).to(torch.int8)
            codes[~finite] = _NONFINITE_INT8
        else:
            codes = torch.where(finite, scaled, _NONFINITE_FP8).to(qdtype)
        quantised[first:first + step] = codes
        scales[first:first + step] = scale.reshape(-1)
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
    rows, cols = rows_of(size)
    scales = packed[:4 * rows].view(torch.float32).view(rows, 1)
    quantised = packed[4 * rows:].view(qdtype).view(rows, cols)
    out = torch.empty_strided(size, stride, dtype=dtype, device=packed.device)
    target = out.view(rows, cols) if out.is_contiguous() else torch.empty(rows, cols, dtype=dtype,
                                                                         device=packed.device)
    step = _chunk_rows(cols)
    for first in range(0, rows, step):
        codes = quantised[first:first + step]
        values = codes.float() * scales[first:first + step]
        nonfinite = codes == _NONFINITE_INT8 if qdtype == torch.int8 else torch.isnan(codes.float())
        target[first:first + step] = torch.where(nonfinite, -torch.inf, values).to(dtype)
    if target.data_ptr() != out.data_ptr():
        out.copy_(target.view(size))
    return out


@decompress.register_fake
def _decompress_fake(packed: torch.Tensor, size: list[int], stride: list[int], dtype: torch.dtype,
                     fmt: str) -> torch.Tensor:
    return torch.empty_strided(size, stride, dtype=dtype, device=packed.device)
