"""Small models the tests train, built from configs with random weights (nothing is downloaded)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, width: int = 64, depth: int = 3, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.GELU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(self.body(x))
        return nn.functional.cross_entropy(logits, target), logits


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.bn(self.conv1(x)))
        h = torch.relu(self.conv2(h))
        logits = self.head(h.mean(dim=(2, 3)))
        return nn.functional.cross_entropy(logits, target), logits


def tiny_llama(layers: int = 2, hidden: int = 64, vocab: int = 256) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def tiny_gpt2(layers: int = 2, hidden: int = 64, vocab: int = 256) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    # Dropout off: compiled and eager graphs draw different random streams.
    config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=512,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa",
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    # transformers cannot infer GPT2LMHeadModel's loss type from its name and logs a warning inside
    # forward, which breaks the Dynamo graph in two.
    model.loss_type = "ForCausalLM"
    return model


def hf_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(**batch)
    return out.loss, out.logits


def token_batch(batch: int, seq: int, vocab: int = 256, seed: int = 0) -> dict[str, object]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    return {"input_ids": ids, "labels": ids.clone(), "use_cache": False}


def compiled_step(model: nn.Module, options: dict[str, Any], batch: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    """One forward and backward of ``model`` compiled with a fresh ``MemoptBackend(options)``: the loss and
    the backend (its reports)."""
    from memopt.compiler.backend import MemoptBackend

    torch._dynamo.reset()
    backend = MemoptBackend(options)
    loss, _ = hf_loss(torch.compile(model, backend=backend), batch)
    loss.backward()
    return loss, backend


def pass_stats(backend: Any, name: str) -> dict[str, Any]:
    """What pass ``name`` counted on the backend's last graph (empty when it did not run)."""
    records = [r for r in backend.reports[-1].passes if r.name == name]
    return records[0].stats.get("pass_stats", {}) if records else {}


def assert_matches_eager(model: nn.Module, reference: nn.Module, loss: torch.Tensor, batch: dict[str, Any]) -> None:
    """``loss`` and the gradients of ``model``'s trainable parameters equal eager ``reference``'s step on
    ``batch`` (``reference`` a copy of ``model`` from before its step)."""
    from tests.tolerances import assert_close

    expected, _ = hf_loss(reference, batch)
    expected.backward()
    assert_close(loss, expected, "loss")
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if p.requires_grad:
            assert_close(p.grad, q.grad, name)
