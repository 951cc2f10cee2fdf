"""Recompute schedules under a memory budget: PyTorch's knapsack (Inductor with
``activation_memory_budget``) against memopt's scheduler, on a tiny Llama and a tiny GPT-2, in one process.

    python benchmarks/bench_schedule.py               # the full run (~15 min on an idle 2-core CPU)
    python benchmarks/bench_schedule.py --quick       # seq 256 only, 3 timed steps (about half of it)
    python benchmarks/bench_schedule.py --models tiny_gpt2 --budgets 0.5 --variants memopt_eager

Six variants, each at the budgets 1.0, 0.5 and 0.25, per model (4 layers, hidden 128, vocabulary 256;
batch 4) and sequence length (256 and 512):

- ``inductor_knapsack``: ``torch.compile(model)`` under
  ``torch._functorch.config.patch(activation_memory_budget=B)``: Inductor's min-cut partitioner, which for
  B < 1 picks what to recompute with a knapsack (the default solver, dp);
- ``eager_knapsack``: the same partition (memopt's partition step is torch's min-cut partitioner, which
  reads that setting; memopt is given no budget) run as FX graphs by memopt's eager code generator, where
  memopt's simulation of the step is exact: PyTorch's decisions without Inductor's fusion;
- ``memopt_eager`` / ``memopt_inductor``: ``torch.compile(model, backend=MemoptBackend({"codegen": ...,
  "memory_budget": B, "cost_profile": "h100", "offload": False}))``: memopt recomputing only, the
  like-for-like opponent of a recompute-only knapsack (offload is switched off explicitly: on a CPU run
  "offloaded" activations stay in the same memory the tracker counts). A budget memopt cannot meet raises
  ``MemoptInfeasibleBudget`` at compile time; the cell is recorded as ``infeasible`` with the error's
  ``min_peak_bytes``, not as a failure;
- ``memopt_eager_matched`` / ``memopt_matched``: memopt with the eager / Inductor code generator whose
  budget is the tracked peak in bytes that ``eager_knapsack`` / ``inductor_knapsack`` reached in the same
  model, length and nominal budget: "recompute no more at an equal or lower peak" compared directly (the
  knapsack cell runs first).

Every memopt variant costs recomputation for Inductor's fused kernels (``fused_costs=True``, Note [Fused
costs] in ``memopt.cost_model.estimate``), the code a GPU run would use, also when the eager code
generator runs the graphs here to measure their peak exactly.

The two budgets are not the same quantity (Note [What the budgets mean]); cells are compared at the same
nominal B and, across budgets, by the (tracked peak, recomputed FLOPs) pairs they reach.

For every cell: a fresh model from seed 0, no optimizer, one warm-up step (it compiles), one *tracked* forward + backward under ``memopt.track_memory("cpu")`` holding the outputs as a
training loop does (``out = model(**batch); out.loss.backward()``; only parameters, buffers and the batch
are live at entry, gradients are made inside the step), then ``--steps`` timed forward + backward steps
(gradients set to None after each). Recompiling after the warm-up is an error.

Per cell it records the tracked peak, the recomputed FLOPs and the predicted added time on the h100
profile (Note [Counting recomputation]), the median and fastest measured CPU step time, and for memopt
what its scheduler reported (simulated peak, budget in bytes, its own predicted added time, the values it
chose, the number of plans it evaluated). Results go to ``<out>/bench_schedule.csv`` (long format, one
row per variant x model x sequence length x budget x metric) and ``<out>/bench_schedule.json``; a table
and the memopt-versus-knapsack comparison are printed.

The isolation between cells is bench_memory.py's (its Note [Isolating the variants]): Dynamo reset before
each cell, Inductor's FX graph cache and AOTAutograd's cache off for the whole run, the previous cell's
tensors freed first (a tracker baseline off by more than 1 MiB from parameters + buffers + batch adds a
note to the record).

Note [What the budgets mean]
PyTorch's ``activation_memory_budget`` B is a share of the activation memory the forward saves, between
"recompute every cheap op it may" (0) and the default min-cut partition (1); the knapsack chooses the
saved set, the peak of the step follows from it. memopt's fractional ``memory_budget`` B limits the
*simulated peak* of the whole step: the unoptimised plan's peak minus (1 - B) of its saved activation
bytes (``memopt.schedule.budget.budget_bytes``). Both mean "keep B of the activations", but the same B
need not give the same peak, hence the cross-budget comparison.

Note [Counting recomputation]
A recomputed value is a node of the backward graph that is a copy of a forward op: its name is that of a
``call_function`` node in the forward region of the joint graph (``memopt.schedule.problem.forward_region``:
the ops eager PyTorch runs in the forward, that is neither those that depend on a ``tangents_*``
placeholder nor those AOTAutograd traced while running the backward; a derivative's ops that read forward
values only, such as tanh-GELU's ``3 * x ** 2``, run in eager's backward too and are no recomputation:
counted as such, they charged every GPT-2 XL plan 0.375 ms on h100, the knapsack's and memopt's alike). Only
``call_function`` nodes count: the partitioner names the backward's placeholder for a *saved* value
after the forward node that made it, and that is no recomputation. Recomputed FLOPs are
``memopt.cost_model.flops.node_flops`` summed over those nodes (PyTorch's flop formulas: matmuls,
attention, convolutions; pointwise ops and reductions count 0, so the node count is reported too); the
predicted added time is ``memopt.cost_model.estimate.estimate_node(node, h100, fused=True).time_s``
summed over the same nodes (fused: elementwise recomputation costs its reads, Note [Fused costs]). The
same function serves every variant: for memopt on ``GraphReport.joint`` and
``.backward``; for Inductor on the graphs of its own partition, obtained through the public
``custom_partitioner_fn`` hook with bench_memory.py's probe (which calls
``min_cut_rematerialization_partition`` with exactly Inductor's arguments, so the partition, knapsack
included, is unchanged). memopt's own ``ScheduleResult.chosen.added_time_s`` is recorded next to it as
``memopt_added_s``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import gc
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

# bench_memory.py sits next to this file; it also puts the repository root on the path (tests.models).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_memory import (  # noqa: E402
    MODEL,
    REPO_ROOT,
    SEED,
    MiB,
    _fmt,
    _probe_class,
    _storage_bytes,
    choose_names,
    fresh_plan_cache,
    run_metadata,
)

from memopt.compiler.backend import MemoptBackend  # noqa: E402
from memopt.cost_model.estimate import estimate_node  # noqa: E402
from memopt.cost_model.flops import node_flops  # noqa: E402
from memopt.cost_model.profile import DeviceProfile, load_profile  # noqa: E402
from memopt.errors import MemoptInfeasibleBudget  # noqa: E402
from memopt.runtime.tracker import track_memory  # noqa: E402
from memopt.schedule.problem import forward_region, rerun_forward_ops  # noqa: E402
from tests.models import tiny_gpt2, tiny_llama, token_batch  # noqa: E402

BENCHMARK = "bench_schedule"
PROFILE = "h100"
MODELS: dict[str, Callable[..., nn.Module]] = {"tiny_llama": tiny_llama, "tiny_gpt2": tiny_gpt2}
BATCH = 4
SEQ_LENS = (256, 512)            # both tiny models have 512 positions
QUICK_SEQ_LENS = (256,)
BUDGETS = (1.0, 0.5, 0.25)
STEPS, QUICK_STEPS = 5, 3
WARMUP_STEPS = 1                 # compiles; recompiling later is an error (error_on_recompile)


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    backend: str                       # "inductor" | "memopt"
    codegen: str | None = None         # memopt's code generator
    knapsack: str = ""                 # the knapsack variant it is compared with (same code generator)
    matched: bool = False              # memopt's budget: that knapsack's tracked peak in bytes (same cell)
    torch_budget: bool = False         # memopt without a budget under activation_memory_budget=B


VARIANTS: tuple[Variant, ...] = (
    Variant("inductor_knapsack", "inductor"),
    Variant("eager_knapsack", "memopt", codegen="eager", torch_budget=True),
    Variant("memopt_eager", "memopt", codegen="eager", knapsack="eager_knapsack"),
    Variant("memopt_eager_matched", "memopt", codegen="eager", knapsack="eager_knapsack", matched=True),
    Variant("memopt_inductor", "memopt", codegen="inductor", knapsack="inductor_knapsack"),
    Variant("memopt_matched", "memopt", codegen="inductor", knapsack="inductor_knapsack", matched=True),
)
KNAPSACKS = frozenset(v.name for v in VARIANTS if not v.knapsack)
BY_NAME = {v.name: v for v in VARIANTS}

# (metric, unit) in the order the CSV lists them; a record's missing metric is left out of the CSV.
METRICS: tuple[tuple[str, str], ...] = (
    ("status", ""),
    ("tracked_peak_bytes", "bytes"),
    ("tracked_baseline_bytes", "bytes"),
    ("tracked_peak_increase_bytes", "bytes"),
    ("recomputed_flops", "flop"),
    ("recomputed_nodes", "count"),
    ("predicted_added_s", "s"),
    ("median_step_s", "s"),
    ("min_step_s", "s"),
    ("first_step_s", "s"),
    ("saved_activation_bytes", "bytes"),
    ("simulated_peak_bytes", "bytes"),
    ("budget_bytes", "bytes"),
    ("tracked_over_budget_bytes", "bytes"),
    ("baseline_simulated_peak_bytes", "bytes"),
    ("min_peak_bytes", "bytes"),
    ("memopt_added_s", "s"),
    ("memopt_recompute_count", "count"),
    ("schedule_evaluations", "count"),
    ("graphs", "count"),
)


# --------------------------------------------------------------------------------------------------------
# Recomputation in a partition (Note [Counting recomputation])
# --------------------------------------------------------------------------------------------------------


def recompute_stats(fw_region: frozenset[str], backward: torch.fx.GraphModule | None,
                    profile: DeviceProfile, *, fused: bool) -> tuple[int, int, float]:
    """(FLOPs, node count, predicted seconds) of the forward ops the backward graph runs again;
    ``fused``: costed for a fusing code generator (Note [Fused costs] in memopt.cost_model.estimate)."""
    flops, count, seconds = 0, 0, 0.0
    if backward is None:
        return flops, count, seconds
    for node in rerun_forward_ops(backward, fw_region):
        flops += node_flops(node)
        count += 1
        seconds += estimate_node(node, profile, fused=fused).time_s
    return flops, count, seconds


def _recompute_probe_class() -> type:
    """bench_memory's saved-activation probe (Inductor's partitioner, unchanged) that also counts the
    recomputation of each partition it makes."""
    base = _probe_class()

    class RecomputeProbe(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            # Plain numbers only, like the base class: Inductor deep-copies its config, this hook included.
            self.recompute: list[tuple[int, int, float]] = []

        def __call__(self, gm: torch.fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any,
                     ) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
            region = forward_region(gm)            # before the partitioner touches the joint graph
            fw, bw = super().__call__(gm, joint_inputs, **kwargs)
            self.recompute.append(recompute_stats(region, bw, load_profile(PROFILE), fused=True))
            return fw, bw

    return RecomputeProbe


def find_infeasible(exc: BaseException) -> MemoptInfeasibleBudget | None:
    """The MemoptInfeasibleBudget behind ``exc`` (Dynamo wraps backend errors), or None."""
    pending: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while pending:
        err = pending.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, MemoptInfeasibleBudget):
            return err
        pending += [err.__cause__, err.__context__, getattr(err, "inner_exception", None)]
    return None


# --------------------------------------------------------------------------------------------------------
# One cell: variant x model x sequence length x budget
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cell:
    variant: Variant
    model: str
    seq: int
    budget: float

    def key(self) -> dict[str, Any]:
        return {"variant": self.variant.name, "model": self.model, "seq_len": self.seq, "budget": self.budget}


def _step(model: nn.Module, batch: dict[str, Any]) -> None:
    """Forward + backward as a training loop holds it, then the gradients dropped (no optimizer)."""
    out = model(**batch)
    out.loss.backward()
    del out
    model.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _cell_config(cell: Cell, probe: Any) -> Iterator[None]:
    """Settings that must hold while the cell compiles, which is lazily, at its first step."""
    with contextlib.ExitStack() as stack:
        if cell.variant.backend == "inductor" or cell.variant.torch_budget:
            stack.enter_context(torch._functorch.config.patch(activation_memory_budget=cell.budget))
        if cell.variant.backend == "inductor":
            stack.enter_context(torch._inductor.config.patch(custom_partitioner_fn=probe))
        yield


def _memopt_schedule_fields(backend: MemoptBackend) -> dict[str, Any]:
    """What memopt's scheduler reported for the (last) graph, also when the budget was infeasible."""
    if not backend.reports or backend.reports[-1].schedule is None:
        return {}
    result = backend.reports[-1].schedule
    return {"budget_bytes": result.budget_bytes, "feasible": result.feasible,
            "baseline_simulated_peak_bytes": result.baseline.peak_bytes,
            "lowest_simulated_peak_bytes": result.lowest.peak_bytes,
            "schedule_evaluations": result.evaluations}


