"""Training with backend="memopt" matches eager PyTorch: loss, outputs and every gradient, over steps."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from torch import nn

import memopt
from memopt.compiler.backend import MemoptBackend
from tests.errors import raises_memopt
from tests.models import MLP, SmallCNN, hf_loss, tiny_gpt2, tiny_llama, token_batch
from tests.tolerances import assert_close

STEPS = 3


def _mlp() -> tuple[nn.Module, Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor]]]:
    model = MLP()
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    return model, lambda m: m(x, y)


def _cnn() -> tuple[nn.Module, Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor]]]:
    model = SmallCNN()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    return model, lambda m: m(x, y)


def _llama() -> tuple[nn.Module, Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor]]]:
    batch = token_batch(2, 32)
    return tiny_llama(), lambda m: hf_loss(m, batch)


def _gpt2() -> tuple[nn.Module, Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor]]]:
    batch = token_batch(2, 32)
    return tiny_gpt2(), lambda m: hf_loss(m, batch)


MODELS = {"mlp": _mlp, "cnn": _cnn, "llama": _llama, "gpt2": _gpt2}


def train_and_compare(build: Callable[[], tuple[nn.Module, Callable[..., tuple[torch.Tensor, torch.Tensor]]]],
                      backend: object, options: dict[str, object] | None = None) -> None:
    torch.manual_seed(0)
    model, step = build()
    model.train()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend, options=options) if isinstance(backend, str) else \
        torch.compile(model, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for index in range(STEPS):
        loss, out = step(compiled)
        ref_loss, ref_out = step(ref)
        assert_close(loss, ref_loss, f"step {index} loss")
        assert_close(out, ref_out, f"step {index} output")
        loss.backward()
        ref_loss.backward()
        for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            assert (p.grad is None) == (q.grad is None), f"step {index}: grad presence differs for {name}"
            if q.grad is not None:
                assert_close(p.grad, q.grad, f"step {index} grad of {name}")
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
    for (name, b), (_, c) in zip(model.named_buffers(), ref.named_buffers()):
        assert_close(b, c, f"buffer {name} after {STEPS} steps")


@pytest.mark.parametrize("codegen", ["eager", "inductor"])
@pytest.mark.parametrize("name", list(MODELS))
def test_training_matches_eager(name: str, codegen: str) -> None:
    train_and_compare(MODELS[name], "memopt", {"codegen": codegen})


@pytest.mark.parametrize("codegen", ["eager", "inductor"])
def test_inference_matches_eager(codegen: str) -> None:
    torch.manual_seed(0)
    model = tiny_llama().eval()
    batch = token_batch(2, 16)
    backend = MemoptBackend({"codegen": codegen})
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        out = compiled(**batch)
        ref = model(**batch)
    assert_close(out.logits, ref.logits, "inference logits")
    assert len(backend.reports) == 1
    if codegen == "eager":
        report = backend.reports[0]
        assert report.backward is None and report.memory is not None
        assert report.memory.saved_activation_bytes == 0


def test_backend_object_reports_partition_and_memory() -> None:
    torch.manual_seed(0)
    model, step = _mlp()
    backend = MemoptBackend({"codegen": "eager"})
    loss, _ = step(torch.compile(model, backend=backend))
    loss.backward()
    (report,) = backend.reports
    assert report.forward is not None and report.backward is not None
    assert report.memory is not None and report.memory.peak_bytes > report.memory.resident_bytes
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert report.memory.breakdown.get("parameters") == param_bytes
    assert report.predicted_time_s is not None and report.predicted_time_s > 0


def test_entry_point_resolves_in_fresh_interpreter() -> None:
    code = (
        "import sys, torch\n"
        "m = torch.nn.Linear(4, 2)\n"
        "f = torch.compile(m, backend='memopt', options={'codegen': 'eager'})\n"
        "f(torch.randn(3, 4)).sum().backward()\n"
        "print(type(m.weight.grad).__name__, 'memopt' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Tensor", "True"]


def test_unknown_option_is_rejected_through_torch_compile() -> None:
    model = nn.Linear(4, 2)
    compiled = torch.compile(model, backend="memopt", options={"memory_bugdet": "1GiB"})
    with raises_memopt(memopt.MemoptConfigError, "Did you mean 'memory_budget'"):
        compiled(torch.randn(2, 4))


def test_a_budget_on_a_model_with_nothing_to_train_warns_and_compiles_it_as_it_is() -> None:
    """Note [Graphs a budget does not reach]: a graph that saves nothing for a backward."""
    model = nn.Linear(4, 2)
    model.requires_grad_(False)
    x = torch.randn(2, 4)
    compiled = torch.compile(model, backend=MemoptBackend({"memory_budget": "1GiB"}))
    with pytest.warns(UserWarning, match="no input that requires a gradient saves nothing for a backward"):
        out = compiled(x)
    assert_close(out, model(x), "output")


def test_failing_analysis_falls_back_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulator informs; if it fails on a graph, training goes on, with a warning that says so."""
    from memopt.compiler.capture import GraphReport
    from memopt.compiler.runner import MemoptPassWarning

    def broken(self: GraphReport, extra_resident: object = None) -> None:
        raise RuntimeError("simulator exploded")

    monkeypatch.setattr(GraphReport, "simulate", broken)
    backend = MemoptBackend({"codegen": "eager"})
    with pytest.warns(MemoptPassWarning, match="memory simulation failed .*simulator exploded"):
        train_and_compare(_mlp, backend)
    assert backend.reports[0].memory is None

    torch._dynamo.reset()
    strict = MemoptBackend({"codegen": "eager", "strict": True})
    with raises_memopt(memopt.MemoptPassError, "memory simulation failed"):
        train_and_compare(_mlp, strict)


def test_adapter_options_on_a_model_not_prepared_say_to_call_prepare() -> None:
    compiled = torch.compile(nn.Linear(4, 2), backend=MemoptBackend({"adapters": {"method": "lora", "rank": 2}}))
    with raises_memopt(memopt.MemoptConfigError, r"holds no memopt adapter: call memopt.prepare\(model, options\)"):
        compiled(torch.randn(3, 4))
