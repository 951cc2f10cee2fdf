"""memopt demo: plan a 7B fine-tune on fake tensors, then train a small Llama on CPU with memopt.

Run: python examples/demo.py [--quick]

1. `memopt.plan` builds Llama-2-7B on fake tensors (nothing is allocated), runs memopt's capture and
   pipeline, and prints where the memory of one training step goes and whether it fits an RTX 4090.
2. A small Llama (random weights, byte-level tokens of a Python standard-library module) trains for a
   few steps twice, with eager PyTorch and with `torch.compile(backend="memopt")`, and the demo prints
   loss, the tracked peak memory of a step and the median step time side by side, plus memopt's own
   prediction of the peak.
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import json
import statistics
import sys
import time

import torch

import memopt
from memopt.units import format_bytes


def say(message: str) -> None:
    print(message, flush=True)


def plan_7b(quick: bool) -> None:
    model = "llama-tiny" if quick else "llama-2-7b"
    say(f"== 1. Planning a full fine-tune of {model} (batch 1 x 2048 tokens, bf16, AdamW) on fake tensors")
    started = time.perf_counter()
    report = memopt.plan(model, batch=1, seq=2048 if not quick else 256, dtype="bf16", device="rtx4090",
                         progress=lambda message: say(f"   [{time.perf_counter() - started:5.1f}s] {message}"))
    say(report.render())
    say("")


def token_stream(seq: int, batch: int, steps: int) -> list[torch.Tensor]:
    """Byte-level tokens of a standard-library module's source: real text, no download."""
    text = inspect.getsource(json.decoder).encode() * 4
    ids = torch.tensor(list(text), dtype=torch.long)
    per_step = batch * seq
    return [ids[i * per_step:(i + 1) * per_step].view(batch, seq) for i in range(steps)]


def train(model: torch.nn.Module, step_fn: torch.nn.Module, batches: list[torch.Tensor], label: str,
          ) -> dict[str, object]:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, times = [], []
    peak = None
    for index, ids in enumerate(batches):
        track = index == 1          # step 0 compiles; step 1 is measured (optimizer states exist then)
        gc.collect()
        start = time.perf_counter()
        if track:
            with memopt.track_memory("cpu") as mem:
                loss = step_fn(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
            peak = mem.peak_bytes
        else:
            loss = step_fn(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        if index > 0:
            times.append(elapsed)
        losses.append(loss.item())
        say(f"   {label:>7} step {index}: loss {loss.item():.4f}  ({elapsed:.2f} s"
            + (", includes compiling)" if index == 0 else ")"))
    return {"losses": losses, "peak": peak, "median_s": statistics.median(times)}


def train_small_llama(quick: bool) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, seq, batch, steps = (2, 64, 64, 2, 4) if quick else (4, 256, 256, 4, 6)
    say(f"== 2. Training a {layers}-layer Llama (hidden {hidden}, byte vocabulary) on CPU, "
        f"batch {batch} x {seq} tokens, {steps} steps")
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=seq, attn_implementation="sdpa")
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    batches = token_stream(seq, batch, steps)

    eager_model = copy.deepcopy(base).train()
    eager = train(eager_model, eager_model, batches, "eager")
    del eager_model
    gc.collect()

    memopt_model = copy.deepcopy(base).train()
    backend = memopt.MemoptBackend({"codegen": "inductor"})
    compiled = torch.compile(memopt_model, backend=backend)
    ours = train(memopt_model, compiled, batches, "memopt")
    state_bytes = 2 * sum(p.numel() * p.element_size() for p in memopt_model.parameters())
    predicted = backend.reports[-1].simulate({"optimizer_states": state_bytes}).peak_bytes

    say("")
    say(f"   {'':24}{'eager PyTorch':>16}{'memopt':>16}")
    say(f"   {'final loss':24}{eager['losses'][-1]:>16.4f}{ours['losses'][-1]:>16.4f}")
    say(f"   {'tracked peak (step 1)':24}{format_bytes(eager['peak']):>16}{format_bytes(ours['peak']):>16}")
    say(f"   {'memopt predicted peak':24}{'':>16}{format_bytes(predicted):>16}")
    say(f"   {'median step time':24}{eager['median_s']:>15.3f}s{ours['median_s']:>15.3f}s")
    saved = 1.0 - ours["peak"] / eager["peak"]
    say(f"   memory saved against eager: {saved:.1%} of the step's peak "
        "(Inductor's fusion and min-cut recompute; memopt's scheduler and passes come next)")
    say("   The prediction is for memopt's graphs as partitioned; Inductor's generated code may differ "
        "(see benchmarks/bench_memory.py).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny plan and a tiny model (seconds)")
    args = parser.parse_args(argv)
    plan_7b(args.quick)
    train_small_llama(args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