def run_cell(cell: Cell, batch_size: int, steps: int, log: Callable[[str], None],
             budget_bytes: int | None = None) -> dict[str, Any]:
    """Measure one cell; returns its record (bytes, FLOPs and seconds). ``budget_bytes`` replaces the
    fractional budget (the matched variant)."""
    torch._dynamo.reset()           # bench_memory's Note [Isolating the variants]
    gc.collect()
    torch.manual_seed(SEED)
    model = MODELS[cell.model](**MODEL)
    model.train()
    batch: dict[str, Any] = token_batch(batch_size, cell.seq, vocab=MODEL["vocab"])
    record: dict[str, Any] = {**cell.key(), "batch": batch_size}
    backend: MemoptBackend | None = None
    probe: Any = None
    if cell.variant.backend == "memopt":
        # Costed for Inductor's fused kernels whatever runs on this CPU (Note [Counting recomputation]).
        budget = None if cell.variant.torch_budget else budget_bytes if budget_bytes is not None else cell.budget
        backend = MemoptBackend({"codegen": cell.variant.codegen, "memory_budget": budget,
                                 "cost_profile": PROFILE, "offload": False}, fused_costs=True)
        compiled = cast(nn.Module, torch.compile(model, backend=backend))
    else:
        probe = _recompute_probe_class()()
        compiled = cast(nn.Module, torch.compile(model))

    with _cell_config(cell, probe):
        log("compiling and warming up")
        start = time.perf_counter()
        try:
            _step(compiled, batch)
        except Exception as exc:  # noqa: BLE001 - an infeasible budget is a result; anything else re-raised
            infeasible = find_infeasible(exc)
            if infeasible is None:
                raise
            record.update(status="infeasible", min_peak_bytes=infeasible.min_peak_bytes,
                          infeasible_message=str(infeasible), first_step_s=time.perf_counter() - start)
            if backend is not None:
                record.update(_memopt_schedule_fields(backend))
            del compiled, backend, probe, model, batch
            torch._dynamo.reset()
            gc.collect()
            return record
        record["first_step_s"] = time.perf_counter() - start
        for _ in range(WARMUP_STEPS - 1):
            _step(compiled, batch)

        # From here on a recompilation would measure a different program: make it an error.
        with torch._dynamo.config.patch(error_on_recompile=True):
            resident = (_storage_bytes(iter([*model.parameters(), *model.buffers()]))
                        + _storage_bytes(v for v in batch.values() if isinstance(v, torch.Tensor)))
            log("tracked step")
            with track_memory("cpu") as mem:
                out = compiled(**batch)
                out.loss.backward()
            del out
            model.zero_grad(set_to_none=True)

            log(f"{steps} timed steps")
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                _step(compiled, batch)
                times.append(time.perf_counter() - start)

    record.update(status="ok", tracked_peak_bytes=mem.peak_bytes, tracked_baseline_bytes=mem.baseline_bytes,
                  tracked_peak_increase_bytes=mem.peak_increase_bytes, resident_bytes=resident,
                  median_step_s=statistics.median(times), min_step_s=min(times), step_times_s=times)
    if abs(mem.baseline_bytes - resident) > MiB:
        record.setdefault("notes", []).append(
            f"tracker baseline {mem.baseline_bytes} B differs from the expected resident {resident} B: "
            "tensors from outside this cell were live")

    stats: list[tuple[int, int, float]] = []
    if backend is not None:
        record.update(_memopt_schedule_fields(backend))
        if record.get("budget_bytes") is not None:
            record["tracked_over_budget_bytes"] = mem.peak_bytes - record["budget_bytes"]
            if mem.peak_bytes > record["budget_bytes"] * 1.01:    # a few bytes over is simulator noise
                record.setdefault("notes", []).append(
                    f"tracked peak {mem.peak_bytes} B is more than 1% above memopt's budget "
                    f"{record['budget_bytes']} B (the budget is checked on the simulated step)")
        profile = load_profile(PROFILE)
        for report in backend.reports:
            if report.joint is not None:
                stats.append(recompute_stats(forward_region(report.joint), report.backward, profile,
                                             fused=True))
        record["graphs"] = len(backend.reports)
        reports = [r for r in backend.reports if r.memory is not None]
        if len(backend.reports) == 1 and reports:
            report = reports[0]
            assert report.memory is not None
            record.update(simulated_peak_bytes=report.memory.peak_bytes,
                          saved_activation_bytes=report.memory.saved_activation_bytes)
            if report.schedule is not None:
                chosen = report.schedule.chosen
                record.update(memopt_added_s=chosen.added_time_s,
                              memopt_recompute_count=len(chosen.recompute),
                              memopt_recompute=sorted(chosen.recompute),
                              memopt_offload=sorted(getattr(chosen, "offload", ())))
        else:
            record.setdefault("notes", []).append(
                f"{len(backend.reports)} graphs (graph breaks): no simulated peak; recomputation summed")
    if probe is not None:
        stats = list(probe.recompute)
        record["graphs"] = len(probe.recompute)
        if len(probe.saved_bytes) == 1 and probe.saved_bytes[0] >= 0:
            record["saved_activation_bytes"] = probe.saved_bytes[0]
        if len(probe.recompute) != 1:
            record.setdefault("notes", []).append(
                f"{len(probe.recompute)} partitions (graph breaks): recomputation summed")
    if stats:
        record.update(recomputed_flops=sum(s[0] for s in stats), recomputed_nodes=sum(s[1] for s in stats),
                      predicted_added_s=sum(s[2] for s in stats))
    else:
        record.setdefault("notes", []).append("no partition seen: recomputation not measured")
    del compiled, backend, probe, model, batch
    gc.collect()
    return record


