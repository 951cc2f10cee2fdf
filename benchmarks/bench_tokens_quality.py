"""Token elimination's quality on real text: LoRA fine-tuning, dense against keep 0.4 from the middle layer.

    python benchmarks/bench_tokens_quality.py            # about 5 minutes on 2 cores
    python benchmarks/bench_tokens_quality.py --quick    # 50 fine-tuning steps, 100 of pretraining

The experiment of :mod:`tests.token_quality` (which tests/test_token_quality.py holds to its bounds): a
tiny Llama (8 layers, hidden 128, vocabulary 256) pretrained densely on the first half of the standard
library's docstrings at 256 bytes, then fine-tuned with LoRA (rank 8, every linear) for 200 steps at 1024
bytes on the second half, densely and with ``token_elimination`` (keep 0.4, blocks of 64), from the same
weights and batches. Written: ``<out>/bench_tokens_quality.json`` (settings, losses, held-out losses,
the scorer's recall and coverage per layer), ``.csv`` (the loss of every step of both runs) and ``.svg``
(both loss curves).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_memory import REPO_ROOT, align  # noqa: E402

from tests.token_quality import Setting, run  # noqa: E402

BENCHMARK = "bench_tokens_quality"


def loss_chart(result: dict[str, Any], smooth: int = 10) -> str:
    """SVG: both runs' training loss (a running mean over ``smooth`` steps), held-out losses in the legend."""
    width, height, left, top = 640, 300, 50, 40
    curves = {name: result[name]["losses"] for name in ("dense", "eliminated")}
    smoothed = {name: [sum(v[max(0, i - smooth + 1):i + 1]) / len(v[max(0, i - smooth + 1):i + 1])
                       for i in range(len(v))] for name, v in curves.items()}
    low = min(min(v) for v in smoothed.values())
    high = max(max(v) for v in smoothed.values())
    steps = max(len(v) for v in smoothed.values())
    colors = {"dense": "#4c72b0", "eliminated": "#dd8452"}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 60}" '
           'font-family="sans-serif" font-size="11">',
           f'<text x="10" y="18" font-size="13">LoRA fine-tuning loss ({smooth}-step mean): dense and token '
           'elimination (keep 0.4)</text>',
           f'<text x="{left}" y="{top + height + 15}">step 1</text>',
           f'<text x="{width - 60}" y="{top + height + 15}">step {steps}</text>',
           f'<text x="4" y="{top + 10}">{high:.2f}</text>', f'<text x="4" y="{top + height}">{low:.2f}</text>']
    for row, (name, values) in enumerate(smoothed.items()):
        xy = [(left + (width - left - 10) * i / max(steps - 1, 1),
               top + height * (1 - (v - low) / ((high - low) or 1.0))) for i, v in enumerate(values)]
        out.append(f'<polyline fill="none" stroke="{colors[name]}" stroke-width="1.5" points="'
                   + " ".join(f"{x:.1f},{y:.1f}" for x, y in xy) + '"/>')
        out.append(f'<text x="{width - 260}" y="{top + 14 * row}" fill="{colors[name]}">{name}: held-out '
                   f'{result[name]["held_out"]:.4f}, last {result["setting"]["tail"]} steps '
                   f'{result[name]["final"]:.4f}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{BENCHMARK}.json").write_text(json.dumps(result, indent=2) + "\n")
    with (out / f"{BENCHMARK}.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "dense_loss", "eliminated_loss"])
        for step, pair in enumerate(zip(result["dense"]["losses"], result["eliminated"]["losses"]), 1):
            writer.writerow([step, *pair])
    (out / f"{BENCHMARK}.svg").write_text(loss_chart(result))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    setting = Setting(steps=50, pretrain_steps=100, tail=10) if args.quick else Setting()
    began = time.perf_counter()
    result = run(setting)
    result["wall_s"] = round(time.perf_counter() - began, 1)
    result["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write(args.out, result)
    scorer = result["scorer"]
    rows = [("", "final train loss", "held-out loss")]
    rows += [(name, f"{result[name]['final']:.4f}", f"{result[name]['held_out']:.4f}")
             for name in ("dense", "eliminated")]
    rows.append(("eliminated/dense", f"{result['final_ratio']:.4f}", f"{result['held_out_ratio']:.4f}"))
    print()
    print(align(rows, text_columns=1))
    print(f"base held-out loss {result['base_held_out']:.4f}; scorer on layers {scorer['layers']}: recall "
          f"{scorer['mean_recall']:.3f}, coverage {scorer['mean_coverage']:.4f} (LeMo's block scores from the "
          f"full q and k: {scorer['mean_lemo_recall']:.3f}, {scorer['mean_lemo_coverage']:.4f}; earliest blocks: "
          f"{scorer['mean_earliest_recall']:.3f}, {scorer['mean_earliest_coverage']:.4f})")
    print(f"wrote {args.out / BENCHMARK}.json, .csv and .svg ({result['wall_s']:.0f} s); "
          f"setting {dataclasses.asdict(setting)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
