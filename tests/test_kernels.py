"""memopt's Triton kernels (memopt/codegen/) through Triton's interpreter, each against its plain-PyTorch
reference, on several shapes including ragged ones, fp32 and fp16; their tiles checked against GPU rules
(Note [Triton on a CPU-only machine])."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from memopt.codegen import compress_rows, int8_matmul, linear_cross_entropy, nf4_matmul
from memopt.codegen.triton_kernels import Tiles, check_tiles
from memopt.runtime.quant import quantize_int8, quantize_nf4


@pytest.fixture(autouse=True)
def interpreter() -> None:
    from memopt.codegen.triton_kernels import interpreting

    assert interpreting(), "tests/conftest.py sets TRITON_INTERPRET=1 before Triton is imported"


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # Same products, another summation order: fp32 ulps, or one fp16 ulp of the output.
    tol = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3)}[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=tol[0], atol=tol[1])


# (M rows of x, N, K of the weight): tile-aligned, ragged in every dimension, one row.
SHAPES = [(32, 64, 128), (5, 96, 64), (33, 80, 136), (1, 64, 320), (70, 128, 72)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_nf4_matmul(m: int, n: int, k: int, transposed: bool, double_quant: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(m * n + k)
    q = quantize_nf4(torch.randn(n, k), double_quant=double_quant)
    x = torch.randn(m, n if transposed else k).to(dtype)
    _close(nf4_matmul.nf4_matmul(x, q, transposed=transposed), nf4_matmul.reference(x, q, transposed=transposed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rank", [4, 16, 24])
def test_nf4_matmul_lora_epilogue(rank: int, dtype: torch.dtype) -> None:
    torch.manual_seed(rank)
    q = quantize_nf4(torch.randn(96, 136))
    x = torch.randn(3, 11, 136).to(dtype)
    xa, b = torch.randn(3, 11, rank).to(dtype), (0.1 * torch.randn(96, rank)).to(dtype)
    out = nf4_matmul.nf4_matmul(x, q, lora=(xa, b, 2.0))
    assert out.shape == (3, 11, 96)
    _close(out, nf4_matmul.reference(x, q, lora=(xa, b, 2.0)))
    # The epilogue adds something (B is not zero), so the check above is not the plain product's.
    assert (out - nf4_matmul.nf4_matmul(x, q)).abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("m,n,k", SHAPES + [(9, 100, 70)])
def test_int8_matmul(m: int, n: int, k: int, transposed: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(m + n * k)
    q = quantize_int8(torch.randn(n, k))
    x = torch.randn(m, n if transposed else k).to(dtype)
    _close(int8_matmul.int8_matmul(x, q.codes, q.scale, transposed=transposed),
           int8_matmul.reference(x, q.codes, q.scale, transposed=transposed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 33), (3, 5, 1500), (64, 64), (16,), (2, 0, 4)])
def test_compress_pair_matches_the_pytorch_ops_byte_for_byte(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    torch.manual_seed(len(shape))
    x = (3 * torch.randn(shape)).to(dtype)
    if x.numel() > 8:
        flat = x.view(-1)
        flat[3] = float("-inf")                          # an attention mask's -inf
        flat[5] = 0.5 * flat.abs().max()                 # exact halves after scaling: ties to even
        x.view(-1, shape[-1])[0].zero_()                 # an all-zero row
    packed = compress_rows.compress_int8(x)
    assert torch.equal(packed, compress_rows.reference_compress(x))
    out = compress_rows.decompress_int8(packed, x.shape, dtype)
    expected = compress_rows.reference_decompress(packed, x.shape, dtype)
    if dtype == torch.bfloat16:
        # The interpreter's fp32 -> bf16 store does not round to nearest (DESIGN.md: its bf16 is raw
        # 16-bit integers); a GPU's does. Held to one bf16 step of the value instead.
        torch.testing.assert_close(out, expected, rtol=2 ** -7, atol=0)
    else:
        assert torch.equal(out, expected)


def test_ties_round_to_even() -> None:
    """x / scale lands exactly on k + 0.5 for these rows (scale 1): rounding must be torch.round's."""
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 126.5, -2.5]])
    packed = compress_rows.compress_int8(x)
    codes = packed[4:].view(torch.int8)
    assert codes.tolist() == [127, 0, 2, 2, 0, -2, 126, -2]
    assert torch.equal(packed, compress_rows.reference_compress(x))


