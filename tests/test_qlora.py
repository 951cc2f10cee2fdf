"""Quantized base weights: memopt.prepare with options["quantize"], the fused ops' CPU kernels, and the
fuse_dequant pass (Note [Quantized linears] in memopt/runtime/qlinear.py).

Tolerances: quantization itself is lossy, so the references here are the *dequantized* weights (DESIGN.md:
dequant fusion is exact against the dequantized reference). fp32 throughout, assert_close's defaults:
the fused kernels change only the summation order.
"""

from __future__ import annotations

import copy
import gc
import weakref
from typing import Any

import pytest
import torch
from torch import nn

import memopt
from memopt.compiler.backend import MemoptBackend
from memopt.errors import MemoptConfigError, MemoptUnsupportedError
from memopt.prepare import adapter_modules
from memopt.runtime import qlinear
from memopt.runtime.qlinear import QuantizedLinear
from memopt.runtime.quant import quantize_int8, quantize_nf4
from tests.errors import raises_memopt
from tests.models import hf_loss, tiny_llama, token_batch

LORA = {"method": "lora", "rank": 4, "alpha": 8, "targets": "all-linear"}
FORMATS = [{"weights": "nf4", "double_quant": True}, {"weights": "nf4", "double_quant": False},
           {"weights": "int8"}]
BATCH = (2, 12)         # 24 tokens: no activation is shaped like a weight of the tiny Llama


def _format_id(q: dict[str, Any]) -> str:
    return q["weights"] + ("" if q.get("double_quant", True) else "-single")


def _qlora(quantize: dict[str, Any], layers: int = 2) -> nn.Module:
    """A tiny Llama prepared with LoRA on quantized weights, B made non-zero so every gradient is live."""
    torch.manual_seed(0)
    model = memopt.prepare(tiny_llama(layers=layers), {"adapters": LORA, "quantize": quantize})
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, _, adapter in adapter_modules(model):
            adapter.lora_B.copy_(0.1 * torch.randn(adapter.lora_B.shape, generator=generator))
    return model


def _weight_shapes(model: nn.Module) -> set[tuple[int, int]]:
    shapes = set()
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            shapes |= {(module.out_features, module.in_features), (module.in_features, module.out_features)}
    return shapes


def _assert_compiled_step_equals(model: nn.Module, backend: MemoptBackend, loss_ref: torch.Tensor,
                                 grads_ref: dict[str, torch.Tensor]) -> None:
    """A step of ``model`` compiled with ``backend`` gives eager's loss and trainable gradients."""
    loss, _ = hf_loss(torch.compile(model, backend=backend), token_batch(*BATCH))
    loss.backward()
    torch.testing.assert_close(loss, loss_ref)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads_ref[name], msg=name)


def _step(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss, _ = hf_loss(model, token_batch(*BATCH))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("quantize", FORMATS, ids=_format_id)
def test_prepare_stores_targets_quantized_and_frees_their_weights(quantize: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = tiny_llama()
    linear = model.model.layers[0].mlp.down_proj
    weight = weakref.ref(linear.weight)
    original = linear.weight.detach().clone()
    memopt.prepare(model, {"adapters": LORA, "quantize": quantize})
    del linear
    gc.collect()
    assert weight() is None, "the full-precision weight of a quantized linear is still alive"
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == 14                                         # 7 linears x 2 layers
    assert model.lm_head.weight.dtype == torch.float32                  # all-linear leaves the output layer
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".memopt_adapter.lora_" in n for n in trainable)
    assert not any(n.endswith("proj.weight") for n in model.state_dict())
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, QuantizedLinear)
    values = down.in_features * down.out_features
    stored = down.quantized_bytes()
    if quantize["weights"] == "nf4":
        # Half a byte a value, then per 64-block one byte (its maximum's code) and per 256 blocks one fp32
        # plus one fp32 mean; or one fp32 per block without double quantization. (4.127 bits a value
        # on large weights: tests/test_quant.py.)
        blocks = values // 64
        assert stored == values // 2 + (blocks + 4 * -(-blocks // 256) + 4 if quantize["double_quant"]
                                         else 4 * blocks)
        ref = quantize_nf4(original, double_quant=quantize["double_quant"])
        assert torch.equal(down.weight_codes, ref.codes)
    else:
        assert stored == values + 4 * down.out_features
        assert torch.equal(down.weight_codes, quantize_int8(original).codes)


