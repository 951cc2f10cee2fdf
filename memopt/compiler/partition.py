"""Partition the joint graph into the forward and backward graphs.

memopt realises its memory decisions through the tags torch's partitioner already honours —
``node.meta["recompute"]`` (``CheckpointPolicy.MUST_SAVE`` / ``MUST_RECOMPUTE``) and
``node.meta["should_offload"]`` — rather than a partitioner of its own (see DESIGN.md). Until the
scheduler sets any tag, this is torch's min-cut rematerialization partition, the same one Inductor uses by
default, so memopt's graphs are Inductor's graphs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx
from torch._functorch.partitioners import min_cut_rematerialization_partition


def partition_joint(joint_gm: torch.fx.GraphModule, joint_inputs: Sequence[object], *, num_fwd_outputs: int,
                    static_lifetime_input_indices: list[int] | None = None,
                    ) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    return min_cut_rematerialization_partition(
        joint_gm, joint_inputs, compiler="inductor", num_fwd_outputs=num_fwd_outputs,
        static_lifetime_input_indices=static_lifetime_input_indices)
