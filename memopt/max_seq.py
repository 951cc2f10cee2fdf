"""``memopt plan --max-seq``: the longest sequence whose training step fits.

The step is captured once with a symbolic sequence length (Note [Planning every length from one
capture]); each candidate length re-prices that graph and plans it again, nothing is traced twice.

Note [Searching the longest length]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Whether a length fits is asked of the lowest plan memopt can make there (``replan(..., lowest=True)``
in :mod:`memopt.compiler.capture`): every saved value offloaded when the host can hold them all; else
each repeated layer recomputed in the backward, attention included, and what the layers hand each other
offloaded within the host bound, as Unsloth's offloaded checkpointing does; the unscheduled graph when
that is lower. Each answer costs two partitions and a simulation, about 50 s for an 8B model on 2 cores,
so the search asks few. A step's peak is close to linear in its length once attention is flash attention,
so the next length is where the line through the two asked lengths nearest the limit crosses it: before
any length has failed, growing 1.25x to 8x; then inside the bracket, bisecting when the line points
outside it. A guess of the line before any failure, and any guess once the bracket is down to 16
granules, asks its neighbour on the answer's side too, so that a straight line ends the search in one
step; inside a bracket the line and bisection take turns (where the host fills up
the peak has a kink, which slows the line down); it stops at one granule (64 tokens). Once a length's
lowest plan is the checkpointed one, longer lengths' are too, and are asked without the baseline's
partition. At the length found, the plan printed with its predicted step time is the unscheduled graph
if it fits, else the lowest plan: at the longest length there is no slack for the scheduler to trade
memory for time (CP-SAT would cost minutes to find the same plan).

Offloads go to host memory, which is finite: ``host_memory`` bounds them (Note [Bounded host memory]),
and without one the search assumes :data:`DEFAULT_HOST_MEMORY`, and says so.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import sympy
import torch

from memopt.config import MemoptConfig, parse_options
from memopt.cost_model.bytes import set_hints, shape_env_of
from memopt.errors import MemoptUnsupportedError
from memopt.plan import (
    CapturedStep,
    PlanReport,
    capture_step,
    load_hf_config,
    max_positions,
    peak_rss_bytes,
    step_report,
)
from memopt.units import format_bytes

__all__ = ["DEFAULT_HOST_MEMORY", "GRANULE", "MaxSeqReport", "max_seq"]

GRANULE = 64
"""The lengths searched are its multiples (a tile of the attention kernels)."""

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
    plan_method: str                    # "fits unscheduled" | "lowest (offloaded)" | "lowest (checkpointed)"
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
    """The longest sequence (a multiple of :data:`GRANULE`) whose step fits the device or the options'
    byte budget (Note [Searching the longest length]). ``start``: the length to
    capture at and search from."""
    say = progress or (lambda message: None)
    started = time.perf_counter()
    config = parse_options(options)
    if config.token_elimination is not None:
        raise MemoptUnsupportedError(
            "--max-seq does not search with token_elimination yet: its kept-token count is a number computed "
            "from the captured length, so the graph cannot be re-priced at another; plan lengths one at a "
            "time with --seq (and token_elimination) instead")
    if config.memory_budget is not None and config.memory_budget.nbytes is None:
        raise MemoptUnsupportedError(
            "--max-seq needs a budget in bytes (or none: the device's memory), not a fraction: a fraction "
            "of the activations grows with the length it is searching")
    if config.host_memory is None:
        config = dataclasses.replace(config, host_memory=DEFAULT_HOST_MEMORY)
        say(f"offloads may use {format_bytes(DEFAULT_HOST_MEMORY)} of host memory (options' host_memory to change)")
    granule = GRANULE
    start = max(granule, start // granule * granule)
    cap = max_positions(load_hf_config(model)[1] if isinstance(model, str) else model)
    captured = capture_step(model, None, dataclasses.replace(config, memory_budget=None), device=device,
                            batch=batch, seq=start, dtype=dtype, optimizer=optimizer, progress=say,
                            symbolic_length=True)
    capture_seconds = time.perf_counter() - started
    search = _Search(captured, config, say)
    say(f"searching the longest length that fits {format_bytes(search.limit)} (multiples of {granule})")
    lo, capped = search.search(start, granule, cap)
    plan, method = search.final(lo) if lo else (None, "")
    return MaxSeqReport(
        max_seq=lo, granule=granule, limit_bytes=search.limit, host_limit_bytes=config.host_memory,
        capped_at=cap if capped else None, tried=search.tried, plan=plan, plan_method=method,
        capture_seconds=round(capture_seconds, 1), total_seconds=round(time.perf_counter() - started, 1),
        planner_peak_rss_bytes=peak_rss_bytes())


class _Search:
    """Plans of the captured step at candidate lengths (Note [Searching the longest length])."""

    def __init__(self, captured: CapturedStep, config: MemoptConfig, say: Callable[[str], None]) -> None:
        if len(captured.reports) != 1:
            raise MemoptUnsupportedError(
                f"{captured.name}: the step was captured as {len(captured.reports)} graphs (graph breaks); "
                "--max-seq plans one graph")
        self.captured, self.config, self.say = captured, config, say
        self.report = captured.reports[0]
        self.symbol, self.shape_env = _length_symbol(self.report.joint, captured.seq)
        budget = config.memory_budget.nbytes if config.memory_budget is not None else None
        self.limit = min(captured.profile.memory_bytes, budget if budget is not None else 1 << 62)
        self.tried: list[dict[str, Any]] = []
        self.peaks: dict[int, int] = {}
        self.fitting: dict[int, tuple[PlanReport, str]] = {}    # the lowest plans that fit, and how
        self.unscheduled = dataclasses.replace(config, memory_budget=None)
        self.checkpointed_from: int | None = None     # from here on the lowest plan is the checkpointed one

    def _at(self, seq: int, config: MemoptConfig, lowest: bool | str = False) -> PlanReport:
        set_hints(self.shape_env, {self.symbol: seq}, [self.report.joint])
        self.captured.seq = seq
        assert self.report.replan is not None
        self.report.replan(config, lowest)
        return step_report(self.captured)

    def _lowest(self, seq: int) -> tuple[PlanReport, str]:
        """The lowest plan at ``seq`` and how it was made: baseline, offloaded or checkpointed."""
        checkpointed = self.checkpointed_from is not None and seq >= self.checkpointed_from
        report = self._at(seq, self.unscheduled, lowest="checkpointed" if checkpointed else True)
        assert self.report.schedule is not None
        how = self.report.schedule.method
        if how == "checkpointed" and not checkpointed:
            # Longer lengths save more than the host holds too, and checkpointing beats their baseline.
            self.checkpointed_from = seq
        return report, how

    def fits(self, seq: int) -> bool:
        """Whether ``seq`` fits, asked of the lowest plan (or the unscheduled graph, when that is lower)."""
        started = time.perf_counter()
        report, how = self._lowest(seq)
        fits = report.peak_bytes <= self.limit and (self.config.host_memory is None
                                                    or report.host_peak_bytes <= self.config.host_memory)
        self.peaks[seq] = report.peak_bytes
        if fits:
            self.fitting[seq] = (report, how)
        self.tried.append({"seq": seq, "how": how, "peak_bytes": report.peak_bytes,
                           "host_bytes": report.host_peak_bytes, "fits": fits,
                           "seconds": round(time.perf_counter() - started, 1)})
        self.say(f"  {seq:>9,} tokens: {how}, peak {format_bytes(report.peak_bytes)}, host "
                 f"{format_bytes(report.host_peak_bytes)} -> {'fits' if fits else 'does not fit'}")
        return fits

    def search(self, start: int, granule: int, top: int | None) -> tuple[int, bool]:
        """(the longest length that fits, 0 if none; whether ``top``, the model's longest, stopped it)."""
        top = top // granule * granule if top else None
        lo, hi = 0, None                                     # the longest that fits, the shortest that does not
        seq, estimated, steps = min(start, top or start), False, 0
        while hi is None or hi - lo > granule:
            if self.fits(seq):
                lo = seq
                if self._near(lo, hi, granule, estimated) and (hi is None or seq + granule < hi) and seq != top:
                    # The neighbour above, which may end the search.
                    if self.fits(seq + granule):
                        lo = seq + granule
                    else:
                        hi = seq + granule
            else:
                hi = seq
                if seq - granule > lo and self._near(lo, hi, granule, estimated):
                    if self.fits(seq - granule):
                        lo = seq - granule
                    else:
                        hi = seq - granule
            if lo == top or (hi is not None and hi - lo <= granule):
                break
            steps += hi is not None
            seq, estimated = self._next(lo, hi, granule, top, secant=steps % 2 == 1)
        return lo, lo == top

    @staticmethod
    def _near(lo: int, hi: int | None, granule: int, estimated: bool) -> bool:
        """Whether to ask a guess's neighbour too: after the line's guess before any failure (a straight
        peak ends there), or once the bracket is down to 16 granules (where one more ask often ends it)."""
        return (hi is None and estimated) or (hi is not None and hi - lo <= 16 * granule)

    def _next(self, lo: int, hi: int | None, granule: int, top: int | None, secant: bool = True,
              ) -> tuple[int, bool]:
        """The next length to ask, and whether it is the secant's: where the line through the two asked
        lengths nearest the limit crosses it, kept inside the bracket (bisection when it would not be, or
        when not ``secant``: a peak with a kink, where the host fills up, slows the secant down); before a
        length has failed, growing by 1.25x to 8x (to ``top`` at most)."""
        below = [s for s in sorted(self.peaks) if s <= lo][-2 if hi is None else -1:]
        pair = below + ([hi] if hi is not None else [])
        guess = None
        if len(pair) >= 2 and self.peaks[pair[-1]] != self.peaks[pair[-2]]:
            (s1, s2), (p1, p2) = pair[-2:], (self.peaks[pair[-2]], self.peaks[pair[-1]])
            guess = int(s1 + (self.limit - p1) * (s2 - s1) / (p2 - p1)) // granule * granule
        if hi is None:
            # Without a secant (or with one pointing back), grow by a quarter at least.
            smallest = lo + granule if guess is not None and guess > lo else max(lo, granule) * 5 // 4
            largest = max(lo, granule) * 8
            grown = max(smallest, min(largest, guess if guess is not None else 2 * max(lo, granule)))
            grown = grown // granule * granule if top is None else min(top, grown // granule * granule)
            return grown, guess is not None and smallest <= guess <= largest
        if secant and guess is not None and lo < guess < hi:
            return guess, True
        middle = (lo + hi) // 2 // granule * granule
        return (middle if lo < middle < hi else lo + granule), False

    def final(self, seq: int) -> tuple[PlanReport, str]:
        """The plan at ``seq`` (a length the search found to fit): the unscheduled graph if it fits, else
        the lowest plan the search made there. At the longest length there is no slack for the scheduler
        to trade memory for time, so it is not run (it costs minutes on an 8B model): ``memopt plan --seq
        N --budget B`` plans a shorter one."""
        self.say(f"planning the step at {seq:,} tokens for {format_bytes(self.limit)}")
        report = self._at(seq, self.unscheduled)
        if report.peak_bytes <= self.limit:
            return report, "fits unscheduled"
        lowest, how = self.fitting[seq]
        return lowest, f"lowest ({how})"


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
