"""The ``verify`` option (Note [Verifying against eager] in memopt/runtime/verify.py): a compiled graph's
first training calls checked against eager PyTorch, on copies, before the real call runs."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.fx

import memopt
from memopt.compiler.backend import MemoptBackend
from memopt.passes.base import Pass, PassContext, PassResult
from tests.errors import raises_memopt
from tests.models import MLP
from tests.tolerances import assert_close
from tests.zoo import BUILDERS, batch

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _skew_last_gradient(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """A wrong rewrite a verification must catch: the joint graph's last gradient output times 1.001
    (the loss and every other gradient unchanged)."""
    out = gm.graph.output_node()
    outputs = list(out.args[0])     # type: ignore[arg-type]
    last = max(i for i, v in enumerate(outputs) if isinstance(v, torch.fx.Node))
    node = outputs[last]
    with gm.graph.inserting_before(out):
        skewed = gm.graph.call_function(torch.ops.aten.mul.Tensor, (node, 1.001))
    skewed.meta["val"] = node.meta["val"]
    outputs[last] = skewed
    out.args = (tuple(outputs),)
    gm.recompile()
    return PassResult(gm, True, {"skewed": 1})


@pytest.mark.feature("verify: a wrong gradient is named before it reaches the parameters")
def test_a_wrong_gradient_is_named_before_it_reaches_the_parameters() -> None:
    torch.manual_seed(0)
    model, x, y = MLP(), torch.randn(16, 64), torch.randint(0, 10, (16,))
    backend = MemoptBackend({"codegen": "eager", "verify": 2}, passes=(Pass("skew", "joint", _skew_last_gradient),))
    compiled = torch.compile(model, backend=backend)
    with raises_memopt(memopt.MemoptVerificationError,
                       r"checked call 1: the gradient of parameter 'head\.bias' differs from eager PyTorch's: "
                       r"largest difference .* beyond the torch.float32 tolerance"):
        compiled(x, y)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.feature("verify: LoRA with a budget, verified, trains as eager")
def test_a_correct_step_is_verified_and_trains_as_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny Llama with LoRA and a budget, verified on its first two calls: the checks run (twice, not
    a third time) and pass, and training is eager's (the checks run on copies)."""
    import memopt.runtime.verify as verify

    calls: list[str] = []
    real = verify.check

    def counted(*args: object, **kwargs: object) -> None:
        calls.append(str(args[-1]))
        real(*args, **kwargs)       # type: ignore[arg-type]

    monkeypatch.setattr(verify, "check", counted)
    options = {"codegen": "eager", "memory_budget": 0.5, "verify": 2,
               "adapters": {"method": "lora", "rank": 4, "targets": "all-linear"}}
    torch.manual_seed(0)
    model = memopt.prepare(BUILDERS["llama"](), options)
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend=MemoptBackend(options))
    for step in range(3):
        inputs = batch("llama", seed=step)
        loss, expected = compiled(**inputs).loss, reference(**inputs).loss
        loss.backward()
        expected.backward()
        assert_close(loss, expected, f"step {step}: loss")
    assert len(calls) == 2 and calls[-1].endswith("checked call 2"), calls
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if q.grad is not None:
            assert_close(p.grad, q.grad, name)


@pytest.mark.feature("verify refuses lossy options")
def test_verify_refuses_lossy_options() -> None:
    with raises_memopt(memopt.MemoptConfigError, "'verify' compares every gradient .* compress_activations"):
        memopt.parse_options({"verify": 1, "compress_activations": "int8"})
    with raises_memopt(memopt.MemoptConfigError, "option 'verify': got -1"):
        memopt.parse_options({"verify": -1})


@pytest.mark.feature("verify under Inductor skips graphs that draw random numbers, and says so")
@pytest.mark.known_limit("verify checks a graph that draws random numbers (dropout) only under codegen='eager': Inductor draws from another generator than eager PyTorch")
def test_under_inductor_a_graph_that_draws_random_numbers_is_not_verified_and_says_so() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    compiled = torch.compile(model, backend=MemoptBackend({"verify": 1}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(torch.randn(4, 8)).sum().backward()
    assert any("draws random numbers" in str(w.message) and "not verified" in str(w.message) for w in caught)
