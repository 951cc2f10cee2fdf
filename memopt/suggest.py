"""What would fit: ``memopt plan``'s suggestions for a step that does not fit its device.

Note [Suggestions are plans]
A suggestion is only worth printing with its number, and its number only worth trusting if it was
planned the way the user's own configuration was. So each suggestion is the user's options plus one
change, planned in full (the same capture, passes, schedule and simulation as ``memopt plan``), in the
order of what changes the least: a memory budget of the device's memory with offload (the same training,
recompute and host copies), LoRA adapters (the base frozen), QLoRA (the base frozen and stored in NF4),
QLoRA under the budget, and half the sequence length (the user's options, less data per step). A change
the options already make is skipped. A budget that no plan meets is reported with the lowest peak it
reached, not dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from memopt.errors import MemoptInfeasibleBudget, memopt_cause
from memopt.units import format_bytes

LORA: dict[str, Any] = {"method": "lora", "rank": 16, "alpha": 32, "targets": "all-linear"}
NF4: dict[str, Any] = {"weights": "nf4", "double_quant": True}
HEADROOM = 0.95      # of the device's memory, for the allocator's fragmentation and the CUDA context


@dataclasses.dataclass
class Suggestion:
    change: str                      # what differs from the user's configuration, in words
    options: dict[str, Any]          # the options it was planned with
    seq: int
    peak_bytes: int | None           # the planned peak; None when no plan meets the suggestion's budget
    fits: bool
    note: str = ""                   # why no plan: the lowest peak the budget's search reached

    def line(self) -> str:
        peak = format_bytes(self.peak_bytes) if self.peak_bytes is not None else "no plan"
        return f"    {self.change:<44} {peak:>11}  {'fits' if self.fits else 'does not fit'}" + (
            f" ({self.note})" if self.note else "")


def candidates(options: Mapping[str, Any], seq: int, device_bytes: int) -> list[tuple[str, dict[str, Any], int]]:
    """(change, options, seq) to plan, in order (Note [Suggestions are plans])."""
    limit = int(HEADROOM * device_bytes)
    budget = {"memory_budget": limit, "offload": "auto"}
    out: list[tuple[str, dict[str, Any], int]] = []
    if options.get("memory_budget") is None or options.get("offload") is False:
        out.append((f"memory_budget {format_bytes(limit)}, offload", {**options, **budget}, seq))
    if options.get("adapters") is None and options.get("sparse_backprop") is None:
        out.append(("LoRA r16 on every linear (adapters)", {**options, "adapters": LORA}, seq))
    if options.get("quantize") is None and options.get("sparse_backprop") is None:
        adapters = options.get("adapters") or LORA
        qlora = {**options, "adapters": adapters, "quantize": NF4}
        out.append(("QLoRA: LoRA r16 on NF4 base weights", qlora, seq))
        out.append(("QLoRA, with the memory_budget above", {**qlora, **budget}, seq))
    if seq >= 128:
        out.append((f"sequence {seq // 2} instead of {seq}", dict(options), seq // 2))
    return out


def suggest(plan_one: Callable[[dict[str, Any], int], Any], options: Mapping[str, Any], seq: int,
            device_bytes: int, say: Callable[[str], None]) -> list[Suggestion]:
    """Plan each candidate with ``plan_one(options, seq)`` (a ``PlanReport``); report what each needs."""
    out = []
    for index, (change, candidate, length) in enumerate(candidates(options, seq, device_bytes), 1):
        say(f"suggestion {index}: {change}")
        try:
            report = plan_one(candidate, length)
        except Exception as err:  # noqa: BLE001 - Dynamo wraps the backend's errors; find ours
            infeasible = memopt_cause(err, MemoptInfeasibleBudget)
            if infeasible is None:
                raise
            lowest = infeasible.min_peak_bytes
            out.append(Suggestion(change, candidate, length, None, False,
                                  f"the lowest plan peaks at {format_bytes(lowest)}" if lowest else ""))
            continue
        out.append(Suggestion(change, candidate, length, report.peak_bytes,
                              report.fits_device and report.fits_budget is not False))
    return out


def render(suggestions: list[Suggestion]) -> str:
    if not suggestions:
        return "  nothing to suggest: the options already use a budget, adapters and quantization"
    lines = ["  what would fit (each planned as memopt plan plans, the options shown with --json):",
             f"    {'change':<44} {'peak':>11}"]
    return "\n".join(lines + [s.line() for s in suggestions])
