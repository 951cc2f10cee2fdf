"""Peak memory and step time of a tiny-Llama training step: eager, Inductor, Inductor with PyTorch's
activation-memory budget, and memopt, all in one process.

    python benchmarks/bench_memory.py                 # the full run (~3 min on an idle 2-core CPU)
    python benchmarks/bench_memory.py --quick         # smoke run: one short sequence, few steps
    python benchmarks/bench_memory.py --variants eager,memopt_eager --seq-lens 128 --steps 5

For every variant and sequence length it builds a fresh model from the same seed and an AdamW (foreach)
optimizer, then:

1. warm-up steps (the first compiles), each forward + backward + optimizer step + zero_grad;
2. one *tracked* step, forward + backward under ``memopt.track_memory()`` (parameters, optimizer states
   and the batch are live at entry; gradients are made inside the step);
3. ``--steps`` *timed* steps of forward + backward + optimizer step + zero_grad; the median (and the
   minimum, which suffers less when other processes share the CPU) is reported.

Per row it records the tracked peak (absolute, baseline included) and its increase over the baseline;
for memopt variants the simulated peak of the same step (``GraphReport.simulate`` with the optimizer's
state bytes as resident) and the simulated/tracked ratio; for every compiled variant the bytes the
forward saves for the backward (see Note [Measuring saved activations]); the median step time; and the
wall time of the first step, which includes compilation. Results go to ``<out>/bench_memory.csv``
(long format, one row per variant x sequence length x metric) and ``<out>/bench_memory.json`` (run
metadata and one record per variant x sequence length), and a side-by-side table is printed.

Note [Isolating the variants]
Three things would otherwise leak from one variant into the next:
- Dynamo's cache of compiled frames. A second ``torch.compile`` of a fresh model of the same class reuses
  the first one's graph (parameters are graph inputs, so the guards pass) and the activation-memory
  budget then has no effect: measured on torch 2.13, budget 0.5 after plain Inductor without a reset gave
  the same peak to the byte. ``torch._dynamo.reset()`` runs before every variant.
- Inductor's FX graph cache and AOTAutograd's cache, on disk. They are switched off for the whole run, so
  every variant partitions and compiles its graphs from scratch and the budget and the partition hooks
  always run. Inductor's kernel cache stays on: a variant whose kernels an earlier one already built
  (memopt_inductor after inductor, while memopt's partition equals Inductor's) compiles faster, so the
  first-step times are rough.
- Tensors of the previous variant. The CPU tracker's baseline counts every live CPU tensor, so the
  previous model and optimizer are dropped and collected first; a baseline that differs from the
  expected resident bytes (parameters + buffers + optimizer states + batch) is flagged.

Note [Measuring saved activations]
"Saved activations" are the unique storages the partitioned forward hands to the backward, not counting
those of parameters and inputs (memopt's simulator's ``saved_activation_bytes``). For memopt it comes
from the backend's report. For the Inductor variants it comes from the same simulator run on the graphs
that Inductor's default partitioner produced; the benchmark obtains them through Inductor's public
``custom_partitioner_fn`` hook with a wrapper that calls ``min_cut_rematerialization_partition`` with
exactly the arguments Inductor passes it, so the partition is unchanged. Eager has no partition.
The Inductor variants' simulated *peak* is not reported: the simulator models memopt's graphs.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import gc
import json
import os
import tempfile
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

# The tiny models live in the test suite; put the repo root on the path so the script runs from anywhere.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from memopt.compiler.backend import MemoptBackend
from memopt.runtime.tracker import track_memory
from tests.models import hf_loss, tiny_llama, token_batch

MiB = 1 << 20

# A larger tiny Llama than the tests' (2 layers, hidden 64), so that activations dominate parameters
# and allocator noise: at batch 4 x 512 tokens one step saves ~65 MiB against 2.5 MiB of parameters.
MODEL = {"layers": 4, "hidden": 128, "vocab": 256}
BATCH = 4
SEQ_LENS = (128, 512)            # tiny_llama allows at most 512 positions
QUICK_SEQ_LENS = (64,)
STEPS, QUICK_STEPS = 10, 3
WARMUP_STEPS = 2                 # the first compiles; the second checks that nothing recompiles
SEED = 0
LR = 1e-3


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    backend: str                       # "eager" | "inductor" | "memopt"
    budget: float | None = None        # torch._functorch.config.activation_memory_budget (inductor)
    codegen: str | None = None         # memopt's code generator


VARIANTS: tuple[Variant, ...] = (
    Variant("eager", "eager"),
    Variant("inductor", "inductor"),
    Variant("inductor_budget_0.5", "inductor", budget=0.5),
    Variant("inductor_budget_0.25", "inductor", budget=0.25),
    Variant("memopt_eager", "memopt", codegen="eager"),
    Variant("memopt_inductor", "memopt", codegen="inductor"),
)

# (metric, unit) in the order the CSV lists them; a record's missing metric is left out of the CSV.
METRICS: tuple[tuple[str, str], ...] = (
    ("tracked_peak_bytes", "bytes"),
    ("tracked_baseline_bytes", "bytes"),
    ("tracked_peak_increase_bytes", "bytes"),
    ("simulated_peak_bytes", "bytes"),
    ("sim_over_tracked", "ratio"),
    ("saved_activation_bytes", "bytes"),
    ("median_step_s", "s"),
    ("min_step_s", "s"),
    ("first_step_s", "s"),
    ("predicted_fwd_bwd_s", "s"),
    ("peak_vs_eager", "ratio"),
    ("peak_vs_inductor", "ratio"),
    ("time_vs_eager", "ratio"),
    ("time_vs_inductor", "ratio"),
)


# --------------------------------------------------------------------------------------------------------
# Saved activations of Inductor's own partition (Note [Measuring saved activations])
# --------------------------------------------------------------------------------------------------------


def _probe_class() -> type:
    # Inductor is imported only when a compiled variant runs.
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.custom_graph_pass import CustomPartitionerFn

    from memopt.schedule.simulate import simulate_step

    class SavedActivationProbe(CustomPartitionerFn):
        """Inductor's default partitioner, unchanged, noting how many bytes each forward saves.

        It keeps only integers: Inductor deep-copies its config, this hook included, for cache keys.
        """

        def __init__(self) -> None:
            self.saved_bytes: list[int] = []

        def __call__(self, gm: torch.fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any,
                     ) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
            fw, bw = min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)
            primals = joint_inputs[0] if joint_inputs and isinstance(joint_inputs[0], (list, tuple)) else []
            kinds = ["parameter" if isinstance(p, torch.Tensor) and p.requires_grad else "input"
                     for p in primals]
            fw_placeholders = [n for n in fw.graph.nodes if n.op == "placeholder"]
            if len(kinds) != len(fw_placeholders):
                # The forward's inputs are the primals; anything else means the partition differs from
                # what this probe understands, and a wrong figure is worse than none.
                self.saved_bytes.append(-1)
            else:
                timeline = simulate_step(fw, bw, input_kinds=kinds,
                                         num_user_outputs=int(kwargs["num_fwd_outputs"]))
                self.saved_bytes.append(timeline.saved_activation_bytes)
            return fw, bw

        def uuid(self) -> Any | None:
            return None

    return SavedActivationProbe


# --------------------------------------------------------------------------------------------------------
# One variant at one sequence length
# --------------------------------------------------------------------------------------------------------


def _storage_bytes(tensors: Iterator[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return _storage_bytes(t for state in opt.state.values() for t in state.values()
                          if isinstance(t, torch.Tensor))


def _train_step(model: nn.Module, batch: dict[str, Any], opt: torch.optim.Optimizer) -> None:
    loss, _ = hf_loss(model, batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _compile(variant: Variant, model: nn.Module) -> tuple[nn.Module, MemoptBackend | None, Any]:
    """The module to train (compiled or not), memopt's backend object, and the partition probe."""
    if variant.backend == "eager":
        return model, None, None
    if variant.backend == "memopt":
        backend = MemoptBackend({"codegen": variant.codegen})
        return cast(nn.Module, torch.compile(model, backend=backend)), backend, None
    probe = _probe_class()()
    return cast(nn.Module, torch.compile(model)), None, probe


