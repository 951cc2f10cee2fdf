"""Compressed activations: the pack/unpack ops against a stated error bound (SQNR in dB), layouts kept,
and sizes as the scheduler counts them."""

from __future__ import annotations

import math

import pytest
import torch

from memopt.runtime.compress import compress, decompress, packed_nbytes

# Per-row absmax scaling on Gaussian data: int8 keeps ~7 bits per element (about 40 dB), fp8 e4m3 a
# 3-bit mantissa (about 30 dB). The bounds leave a few dB of margin.
MIN_SQNR_DB = {"int8": 35.0, "fp8": 25.0}


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref, approx = ref.double(), approx.double()
    noise = (ref - approx).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_within_the_stated_bound(fmt: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 37, 53, generator=gen) * torch.logspace(-3, 3, 53)).to(dtype)  # rows of mixed scale
    packed = compress(x, fmt)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(x.shape) == 3 * 37 * 53 + 4 * 3 * 37
    y = decompress(packed, list(x.shape), list(x.stride()), x.dtype, fmt)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert sqnr_db(x, y) >= MIN_SQNR_DB[fmt], sqnr_db(x, y)
    if fmt == "int8":      # each element within half a quantisation step of its row
        step = x.float().abs().amax(dim=-1, keepdim=True) / 127
        assert ((y.float() - x.float()).abs() <= step * 0.5 + x.float().abs() * 1e-2 + 1e-12).all()


def test_layout_zeros_and_edge_shapes() -> None:
    t = torch.randn(64, 48).t()                      # transposed: strides come back
    y = decompress(compress(t, "int8"), list(t.shape), list(t.stride()), t.dtype, "int8")
    assert y.stride() == t.stride()
    assert sqnr_db(t, y) >= MIN_SQNR_DB["int8"]
    zeros = torch.zeros(5, 7)
    assert torch.equal(decompress(compress(zeros, "int8"), [5, 7], [7, 1], zeros.dtype, "int8"), zeros)
    scalar = torch.tensor(3.5)
    back = decompress(compress(scalar, "int8"), [], [], scalar.dtype, "int8")
    assert back.shape == () and abs(back.item() - 3.5) <= 3.5 / 127
    empty = torch.empty(0, 5)
    assert decompress(compress(empty, "int8"), [0, 5], [5, 1], empty.dtype, "int8").shape == (0, 5)


def test_bad_input_says_what_is_allowed() -> None:
    with pytest.raises(ValueError, match="not compressible"):
        compress(torch.arange(6), "int8")
    with pytest.raises(ValueError, match="unknown format 'int4'"):
        compress(torch.randn(3), "int4")


def test_the_ops_trace_under_torch_compile() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return decompress(compress(x * 2, "int8"), list(x.shape), list(x.stride()), x.dtype, "int8") + 1

    x = torch.randn(8, 16)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x))
