"""The GPU check: does memopt's CUDA side work, and do its plans hold on a real device?

    python benchmarks/gpu_check.py                   # on one CUDA GPU, in under 8 minutes
    python benchmarks/gpu_check.py --dry-run         # every section's code path on CPU at tiny sizes (CI)

Sections, in order; each ends passed, failed (with the error) or skipped (with the reason), and a failing
section does not stop the next. A time guard (``--time-limit``, 450 s) skips what would start too late.

1. ``environment``: torch, Triton, CUDA, the device and its memory.
2. ``correctness``: a tiny Llama step with ``offload: "all"`` (every saved activation goes to the host),
   ``codegen`` inductor and triton, fp32 and bf16: loss and every gradient against eager. On CUDA, a
   profiler trace says whether the copies run on a side stream while kernels run (overlap), and
   ``max_memory_allocated`` with and without offload measures the device memory they free.
3. ``kernels``: NF4 and int8 dequant-matmul (NF4 with and without the LoRA epilogue) and int8 activation
   compression against their PyTorch references in bf16 and fp16; on CUDA, TFLOP/s against dequantize-
   then-``mm`` at Llama-3-8B shapes.
4. ``plan``: a ~1B-parameter Llama-shaped model (random weights) at a length where activations dominate,
   compiled by memopt under three budgets: planned peak against the measured one (target: within 5%),
   predicted step time against the measured one.
5. ``versus_pytorch``: the same model under ``torch.compile`` with ``activation_memory_budget`` 0.5 and
   0.25, and memopt given each of those runs' measured peak as its budget: peak and step time side by side.
6. ``tune``: ``memopt tune --quick`` on the device (the fitted profile is in the results), then the tiny
   Llama's op-by-op step (``codegen="eager"``) predicted with the built-in profile and with the tuned
   one, against the measured time.

Writes ``<out>/gpu_check.json`` and ``<out>/gpu_check.md`` (default ``benchmarks/results/gpu``; the dry
run writes to ``--out`` only when given one, else to a temporary folder). Exit status 1 when a section
failed. Sizes, budgets and tolerances are the constants below.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# (layers, hidden, intermediate, heads, kv heads, vocab), batch, seq
GPU_TINY, DRY_TINY = (2, 256, 512, 4, 2, 1024), (2, 64, 128, 4, 2, 256)
# 8 wide layers rather than 16 narrow ones: about 1.0 B parameters, half the graph to compile.
GPU_LARGE, DRY_LARGE = (8, 3072, 8192, 24, 8, 32000), (2, 64, 128, 4, 2, 256)
GPU_SHAPE, DRY_SHAPE = (2, 2048), (4, 128)
KERNEL_SHAPES_GPU = {"llama3_8b_q_proj": (4096, 4096, 4096), "llama3_8b_up_proj": (4096, 4096, 14336)}  # M, K, N
KERNEL_SHAPES_DRY = {"tiny": (16, 128, 64)}
BUDGETS = (0.75, 0.5, 0.3)                  # memopt's memory_budget: shares of the unoptimised activations
KNAPSACK = (0.5, 0.25)                      # torch's activation_memory_budget
PEAK_TARGET = 0.05                          # planned against measured peak
TIME_LIMIT_S = 450.0
TIMED_STEPS = 3
TOLERANCE = {"float32": (1e-4, 1e-4), "float16": (2e-3, 2e-3), "bfloat16": (2e-2, 2e-2)}
GRAD_TOLERANCE = {"float32": (1e-3, 1e-4), "bfloat16": (5e-2, 5e-2)}


class Skip(Exception):
    """A section, or part of one, that cannot run here; the message says why."""


class Check:
    """The run: device, sizes, the time guard, and the sections' results."""

    def __init__(self, dry_run: bool, time_limit_s: float) -> None:
        import torch

        self.dry_run, self.started, self.limit = dry_run, time.perf_counter(), time_limit_s
        self.cuda = torch.cuda.is_available() and not dry_run
        if not self.cuda and not dry_run:
            raise SystemExit("gpu_check: no CUDA device; run with --dry-run to check the code paths on CPU")
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.sections: dict[str, dict[str, Any]] = {}

    def left_s(self) -> float:
        return self.limit - (time.perf_counter() - self.started)

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f} s] {message}", flush=True)

    def section(self, name: str, body: Callable[[dict[str, Any]], None], needs_s: float) -> None:
        result: dict[str, Any] = {}
        start = time.perf_counter()
        if self.left_s() < needs_s:
            result.update(status="skipped", reason=f"time guard: {self.left_s():.0f} s left, needs ~{needs_s:.0f} s")
        else:
            self.log(f"{name}: start")
            try:
                body(result)
                result.setdefault("status", "passed")
            except Skip as why:
                result.update(status="skipped", reason=str(why))
            except Exception as err:  # noqa: BLE001 - a failing section is reported and the next runs
                traceback.print_exc()
                result.update(status="failed", error=f"{type(err).__name__}: {err}")
        result["seconds"] = round(time.perf_counter() - start, 2)
        self.sections[name] = result
        self.log(f"{name}: {result['status']} ({result['seconds']} s)"
                 + (f": {result.get('reason') or result.get('error')}" if result["status"] != "passed" else ""))

    # --- measuring -------------------------------------------------------------------------------------

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def step_peak_and_time(self, step: Callable[[], None], steps: int = TIMED_STEPS) -> tuple[int, float]:
        """Tracked peak bytes of one call of ``step`` (all live tensors counted) and its median time."""
        import gc

        import memopt

        step()                                          # warm-up (compiles)
        gc.collect()
        self.sync()
        with memopt.track_memory(self.device) as mem:
            step()
            self.sync()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            self.sync()
            times.append(time.perf_counter() - start)
        return mem.peak_bytes, statistics.median(times)


