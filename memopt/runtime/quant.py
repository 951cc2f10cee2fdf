"""Quantized storage of frozen base weights: NF4 as QLoRA (bitsandbytes) stores it.

Note [NF4 layout]
~~~~~~~~~~~~~~~~~
A weight is flattened and cut into blocks of 64 values. Each block is divided by its absolute maximum
and every value becomes the index of the nearest of the 16 NF4 levels (:data:`NF4_LEVELS`, the quantiles
of a standard normal scaled to [-1, 1], with an exact zero; a value halfway between two levels takes the
lower one). Two indices share a byte, the even element in the high nibble. With double quantization the
per-block maxima (fp32) are stored 8-bit: their mean is subtracted, and the rest is quantized in blocks
of 256 with bitsandbytes' signed dynamic 8-bit map (:func:`dynamic_map`), keeping one fp32 maximum per
256 blocks. Per parameter that is 4 + 8/64 + 32/(64*256) bits, about 4.127, plus one fp32 mean per tensor.

int8 is per output row (LLM.int8()'s vector-wise quantization of the weight): each row divided by its
absolute maximum over 127 and rounded to the nearest integer (halves to even, as ``torch.round``), one
fp32 scale per row: 8 + 32/in bits per parameter.

Quantizing works on chunks of :data:`CHUNK` values, so the temporaries are a few times the chunk's
fp32 size whatever the weight's size (a 4096 x 32000 weight never needs a full-size fp32 copy).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

__all__ = ["CHUNK", "NF4_BLOCK", "NF4_LEVELS", "Int8Weight", "NF4Weight", "block_absmax", "dequantize_int8",
           "dequantize_nf4", "dynamic_map", "dynamic_map_on", "nf4_values", "quantize_int8", "quantize_nf4"]

NF4_BLOCK = 64
ABSMAX_BLOCK = 256
CHUNK = NF4_BLOCK * ABSMAX_BLOCK * 64          # values quantized at a time (1 Mi)
# A zero block or row is divided by this instead of 0, so its values stay 0.
_TINY = torch.finfo(torch.float32).tiny

# QLoRA's NF4 levels (bitsandbytes' NF4 code), ascending.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float32)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' dynamic 8-bit data type (Dettmers, "8-Bit Approximations for Parallelism in Deep
    Learning"): a decimal exponent from 10^-6 to 10^0, the bits it leaves to a linear fraction, 0 and 1;
    256 values, ascending. Built once per argument set (the kernels ask for it on every call)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        return _dynamic_map(signed, max_exponent_bits, total_bits).clone()


def dynamic_map_on(device: torch.device) -> torch.Tensor:
    """:func:`dynamic_map` on ``device``, cached (read-only: do not modify it)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    key = str(device)
    if key not in _DYNAMIC_MAPS:
        with unset_fake_temporarily():          # a real tensor in the cache, even if asked under fake mode
            _DYNAMIC_MAPS[key] = _dynamic_map(True, 7, 8).to(device)
    return _DYNAMIC_MAPS[key]


_DYNAMIC_MAPS: dict[str, torch.Tensor] = {}


