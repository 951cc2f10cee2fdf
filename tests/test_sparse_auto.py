"""``sparse_backprop: "auto"``: the choice fits the budget on the runtime tracker, trains what it says,
agrees with ``memopt plan``, and bad requests are refused."""

from __future__ import annotations

import copy
import gc
import json
from pathlib import Path

import pytest
import torch

import memopt
from memopt.errors import MemoptConfigError, MemoptInfeasibleBudget
from memopt.plan import plan
from memopt.sparse import sparse_decisions
from memopt.sparse_auto import AutoChoice, candidate_policy, choose_sparse_policy
from tests.errors import raises_memopt
from tests.models import tiny_llama, token_batch
from tests.tolerances import assert_close

LAYERS, BATCH, SEQ = 3, 2, 16


pytestmark = pytest.mark.usefixtures("fresh_dynamo")    # tests/conftest.py


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_llama(layers=LAYERS)


def _tracked_step_peak(step: object, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       batch: dict[str, object]) -> int:
    """The tensor bytes the step holds at its peak: the model, batch and optimizer states it starts with,
    plus the tracked increase over one forward, backward and AdamW update."""
    gc.collect()
    own = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    own += sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)
    own += sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))
    with memopt.track_memory("cpu") as mem:
        out = step(**batch)                                               # type: ignore[operator]
        out.loss.backward()
        del out
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return own + mem.peak_increase_bytes


def test_auto_fits_the_budget_and_trains_the_last_blocks_it_chose(tmp_path: Path) -> None:
    """A budget between the cheapest and the dearest update: the choice trains exactly its policy's
    parameters, its compiled step (AdamW, steady state) peaks within the budget on the runtime tracker and
    within 3% of the measured plan, the dump records the choice, and the gradients equal eager's."""
    model, batch = _model(), token_batch(BATCH, SEQ)
    budget = 1_500_000
    options = {"sparse_backprop": "auto", "memory_budget": budget, "codegen": "eager", "dump_dir": str(tmp_path)}
    reference = copy.deepcopy(model)
    memopt.prepare(model, options, example_inputs=batch)
    prepared = sparse_decisions(model)
    assert prepared is not None and isinstance(prepared.auto, AutoChoice)
    chosen = prepared.auto.chosen
    assert chosen.peak_bytes <= budget < max(c.peak_bytes for c in prepared.auto.candidates)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == chosen.trainable
    blocks = {int(n.split(".")[2]) for n in trained}
    assert blocks == set(range(LAYERS - chosen.depth, LAYERS))
    assert all(n.startswith("model.layers.") for n in trained)

    memopt.prepare(reference, {"sparse_backprop": prepared.auto.policy})      # the same rules, eager
    step = torch.compile(model, backend="memopt", options=options)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], foreach=True)
    _tracked_step_peak(step, model, optimizer, batch)                         # first step makes the states
    peak = _tracked_step_peak(step, model, optimizer, batch)
    print(f"auto: {prepared.auto.summary()}; tracked step peak {peak} B")
    assert peak <= budget
    assert abs(peak - chosen.peak_bytes) / chosen.peak_bytes < 0.03

    for p, q in zip(model.parameters(), reference.parameters()):
        q.data.copy_(p.data)
    step(**batch).loss.backward()
    reference(**batch).loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert_close(p.grad, q.grad, msg=name)

    (folder,) = [f for f in tmp_path.iterdir() if (f / "sparse_auto.json").exists()]
    written = json.loads((folder / "sparse_auto.json").read_text())
    assert written["policy"] == prepared.auto.policy and written["chosen"]["depth"] == chosen.depth
    assert "last" in json.loads((folder / "index.json").read_text())["sparse_backprop_auto"]


@pytest.mark.slow
def test_a_tighter_budget_trains_fewer_columns_and_plan_agrees_with_prepare() -> None:
    """Under a budget that one whole block exceeds, "auto" trains a share of the columns; `memopt plan`
    on the fake model of the same config makes the same choice as `prepare` on the real one."""
    model, batch = _model(), token_batch(BATCH, SEQ)
    whole_block = candidate_policy("model.layers", LAYERS, [], 1, 1.0)
    report = plan(_model(), batch, {"sparse_backprop": whole_block})         # plan prepares the model it gets
    tight = report.peak_bytes - 1
    choice = choose_sparse_policy(model, batch, {"memory_budget": tight})
    assert choice.chosen.ratio < 1 and choice.chosen.peak_bytes <= tight
    assert all(c.peak_bytes > tight for c in choice.candidates if c.score > choice.chosen.score)

    from memopt.plan import fake_causal_lm

    fake, mode = fake_causal_lm(model.config, torch.float32)
    with mode:
        ids = torch.zeros(BATCH, SEQ, dtype=torch.long)
    planned = plan(fake, {"input_ids": ids, "labels": ids, "use_cache": False},
                   {"sparse_backprop": "auto", "memory_budget": tight})
    assert planned.sparse_auto is not None
    assert planned.sparse_auto["policy"] == choice.policy
    assert planned.trainable_parameters == choice.chosen.trainable
    assert "<- chosen" in planned.render()


def test_auto_needs_a_batch_and_a_budget_in_bytes_and_a_prepared_model() -> None:
    batch = token_batch(BATCH, SEQ)
    with raises_memopt(MemoptConfigError, "example_inputs=batch"):
        memopt.prepare(_model(), {"sparse_backprop": "auto", "memory_budget": "1GiB"})
    for budget in (None, 0.5):
        with raises_memopt(MemoptConfigError, "a memory_budget in bytes"):
            memopt.prepare(_model(), {"sparse_backprop": "auto", "memory_budget": budget}, example_inputs=batch)
    step = torch.compile(_model(), backend="memopt", options={"sparse_backprop": "auto", "memory_budget": "1GiB"})
    with raises_memopt(MemoptConfigError, "was not prepared with it"):
        step(**batch)


def test_auto_says_what_the_smallest_update_needs_when_nothing_fits() -> None:
    model = _model()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with raises_memopt(MemoptInfeasibleBudget, "nothing fits"):
        memopt.prepare(model, {"sparse_backprop": "auto", "memory_budget": 100_000},
                       example_inputs=token_batch(BATCH, SEQ))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert sparse_decisions(model) is None
    memopt.prepare(model, {"sparse_backprop": {"*.mlp.*": "full"}})
    with raises_memopt(MemoptConfigError, "already prepared"):
        memopt.prepare(model, {"sparse_backprop": "auto", "memory_budget": "1GiB"},
                       example_inputs=token_batch(BATCH, SEQ))