@contextlib.contextmanager
def _variant_config(variant: Variant, probe: Any) -> Iterator[None]:
    """Settings that must hold while the variant compiles, which is lazily, at its first step."""
    with contextlib.ExitStack() as stack:
        if variant.budget is not None:
            stack.enter_context(torch._functorch.config.patch(activation_memory_budget=variant.budget))
        if probe is not None:
            stack.enter_context(torch._inductor.config.patch(custom_partitioner_fn=probe))
        yield


def track_and_time(model: nn.Module, batch: dict[str, Any], opt: torch.optim.Optimizer, steps: int,
                   log: Callable[[str], None], *, tracked: Callable[[], None],
                   train_step: Callable[[], None]) -> dict[str, Any]:
    """After the warm-up: one tracked forward + backward (``tracked``; parameters, optimizer states
    and the batch live at entry), one optimizer step, then ``steps`` timed ``train_step`` calls, with
    recompilation an error. Returns the record's memory and time fields."""
    # From here on a recompilation would measure a different program: make it an error.
    with torch._dynamo.config.patch(error_on_recompile=True):
        state_bytes = _optimizer_state_bytes(opt)
        resident = (_storage_bytes(iter([*model.parameters(), *model.buffers()])) + state_bytes
                    + _storage_bytes(v for v in batch.values() if isinstance(v, torch.Tensor)))
        gc.collect()
        log("tracked step")
        with track_memory("cpu") as mem:
            tracked()
        opt.step()
        opt.zero_grad(set_to_none=True)
        log(f"{steps} timed steps")
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            train_step()
            times.append(time.perf_counter() - start)
    return {"tracked_peak_bytes": mem.peak_bytes, "tracked_baseline_bytes": mem.baseline_bytes,
            "tracked_peak_increase_bytes": mem.peak_increase_bytes, "resident_bytes": resident,
            "optimizer_state_bytes": state_bytes, "median_step_s": statistics.median(times),
            "min_step_s": min(times), "step_times_s": times}


