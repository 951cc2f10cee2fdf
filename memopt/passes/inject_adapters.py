"""inject_adapters: each prepared linear's adapter, as explicit ops in the model graph.

Dynamo records a prepared linear's adapter as one ``memopt::adapter_delta`` node (Note [Adapters as a
composite op] in :mod:`memopt.runtime.adapters`). This pass replaces each such node by the ops of its
method (LoRA, rsLoRA, DoRA or PaCA), traced from the op's reference with its constant arguments folded
in, so that the graph says what runs: two rank-``r`` matmuls for LoRA, DoRA's row norm computed without
``W + scale * B @ A``, PaCA's column copy. The nodes carry ``meta["memopt_adapter"]`` (the linear's
weight input) for the dumps (``NN_inject_adapters.py``). Nothing else changes: the base linear stays as
it was, and the values are those of the op (which AOTAutograd would otherwise decompose into the same
computation).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from memopt.passes.base import Pass, PassContext, PassResult
from memopt.passes.rewrite import fake_result
from memopt.runtime.adapters import METHOD_CODES, _adapter_delta

_METHODS = {code: name for name, code in METHOD_CODES.items()}
_TENSOR_ARGS = ("x", "base", "weight", "bias", "a", "b", "magnitude", "index")


def is_adapter_node(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in (
        torch.ops.memopt.adapter_delta, torch.ops.memopt.adapter_delta.default)


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    graph = gm.graph
    stats: dict[str, Any] = {}
    for node in [n for n in graph.nodes if is_adapter_node(n)]:
        if node.kwargs or len(node.args) != 13:
            # memopt's hook passes all 13 positionally; anything else is left to AOTAutograd, which
            # decomposes the op into the same computation.
            raise ValueError(f"unexpected call {node.format_node()}")
        tensors = dict(zip(_TENSOR_ARGS, node.args[:8]))
        scale, dropout, training, fan_in_fan_out, method = node.args[8:13]
        tracer = torch.fx.proxy.GraphAppendingTracer(graph)
        # Proxies stand in for the tensors: running the reference on them appends its ops to the graph.
        proxies: dict[str, Any] = {k: (torch.fx.Proxy(v, tracer) if isinstance(v, torch.fx.Node) else None)
                                   for k, v in tensors.items()}
        before = set(graph.nodes)
        with graph.inserting_before(node):
            out: Any = _adapter_delta(
                proxies["x"], proxies["base"], proxies["weight"], proxies["bias"], proxies["a"], proxies["b"],
                proxies["magnitude"], proxies["index"], float(scale), float(dropout), bool(training),
                bool(fan_in_fan_out), int(method))
        made = [n for n in graph.nodes if n not in before]
        # The linear the adapter belongs to, by its weight (or, for a quantized linear, its output).
        owner = tensors["weight"] if isinstance(tensors["weight"], torch.fx.Node) else tensors["base"]
        for new in made:
            new.meta["memopt_adapter"] = owner.name if isinstance(owner, torch.fx.Node) else str(owner)
            for key in ("nn_module_stack", "source_fn_stack", "stack_trace"):
                if key in node.meta:
                    new.meta[key] = node.meta[key]
        for new in made:             # the fake value Dynamo would have recorded (the runner checks for it)
            new.meta["example_value"] = fake_result(new, "example_value")
        node.replace_all_uses_with(out.node)
        graph.erase_node(node)
        name = _METHODS[int(method)] + ("+dropout" if dropout and training else "")
        stats[name] = stats.get(name, 0) + 1
    return PassResult(gm, bool(stats), stats)


INJECT_ADAPTERS = Pass("inject_adapters", "model", run, wanted=lambda config: config.adapters is not None)
