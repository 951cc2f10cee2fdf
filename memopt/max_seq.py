"""``memopt plan --max-seq``: the longest sequence whose training step fits.

The step is captured once with a symbolic sequence length (Note [Planning every length from one
capture]); each candidate length re-prices that graph and plans it again, nothing is traced twice.

Note [Searching the longest length]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Whether a length fits is asked of the cheapest plan that could make it fit, in two steps: the graph as
partitioned (no schedule), and, if that is over the limit, the lowest plan memopt can make (every value
that can be recomputed is, and what the backward still needs from the forward is offloaded, within the
host memory bound; recomputation alone when offload is off). Each answer costs one partition and
simulation, about half a minute for an 8B model on 2 cores, so the search asks few: it doubles from the
captured length until a length fails, then narrows the bracket, by the secant of the two ends' peaks
(a step's peak is close to linear in its length once attention is flash attention) and by bisection in
turn, each time asking the neighbour on the answer's side too, down to one granule (64 tokens, or the
token-elimination block). At the length found the scheduler plans the step for the limit in earnest
(keep, recompute or offload per value, CP-SAT), which is the plan printed with its predicted step time;
if that finds nothing within the limit, the lowest plan is printed, and said so.

Offloads go to host memory, which is finite: ``host_memory`` bounds them (Note [Bounded host memory]),
and without one the search assumes :data:`DEFAULT_HOST_MEMORY`, and says so.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import sympy
import torch

from memopt.config import MemoptConfig, MemoryBudget, parse_options
from memopt.cost_model.bytes import set_hints, shape_env_of
from memopt.errors import MemoptInfeasibleBudget, MemoptUnsupportedError
from memopt.plan import PlanReport, _Capture, capture_step, check_length, load_hf_config, step_report
from memopt.units import format_bytes

__all__ = ["DEFAULT_HOST_MEMORY", "MaxSeqReport", "max_seq"]

DEFAULT_HOST_MEMORY = 128 * 2**30
"""The host memory offloads may use when the options set no ``host_memory``: an 8-GPU server's share per
GPU (1-2 TiB for 8), or a large workstation's."""


@dataclasses.dataclass
class MaxSeqReport:
    """The answer of ``memopt plan --max-seq``."""

    max_seq: int                        # the longest length that fits, a multiple of granule; 0 if none
    granule: int
    limit_bytes: int                    # device memory or the budget, whichever is smaller
    host_limit_bytes: int | None        # the offload host pool's bound (options' host_memory)
    capped_at: int | None               # the model's max_position_embeddings, when it stopped the search
    tried: list[dict[str, Any]]         # per length asked: seq, how, peak, host bytes, fits, seconds
    plan: PlanReport | None             # the step planned at max_seq
    plan_method: str                    # "fits unscheduled" | "scheduled" | "lowest"
    capture_seconds: float
    total_seconds: float
    planner_peak_rss_bytes: int

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["plan"] = self.plan.to_json() if self.plan is not None else None
        return out

    def render(self) -> str:
        lines = [f"memopt plan --max-seq: {self.max_seq:,} tokens fit in {format_bytes(self.limit_bytes)} "
                 f"(multiples of {self.granule}; a prediction of the cost model, not a measurement)",
                 f"  offloads may use {format_bytes(self.host_limit_bytes or 0)} of host memory"]
        if self.capped_at is not None:
            lines.append(f"  capped by the model's max_position_embeddings ({self.capped_at:,}); pass a "
                         "config.json with a longer context to search further")
        lines.append(f"  {'seq':>9} {'asked of':<20} {'peak':>11} {'host':>11}  fits  seconds")
        for row in self.tried:
            lines.append(f"  {row['seq']:>9,} {row['how']:<20} {format_bytes(row['peak_bytes']):>11} "
                         f"{format_bytes(row['host_bytes']):>11}  {'yes' if row['fits'] else 'no ':<4}  "
                         f"{row['seconds']:7.1f}")
        lines.append(f"  captured once in {self.capture_seconds:.0f} s; searched and planned in "
                     f"{self.total_seconds:.0f} s in all, {format_bytes(self.planner_peak_rss_bytes)} peak "
                     "process memory")
        if self.plan is not None:
            lines.append(f"  the plan at {self.max_seq:,} tokens ({self.plan_method}):")
            lines += ["  " + line for line in self.plan.render().splitlines()]
        return "\n".join(lines)