def train_step(step_model: nn.Module, batch: dict[str, Any], opt: torch.optim.Optimizer) -> None:
    """Forward, backward and the optimizer's update of a model that returns ``.loss``."""
    step_model(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def warm_track_and_time(model: nn.Module, step_model: nn.Module, batch: dict[str, Any], opt: torch.optim.Optimizer,
                        steps: int, log: Callable[[str], None], *, tracked: Callable[[], None]) -> dict[str, Any]:
    """``WARMUP_STEPS`` training steps (the first, timed, compiles), then :func:`track_and_time`; the
    record's ``first_step_s`` and memory and time fields."""
    log("warming up")
    start = time.perf_counter()
    train_step(step_model, batch, opt)
    record: dict[str, Any] = {"first_step_s": time.perf_counter() - start}
    for _ in range(WARMUP_STEPS - 1):
        train_step(step_model, batch, opt)
    record.update(track_and_time(model, batch, opt, steps, log, tracked=tracked,
                                 train_step=lambda: train_step(step_model, batch, opt)))
    return record


def run_one(variant: Variant, seq: int, batch_size: int, steps: int,
            log: Callable[[str], None]) -> dict[str, Any]:
    """Measure one variant at one sequence length; returns its record (metrics in bytes and seconds)."""
    torch._dynamo.reset()           # Note [Isolating the variants]
    gc.collect()
    torch.manual_seed(SEED)
    model = tiny_llama(**MODEL)
    model.train()
    batch: dict[str, Any] = token_batch(batch_size, seq, vocab=MODEL["vocab"])
    opt = torch.optim.AdamW(model.parameters(), lr=LR, foreach=True)
    compiled, backend, probe = _compile(variant, model)
    record: dict[str, Any] = {"variant": variant.name, "seq_len": seq, "batch": batch_size}

    with _variant_config(variant, probe):
        log("compiling and warming up" if variant.backend != "eager" else "warming up")
        start = time.perf_counter()
        _train_step(compiled, batch, opt)
        record["first_step_s"] = time.perf_counter() - start
        for _ in range(WARMUP_STEPS - 1):
            _train_step(compiled, batch, opt)

        def tracked() -> None:
            loss, _logits = hf_loss(compiled, batch)    # the output held through the backward
            loss.backward()

        measured = track_and_time(model, batch, opt, steps, log, tracked=tracked,
                                  train_step=lambda: _train_step(compiled, batch, opt))
    state_bytes, resident = measured.pop("optimizer_state_bytes"), measured["resident_bytes"]
    record.update(measured)
    mem_baseline = measured["tracked_baseline_bytes"]
    if abs(mem_baseline - resident) > MiB:
        record.setdefault("notes", []).append(
            f"tracker baseline {mem_baseline} B differs from the expected resident {resident} B: "
            "tensors from outside this variant were live")

    if backend is not None:
        record["graphs"] = len(backend.reports)
        if len(backend.reports) == 1:
            report = backend.reports[0]
            timeline = report.simulate({"optimizer_states": state_bytes})
            record.update(simulated_peak_bytes=timeline.peak_bytes,
                          sim_over_tracked=timeline.peak_bytes / record["tracked_peak_bytes"],
                          saved_activation_bytes=timeline.saved_activation_bytes,
                          simulated_peak_at=f"{timeline.peak_phase}:{timeline.peak_node}",
                          simulated_breakdown={k: v for k, v in timeline.breakdown.items() if v},
                          predicted_fwd_bwd_s=report.predicted_time_s)
        else:
            # A step split over several graphs is not one simulation; summing peaks would be wrong.
            record.setdefault("notes", []).append(
                f"{len(backend.reports)} graphs (graph breaks): no simulated peak")
    if probe is not None:
        record["graphs"] = len(probe.saved_bytes)
        if len(probe.saved_bytes) == 1 and probe.saved_bytes[0] >= 0:
            record["saved_activation_bytes"] = probe.saved_bytes[0]
        else:
            record.setdefault("notes", []).append(
                f"saved activations not measured ({len(probe.saved_bytes)} partitions)")
    return record                       # the model goes with this frame; the next run collects it


# --------------------------------------------------------------------------------------------------------
# Ratios, output files, table
# --------------------------------------------------------------------------------------------------------


RATIO_METRICS = (("peak", "tracked_peak_bytes"), ("time", "median_step_s"))


def add_ratios(records: list[dict[str, Any]], refs: Sequence[str] = ("eager", "inductor"),
               metrics: Sequence[tuple[str, str]] = RATIO_METRICS) -> None:
    """``<name>_vs_<ref>``: each metric relative to the variant ``ref`` at the same length (by default
    the tracked peak and median step time relative to eager and to plain Inductor)."""
    by_key = {(r["variant"], r["seq_len"]): r for r in records if "error" not in r}
    for r in by_key.values():
        for ref in refs:
            base = by_key.get((ref, r["seq_len"]))
            if base is None:
                continue
            for name, key in metrics:
                if r.get(key) is not None and base.get(key):
                    r[f"{name}_vs_{ref}"] = r[key] / base[key]


def fresh_plan_cache() -> None:
    """Benchmarks measure planning: each run plans in an empty plan cache of its own (Note [The plan
    cache] in memopt/compiler/plan_cache.py), and leaves the user's alone."""
    os.environ["MEMOPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="memopt-bench-")


def run_metadata(args: argparse.Namespace, seq_lens: Sequence[int], steps: int) -> dict[str, Any]:
    import transformers

    import memopt

    return {
        "benchmark": "bench_memory",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "memopt": memopt.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "model": {"name": "tiny_llama", **MODEL},
        "batch": args.batch,
        "seq_lens": list(seq_lens),
        "warmup_steps": WARMUP_STEPS,
        "timed_steps": steps,
        "optimizer": "AdamW(foreach=True)",
        "quick": args.quick,
        "caches": "Inductor FX graph cache and AOTAutograd cache off",
    }


def write_results(out: Path, meta: dict[str, Any], records: list[dict[str, Any]]) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / "bench_memory.json", out / "bench_memory.csv"
    json_path.write_text(json.dumps({"meta": meta, "results": records}, indent=2) + "\n")
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["benchmark", "variant", "seq_len", "batch", "metric", "unit", "value",
                         "torch_version", "date"])
        for r in records:
            if "error" in r:
                writer.writerow(["bench_memory", r["variant"], r["seq_len"], r["batch"], "error", "",
                                 r["error"], meta["torch"], meta["date"]])
                continue
            for metric, unit in METRICS:
                if r.get(metric) is not None:
                    writer.writerow(["bench_memory", r["variant"], r["seq_len"], r["batch"], metric, unit,
                                     r[metric], meta["torch"], meta["date"]])
    return csv_path, json_path


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def format_table(records: list[dict[str, Any]]) -> str:
    header = ("variant", "seq", "peak MiB", "+step MiB", "sim MiB", "sim/trk", "saved MiB",
              "pk/eager", "pk/ind", "step ms", "min ms", "t/eager", "t/ind", "1st s")
    rows = [header]
    for r in records:
        if "error" in r:
            rows.append((r["variant"], str(r["seq_len"]), "FAILED: " + r["error"].splitlines()[0][:80],
                         *[""] * (len(header) - 3)))
            continue
        mib = lambda key: None if r.get(key) is None else r[key] / MiB
        rows.append((
            r["variant"], str(r["seq_len"]),
            _fmt(mib("tracked_peak_bytes"), ".2f"), _fmt(mib("tracked_peak_increase_bytes"), ".2f"),
            _fmt(mib("simulated_peak_bytes"), ".2f"), _fmt(r.get("sim_over_tracked"), ".3f"),
            _fmt(mib("saved_activation_bytes"), ".2f"),
            _fmt(r.get("peak_vs_eager"), ".3f"), _fmt(r.get("peak_vs_inductor"), ".3f"),
            _fmt(r["median_step_s"] * 1e3, ".1f"), _fmt(r["min_step_s"] * 1e3, ".1f"),
            _fmt(r.get("time_vs_eager"), ".3f"), _fmt(r.get("time_vs_inductor"), ".3f"),
            _fmt(r["first_step_s"], ".1f"),
        ))
    widths = [max(len(row[i]) for row in rows if not row[2].startswith("FAILED") or i < 2)
              for i in range(len(header))]
    lines = []
    for index, row in enumerate(rows):
        if row[2].startswith("FAILED"):
            lines.append("  ".join([row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2]]))
        else:
            lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                                   for i, (cell, w) in enumerate(zip(row, widths))))
        if index == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


