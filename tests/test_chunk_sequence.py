"""The chunk_sequence pass (issue 18): MLPs a slice of the sequence at a time, exact, saving none of
their intermediates."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import memopt
from memopt.compiler.backend import MemoptBackend
from memopt.config import parse_options
from memopt.errors import MemoptConfigError
from memopt.schedule.problem import saved_values
from tests.errors import raises_memopt
from tests.models import assert_matches_eager, compiled_step, pass_stats, tiny_gpt2, tiny_llama, token_batch
from tests.test_token_sublayers import _hf


def _stats(backend: MemoptBackend) -> dict[str, Any]:
    return pass_stats(backend, "chunk_sequence")


def _assert_step_equals_eager(model: torch.nn.Module, options: dict[str, Any], batch: dict[str, Any]) -> MemoptBackend:
    reference = copy.deepcopy(model)
    loss, backend = compiled_step(model, options, batch)
    assert_matches_eager(model, reference, loss, batch)
    return backend


@pytest.mark.parametrize("chunks,codegen", [(2, "eager"), (3, "eager"), (8, "eager"), (4, "inductor")])
def test_chunked_mlps_give_the_models_values_and_gradients(chunks: int, codegen: str) -> None:
    """64 tokens in 2, 3 (22 + 22 + 20), 8 slices: the loss and every gradient are the model's."""
    torch.manual_seed(0)
    options = {"chunk_sequence": {"chunks": chunks, "min_tokens": 16}, "codegen": codegen}
    backend = _assert_step_equals_eager(tiny_llama(layers=2), options, token_batch(2, 64))
    assert _stats(backend) == {"regions": 2, "chunks": chunks, "tokens": 64}


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "lora"])
def test_other_models_and_adapters_are_chunked_exactly(kind: str) -> None:
    """Mistral and Qwen2 (the same MLP), and LoRA on every linear: the adapters' matmuls are part of the
    region and chunked with it."""
    torch.manual_seed(0)
    options: dict[str, Any] = {"chunk_sequence": {"chunks": 4, "min_tokens": 16}, "codegen": "eager"}
    if kind == "lora":
        options["adapters"] = {"method": "lora", "rank": 4, "alpha": 8, "targets": "all-linear"}
        model = memopt.prepare(tiny_llama(layers=2), options)
        for p in model.parameters():            # B starts at zero; give the adapters something to add
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.05)
    else:
        model = _hf(kind)
    backend = _assert_step_equals_eager(model, options, token_batch(2, 64))
    assert _stats(backend)["regions"] == 2


def _mlp_saved_bytes(options: dict[str, Any], batch: int, seq: int) -> int:
    torch.manual_seed(0)
    _, backend = compiled_step(tiny_llama(layers=2), {**options, "codegen": "eager"}, token_batch(batch, seq))
    report = backend.reports[-1]
    assert report.forward is not None
    nodes = {n.name: n for n in report.forward.graph.nodes}
    total = 0
    for name in saved_values(report.forward, report.num_user_outputs):
        paths = [str(v[0]) for v in nodes[name].meta.get("nn_module_stack", {}).values()]
        if paths and ".mlp" in paths[-1]:
            value = nodes[name].meta["val"]
            total += value.numel() * value.element_size()
    return total


def test_a_chunked_mlp_saves_none_of_its_intermediates() -> None:
    """Unchunked, each Llama MLP saves its input (tokens x hidden) for the gate and up projections'
    weight gradients and three tokens x intermediate values (the gate and up projections, for the
    activation's and the product's backward, and the product, for the down projection's): fp32, 2 x 64
    tokens, hidden 64, intermediate 128, two layers, 2 * 4 * 128 * (64 + 3 * 128) = 458,752 bytes.
    Chunked, none: each slice's intermediates are recomputed in the backward, and so is the MLP's input,
    from the residual stream and the norm's statistics the layer saves anyway."""
    dense = _mlp_saved_bytes({}, 2, 64)
    chunked = _mlp_saved_bytes({"chunk_sequence": {"chunks": 4, "min_tokens": 16}}, 2, 64)
    assert dense == 2 * 4 * 128 * (64 + 3 * 128)
    assert chunked == 0


def test_what_is_not_chunked_is_left_alone() -> None:
    """GPT-2's MLP (a Conv1D: addmm on a flattened view) is not recognised; a sequence under min_tokens
    is left whole (the default is 1024); both say so in the stats."""
    torch.manual_seed(0)
    _, backend = compiled_step(tiny_gpt2(), {"chunk_sequence": {"chunks": 4, "min_tokens": 16}, "codegen": "eager"},
                       token_batch(2, 64))
    assert _stats(backend) == {"regions": 0, "chunks": 4, "tokens": 0,
                               "skipped": "no position-wise sublayer (an MLP) found"}
    _, backend = compiled_step(tiny_llama(), {"chunk_sequence": {"chunks": 4}, "codegen": "eager"}, token_batch(2, 64))
    assert _stats(backend)["skipped"] == "64 tokens are fewer than min_tokens (1024)"


def test_bad_options_name_the_field() -> None:
    for value, match in (({"chunks": 1}, "'chunk_sequence.chunks': got 1; expected at least 2"),
                         ({"chunks": 2.5}, "'chunk_sequence.chunks': got float"),
                         ({"min_tokens": 0}, "'chunk_sequence.min_tokens': got 0"),
                         ({"slices": 4}, "slices"), (8, "expected a dict like")):
        with raises_memopt(MemoptConfigError, match):
            parse_options({"chunk_sequence": value})


class _MixesTokens(torch.nn.Module):
    """A position-wise MLP, then a weight multiplied from the left (``w @ x`` mixes the tokens: a
    (seq x seq) weight) and another MLP: only the MLPs may be chunked, and the values stay the model's."""

    def __init__(self, seq: int, width: int = 8) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)
        self.mix = torch.nn.Parameter(torch.randn(seq, seq) / seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.down(torch.nn.functional.silu(self.up(x)))
        return (self.mix @ h + self.down(torch.nn.functional.silu(self.up(self.mix @ h)))).square().mean()


def test_an_op_that_mixes_tokens_is_not_chunked() -> None:
    torch.manual_seed(0)
    model = _MixesTokens(32)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 32, 8)
    torch._dynamo.reset()
    backend = MemoptBackend({"chunk_sequence": {"chunks": 4, "min_tokens": 16}, "codegen": "eager"})
    loss = torch.compile(model, backend=backend)(x)
    loss.backward()
    expected = reference(x)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert _stats(backend)["regions"] == 2
