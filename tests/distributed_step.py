"""A few training steps of a tiny Llama with memopt (LoRA, a budget), as tests/test_distributed.py
runs them: on each of ``torchrun``'s ranks with DDP or FSDP2, on gloo (CPU), or in one process.

FSDP2 is applied as torchtitan orders it: each decoder block compiled on its own (``torch.compile`` per
block), then ``fully_shard`` per block, then ``fully_shard`` of the whole model. DDP wraps the model and
the wrapper is compiled. Every rank trains on its slice of the same global batch. Writes one JSON per
rank: the global loss of each step, the tracked peak of the last step, the parameter bytes the rank
holds, what each compiled graph saves for its backward, and each graph's plan.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_step.py \\
        --mode fsdp --out DIR
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import memopt  # noqa: E402
from memopt.compiler.backend import MemoptBackend  # noqa: E402
from tests.zoo import HEADS, HIDDEN, VOCAB, batch  # noqa: E402

OPTIONS: dict[str, Any] = {"codegen": "eager", "memory_budget": 0.5,
                           "adapters": {"method": "lora", "rank": 4, "targets": "all-linear"}}
STEPS, GLOBAL_BATCH = 3, 4


def llama() -> nn.Module:
    """The zoo's tiny Llama with six layers: sharding the blocks then holds less than the rest of the
    step (the root's unsharded embedding and head, one block gathered at a time) adds back."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=6,
                         num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=256,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def build(mode: str, backend: MemoptBackend, world: int) -> tuple[nn.Module, nn.Module]:
    """(the model whose parameters train, the callable that runs a step)."""
    torch.manual_seed(0)
    model = memopt.prepare(llama(), OPTIONS)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for index, block in enumerate(model.model.layers):
            model.model.layers[index] = torch.compile(block, backend=backend)
            fully_shard(model.model.layers[index], mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return model, torch.compile(DistributedDataParallel(model), backend=backend)
    return model, torch.compile(model, backend=backend)


def saved_from_parameters_only(report: Any) -> list[str]:
    """The values a graph saves for its backward that are computed from its parameters alone, by ops
    other than views: under FSDP such a value would keep a copy of an unsharded weight alive until the
    backward."""
    graph = report.forward.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    from_parameters = {n for n, kind in zip(placeholders, report.primal_kinds) if kind == "parameter"}
    computed = set()
    for node in graph.nodes:
        if node.op == "call_function" and node.all_input_nodes and all(
                a in from_parameters for a in node.all_input_nodes):
            from_parameters.add(node)
            if not isinstance(node.target, torch._ops.OpOverload) or not node.target.is_view:
                computed.add(node)
    saved = list(graph.output_node().args[0])[report.num_user_outputs:]       # type: ignore[arg-type]
    return [n.name for n in saved if n in computed]


def plan_of(report: Any) -> dict[str, Any]:
    schedule = report.schedule
    if schedule is None:
        return {"graph": report.graph_id}
    chosen = schedule.chosen
    return {"graph": report.graph_id, "method": schedule.method, "peak_bytes": chosen.peak_bytes,
            "recompute": sorted(chosen.recompute), "offload": sorted(chosen.offload)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["single", "ddp", "fsdp"], required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    distributed = args.mode != "single"
    if distributed:
        # A rank that waits longer than this fails with the collective it waited in, rather than hanging.
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    backend = MemoptBackend(OPTIONS)
    model, step = build(args.mode, backend, world)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    share = GLOBAL_BATCH // world
    losses, peak = [], 0
    for index in range(STEPS):
        inputs = batch("llama", size=GLOBAL_BATCH, seed=index)
        mine = {k: v[rank * share:(rank + 1) * share] if torch.is_tensor(v) else v for k, v in inputs.items()}
        with memopt.track_memory("cpu") as tracked:
            loss = step(**mine).loss
            loss.backward()
        peak = tracked.peak_bytes
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        if distributed:
            dist.all_reduce(total)
        losses.append(total.item() / world)
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    out = {"rank": rank, "world": world, "losses": losses, "tracked_peak_bytes": peak,
           "parameter_bytes": sum(p.numel() * p.element_size() for p in local),
           "graphs": [{**plan_of(r), "saved_from_parameters_only": saved_from_parameters_only(r)}
                      for r in backend.reports if r.backward is not None]}
    Path(args.out, f"{args.mode}.{rank}.json").write_text(json.dumps(out, indent=1))
    if distributed:
        # gloo's worker thread frees a finished collective's tensors after the caller has its result,
        # and needs the GIL for it; DDP's reducer, freed when main() returns, joins that thread holding
        # the GIL. Seen hanging there (py-spy: ~Reducer -> ~ProcessGroupGloo -> join, the worker in
        # ~AsyncAllreduceWork waiting for the GIL) on a loaded 2-core machine. The barrier waits without
        # the GIL, after every earlier collective on the worker's queue.
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    main()
