"""How well the cost model predicts a step, before and after `memopt tune`, on this machine.

    python benchmarks/bench_cost_model.py            # full tune (about a minute), 15 timed steps per model
    python benchmarks/bench_cost_model.py --quick    # `memopt tune --quick`, 7 timed steps

For the tiny Llama and GPT-2 of the demo's size (4 layers, hidden 256, 4 x 256 tokens, AdamW's update not
timed), compiled with ``codegen="eager"`` (every node its own kernel, so that a node has a time), and for
three profiles side by side, in one process:

- ``builtin``: the shipped ``cpu`` profile (datasheet-style assumptions);
- ``tuned``: ``memopt tune`` on this machine (microbenchmarks);
- ``from_dump``: ``memopt tune --from-dump`` on the node times this very run recorded (its own calibration).

Figures: the measured median forward + backward time (unprofiled steps), each profile's predicted time for
the same graphs and its error, and the per-node median absolute percentage error against the node times
torch's profiler recorded (nodes that launch a kernel). Results: ``<out>/bench_cost_model.json``,
``.csv`` and ``.svg`` (predicted against measured per node, log-log). Step times on a shared 2-core machine
are noisy: the errors move by a few points between runs.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memopt.compiler.backend import MemoptBackend  # noqa: E402
from memopt.cost_model.estimate import estimate_node  # noqa: E402
from memopt.cost_model.profile import DeviceProfile, load_profile  # noqa: E402
from memopt.cost_model.tune import NODE_TIMES, device_name, fit, measure, samples_from_dump  # noqa: E402

BENCHMARK = "bench_cost_model"
SEED, BATCH, SEQ, LAYERS, HIDDEN = 0, 4, 256, 4, 256
WARMUP, RECORDED = 3, 3          # the first step compiles; RECORDED steps are profiled node by node


def build(name: str) -> torch.nn.Module:
    from tests.models import tiny_gpt2, tiny_llama

    torch.manual_seed(SEED)
    return (tiny_llama if name == "llama" else tiny_gpt2)(layers=LAYERS, hidden=HIDDEN).train()


def run_model(name: str, dump: Path, steps: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Compile ``name`` with node times recorded into ``dump``; time ``steps`` unprofiled steps.
    Returns the backend (its graphs), the measured median and the recorded node times."""
    torch._dynamo.reset()
    model = build(name)
    backend = MemoptBackend({"codegen": "eager", "dump_dir": str(dump), "dump_node_times": RECORDED})
    compiled = torch.compile(model, backend=backend)
    ids = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(SEED))
    times = []
    for step in range(WARMUP + RECORDED + steps):
        start = time.perf_counter()
        compiled(input_ids=ids, labels=ids).loss.backward()
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        if step >= WARMUP + RECORDED:
            times.append(elapsed)
    log(f"{name}: median forward+backward {statistics.median(times) * 1e3:.1f} ms over {steps} steps")
    nodes = [n for path in sorted(dump.glob(f"*/{NODE_TIMES}")) for n in json.loads(path.read_text())["nodes"]]
    return {"backend": backend, "measured_s": statistics.median(times), "step_times_s": times, "nodes": nodes}


def graphs_of(backend: MemoptBackend) -> list[tuple[str, torch.fx.GraphModule]]:
    return [(kind, g) for r in backend.reports for kind, g in (("forward", r.forward), ("backward", r.backward))
            if g is not None]


def predict(backend: MemoptBackend, profile: DeviceProfile) -> tuple[float, dict[tuple[str, str], float]]:
    """Predicted step time (every node of the forward and backward graphs, op by op) and per
    (graph, node)."""
    per_node = {(kind, n.name): estimate_node(n, profile).time_s
                for kind, g in graphs_of(backend) for n in g.graph.nodes}
    return sum(per_node.values()), per_node


def node_mape(nodes: Sequence[dict[str, Any]], predicted: dict[tuple[str, str], float]) -> float:
    """Median absolute percentage error over the nodes that launch a kernel."""
    errors = [abs(predicted[n["graph"], n["name"]] - n["seconds"]) / n["seconds"]
              for n in nodes if n["op_class"] != "none" and n["seconds"] > 0]
    return statistics.median(errors)


def evaluate(run: dict[str, Any], profiles: dict[str, DeviceProfile]) -> list[dict[str, Any]]:
    rows = []
    for label, profile in profiles.items():
        total, per_node = predict(run["backend"], profile)
        rows.append({"profile": label, "measured_s": run["measured_s"], "predicted_s": total,
                     "error": total / run["measured_s"] - 1.0, "node_mape": node_mape(run["nodes"], per_node),
                     "nodes_timed": sum(1 for n in run["nodes"] if n["op_class"] != "none")})
    return rows


