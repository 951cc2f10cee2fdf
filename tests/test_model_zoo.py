"""The model zoo (issue 20): ten Hugging Face architectures (:mod:`tests.zoo`), each trained for three
AdamW steps with ``backend="memopt"`` against the same model in eager PyTorch: the loss and every
gradient at every step, in four modes (default options; a budget of half the saved activations; LoRA
on every linear; both), and as many Dynamo graphs as plain ``torch.compile`` makes.

The default mode runs Inductor's code generation, as a user gets it. The other three run memopt's eager
code generator: what they test (the adapter pass, the schedule) is the same graph rewriting whatever
generates the code, and Inductor's compile takes ~9 s of each model's ~12 (tests/test_backend.py and
tests/test_schedule.py hold budgets under Inductor)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import memopt
from memopt.compiler.backend import MemoptBackend
from memopt.prepare import adapter_modules
from tests.tolerances import assert_close
from tests.zoo import BUILDERS, batch

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

STEPS = 3
LORA = {"method": "lora", "rank": 4, "alpha": 8, "targets": "all-linear"}
MODES: dict[str, dict[str, Any]] = {
    "default": {},
    "budget": {"codegen": "eager", "memory_budget": 0.5},
    "lora": {"codegen": "eager", "adapters": LORA},
    "lora+budget": {"codegen": "eager", "adapters": LORA, "memory_budget": 0.5},
}


def _model(name: str, options: dict[str, Any]) -> nn.Module:
    """``name`` with random weights; with adapters, memopt.prepare's, their B made non-zero so that
    every adapter gradient is exercised."""
    torch.manual_seed(0)
    model = BUILDERS[name]()
    if "adapters" in options:
        model = memopt.prepare(model, options)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, _, adapter in adapter_modules(model):
                adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=generator) * 0.1)
    return model.train()


def _graphs_of_plain_compile(name: str) -> int:
    """How many graphs Dynamo makes of ``name``'s training steps with a backend that changes nothing."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = torch.compile(BUILDERS[name]().train(), backend="eager")
    for step in range(STEPS):
        model(**batch(name, seed=step)).loss.backward()
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def train_side_by_side(name: str, options: dict[str, Any]) -> MemoptBackend:
    """:data:`STEPS` steps of ``name`` compiled with memopt and of its eager twin: the losses and every
    gradient match at every step. Returns the backend (its reports)."""
    model = _model(name, options)
    reference = copy.deepcopy(model)
    torch._dynamo.reset()
    backend = MemoptBackend(options)
    compiled = torch.compile(model, backend=backend)
    optimizer, reference_optimizer = _optimizer(model), _optimizer(reference)
    for step in range(STEPS):
        inputs = batch(name, seed=step)
        loss, expected = compiled(**inputs).loss, reference(**inputs).loss
        loss.backward()
        expected.backward()
        assert_close(loss, expected, f"{name} step {step}: loss")
        for (key, p), q in zip(model.named_parameters(), reference.parameters()):
            assert (p.grad is None) == (q.grad is None), f"{name} step {step}: {key} has a gradient in one run only"
            if q.grad is not None:
                assert_close(p.grad, q.grad, f"{name} step {step}: gradient of {key}")
        for opt in (optimizer, reference_optimizer):
            opt.step()
            opt.zero_grad(set_to_none=True)
    return backend


# Known shortfalls: on the 2-layer GPT-2 at 2 x 128 tokens, 0.5 of the activations means 2.90 MB, and the
# lowest plan found is 2.96 MB (2% over; it warns). Reloads are issued at layer boundaries (Note [Reloads
# start at segment boundaries]), and with two layers a reload holds its bytes through much of the
# backward; halving the segments plans 2.90 MB, quartering them 2.83 (issue 21, to do).
SHORT_OF_A_FRACTION = {("gpt2", "budget"), ("gpt2", "lora+budget")}

# Inductor's compile makes the default mode the slow half.
CASES = [pytest.param(name, mode, marks=[pytest.mark.slow] if mode == "default" else [], id=f"{name}-{mode}")
         for name in BUILDERS for mode in MODES]


@pytest.mark.parametrize(("name", "mode"), CASES)
def test_trains_as_eager(name: str, mode: str) -> None:
    options = MODES[mode]
    backend = train_side_by_side(name, options)
    assert backend.reports, "memopt compiled nothing"
    if mode == "default":
        assert len(backend.reports) == _graphs_of_plain_compile(name), "memopt's graphs differ from plain torch.compile's"
    for report in backend.reports:
        if "adapters" in options:
            (record,) = [r for r in report.passes if r.name == "inject_adapters"]
            assert record.status == "changed", record
        if "memory_budget" in options:
            assert report.memory is not None and report.budget_bytes is not None and report.schedule is not None
            if (name, mode) in SHORT_OF_A_FRACTION:
                # Planned as Note [A fraction is a wish, bytes are a limit] says, said, and tracked: when
                # this starts to meet the budget, move the case back.
                assert report.budget_unreached is not None and report.memory.peak_bytes > report.budget_bytes
            else:
                assert report.memory.peak_bytes <= report.budget_bytes, (report.memory.peak_bytes, report.budget_bytes)
            assert report.schedule.chosen.peak_bytes < report.schedule.baseline.peak_bytes