def test_every_launch_configuration_obeys_gpu_tile_rules() -> None:
    for tiles in (nf4_matmul.TILES, int8_matmul.TILES, linear_cross_entropy.TILES):
        for operand_bytes in (2, 4):
            check_tiles(tiles, operand_bytes)
    assert compress_rows.BLOCK & (compress_rows.BLOCK - 1) == 0
    good = Tiles(64, 64, 32)
    for bad, words in [(dataclasses.replace(good, block_n=48), "power of two"),
                       (dataclasses.replace(good, block_k=8), "below 16"),
                       (dataclasses.replace(good, block_m=256, block_n=256, block_k=128, num_stages=4),
                        "shared memory"),
                       (dataclasses.replace(good, num_warps=3), "num_warps")]:
        with pytest.raises(ValueError, match=words):
            check_tiles(bad)


def test_launchers_check_their_tiles_and_inputs() -> None:
    q = quantize_nf4(torch.randn(64, 64))
    with pytest.raises(ValueError, match="power of two"):
        nf4_matmul.nf4_matmul(torch.randn(4, 64), q, tiles=Tiles(32, 48, 64))
    with pytest.raises(ValueError, match="needs 64"):
        nf4_matmul.nf4_matmul(torch.randn(4, 63), q)
    with pytest.raises(ValueError, match="forward"):
        nf4_matmul.nf4_matmul(torch.randn(4, 64), q, transposed=True,
                              lora=(torch.randn(4, 2), torch.randn(64, 2), 1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,v,h,bias", [(37, 101, 48, True), (16, 64, 32, False), (5, 130, 20, True), (1, 17, 70, False)])
def test_linear_cross_entropy_kernels_match_pytorch(n: int, v: int, h: int, bias: bool, dtype: torch.dtype) -> None:
    """Note [Fused linear cross-entropy kernels] through the interpreter: vocabularies and widths that are
    no multiple of the tiles (101 words in tiles of 64, 70 columns in 32), a token block with one token,
    ignored targets (every fourth), a bias or none; losses, log-sum-exps and the three gradients against
    PyTorch's logits in fp32."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(n, h).to(dtype), (torch.randn(v, h) * 0.3).to(dtype)
    b = torch.randn(v).to(dtype) if bias else None
    target = torch.randint(0, v, (n,))
    target[::4] = -100
    loss, lse = linear_cross_entropy.forward(hidden, weight, b, target, -100)
    expected_loss, expected_lse = linear_cross_entropy.reference_forward(hidden, weight, b, target, -100)
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 2e-3}
    torch.testing.assert_close(lse, expected_lse, **tolerance)
    torch.testing.assert_close(loss, expected_loss, **tolerance)
    assert bool((loss[::4] == 0).all())
    grad = torch.tensor(0.7)
    got = linear_cross_entropy.backward(grad, hidden, weight, b, target, lse, -100, weight_grad=True)
    expected = linear_cross_entropy.reference_backward(grad, hidden, weight, b, target, -100)
    for name, g, e in zip(("hidden", "weight", "bias"), got, expected):
        torch.testing.assert_close(g, e, **tolerance, msg=name)
    dh, dw, db = linear_cross_entropy.backward(grad, hidden, weight, b, target, lse, -100, weight_grad=False)
    assert dw is None and db is None
    torch.testing.assert_close(dh, expected[0], **tolerance)
