"""Token elimination's quality on real text: what tests/test_token_quality.py checks and
benchmarks/bench_tokens_quality.py records.

LeMo's setting, small: a pretrained model fine-tuned at a long context. A tiny Llama is first trained
densely on the first half of the standard library's docstrings at byte level (:mod:`tests.corpus`), at
a short sequence; it is then fine-tuned at a long sequence on the second half, densely and with token
elimination, from the same weights and batches. Measured: both runs' final training loss (the mean over
the last steps), both fine-tuned models' held-out loss (evaluated densely, as they would be used), and on
the eliminated model's layers, held-out, how well the pass's scorer picks blocks against the exact
softmax attention mass: top-k block recall and mass coverage, and the same for LeMo's own block scores
from the full queries and keys and for a rule that keeps the earliest blocks (a baseline that knows
only positions: earlier key blocks are seen by more queries).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import memopt
from memopt.compiler.backend import MemoptBackend
from memopt.tokens import attention_mass, block_recall, mass_coverage, pooled_scores
from tests.corpus import byte_batches, stdlib_docstrings


@dataclasses.dataclass(frozen=True)
class Setting:
    steps: int = 200             # fine-tuning, at ``seq`` tokens
    seq: int = 1024
    batch: int = 2
    pretrain_steps: int = 400    # dense, at ``pretrain_seq`` tokens, ``pretrain_batch`` sequences
    pretrain_seq: int = 256
    pretrain_batch: int = 8
    layers: int = 8
    hidden: int = 128
    lr: float = 3e-3
    keep_ratio: float = 0.4
    block_size: int = 64
    tail: int = 20               # the final loss is the mean over the last ``tail`` steps (one step is noisy)
    held_out: int = 4            # held-out batches of ``batch`` x ``seq``
    # Fine-tune LoRA adapters (LeMo's setting and baseline), or every weight when None.
    adapters: dict[str, Any] | None = dataclasses.field(default_factory=lambda: {
        "method": "lora", "rank": 8, "alpha": 16, "targets": "all-linear"})

    @property
    def elimination(self) -> dict[str, Any]:
        """LeMo's setting: a fixed share of the tokens, from the middle layer on (the pass's default)."""
        return {"keep_ratio": self.keep_ratio, "block_size": self.block_size}


def llama(setting: Setting) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=setting.hidden, intermediate_size=2 * setting.hidden,
                         num_hidden_layers=setting.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=setting.seq, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


@dataclasses.dataclass
class Data:
    pretrain: list[dict[str, object]]
    tune: list[dict[str, object]]
    held_out: list[dict[str, object]]


def data(setting: Setting) -> Data:
    text = stdlib_docstrings(1 << 20)
    first, second = text[:len(text) // 2], text[len(text) // 2:]
    return Data(byte_batches(first, setting.pretrain_batch, setting.pretrain_seq, setting.pretrain_steps, seed=1),
                byte_batches(second[:-(1 << 16)], setting.batch, setting.seq, setting.steps, seed=0),
                byte_batches(second[-(1 << 16):], setting.batch, setting.seq, setting.held_out, seed=7))


def pretrained(setting: Setting, batches: list[dict[str, object]]) -> nn.Module:
    """The base model: a tiny Llama trained densely, in eager PyTorch, on ``batches``."""
    torch.manual_seed(0)
    model = llama(setting)
    optimizer = torch.optim.AdamW(model.parameters(), lr=setting.lr)
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


@torch.no_grad()
def held_out_loss(model: nn.Module, batches: list[dict[str, object]]) -> float:
    return sum(model(**batch).loss.item() for batch in batches) / len(batches)


def train(model: nn.Module, options: dict[str, Any], data: list[dict[str, object]], lr: float,
          progress: Callable[[int, float], None] | None = None) -> list[float]:
    """Losses of ``len(data)`` AdamW steps of ``model`` compiled with memopt and ``options``."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=MemoptBackend({"codegen": "eager", **options}))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step, batch in enumerate(data):
        loss = compiled(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress is not None:
            progress(step, losses[-1])
    return losses


def _captured_sublayers(model: nn.Module, batch: dict[str, object], start: int,
                        ) -> dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]:
    """Per layer from ``start`` on: its attention sublayer's input and rotary tables, in a dense forward."""
    layers = model.model.layers
    captured: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}

    def hook(index: int) -> Callable[..., None]:
        def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            captured[index] = (hidden, kwargs["position_embeddings"])
        return capture

    handles = [layers[i].self_attn.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i in range(start, len(layers))]
    try:
        model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def lemo_block_scores(q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, blocks): LeMo's own block scores from the full rotated queries and keys (its predictors'
    training target): per token pair the positive part of ``q . k * scale`` summed over heads, the maximum
    over each causal block pair, summed over query blocks. ``S`` a multiple of ``block_size``."""
    heads = q.shape[1]
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    pairs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).clamp_min(0).sum(1)          # (B, S, S)
    seq, blocks = pairs.shape[-1], pairs.shape[-1] // block_size
    pairs = pairs * torch.ones(seq, seq, dtype=pairs.dtype).tril()
    return pairs.view(-1, blocks, block_size, blocks, block_size).amax(dim=(2, 4)).sum(1)


@torch.no_grad()
def scorer_quality(model: nn.Module, batches: list[dict[str, object]], setting: Setting) -> dict[str, Any]:
    """Per layer from the middle on (the eliminated ones), averaged over ``batches``: the pass's scorer
    (:func:`pooled_scores` of the sublayer's input), LeMo's block scores from the full queries and keys
    (:func:`lemo_block_scores`, what its predictors learn) and the earliest-blocks rule, against the exact
    attention mass of the layer's rotated queries and keys, as top-k block recall and mass coverage."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    layers = model.model.layers
    start = len(layers) // 2
    sums: dict[str, list[float]] = {}
    for batch in batches:
        for index, (hidden, (cos, sin)) in sorted(_captured_sublayers(model, batch, start).items()):
            attn = layers[index].self_attn
            heads, kv_heads, dim = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
            q = attn.q_proj(hidden).unflatten(-1, (heads, dim)).transpose(1, 2)
            k = attn.k_proj(hidden).unflatten(-1, (kv_heads, dim)).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            exact = attention_mass(q, k, setting.block_size)
            scores = pooled_scores(hidden, attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight,
                                   attn.k_proj.bias, heads, kv_heads, setting.block_size)
            earliest = -torch.arange(exact.shape[1], dtype=exact.dtype).expand_as(exact)
            for name, measure in (("recall", block_recall), ("coverage", mass_coverage)):
                for rule, chosen in (("", scores), ("lemo_", lemo_block_scores(q, k, setting.block_size)),
                                     ("earliest_", earliest)):
                    values = sums.setdefault(f"{rule}{name}", [0.0] * (len(layers) - start))
                    values[index - start] += measure(chosen, exact, setting.keep_ratio) / len(batches)
    return {"layers": list(range(start, len(layers))), **sums,
            **{f"mean_{name}": sum(values) / len(values) for name, values in sums.items()}}


def run(setting: Setting, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The experiment of the module notes: both fine-tuning runs, their losses, and the scorer's quality."""
    batches = data(setting)
    began = time.perf_counter()
    base = pretrained(setting, batches.pretrain)
    out: dict[str, Any] = {"setting": dataclasses.asdict(setting), "pretrain_seconds": time.perf_counter() - began,
                           "base_held_out": held_out_loss(base, batches.held_out)}
    log(f"  pretrained: held-out loss {out['base_held_out']:.4f} ({out['pretrain_seconds']:.0f} s)")
    tuned = {} if setting.adapters is None else {"adapters": setting.adapters}
    for name, options in (("dense", tuned), ("eliminated", {**tuned, "token_elimination": setting.elimination})):
        model = memopt.prepare(copy.deepcopy(base), tuned) if tuned else copy.deepcopy(base)
        began = time.perf_counter()
        losses = train(model, options, batches.tune, setting.lr,
                       lambda step, loss, n=name: log(f"  {n} step {step + 1}: loss {loss:.4f}")
                       if (step + 1) % 50 == 0 else None)
        out[name] = {"losses": losses, "final": sum(losses[-setting.tail:]) / setting.tail,
                     "held_out": held_out_loss(model, batches.held_out), "seconds": time.perf_counter() - began}
        if name == "eliminated":
            out["scorer"] = scorer_quality(model, batches.held_out, setting)
    out["final_ratio"] = out["eliminated"]["final"] / out["dense"]["final"]
    out["held_out_ratio"] = out["eliminated"]["held_out"] / out["dense"]["held_out"]
    return out