def tune_here(quick: bool, log: Callable[[str], None]) -> tuple[DeviceProfile, float]:
    start = time.perf_counter()
    samples = measure("cpu", quick=quick)
    seconds = time.perf_counter() - start
    log(f"memopt tune{' --quick' if quick else ''}: {len(samples)} measurements in {seconds:.1f} s")
    return fit(samples, load_profile("cpu"), name="tuned", device=device_name("cpu"),
               source="memopt tune (bench_cost_model)"), seconds


def scatter_svg(points: dict[str, list[tuple[float, float]]], title: str) -> str:
    """Predicted against measured seconds per node, log-log, one colour per profile, the diagonal dashed."""
    import math

    size, pad = 420, 50
    values = [v for pts in points.values() for p in pts for v in p if v > 0]
    lo, hi = math.log10(min(values)), math.log10(max(values))

    def xy(v: float) -> float:
        return pad + (size - 2 * pad) * (math.log10(max(v, 10 ** lo)) - lo) / max(hi - lo, 1e-9)

    colours = ("#1f77b4", "#d62728", "#2ca02c")
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" font-family="sans-serif" '
           'font-size="11">', f'<text x="{pad}" y="20" font-size="13">{title}</text>',
           f'<line x1="{pad}" y1="{size - pad}" x2="{size - pad}" y2="{pad}" stroke="#888" stroke-dasharray="4,3"/>',
           f'<text x="{size / 2}" y="{size - 12}" text-anchor="middle">measured per node (log)</text>',
           f'<text x="14" y="{size / 2}" transform="rotate(-90 14 {size / 2})" text-anchor="middle">'
           'predicted (log)</text>']
    for decade in range(math.ceil(lo), math.floor(hi) + 1):
        at, text = xy(10.0 ** decade), _seconds_label(10.0 ** decade)
        out += [f'<text x="{at:.1f}" y="{size - pad + 14}" text-anchor="middle">{text}</text>',
                f'<text x="{pad - 4}" y="{size - at + 4:.1f}" text-anchor="end">{text}</text>',
                f'<line x1="{at:.1f}" y1="{size - pad}" x2="{at:.1f}" y2="{size - pad + 4}" stroke="#000"/>']
    for index, (label, pts) in enumerate(points.items()):
        colour = colours[index % len(colours)]
        out += [f'<circle cx="{xy(m):.1f}" cy="{size - xy(p):.1f}" r="1.6" fill="{colour}" fill-opacity="0.5"/>'
                for m, p in pts if m > 0 and p > 0]
        out.append(f'<text x="{pad + 6}" y="{pad + 14 * index}" fill="{colour}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _seconds_label(value: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if value >= scale:
            return f"{value / scale:g} {unit}"
    return f"{value * 1e9:g} ns"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="memopt tune --quick, fewer timed steps")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    log = lambda message: print(message, flush=True)  # noqa: E731
    tuned, tune_s = tune_here(args.quick, log)
    steps = 7 if args.quick else 15
    results, scatter = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("llama", "gpt2"):
            run = run_model(name, Path(tmp) / name, steps, log)
            samples, _ = samples_from_dump(Path(tmp) / name)
            from_dump = fit(samples, load_profile("cpu"), name="from_dump", device=device_name("cpu"),
                            source="memopt tune --from-dump (bench_cost_model)")
            profiles = {"builtin": load_profile("cpu"), "tuned": tuned, "from_dump": from_dump}
            for row in evaluate(run, profiles):
                results.append({"model": name, **row})
                log(f"  {name:6} {row['profile']:10} predicted {row['predicted_s'] * 1e3:7.1f} ms, measured "
                    f"{row['measured_s'] * 1e3:7.1f} ms: error {row['error']:+.1%}, per-node MAPE {row['node_mape']:.1%}")
            for label in ("builtin", "tuned"):
                per_node = predict(run["backend"], profiles[label])[1]
                scatter.setdefault(label, []).extend(
                    (n["seconds"], per_node[n["graph"], n["name"]]) for n in run["nodes"] if n["op_class"] != "none")
    meta = {"benchmark": BENCHMARK, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(), "device": device_name("cpu"),
            "model": {"layers": LAYERS, "hidden": HIDDEN, "batch": BATCH, "seq": SEQ, "codegen": "eager"},
            "quick": args.quick, "tune_seconds": tune_s, "timed_steps": steps, "tuned_profile": json.loads(
                __import__("memopt").cost_model.profile_to_json(tuned))}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{BENCHMARK}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    with (args.out / f"{BENCHMARK}.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["model", "profile", "measured_s", "predicted_s", "error",
                                                    "node_mape", "nodes_timed"])
        writer.writeheader()
        writer.writerows(results)
    (args.out / f"{BENCHMARK}.svg").write_text(scatter_svg(scatter, "per-node time, tiny Llama and GPT-2 (CPU)"))
    log(f"wrote {args.out / BENCHMARK}.json, .csv and .svg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