@pytest.mark.parametrize("quantize", FORMATS, ids=_format_id)
def test_eager_qlora_is_lora_on_the_dequantized_weights(quantize: dict[str, Any]) -> None:
    """Eager QLoRA equals PEFT-style LoRA on a model whose targeted weights were replaced by their
    dequantized values: the quantized linear's forward is exactly ``linear(x, dequantize(W))``."""
    model = _qlora(quantize)
    torch.manual_seed(0)
    twin = tiny_llama()
    twin_modules = dict(twin.named_modules())
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, QuantizedLinear):
                twin_modules[name].weight.copy_(module.dequantized_weight())
    memopt.prepare(twin, {"adapters": LORA})
    with torch.no_grad():
        for (_, _, a), (_, _, b) in zip(adapter_modules(model), adapter_modules(twin)):
            b.lora_A.copy_(a.lora_A)
            b.lora_B.copy_(a.lora_B)
    loss, grads = _step(model)
    twin_loss, twin_grads = _step(twin)
    torch.testing.assert_close(loss, twin_loss)
    assert grads.keys() == twin_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], twin_grads[name], msg=name)


@pytest.mark.parametrize("codegen", ["eager", "inductor"])
@pytest.mark.parametrize("quantize", FORMATS, ids=_format_id)
def test_fused_dequant_matches_eager_and_never_forms_a_weight(quantize: dict[str, Any], codegen: str) -> None:
    """Compiled with memopt, every matmul on a quantized weight (forward, and the input gradient in the
    backward) is one fused call; the loss and every adapter gradient equal eager's; and no node of the
    final forward or backward graph dequantizes a weight or produces a weight-shaped tensor."""
    model = _qlora(quantize)
    ref = copy.deepcopy(model)
    loss_ref, grads_ref = _step(ref)
    torch._dynamo.reset()
    backend = MemoptBackend({"adapters": LORA, "quantize": quantize, "codegen": codegen})
    _assert_compiled_step_equals(model, backend, loss_ref, grads_ref)
    report = backend.reports[-1]
    record = {r.name: r for r in report.passes}["fuse_dequant"]
    stats = record.stats["pass_stats"]
    # 14 forward matmuls; 11 input gradients (layer 0's q, k, v feed the frozen embedding: none).
    assert stats["weights"] == 14 and stats["unfused"] == 0 and stats["fused_matmuls"] == 25
    assert stats["lora_epilogues"] == (14 if quantize["weights"] == "nf4" else 0)
    shapes = _weight_shapes(model)
    fused = 0
    for graph in (report.forward, report.backward):
        assert graph is not None
        for node in graph.graph.nodes:
            target = str(node.target)
            assert "dequantize" not in target, node.format_node()
            fused += target.startswith(("memopt.nf4_mm", "memopt.int8_mm"))
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.is_floating_point() and val.dim() == 2:
                assert tuple(val.shape) not in shapes, f"{node.format_node()} is shaped like a weight"
    assert fused == 25


