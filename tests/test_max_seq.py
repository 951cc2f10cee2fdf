"""``memopt plan --max-seq`` (issue 18): one symbolic capture priced at every length, and the search for
the longest length that fits."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import memopt.max_seq
import memopt.plan
import memopt.schedule.problem
from memopt.cli import main
from memopt.config import MemoryBudget
from memopt.cost_model.bytes import set_hints
from memopt.max_seq import _length_symbol, max_seq
from memopt.plan import capture_step, plan, step_report

CHUNKED = {"chunk_sequence": {"chunks": 4, "min_tokens": 64, "logits": "drop"}}
ELIMINATED = {**CHUNKED, "token_elimination": {"keep_ratio": 0.25, "block_size": 128, "start_layer": 0}}


@pytest.fixture(scope="module")
def long_tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The demo's tiny Llama with a context long enough to search (nothing else about it changes)."""
    path = tmp_path_factory.mktemp("models") / "tiny_long.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                "vocab_size": 256, "max_position_embeddings": 1 << 20}))
    return str(path)


@pytest.mark.parametrize("options", [{}, CHUNKED, {**CHUNKED, "memory_budget": 3 * 2**20}, ELIMINATED],
                         ids=["dense", "chunked", "scheduled", "eliminated"])
def test_one_symbolic_capture_prices_each_length_as_its_own_capture(long_tiny: str, options: dict[str, Any]) -> None:
    """Note [Planning every length from one capture]: captured at 128 tokens with the length symbolic,
    then re-priced at 256 and 512, the plan's bytes are those of a capture at that length, byte for byte,
    and its time within 0.1% (static and symbolic graphs differ by a few size computations); with a budget,
    the scheduler plans each length again; with token elimination, its kept tokens are an expression in
    the length (captured at 3 blocks of 128, keeping 2; at 1024, 2 of 8)."""
    budget = options.get("memory_budget")
    captured = capture_step(long_tiny, None, {**options, "memory_budget": None}, device="a100-80gb", seq=384,
                            symbolic_length=True)
    report = captured.reports[0]
    symbol, shape_env = _length_symbol(report.joint, 384)
    for seq in (512, 1024):
        set_hints(shape_env, {symbol: seq}, [report.joint])
        captured.seq = seq
        config = captured.config if budget is None else dataclasses.replace(
            captured.config, memory_budget=MemoryBudget(nbytes=3 * 2**20 - captured.state_bytes))
        report.replan(config)
        repriced = step_report(captured)
        direct = plan(long_tiny, None, {**options, "memory_budget": budget} if budget else options,
                      device="a100-80gb", seq=seq)
        assert (repriced.peak_bytes, repriced.breakdown, repriced.totals) == \
            (direct.peak_bytes, direct.breakdown, direct.totals)
        assert repriced.step_time_s == pytest.approx(direct.step_time_s, rel=1e-3)
        assert repriced.seq == seq


