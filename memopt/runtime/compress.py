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
data; fp8 e4m3: about 30 dB), measured in ``tests/test_compress.py``. The scheduler compresses only when
``compress_activations`` allows it. These are plain PyTorch ops; the Triton kernels of the quantisation
issue replace them on GPUs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FORMATS: dict[str, tuple[torch.dtype, float]] = {
    "int8": (torch.int8, 127.0),
    "fp8": (torch.float8_e4m3fn, 448.0),
}
COMPRESSIBLE = (torch.float32, torch.bfloat16, torch.float16)
_TINY = 1e-30       # the scale of an all-zero row (any positive value decodes zeros to zeros)


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


@torch.library.custom_op("memopt::compress", mutates_args=())
def compress(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Pack ``x`` (see the module notes)."""
    qdtype, qmax = _check(fmt)
    if x.dtype not in COMPRESSIBLE:
        raise ValueError(f"memopt::compress: {x.dtype} is not compressible; expected one of {COMPRESSIBLE}")
    rows, cols = rows_of(x.shape)
    values = x.detach().reshape(rows, cols).float()
    scale = (values.abs().amax(dim=1, keepdim=True) / qmax).clamp_min(_TINY) if cols else \
        torch.ones(rows, 1, device=x.device)
    scaled = values / scale
    quantised = scaled.round().clamp(-qmax, qmax).to(qdtype) if qdtype == torch.int8 else scaled.to(qdtype)
    # Scales first: a float32 view needs a 4-byte aligned offset, a 1-byte element type any offset.
    return torch.cat([scale.reshape(-1).view(torch.uint8), quantised.view(torch.uint8).reshape(-1)])


@compress.register_fake
def _compress_fake(x: torch.Tensor, fmt: str) -> torch.Tensor:
    _check(fmt)
    return x.new_empty(packed_nbytes(x.shape), dtype=torch.uint8)


@torch.library.custom_op("memopt::decompress", mutates_args=())
def decompress(packed: torch.Tensor, size: list[int], stride: list[int], dtype: torch.dtype,
               fmt: str) -> torch.Tensor:
    """Unpack what ``compress`` packed, into a tensor of ``size``, ``stride`` and ``dtype``."""
    qdtype, _ = _check(fmt)
    rows, cols = rows_of(size)
    scale = packed[:4 * rows].view(torch.float32).reshape(rows, 1)
    quantised = packed[4 * rows:].view(qdtype).reshape(rows, cols)
    values = (quantised.float() * scale).to(dtype).reshape(size)
    out = torch.empty_strided(size, stride, dtype=dtype, device=packed.device)
    out.copy_(values)
    return out


@decompress.register_fake
def _decompress_fake(packed: torch.Tensor, size: list[int], stride: list[int], dtype: torch.dtype,
                     fmt: str) -> torch.Tensor:
    return torch.empty_strided(size, stride, dtype=dtype, device=packed.device)