# --------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------


def llama(shape: tuple[int, ...], dtype: Any, device: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, inter, heads, kv, vocab = shape
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=8192)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).train()


def batch_of(vocab: int, shape: tuple[int, int], device: Any) -> dict[str, Any]:
    import torch

    ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0)).to(device)
    return {"input_ids": ids, "labels": ids, "use_cache": False}


def fwd_bwd(model: Any, batch: dict[str, Any]) -> Callable[[], None]:
    """Forward and backward, the output held through the backward (as a training loop that logs the
    logits does, and as memopt's simulation assumes), gradients dropped after."""
    def step() -> None:
        out = model(**batch)
        out.loss.backward()
        del out
        for p in model.parameters():
            p.grad = None
    return step


# --------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------


def environment(check: Check, out: dict[str, Any]) -> None:
    import torch

    out.update(torch=torch.__version__, python=platform.python_version(), dry_run=check.dry_run,
               device=str(check.device))
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if check.cuda:
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda,
                   capability=f"{props.major}.{props.minor}")


def correctness(check: Check, out: dict[str, Any]) -> None:
    import torch

    from memopt.compiler.backend import MemoptBackend

    shape = DRY_TINY if check.dry_run else GPU_TINY
    runs = out.setdefault("runs", [])
    for dtype in (torch.float32, torch.bfloat16):
        for codegen in ("inductor", "triton"):
            torch._dynamo.reset()
            model = llama(shape, dtype, check.device)
            reference = copy.deepcopy(model)
            batch = batch_of(shape[-1], (2, 64) if check.cuda else (2, 16), check.device)
            backend = MemoptBackend({"offload": "all", "codegen": codegen})
            loss = torch.compile(model, backend=backend)(**batch).loss
            loss.backward()
            expected = reference(**batch).loss
            expected.backward()
            name = str(dtype).removeprefix("torch.")
            rtol, atol = GRAD_TOLERANCE[name]
            worst = max(((p.grad.float() - q.grad.float()).abs().max().item() /
                         (atol + rtol * q.grad.float().abs().max().item()), n)
                        for (n, p), q in zip(model.named_parameters(), reference.parameters()))
            schedule = backend.reports[-1].schedule
            offloaded = len(schedule.chosen.offload) if schedule is not None else 0
            runs.append({"dtype": name, "codegen": codegen, "loss": loss.item(), "eager_loss": expected.item(),
                         "worst_grad_error_over_tolerance": worst[0], "worst_grad": worst[1], "offloaded": offloaded})
            torch.testing.assert_close(loss.float(), expected.float(), rtol=rtol, atol=atol)
            assert worst[0] <= 1.0, f"{name}/{codegen}: gradient {worst[1]} off by {worst[0]:.2f}x the tolerance"
            assert offloaded > 0, f"{name}/{codegen}: nothing was offloaded"
    if not check.cuda:
        out["overlap"] = out["freed"] = "skipped: needs CUDA (a copy stream and the allocator's statistics)"
        return
    out["overlap"] = _copy_overlap(check, shape)
    out["freed"] = _freed_bytes(check, shape)


