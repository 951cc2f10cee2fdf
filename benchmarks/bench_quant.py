"""Quantized base weights: kernel correctness, fused-kernel speed on CUDA, and QLoRA step memory on CPU.

    python benchmarks/bench_quant.py              # ~6 min on an idle 2-core CPU
    python benchmarks/bench_quant.py --quick      # fewer shapes and timed steps

1. **Kernels.** Every memopt Triton kernel (NF4 dequant-matmul with and without the LoRA epilogue, int8
   dequant-matmul, the int8 activation compress/decompress pair) against its plain-PyTorch reference on
   ragged and aligned shapes, fp32 and fp16: the largest error, relative to the reference's largest
   value. Without a GPU the kernels run through Triton's interpreter (``TRITON_INTERPRET=1``, set here
   before Triton is imported); the GPU tile rules are checked statically for every launch configuration.
2. **CUDA only:** TFLOP/s of the fused NF4 kernel against dequantize-then-``torch.mm`` at Llama-7B/8B
   linear shapes (4096 tokens), bf16. Skipped, and said so, without a GPU: no GPU figure is invented.
3. **QLoRA step on CPU.** A tiny Llama (4 layers, hidden 256, vocabulary 256), batch 4 x 128 tokens,
   LoRA rank 16 on every linear, AdamW: the tracked peak of forward + backward and the median step time
   of LoRA on fp32 weights (memopt), QLoRA eager (dequantize, then ``F.linear``: the dequantized weights
   are what autograd keeps), QLoRA compiled by memopt with ``fuse_dequant`` disabled, and with it (NF4
   and int8). Step times on a shared machine are noisy: quote ratios.
4. **Planning figure.** ``memopt plan`` for Llama-3.1-8B QLoRA (NF4 double quantization, LoRA rank 16
   on all linears, batch 2 x 2048, bf16, 8 loss slices, rtx4090 profile, fake tensors) with torchtune's
   published 7.4 GiB as the budget: the peak, its breakdown and the predicted added time (about 4 min;
   ``--quick`` skips it).

Results go to ``<out>/bench_quant.json``.
"""

from __future__ import annotations

import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")      # before anything imports Triton

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, cast  # noqa: E402

from torch import nn  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import memopt  # noqa: E402
from memopt.compiler.backend import MemoptBackend  # noqa: E402
from memopt.runtime.quant import quantize_int8, quantize_nf4  # noqa: E402
from tests.models import tiny_llama, token_batch  # noqa: E402

BENCHMARK = "bench_quant"
MiB = 1 << 20
KERNEL_SHAPES = [(32, 64, 128), (5, 96, 64), (33, 80, 136), (70, 128, 72), (64, 256, 512)]
QUICK_KERNEL_SHAPES = KERNEL_SHAPES[:3]
CUDA_SHAPES = [(4096, 4096, 4096), (4096, 14336, 4096), (4096, 4096, 14336), (4096, 11008, 4096)]
MODEL = {"layers": 4, "hidden": 256, "vocab": 256}
BATCH, SEQ, RANK, ALPHA = 4, 128, 16, 32
VARIANTS = ("lora_fp32", "qlora_eager", "qlora_unfused", "qlora_fused", "qlora_int8_fused")
# torchtune's measured peak for Llama-3.1-8B QLoRA (rank 16, all linears, batch 2 x 2048, compile on).
TORCHTUNE_8B_QLORA_BYTES = int(7.4 * (1 << 30))
QLORA_OPTIONS = {"adapters": {"method": "lora", "rank": RANK, "alpha": ALPHA, "targets": "all-linear"},
                 "quantize": {"weights": "nf4", "double_quant": True}}


def plan_8b(log: Callable[[str], None]) -> dict[str, Any]:
    """memopt's plan for torchtune's Llama-3.1-8B QLoRA setting, with torchtune's peak as the budget."""
    from memopt.plan import plan

    report = plan("llama-3.1-8b", options={**QLORA_OPTIONS, "memory_budget": TORCHTUNE_8B_QLORA_BYTES},
                  device="rtx4090", batch=2, seq=2048, dtype="bf16", loss_chunks=8, progress=log)
    schedule = report.schedule or {}
    return {"peak_bytes": report.peak_bytes, "budget_bytes": report.budget_bytes,
            "fits_budget": report.fits_budget, "breakdown": report.breakdown, "totals": report.totals,
            "predicted_added_s": schedule.get("added_time_s"), "schedule_method": schedule.get("method"), "step_time_s": report.step_time_s,
            "plan_seconds": sum(report.stage_seconds.values())}


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-30)).item()


