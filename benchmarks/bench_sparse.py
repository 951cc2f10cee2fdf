"""Sparse backprop: tracked peak, saved activation bytes and CPU step time of fine-tuning a tiny Llama
seven ways, side by side in one process.

    python benchmarks/bench_sparse.py                 # seq 128 and 512, a few minutes on a 2-core CPU
    python benchmarks/bench_sparse.py --quick         # seq 128 only, 3 timed steps

Variants (the tiny Llama of bench_memory.py: 4 layers, hidden 128, MLP 256, vocabulary 256; batch 4;
AdamW over the trainable parameters; every variant compiled with ``backend=MemoptBackend(options)``,
Inductor code generation, no budget):

- ``full_ft``: every parameter trains;
- ``lora_r16``: LoRA rank 16, alpha 32, on every linear but the head (``memopt.prepare``);
- ``bias_only``: the same model built with biases on its linears (``attention_bias``, ``mlp_bias``),
  every linear training its bias only (``{"*_proj.weight": "bias"}``), everything else frozen: TTE's
  bias-only update (Llama has no ReLU, so no activation becomes a mask);
- ``s2ft_columns``: a quarter of each MLP down projection's input columns, everything else frozen
  (S2FT's and PaCA's idea, as ``{"*.mlp.down_proj.weight": {"columns": 0.25}}``);
- ``lisa``: two of the four blocks trained whole at a time (``{"layers": {"sample": 2, "every": 50}}``),
  embeddings and head always, as LISA does; no redraw happens within the measured steps;
- ``lisa_blocks``: the same, compiled block by block (``memopt.compile_blocks``, the bounded-recompile way
  to run LISA; embeddings, head and loss eager). Its saved bytes are not one graph's and are left out;
- ``auto``: ``sparse_backprop: "auto"`` under half of full fine-tuning's planned step peak (AdamW states
  included), chosen by ``memopt.prepare(..., example_inputs=batch)``.

Each variant: a fresh model from seed 0, two warm-up steps (the first compiles; recompiling later is an
error), one tracked forward + backward under ``memopt.track_memory("cpu")``, then timed steps. Results go
to ``<out>/bench_sparse.json``, ``.csv`` and ``.svg`` (a bar chart of saved activations and tracked peak
increase per variant). Step times on a shared 2-core machine are noisy: quote ratios.
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

from bench_memory import (
    MODEL,
    SEED,
    MiB,
    add_ratios,
    align,
    bench_parser,
    choose_names,
    fresh_plan_cache,
    run_grid,
    run_metadata,
    warm_track_and_time,
    write_scalars,
)

import memopt
from memopt.compiler.backend import MemoptBackend
from memopt.sparse import sparse_decisions
from tests.models import token_batch

BENCHMARK = "bench_sparse"
OPTIONS: dict[str, dict[str, Any]] = {
    "full_ft": {},
    "lora_r16": {"adapters": {"method": "lora", "rank": 16, "alpha": 32, "targets": "all-linear"}},
    "bias_only": {"sparse_backprop": {"*_proj.weight": "bias"}},
    "s2ft_columns": {"sparse_backprop": {"*.mlp.down_proj.weight": {"columns": 0.25}}},
    "lisa": {"sparse_backprop": {"model.layers.*": {"train": "full", "layers": {"sample": 2, "every": 50}},
                                 "model.embed_tokens.weight": "full", "lm_head.weight": "full"}},
}
OPTIONS["lisa_blocks"] = OPTIONS["lisa"]
OPTIONS["auto"] = {"sparse_backprop": "auto"}
AUTO_SHARE = 0.5                # auto's budget: this share of full fine-tuning's planned step peak
VARIANTS = tuple(OPTIONS)
SEQ_LENS, QUICK_SEQ_LENS = (128, 512), (128,)
BATCH, STEPS, QUICK_STEPS, LR = 4, 10, 3, 1e-3


def _model(variant: str) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = MODEL["hidden"]
    config = LlamaConfig(vocab_size=MODEL["vocab"], hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=MODEL["layers"], num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, attn_implementation="sdpa",
                         attention_bias=variant == "bias_only", mlp_bias=variant == "bias_only")
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config).train()


def _auto_budget(variant: str, batch: dict[str, Any]) -> int:
    """Half of full fine-tuning's step peak, as ``memopt plan`` measures it on a fake copy."""
    from memopt.plan import plan
    from memopt.sparse_auto import fake_copy

    fake, inputs = fake_copy(_model(variant), batch)
    return int(AUTO_SHARE * plan(fake, inputs, {"codegen": "inductor"}).peak_bytes)


def _compiled(variant: str, model: nn.Module, batch: dict[str, Any], log: Callable[[str], None],
              ) -> tuple[nn.Module, MemoptBackend, dict[str, Any]]:
    """The prepared, compiled model, its backend, and what the row records of the preparation."""
    options, extra = OPTIONS[variant], {}
    if variant == "auto":
        extra["auto_budget_bytes"] = budget = _auto_budget(variant, batch)
        memopt.prepare(model, {**options, "memory_budget": budget}, example_inputs=batch, progress=log)
        choice = sparse_decisions(model).auto                                    # type: ignore[union-attr]
        extra.update(auto_choice=choice.policy, auto_planned_peak_bytes=choice.chosen.peak_bytes)
        log(choice.summary())
    elif options:
        memopt.prepare(model, options)
    if variant == "lisa_blocks":
        memopt.compile_blocks(model, {"codegen": "inductor"})
        return model, model._memopt_blockwise, extra                         # type: ignore[return-value]
    backend = MemoptBackend({**options, "codegen": "inductor"})
    return cast(nn.Module, torch.compile(model, backend=backend)), backend, extra


