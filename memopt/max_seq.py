"""``memopt plan --max-seq``: the longest sequence whose training step fits.

The step is captured once with a symbolic sequence length (Note [Planning every length from one
capture]); each candidate length re-prices that graph and plans it again, nothing is traced twice.

Note [Searching the longest length]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Whether a length fits is asked of the lowest plan memopt can make there (``replan(..., lowest=True)``
in :mod:`memopt.compiler.capture`): every saved value offloaded when the host can hold them all; else
each repeated layer recomputed in the backward, attention included, and what the layers hand each other
offloaded within the host bound, as Unsloth's offloaded checkpointing does; the unscheduled graph when
that is lower. An answer costs a partition and a simulation, about 30 s for an 8B model on 2 cores, and
14 s on a partition made at an earlier length (Note [Reusing partitions across lengths]), so the search
asks few. A step's peak is close to linear in its length once attention is flash attention, so the next
length is where the line through the two asked lengths nearest the limit crosses it: before any length
has failed, growing 1.25x to 8x; then inside the bracket, the line and bisection take turns (where the
host fills up the peak has a kink, which slows the line down). When the line predicted the peak of the
length it guessed within one granule's worth, or once the bracket is down to 16 granules, the guess's
neighbour on the answer's side is asked too, which ends the search when the line is right; it stops at
one granule (64 tokens, or token elimination's block). Once a length's lowest plan is the checkpointed
one, longer lengths' are too, and are asked without the baseline's partition. The answer is asked again
on fresh partitions (it fits, one granule more does not). At the length found, the plan printed with
its predicted step time is the unscheduled graph if it fits, else the lowest plan: at the longest length
there is no slack for the scheduler to trade memory for time (CP-SAT would cost minutes to find the
same plan). Lengths are asked only where the capture's guards hold (:func:`_failed_guards`).

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

from memopt.config import MemoptConfig, parse_options
from memopt.cost_model.bytes import hints_of, set_hints, shape_env_of
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
    """The longest sequence (a multiple of :data:`GRANULE`, and of token elimination's block) whose step
    fits the device or the options' byte budget (Note [Searching the longest length]). ``start``: the
    length to capture at and search from."""
    say = progress or (lambda message: None)
    started = time.perf_counter()
    config = parse_options(options)
    if config.memory_budget is not None and config.memory_budget.nbytes is None:
        raise MemoptUnsupportedError(
            "--max-seq needs a budget in bytes (or none: the device's memory), not a fraction: a fraction "
            "of the activations grows with the length it is searching")
    if config.host_memory is None:
        config = dataclasses.replace(config, host_memory=DEFAULT_HOST_MEMORY)
        say(f"offloads may use {format_bytes(DEFAULT_HOST_MEMORY)} of host memory (options' host_memory to change)")
    granule, start = _granule_and_start(config, start)
    cap = max_positions(load_hf_config(model)[1] if isinstance(model, str) else model)
    captured = capture_step(model, None, dataclasses.replace(config, memory_budget=None), device=device,
                            batch=batch, seq=start, dtype=dtype, optimizer=optimizer, progress=say,
                            symbolic_length=True)
    capture_seconds = time.perf_counter() - started
    search = _Search(captured, config, say)
    say(f"searching the longest length that fits {format_bytes(search.limit)} (multiples of {granule})")
    lo, capped = search.search(start, granule, cap)
    if not search.confirmed(lo, granule, cap):
        say(f"fresh partitions disagree with the reused ones at {lo:,} tokens: searching again with fresh ones")
        search.peaks.clear()
        search.fresh = True
        lo, capped = search.search(max(lo, granule), granule, cap)
    plan, method = search.final(lo) if lo else (None, "")
    return MaxSeqReport(
        max_seq=lo, granule=granule, limit_bytes=search.limit, host_limit_bytes=config.host_memory,
        capped_at=cap if capped else None, tried=search.tried, plan=plan, plan_method=method,
        capture_seconds=round(capture_seconds, 1), total_seconds=round(time.perf_counter() - started, 1),
        planner_peak_rss_bytes=peak_rss_bytes())


def _granule_and_start(config: MemoptConfig, start: int) -> tuple[int, int]:
    """The lengths to search are multiples of the granule; the capture's, of three blocks of token
    elimination at least: it skips a sequence of one, and at two, the blocks but one are one, a size torch
    specialises (the capture would then hold at two blocks only)."""
    if config.token_elimination is None:
        return GRANULE, max(GRANULE, start // GRANULE * GRANULE)
    block = config.token_elimination.block_size
    granule = math.lcm(GRANULE, block)
    return granule, max(-(-3 * block // granule) * granule, start // granule * granule)


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
        self.captured_at = captured.seq
        budget = config.memory_budget.nbytes if config.memory_budget is not None else None
        self.limit = min(captured.profile.memory_bytes, budget if budget is not None else 1 << 62)
        self.tried: list[dict[str, Any]] = []
        self.peaks: dict[int, int] = {}
        self.fitting: dict[int, tuple[PlanReport, str]] = {}    # the lowest plans that fit, and how
        self.unscheduled = dataclasses.replace(config, memory_budget=None)
        self.checkpointed_from: int | None = None     # from here on the lowest plan is the checkpointed one
        self.fresh = False                            # every ask on a partition of its own
        self.shortest = GRANULE                       # the shortest length the capture holds for

    def _at(self, seq: int, config: MemoptConfig, lowest: bool | str = False, fresh: bool = True) -> PlanReport:
        failed = _failed_guards(self.shape_env, self.symbol, seq)
        if failed:
            raise MemoptUnsupportedError(
                f"--max-seq: the step captured at {self.captured_at:,} tokens is not the step at {seq:,} (the "
                f"capture assumed {failed[0]}); search from a length closer to {seq:,} (--seq)")
        set_hints(self.shape_env, {self.symbol: seq}, [self.report.joint])
        self.captured.seq = seq
        assert self.report.replan is not None
        self.report.replan(config, lowest, reuse_partitions=not fresh)
        return step_report(self.captured)

    def _lowest(self, seq: int, fresh: bool) -> tuple[PlanReport, str]:
        """The lowest plan at ``seq`` and how it was made: baseline, offloaded or checkpointed."""
        checkpointed = self.checkpointed_from is not None and seq >= self.checkpointed_from
        report = self._at(seq, self.unscheduled, lowest="checkpointed" if checkpointed else True, fresh=fresh)
        assert self.report.schedule is not None
        how = self.report.schedule.method
        if how == "checkpointed" and not checkpointed:
            # Longer lengths save more than the host holds too, and checkpointing beats their baseline.
            self.checkpointed_from = seq
        return report, how

    def fits(self, seq: int, fresh: bool = False) -> bool:
        """Whether ``seq`` fits, asked of the lowest plan (or the unscheduled graph, when that is lower),
        on partitions made at an earlier length unless ``fresh`` (Note [Reusing partitions across
        lengths])."""
        started = time.perf_counter()
        fresh = fresh or self.fresh
        report, how = self._lowest(seq, fresh)
        fits = report.peak_bytes <= self.limit and (self.config.host_memory is None
                                                    or report.host_peak_bytes <= self.config.host_memory)
        self.peaks[seq] = report.peak_bytes
        if fits:
            self.fitting[seq] = (report, how)
        self.tried.append({"seq": seq, "how": how, "fresh": fresh, "peak_bytes": report.peak_bytes,
                           "host_bytes": report.host_peak_bytes, "fits": fits,
                           "seconds": round(time.perf_counter() - started, 1)})
        self.say(f"  {seq:>9,} tokens: {how}{' (fresh partition)' if fresh else ''}, peak "
                 f"{format_bytes(report.peak_bytes)}, host "
                 f"{format_bytes(report.host_peak_bytes)} -> {'fits' if fits else 'does not fit'}")
        return fits

    def search(self, start: int, granule: int, top: int | None) -> tuple[int, bool]:
        """(the longest length that fits, 0 if none; whether ``top``, the model's longest, stopped it)."""
        top = top // granule * granule if top else None
        self.shortest = next((s for s in range(granule, start, granule)
                              if not _failed_guards(self.shape_env, self.symbol, s)), start)
        lo, hi = 0, None                                     # the longest that fits, the shortest that does not
        seq, line, steps = max(self.shortest, min(start, top or start)), None, 0
        while hi is None or hi - lo > granule:
            fits = self.fits(seq)
            lo, hi = (seq, hi) if fits else (lo, seq)
            neighbour = seq + granule if fits else seq - granule
            if self._near(seq, line, lo, hi, granule) and max(lo, self.shortest - 1) < neighbour \
                    and (hi is None or neighbour < hi) and (top is None or neighbour <= top):
                lo, hi = (neighbour, hi) if self.fits(neighbour) else (lo, neighbour)
            if lo == top or (hi is not None and hi - lo <= granule):
                break
            steps += hi is not None
            seq, line = self._next(lo, hi, granule, top, secant=steps % 2 == 1)
            if seq < self.shortest:              # below what the capture holds for (Note [Planning every ...])
                if hi is not None and hi <= self.shortest:
                    break                                    # not even the shortest length fits
                seq = self.shortest
        return lo, lo == top

    def confirmed(self, lo: int, granule: int, top: int | None) -> bool:
        """Whether fresh partitions agree with the search's answer: ``lo`` fits (when not 0) and one
        granule more does not (when the model admits it)."""
        if lo and not self.fits(lo, fresh=True):
            return False
        above = lo + granule if lo else self.shortest
        return (top is not None and above > top) or not self.fits(above, fresh=True)

    def _near(self, seq: int, line: tuple[int, float, float] | None, lo: int, hi: int | None, granule: int,
              ) -> bool:
        """Whether to ask ``seq``'s neighbour too: when the line that guessed it predicted its peak within
        one granule's worth (the limit is crossed next to it), or once the bracket is down to 16 granules
        (where one more ask often ends the search)."""
        if line is not None:
            s1, p1, slope = line
            if abs(self.peaks[seq] - (p1 + slope * (seq - s1))) <= abs(slope) * granule:
                return True
        return hi is not None and hi - lo <= 16 * granule

    def _next(self, lo: int, hi: int | None, granule: int, top: int | None, secant: bool = True,
              ) -> tuple[int, tuple[int, float, float] | None]:
        """The next length to ask, and the line that guessed it (a point and its slope), if one did: where
        the line through the two asked lengths nearest the limit crosses it, kept inside the bracket
        (bisection when it would not be, or when not ``secant``: a peak with a kink, where the host fills
        up, slows the secant down); before a length has failed, growing by 1.25x to 8x (to ``top`` at most)."""
        below = [s for s in sorted(self.peaks) if s <= lo][-2 if hi is None else -1:]
        pair = below + ([hi] if hi is not None else [])
        guess, line = None, None
        if len(pair) >= 2 and self.peaks[pair[-1]] != self.peaks[pair[-2]]:
            (s1, s2), (p1, p2) = pair[-2:], (self.peaks[pair[-2]], self.peaks[pair[-1]])
            line = (s1, float(p1), (p2 - p1) / (s2 - s1))
            guess = int(s1 + (self.limit - p1) / line[2]) // granule * granule
        if hi is None:
            # Without a secant (or with one pointing back), grow by a quarter at least.
            smallest = lo + granule if guess is not None and guess > lo else max(lo, granule) * 5 // 4
            largest = max(lo, granule) * 8
            grown = max(smallest, min(largest, guess if guess is not None else 2 * max(lo, granule)))
            grown = grown // granule * granule if top is None else min(top, grown // granule * granule)
            return grown, line if guess is not None and grown == guess else None
        if secant and guess is not None and lo < guess < hi:
            return guess, line
        middle = (lo + hi) // 2 // granule * granule
        return (middle if lo < middle < hi else lo + granule), None

    def final(self, seq: int) -> tuple[PlanReport, str]:
        """The plan at ``seq`` (a length the search found to fit): the unscheduled graph if it fits, else
        the lowest plan the search made there. At the longest length there is no slack for the scheduler
        to trade memory for time, so it is not run (it costs minutes on an 8B model): ``memopt plan --seq
        N --budget B`` plans a shorter one."""
        self.say(f"planning the step at {seq:,} tokens for {format_bytes(self.limit)}")
        if self._at(seq, self.unscheduled, fresh=False).peak_bytes <= self.limit:
            report = self._at(seq, self.unscheduled)            # the plan shown, on a fresh partition
            if report.peak_bytes <= self.limit:
                return report, "fits unscheduled"
        lowest, how = self.fitting[seq]
        return lowest, f"lowest ({how})"


def _failed_guards(shape_env: Any, symbol: sympy.Symbol, seq: int) -> list[str]:
    """The assumptions the capture made about the length (its ShapeEnv's range and guards) that do not
    hold at ``seq``: the graph, and so its plan, is the step's only where they all hold (Note [Planning
    every length from one capture]). Token elimination, say, assumes more than one block."""
    lower = shape_env.var_to_range[symbol].lower if symbol in shape_env.var_to_range else 0
    if seq < lower:
        return [f"{symbol} >= {lower}"]
    values = {**hints_of(shape_env), symbol: sympy.Integer(seq)}
    return [str(g.expr) for g in shape_env.guards if g.expr.xreplace(values) is not sympy.true]


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
