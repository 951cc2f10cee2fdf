"""The hand-off of memopt's graphs to Inductor.

Note [Keeping Inductor's fusion near the plan]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Inductor fuses *horizontally* (two kernels that read the same buffer, neither feeding the other) across
up to 64 nodes of the graph. In a backward with recomputation that hoists a recomputed op next to an
earlier reader of the same saved value, and its output then lives from there to its real use: the
memory the schedule freed comes back. Measured on the tiny Llama (torch's knapsack cut at 0.5): the FX
backward peaks at 22.4 MiB, Inductor's at 26.4 MiB; with horizontal fusion limited to nodes at most
:data:`MAX_HORIZONTAL_FUSION_DISTANCE` apart, at 22.6 MiB. (Reordering is not the cause:
``reorder_for_peak_memory`` off changes nothing.) It is not the whole gap: a plan of the scheduler's on
the same model simulates at 22.5 MiB and tracks at 25.3 MiB with Inductor's limit, 23.9 MiB with this
one, and 24.4 MiB with no horizontal fusion at all; the budget is still checked on the FX graphs.

So when a memory budget is set, memopt compiles its graphs with an ``InductorChoices`` whose
``can_fuse_horizontal`` refuses fusions between distant nodes (vertical fusion, producer into consumer,
is untouched: it never lengthens a lifetime), installed with ``V.set_choices_handler`` for the duration
of the compilation, and with the backward lowered at once (``force_non_lazy_backward_lowering``) rather
than at the first backward call, when the handler would be gone. Inductor reads its choices handler per
thread and keeps the first one it creates, so its ``inductor_choices_class`` option cannot do this.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._inductor.choices import InductorChoices
from torch._inductor.custom_graph_pass import CustomPartitionerFn

__all__ = ["MAX_HORIZONTAL_FUSION_DISTANCE", "PlanKeepingChoices", "compile_with_inductor"]

# Node positions two kernels may be apart and still fuse horizontally (Inductor's own limit is 64).
MAX_HORIZONTAL_FUSION_DISTANCE = 4


class PlanKeepingChoices(InductorChoices):
    """Inductor's heuristics, with horizontal fusion kept local (Note [Keeping Inductor's fusion near
    the plan])."""

    @staticmethod
    def can_fuse_horizontal(scheduler: Any, node1: Any, node2: Any, shared_data_score: int) -> bool:
        distance = max(abs(node1.min_order - node2.max_order), abs(node2.min_order - node1.max_order))
        if distance > MAX_HORIZONTAL_FUSION_DISTANCE:
            return False
        return InductorChoices.can_fuse_horizontal(scheduler, node1, node2, shared_data_score)


def compile_with_inductor(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                          partitioner: CustomPartitionerFn, *, keep_plan: bool, reuse: bool) -> Callable[..., Any]:
    """``compile_fx`` with memopt's partition hook; with ``keep_plan`` (a memory budget is set), the
    fusion limit above and the backward compiled now; without ``reuse``, AOTAutograd's cache off."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.virtualized import V

    def compile_now() -> Callable[..., Any]:
        compiled: Callable[..., Any] = compile_fx(  # type: ignore[assignment]
            gm, list(example_inputs), config_patches={"custom_partitioner_fn": partitioner})
        return compiled

    # AOTAutograd's cache skips memopt's joint stage, its plan and its reports: only a stage that may be
    # skipped lets it (Note [Inductor's caches and the joint stage] in memopt/compiler/capture.py).
    # Inductor's FX graph cache stays on either way.
    with contextlib.ExitStack() as stack:
        if not reuse:
            stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
        if not keep_plan:
            return compile_now()
        with torch._functorch.config.patch(force_non_lazy_backward_lowering=True), \
                V.set_choices_handler(PlanKeepingChoices()):
            return compile_now()