def max_seq(model: str | Any, options: Mapping[str, Any] | MemoptConfig | None = None, *,
            device: str | None = None, batch: int = 1, dtype: str = "bf16", optimizer: str = "adamw",
            start: int = 4096, progress: Callable[[str], None] | None = None) -> MaxSeqReport:
    """The longest sequence (a multiple of 64, or of the token-elimination block) whose step fits the
    device or the options' byte budget (Note [Searching the longest length]). ``start``: the length to
    capture at and search from."""
    say = progress or (lambda message: None)
    started = time.perf_counter()
    config = parse_options(options)
    if config.host_memory is None:
        config = dataclasses.replace(config, host_memory=DEFAULT_HOST_MEMORY)
        say(f"offloads may use {format_bytes(DEFAULT_HOST_MEMORY)} of host memory (options' host_memory to change)")
    granule = math.lcm(64, config.token_elimination.block_size if config.token_elimination else 64)
    start = max(granule, start // granule * granule)
    name, hf_config = load_hf_config(model) if isinstance(model, str) else (type(model).__name__, model)
    cap = getattr(hf_config, "max_position_embeddings", getattr(hf_config, "n_positions", None))
    check_length(name, hf_config, start)
    captured = capture_step(model, None, dataclasses.replace(config, memory_budget=None), device=device, batch=batch, seq=start, dtype=dtype, optimizer=optimizer,
                            progress=say, symbolic_length=True)
    capture_seconds = time.perf_counter() - started
    search = _Search(captured, config, say)
    say(f"searching the longest length that fits {format_bytes(search.limit)} (multiples of {granule})")
    lo, hi, capped = search.bracket(start, granule, cap)
    steps = 0
    while hi - lo > granule:
        lo, hi = search.narrow(lo, hi, granule, secant=steps % 2 == 0)   # secant, then bisection, in turn
        steps += 1
    plan, method = search.final(lo) if lo else (None, "")
    return MaxSeqReport(
        max_seq=lo, granule=granule, limit_bytes=search.limit, host_limit_bytes=config.host_memory,
        capped_at=cap if capped else None, tried=search.tried, plan=plan, plan_method=method,
        capture_seconds=round(capture_seconds, 1), total_seconds=round(time.perf_counter() - started, 1),
        planner_peak_rss_bytes=plan.planner_peak_rss_bytes if plan is not None else 0)


class _Search:
    """Plans of the captured step at candidate lengths (Note [Searching the longest length])."""

    def __init__(self, captured: _Capture, config: MemoptConfig, say: Callable[[str], None]) -> None:
        if len(captured.reports) != 1:
            raise MemoptUnsupportedError(
                f"{captured.name}: the step was captured as {len(captured.reports)} graphs (graph breaks); "
                "--max-seq plans one graph")
        self.captured, self.config, self.say = captured, config, say
        self.report = captured.reports[0]
        self.symbol, self.shape_env = _length_symbol(self.report.joint, captured.seq)
        budget = config.memory_budget
        if budget is not None and budget.nbytes is None:
            raise MemoptUnsupportedError(
                "--max-seq needs a budget in bytes (or none: the device's memory), not a fraction: a fraction "
                "of the activations grows with the length it is searching")
        self.limit = min(captured.profile.memory_bytes, budget.nbytes if budget is not None else 1 << 62)
        self.graph_budget = MemoryBudget(nbytes=self.limit - captured.state_bytes)
        self.tried: list[dict[str, Any]] = []
        self.peaks: dict[int, int] = {}
        self.unscheduled_fails_from: int | None = None   # longer lengths cannot fit unscheduled either

    def _at(self, seq: int, config: MemoptConfig, lowest: bool = False) -> PlanReport:
        set_hints(self.shape_env, {self.symbol: seq}, [self.report.joint])
        self.captured.seq = seq
        assert self.report.replan is not None
        self.report.replan(config, lowest)
        return step_report(self.captured)

    def fits(self, seq: int) -> bool:
        """Whether ``seq`` fits, asked of the unscheduled graph, then of offloading everything."""
        started = time.perf_counter()
        asks = ["unscheduled"] if self.unscheduled_fails_from is None or seq < self.unscheduled_fails_from else []
        asks.append("lowest")
        unscheduled = dataclasses.replace(self.config, memory_budget=None)
        for how in asks:
            report = self._at(seq, unscheduled, lowest=how == "lowest")
            host_ok = self.config.host_memory is None or report.host_peak_bytes <= self.config.host_memory
            fits = report.peak_bytes <= self.limit and host_ok
            if how == "unscheduled" and not fits:
                self.unscheduled_fails_from = min(seq, self.unscheduled_fails_from or seq)
            if fits or how == asks[-1]:
                break
        self.peaks[seq] = report.peak_bytes
        self.tried.append({"seq": seq, "how": how, "peak_bytes": report.peak_bytes,
                           "host_bytes": report.host_peak_bytes, "fits": fits,
                           "seconds": round(time.perf_counter() - started, 1)})
        self.say(f"  {seq:>9,} tokens: {how}, peak {format_bytes(report.peak_bytes)}, host "
                 f"{format_bytes(report.host_peak_bytes)} -> {'fits' if fits else 'does not fit'}")
        return fits

    def bracket(self, start: int, granule: int, cap: int | None) -> tuple[int, int, bool]:
        """(a length that fits or 0, a longer one that does not, whether the cap stopped the search)."""
        top = cap // granule * granule if cap else None
        seq = start
        if not self.fits(seq):
            while seq > granule:
                hi, seq = seq, max(granule, seq // 2 // granule * granule)
                if self.fits(seq):
                    return seq, hi, False
            return 0, seq, False
        while True:
            longer = seq * 2 if top is None else min(seq * 2, top)
            if longer == seq:
                return seq, seq + granule, True
            if not self.fits(longer):
                return seq, longer, False
            seq = longer

    def narrow(self, lo: int, hi: int, granule: int, secant: bool) -> tuple[int, int]:
        """One step between ``lo`` (fits) and ``hi`` (does not): ask the secant's length (or the middle)
        and its neighbour on the side of the answer, so that a good guess ends the search."""
        guess = (lo + hi) // 2 // granule * granule
        p_lo, p_hi = self.peaks.get(lo), self.peaks.get(hi)
        if secant and p_lo is not None and p_hi is not None and p_hi > p_lo:
            estimate = int(lo + (self.limit - p_lo) * (hi - lo) / (p_hi - p_lo)) // granule * granule
            guess = estimate if lo < estimate < hi else guess
        if self.fits(guess):
            if guess + granule >= hi:
                return guess, hi
            return (guess, guess + granule) if not self.fits(guess + granule) else (guess + granule, hi)
        if guess - granule <= lo:
            return lo, guess
        return (guess - granule, guess) if self.fits(guess - granule) else (lo, guess - granule)

    def final(self, seq: int) -> tuple[PlanReport, str]:
        """The plan at ``seq``: unscheduled if it fits so, else scheduled for the limit, else the lowest
        plan (which the search found to fit)."""
        self.say(f"planning the step at {seq:,} tokens for {format_bytes(self.limit)}")
        report = self._at(seq, dataclasses.replace(self.config, memory_budget=None))
        if report.peak_bytes <= self.limit:
            return report, "fits unscheduled"
        try:
            report = self._at(seq, dataclasses.replace(self.config, memory_budget=self.graph_budget))
            if report.peak_bytes <= self.limit and (self.config.host_memory is None
                                                    or report.host_peak_bytes <= self.config.host_memory):
                return report, "scheduled"
        except MemoptInfeasibleBudget:
            pass
        return self._at(seq, dataclasses.replace(self.config, memory_budget=None), lowest=True), "lowest"


def _length_symbol(gm: torch.fx.GraphModule, seq: int) -> tuple[sympy.Symbol, Any]:
    """The symbol of the sequence length in the captured joint graph, and its ShapeEnv."""
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if node.op == "placeholder" and isinstance(value, torch.SymInt) and value.node.hint == seq \
                and len(value.node.expr.free_symbols) == 1:
            return next(iter(value.node.expr.free_symbols)), shape_env_of(value)
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            for size in value.shape:
                if isinstance(size, torch.SymInt) and size.node.hint == seq and size.node.expr.is_Symbol:
                    return size.node.expr, shape_env_of(value)
    raise MemoptUnsupportedError(
        "the captured step does not keep the sequence length symbolic (Dynamo specialised it: some option "
        "or model code reads it as a number), so --max-seq cannot re-price one capture; plan lengths one "
        "at a time with --seq instead")