def test_fuse_dequant_lowers_saved_and_tracked_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the pass, the partition saves each dequantized weight for its input gradient; with it, the
    backward reads the 4-bit storage again. Both the saved bytes and the tracked peak of a step (which
    comes early in the backward, where everything saved is alive) fall by at least the weights the
    unfused forward saves, derived from the model: every quantized linear but layer 0's q, k and v, fp32.
    The kernels' tiles are made small, as they are relative to a real model's weights (1 Mi values
    against 16-58 Mi), so that the fused step's tracked peak is its simulated one (within 5%)."""
    monkeypatch.setattr(qlinear, "TILE_VALUES", 2048)
    peaks, saved, simulated = {}, {}, {}
    for disabled in ((), ("fuse_dequant",)):
        model = _qlora({"weights": "nf4"}, layers=2)
        torch._dynamo.reset()
        backend = MemoptBackend({"adapters": LORA, "quantize": {"weights": "nf4"}, "codegen": "eager",
                                 "disable_passes": list(disabled)})
        compiled = torch.compile(model, backend=backend)
        hf_loss(compiled, token_batch(*BATCH))[0].backward()          # compile
        model.zero_grad(set_to_none=True)
        gc.collect()
        with memopt.track_memory("cpu") as mem:
            loss, logits = hf_loss(compiled, token_batch(*BATCH))
            loss.backward()
        del logits
        memory = backend.reports[-1].memory
        assert memory is not None
        peaks[disabled], saved[disabled], simulated[disabled] = (mem.peak_bytes, memory.saved_activation_bytes,
                                                                 memory.peak_bytes)
    layer0 = model.model.layers[0].self_attn
    first_inputs = {id(m) for m in (layer0.q_proj, layer0.k_proj, layer0.v_proj)}
    weights = sum(4 * m.in_features * m.out_features for m in model.modules()
                  if isinstance(m, QuantizedLinear) and id(m) not in first_inputs)
    assert saved[("fuse_dequant",)] - saved[()] >= weights
    assert peaks[("fuse_dequant",)] - peaks[()] >= weights, (peaks, weights)
    assert abs(peaks[()] - simulated[()]) <= 0.05 * simulated[()], (peaks, simulated)


@pytest.mark.parametrize("fmt", ["nf4", "nf4-single", "int8"])
@pytest.mark.parametrize("rows,cols", [(48, 96), (64, 200), (8, 8), (130, 64)])
def test_cpu_kernels_work_a_tile_at_a_time(monkeypatch: pytest.MonkeyPatch, fmt: str, rows: int, cols: int) -> None:
    """The ops' CPU kernels, with tiles of a few rows (NF4 tiles end on 64-blocks: 96 columns need an even
    row count), equal the dequantize-then-matmul reference in both directions, through autograd too."""
    if fmt.startswith("nf4") and rows * cols % 64:
        pytest.skip("NF4 needs a multiple of 64 values")
    monkeypatch.setattr(qlinear, "TILE_VALUES", 3 * cols)
    torch.manual_seed(rows + cols)
    weight = torch.randn(rows, cols)
    if fmt.startswith("nf4"):
        q = quantize_nf4(weight, double_quant=fmt == "nf4")
        storage = (q.codes, q.qabsmax if q.qabsmax is not None else q.absmax, q.absmax2, q.offset, [rows, cols])
        op = torch.ops.memopt.nf4_mm
        dense = torch.ops.memopt.dequantize_nf4(*storage, torch.float32)
    else:
        q8 = quantize_int8(weight)
        storage = (q8.codes, q8.scale)
        op = torch.ops.memopt.int8_mm
        dense = torch.ops.memopt.dequantize_int8(*storage, torch.float32)
    for transposed in (False, True):
        x = torch.randn(3, 5, rows if transposed else cols, requires_grad=True)
        out = op(x, *storage, transposed)
        expected = x @ (dense if transposed else dense.t())
        torch.testing.assert_close(out, expected)
        grad = torch.randn_like(out)
        (got,) = torch.autograd.grad(out, x, grad)
        (want,) = torch.autograd.grad(expected, x, grad)
        torch.testing.assert_close(got, want)