# --------------------------------------------------------------------------------------------------------
# Output files, table, comparison
# --------------------------------------------------------------------------------------------------------


def write_results(out: Path, meta: dict[str, Any], records: list[dict[str, Any]]) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / f"{BENCHMARK}.json", out / f"{BENCHMARK}.csv"
    json_path.write_text(json.dumps({"meta": meta, "results": records}, indent=2) + "\n")
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["benchmark", "variant", "model", "seq_len", "batch", "budget", "metric", "unit",
                         "value", "torch_version", "date"])
        for r in records:
            key = [BENCHMARK, r["variant"], r["model"], r["seq_len"], r["batch"], r["budget"]]
            if "error" in r:
                writer.writerow([*key, "error", "", r["error"], meta["torch"], meta["date"]])
                continue
            for metric, unit in METRICS:
                if r.get(metric) is not None:
                    writer.writerow([*key, metric, unit, r[metric], meta["torch"], meta["date"]])
    return csv_path, json_path


def _mib(r: dict[str, Any], key: str) -> float | None:
    return None if r.get(key) is None else r[key] / MiB


def _render(rows: Sequence[tuple[str, ...]], left: int = 1, last_left: bool = False) -> str:
    """Columns padded to their widest cell; the first ``left`` columns (and the last, with ``last_left``)
    left-aligned, the rest right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if i < left or (last_left and i == len(row) - 1) else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
        if index == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def format_table(records: list[dict[str, Any]]) -> str:
    header = ("model", "seq", "budget", "variant", "status", "peak MiB", "+step MiB", "sim MiB", "bgt MiB",
              "saved MiB", "recomp GFLOP", "nodes", "+h100 us", "memopt us", "step ms", "min ms", "1st s")
    rows = [header]
    for r in records:
        key = (r["model"], str(r["seq_len"]), f"{r['budget']:g}", r["variant"])
        if "error" in r:
            rows.append((*key, "FAILED: " + r["error"].splitlines()[0][:60], *[""] * (len(header) - 5)))
            continue
        if r["status"] == "infeasible":
            rows.append((*key, "infeasible", "", "", _fmt(_mib(r, "min_peak_bytes"), ".2f") + " min",
                         _fmt(_mib(r, "budget_bytes"), ".2f"), *[""] * (len(header) - 10),
                         _fmt(r.get("first_step_s"), ".1f")))
            continue
        flops = r.get("recomputed_flops")
        rows.append((
            *key, r["status"],
            _fmt(_mib(r, "tracked_peak_bytes"), ".2f"), _fmt(_mib(r, "tracked_peak_increase_bytes"), ".2f"),
            _fmt(_mib(r, "simulated_peak_bytes"), ".2f"), _fmt(_mib(r, "budget_bytes"), ".2f"),
            _fmt(_mib(r, "saved_activation_bytes"), ".2f"),
            _fmt(None if flops is None else flops / 1e9, ".3f"), str(r.get("recomputed_nodes", "")),
            _fmt(None if r.get("predicted_added_s") is None else r["predicted_added_s"] * 1e6, ".1f"),
            _fmt(None if r.get("memopt_added_s") is None else r["memopt_added_s"] * 1e6, ".1f"),
            _fmt(r["median_step_s"] * 1e3, ".1f"), _fmt(r["min_step_s"] * 1e3, ".1f"),
            _fmt(r["first_step_s"], ".1f"),
        ))
    return _render(rows, left=5)


TABLE_LEGEND = """\
peak = tracked peak tensor bytes of one forward+backward (parameters and batch included, no optimizer);
+step = peak minus the bytes live at entry; sim = memopt's simulated peak of the same step (for an
infeasible cell: the lowest peak memopt found, min_peak_bytes); bgt = memopt's budget in bytes (checked
against sim, not against the tracked peak); saved = bytes the forward keeps for the backward;
recomp GFLOP / nodes = FLOPs (matmuls, attention) / call_function nodes of forward ops the backward runs
again; +h100 us = their predicted time on the h100 profile (counted the same way for every variant);
memopt us = memopt's own ScheduleResult.chosen.added_time_s; step/min = median/fastest measured CPU
forward+backward; 1st = first step wall time, compilation and scheduling included (graph caches off)."""


def _ok(r: dict[str, Any] | None) -> bool:
    return r is not None and r.get("status") == "ok" and r.get("recomputed_flops") is not None


def _beats(k: dict[str, Any], mine: dict[str, Any]) -> bool:
    """Knapsack cell ``k`` is at least as good on both axes and strictly better on one."""
    return ((k["tracked_peak_bytes"] <= mine["tracked_peak_bytes"]
             and k["recomputed_flops"] < mine["recomputed_flops"])
            or (k["tracked_peak_bytes"] < mine["tracked_peak_bytes"]
                and k["recomputed_flops"] <= mine["recomputed_flops"]))


COMPARISON_LEGEND = """\
Each memopt variant is compared with the knapsack run by the same code generator: memopt_eager and
memopt_eager_matched with eager_knapsack (torch's knapsack partition run as FX graphs, unfused: the
scheduling decisions alone, measured where memopt's simulation is exact), memopt_inductor and
memopt_matched with inductor_knapsack (both compiled by Inductor, whose fusion and buffer reuse neither
planner models). The *_matched variants get the knapsack's tracked peak as their budget: the target's
own comparison."""


def compare(records: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """memopt (recompute only) against PyTorch's knapsack: per budget, and across budgets."""
    by_key = {(r["variant"], r["model"], r["seq_len"], r["budget"]): r for r in records}
    groups = list(dict.fromkeys((r["model"], r["seq_len"]) for r in records))
    budgets = sorted({r["budget"] for r in records}, reverse=True)
    memopt_variants = list(dict.fromkeys(r["variant"] for r in records if r["variant"] not in KNAPSACKS))
    verdicts: dict[str, Any] = {"cells": [], "per_variant": {}}
    rows: list[tuple[str, ...]] = [("model", "seq", "budget", "memopt variant", "knapsack", "GFLOP memopt",
                                    "GFLOP knapsack",
                                    "peak MiB memopt", "peak MiB knapsack", "d peak MiB", "target met")]
    for model, seq in groups:
        for budget in budgets:
            for name in memopt_variants:
                knap = by_key.get((BY_NAME[name].knapsack, model, seq, budget))
                mine = by_key.get((name, model, seq, budget))
                if mine is None:
                    continue
                row_key = (model, str(seq), f"{budget:g}", name, BY_NAME[name].knapsack)
                cell: dict[str, Any] = {"model": model, "seq_len": seq, "budget": budget, "variant": name}
                if not _ok(mine) or not _ok(knap):
                    if mine.get("status") == "infeasible" and _ok(knap):
                        assert knap is not None
                        lowest = mine.get("min_peak_bytes")
                        why = "memopt infeasible" + ("" if lowest is None else
                                                     f": lowest simulated {lowest / MiB:.2f} MiB, "
                                                     + ("below" if lowest < knap["tracked_peak_bytes"]
                                                        else "not below") + " the knapsack's peak")
                        rows.append((*row_key, "", f"{knap['recomputed_flops'] / 1e9:.3f}", "",
                                     f"{knap['tracked_peak_bytes'] / MiB:.2f}", "", f"n/a ({why})"))
                    else:
                        why = ("memopt " + str(mine.get("status") or "failed")) if not _ok(mine) else (
                            "knapsack " + str((knap or {}).get("status") or "missing or failed"))
                        rows.append((*row_key, "", "", "", "", "", f"n/a ({why})"))
                    verdicts["cells"].append({**cell, "target_met": None, "why": why})
                    continue
                assert mine is not None and knap is not None
                fewer = mine["recomputed_flops"] <= knap["recomputed_flops"]
                lower = mine["tracked_peak_bytes"] <= knap["tracked_peak_bytes"]
                met = fewer and lower
                why = "yes" if met else "no: " + " and ".join(
                    part for part, bad in (("more FLOPs", not fewer), ("higher peak", not lower)) if bad)
                rows.append((*row_key, f"{mine['recomputed_flops'] / 1e9:.3f}",
                             f"{knap['recomputed_flops'] / 1e9:.3f}",
                             f"{mine['tracked_peak_bytes'] / MiB:.2f}", f"{knap['tracked_peak_bytes'] / MiB:.2f}",
                             f"{(mine['tracked_peak_bytes'] - knap['tracked_peak_bytes']) / MiB:+.2f}", why))
                verdicts["cells"].append({**cell, "target_met": met, "fewer_or_equal_flops": fewer,
                                          "equal_or_lower_peak": lower})
    lines = ["memopt (recompute only, no offload) vs PyTorch's knapsack at the same nominal budget;",
             "target: memopt recomputes no more FLOPs at an equal or lower tracked peak.",
             _render(rows, left=4, last_left=True), COMPARISON_LEGEND, "",
             "Across budgets (same model and length): memopt cells that some knapsack cell beats on both axes "
             "(tracked peak and recomputed FLOPs, no worse on either, better on one):"]
    dominated_lines = []
    for name in memopt_variants:
        summary = {"same_budget_met": 0, "same_budget_compared": 0, "not_compared": 0, "measured": 0,
                   "beaten": 0}
        for c in verdicts["cells"]:
            if c["variant"] == name:
                if c["target_met"] is None:
                    summary["not_compared"] += 1
                else:
                    summary["same_budget_compared"] += 1
                    summary["same_budget_met"] += int(c["target_met"])
        for model, seq in groups:
            knaps = [r for r in records if r["variant"] == BY_NAME[name].knapsack and r["model"] == model
                     and r["seq_len"] == seq and _ok(r)]
            for mine in records:
                if mine["variant"] != name or mine["model"] != model or mine["seq_len"] != seq or not _ok(mine):
                    continue
                summary["measured"] += 1
                beaters = [k for k in knaps if _beats(k, mine)]
                if beaters:
                    summary["beaten"] += 1
                    dominated_lines.append(
                        f"  {model} seq {seq} {name} budget {mine['budget']:g} "
                        f"({mine['tracked_peak_bytes'] / MiB:.2f} MiB, {mine['recomputed_flops'] / 1e9:.3f} GFLOP)"
                        " beaten by knapsack budget " + ", ".join(
                            f"{k['budget']:g} ({k['tracked_peak_bytes'] / MiB:.2f} MiB, "
                            f"{k['recomputed_flops'] / 1e9:.3f} GFLOP)" for k in beaters))
        verdicts["per_variant"][name] = summary
    lines.extend(dominated_lines or ["  none"])
    lines.append("")
    all_met = True
    for name, summary in verdicts["per_variant"].items():
        met, compared = summary["same_budget_met"], summary["same_budget_compared"]
        all_met = all_met and met == compared and summary["not_compared"] == 0 and summary["beaten"] == 0
        lines.append(
            f"Verdict {name}: target met in {met} of {compared} same-budget comparisons"
            + (f", {summary['not_compared']} not comparable (memopt infeasible or a failure)"
               if summary["not_compared"] else "")
            + f"; {summary['beaten']} of {summary['measured']} measured cells beaten outright by a knapsack "
            "cell at some budget.")
    if verdicts["per_variant"]:
        lines.append(
            "The target holds everywhere in this run." if all_met else
            "The target does NOT hold everywhere in this run (see the rows above; the *_matched variants, "
            "memopt given the knapsack's own tracked peak as its budget, are the comparison the target "
            "describes).")
    verdicts["target_met_everywhere"] = all_met if verdicts["per_variant"] else None
    return "\n".join(lines), verdicts


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------


def _csv_list(parser: argparse.ArgumentParser, text: str, convert: Callable[[str], Any], what: str) -> list[Any]:
    try:
        return [convert(s.strip()) for s in text.split(",") if s.strip()]
    except ValueError:
        parser.error(f"{what} {text!r}: not a comma-separated list of numbers")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"sequence length {QUICK_SEQ_LENS[0]} only, {QUICK_STEPS} timed steps")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"timed steps per cell (default {STEPS}, {QUICK_STEPS} with --quick)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results",
                        help=f"folder for {BENCHMARK}.csv and {BENCHMARK}.json (default benchmarks/results)")
    parser.add_argument("--variants", default=",".join(v.name for v in VARIANTS),
                        help="comma-separated subset of: " + ", ".join(v.name for v in VARIANTS))
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated subset of: " + ", ".join(MODELS))
    parser.add_argument("--budgets", default=None,
                        help=f"comma-separated fractions in (0, 1] (default {','.join(map(str, BUDGETS))})")
    parser.add_argument("--seq-lens", default=None,
                        help=f"comma-separated sequence lengths, at most 512 (default "
                             f"{','.join(map(str, SEQ_LENS))}; {QUICK_SEQ_LENS[0]} with --quick)")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"batch size (default {BATCH})")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the run (default: torch's choice); 1 keeps step times "
                             "steadier when other processes share a small CPU")
    args = parser.parse_args(argv)
    known = {v.name: v for v in VARIANTS}
    args.variant_list = [known[n] for n in choose_names(parser, args.variants, known, "variant")]
    args.model_list = choose_names(parser, args.models, MODELS, "model")
    args.budget_list = (_csv_list(parser, args.budgets, float, "--budgets") if args.budgets is not None
                        else list(BUDGETS))
    if any(not 0 < b <= 1 for b in args.budget_list):
        parser.error(f"--budgets {args.budget_list}: fractions in (0, 1]")
    args.seq_len_list = (_csv_list(parser, args.seq_lens, int, "--seq-lens") if args.seq_lens is not None
                         else list(QUICK_SEQ_LENS if args.quick else SEQ_LENS))
    if any(not 1 <= s <= 512 for s in args.seq_len_list):
        parser.error(f"--seq-lens {args.seq_len_list}: the tiny models have 512 positions; use 1..512")
    args.step_count = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else STEPS)
    if args.step_count < 1 or args.batch < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--steps, --batch and --threads must be at least 1")
    if not (args.variant_list and args.model_list and args.budget_list and args.seq_len_list):
        parser.error("nothing to run: a list option is empty")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    fresh_plan_cache()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    meta = run_metadata(args, args.seq_len_list, args.step_count)
    meta.update(benchmark=BENCHMARK, model={"names": args.model_list, **MODEL}, optimizer=None,
                warmup_steps=WARMUP_STEPS,
                budgets=args.budget_list, variants=[v.name for v in args.variant_list], cost_profile=PROFILE,
                step="forward + backward, outputs held, no optimizer")
    cells = [Cell(v, m, s, b) for m in args.model_list for s in args.seq_len_list for b in args.budget_list
             for v in args.variant_list]
    print(f"{BENCHMARK}: {len(cells)} cells ({len(args.variant_list)} variants x {args.model_list} x seq "
          f"{args.seq_len_list} x budgets {args.budget_list}), batch {args.batch}, {args.step_count} timed "
          f"steps; torch {meta['torch']}, {meta['cpu_count']} CPUs", flush=True)
    records: list[dict[str, Any]] = []
    knapsack_peaks: dict[tuple[str, str, int, float], int] = {}
    started = time.perf_counter()
    # bench_memory's Note [Isolating the variants]: no cached graphs, so the budget and the probes always run.
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        for index, cell in enumerate(cells, 1):
            prefix = f"[{index}/{len(cells)}] {cell.variant.name} {cell.model} seq={cell.seq} budget={cell.budget:g}"

            def log(message: str, prefix: str = prefix) -> None:
                print(f"{prefix}: {message} ({time.perf_counter() - started:.0f} s)", flush=True)

            matched_bytes = None
            if cell.variant.matched:
                knap = knapsack_peaks.get((cell.variant.knapsack, cell.model, cell.seq, cell.budget))
                if knap is None:
                    records.append({**cell.key(), "batch": args.batch, "status": "error",
                                    "error": f"no measured knapsack cell to match (run {cell.variant.knapsack} "
                                             "too)"})
                    log("FAILED: no knapsack cell to match")
                    continue
                matched_bytes = knap
                log(f"budget: the knapsack's tracked peak, {knap} B")
            try:
                record = run_cell(cell, args.batch, args.step_count, log, matched_bytes)
                if cell.variant.name in KNAPSACKS and record.get("status") == "ok":
                    knapsack_peaks[cell.variant.name, cell.model, cell.seq, cell.budget] = record["tracked_peak_bytes"]
            except Exception as exc:  # noqa: BLE001 - one failing cell must not lose the others
                # Reported, not hidden: the row says what failed, the traceback goes to stderr, and the
                # exit status is 1.
                traceback.print_exc()
                record = {**cell.key(), "batch": args.batch, "status": "error",
                          "error": f"{type(exc).__name__}: {exc}"}
                torch._dynamo.reset()
                gc.collect()
            records.append(record)
            if "error" in record:
                log(f"FAILED: {record['error'].splitlines()[0]}")
            elif record["status"] == "infeasible":
                log(f"infeasible: lowest simulated peak {record['min_peak_bytes'] / MiB:.2f} MiB"
                    + (f" > budget {record['budget_bytes'] / MiB:.2f} MiB" if "budget_bytes" in record else ""))
            else:
                flops = record.get("recomputed_flops")
                log(f"tracked peak {record['tracked_peak_bytes'] / MiB:.2f} MiB"
                    + ("" if flops is None else f", recomputed {flops / 1e9:.3f} GFLOP "
                       f"({record['recomputed_nodes']} nodes, +{record['predicted_added_s'] * 1e6:.1f} us on "
                       f"{PROFILE})")
                    + f", median step {record['median_step_s'] * 1e3:.1f} ms")
            for note in record.get("notes", []):
                log(f"note: {note}")
    comparison, verdicts = compare(records)
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    meta["comparison"] = verdicts
    csv_path, json_path = write_results(args.out, meta, records)
    print()
    print(format_table(records))
    print()
    print(TABLE_LEGEND)
    print()
    print(comparison)
    print(f"\nwrote {csv_path} and {json_path} ({meta['wall_s']:.0f} s)")
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