def test_the_longest_length_is_the_boundary_and_the_model_is_captured_once(
        long_tiny: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """In 40 MiB: the length found fits (its plan's peak), one granule more does not even with memopt's
    lowest plan (from a fresh, static capture at that length), and the model was traced once."""
    traces = []
    trace = memopt.plan._trace
    monkeypatch.setattr(memopt.plan, "_trace", lambda *a: (traces.append(1), trace(*a))[1])
    options = {**CHUNKED, "memory_budget": "40MiB"}
    found = max_seq(long_tiny, options, device="a100-80gb", start=256)
    assert len(traces) == 1
    limit = 40 * 2**20
    assert found.limit_bytes == limit and found.max_seq % 64 == 0 and found.max_seq > 8192
    assert found.plan is not None and found.plan.seq == found.max_seq and found.plan.peak_bytes <= limit
    assert found.plan.host_peak_bytes > 0                      # offloading is what made it fit
    beyond = capture_step(long_tiny, None, CHUNKED, device="a100-80gb", seq=found.max_seq + 64)
    beyond.reports[0].replan(beyond.config, True)
    assert step_report(beyond).peak_bytes > limit
    assert len(found.tried) <= 12


def test_host_memory_bounds_the_offloads_and_so_the_length(long_tiny: str) -> None:
    """Note [Bounded host memory]: with 16 MiB of host memory for offloads, the longest length is
    shorter, and its plan keeps to the bound."""
    options = {**CHUNKED, "memory_budget": "40MiB"}
    free = max_seq(long_tiny, options, device="a100-80gb", start=4096)
    bounded = max_seq(long_tiny, {**options, "host_memory": "16MiB"}, device="a100-80gb", start=4096)
    assert 0 < bounded.max_seq < free.max_seq
    assert bounded.plan is not None and 0 < bounded.plan.host_peak_bytes <= 16 * 2**20
    assert all(row["host_bytes"] <= 16 * 2**20 for row in bounded.tried)


def test_cli_max_seq_json(long_tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    options = tmp_path / "options.json"
    options.write_text(json.dumps(CHUNKED))
    status = main(["plan", "--model", long_tiny, "--seq", "1024", "--budget", "8MiB", "--options", str(options),
                   "--max-seq", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert status == 0 and out["max_seq"] >= 1024 and out["plan"]["seq"] == out["max_seq"]
    assert out["plan"]["peak_bytes"] <= 8 * 2**20 and out["planner_peak_rss_bytes"] > 0
    assert main(["plan", "--model", long_tiny, "--max-seq", "--loss-chunks", "4"]) == 2
    assert "instead of --loss-chunks" in capsys.readouterr().err
    assert main(["plan", "--model", long_tiny, "--max-seq", "--budget", "0.5"]) == 2
    assert "a fraction" in capsys.readouterr().err


def test_a_budget_too_small_for_any_length_says_so(long_tiny: str) -> None:
    found = max_seq(long_tiny, {**CHUNKED, "memory_budget": "800KiB"}, device="a100-80gb", start=256)
    assert found.max_seq == 0 and found.plan is None
    assert "0 tokens fit" in found.render()


def test_a_length_symbol_is_required() -> None:
    from memopt.errors import MemoptUnsupportedError

    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    with pytest.raises(MemoptUnsupportedError, match="does not keep the sequence length symbolic"):
        _length_symbol(gm, 128)


def test_token_elimination_searches_whole_blocks_and_goes_further(long_tiny: str) -> None:
    """With token elimination (a quarter of the blocks of 128 kept in both layers), the lengths asked are
    whole blocks, the longest that fits the same 40 MiB is longer than without it, and its plan is the
    plan of a static capture at that length, byte for byte (the kept-token count re-priced with it)."""
    budget = {"memory_budget": "40MiB"}
    found = max_seq(long_tiny, {**ELIMINATED, **budget}, device="a100-80gb", start=256)
    plain = max_seq(long_tiny, {**CHUNKED, **budget}, device="a100-80gb", start=256)
    assert found.granule == 128 and all(row["seq"] % 128 == 0 for row in found.tried)
    assert found.max_seq > plain.max_seq > 0
    direct = capture_step(long_tiny, None, ELIMINATED, device="a100-80gb", seq=found.max_seq)
    eliminated = next(r for r in direct.reports[0].passes if r.name == "eliminate_tokens")
    assert eliminated.status == "changed" and eliminated.stats["pass_stats"]["eliminated"] == 2
    direct.reports[0].replan(direct.config, True)
    assert found.plan is not None and found.plan.peak_bytes == step_report(direct).peak_bytes


def test_reused_partitions_are_confirmed_on_fresh_ones(long_tiny: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Note [Reusing partitions across lengths]: the search re-prices partitions made at earlier lengths;
    its answer and one granule more are asked again on fresh partitions (the last two rows), which agree
    here; when they do not, the search runs again on fresh partitions only (and finds the same length)."""
    options = {**CHUNKED, "memory_budget": "40MiB"}
    found = max_seq(long_tiny, options, device="a100-80gb", start=256)
    rows = found.tried
    assert [(r["seq"], r["fits"], r["fresh"]) for r in rows[-2:]] == \
        [(found.max_seq, True, True), (found.max_seq + 64, False, True)]
    assert not any(r["fresh"] for r in rows[:-2])
    for row in rows[:-2]:                               # a length asked both ways was priced the same
        if row["seq"] in (found.max_seq, found.max_seq + 64):
            assert row["peak_bytes"] == next(r["peak_bytes"] for r in rows[-2:] if r["seq"] == row["seq"])
    monkeypatch.setattr(memopt.max_seq._Search, "confirmed", lambda self, *args: False)
    again = max_seq(long_tiny, options, device="a100-80gb", start=256)
    first = next(i for i, r in enumerate(again.tried) if r["fresh"])
    assert first > 0 and all(r["fresh"] for r in again.tried[first:])
    assert again.max_seq == found.max_seq


def test_lengths_the_capture_does_not_hold_for_are_not_asked(long_tiny: str) -> None:
    """Token elimination's graph captured at 8 blocks holds from three on (its guards): with a budget
    nothing fits in, the search stops at 384 tokens, not below; and a length below is refused with the
    reason."""
    from memopt.errors import MemoptUnsupportedError

    found = max_seq(long_tiny, {**ELIMINATED, "memory_budget": "800KiB"}, device="a100-80gb", start=1024)
    assert found.max_seq == 0 and min(row["seq"] for row in found.tried) == 384
    captured = capture_step(long_tiny, None, ELIMINATED, device="a100-80gb", seq=1024, symbolic_length=True)
    search = memopt.max_seq._Search(captured, captured.config, lambda message: None)
    with pytest.raises(MemoptUnsupportedError, match="not the step at 256"):
        search.fits(256)


def test_a_length_capped_by_the_model_is_planned_unscheduled() -> None:
    """The preset's 512 positions stop the search; the plan there is the unscheduled graph's, equal to a
    plan made at 512 directly: no tag of the search's lowest plans (which recompute everything they can,
    with a host too small to offload much) is left behind."""
    found = max_seq("llama-tiny", {**CHUNKED, "host_memory": "64KiB"}, device="a100-80gb", start=256)
    assert {row["how"] for row in found.tried} == {"checkpointed"}
    assert found.max_seq == 512 and found.capped_at == 512 and found.plan_method == "fits unscheduled"
    assert found.plan is not None and found.plan.schedule is None
    direct = plan("llama-tiny", None, CHUNKED, device="a100-80gb", seq=512)
    assert (found.plan.peak_bytes, found.plan.totals) == (direct.peak_bytes, direct.totals)
    assert "capped by the model's max_position_embeddings (512)" in found.render()


def test_the_lowest_plan_checkpoints_every_layer_when_the_host_is_small(long_tiny: str) -> None:
    """With 64 KiB of host memory nothing much can be offloaded, so the lowest plan recomputes every layer,
    attention included, and saves what the layers hand each other: of the values with a token dimension,
    only hidden-wide ones (the layers' inputs, the head's), the rotary table and per-token scalars are
    kept, and the saved bytes fall to under half of the unscheduled graph's."""
    captured = capture_step(long_tiny, None, {**CHUNKED, "host_memory": "64KiB"}, device="a100-80gb", seq=512)
    report = captured.reports[0]
    unscheduled = report.memory.saved_activation_bytes
    report.replan(captured.config, True)
    assert report.schedule is not None and report.schedule.method == "checkpointed"
    forward = {n.name: n for n in report.forward.graph.nodes}
    kept = [forward[name].meta["val"] for name in memopt.schedule.problem.saved_values(
        report.forward, report.num_user_outputs) if forward[name].op != "placeholder"]
    widths = {tuple(v.shape)[-1] for v in kept if 512 in v.shape and v.dim() > 1 and v.shape[-1] != 512}
    assert widths <= {64, 16, 1}, widths          # hidden, rotary (head_dim), per-token statistics
    assert report.memory.saved_activation_bytes < unscheduled / 2


def test_the_checkpointed_plan_of_an_eliminated_graph_recomputes_each_layer_in_its_place(long_tiny: str) -> None:
    """The checkpointed plan of a graph with token elimination in every layer saves what each layer hands
    the next, so each layer is recomputed where its backward runs, and the plan peaks below the unscheduled
    graph and saves less than half of it, as it does without elimination. Left to the min-cut, the layers'
    outputs (the residual stream, through elimination's scatter_add) were recomputed from the embedding
    up at the backward's start: 9.8 MB against 5.1 MB unscheduled here, 178 GiB at 65K tokens on the 8B."""
    captured = capture_step(long_tiny, None, {**ELIMINATED, "host_memory": "64KiB"}, device="a100-80gb",
                            seq=2048, symbolic_length=True)
    report = captured.reports[0]
    unscheduled = step_report(captured).peak_bytes, report.memory.saved_activation_bytes
    report.replan(captured.config, "checkpointed")
    assert report.schedule is not None and report.schedule.method == "checkpointed"
    assert step_report(captured).peak_bytes < unscheduled[0]
    assert report.memory.saved_activation_bytes < unscheduled[1] / 2