def test_triton_kernels_inside_a_compiled_step(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """With MEMOPT_TRITON_CPU=1 the fused ops run memopt's Triton kernels (through the interpreter):
    a compiled QLoRA step (codegen="triton") equals eager, and the dumps hold the kernels' source."""
    pytest.importorskip("triton")
    model = _qlora({"weights": "nf4"}, layers=1)
    ref = copy.deepcopy(model)
    loss_ref, grads_ref = _step(ref)
    monkeypatch.setenv("MEMOPT_TRITON_CPU", "1")
    calls: list[str] = []
    from memopt.codegen import nf4_matmul

    real = nf4_matmul.nf4_matmul
    monkeypatch.setattr(nf4_matmul, "nf4_matmul", lambda *a, **k: calls.append("nf4") or real(*a, **k))
    torch._dynamo.reset()
    backend = MemoptBackend({"adapters": LORA, "quantize": {"weights": "nf4"}, "codegen": "triton",
                             "dump_dir": str(tmp_path)})
    _assert_compiled_step_equals(model, backend, loss_ref, grads_ref)
    assert len(calls) == 7 + 4                    # 7 forward (with LoRA epilogues) + 4 input gradients
    sources = list(tmp_path.rglob("kernel_nf4_matmul.py"))
    assert sources and "_nf4_matmul_kernel" in sources[0].read_text()


def test_quantize_errors_say_what_to_do() -> None:
    with raises_memopt(MemoptConfigError, r"needs options\['adapters'\]"):
        memopt.prepare(tiny_llama(), {"quantize": {"weights": "nf4"}})
    with raises_memopt(MemoptUnsupportedError, "use method 'lora'"):
        memopt.prepare(tiny_llama(), {"adapters": {**LORA, "method": "dora"}, "quantize": {"weights": "nf4"}})
    odd = nn.Sequential(nn.Linear(10, 6))                       # 60 values: not NF4 blocks of 64
    with raises_memopt(MemoptUnsupportedError, "quantize to int8"):
        memopt.prepare(odd, {"adapters": {**LORA, "targets": ["0"]}, "quantize": {"weights": "nf4"}})
    assert isinstance(odd[0], nn.Linear) and odd[0].weight.requires_grad   # refused before any change
    lora_only = memopt.prepare(tiny_llama(), {"adapters": LORA})
    torch._dynamo.reset()
    compiled = torch.compile(lora_only, backend=MemoptBackend({"adapters": LORA, "quantize": {"weights": "nf4"}}))
    with raises_memopt(MemoptConfigError, "prepared without 'quantize'"):
        hf_loss(compiled, token_batch(*BATCH))
    model = _qlora({"weights": "nf4"})
    assert memopt.prepare(model, {"adapters": LORA, "quantize": {"weights": "nf4"}}) is model   # idempotent
    with raises_memopt(MemoptConfigError, "cannot be prepared again"):
        memopt.prepare(model, {"adapters": LORA, "quantize": {"weights": "int8"}})


def _train(model: nn.Module, options: dict[str, Any], batches: list[dict[str, object]], lr: float) -> list[float]:
    step = torch.compile(model, backend=MemoptBackend({**options, "codegen": "eager"})) if options else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for batch in batches:
        loss, _ = hf_loss(step, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@torch.no_grad()
def _eval_loss(model: nn.Module, batches: list[dict[str, object]]) -> float:
    return sum(hf_loss(model, b)[0].item() for b in batches) / len(batches)


def test_qlora_trains_within_two_percent_of_lora() -> None:
    """Fine-tuning quality on real text: a tiny Llama (hidden 128) is first trained in full on the first
    half of the standard library's docstrings (byte level), then fine-tuned for 200 steps on the second
    half with LoRA (rank 8, all linears) on its fp32 weights, and with QLoRA (the same on NF4 weights,
    double quantization, compiled with memopt so the fused kernels run). Held-out loss after
    fine-tuning: QLoRA within 2% of LoRA, and both clearly below the starting point."""
    from tests.corpus import byte_batches, stdlib_docstrings

    text = stdlib_docstrings(1 << 20)
    first, second = text[:len(text) // 2], text[len(text) // 2:]
    held_out = byte_batches(second[-(1 << 16):], 8, 64, 4, seed=7)
    tune = byte_batches(second[:-(1 << 16)], 8, 64, 200, seed=0)
    torch.manual_seed(0)
    base = tiny_llama(layers=2, hidden=128)
    _train(base, {}, byte_batches(first, 8, 64, 300, seed=1), lr=3e-3)
    start = _eval_loss(base, held_out)
    lora = {"method": "lora", "rank": 8, "alpha": 16, "targets": "all-linear"}
    results = {}
    for name, options in (("lora", {"adapters": lora}),
                          ("qlora", {"adapters": lora, "quantize": {"weights": "nf4", "double_quant": True}})):
        torch._dynamo.reset()
        model = memopt.prepare(copy.deepcopy(base), options)
        losses = _train(model, options, tune, lr=3e-3)
        results[name] = _eval_loss(model, held_out)
        assert losses[-1] < losses[0]
    assert results["qlora"] <= results["lora"] * 1.02, results
    assert max(results.values()) < start - 0.05, (start, results)
