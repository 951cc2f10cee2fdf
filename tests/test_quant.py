"""NF4 storage (QLoRA's layout) against an independent reference kept here, its size, its error and
its memory while quantizing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memopt.runtime.quant import NF4_LEVELS, dequantize_nf4, dynamic_map, quantize_nf4


def _reference_nf4(weight: torch.Tensor, double_quant: bool) -> dict[str, np.ndarray | float]:
    """The algorithm of Note [NF4 layout], written block by block with NumPy: nearest level by argmin
    of the distance (the first, i.e. lower, on a tie), packing by explicit nibbles. A block whose maximum
    is 0 is divided by the smallest normal float instead, so its values stay 0."""
    tiny = np.finfo(np.float32).tiny
    levels = NF4_LEVELS.numpy().astype(np.float64)
    values = weight.detach().float().reshape(-1).numpy()
    codes, maxima = [], []
    for block in values.reshape(-1, 64):
        top = np.abs(block).max()
        maxima.append(np.float32(top))
        normalised = (block / np.float32(max(top, tiny))).astype(np.float32)
        index = np.argmin(np.abs(normalised[:, None].astype(np.float64) - levels[None, :]), axis=1)
        for hi, lo in index.reshape(-1, 2):
            codes.append((int(hi) << 4) | int(lo))
    out: dict[str, np.ndarray | float] = {"codes": np.array(codes, dtype=np.uint8)}
    absmax = np.array(maxima, dtype=np.float32)
    if not double_quant:
        out["absmax"] = absmax
        return out
    code = dynamic_map().numpy().astype(np.float64)
    offset = np.float32(absmax.astype(np.float64).mean())
    centred = (absmax - offset).astype(np.float32)
    q, scales = [], []
    for start in range(0, len(centred), 256):
        group = centred[start:start + 256]
        top = np.abs(group).max()
        scales.append(np.float32(top))
        normalised = (group / np.float32(max(top, tiny))).astype(np.float32)
        q += np.argmin(np.abs(normalised[:, None].astype(np.float64) - code[None, :]), axis=1).tolist()
    out.update(qabsmax=np.array(q, dtype=np.uint8), absmax2=np.array(scales, dtype=np.float32), offset=offset)
    return out


@pytest.mark.parametrize("shape", [(64, 64), (96, 160), (3, 64 * 300), (1, 64)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_packed_bytes_equal_the_reference(shape: tuple[int, int], double_quant: bool) -> None:
    generator = torch.Generator().manual_seed(sum(shape))
    weight = torch.randn(shape, generator=generator) * 0.02
    q = quantize_nf4(weight, double_quant=double_quant)
    ref = _reference_nf4(weight, double_quant)
    assert np.array_equal(q.codes.numpy(), ref["codes"])
    if double_quant:
        assert q.absmax is None and q.qabsmax is not None and q.absmax2 is not None
        assert np.array_equal(q.qabsmax.numpy(), ref["qabsmax"])
        assert np.array_equal(q.absmax2.numpy(), ref["absmax2"])
        assert float(q.offset) == pytest.approx(float(ref["offset"]), rel=1e-6)
    else:
        assert q.absmax is not None and np.array_equal(q.absmax.numpy(), ref["absmax"])


def test_layout_details() -> None:
    """The even element in the high nibble; zero maps to level 7 (exact zero); the levels are QLoRA's."""
    weight = torch.zeros(64)
    weight[0], weight[1], weight[2] = 1.0, -1.0, 0.5
    q = quantize_nf4(weight, double_quant=False)
    assert q.codes[0].item() == (15 << 4) | 0          # 1.0 -> level 15 (high), -1.0 -> level 0 (low)
    assert q.codes[1].item() >> 4 == 12 and q.codes[1].item() & 0xF == 7   # 0.5 nearest 0.4407; 0 -> 7
    assert len(NF4_LEVELS) == 16 and NF4_LEVELS[7] == 0 and NF4_LEVELS[0] == -1 and NF4_LEVELS[15] == 1
    assert len(dynamic_map()) == 256 and dynamic_map()[-1] == 1.0


def test_bits_per_parameter_and_error() -> None:
    """<= 4.13 bits per parameter with double quantization; every value within half the widest gap
    between levels (0.1385 of its block's maximum) plus the 8-bit maximum's own error."""
    weight = torch.randn(1024, 4096, generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16)
    q = quantize_nf4(weight)
    assert q.bits_per_parameter() <= 4.13
    assert quantize_nf4(weight, double_quant=False).bits_per_parameter() == pytest.approx(4.5)
    back = dequantize_nf4(q)
    assert back.dtype == torch.bfloat16 and back.shape == weight.shape
    blocks = weight.float().view(-1, 64)
    top = blocks.abs().amax(1, keepdim=True)
    gap = (NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max().item() / 2
    error = (back.float().view(-1, 64) - blocks).abs()
    assert (error <= top * (gap * 1.02) + 1e-2 * top).all()


def test_quantizing_a_large_weight_needs_at_most_twice_its_bf16_size() -> None:
    """A 4096 x 32000 bf16 weight (262 MB): the peak while quantizing, above the weight itself, stays
    under twice its bf16 size (no full-size fp32 copy, no 16x broadcast against the levels)."""
    import gc

    from memopt.runtime.tracker import track_memory

    weight = torch.randn(4096, 32000, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    gc.collect()
    with track_memory("cpu") as mem:
        q = quantize_nf4(weight)
    bf16_bytes = weight.numel() * 2
    assert mem.peak_increase_bytes <= 2 * bf16_bytes, (mem.peak_increase_bytes, bf16_bytes)
    assert mem.end_bytes - mem.baseline_bytes <= q.nbytes() + 1024


def test_int8_rows_against_the_reference() -> None:
    """Row-wise int8: codes equal round-half-even of w / (rowmax / 127) computed in NumPy; 8 + 32/in bits
    per parameter; every value within half a step of its row."""
    from memopt.runtime.quant import dequantize_int8, quantize_int8

    weight = torch.randn(300, 96, generator=torch.Generator().manual_seed(4))
    weight[5] = 0                                          # a zero row stays zero
    q = quantize_int8(weight)
    w = weight.numpy()
    step = (np.abs(w).max(axis=1) / np.float32(127)).astype(np.float32)
    expected = np.clip(np.round(w / np.maximum(step, np.finfo(np.float32).tiny)[:, None]), -127, 127)
    assert np.array_equal(q.codes.numpy(), expected.astype(np.int8))
    assert q.bits_per_parameter() == pytest.approx(8 + 32 / 96)
    back = dequantize_int8(q)
    assert ((back - weight).abs() <= q.scale[:, None] / 2 + 1e-7).all() and not back[5].any()
