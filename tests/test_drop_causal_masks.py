"""The drop_causal_masks pass: a plain causal mask becomes SDPA's is_causal (exact), and how a mask is
recognised as plain causal at any length (Note [Recognising the causal mask])."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from memopt.compiler.backend import MemoptBackend
from memopt.passes.masks import is_plain_causal
from memopt.schedule.problem import saved_values
from tests.models import assert_matches_eager, hf_loss, pass_stats, tiny_llama, token_batch


def _stats(backend: MemoptBackend) -> dict[str, Any]:
    return pass_stats(backend, "drop_causal_masks")


def _square_saved(backend: MemoptBackend, seq: int) -> list[str]:
    report = backend.reports[-1]
    assert report.forward is not None
    nodes = {n.name: n for n in report.forward.graph.nodes}
    return [name for name in saved_values(report.forward, report.num_user_outputs)
            if tuple(nodes[name].meta["val"].shape[-2:]) == (seq, seq)]


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "padding"])
def test_a_causal_mask_becomes_is_causal_and_a_padding_mask_stays(padded: bool) -> None:
    """The tiny Llama's plain causal mask: both layers attend with is_causal, no seq x seq value is saved
    (one was, without the pass), and the loss and every gradient are the model's. With a padding mask
    the mask is kept, and the values are still the model's."""
    torch.manual_seed(0)
    model = tiny_llama(layers=2)
    reference = copy.deepcopy(model)
    batch = token_batch(2, 48)
    if padded:
        batch["attention_mask"] = torch.ones(2, 48, dtype=torch.long)
        batch["attention_mask"][1, :5] = 0
    torch._dynamo.reset()
    backend = MemoptBackend({"codegen": "eager"})
    loss, _ = hf_loss(torch.compile(model, backend=backend), batch)
    loss.backward()
    assert_matches_eager(model, reference, loss, batch)
    assert _stats(backend) == ({"calls": 0, "kept": 2} if padded else {"calls": 2, "kept": 0})
    assert bool(_square_saved(backend, 48)) == padded
    torch._dynamo.reset()
    without = MemoptBackend({"codegen": "eager", "disable_passes": ("drop_causal_masks",)})
    hf_loss(torch.compile(copy.deepcopy(reference), backend=without), batch)[0].backward()
    assert _square_saved(without, 48), "without the pass the mask is saved"


def _mask_graph(make: Any, seq: int) -> tuple[torch.fx.GraphModule, torch.fx.Node]:
    """A graph whose output is ``make(index)``, ``index`` an ``arange(seq)`` node of the graph (as in
    Dynamo's graphs, where the mask is computed in the graph from constants)."""
    graph = torch.fx.Graph()
    tracer = torch.fx.proxy.GraphAppendingTracer(graph)
    index = torch.fx.Proxy(graph.call_function(torch.arange, (seq,)), tracer)
    out = make(index, seq).node
    graph.output(out)
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    with torch._subclasses.FakeTensorMode() as mode:
        FakeTensorProp(gm, mode).propagate()
    for node in gm.graph.nodes:
        node.meta["example_value"] = node.meta.get("val")
    return gm, out


def _causal(index: Any, seq: int) -> Any:
    return (index[None, None, None, :] <= index[None, None, :, None]).expand(1, 1, seq, seq)


def _window(width: int) -> Any:
    def make(index: Any, seq: int) -> Any:
        kv, q = index[None, None, None, :], index[None, None, :, None]
        return ((kv <= q) & (kv > q - width)).expand(1, 1, seq, seq)
    return make


def test_masks_are_recognised_at_any_length_and_windows_are_not() -> None:
    """At 96 tokens the mask is computed and compared; at 20,000 (past 16K) it is computed again at small
    sizes. A sliding window of 4096 looks causal at a small size, so its constant rules it out; a mask
    read from an input, or the wrong triangle, is not causal."""
    assert is_plain_causal(*_mask_graph(_causal, 96))
    assert is_plain_causal(*_mask_graph(_causal, 20_000))
    assert not is_plain_causal(*_mask_graph(_window(4096), 20_000))
    assert not is_plain_causal(*_mask_graph(_window(8), 96))
    assert not is_plain_causal(*_mask_graph(lambda index, seq: index[None, :] >= index[:, None], 96))
    graph = torch.fx.Graph()
    given = graph.placeholder("mask")
    given.meta["example_value"] = torch.ones(96, 96, dtype=torch.bool).tril()
    graph.output(given)
    assert not is_plain_causal(torch.fx.GraphModule(torch.nn.Module(), graph), given)


def test_hugging_faces_mask_past_16k_tokens_is_recognised() -> None:
    """At 20,480 tokens the mask is not computed at full size (Note [Recognising the causal mask]): Hugging
    Face's own mask subgraph, recomputed at small sizes, is recognised, and no 20,480 x 20,480 value is
    saved (the boolean mask alone would be 400 MiB)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=20480,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    torch._dynamo.reset()
    backend = MemoptBackend({"codegen": "eager"})
    torch.compile(LlamaForCausalLM(config), backend=backend)(**token_batch(1, 20480)).loss.backward()
    assert _stats(backend) == {"calls": 1, "kept": 0}
    assert not _square_saved(backend, 20480)
