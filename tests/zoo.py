"""The model zoo (issue 20): Hugging Face architectures built from small configs with random weights
(nothing is downloaded), each with a batch of its own kind of input.

Every model is two layers, hidden 64 (Gemma's head 16), dropout off: compiled and eager graphs draw
different random streams (dropout has its own test)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

HIDDEN, LAYERS, HEADS, VOCAB, IMAGE = 64, 2, 4, 256, 64


def _decoder(config_name: str, model_name: str, **extra: Any) -> nn.Module:
    import transformers

    config = getattr(transformers, config_name)(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=256, attn_implementation="sdpa", **extra)
    return getattr(transformers, model_name)(config)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=256,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa",
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"     # transformers warns inside forward otherwise: a graph break
    return model


def _neox() -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                           num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=256,
                           hidden_dropout=0.0, attention_dropout=0.0, attn_implementation="sdpa")
    return GPTNeoXForCausalLM(config)


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                        num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=256,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    return BertForMaskedLM(config)


def _vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=IMAGE, patch_size=8, num_channels=3, hidden_size=HIDDEN,
                       intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                       num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                       attn_implementation="sdpa")
    # transformers' loss sets problem_type on the first call, which fails Dynamo's guard on it and
    # compiles the model a second time (plain torch.compile too): set it as that call would.
    config.problem_type = "single_label_classification"
    return ViTForImageClassification(config)


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "llama": lambda: _decoder("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2),
    "mistral": lambda: _decoder("MistralConfig", "MistralForCausalLM", num_key_value_heads=2),
    "qwen2": lambda: _decoder("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2),
    "qwen3": lambda: _decoder("Qwen3Config", "Qwen3ForCausalLM", num_key_value_heads=2, head_dim=16),
    "gemma": lambda: _decoder("GemmaConfig", "GemmaForCausalLM", num_key_value_heads=1, head_dim=16),
    "phi3": lambda: _decoder("Phi3Config", "Phi3ForCausalLM", num_key_value_heads=2, pad_token_id=0),
    "gpt2": _gpt2,
    "gpt_neox": _neox,
    "bert": _bert,
    "vit": _vit,
}


def batch(name: str, size: int = 2, seq: int = 128, seed: int = 0) -> dict[str, Any]:
    """A batch of ``name``'s kind: tokens with labels (a masked LM's: a sixth of the tokens, the rest
    -100), or ``4 * size`` images (64 patches each) with class labels. At 256 tokens the saved activations
    outweigh the parameters enough for a budget of half of them to be reachable."""
    gen = torch.Generator().manual_seed(seed)
    if name == "vit":
        images = 4 * size       # 64 tokens each: as many tokens as a text batch has, and half as many again
        return {"pixel_values": torch.randn(images, 3, IMAGE, IMAGE, generator=gen),
                "labels": torch.randint(0, 10, (images,), generator=gen)}
    ids = torch.randint(1, VOCAB, (size, seq), generator=gen)
    if name == "bert":
        labels = torch.where(torch.rand(size, seq, generator=gen) < 1 / 6, ids, torch.full_like(ids, -100))
        return {"input_ids": ids, "labels": labels}
    return {"input_ids": ids, "labels": ids.clone(), "use_cache": False}