def run_one(variant: str, seq: int, batch_size: int, steps: int, log: Callable[[str], None]) -> dict[str, Any]:
    torch._dynamo.reset()
    gc.collect()
    model = _model(variant)
    batch: dict[str, Any] = token_batch(batch_size, seq, vocab=MODEL["vocab"])
    step_model, backend, extra = _compiled(variant, model, batch, log)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, foreach=True)
    record: dict[str, Any] = {"variant": variant, "seq_len": seq, "batch": batch_size,
                              "trainable_parameters": sum(p.numel() for p in params), **extra}

    def tracked() -> None:
        step_model(**batch).loss.backward()

    record.update(warm_track_and_time(model, step_model, batch, opt, steps, log, tracked=tracked))
    memory = backend.reports[-1].memory if variant != "lisa_blocks" else None
    record["saved_activation_bytes"] = memory.saved_activation_bytes if memory is not None else None
    record["compiled_graphs"] = len(backend.reports)
    return record


def format_table(records: list[dict[str, Any]]) -> str:
    header = ("seq", "variant", "trainable", "saved MiB", "peak MiB", "+step MiB", "step ms",
              "saved/full", "peak/full", "time/full", "time/lora")
    rows = [header]
    for r in records:
        if "error" in r:
            rows.append((str(r["seq_len"]), r["variant"], "FAILED: " + r["error"].splitlines()[0][:60],
                         *[""] * (len(header) - 3)))
            continue

        def ratio(key: str, r: dict[str, Any] = r) -> str:
            return "" if r.get(key) is None else f"{r[key]:.3f}"

        saved = r["saved_activation_bytes"]
        rows.append((str(r["seq_len"]), r["variant"], f"{r['trainable_parameters']:,}",
                     "" if saved is None else f"{saved / MiB:.2f}", f"{r['tracked_peak_bytes'] / MiB:.2f}",
                     f"{r['tracked_peak_increase_bytes'] / MiB:.2f}", f"{r['median_step_s'] * 1e3:.1f}",
                     ratio("saved_vs_full_ft"), ratio("peak_vs_full_ft"), ratio("time_vs_full_ft"),
                     ratio("time_vs_lora_r16")))
    return align(rows)


def bar_chart(records: list[dict[str, Any]]) -> str:
    """SVG: per sequence length, saved activations and tracked peak increase (MiB) per variant."""
    good = [r for r in records if "error" not in r]
    seqs = sorted({r["seq_len"] for r in good})
    metrics = (("saved_activation_bytes", "saved activations", "#4c72b0"),
               ("tracked_peak_increase_bytes", "tracked peak increase", "#dd8452"))
    top = max((r[m] or 0 for r in good for m, _, _ in metrics), default=1) / MiB
    width, panel, bar, left = 760, 230, 14, 120
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{40 + panel * len(seqs)}" '
           'font-family="sans-serif" font-size="11">',
           '<text x="10" y="18" font-size="13">bench_sparse: tiny Llama, batch 4, MiB (CPU, tracked)</text>']
    for (i, (_, label, color)) in enumerate(metrics):
        out.append(f'<rect x="{430 + 170 * i}" y="8" width="10" height="10" fill="{color}"/>'
                   f'<text x="{444 + 170 * i}" y="17">{label}</text>')
    for p, seq in enumerate(seqs):
        y0 = 40 + p * panel
        out.append(f'<text x="10" y="{y0 + 12}" font-weight="bold">seq {seq}</text>')
        for v, r in enumerate(r for r in good if r["seq_len"] == seq):
            y = y0 + 22 + v * 2 * (bar + 6)
            out.append(f'<text x="10" y="{y + bar + 4}">{r["variant"]}</text>')
            for m, (key, _, color) in enumerate(metrics):
                if r[key] is None:
                    continue
                length = (width - left - 90) * r[key] / MiB / top
                yy = y + m * (bar + 1)
                out.append(f'<rect x="{left}" y="{yy}" width="{length:.1f}" height="{bar}" fill="{color}"/>'
                           f'<text x="{left + length + 4:.1f}" y="{yy + 11}">{r[key] / MiB:.2f}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__, VARIANTS, batch=BATCH)
    args = parser.parse_args(argv)
    fresh_plan_cache()
    variants = choose_names(parser, args.variants, VARIANTS, "variant")
    seq_lens = ([int(s) for s in args.seq_lens.split(",")] if args.seq_lens
                else list(QUICK_SEQ_LENS if args.quick else SEQ_LENS))
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    meta = run_metadata(args, seq_lens, steps)
    meta.update(benchmark=BENCHMARK, variants=variants, options={v: OPTIONS[v] for v in variants},
                optimizer="AdamW(foreach=True) over the trainable parameters")
    started = time.perf_counter()
    records = run_grid(seq_lens, variants, args.batch,
                       lambda variant, seq, log: run_one(variant, seq, args.batch, steps, log))
    add_ratios(records, ("full_ft", "lora_r16"), (("peak", "tracked_peak_bytes"), ("time", "median_step_s"),
                                                  ("saved", "saved_activation_bytes")))
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    write_scalars(args.out, BENCHMARK, meta, records)
    (args.out / f"{BENCHMARK}.svg").write_text(bar_chart(records))
    print()
    print(format_table(records))
    print("\nsaved = activation bytes the forward leaves for the backward (memopt's simulation); peak = tracked "
          "peak of forward + backward with parameters, optimizer states and the batch live; +step = that minus "
          "what was live at entry; x/full, x/lora = ratios to full fine-tuning and to LoRA r16.")
    print(f"wrote {args.out / (BENCHMARK + '.json')}, .csv and .svg ({meta['wall_s']:.0f} s)")
    return 0 if all("error" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