def _copy_overlap(check: Check, shape: tuple[int, ...]) -> dict[str, Any]:
    """From a profiler trace of one offloading step: time the host copies ran beside kernels of another
    stream, as a share of all copy time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from memopt.compiler.backend import MemoptBackend

    torch._dynamo.reset()
    model = llama(shape, torch.bfloat16, check.device)
    step = fwd_bwd(torch.compile(model, backend=MemoptBackend({"offload": "all"})), batch_of(shape[-1], (4, 512),
                                                                                               check.device))
    step()
    check.sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        check.sync()
    path = Path(tempfile.mkdtemp()) / "trace.json"
    prof.export_chrome_trace(str(path))
    events = [e for e in json.loads(path.read_text()).get("traceEvents", []) if e.get("ph") == "X"]
    copies = [e for e in events if e.get("cat") == "gpu_memcpy"]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    copy_streams = {e.get("args", {}).get("stream") for e in copies}
    kernel_streams = {e.get("args", {}).get("stream") for e in kernels}
    overlapped = 0.0
    for c in copies:
        for k in kernels:
            if k.get("args", {}).get("stream") != c.get("args", {}).get("stream"):
                overlapped += max(0.0, min(c["ts"] + c["dur"], k["ts"] + k["dur"]) - max(c["ts"], k["ts"]))
    total = sum(c["dur"] for c in copies)
    share = min(1.0, overlapped / total) if total else 0.0
    assert copies, "no host copy in the trace of an offloading step"
    assert copy_streams - kernel_streams or share > 0, "the copies ran on the compute stream, serialised"
    return {"copies": len(copies), "copy_us": total, "overlapped_share": share,
            "copy_streams": sorted(map(str, copy_streams)), "kernel_streams": sorted(map(str, kernel_streams))}


def _freed_bytes(check: Check, shape: tuple[int, ...]) -> dict[str, Any]:
    import torch

    from memopt.compiler.backend import MemoptBackend

    peaks = {}
    for offload in ("auto", "all"):
        torch._dynamo.reset()
        model = llama(shape, torch.bfloat16, check.device)
        compiled = torch.compile(model, backend=MemoptBackend({"offload": offload}))
        peaks[offload], _ = check.step_peak_and_time(fwd_bwd(compiled, batch_of(shape[-1], (4, 512), check.device)), 1)
    return {"peak_without_offload": peaks["auto"], "peak_offload_all": peaks["all"],
            "freed_bytes": peaks["auto"] - peaks["all"]}


def kernels(check: Check, out: dict[str, Any]) -> None:
    import torch

    from memopt.codegen import compress_rows, int8_matmul, linear_cross_entropy, nf4_matmul
    from memopt.runtime.quant import dequantize_nf4, quantize_int8, quantize_nf4

    shapes = KERNEL_SHAPES_DRY if check.dry_run else KERNEL_SHAPES_GPU
    dtypes = [torch.float16] if check.dry_run else [torch.bfloat16, torch.float16]
    if check.dry_run:
        out["bf16"] = "skipped: Triton's interpreter has no correct bf16 arithmetic (DESIGN.md)"
    rows = out.setdefault("rows", [])
    gen = torch.Generator(device=check.device).manual_seed(0)
    for label, (m, k, n) in shapes.items():
        for dtype in dtypes:
            name = str(dtype).removeprefix("torch.")
            rtol, atol = TOLERANCE[name]
            x = torch.randn(m, k, generator=gen, device=check.device).to(dtype)
            w = (torch.randn(n, k, generator=gen, device=check.device) / k ** 0.5).to(dtype)
            q4, q8 = quantize_nf4(w), quantize_int8(w)
            a = (torch.randn(16, k, generator=gen, device=check.device) / k ** 0.5).to(dtype)
            b = (torch.randn(n, 16, generator=gen, device=check.device) / 4).to(dtype)
            lora = (x @ a.t(), b, 2.0)
            target = torch.randint(0, n, (m,), generator=gen, device=check.device)
            cases: dict[str, tuple[Callable[[], Any], Callable[[], Any], Callable[[], Any]]] = {
                "nf4_matmul": (lambda: nf4_matmul.nf4_matmul(x, q4), lambda: nf4_matmul.reference(x, q4),
                               lambda: x @ dequantize_nf4(q4).to(dtype).t()),
                "nf4_matmul_lora": (lambda: nf4_matmul.nf4_matmul(x, q4, lora=lora),
                                    lambda: nf4_matmul.reference(x, q4, lora=lora),
                                    lambda: x @ dequantize_nf4(q4).to(dtype).t() + 2.0 * (lora[0] @ b.t())),
                "int8_matmul": (lambda: int8_matmul.int8_matmul(x, q8.codes, q8.scale),
                                lambda: int8_matmul.reference(x, q8.codes, q8.scale),
                                lambda: x @ (q8.codes.to(dtype) * q8.scale[:, None].to(dtype)).t()),
                # The LM head's loss per token: m tokens, k hidden, n words; baseline: logits, then the loss.
                "linear_cross_entropy": (
                    lambda: linear_cross_entropy.forward(x, w, None, target, -100)[0],
                    lambda: linear_cross_entropy.reference_forward(x, w, None, target, -100)[0],
                    lambda: torch.nn.functional.cross_entropy((x @ w.t()).float(), target, reduction="none")),
                "compress_int8": (lambda: compress_rows.decompress_int8(compress_rows.compress_int8(x), x.shape, dtype),
                                  lambda: compress_rows.reference_decompress(compress_rows.reference_compress(x),
                                                                             x.shape, dtype),
                                  lambda: None),
            }
            for kernel, (run, reference, baseline) in cases.items():
                row: dict[str, Any] = {"kernel": kernel, "shape": label, "m_k_n": [m, k, n], "dtype": name}
                got, expected = run(), reference()
                row["max_abs_error"] = (got.float() - expected.float()).abs().max().item()
                torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
                if check.cuda and kernel != "compress_int8":
                    from triton.testing import do_bench

                    flops = 2 * m * k * n
                    row["kernel_tflops"] = flops / do_bench(run) / 1e9
                    row["dequant_then_mm_tflops"] = flops / do_bench(baseline) / 1e9
                rows.append(row)


def _large(check: Check) -> tuple[Any, dict[str, Any]]:
    import torch

    shape = DRY_LARGE if check.dry_run else GPU_LARGE
    dtype = torch.float32 if check.dry_run else torch.bfloat16
    model = llama(shape, dtype, check.device)
    return model, batch_of(shape[-1], DRY_SHAPE if check.dry_run else GPU_SHAPE, check.device)


def _memopt_row(check: Check, model: Any, batch: dict[str, Any], budget: Any) -> dict[str, Any]:
    """memopt under ``budget``: planned and measured peak and step time; an infeasible budget is a row
    that says what memopt could reach, not a failure of the section."""
    import torch

    from memopt.compiler.backend import MemoptBackend
    from memopt.errors import MemoptInfeasibleBudget, memopt_cause

    torch._dynamo.reset()
    profile = "cpu" if check.dry_run else "h200"
    backend = MemoptBackend({"memory_budget": budget, "cost_profile": profile, "solver_time_limit_s": 5.0,
                             "plan_cache": False})
    try:
        peak, step_s = check.step_peak_and_time(fwd_bwd(torch.compile(model, backend=backend), batch))
    except Exception as err:  # noqa: BLE001 - Dynamo wraps the backend's error
        cause = memopt_cause(err, MemoptInfeasibleBudget)
        if cause is None:
            raise
        return {"budget": budget, "infeasible": True, "smallest_peak": cause.min_peak_bytes}
    report = backend.reports[-1]
    planned = report.memory.peak_bytes if report.memory is not None else None
    return {"budget": budget, "planned_peak": planned, "measured_peak": peak,
            "peak_error": None if planned is None else (planned - peak) / peak,
            "predicted_step_s": report.predicted_time_s, "measured_step_s": step_s,
            "budget_bytes": report.budget_bytes}


def plan_truth(check: Check, out: dict[str, Any]) -> None:
    model, batch = _large(check)
    out["parameters"] = sum(p.numel() for p in model.parameters())
    rows = out.setdefault("rows", [])
    for budget in BUDGETS:
        if check.left_s() < 60 and not check.dry_run:
            rows.append({"budget": budget, "skipped": "time guard"})
            continue
        check.log(f"plan: memory_budget {budget}")
        rows.append(_memopt_row(check, model, batch, budget))
    misses = [r for r in rows if r.get("peak_error") is not None and abs(r["peak_error"]) > PEAK_TARGET]
    out["within_target"] = not misses
    if misses and check.cuda:
        raise AssertionError(f"planned peak off by more than {PEAK_TARGET:.0%} at budgets "
                             f"{[r['budget'] for r in misses]}")


def versus_pytorch(check: Check, out: dict[str, Any]) -> None:
    import torch

    model, batch = _large(check)
    rows = out.setdefault("rows", [])
    for share in KNAPSACK:
        torch._dynamo.reset()
        check.log(f"versus_pytorch: activation_memory_budget {share}")
        with torch._functorch.config.patch(activation_memory_budget=share):
            peak, step_s = check.step_peak_and_time(fwd_bwd(torch.compile(model), batch))
        row = {"knapsack_share": share, "knapsack_peak": peak, "knapsack_step_s": step_s}
        memopt_row = _memopt_row(check, model, batch, peak)
        if memopt_row.get("infeasible"):
            row.update(memopt="infeasible at this peak", memopt_smallest_peak=memopt_row["smallest_peak"])
        else:
            row.update(memopt_peak=memopt_row["measured_peak"], memopt_step_s=memopt_row["measured_step_s"],
                       memopt_predicted_step_s=memopt_row["predicted_step_s"],
                       time_ratio=memopt_row["measured_step_s"] / step_s)
        rows.append(row)


def tune(check: Check, out: dict[str, Any]) -> None:
    """``memopt tune --quick`` on this device, then the tiny Llama's op-by-op step predicted with the
    built-in profile and with the tuned one, against the measured time."""
    import torch

    from memopt.compiler.backend import MemoptBackend
    from memopt.cost_model.estimate import estimate_node
    from memopt.cost_model.profile import load_profile, profile_to_json
    from memopt.cost_model.tune import device_name, fit, measure

    started = time.perf_counter()
    samples = measure(check.device, quick=True)
    builtin = load_profile("cpu" if check.dry_run else "h200")
    tuned = fit(samples, builtin, name="gpu_check_tuned", device=device_name(check.device),
                source=f"gpu_check: memopt tune --quick, {len(samples)} measurements")
    out["tune_s"] = time.perf_counter() - started
    out["profile"] = json.loads(profile_to_json(tuned))
    shape = DRY_TINY if check.dry_run else GPU_TINY
    model = llama(shape, torch.float32 if check.dry_run else torch.bfloat16, check.device)
    batch = batch_of(shape[-1], DRY_SHAPE if check.dry_run else GPU_SHAPE, check.device)
    torch._dynamo.reset()
    backend = MemoptBackend({"codegen": "eager", "cost_profile": builtin.name})
    _, measured = check.step_peak_and_time(fwd_bwd(torch.compile(model, backend=backend), batch))
    graphs = [g for r in backend.reports for g in (r.forward, r.backward) if g is not None]
    rows = out.setdefault("rows", [])
    for label, profile in (("built-in " + builtin.name, builtin), ("tuned", tuned)):
        predicted = sum(estimate_node(n, profile).time_s for g in graphs for n in g.graph.nodes)
        rows.append({"profile": label, "predicted_step_s": predicted, "measured_step_s": measured,
                     "error": predicted / measured - 1.0})


SECTIONS: tuple[tuple[str, Callable[[Check, dict[str, Any]], None], float], ...] = (
    ("environment", environment, 0),
    ("correctness", correctness, 60),
    ("kernels", kernels, 30),
    ("plan", plan_truth, 120),
    ("versus_pytorch", versus_pytorch, 90),
    ("tune", tune, 30),
)


def markdown(meta: dict[str, Any], sections: dict[str, dict[str, Any]]) -> str:
    lines = [f"# memopt GPU check ({'dry run on CPU' if meta['dry_run'] else meta.get('gpu', 'GPU')})", "",
             f"{meta['date']}, torch {meta['torch']}, {meta['wall_s']:.0f} s", "",
             "| section | status | seconds | note |", "|---|---|---:|---|"]
    for name, result in sections.items():
        note = (result.get("reason") or result.get("error") or "").splitlines()
        lines.append(f"| {name} | {result['status']} | {result['seconds']} | {(note or [''])[-1][:160]} |")
    for name, result in sections.items():
        rows = result.get("rows") or result.get("runs")
        if not rows:
            continue
        keys = list(dict.fromkeys(k for r in rows for k in r))
        lines += ["", f"## {name}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in rows:
            lines.append("| " + " | ".join(_cell(r.get(k)) for k in keys) + " |")
        extra = {k: v for k, v in result.items() if k not in ("rows", "runs", "status", "seconds")}
        if extra:
            lines += ["", "```json", json.dumps(extra, indent=1, default=str), "```"]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="every section on CPU at tiny sizes")
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_check.json and .md")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT_S, help="seconds (default 450)")
    parser.add_argument("--sections", default=",".join(s[0] for s in SECTIONS))
    args = parser.parse_args(argv)
    if args.dry_run:
        # Before Triton is imported: its interpreter runs the kernels on CPU tensors.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("MEMOPT_TRITON_CPU", "1")
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(wanted) - {s[0] for s in SECTIONS}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {[s[0] for s in SECTIONS]}")
    check = Check(args.dry_run, args.time_limit)
    for name, body, needs_s in SECTIONS:
        if name in wanted:
            check.section(name, lambda out, body=body: body(check, out), 0 if check.dry_run else needs_s)
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="gpu_check_")) if args.dry_run
                           else REPO_ROOT / "benchmarks" / "results" / "gpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    env = check.sections.get("environment", {})
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "dry_run": args.dry_run, "torch": env.get("torch"),
            "gpu": env.get("gpu"), "wall_s": time.perf_counter() - check.started, "time_limit_s": args.time_limit}
    (out_dir / "gpu_check.json").write_text(json.dumps({"meta": meta, "sections": check.sections}, indent=1,
                                                       default=str) + "\n")
    (out_dir / "gpu_check.md").write_text(markdown(meta, check.sections))
    print(f"wrote {out_dir / 'gpu_check.json'} and gpu_check.md ({meta['wall_s']:.0f} s)")
    return 1 if any(s["status"] == "failed" for s in check.sections.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
