"""Long context: tracked peak and CPU step time against sequence length, dense, with the MLPs chunked, with
token elimination, and with both, side by side in one process.

    python benchmarks/bench_long_context.py            # 2K, 4K, 8K tokens (several minutes, 2 cores)
    python benchmarks/bench_long_context.py --quick    # 2K, 2 timed steps

The Llama-shaped model of ``bench_tokens.py`` (4 layers, hidden 128, MLP 256, 4 heads, 2 key-value heads,
vocabulary 256, 8192 positions), batch 1, AdamW over every parameter, each variant compiled with
``MemoptBackend`` (Inductor code generation):

- ``dense``: nothing but the compile;
- ``chunked``: ``chunk_sequence`` with 8 slices (exact);
- ``keep_0.4``: ``token_elimination`` keeping 40% of the blocks of 64 from the middle layer on (lossy);
- ``chunked+keep_0.4``: both.

Each variant: a fresh model from seed 0, two warm-up steps (the first compiles), one tracked forward +
backward under ``memopt.track_memory("cpu")``, timed steps. Results: ``<out>/bench_long_context.json``,
``.csv`` and ``.svg``. Step times on a shared 2-core machine are noisy: quote ratios.

    python benchmarks/bench_long_context.py --plan-max-seq [--profiles 80,24,8] [--variants plain,keep_0.4]

runs ``memopt plan --max-seq`` instead (6-10 min a run), one process per device and variant, for
Llama-3.1-8B with its context extended to 1M positions (``benchmarks/configs/llama-3.1-8b-1m.json``:
nothing else changes) in QLoRA (NF4, double quantization, LoRA rank 32 on every linear, AdamW), batch 1,
``chunk_sequence`` with 8 slices and ``logits: "drop"``, offloads bounded at 128 GiB of host memory: the
``a100-80gb`` profile (80), ``rtx4090`` (24), and ``rtx4090`` with an 8 GiB budget (8); ``plain`` as
that, ``keep_0.4`` with token elimination too (40% of the blocks of 64 kept from the middle layer on,
lossy). Results (predictions, not measurements): ``<out>/bench_long_context_max_seq.json`` and ``.csv``.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_memory import MiB, align, warm_track_and_time  # noqa: E402
from bench_tokens import BLOCK, LR, _model, seq_main  # noqa: E402

from memopt.compiler.backend import MemoptBackend  # noqa: E402
from tests.models import token_batch  # noqa: E402

BENCHMARK = "bench_long_context"
CHUNKS = {"chunk_sequence": {"chunks": 8}}
ELIMINATE = {"token_elimination": {"keep_ratio": 0.4, "block_size": BLOCK}}
VARIANTS: dict[str, dict[str, Any]] = {"dense": {}, "chunked": CHUNKS, "keep_0.4": ELIMINATE,
                                       "chunked+keep_0.4": {**CHUNKS, **ELIMINATE}}
SEQ_LENS, QUICK_SEQ_LENS = (2048, 4096, 8192), (2048,)


def run_one(variant: str, seq: int, steps: int, log: Callable[[str], None]) -> dict[str, Any]:
    torch._dynamo.reset()
    gc.collect()
    model = _model()
    backend = MemoptBackend({"codegen": "inductor", **VARIANTS[variant]})
    step_model = cast(nn.Module, torch.compile(model, backend=backend))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, foreach=True)
    batch: dict[str, Any] = token_batch(1, seq, vocab=256)
    record: dict[str, Any] = {"variant": variant, "seq_len": seq, "batch": 1}

    def tracked() -> None:
        step_model(**batch).loss.backward()

    record.update(warm_track_and_time(model, step_model, batch, opt, steps, log, tracked=tracked))
    report = backend.reports[-1]
    record["saved_activation_bytes"] = report.memory.saved_activation_bytes if report.memory else None
    record["planned_peak_bytes"] = report.memory.peak_bytes if report.memory else None
    stats = {r.name: r.stats.get("pass_stats", {}) for r in report.passes}
    record["chunked_regions"] = stats.get("chunk_sequence", {}).get("regions", 0)
    record["kept_tokens"] = stats.get("eliminate_tokens", {}).get("kept_tokens", seq)
    return record


def format_table(records: list[dict[str, Any]]) -> str:
    rows: list[tuple[str, ...]] = [("seq", "variant", "saved MiB", "planned MiB", "+step MiB", "step ms",
                                    "saved/dense", "peak/dense", "time/dense")]
    for r in records:
        if "error" in r:
            rows.append((str(r["seq_len"]), r["variant"], "FAILED: " + r["error"].splitlines()[0][:60], *[""] * 6))
            continue
        ratio = lambda key: "" if r.get(key) is None else f"{r[key]:.3f}"  # noqa: E731
        rows.append((str(r["seq_len"]), r["variant"], f"{(r['saved_activation_bytes'] or 0) / MiB:.2f}",
                     f"{(r['planned_peak_bytes'] or 0) / MiB:.2f}", f"{r['tracked_peak_increase_bytes'] / MiB:.2f}",
                     f"{r['median_step_s'] * 1e3:.0f}", ratio("saved_vs_dense"), ratio("peak_vs_dense"),
                     ratio("time_vs_dense")))
    return align(rows)


MAX_SEQ_PROFILES = {"80": ("a100-80gb", None), "24": ("rtx4090", None), "8": ("rtx4090", "8GiB")}
QLORA_LONG = {"adapters": {"method": "lora", "rank": 32, "alpha": 64, "targets": "all-linear"},
              "quantize": {"weights": "nf4"}, "host_memory": "128GiB",
              "chunk_sequence": {"chunks": 8, "min_tokens": 1024, "logits": "drop"}}
MAX_SEQ_VARIANTS = {"plain": QLORA_LONG, "keep_0.4": {**QLORA_LONG, **ELIMINATE}}


def _max_seq_row(key: str, variant: str, out: Path) -> dict[str, Any] | None:
    """One ``memopt plan --max-seq`` run in a process of its own, as a row of the table (None on an error)."""
    config = Path(__file__).resolve().parent / "configs" / "llama-3.1-8b-1m.json"
    options = out / f"bench_long_context_max_seq.{variant}.options.json"
    options.write_text(json.dumps(MAX_SEQ_VARIANTS[variant], indent=1))
    device, budget = MAX_SEQ_PROFILES[key]
    command = [sys.executable, "-m", "memopt.cli", "plan", "--model", str(config), "--seq", "4096",
               "--device", device, "--options", str(options), "--max-seq", "--json"]
    command += ["--budget", budget] if budget else []
    print(f"[{key} GiB, {variant}] {' '.join(command[2:])}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode not in (0, 1):
        print(done.stderr[-2000:])
        return None
    found = json.loads(done.stdout)
    plan = found["plan"] or {}
    row = {"memory_gib": int(key), "variant": variant, "device": device, "budget": budget,
           "max_seq": found["max_seq"], "peak_bytes": plan.get("peak_bytes"),
           "host_peak_bytes": plan.get("host_peak_bytes"), "step_time_s": plan.get("step_time_s"),
           "plan_method": found["plan_method"], "asks": len(found["tried"]), "capture_s": found["capture_seconds"],
           "wall_s": round(time.perf_counter() - started, 1),
           "planner_peak_rss_bytes": found["planner_peak_rss_bytes"], "tried": found["tried"]}
    print(f"  {found['max_seq']:,} tokens, step {row['step_time_s'] or 0:.2f} s (predicted), {row['wall_s']:.0f} s, "
          f"planner {found['planner_peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    return row


def plan_max_seq(out: Path, profiles: Sequence[str], variants: Sequence[str]) -> int:
    """The planned ``--max-seq`` table (see the module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for key in profiles:
        for variant in variants:
            row = _max_seq_row(key, variant, out)
            if row is None:
                return 2
            rows.append(row)
    results = out / "bench_long_context_max_seq.json"
    if results.exists():          # rows planned by another run are kept (--profiles, --variants run a part)
        done = {(r["memory_gib"], r["variant"]) for r in rows}
        earlier = [r for r in json.loads(results.read_text())["rows"]
                   if (r["memory_gib"], r.get("variant", "plain")) not in done]
        rows = sorted(earlier + rows, key=lambda r: (-r["memory_gib"], r.get("variant", "plain")))
    results.write_text(json.dumps(
        {"model": "llama-3.1-8b (max_position_embeddings 1M)", "options": MAX_SEQ_VARIANTS, "batch": 1,
         "rows": rows, "note": "predictions of memopt's cost model; no GPU was measured"}, indent=1))
    keys = [k for k in rows[0] if k != "tried"] if rows else []
    (out / "bench_long_context_max_seq.csv").write_text(
        "\n".join([",".join(keys)] + [",".join(str(r.get(k)) for k in keys) for r in rows]) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--plan-max-seq" in args:
        profiles = args[args.index("--profiles") + 1].split(",") if "--profiles" in args else list(MAX_SEQ_PROFILES)
        variants = args[args.index("--variants") + 1].split(",") if "--variants" in args else list(MAX_SEQ_VARIANTS)
        out = Path(args[args.index("--out") + 1]) if "--out" in args else Path(__file__).parent / "results"
        return plan_max_seq(out, profiles, variants)
    return seq_main(argv, doc=__doc__, benchmark=BENCHMARK, variants=list(VARIANTS), run_one=run_one,
                    seq_lens=SEQ_LENS, quick_seq_lens=QUICK_SEQ_LENS, table=format_table,
                    title="bench_long_context: chunked MLPs and token elimination on CPU (tracked)",
                    meta_extra=lambda chosen: {"variants": {v: VARIANTS[v] for v in chosen}})


if __name__ == "__main__":
    sys.exit(main())
