"""Losses that do not materialise a whole vocabulary's logits at once.

Note [Chunked cross-entropy]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A causal LM's loss, as Hugging Face computes it, makes the logits for every token (``tokens x vocab``,
bf16), upcasts them to fp32 and takes ``log_softmax``: at Llama-3's 128k vocabulary and 4096 tokens
that is 1 GiB of logits, 2 GiB fp32 and 2 GiB more of log-probabilities, and the backward makes as much
again, more than a whole QLoRA model's weights. :func:`chunked_causal_lm_loss` computes the same loss
(labels shifted by one, ``ignore_index`` skipped, mean over the counted tokens) over ``chunks`` slices
of the tokens, each with its own projection, upcast and cross-entropy, as torchtune's
``CEWithChunkedOutputLoss`` does. The value equals the unchunked loss up to summation order. Each
slice's tensors are separate values in the joint graph, so memopt's scheduler can recompute a slice's
logits in the backward instead of keeping all of them: with a budget, only one slice's worth is alive
at a time.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ChunkedLossLM", "chunked_causal_lm_loss"]


def chunked_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                           chunks: int = 8, ignore_index: int = -100) -> torch.Tensor:
    """Hugging Face's causal-LM cross-entropy of ``hidden @ weight.T`` against ``labels`` (shifted by
    one inside), computed ``chunks`` slices of tokens at a time (Note [Chunked cross-entropy]).

    ``hidden``: ``(batch, seq, d)``, the model's last hidden states; ``weight``: ``(vocab, d)``, the
    output projection; ``labels``: ``(batch, seq)``.
    """
    if chunks < 1:
        raise ValueError(f"chunks must be at least 1; got {chunks}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree: "
                         "expected hidden (batch, seq, d) and labels (batch, seq)")
    targets = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    total = hidden.new_zeros((), dtype=torch.float32)
    for part, target in zip(flat.chunk(chunks), targets.chunk(chunks)):
        logits = (part @ weight.t()).float()
        total = total + F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    count = (targets != ignore_index).sum().clamp_min(1)
    return total / count


class ChunkedLossLM(nn.Module):
    """A Hugging Face causal LM whose step returns :func:`chunked_causal_lm_loss` instead of logits and
    Hugging Face's loss: ``forward(input_ids, labels) -> loss``. It holds the model (its parameters and
    state dict are the model's, under ``lm.``)."""

    def __init__(self, lm: nn.Module, chunks: int = 8) -> None:
        super().__init__()
        for attr in ("model", "lm_head"):
            if not hasattr(lm, attr):
                raise ValueError(f"ChunkedLossLM needs a causal LM with .model and .lm_head (as Hugging "
                                 f"Face's *ForCausalLM); {type(lm).__name__} has no .{attr}")
        self.lm, self.chunks = lm, chunks

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **kwargs: object) -> torch.Tensor:
        kwargs.setdefault("use_cache", False)
        body, head = cast(nn.Module, self.lm.model), cast(nn.Module, self.lm.lm_head)
        hidden = body(input_ids=input_ids, **kwargs).last_hidden_state
        return chunked_causal_lm_loss(hidden, cast(torch.Tensor, head.weight), labels, chunks=self.chunks)
