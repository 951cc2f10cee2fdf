"""Attention sublayers found in model graphs (issue 17's recognition), with the token dimension followed
through each of their nodes (Note [Following the token dimension])."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from memopt.passes.attention import Sublayer, find_sublayers
from tests.models import tiny_llama, token_batch


def _hf(kind: str) -> nn.Module:
    if kind == "llama":
        return tiny_llama(layers=2)
    import transformers

    config_class, model_class = {"mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
                                 "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    config = config_class(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    config._attn_implementation = "sdpa"
    return model_class(config)


def _captured(model: nn.Module, call: Callable[[nn.Module], Any]) -> tuple[list[Sublayer], list[str]]:
    torch._dynamo.reset()
    seen: list[tuple[list[Sublayer], list[str]]] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        seen.append(find_sublayers(gm))
        return gm.forward

    call(torch.compile(model, backend=backend))
    (result,) = seen
    return result


@pytest.mark.parametrize("seq", [16, 24])              # 16 tokens: as many as the head dimension
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_every_layers_attention_is_found_with_its_token_dimension(kind: str, seq: int) -> None:
    sublayers, missed = _captured(_hf(kind), lambda m: m(**token_batch(1, seq)))
    assert missed == [] and len(sublayers) == 2
    for s in sublayers:
        assert all(p.args[0] is s.hidden for p in s.projections)
        assert s.output in s.residual_add.args and s.attention in s.region
        for node, dim in s.dims.items():
            assert node.meta["example_value"].shape[dim] == seq, node.name
        # The query's view (B, S, heads, head_dim) holds tokens in 1, not in 3 (also 16 at 16 tokens),
        # and the transpose after it in 2.
        (view,) = s.projections[0].users
        (transpose,) = view.users
        assert (s.dims[view], s.dims[transpose]) == (1, 2)
        rotary = sorted(n.name.rstrip("_0123456789") for n, d in s.outside.items() if d == (2,))
        assert rotary == ["cos", "sin"]
        masks = [d for n, d in s.outside.items() if n.name.startswith("attention_mask")]
        assert masks == [(2, 3)]


class Odd(nn.Module):
    """Attention on inputs that are not projections of one tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.out = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q = self.q(x).view(1, 8, 2, 8).transpose(1, 2)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, k)
        return x + self.out(o.transpose(1, 2).reshape(1, 8, 16))


def test_an_attention_it_cannot_follow_is_named_with_the_reason() -> None:
    sublayers, missed = _captured(Odd(), lambda m: m(torch.randn(1, 8, 16), torch.randn(1, 2, 8, 8)))
    assert sublayers == []
    assert len(missed) == 1 and "three linears of one input" in missed[0]