TABLE_LEGEND = """\
peak = tracked peak tensor bytes of forward+backward (params, optimizer states, batch included);
+step = peak minus the bytes live at entry; sim = memopt's simulated peak of the same step;
saved = bytes the forward keeps for the backward; pk/ratios and t/ratios are against eager and
plain Inductor at the same length; step/min = median/fastest of forward+backward+AdamW step
(t/ ratios use the median); 1st = first step wall time, compilation included (graph caches off)."""


def run_grid(seq_lens: Sequence[int], variants: Sequence[str], batch: int,
             run: Callable[[str, int, Callable[[str], None]], dict[str, Any]]) -> list[dict[str, Any]]:
    """``run(variant, seq, log)`` for every sequence length and variant, caches off (Note [Isolating the
    variants]); a variant that raises gets a row with its error, and the others still run."""
    started = time.perf_counter()
    records: list[dict[str, Any]] = []
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        for seq in seq_lens:
            for variant in variants:
                def log(message: str, prefix: str = f"{variant} seq={seq}") -> None:
                    print(f"[{time.perf_counter() - started:6.0f} s] {prefix}: {message}", flush=True)
                try:
                    records.append(run(variant, seq, log))
                except Exception as exc:  # noqa: BLE001 - reported in the row and the exit status
                    traceback.print_exc()
                    records.append({"variant": variant, "seq_len": seq, "batch": batch,
                                    "error": f"{type(exc).__name__}: {exc}"})
                    torch._dynamo.reset()
                    gc.collect()
    return records


