"""Token elimination: tracked peak and CPU step time against sequence length, dense and eliminated, side
by side in one process.

    python benchmarks/bench_tokens.py                 # 1K, 2K, 4K, 8K tokens (several minutes, 2 cores)
    python benchmarks/bench_tokens.py --quick         # 1K and 2K, 2 timed steps

A Llama-shaped model small enough for a CPU at 8K tokens (4 layers, hidden 128, MLP 256, 4 heads, 2 key-
value heads, vocabulary 256, 8192 positions), batch 1, AdamW over every parameter, each variant compiled
with ``MemoptBackend`` (Inductor code generation):

- ``dense``: no elimination;
- ``keep_0.4`` and ``keep_0.25``: ``token_elimination`` with that ``keep_ratio``, blocks of 64 tokens, from
  the middle layer on (LeMo's setting is 0.4 from the middle layer).

Each variant: a fresh model from seed 0, two warm-up steps (the first compiles), one tracked forward +
backward under ``memopt.track_memory("cpu")``, timed steps. Results: ``<out>/bench_tokens.json``, ``.csv``
and ``.svg`` (tracked peak increase and step time against length). Step times on a shared 2-core machine
are noisy: quote ratios.
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

from bench_memory import SEED, MiB, add_ratios, align, bench_parser, choose_names, run_grid, \
    run_metadata, seq_chart, warm_track_and_time, write_scalars

from memopt.compiler.backend import MemoptBackend
from tests.models import token_batch

BENCHMARK = "bench_tokens"
VARIANTS = {"dense": None, "keep_0.4": 0.4, "keep_0.25": 0.25}
SEQ_LENS, QUICK_SEQ_LENS = (1024, 2048, 4096, 8192), (1024, 2048)
STEPS, QUICK_STEPS, LR, BLOCK = 3, 2, 1e-3, 64


def _model() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    config._attn_implementation = "sdpa"
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config).train()


def run_one(variant: str, seq: int, steps: int, log: Callable[[str], None]) -> dict[str, Any]:
    torch._dynamo.reset()
    gc.collect()
    model = _model()
    ratio = VARIANTS[variant]
    options: dict[str, Any] = {"codegen": "inductor"}
    if ratio is not None:
        options["token_elimination"] = {"keep_ratio": ratio, "block_size": BLOCK}
    backend = MemoptBackend(options)
    step_model = cast(nn.Module, torch.compile(model, backend=backend))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, foreach=True)
    batch: dict[str, Any] = token_batch(1, seq, vocab=256)
    record: dict[str, Any] = {"variant": variant, "seq_len": seq, "batch": 1}

    def tracked() -> None:
        out = step_model(**batch)
        out.loss.backward()

    record.update(warm_track_and_time(model, step_model, batch, opt, steps, log, tracked=tracked))
    report = backend.reports[-1]
    record["saved_activation_bytes"] = report.memory.saved_activation_bytes if report.memory else None
    eliminated = [r.stats.get("pass_stats", {}) for r in report.passes if r.name == "eliminate_tokens"]
    record["kept_tokens"] = eliminated[0].get("kept_tokens", seq) if eliminated else seq
    return record


def format_table(records: list[dict[str, Any]]) -> str:
    rows: list[tuple[str, ...]] = [("seq", "variant", "kept", "saved MiB", "peak MiB", "+step MiB", "step ms",
                                    "saved/dense", "peak/dense", "time/dense")]
    for r in records:
        if "error" in r:
            rows.append((str(r["seq_len"]), r["variant"], "FAILED: " + r["error"].splitlines()[0][:60],
                         *[""] * 7))
            continue
        ratio = lambda key: "" if r.get(key) is None else f"{r[key]:.3f}"  # noqa: E731
        rows.append((str(r["seq_len"]), r["variant"], str(r["kept_tokens"]),
                     f"{(r['saved_activation_bytes'] or 0) / MiB:.2f}", f"{r['tracked_peak_bytes'] / MiB:.2f}",
                     f"{r['tracked_peak_increase_bytes'] / MiB:.2f}", f"{r['median_step_s'] * 1e3:.0f}",
                     ratio("saved_vs_dense"), ratio("peak_vs_dense"), ratio("time_vs_dense")))
    return align(rows)


def seq_main(argv: Sequence[str] | None, *, doc: str | None, benchmark: str, variants: Sequence[str],
             run_one: Callable[[str, int, int, Callable[[str], None]], dict[str, Any]],
             seq_lens: Sequence[int], quick_seq_lens: Sequence[int], table: Callable[[list[dict[str, Any]]], str],
             title: str, meta_extra: Callable[[list[str]], dict[str, Any]]) -> int:
    """The command line, grid, ratios against ``dense``, files and table of a benchmark against sequence
    length (this one and ``bench_long_context.py``)."""
    parser = bench_parser(doc, variants)
    args = parser.parse_args(argv)
    chosen = choose_names(parser, args.variants, variants, "variant")
    lengths = ([int(s) for s in args.seq_lens.split(",")] if args.seq_lens
               else list(quick_seq_lens if args.quick else seq_lens))
    if any(not 2 * BLOCK <= s <= 8192 for s in lengths):
        parser.error(f"--seq-lens: between {2 * BLOCK} (two blocks) and 8192 (the model's positions)")
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    args.batch = 1
    meta = run_metadata(args, lengths, steps)
    meta.update(benchmark=benchmark, block_size=BLOCK, **meta_extra(chosen),
                model="Llama, 4 layers, hidden 128, MLP 256, 4 heads (2 kv), vocabulary 256")
    started = time.perf_counter()
    records = run_grid(lengths, chosen, 1, lambda variant, seq, log: run_one(variant, seq, steps, log))
    add_ratios(records, ("dense",), (("peak", "tracked_peak_bytes"), ("time", "median_step_s"),
                                     ("saved", "saved_activation_bytes")))
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    write_scalars(args.out, benchmark, meta, records)
    (args.out / f"{benchmark}.svg").write_text(seq_chart(records, list(variants), title))
    print()
    print(table(records))
    print(f"\nwrote {args.out / (benchmark + '.json')}, .csv and .svg ({meta['wall_s']:.0f} s)")
    return 0 if all("error" not in r for r in records) else 1


def main(argv: Sequence[str] | None = None) -> int:
    return seq_main(argv, doc=__doc__, benchmark=BENCHMARK, variants=list(VARIANTS), run_one=run_one,
                    seq_lens=SEQ_LENS, quick_seq_lens=QUICK_SEQ_LENS, table=format_table,
                    title="bench_tokens: token elimination on CPU (tracked)",
                    meta_extra=lambda chosen: {"variants": chosen})


if __name__ == "__main__":
    sys.exit(main())
