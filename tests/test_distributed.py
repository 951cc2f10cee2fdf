"""memopt under DDP and FSDP2 (issue 20): two processes on CPU with gloo train a tiny Llama with LoRA and a
budget (tests/distributed_step.py says how each is set up), against the same steps in one process.

On GPUs the same steps run with NCCL as docs/training.md shows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "distributed_step.py"


def _run(mode: str, out: Path) -> list[dict[str, Any]]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    # A session of its own, so that a timeout stops the ranks too, not the launcher alone.
    process = subprocess.Popen([*launcher, "--mode", mode, "--out", str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"{mode}: no answer in 300 s (about 30 s alone); its output so far:\n"
                             f"{stdout[-3000:]}\n{stderr[-5000:]}") from None
    assert process.returncode == 0, stdout[-3000:] + stderr[-5000:]
    return [json.loads(p.read_text()) for p in sorted(out.glob(f"{mode}.*.json"))]


def _eager_losses() -> tuple[list[float], int]:
    """The same steps on the whole batch in one process, in eager PyTorch (memopt's single-process steps
    equal these: tests/test_model_zoo.py); and the parameter bytes."""
    import memopt
    from tests.distributed_step import GLOBAL_BATCH, OPTIONS, STEPS, llama
    from tests.zoo import batch

    torch.manual_seed(0)
    model = memopt.prepare(llama(), OPTIONS)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for index in range(STEPS):
        loss = model(**batch("llama", size=GLOBAL_BATCH, seed=index)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.serial          # two more processes: alone, not beside the other test workers
@pytest.mark.feature("DDP and FSDP2 (2 processes, gloo), LoRA and a budget: one process's losses")
def test_ddp_and_fsdp2_train_as_one_process(tmp_path: Path) -> None:
    """Each step's global loss equals the single process's; every rank compiled the same graphs with the
    same plans; FSDP2's ranks hold half the parameters, and their tracked peak is lower than DDP's by
    more than a quarter of the parameter bytes (measured: 0.62 of them; the root's embedding and head stay
    gathered through the step, one block is gathered at a time); no graph saves for its backward a value
    computed from its (sharded) parameters alone."""
    losses, parameter_bytes = _eager_losses()
    ddp, fsdp = _run("ddp", tmp_path), _run("fsdp", tmp_path)
    for mode, ranks in (("ddp", ddp), ("fsdp", fsdp)):
        assert [r["rank"] for r in ranks] == [0, 1], mode
        for rank in ranks:
            torch.testing.assert_close(rank["losses"], losses, rtol=1e-5, atol=0,
                                       msg=lambda m, mode=mode: f"{mode}: {m}")
            assert rank["graphs"] == ranks[0]["graphs"], f"{mode}: rank {rank['rank']} planned otherwise"
            for graph in rank["graphs"]:
                assert graph.get("method") and graph["saved_from_parameters_only"] == [], (mode, graph)
    assert len(fsdp[0]["graphs"]) >= 1 and all(g["offload"] or g["recompute"] for g in fsdp[0]["graphs"])
    assert fsdp[0]["parameter_bytes"] * 2 == ddp[0]["parameter_bytes"] == parameter_bytes
    assert ddp[0]["tracked_peak_bytes"] - fsdp[0]["tracked_peak_bytes"] > 0.25 * ddp[0]["parameter_bytes"], (
        ddp[0]["tracked_peak_bytes"], fsdp[0]["tracked_peak_bytes"], ddp[0]["parameter_bytes"])


@pytest.mark.feature("a collective in a graph is never recomputed")
def test_a_collective_is_saved_never_recomputed() -> None:
    """A collective in a joint graph (torch's functional collectives, as compiled DDP, FSDP2 or tensor
    parallelism put there) is tagged to be saved, like a random op, and memopt never chooses it for
    recomputation: run again in the backward it would communicate again, and hang every rank whose plan
    did not choose it too."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils.checkpoint import CheckpointPolicy

    from memopt.schedule.problem import _unrecomputable_reason, communicates, protect_unrepeatable

    def step(x: torch.Tensor) -> torch.Tensor:
        reduced = torch.ops._c10d_functional.all_reduce(x * 2, "sum", "0")
        return torch.ops._c10d_functional.wait_tensor(reduced).sin()

    graph = make_fx(step, tracing_mode="fake")(torch.randn(4))
    protect_unrepeatable(graph)
    collectives = [n for n in graph.graph.nodes if communicates(n)]
    assert len(collectives) == 2
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        tagged = node.meta.get("recompute") is CheckpointPolicy.MUST_SAVE
        assert tagged == communicates(node), node
        if communicates(node):
            assert _unrecomputable_reason(node) == "a collective: recomputing it would communicate again"