def write_scalars(out: Path, benchmark: str, meta: dict[str, Any], records: list[dict[str, Any]]) -> Path:
    """``<benchmark>.json`` (meta and rows) and ``<benchmark>.csv`` (one row per scalar figure)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{benchmark}.json").write_text(json.dumps({"meta": meta, "results": records}, indent=2) + "\n")
    with (out / f"{benchmark}.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["benchmark", "variant", "seq_len", "batch", "metric", "value", "torch_version", "date"])
        for r in records:
            for key, value in r.items():
                if key not in ("variant", "seq_len", "batch") and not isinstance(value, (list, dict)):
                    writer.writerow([benchmark, r["variant"], r["seq_len"], r["batch"], key, value,
                                     meta["torch"], meta["date"]])
    return out / f"{benchmark}.json"


def seq_chart(records: list[dict[str, Any]], variants: Sequence[str], title: str) -> str:
    """SVG: tracked peak increase (MiB) and step time (s) against sequence length, one line per variant."""
    good = [r for r in records if "error" not in r]
    seqs = sorted({r["seq_len"] for r in good})
    palette = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")
    colors = dict(zip(variants, palette))
    panels = (("tracked_peak_increase_bytes", "tracked peak increase, MiB", MiB),
              ("median_step_s", "median step, s", 1.0))
    width, height, left, top = 360, 240, 60, 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * width + 40}" height="{height + 80}" '
           'font-family="sans-serif" font-size="11">',
           f'<text x="10" y="18" font-size="13">{title}</text>']
    for p, (key, label, unit) in enumerate(panels):
        x0 = p * (width + 20)
        top_value = max((r[key] / unit for r in good), default=1.0) or 1.0
        out.append(f'<text x="{x0 + left}" y="{top - 8}">{label}</text>')
        for i, seq in enumerate(seqs):
            x = x0 + left + (width - left - 10) * i / max(len(seqs) - 1, 1)
            out.append(f'<text x="{x - 12:.0f}" y="{top + height - 20}">{seq}</text>')
        for variant, color in colors.items():
            points = [(seqs.index(r["seq_len"]), r[key] / unit) for r in good if r["variant"] == variant]
            xy = [(x0 + left + (width - left - 10) * i / max(len(seqs) - 1, 1),
                   top + (height - 40) * (1 - v / top_value)) for i, v in sorted(points)]
            if xy:
                out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                           + " ".join(f"{x:.1f},{y:.1f}" for x, y in xy) + '"/>')
                out.append(f'<text x="{xy[-1][0] - 40:.1f}" y="{xy[-1][1] - 6:.1f}" fill="{color}">{variant}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def bench_parser(doc: str | None, variants: Iterable[str], batch: int | None = None) -> argparse.ArgumentParser:
    """The command line the side-by-side benchmarks share: --quick, --steps, --variants, --seq-lens,
    --batch (when the benchmark has one) and --out."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--variants", default=",".join(variants))
    parser.add_argument("--seq-lens", default=None)
    if batch is not None:
        parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    return parser


