"""The one runner every pass goes through.

For each pass it: skips it when disabled by name (option ``disable_passes`` or ``MEMOPT_DISABLE_PASSES``)
or not asked for by the options; lints the graph and checks node metadata before and after; checks that
the graph's outputs are what they were (count, shapes, dtypes, which ones are gradients: Note [What a
pass must keep]); times it;
tags the nodes it made with ``meta["memopt_pass"]``; records stats (nodes added/removed, the pass's own
counts, and for joint graphs the predicted saved-activation bytes and peak before/after); and dumps the
result. A pass that raises, or leaves a graph that fails the checks, is undone (the graph it was given is
restored) with a warning naming the pass and the reason, or re-raised as :class:`MemoptPassError` with
``strict=True``.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch.fx

from memopt.compiler.dump import Dumper
from memopt.config import MemoptConfig
from memopt.errors import MemoptConfigError, MemoptPassError
from memopt.names import gradient_outputs
from memopt.passes.base import Pass, PassContext, PassResult, Stage


class MemoptPassWarning(UserWarning):
    """A pass failed and was skipped; the graph continues without its rewrite."""


@dataclasses.dataclass
class PassRecord:
    name: str
    stage: Stage
    status: str                 # "changed" | "unchanged" | "disabled" | "not requested" | "failed"
    seconds: float = 0.0
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    reason: str | None = None


def check_order(passes: Sequence[Pass]) -> None:
    """Model passes before joint passes; every ``after`` constraint met; names unique; no lossy pass
    runs unless an option asks for it."""
    names = [p.name for p in passes]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise MemoptConfigError(f"pass pipeline lists {dup} more than once; each pass runs once")
    seen_joint = False
    for index, p in enumerate(passes):
        if p.stage not in ("model", "joint"):
            raise MemoptConfigError(f"pass {p.name!r} has stage {p.stage!r}; expected 'model' or 'joint'")
        if p.stage == "joint":
            seen_joint = True
        elif seen_joint:
            raise MemoptConfigError(
                f"model-graph pass {p.name!r} is listed after a joint-graph pass; model passes run "
                "before AOTAutograd, so list them first")
        if p.lossy and p.wanted(MemoptConfig()):
            raise MemoptConfigError(
                f"pass {p.name!r} is lossy but runs under the default options; a lossy pass must run only "
                "when its option asks for it (give it a `wanted` that reads that option)")
        for before in p.after:
            if before in names and names.index(before) > index:
                raise MemoptConfigError(
                    f"pass {p.name!r} must run after {before!r} but is listed before it")


def _meta_key(stage: Stage) -> str:
    # Dynamo records traced values as "example_value"; AOTAutograd's graphs carry "val".
    return "example_value" if stage == "model" else "val"


def check_graph(gm: torch.fx.GraphModule, stage: Stage, *, where: str,
                new_nodes: Sequence[torch.fx.Node] = ()) -> None:
    """Lint the graph; check that every node a pass made whose value is used carries its metadata.

    Nodes already in the graph are not held to it: Dynamo leaves side-effect calls such as
    ``_set_grad_enabled`` without an example value.
    """
    gm.graph.lint()
    key = _meta_key(stage)
    for node in new_nodes:
        if node.op in ("call_function", "call_method", "call_module") and node.users and key not in node.meta:
            raise MemoptPassError(
                f"{where}: node {node.name!r} ({node.op} {node.target}) has no meta[{key!r}]; every pass "
                f"must set it on the nodes it creates (copy it from the node it replaces, or run the op on "
                "fake tensors)")


# Note [What a pass must keep]
# A pass rewrites how a graph computes its outputs, never what they are: AOTAutograd and Dynamo hold the
# count, shapes and dtypes they expect, and a joint graph's outputs pair with the inputs whose gradients
# they are. A changed output would surface later as a shape error inside torch, or as a gradient given
# to the wrong parameter. The runner compares each output before and after; a pass that turns gradients
# into None on purpose (backprop pruning) says so with ``drops_gradients``, one that returns an empty tensor
# for an output the user asked it not to make says so with ``empties_outputs``; only those changes pass.

def output_signature(gm: torch.fx.GraphModule, stage: Stage) -> list[tuple[str, str, str] | None]:
    """Per output of ``gm``: ("gradient" or "output", shape, dtype), None for a None output."""
    key = _meta_key(stage)
    outputs = gm.graph.output_node().args[0]
    values = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    gradients = gradient_outputs(gm) if stage == "joint" else {}
    signature: list[tuple[str, str, str] | None] = []
    for index, value in enumerate(values):
        if value is None:
            signature.append(None)
            continue
        val = value.meta.get(key) if isinstance(value, torch.fx.Node) else value
        shape = tuple(val.shape) if isinstance(val, torch.Tensor) else type(val).__name__
        dtype = str(val.dtype) if isinstance(val, torch.Tensor) else ""
        signature.append(("gradient" if index in gradients else "output", str(shape), dtype))
    return signature


def check_outputs(before: list[tuple[str, str, str] | None], after: list[tuple[str, str, str] | None],
                  p: Pass) -> None:
    """Note [What a pass must keep]."""
    if len(before) != len(after):
        raise MemoptPassError(f"the graph returned {len(before)} values and now returns {len(after)}; a pass "
                              "must keep the graph's outputs")
    for index, (old, new) in enumerate(zip(before, after)):
        if old == new or (p.drops_gradients and new is None and old is not None and old[0] == "gradient"):
            continue
        if p.empties_outputs and old is not None and new == ("output", "(0,)", old[2]):
            continue
        raise MemoptPassError(
            f"output {index} was {old} and is now {new}; a pass must keep the graph's outputs (count, shapes, "
            "dtypes, which are gradients)" + ("" if p.drops_gradients else
                                             ", unless it declares drops_gradients=True to turn gradients into None"))


def _copy_graph(gm: torch.fx.GraphModule) -> torch.fx.Graph:
    graph = torch.fx.Graph(owning_module=gm, tracer_cls=gm.graph._tracer_cls)
    value_map: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        copied = graph.node_copy(node, lambda n: value_map[n])
        # Dynamo marks its placeholders with an attribute, not meta, and AOTAutograd requires it on a
        # Dynamo graph (torch's own DDPOptimizer carries it over the same way: propagate_dynamo_source).
        if hasattr(node, "_dynamo_source"):
            copied._dynamo_source = node._dynamo_source
        value_map[node] = copied
    graph._codegen = gm.graph._codegen
    return graph


def run_passes(gm: torch.fx.GraphModule, passes: Sequence[Pass], ctx: PassContext, dumper: Dumper,
               measure: Callable[[torch.fx.GraphModule], dict[str, Any]] | None = None,
               ) -> tuple[torch.fx.GraphModule, list[PassRecord]]:
    """Run the passes of ``ctx.stage`` in order over ``gm``; returns the final graph and one record each.

    ``measure`` gives predicted memory figures of a graph (saved-activation bytes, peak) for the stats;
    it is called before and after each pass that ran.
    """
    records: list[PassRecord] = []
    config = ctx.config
    check_graph(gm, ctx.stage, where=f"graph entering the {ctx.stage} passes")
    before_measure = measure(gm) if measure and any(
        p.stage == ctx.stage and p.name not in config.disable_passes and p.wanted(config)
        for p in passes) else {}
    for p in passes:
        if p.stage != ctx.stage:
            continue
        if p.name in config.disable_passes:
            records.append(PassRecord(p.name, p.stage, "disabled", reason="disabled by name"))
            dumper.stage(p.name, None, kind=p.stage, status="disabled", reason="disabled by name")
            continue
        if not p.wanted(config):
            records.append(PassRecord(p.name, p.stage, "not requested"))
            dumper.stage(p.name, None, kind=p.stage, status="not requested")
            continue
        backup = _copy_graph(gm)
        signature = output_signature(gm, ctx.stage)
        nodes_before = set(gm.graph.nodes)
        count_before = len(gm.graph.nodes)
        start = time.perf_counter()
        try:
            result = p.run(gm, ctx)
            if not isinstance(result, PassResult):
                raise TypeError(f"returned {type(result).__name__}, expected PassResult")
            new_gm = result.gm
            new_gm.recompile()
            added = [n for n in new_gm.graph.nodes if n not in nodes_before]
            check_graph(new_gm, ctx.stage, where=f"after pass {p.name!r}", new_nodes=added)
            check_outputs(signature, output_signature(new_gm, ctx.stage), p)
        except MemoptConfigError:
            raise          # the options are wrong for this model: the user's to fix, not a pass failing
        except Exception as err:  # noqa: BLE001 - the documented fallback; the cause is reported
            seconds = time.perf_counter() - start
            reason = f"{type(err).__name__}: {err}"
            if config.strict:
                raise MemoptPassError(f"pass {p.name!r} failed: {reason}") from err
            warnings.warn(
                f"memopt: pass {p.name!r} failed and was skipped ({reason}). Training continues without "
                "this rewrite; set options={'strict': True} to raise instead.", MemoptPassWarning,
                stacklevel=2)
            gm.graph = backup
            gm.recompile()
            records.append(PassRecord(p.name, p.stage, "failed", seconds, reason=reason))
            dumper.stage(p.name, None, kind=p.stage, status="failed", seconds=seconds, reason=reason,
                         lossy=p.lossy)
            continue
        seconds = time.perf_counter() - start
        for node in added:
            node.meta.setdefault("memopt_pass", p.name)
        after_nodes = set(new_gm.graph.nodes)
        stats: dict[str, Any] = {
            "changed": bool(result.changed),
            "nodes_before": count_before,
            "nodes_after": len(new_gm.graph.nodes),
            "nodes_added": len(added),
            "nodes_removed": sum(1 for n in nodes_before if n not in after_nodes),
            "pass_stats": dict(result.stats),
        }
        if measure is not None:
            after_measure = measure(new_gm)
            stats["predicted_before"] = before_measure
            stats["predicted_after"] = after_measure
            before_measure = after_measure
        status = "changed" if result.changed else "unchanged"
        records.append(PassRecord(p.name, p.stage, status, seconds, stats))
        dumper.stage(p.name, new_gm, kind=p.stage, status=status, stats=stats, seconds=seconds, lossy=p.lossy)
        gm = new_gm
    return gm, records
