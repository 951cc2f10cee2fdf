"""The plan realiser (:func:`memopt.compiler.partition.realise_plan`): tag, partition, rewrite offloads and
compression, simulate, price. Tested on its own, on the joint graph of a 3-layer MLP stack captured
through Dynamo and AOTAutograd (a partition hook that runs the checks while the fake mode is live)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn as nn
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import default_partition

from memopt.compiler.partition import Realiser, partition_joint, realise_plan
from memopt.cost_model.estimate import annotate_costs, transfer_time_s
from memopt.cost_model.profile import load_profile
from memopt.schedule.problem import (
    NOTHING,
    Plan,
    apply_recompute_tags,
    forward_region,
    rerun_forward_ops,
    saved_values,
)
from memopt.schedule.simulate import simulate_step
from memopt.schedule.streams import exposed_transfer_s

PROFILE = load_profile("h100")


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(64, 64), nn.GELU()) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x.square().sum()


def _with_joint(check: Callable[[Realiser, list[str]], None]) -> None:
    """Compile the stack with a partition hook that builds a :class:`Realiser` of its joint graph and
    runs ``check(realiser, saved names of the plain partition)``."""
    ran: list[bool] = []

    def partition(gm: torch.fx.GraphModule, joint_inputs: Any, **kwargs: Any) -> Any:
        n = int(kwargs["num_fwd_outputs"])
        annotate_costs(gm, PROFILE)

        def cut(recompute: frozenset[str], share: float) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
            apply_recompute_tags(gm, recompute)
            return partition_joint(gm, joint_inputs, num_fwd_outputs=n)

        realiser = Realiser(gm, cut, n, lambda fw: tuple("input" for node in fw.graph.nodes
                                                         if node.op == "placeholder"),
                            PROFILE, forward=forward_region(gm))
        fw, _ = cut(frozenset(), 1.0)
        check(realiser, saved_values(fw, n))
        ran.append(True)
        return default_partition(gm, joint_inputs, **kwargs)

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), partition_fn=partition)
    model = _Stack()
    torch.compile(model, backend=backend)(torch.randn(32, 64, requires_grad=True)).backward()
    assert ran


def _ops(gm: torch.fx.GraphModule, name: str) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "_opname", "") == name
            and getattr(n.target, "namespace", "") == "memopt"]


def _rerun_s(realiser: Realiser, bw: torch.fx.GraphModule) -> float:
    costs = {n.name: n.meta["memopt_cost"].time_s for n in realiser.joint.graph.nodes}
    return sum(costs[n.name] for n in rerun_forward_ops(bw, realiser.forward))


def test_the_empty_plan_is_the_partition_as_simulated() -> None:
    def check(realiser: Realiser, saved: list[str]) -> None:
        found = realise_plan(NOTHING, 1.0, realiser)
        fw, bw = realiser.partition(frozenset(), 1.0)
        expected = simulate_step(fw, bw, input_kinds=realiser.input_kinds(fw),
                                 num_user_outputs=realiser.num_user_outputs)
        assert found.peak_bytes == expected.peak_bytes
        assert found.plan == NOTHING and not _ops(found.forward, "offload")
        assert {c.name for c in found.candidates} <= set(saved)
        # What it adds: the forward ops min-cut's backward runs again (the GELU's cheap pointwise ops).
        assert found.added_time_s == pytest.approx(_rerun_s(realiser, found.backward)) and found.added_time_s > 0

    _with_joint(check)


def test_an_offload_is_copied_out_and_reloaded_where_the_plan_says() -> None:
    def check(realiser: Realiser, saved: list[str]) -> None:
        value = next(name for name in saved if name.startswith("addmm"))
        ahead = realise_plan(Plan(offload=frozenset({value})), 1.0, realiser)
        late = realise_plan(Plan(offload=frozenset({value}), reload_in_segment=frozenset({value})), 1.0, realiser)
        for found in (ahead, late):
            assert found.plan.offload == {value}
            (copy,) = _ops(found.forward, "offload")
            assert copy.args[0].name == value
            (reload,) = _ops(found.backward, "reload")
            (wait,) = _ops(found.backward, "wait_reload")
            order = list(found.backward.graph.nodes)
            assert order.index(reload) < order.index(wait)
            # Priced as min-cut's reruns and the copy stream's replay.
            assert found.added_time_s == pytest.approx(_rerun_s(realiser, found.backward) + exposed_transfer_s(
                found.forward, found.backward, realiser.transfer_s))
        # One segment ahead is issued earlier than in segment: the reload is held longer.
        position = [list(f.backward.graph.nodes).index(_ops(f.backward, "reload")[0]) for f in (ahead, late)]
        assert position[0] < position[1]
        assert late.plan.reload_in_segment == {value} and not ahead.plan.reload_in_segment

    _with_joint(check)


def test_offloads_keep_to_the_host_bound_and_compression_to_its_option() -> None:
    def check(realiser: Realiser, saved: list[str]) -> None:
        values = frozenset(name for name in saved if name.startswith("addmm"))
        assert len(values) >= 2
        one = 32 * 64 * 4
        bounded = realise_plan(Plan(offload=values), 1.0,
                               dataclasses.replace(realiser, host_bytes=one))
        assert len(bounded.plan.offload) == 1           # the first in forward order that fits
        # Compression the options did not allow is not applied; values the cut does not save are ignored.
        found = realise_plan(Plan(compress=values, offload=frozenset({"not_a_value"})), 1.0, realiser)
        assert found.plan == NOTHING
        assert transfer_time_s(one, PROFILE) == realiser.transfer_s(one)

    _with_joint(check)
