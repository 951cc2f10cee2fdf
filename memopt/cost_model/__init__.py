"""Cost model: tensor bytes (symbolic through sympy), op FLOPs and time against a device profile.

It knows nothing of passes, the compiler or the schedule: graph and profile in, numbers out.
"""

from __future__ import annotations

from memopt.cost_model.bytes import (
    hint_int,
    shape_env_of,
    storage_nbytes,
    storage_nbytes_expr,
    tensor_nbytes_expr,
    value_nbytes,
)
from memopt.cost_model.estimate import (
    COST_META_KEY,
    NodeCost,
    annotate_costs,
    estimate_node,
    graph_time_s,
    transfer_time_s,
)
from memopt.cost_model.flops import flop_formula_for, node_flops
from memopt.cost_model.profile import (
    FORMAT_VERSION,
    DeviceProfile,
    builtin_profile_names,
    load_profile,
    profile_to_json,
)

__all__ = [
    "COST_META_KEY",
    "FORMAT_VERSION",
    "DeviceProfile",
    "NodeCost",
    "annotate_costs",
    "builtin_profile_names",
    "estimate_node",
    "flop_formula_for",
    "graph_time_s",
    "hint_int",
    "load_profile",
    "node_flops",
    "profile_to_json",
    "shape_env_of",
    "storage_nbytes",
    "storage_nbytes_expr",
    "tensor_nbytes_expr",
    "transfer_time_s",
    "value_nbytes",
]