@functools.lru_cache(maxsize=8)
def _dynamic_map(signed: bool, max_exponent_bits: int, total_bits: int) -> torch.Tensor:
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                    else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        bounds = torch.linspace(0.1, 1, items)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += (10 ** (-(max_exponent_bits - 1) + i) * means).tolist()
        if signed:
            data += (-10 ** (-(max_exponent_bits - 1) + i) * means).tolist()
    if additional_items > 0:
        bounds = torch.linspace(0.1, 1, additional_items + 1)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += (10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1) * means).tolist()
        if signed:
            data += (-10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def _nearest(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level (ascending ``levels``; a tie takes the lower one), as uint8."""
    midpoints = (levels[:-1] + levels[1:]) / 2
    return torch.bucketize(values, midpoints, right=False).to(torch.uint8)


@dataclasses.dataclass
class NF4Weight:
    """A weight in NF4 (Note [NF4 layout])."""

    codes: torch.Tensor                  # uint8, numel / 2: two 4-bit level indices a byte
    absmax: torch.Tensor | None          # fp32 per 64-block (without double quantization)
    qabsmax: torch.Tensor | None         # uint8 per 64-block: dynamic-map index of (absmax - offset) / absmax2
    absmax2: torch.Tensor | None         # fp32 per 256 blocks
    offset: torch.Tensor | None          # fp32 0-d: mean of the block maxima (double quantization)
    shape: torch.Size
    dtype: torch.dtype                   # the weight's dtype, restored by dequantization

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.codes, self.absmax, self.qabsmax, self.absmax2, self.offset) if t is not None)

    def bits_per_parameter(self) -> float:
        return 8 * self.nbytes() / self.shape.numel()


def quantize_nf4(weight: torch.Tensor, *, double_quant: bool = True) -> NF4Weight:
    """``weight`` in NF4 (Note [NF4 layout]); its size must be a multiple of 64."""
    numel = weight.numel()
    if numel % NF4_BLOCK:
        raise ValueError(f"NF4 needs a multiple of {NF4_BLOCK} values; got {numel} ({tuple(weight.shape)})")
    flat = weight.detach().reshape(-1)
    levels = NF4_LEVELS.to(weight.device)
    codes = torch.empty(numel // 2, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(numel // NF4_BLOCK, dtype=torch.float32, device=weight.device)
    for start in range(0, numel, CHUNK):
        blocks = flat[start:start + CHUNK].float().view(-1, NF4_BLOCK)
        scale = blocks.abs().amax(dim=1)
        absmax[start // NF4_BLOCK:start // NF4_BLOCK + len(scale)] = scale
        index = _nearest(blocks / scale.clamp_min(_TINY)[:, None], levels).view(-1)
        codes[start // 2:(start + index.numel()) // 2] = (index[0::2] << 4) | index[1::2]
    if not double_quant:
        return NF4Weight(codes, absmax, None, None, None, weight.shape, weight.dtype)
    offset = absmax.mean()             # a tensor: no host sync, and it works on fake tensors
    centred = absmax - offset
    pad = (-len(centred)) % ABSMAX_BLOCK
    groups = torch.nn.functional.pad(centred, (0, pad)).view(-1, ABSMAX_BLOCK)
    absmax2 = groups.abs().amax(dim=1)
    qabsmax = _nearest(groups / absmax2.clamp_min(_TINY)[:, None],
                       dynamic_map_on(weight.device)).view(-1)[:len(centred)]
    return NF4Weight(codes, None, qabsmax, absmax2, offset, weight.shape, weight.dtype)


def block_absmax(q: NF4Weight, first: int = 0, last: int | None = None) -> torch.Tensor:
    """The maxima of blocks ``first:last`` (all by default), fp32 (decoded from their 8-bit form under
    double quantization)."""
    if q.absmax is not None:
        return q.absmax[first:last]
    assert q.qabsmax is not None and q.absmax2 is not None and q.offset is not None
    codes = q.qabsmax[first:last]
    group = torch.arange(first, first + len(codes), device=codes.device) // ABSMAX_BLOCK
    return dynamic_map_on(codes.device)[codes.long()] * q.absmax2[group] + q.offset


def nf4_values(q: NF4Weight, first: int, last: int) -> torch.Tensor:
    """Flat values ``first:last`` of the NF4 weight ``q``, fp32; both ends must fall on 64-blocks (the
    tiled kernels dequantize a row tile at a time with it)."""
    assert first % NF4_BLOCK == 0 and last % NF4_BLOCK == 0
    codes = q.codes[first // 2:last // 2]
    levels = NF4_LEVELS.to(codes.device)
    values = torch.empty(last - first, dtype=torch.float32, device=codes.device)
    values[0::2] = levels[(codes >> 4).int()]            # the even element is the high nibble
    values[1::2] = levels[(codes & 0xF).int()]
    maxima = block_absmax(q, first // NF4_BLOCK, last // NF4_BLOCK)
    return values.view(-1, NF4_BLOCK).mul_(maxima[:, None]).view(-1)


def dequantize_nf4(q: NF4Weight) -> torch.Tensor:
    """The weight back, in its dtype (the reference for every kernel that reads NF4)."""
    return nf4_values(q, 0, q.shape.numel()).view(q.shape).to(q.dtype)


@dataclasses.dataclass
class Int8Weight:
    """A weight in int8 with one fp32 scale per output row (the module docstring)."""

    codes: torch.Tensor                  # int8, the weight's shape
    scale: torch.Tensor                  # fp32 per row: the row's absolute maximum / 127
    dtype: torch.dtype

    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.scale.numel()

    def bits_per_parameter(self) -> float:
        return 8 * self.nbytes() / self.codes.numel()


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """``weight`` (out, in) in int8, row-wise, a chunk of rows at a time."""
    if weight.dim() != 2:
        raise ValueError(f"int8 quantization takes a 2-D weight; got shape {tuple(weight.shape)}")
    rows = max(1, CHUNK // max(weight.shape[1], 1))
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], rows):
        part = weight[start:start + rows].detach().float()
        step = part.abs().amax(dim=1) / 127
        scale[start:start + rows] = step
        codes[start:start + rows] = torch.round(part / step.clamp_min(_TINY)[:, None]
                                                ).clamp(-127, 127).to(torch.int8)
    return Int8Weight(codes, scale, weight.dtype)


def dequantize_int8(q: Int8Weight) -> torch.Tensor:
    return (q.codes.float() * q.scale[:, None]).to(q.dtype)
