"""Compressed activations: the pack/unpack ops against a stated error bound (SQNR in dB), layouts kept,
and sizes as the scheduler counts them."""

from __future__ import annotations

import math

import pytest
import torch

from memopt.runtime.compress import compress, decompress, packed_nbytes, rows_of

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


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_masks_keep_their_minus_infinity_and_the_rest_of_the_row(fmt: str) -> None:
    x = torch.randn(6, 40)
    x[:, 20:] = -torch.inf                       # a causal mask's shape of row
    y = decompress(compress(x, fmt), list(x.shape), list(x.stride()), x.dtype, fmt)
    assert torch.equal(torch.isinf(y), torch.isinf(x)) and (y[:, 20:] == -torch.inf).all()
    assert sqnr_db(x[:, :20], y[:, :20]) >= MIN_SQNR_DB[fmt]


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_large_tensors_are_packed_in_chunks_with_small_scratch(layout: str) -> None:
    """2 MiB of fp32, in blocks of 16K elements: packing needs about the packed bytes and unpacking the
    output's, plus scratch of a few blocks (the bound: a quarter of the tensor; a whole-tensor copy
    would break it). Transposed (a saved view can be), both walk the tensor in its memory order and
    the output keeps its strides."""
    from memopt.runtime.tracker import track_memory

    x = torch.randn(1024, 512) if layout == "contiguous" else torch.randn(8, 512, 128).transpose(1, 2)
    nbytes = x.numel() * 4
    with track_memory("cpu") as mem:
        packed = compress(x, "int8")
    assert mem.peak_bytes - mem.baseline_bytes <= packed.numel() + nbytes // 4, mem.peak_bytes
    with track_memory("cpu") as mem:
        y = decompress(packed, list(x.shape), list(x.stride()), torch.float32, "int8")
    assert mem.peak_bytes - mem.baseline_bytes <= nbytes + nbytes // 4, mem.peak_bytes
    assert y.stride() == x.stride()
    assert sqnr_db(x, y) >= MIN_SQNR_DB["int8"]
    assert torch.equal(packed, compress(x.contiguous(), "int8"))


def test_scheduler_compresses_within_the_budget_and_a_stated_gradient_bound() -> None:
    """Tiny Llama at 0.4 of its activation memory, int8 compression allowed, offload off, on the default
    (cpu) profile, where packing some values is cheaper than recomputing them (at 0.5 recomputation
    alone is now cheapest, since attention may be recomputed): the plan compresses, its
    simulated peak meets the budget and matches the tracked peak, the loss is exact (the forward is
    untouched) and every gradient is within 5% relative error (measured: about 1.5%). The solve is
    deterministic (Note [Deterministic solves] in memopt/schedule/cpsat.py), so the plan is too."""
    import copy
    import gc

    from memopt.compiler.backend import MemoptBackend
    from memopt.runtime.tracker import track_memory
    from tests.models import tiny_llama, token_batch

    batch = token_batch(4, 256)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tiny_llama(layers=4, hidden=128)
    backend = MemoptBackend({"codegen": "eager", "offload": False, "memory_budget": 0.4,
                             "compress_activations": "int8"})
    compiled = torch.compile(model, backend=backend)
    out = compiled(**batch)
    out.loss.backward()
    del out
    model.zero_grad(set_to_none=True)
    gc.collect()
    with track_memory("cpu") as mem:
        out = compiled(**batch)
        loss = out.loss
        loss.backward()
    del out
    report = backend.reports[-1]
    schedule = report.schedule
    assert schedule is not None and schedule.feasible and schedule.chosen.compress
    assert report.memory is not None and report.budget_bytes is not None
    assert report.memory.peak_bytes <= report.budget_bytes
    assert abs(report.memory.peak_bytes - mem.peak_bytes) <= 0.05 * mem.peak_bytes
    rows = {r["name"]: r for r in schedule.decisions()}
    assert all(rows[name]["choice"] == "compress" for name in schedule.chosen.compress)

    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    ref_loss = ref(**batch).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        error = ((p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-12)).item()
        assert error <= 0.05, (name, error)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_every_compressed_activation_of_a_step_meets_its_bound(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tensor the scheduler compresses in a tiny Llama step (budget 0.4, offload off) is captured as
    it is packed: its SQNR after the round trip is at least 30 dB for int8 (the issue's bound; 25 dB for
    fp8, its stated one), its packed size is the derived one (one byte per element and one fp32 scale
    per row), and every parameter gradient has cosine similarity at least 0.99 with eager's."""
    import copy

    from memopt.compiler.backend import MemoptBackend
    from memopt.runtime import compress as compress_module
    from tests.models import tiny_llama, token_batch

    packed_calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    op = compress_module.compress
    kernel = op._backend_fns[None]          # what torch.library's custom_op runs for every device

    def capture(x: torch.Tensor, fmt: str) -> torch.Tensor:
        out = kernel(x, fmt)
        if capturing:
            packed_calls.append((x.detach().clone(), out))
        return out

    capturing = False
    monkeypatch.setitem(op._backend_fns, None, capture)
    batch = token_batch(4, 256)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tiny_llama(layers=4, hidden=128)
    ref = copy.deepcopy(model)
    backend = MemoptBackend({"codegen": "eager", "offload": False, "memory_budget": 0.4,
                             "compress_activations": fmt})
    compiled = torch.compile(model, backend=backend)
    compiled(**batch).loss.backward()                      # compiles
    model.zero_grad(set_to_none=True)
    capturing = True
    compiled(**batch).loss.backward()
    capturing = False
    ref(**batch).loss.backward()
    schedule = backend.reports[-1].schedule
    assert schedule is not None and schedule.chosen.compress
    assert len(packed_calls) == len(schedule.chosen.compress)
    saved = 0
    for x, packed in packed_calls:
        rows, cols = rows_of(x.shape)
        assert packed.numel() == rows * cols + 4 * rows
        saved += x.numel() * x.element_size() - packed.numel()
        y = decompress(packed, list(x.shape), list(x.stride()), x.dtype, fmt)
        assert sqnr_db(x, y) >= {"int8": 30.0, "fp8": 25.0}[fmt], (tuple(x.shape), sqnr_db(x, y))
    assert saved > 0
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        cosine = torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0).item()
        assert cosine >= 0.99, (name, cosine)
    print(fmt, "compressed", len(packed_calls), "saved", saved, "min SQNR",
          min(sqnr_db(x, decompress(p, list(x.shape), list(x.stride()), x.dtype, fmt)) for x, p in packed_calls))
