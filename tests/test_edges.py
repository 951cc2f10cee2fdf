"""Inputs at the edges of what memopt handles (issue 20 item 5), each with a budget: a model on the meta
device, an op of the user's own (torch.library), a data-dependent size, a fraction near zero: each trains
as eager PyTorch does (the meta model: gradients of the right shapes), with a warning where the budget
cannot be met."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from memopt.compiler.backend import MemoptBackend
from tests.tolerances import assert_close

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

BUDGET = {"codegen": "eager", "memory_budget": 0.5}


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))


def _trains_as_eager(model: nn.Module, x: torch.Tensor, options: dict[str, object]) -> list[str]:
    """One compiled step against eager; returns memopt's warnings."""
    reference = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = torch.compile(model, backend=MemoptBackend(options))(x).sum()
    loss.backward()
    expected = reference(x).sum()
    expected.backward()
    if x.device.type == "meta":
        assert loss.device.type == "meta"
        for p, q in zip(model.parameters(), reference.parameters()):
            assert p.grad is not None and p.grad.shape == q.grad.shape and p.grad.device.type == "meta"
    else:
        assert_close(loss, expected, "loss")
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert_close(p.grad, q.grad, name)
    return [str(w.message) for w in caught if str(w.message).startswith("memopt")]


def test_a_model_on_the_meta_device_is_planned_and_runs() -> None:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = _mlp()
    _trains_as_eager(model, torch.empty(4, 8, device="meta"), BUDGET)


@torch.library.custom_op("memopt_test::opaque_sin", mutates_args=())
def _opaque_sin(x: torch.Tensor) -> torch.Tensor:
    return x.sin()


@_opaque_sin.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _setup(ctx: object, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[0])        # type: ignore[attr-defined]


_opaque_sin.register_autograd(lambda ctx, grad: grad * ctx.saved_tensors[0].cos(), setup_context=_setup)


class _WithOwnOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(8, 16), nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(_opaque_sin(self.first(x)))


@pytest.mark.parametrize("codegen", ["eager", "inductor"])
def test_an_op_memopt_has_never_seen_is_kept_and_trains_as_eager(codegen: str) -> None:
    torch.manual_seed(0)
    _trains_as_eager(_WithOwnOp(), torch.randn(32, 8), {"codegen": codegen, "memory_budget": 0.5})


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        return h[h > 0].sum()


def test_a_size_that_depends_on_data_trains_as_eager() -> None:
    """Dynamo breaks the graph at a boolean-mask index (its default); each piece is planned on its own.
    (Where data-dependent sizes are captured, memopt refuses them by name: tests/test_cost_model.py.)"""
    torch.manual_seed(0)
    _trains_as_eager(_DataDependent(), torch.randn(4, 8), BUDGET)


def test_a_fraction_near_zero_plans_the_lowest_peak_and_trains_as_eager() -> None:
    torch.manual_seed(0)
    said = _trains_as_eager(_mlp(), torch.randn(64, 8), {"codegen": "eager", "memory_budget": 1e-4})
    assert any("which no plan reaches: planning the lowest peak found" in m for m in said), said
