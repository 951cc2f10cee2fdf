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
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_memory import MiB, add_ratios, align, bench_parser, choose_names, run_grid, \
    run_metadata, seq_chart, warm_track_and_time, write_scalars  # noqa: E402
from bench_tokens import BLOCK, LR, _model  # noqa: E402

from memopt.compiler.backend import MemoptBackend  # noqa: E402
from tests.models import token_batch  # noqa: E402

BENCHMARK = "bench_long_context"
CHUNKS = {"chunk_sequence": {"chunks": 8}}
ELIMINATE = {"token_elimination": {"keep_ratio": 0.4, "block_size": BLOCK}}
VARIANTS: dict[str, dict[str, Any]] = {"dense": {}, "chunked": CHUNKS, "keep_0.4": ELIMINATE,
                                       "chunked+keep_0.4": {**CHUNKS, **ELIMINATE}}
SEQ_LENS, QUICK_SEQ_LENS = (2048, 4096, 8192), (2048,)
STEPS, QUICK_STEPS = 3, 2


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__, VARIANTS)
    args = parser.parse_args(argv)
    variants = choose_names(parser, args.variants, VARIANTS, "variant")
    seq_lens = ([int(s) for s in args.seq_lens.split(",")] if args.seq_lens
                else list(QUICK_SEQ_LENS if args.quick else SEQ_LENS))
    if any(not 2 * BLOCK <= s <= 8192 for s in seq_lens):
        parser.error(f"--seq-lens: between {2 * BLOCK} (two blocks) and 8192 (the model's positions)")
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    args.batch = 1
    meta = run_metadata(args, seq_lens, steps)
    meta.update(benchmark=BENCHMARK, variants={v: VARIANTS[v] for v in variants},
                model="Llama, 4 layers, hidden 128, MLP 256, 4 heads (2 kv), vocabulary 256")
    started = time.perf_counter()
    records = run_grid(seq_lens, variants, 1, lambda variant, seq, log: run_one(variant, seq, steps, log))
    add_ratios(records, ("dense",), (("peak", "tracked_peak_bytes"), ("time", "median_step_s"),
                                     ("saved", "saved_activation_bytes")))
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    write_scalars(args.out, BENCHMARK, meta, records)
    (args.out / f"{BENCHMARK}.svg").write_text(
        seq_chart(records, variants, "bench_long_context: chunked MLPs and token elimination on CPU (tracked)"))
    print()
    print(format_table(records))
    print(f"\nwrote {args.out / (BENCHMARK + '.json')}, .csv and .svg ({meta['wall_s']:.0f} s)")
    return 0 if all("error" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