def kernel_checks(shapes: Sequence[tuple[int, int, int]]) -> list[dict[str, Any]]:
    """Each kernel against its reference (module docstring, part 1)."""
    from memopt.codegen import compress_rows, int8_matmul, nf4_matmul
    from memopt.codegen.triton_kernels import check_tiles

    for tiles in (nf4_matmul.TILES, int8_matmul.TILES):
        check_tiles(tiles, 2)
        check_tiles(tiles, 4)
    rows: list[dict[str, Any]] = []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for m, n, k in shapes:
        torch.manual_seed(m + n + k)
        weight = torch.randn(n, k, device=device)
        q4, q8 = quantize_nf4(weight), quantize_int8(weight)
        for dtype in (torch.float32, torch.float16):
            for transposed in (False, True):
                x = torch.randn(m, n if transposed else k, device=device).to(dtype)
                rows.append({"kernel": "nf4_matmul", "shape": [m, n, k], "dtype": str(dtype), "transposed": transposed,
                             "rel_error": _relative_error(nf4_matmul.nf4_matmul(x, q4, transposed=transposed),
                                                          nf4_matmul.reference(x, q4, transposed=transposed))})
                rows.append({"kernel": "int8_matmul", "shape": [m, n, k], "dtype": str(dtype),
                             "transposed": transposed, "rel_error": _relative_error(
                                 int8_matmul.int8_matmul(x, q8.codes, q8.scale, transposed=transposed),
                                 int8_matmul.reference(x, q8.codes, q8.scale, transposed=transposed))})
            x = torch.randn(m, k, device=device).to(dtype)
            xa, b = torch.randn(m, 8, device=device).to(dtype), (0.1 * torch.randn(n, 8, device=device)).to(dtype)
            rows.append({"kernel": "nf4_matmul+lora", "shape": [m, n, k], "dtype": str(dtype), "transposed": False,
                         "rel_error": _relative_error(nf4_matmul.nf4_matmul(x, q4, lora=(xa, b, 2.0)),
                                                      nf4_matmul.reference(x, q4, lora=(xa, b, 2.0)))})
            act = 3 * torch.randn(m, k, device=device).to(dtype)
            packed = compress_rows.compress_int8(act)
            same = torch.equal(packed, compress_rows.reference_compress(act))
            back = compress_rows.decompress_int8(packed, act.shape, dtype)
            rows.append({"kernel": "compress_int8+decompress", "shape": [m, k], "dtype": str(dtype),
                         "transposed": False, "bytes_identical": same,
                         "rel_error": _relative_error(back, compress_rows.reference_decompress(packed, act.shape, dtype))})
    return rows