def align(rows: Sequence[Sequence[str]], text_columns: int = 2) -> str:
    """Rows as a table: the first ``text_columns`` left-aligned, the rest right-aligned, a rule under the
    header."""
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------


def choose_names(parser: argparse.ArgumentParser, text: str, known: Iterable[str], what: str) -> list[str]:
    """The comma-separated names in ``text``; an unknown one is a usage error listing the known ones."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in set(known)]
    if unknown:
        parser.error(f"unknown {what}(s) {unknown}; choose from {sorted(known)}")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: sequence length {QUICK_SEQ_LENS[0]} only, {QUICK_STEPS} timed steps")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"timed steps per variant (default {STEPS}, {QUICK_STEPS} with --quick)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results",
                        help="folder for bench_memory.csv and bench_memory.json (default benchmarks/results)")
    parser.add_argument("--variants", default=",".join(v.name for v in VARIANTS),
                        help="comma-separated subset of: " + ", ".join(v.name for v in VARIANTS))
    parser.add_argument("--seq-lens", default=None,
                        help=f"comma-separated sequence lengths, at most 512 (default "
                             f"{','.join(map(str, SEQ_LENS))})")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"batch size (default {BATCH})")
    args = parser.parse_args(argv)
    known = {v.name: v for v in VARIANTS}
    args.variant_list = [known[n] for n in choose_names(parser, args.variants, known, "variant")]
    if args.seq_lens is not None:
        try:
            args.seq_len_list = [int(s) for s in args.seq_lens.split(",") if s.strip()]
        except ValueError:
            parser.error(f"--seq-lens {args.seq_lens!r}: expected integers such as 128,512")
    else:
        args.seq_len_list = list(QUICK_SEQ_LENS if args.quick else SEQ_LENS)
    if any(not 1 <= s <= 512 for s in args.seq_len_list):
        parser.error(f"--seq-lens {args.seq_len_list}: tiny_llama has 512 positions; use 1..512")
    args.step_count = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else STEPS)
    if args.step_count < 1 or args.batch < 1:
        parser.error("--steps and --batch must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    fresh_plan_cache()
    meta = run_metadata(args, args.seq_len_list, args.step_count)
    runs = [(v, s) for s in args.seq_len_list for v in args.variant_list]
    print(f"bench_memory: {len(runs)} runs ({len(args.variant_list)} variants x seq {args.seq_len_list}), "
          f"batch {args.batch}, {args.step_count} timed steps; torch {meta['torch']}, "
          f"{meta['cpu_count']} CPUs", flush=True)
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    # Note [Isolating the variants]: no cached graphs, so the budget and the probes always run.
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        for index, (variant, seq) in enumerate(runs, 1):
            prefix = f"[{index}/{len(runs)}] {variant.name} seq={seq}"

            def log(message: str, prefix: str = prefix) -> None:
                print(f"{prefix}: {message} ({time.perf_counter() - started:.0f} s)", flush=True)

            try:
                record = run_one(variant, seq, args.batch, args.step_count, log)
            except Exception as exc:  # noqa: BLE001 - one failing variant must not lose the others
                # Reported, not hidden: the row says what failed, the traceback goes to stderr, and the
                # exit status is 1.
                traceback.print_exc()
                record = {"variant": variant.name, "seq_len": seq, "batch": args.batch,
                          "error": f"{type(exc).__name__}: {exc}"}
                torch._dynamo.reset()
                gc.collect()
            records.append(record)
            if "error" in record:
                log(f"FAILED: {record['error'].splitlines()[0]}")
            else:
                sim = record.get("simulated_peak_bytes")
                log(f"tracked peak {record['tracked_peak_bytes'] / MiB:.2f} MiB"
                    + (f", simulated {sim / MiB:.2f} MiB" if sim is not None else "")
                    + f", median step {record['median_step_s'] * 1e3:.1f} ms")
                for note in record.get("notes", []):
                    log(f"note: {note}")
    add_ratios(records)
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    csv_path, json_path = write_results(args.out, meta, records)
    print()
    print(format_table(records))
    print()
    print(TABLE_LEGEND)
    print(f"\nwrote {csv_path} and {json_path} ({meta['wall_s']:.0f} s)")
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
