"""Adapters: tracked peak memory and CPU step time of fine-tuning a tiny Llama six ways, in one process.

    python benchmarks/bench_adapters.py                 # seq 128 and 512, ~5 min on an idle 2-core CPU
    python benchmarks/bench_adapters.py --quick         # seq 128 only, 3 timed steps
    python benchmarks/bench_adapters.py --variants peft_lora_eager,memopt_lora --seq-lens 256

Variants (tiny Llama of bench_memory.py: 4 layers, hidden 128, vocabulary 256; batch 4; AdamW over the
trainable parameters; adapters of rank 16, alpha 32, on every linear but the output head, "all-linear"):

- ``full_ft``: every parameter trains, eager;
- ``peft_lora_eager`` / ``peft_lora_inductor``: ``peft.get_peft_model`` with LoRA, eager / under
  ``torch.compile`` (Inductor, default settings);
- ``memopt_lora`` / ``memopt_dora`` / ``memopt_paca``: ``memopt.prepare`` and
  ``torch.compile(backend=MemoptBackend({"adapters": ...}))`` (Inductor code generation, no budget).

Each variant: a fresh model from seed 0, two warm-up steps (the first compiles; recompiling later is an
error), one tracked forward + backward under ``memopt.track_memory("cpu")`` (parameters, optimizer
states and the batch live at entry), then timed steps of forward + backward + ``optimizer.step()``.
Results go to ``<out>/bench_adapters.json`` and ``.csv``; the table shows each variant's tracked peak and
median step time, and their ratios to full fine-tuning and to PEFT's eager LoRA. Step times on a shared
2-core machine are noisy: quote the ratios and rerun on an idle machine before concluding about speed.
"""

from __future__ import annotations

import gc
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_memory import (
    MODEL,
    RATIO_METRICS,
    SEED,
    MiB,
    add_ratios,
    align,
    bench_parser,
    choose_names,
    run_grid,
    run_metadata,
    warm_track_and_time,
    write_scalars,
)

import memopt
from memopt.compiler.backend import MemoptBackend
from tests.models import tiny_llama, token_batch

BENCHMARK = "bench_adapters"
VARIANTS = ("full_ft", "peft_lora_eager", "peft_lora_inductor", "memopt_lora", "memopt_dora", "memopt_paca")
SEQ_LENS, QUICK_SEQ_LENS = (128, 512), (128,)
BATCH, STEPS, QUICK_STEPS, LR = 4, 10, 3, 1e-3
RANK, ALPHA, TARGETS = 16, 32, "all-linear"


def _build(variant: str) -> tuple[nn.Module, nn.Module]:
    """(the module to train, the model whose parameters train)."""
    torch.manual_seed(SEED)
    model = tiny_llama(**MODEL)
    model.train()
    if variant == "full_ft":
        return model, model
    if variant.startswith("peft"):
        import peft

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS))
        return (cast(nn.Module, torch.compile(wrapped)) if variant.endswith("inductor") else wrapped), wrapped
    options = {"adapters": {"method": variant.split("_")[1], "rank": RANK, "alpha": ALPHA, "targets": TARGETS}}
    memopt.prepare(model, options)
    return cast(nn.Module, torch.compile(model, backend=MemoptBackend({**options, "codegen": "inductor"}))), model


def run_one(variant: str, seq: int, batch_size: int, steps: int, log: Callable[[str], None]) -> dict[str, Any]:
    torch._dynamo.reset()
    gc.collect()
    step_model, model = _build(variant)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, foreach=True)
    batch: dict[str, Any] = token_batch(batch_size, seq, vocab=MODEL["vocab"])
    record: dict[str, Any] = {"variant": variant, "seq_len": seq, "batch": batch_size,
                              "trainable_parameters": sum(p.numel() for p in params)}

    def tracked() -> None:
        out = step_model(**batch)                        # the output held through the backward
        out.loss.backward()

    measured = warm_track_and_time(model, step_model, batch, opt, steps, log, tracked=tracked)
    measured.pop("optimizer_state_bytes")
    record.update(measured)
    return record                       # the model goes with this frame; the next run collects it


def format_table(records: list[dict[str, Any]]) -> str:
    header = ("seq", "variant", "trainable", "peak MiB", "+step MiB", "step ms", "min ms", "1st s",
              "peak/full", "+step/peft", "time/full", "time/peft")
    rows = [header]
    for r in records:
        if "error" in r:
            rows.append((str(r["seq_len"]), r["variant"], "FAILED: " + r["error"].splitlines()[0][:60],
                         *[""] * (len(header) - 3)))
            continue

        def ratio(key: str, r: dict[str, Any] = r) -> str:
            return "" if r.get(key) is None else f"{r[key]:.3f}"

        rows.append((str(r["seq_len"]), r["variant"], f"{r['trainable_parameters']:,}",
                     f"{r['tracked_peak_bytes'] / MiB:.2f}", f"{r['tracked_peak_increase_bytes'] / MiB:.2f}",
                     f"{r['median_step_s'] * 1e3:.1f}", f"{r['min_step_s'] * 1e3:.1f}", f"{r['first_step_s']:.1f}",
                     ratio("peak_vs_full_ft"), ratio("peak_increase_vs_peft_lora_eager"),
                     ratio("time_vs_full_ft"), ratio("time_vs_peft_lora_eager")))
    return align(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__, VARIANTS, batch=BATCH)
    args = parser.parse_args(argv)
    variants = choose_names(parser, args.variants, VARIANTS, "variant")
    seq_lens = ([int(s) for s in args.seq_lens.split(",")] if args.seq_lens
                else list(QUICK_SEQ_LENS if args.quick else SEQ_LENS))
    if any(not 1 <= s <= 512 for s in seq_lens):
        parser.error("--seq-lens: the tiny Llama has 512 positions")
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    meta = run_metadata(args, seq_lens, steps)
    meta.update(benchmark=BENCHMARK, variants=variants, adapters={"rank": RANK, "alpha": ALPHA, "targets": TARGETS},
                optimizer="AdamW(foreach=True) over the trainable parameters")
    started = time.perf_counter()
    records = run_grid(seq_lens, variants, args.batch,
                       lambda variant, seq, log: run_one(variant, seq, args.batch, steps, log))
    add_ratios(records, ("full_ft", "peft_lora_eager"),
               (*RATIO_METRICS, ("peak_increase", "tracked_peak_increase_bytes")))
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    write_scalars(args.out, BENCHMARK, meta, records)
    print()
    print(format_table(records))
    print("\npeak = tracked peak of forward + backward with parameters, optimizer states and the batch live; "
          "+step = that minus what was live at entry; x/full, x/peft = ratios to full fine-tuning and to "
          "PEFT's eager LoRA at the same length.")
    print(f"wrote {args.out / (BENCHMARK + '.json')} and .csv ({meta['wall_s']:.0f} s)")
    return 0 if all("error" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