def cuda_throughput(shapes: Sequence[tuple[int, int, int]]) -> list[dict[str, Any]]:
    """TFLOP/s of the fused NF4 kernel and of dequantize + torch.mm (module docstring, part 2)."""
    from memopt.codegen.nf4_matmul import nf4_matmul
    from memopt.runtime.quant import dequantize_nf4

    def timed(fn: Callable[[], Any], repeats: int = 20) -> float:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    rows = []
    for m, n, k in shapes:
        q = quantize_nf4(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        flops = 2 * m * n * k
        fused = timed(lambda: nf4_matmul(x, q))
        dense = timed(lambda: x @ dequantize_nf4(q).t())
        rows.append({"shape": [m, n, k], "fused_tflops": flops / fused / 1e12, "dequant_mm_tflops": flops / dense / 1e12,
                     "speedup": dense / fused})
    return rows


def _build(variant: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = tiny_llama(**MODEL)
    lora = {"method": "lora", "rank": RANK, "alpha": ALPHA, "targets": "all-linear"}
    options: dict[str, Any] = {"adapters": lora}
    if variant != "lora_fp32":
        options["quantize"] = {"weights": "int8" if "int8" in variant else "nf4", "double_quant": True}
    memopt.prepare(model, options)
    if variant == "qlora_eager":
        return model, model
    backend_options = {**options, "codegen": "inductor"}
    if variant == "qlora_unfused":
        backend_options["disable_passes"] = ["fuse_dequant"]
    return cast(nn.Module, torch.compile(model, backend=MemoptBackend(backend_options))), model


def qlora_step(variant: str, steps: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Tracked peak and step time of one variant (module docstring, part 3)."""
    from memopt.runtime.qlinear import QuantizedLinear

    torch._dynamo.reset()
    gc.collect()
    step_model, model = _build(variant)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    batch = token_batch(BATCH, SEQ, vocab=MODEL["vocab"])

    def step() -> None:
        step_model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    log("warming up (the first step compiles)")
    step()
    step()
    gc.collect()
    with memopt.track_memory("cpu") as mem:
        out = step_model(**batch)
        out.loss.backward()
    del out
    opt.zero_grad(set_to_none=True)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    weight_bytes = sum(m.quantized_bytes() for m in model.modules() if isinstance(m, QuantizedLinear)) + sum(
        p.numel() * p.element_size() for p in model.parameters())
    return {"variant": variant, "tracked_peak_bytes": mem.peak_bytes,
            "tracked_peak_increase_bytes": mem.peak_bytes - mem.baseline_bytes, "weight_bytes": weight_bytes,
            "median_step_s": statistics.median(times)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    os.environ["MEMOPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="memopt-bench-")   # plans measured afresh
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    log("1. kernels against their references" + ("" if torch.cuda.is_available() else " (Triton interpreter)"))
    checks = kernel_checks(QUICK_KERNEL_SHAPES if args.quick else KERNEL_SHAPES)
    worst: dict[str, float] = {}
    for row in checks:
        key = f"{row['kernel']} {row['dtype'].replace('torch.', '')}"
        worst[key] = max(worst.get(key, 0.0), row["rel_error"])
    for key, value in sorted(worst.items()):
        print(f"    {key:40s} largest error / largest value {value:.2e}")
    print(f"    compress bytes identical to the PyTorch op: "
          f"{all(r.get('bytes_identical', True) for r in checks)}")
    cuda_rows: list[dict[str, Any]] = []
    if torch.cuda.is_available():
        log("2. fused NF4 kernel vs dequantize + torch.mm on CUDA")
        cuda_rows = cuda_throughput(CUDA_SHAPES)
        for row in cuda_rows:
            print(f"    {row['shape']}: fused {row['fused_tflops']:.1f} TFLOP/s, dequantize+mm "
                  f"{row['dequant_mm_tflops']:.1f} TFLOP/s ({row['speedup']:.2f}x)")
    else:
        log("2. skipped: no CUDA device here (no GPU figure is reported)")
    log("3. QLoRA step on CPU")
    records = []
    steps = args.steps or (3 if args.quick else 10)
    for variant in VARIANTS:
        records.append(qlora_step(variant, steps, lambda m, v=variant: log(f"{v}: {m}")))
    reference = next(r for r in records if r["variant"] == "qlora_unfused")
    print(f"\n    {'variant':18s} {'weights MiB':>12s} {'peak MiB':>10s} {'+step MiB':>10s} {'step ms':>9s} "
          f"{'peak/unfused':>13s}")
    for r in records:
        print(f"    {r['variant']:18s} {r['weight_bytes'] / MiB:12.2f} {r['tracked_peak_bytes'] / MiB:10.2f} "
              f"{r['tracked_peak_increase_bytes'] / MiB:10.2f} {r['median_step_s'] * 1e3:9.1f} "
              f"{r['tracked_peak_bytes'] / reference['tracked_peak_bytes']:13.3f}")
    plan_row: dict[str, Any] | None = None
    if not args.quick:
        log("4. memopt plan: Llama-3.1-8B QLoRA, batch 2 x 2048, rtx4090, budget torchtune's 7.4 GiB")
        plan_row = plan_8b(lambda m: log(f"plan: {m}"))
        print(f"    peak {plan_row['peak_bytes'] / (1 << 30):.2f} GiB against torchtune's 7.40 GiB: "
              f"{'met' if plan_row['fits_budget'] else 'NOT met'}")
        for name, nbytes in plan_row["breakdown"].items():
            print(f"      {name:20s} {nbytes / MiB:10.1f} MiB")
        print(f"    predicted added time {plan_row['predicted_added_s']} s (rtx4090 profile, derived)")
    meta = {"benchmark": BENCHMARK, "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "date": time.strftime("%Y-%m-%d"), "model": MODEL, "batch": BATCH, "seq": SEQ, "rank": RANK,
            "wall_s": round(time.perf_counter() - started, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{BENCHMARK}.json").write_text(json.dumps(
        {"meta": meta, "kernels": checks, "cuda": cuda_rows, "qlora_step": records,
         "plan_8b_qlora": plan_row}, indent=2) + "\n")
    print(f"\nwrote {args.out / (BENCHMARK + '.json')} ({meta['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
