"""The memory scheduler (recompute under a budget): lossless, within budget, and honest when it cannot.

Tolerance: as for the simulator, the tracked peak of a scheduled step is within 5% of the simulated
peak (CPU, codegen="eager"), and the simulated peak never exceeds the budget. The budget covers what
the compiled step holds; these steps run without an optimizer so that nothing outside the graphs is
live.
"""

from __future__ import annotations

import copy
import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import memopt
from memopt.compiler.backend import MemoptBackend
from memopt.errors import memopt_cause
from memopt.runtime.tracker import MemoryTracker, track_memory
from tests.errors import raises_memopt
from tests.models import MLP, hf_loss, tiny_gpt2, tiny_llama, token_batch
from tests.tolerances import assert_close

TOLERANCE = 0.05


Step = Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor]]   # (loss, output the caller holds)


def _mlp_case() -> tuple[nn.Module, Step]:
    model = MLP(width=256, depth=4)
    x, y = torch.randn(512, 256), torch.randint(0, 10, (512,))
    return model, lambda m: m(x, y)


def _hf_case(build: Callable[[], nn.Module]) -> Callable[[], tuple[nn.Module, Step]]:
    def make() -> tuple[nn.Module, Step]:
        batch = token_batch(4, 256)
        return build(), lambda m: hf_loss(m, batch)
    return make


CASES = {"mlp": _mlp_case, "llama": _hf_case(tiny_llama), "gpt2": _hf_case(tiny_gpt2)}
# Larger models for single tests (benchmarks/bench_schedule.py's size), kept out of the parametrised ones.
LARGER_CASES = {"llama4": _hf_case(lambda: tiny_llama(layers=4, hidden=128))}


def _run(case: str, budget: object, codegen: str = "eager", **options: object) -> tuple[MemoptBackend, MemoryTracker]:
    """Compile with ``budget``, check a step against eager, return the backend and the step's tracker."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, loss_of = (CASES | LARGER_CASES)[case]()
    model.train()
    backend = MemoptBackend({"codegen": codegen, "memory_budget": budget, **options})
    compiled = torch.compile(model, backend=backend)
    loss_of(compiled)[0].backward()                 # compiles
    model.zero_grad(set_to_none=True)
    gc.collect()
    # Nothing else large is alive (the tracker counts every tensor), and the caller holds the step's
    # outputs through the backward as training loops do (out = model(...); out.loss.backward()).
    with track_memory("cpu") as mem:
        loss, output = loss_of(compiled)
        loss.backward()
    del output
    ref = copy.deepcopy(model)                # no optimizer ran: same weights as the compiled model
    ref.zero_grad(set_to_none=True)
    ref_loss = loss_of(ref)[0]
    ref_loss.backward()
    assert_close(loss, ref_loss, f"{case} loss at budget {budget}")
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, f"{case} grad of {name} at budget {budget}")
    return backend, mem


def _compile_once(case: str, options: dict[str, object]) -> None:
    """Compile and run one forward (its model dies with this frame)."""
    torch._dynamo.reset()
    model, loss_of = CASES[case]()
    loss_of(torch.compile(model, backend=MemoptBackend({"codegen": "eager", **options})))


def _smallest_peak(case: str, offload: object = "auto", codegen: str = "eager") -> int:
    torch._dynamo.reset()
    model, loss_of = CASES[case]()
    compiled = torch.compile(model, backend=MemoptBackend(
        {"codegen": codegen, "memory_budget": 1, "offload": offload}))
    with pytest.raises(BaseException) as info:
        loss_of(compiled)
    err = memopt_cause(info.value, memopt.MemoptInfeasibleBudget)
    assert err is not None, info.value
    assert err.min_peak_bytes is not None and err.breakdown
    return err.min_peak_bytes


def _recording(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[Any]:
    """Wrap ``module.name`` so that what it returns is also appended to the list returned here."""
    results: list[Any] = []
    real = getattr(module, name)

    def wrapper(*args: object, **kwargs: object) -> object:
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(module, name, wrapper)
    return results


def _baseline_problem(report: Any) -> Any:
    """The scheduler's model of the baseline cut of a scheduled graph, as its search built it."""
    assert report.realiser is not None and report.schedule is not None
    return report.realiser.problem(report.schedule.baseline)


def _check(case: str, budget: object) -> tuple[int, int, int, int]:
    backend, mem = _run(case, budget)
    tracked = mem.peak_bytes
    report = backend.reports[-1]
    assert report.memory is not None and report.budget_bytes is not None and report.schedule
    simulated = report.memory.peak_bytes
    assert simulated <= report.budget_bytes, (budget, simulated, report.budget_bytes)
    assert abs(simulated - tracked) <= TOLERANCE * tracked, (budget, simulated, tracked)
    assert tracked <= report.budget_bytes * (1 + TOLERANCE)
    chosen = report.schedule.chosen
    return report.budget_bytes, simulated, tracked, len(chosen.recompute) + len(chosen.offload)


@pytest.mark.parametrize("case", list(CASES))
def test_budgets_are_met_without_changing_gradients(case: str) -> None:
    """Budgets 1.0, halfway to the smallest reachable peak, and the smallest reachable peak itself."""
    full = _check(case, 1.0)
    smallest = _smallest_peak(case)
    assert smallest < full[1], "recompute must lower the peak of these models"
    halfway = _check(case, (full[1] + smallest) // 2)
    lowest = _check(case, smallest)
    print(case, "budget, simulated, tracked, values freed:", full, halfway, lowest)
    assert full[3] == 0                        # nothing to do at the unoptimised peak
    assert halfway[3] > 0 and lowest[1] <= halfway[1] < full[1]


def test_half_the_activation_memory() -> None:
    """A fractional budget: 0.5 of the unoptimised activation memory, met by recompute alone on the
    tiny Llama. (GPT-2's eager-codegen peak sits among the unfused temporaries of gelu_new's backward,
    which recompute cannot lower: 0.5 is infeasible there until offload and compression land.)"""
    budget, simulated, tracked, recomputed = _check("llama", 0.5)
    print("llama 0.5:", budget, simulated, tracked, recomputed)
    assert recomputed > 0


def test_infeasible_budget_names_the_smallest_peak_and_what_occupies_it() -> None:
    torch._dynamo.reset()
    model, loss_of = CASES["llama"]()
    compiled = torch.compile(model, backend=MemoptBackend({"codegen": "eager", "memory_budget": "1MiB"}))
    with raises_memopt(memopt.MemoptInfeasibleBudget,
                       r"1\.00 MiB .* cannot be met: the smallest peak memopt can reach is .* largest tensors"):
        loss_of(compiled)


def test_schedule_json_explains_every_candidate(tmp_path: Path) -> None:
    torch._dynamo.reset()
    model, loss_of = CASES["llama"]()
    backend = MemoptBackend({"codegen": "eager", "memory_budget": 0.5, "dump_dir": str(tmp_path),
                             "offload": False})
    loss_of(torch.compile(model, backend=backend))[0].backward()
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    data = json.loads((folder / "schedule.json").read_text())
    assert data["feasible"] is True and data["peak_bytes"] <= data["budget_bytes"] < data["baseline_peak_bytes"]
    # The solver's statistics and every verified attempt, the chosen one among them.
    solver = data["solver"]
    assert solver["status"] in ("OPTIMAL", "FEASIBLE") and solver["gap"] is not None and solver["gap"] >= 0
    assert solver["bound_s"] <= solver["objective_s"]
    # Every solve is listed (the baseline's first, then e.g. those on the knapsack's cut), each labelled.
    assert data["solves"][0] == solver and solver["model"] == "cp-sat"
    assert all(s["model"] and s["status"] for s in data["solves"])
    chosen = [a for a in data["attempts"] if a["method"] == data["method"]]
    assert chosen and chosen[0]["meets_budget"] and chosen[0]["peak_bytes"] == data["peak_bytes"]
    rows = data["candidates"]
    assert rows and all(set(r) == {"name", "layer", "bytes", "choice", "recompute_time_s", "offload_time_s",
                                   "why"} for r in rows)
    # Each value's layer, for the report's grouping: the tiny Llama's layers, or None outside them.
    assert {r["layer"] for r in rows} - {None} <= {f"model.layers.{i}" for i in range(2)}
    assert any(r["layer"] is not None for r in rows)
    recomputed = {r["name"] for r in rows if r["choice"] == "recompute"}
    assert recomputed and recomputed <= {n.name for n in backend.reports[-1].joint.graph.nodes}
    assert all(r["why"] for r in rows)
    svg = (folder / "memory_timeline.svg").read_text()
    assert svg.count("<polyline") == 2 and "before scheduling" in svg and "after scheduling" in svg
    assert "budget" in svg and str(tmp_path) not in svg


@pytest.mark.slow
def test_smallest_budget_with_inductor_codegen() -> None:
    """Inductor compiles graphs with recomputation and memopt's offload ops; gradients stay exact."""
    torch._dynamo.reset()
    model, loss_of = CASES["llama"]()
    with pytest.raises(BaseException) as info:
        loss_of(torch.compile(model, backend=MemoptBackend({"codegen": "inductor", "memory_budget": 1})))
    err = memopt_cause(info.value, memopt.MemoptInfeasibleBudget)
    assert err is not None and err.min_peak_bytes
    backend, _ = _run("llama", err.min_peak_bytes, codegen="inductor")
    schedule = backend.reports[-1].schedule
    # The smallest peak is reached with offloads (and recomputation where the solver prefers it).
    assert schedule is not None and schedule.feasible and schedule.chosen.offload


def test_offload_meets_a_budget_recompute_alone_cannot() -> None:
    """A Llama budget out of reach by recompute alone, met with offload (on CPU the host pool is an
    emulation, counted apart from device memory as the tracker reports it)."""
    recompute_only = _smallest_peak("llama", offload=False)
    with_offload = _smallest_peak("llama")
    assert with_offload < recompute_only
    budget = (recompute_only + with_offload) // 2
    with raises_memopt(memopt.MemoptInfeasibleBudget, "cannot be met"):
        _compile_once("llama", {"memory_budget": budget, "offload": False})
    backend, mem = _run("llama", budget)     # nothing of the refused attempt is alive while tracking
    report = backend.reports[-1]
    assert report.schedule is not None and report.schedule.chosen.offload, "expected offloaded values"
    assert report.memory is not None and report.budget_bytes is not None
    assert report.memory.peak_bytes <= report.budget_bytes
    assert abs(report.memory.peak_bytes - mem.peak_bytes) <= TOLERANCE * mem.peak_bytes
    assert mem.host_bytes > 0 and mem.host_bytes == report.memory.host_peak_bytes
    print("offload: simulated", report.memory.peak_bytes, "tracked", mem.peak_bytes, "host",
          mem.host_bytes, "sim host", report.memory.host_peak_bytes, "offloaded",
          len(report.schedule.chosen.offload), "recomputed", len(report.schedule.chosen.recompute))


def _recomputed(backend: MemoptBackend) -> tuple[int, float]:
    """(FLOPs, fused h100 seconds) of the forward ops the backward runs again, counted as
    benchmarks/bench_schedule.py counts them for every variant (Note [Counting recomputation])."""
    from memopt.cost_model.estimate import estimate_node
    from memopt.cost_model.flops import node_flops
    from memopt.cost_model.profile import load_profile
    from memopt.schedule.problem import forward_region, rerun_forward_ops

    (report,) = backend.reports
    assert report.joint is not None and report.backward is not None
    again = rerun_forward_ops(report.backward, forward_region(report.joint))
    h100 = load_profile("h100")
    return sum(node_flops(n) for n in again), sum(estimate_node(n, h100, fused=True).time_s for n in again)


@pytest.mark.parametrize("share", [0.5, 0.25])
def test_fewer_flops_than_pytorchs_knapsack_at_its_own_peak(share: float) -> None:
    """The issue's target, on the tiny Llama with the executor memopt simulates exactly: at the peak
    torch's knapsack reaches with activation_memory_budget=share, memopt (recompute only, costed for
    Inductor) recomputes strictly fewer FLOPs and predicts less added time. Measured (2 layers, hidden 64,
    4 x 256 tokens): 34 vs 134 MFLOP at 0.5, none vs 218 MFLOP at 0.25 (pointwise chains recomputed
    instead of matmuls; benchmarks/bench_schedule.py has the 4-layer figures)."""
    model, loss_of = CASES["llama"]()

    def compile_step(options: dict[str, object], knapsack: float) -> MemoptBackend:
        torch._dynamo.reset()
        backend = MemoptBackend({"codegen": "eager", "cost_profile": "h100", "offload": False, **options},
                                fused_costs=True)
        with torch._functorch.config.patch(activation_memory_budget=knapsack):
            loss_of(torch.compile(model, backend=backend))[0].backward()
        model.zero_grad(set_to_none=True)
        return backend

    theirs = compile_step({}, share)          # torch's own partition at that share, nothing of memopt's
    (their_report,) = theirs.reports
    assert their_report.memory is not None and their_report.schedule is None
    their_peak = their_report.memory.peak_bytes
    ours = compile_step({"memory_budget": their_peak}, 1.0)
    (our_report,) = ours.reports
    assert our_report.memory is not None and our_report.schedule is not None
    assert our_report.memory.peak_bytes <= their_peak
    our_flops, our_s = _recomputed(ours)
    their_flops, their_s = _recomputed(theirs)
    assert their_flops > 0 and our_flops < their_flops, (our_flops, their_flops)
    assert our_s < their_s, (our_s, their_s)


def test_a_failing_knapsack_attempt_does_not_stop_scheduling(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch's knapsack is an optional attempt (Note [Seeding from PyTorch's knapsack]): when torch's
    partitioner fails on a knapsack cut, the search says so and meets the budget with its own plans."""
    import memopt.compiler.capture as capture

    real = capture.partition_joint

    def partition(*args: object, **kwargs: object) -> object:
        if torch._functorch.config.activation_memory_budget < 1.0:
            raise RuntimeError("refused for the test")
        return real(*args, **kwargs)

    monkeypatch.setattr(capture, "partition_joint", partition)
    messages: list[str] = []
    torch._dynamo.reset()
    model, loss_of = CASES["llama"]()
    backend = MemoptBackend({"codegen": "eager", "memory_budget": 0.5}, progress=messages.append)
    loss_of(torch.compile(model, backend=backend))[0].backward()
    report = backend.reports[-1]
    assert report.schedule is not None and report.schedule.feasible
    assert not report.schedule.method.startswith("pytorch knapsack")
    assert any("knapsack as a base failed (RuntimeError: refused for the test)" in m for m in messages)


def test_inductor_keeps_closer_to_the_planned_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a budget, Inductor's horizontal fusion is kept local (Note [Keeping Inductor's fusion near
    the plan] in memopt/codegen/inductor.py): the compiled step's tracked peak comes down towards the
    plan's. Measured on this Llama at budget 0.5 (22.57 MiB; the plan simulates 22.49 MiB): 25.28 MiB
    tracked with Inductor's own limit (64 nodes), 23.86 MiB with memopt's (4). The rest of the gap is not
    horizontal fusion (a limit of 0 gives 24.4 MiB): the budget is still checked on the FX graphs."""
    import memopt.codegen.inductor as inductor

    peaks = {}
    # Inductor's C++ code depends on torch's thread count, and so does its peak: measured at two threads
    # (a pytest-xdist worker has one; there the two limits differ by 0.44 MiB).
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for distance in (64, inductor.MAX_HORIZONTAL_FUSION_DISTANCE):
            monkeypatch.setattr(inductor, "MAX_HORIZONTAL_FUSION_DISTANCE", distance)
            backend, mem = _run("llama4", 0.5, codegen="inductor", cost_profile="h100", offload=False)
            report = backend.reports[-1]
            assert report.memory is not None and report.budget_bytes is not None
            assert report.memory.peak_bytes <= report.budget_bytes
            peaks[distance] = mem.peak_bytes
    finally:
        torch.set_num_threads(threads)
    assert peaks[inductor.MAX_HORIZONTAL_FUSION_DISTANCE] < peaks[64] - 512 * 1024, peaks


def test_a_value_a_recomputation_reads_may_stay_freed_until_that_reader_runs() -> None:
    """Note [Freed windows]: a value that another value's recomputation reads is offered a window ending
    at each such reader's first backward use, not only at its own first use and at the earliest link of
    its chain (the residual stream links every layer to the head's recomputation at the backward's
    start: with only that end, no layer value could stay freed across a peak in the loss's backward, and
    Llama-3.1-8B QLoRA's lowest reachable peak was 12.74 GiB instead of 9.24 GiB)."""
    from memopt.schedule.model import RECOMPUTE

    backend, _ = _run("llama4", 0.5, codegen="eager", offload=False)
    problem = _baseline_problem(backend.reports[-1])
    items = {item.name: item for item in problem.items}
    checked = 0
    for reader in problem.items:
        if not any(o.kind == RECOMPUTE for o in reader.options):
            continue
        for name in reader.reads:
            value = items.get(name)
            if value is None or reader.first_backward_use >= value.first_backward_use:
                continue
            ends = {o.end for o in value.options if o.kind == RECOMPUTE}
            if ends:
                assert reader.first_backward_use in ends, (name, reader.name, sorted(ends))
                checked += 1
    assert checked >= 4, checked


class _DropoutMLP(nn.Module):
    """Dropout between layers. It returns each dropout's output, whose zeros show the mask it drew,
    unless ``show_masks`` is False (then only the loss: the backward alone reads those outputs)."""

    def __init__(self, width: int = 128, depth: int = 3, p: float = 0.3, show_masks: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.p, self.show_masks = p, show_masks

    def forward(self, x: torch.Tensor, masks: list[torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        dropped = []
        for i, layer in enumerate(self.layers):
            h = torch.tanh(layer(x))
            # Given masks: the reference that applies the compiled step's own masks.
            x = h * masks[i] / (1 - self.p) if masks is not None else nn.functional.dropout(h, self.p)
            dropped.append(x)
        return (x * x).sum(), dropped if self.show_masks else []


def _assert_the_forwards_masks(model: nn.Module, x: torch.Tensor, loss: torch.Tensor,
                               dropped: list[torch.Tensor]) -> None:
    """The compiled step's loss and gradients equal eager's with the masks its forward drew (the zeros
    of each dropout's output)."""
    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    ref_loss, _ = ref(x, masks=[(d != 0).float() for d in dropped])
    ref_loss.backward()
    assert_close(loss, ref_loss, "loss with the forward's masks")
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, f"grad of {name} with the forward's masks")


@pytest.mark.parametrize("how", ["pytorch knapsack", "memopt budget"])
def test_a_cut_never_draws_dropout_masks_again(how: str) -> None:
    """torch's knapsack can recompute a dropout in the backward, which draws a new mask and silently
    corrupts the gradients (pytorch/pytorch#190758; measured on a 2-layer GPT-2 XL at 0.5: 7 dropouts
    re-run). memopt's partition step saves what random ops make: the gradients are those of the masks
    the forward drew, both under torch's knapsack (activation_memory_budget=0.1) and under a memopt
    budget (the search tries knapsack cuts too)."""
    from memopt.schedule.problem import draws_random

    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = _DropoutMLP(), torch.randn(256, 128)
    options: dict[str, object] = {"codegen": "eager", "offload": False}
    share = 0.1 if how == "pytorch knapsack" else 1.0
    if how == "memopt budget":
        options["memory_budget"] = 0.3
    backend = MemoptBackend(options)
    with torch._functorch.config.patch(activation_memory_budget=share):
        loss, dropped = torch.compile(model, backend=backend)(x)
        loss.backward()
    report = backend.reports[-1]
    assert report.backward is not None and report.forward is not None
    assert any(draws_random(n) for n in report.forward.graph.nodes)
    assert not any(draws_random(n) for n in report.backward.graph.nodes)
    _assert_the_forwards_masks(model, x, loss, dropped)


def _dropout_step(passes: tuple[object, ...] | None, dtype: torch.dtype, show_masks: bool = True,
                  ) -> tuple[MemoptBackend, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = _DropoutMLP(show_masks=show_masks).to(dtype), torch.randn(256, 128, dtype=dtype)
    backend = MemoptBackend({"codegen": "eager"}, passes=passes)   # type: ignore[arg-type]
    torch.manual_seed(1)
    loss, dropped = torch.compile(model, backend=backend)(x)
    loss.backward()
    return backend, loss, dropped, [p.grad for p in model.parameters()]   # type: ignore[misc]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_dropout_changes_no_value(dtype: torch.dtype) -> None:
    """split_dropout is lossless: with it, a compiled step's loss, dropout outputs and gradients are
    bitwise those without it, and (same seed: memopt's eager code generator draws the masks in
    eager's order) the loss and dropout outputs are bitwise eager PyTorch's, also in bf16, where the
    CPU kernel scales by 1 / (1 - p) rounded to bf16."""
    from memopt.compiler.pipeline import PIPELINE

    backend, loss, dropped, grads = _dropout_step(None, dtype)
    assert next(r for r in backend.reports[-1].passes if r.name == "split_dropout").stats["pass_stats"] == {"dropouts": 3, "masks_made": 0}
    _, loss_without, dropped_without, grads_without = _dropout_step(
        tuple(p for p in PIPELINE if p.name != "split_dropout"), dtype)
    torch.manual_seed(0)
    model, x = _DropoutMLP().to(dtype), torch.randn(256, 128, dtype=dtype)
    torch.manual_seed(1)
    eager_loss, eager_dropped = model(x)
    assert torch.equal(loss, loss_without) and torch.equal(loss, eager_loss)
    for ours, without, eager in zip(dropped, dropped_without, eager_dropped):
        assert torch.equal(ours, without) and torch.equal(ours, eager)
    for ours, without in zip(grads, grads_without):
        assert torch.equal(ours, without)


def test_split_dropout_lets_the_backward_recompute_dropout_outputs() -> None:
    """Without the pass the forward must save each dropout's output (read by the backward: a matmul's
    input, for its weight's gradient, or the square's) besides its mask and the tanh output. With it,
    the output is ``native_dropout_backward(tanh, mask)``, which a cut may recompute; torch's min-cut
    does so for the last layer, whose tanh output it saves as such (the first two it reads through
    ``detach`` nodes, other values to its cut): the saved activations fall by one dropout output,
    256 x 128 fp32."""
    from memopt.compiler.pipeline import PIPELINE

    saved = {}
    for name, passes in (("with", None), ("without", tuple(p for p in PIPELINE if p.name != "split_dropout"))):
        backend, *_ = _dropout_step(passes, torch.float32, show_masks=False)
        memory = backend.reports[-1].memory
        assert memory is not None
        saved[name] = memory.saved_activation_bytes
    assert saved["without"] - saved["with"] == 256 * 128 * 4, saved


def test_saved_views_are_made_with_their_base_and_free_their_storage_after_its_last_read() -> None:
    """Note [Saved views are made where their base is]: torch's partitioner makes a view the forward
    makes only to save it (GPT-2's eager attention saves transposes of its probabilities) at the
    forward's end; memopt's partition step makes it right after its base, so that an offload copies it
    while the layer runs rather than in a queue at the forward's end (on GPT-2 XL at the knapsack's peak,
    2 offloads were chosen of 591 choices before, 170 after). Note [Freed windows]: the storage is still
    read after the view is made, and goes only after that read, so every window of the view starts
    there: recompute exactly there, offload and compression no earlier. (Recompute windows starting at
    the view, made at the forward's end, left a 6-layer GPT-2 XL at 0.5 infeasible in the model: 2.56 GB
    against 2.20 GB.)"""
    from transformers import GPT2Config, GPT2LMHeadModel

    from memopt.schedule.model import RECOMPUTE
    from memopt.schedule.simulate import aliased_argument

    config = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=512, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager", bos_token_id=0,
                        eos_token_id=0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"
    batch = token_batch(4, 256)
    torch._dynamo.reset()
    backend = MemoptBackend({"codegen": "eager", "memory_budget": 0.5, "cost_profile": "h100"})
    hf_loss(torch.compile(model, backend=backend), batch)
    report = backend.reports[-1]
    problem, fw = _baseline_problem(report), report.schedule.baseline.forward
    nodes = {n.name: n for n in fw.graph.nodes}
    output = fw.graph.output_node()
    events = {(e.phase, e.node): i for i, e in enumerate(problem.events)}

    def saved_only(node: torch.fx.Node) -> bool:
        return aliased_argument(node) is not None and all(u is output or saved_only(u) for u in node.users)

    hoisted = 0
    for node in fw.graph.nodes:
        if node.op == "call_function" and saved_only(node):
            # Right after its latest input, or after views made there before it.
            at = node.prev
            while at not in node.all_input_nodes and saved_only(at):
                at = at.prev
            assert at is max(node.all_input_nodes, key=lambda n: events.get(("forward", n.name), -1)) \
                or at.op == "placeholder", (node.name, at.name)
            hoisted += 1
    assert hoisted >= 4, hoisted
    checked = 0
    for item in problem.items:
        node = nodes[item.name]
        if aliased_argument(node) is None:
            continue
        base = node
        while (parent := aliased_argument(base)) is not None:
            base = parent
        # The storage's readers that are not views of it: the last of them is where it can go.
        views, stack = {base}, [base]
        while stack:
            for user in stack.pop().users:
                if aliased_argument(user) in views and user not in views:
                    views.add(user)
                    stack.append(user)
        reads = [events[("forward", u.name)] for v in views for u in v.users
                 if u not in views and ("forward", u.name) in events]
        last_read = max([events[("forward", base.name)], *reads])
        starts = {o.kind: o.start for o in item.options}
        if RECOMPUTE in starts and last_read > item.made:
            assert {o.start for o in item.options if o.kind == RECOMPUTE} == {last_read}, (item.name, last_read)
            assert all(o.start >= last_read for o in item.options), (item.name, item.options, last_read)
            checked += 1
    assert checked >= 2, checked


def test_a_users_checkpoint_that_recomputes_dropout_replays_its_rng_state() -> None:
    """A user's activation checkpoint around a dropout tags it MUST_RECOMPUTE; memopt leaves that tag
    alone (protect_unrepeatable), and torch then passes the forward's RNG state to the backward
    (run_and_save_rng_state / run_with_rng_state, whose state input is named apart from the forward's
    output: the simulator pairs them by position). The backward re-runs the dropout with the forward's
    state: gradients are those of the forward's own masks, and the simulated peak is the tracked one."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(_DropoutMLP):
        def forward(self, x: torch.Tensor, masks: list[torch.Tensor] | None = None,
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
            if masks is not None:
                return super().forward(x, masks)
            return checkpoint(super().forward, x, use_reentrant=False)   # type: ignore[no-any-return]

    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = Checkpointed(), torch.randn(256, 128)
    backend = MemoptBackend({"codegen": "eager"})
    compiled = torch.compile(model, backend=backend)
    compiled(x)[0].backward()                                       # compiles
    model.zero_grad(set_to_none=True)
    gc.collect()
    with track_memory("cpu") as mem:
        loss, dropped = compiled(x)
        loss.backward()
    report = backend.reports[-1]
    assert report.backward is not None and report.memory is not None
    assert any(n.target is torch._prims.rng_prims.run_with_rng_state for n in report.backward.graph.nodes)
    _assert_the_forwards_masks(model, x, loss, dropped)
    del loss, dropped
    assert abs(report.memory.peak_bytes - mem.peak_bytes) <= TOLERANCE * mem.peak_bytes, (
        report.memory.peak_bytes, mem.peak_bytes)


class _Captured(BaseException):
    """Raised past memopt's fallbacks once the schedule problem is in hand."""


def test_a_recomputation_reads_a_value_through_a_saved_alias_of_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Note [Freed windows]: torch's partitioner saves attention's softmax as a ``detach`` of it, and
    the dropout's output beside it (for the matmul's backward). Recomputing that output needs only
    the softmax and the mask, which the saved alias already holds; a recomputation that stopped only at
    saved values by name went back through the softmax to the scores and the qkv projection (58 ops per
    layer of GPT-2 XL instead of 4, 0.19 ms instead of 0.04 on the h100 profile), and the scheduler
    could not match PyTorch's knapsack, which saves the softmax itself. No recompute set re-runs an op
    whose storage a saved value holds (other than the value's own), and each layer's attention dropout
    is recomputed from the saved softmax."""
    from transformers import GPT2Config

    from memopt.plan import plan
    from memopt.schedule import search
    from memopt.schedule.simulate import storage_root

    captured: list[object] = []

    def capture(evaluate: object, build: Callable[[object], object], baseline: object, *args: object,
                **kwargs: object) -> None:
        captured.append(build(baseline))
        captured.append(baseline)
        raise _Captured

    monkeypatch.setattr(search, "search_plan", capture)
    import memopt.compiler.capture as capture_module
    monkeypatch.setattr(capture_module, "search_plan", capture)
    layers = 3
    config = GPT2Config(vocab_size=256, n_embd=64, n_layer=layers, n_head=4, n_positions=256,
                        attn_implementation="sdpa")    # dropout 0.1 everywhere, as GPT-2 ships
    with pytest.raises(_Captured):
        plan(config, options={"memory_budget": 0.5}, device="h100", batch=2, seq=128)
    problem, baseline = captured
    joint = baseline.forward    # type: ignore[attr-defined]
    nodes = {n.name: n for n in joint.graph.nodes}
    saved_roots = {storage_root(nodes[m]).name: item.name for item in problem.items  # type: ignore[attr-defined]
                   for m in item.members if m in nodes}
    from_softmax = 0
    for item in problem.items:      # type: ignore[attr-defined]
        for name in item.recompute_set:
            node = nodes.get(name)
            if node is not None:
                owner = saved_roots.get(storage_root(node).name)
                assert owner in (None, item.name), (item.name, name, owner)
        if any("native_dropout_backward" in n for n in item.recompute_set) and \
                any(r.startswith("detach") for r in item.reads):
            assert len(item.recompute_set) <= 4, (item.name, item.recompute_set)
            from_softmax += 1
    assert from_softmax >= layers, from_softmax


def test_values_the_forward_also_returns_are_not_freed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A saved value the forward also returns (each dropout output of _DropoutMLP) is held by the caller
    through the backward: recomputing or offloading it frees nothing. Such values are no items of the
    model (they stay readable by recomputations), so the model's peak of the plan is the simulated one;
    when they were items, the model planned 1.44 MB at budget 0.3 and the plan measured 1.71 MB
    (infeasible), where 1.48 MB is reachable."""
    from memopt.schedule import search

    solved = _recording(monkeypatch, search, "solve_schedule")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = _DropoutMLP(), torch.randn(256, 128)
    backend = MemoptBackend({"codegen": "eager", "offload": False, "memory_budget": 0.3})
    loss, dropped = torch.compile(model, backend=backend)(x)
    loss.backward()
    report = backend.reports[-1]
    assert report.forward is not None and report.memory is not None and report.schedule is not None
    returned = {n.name for n in report.forward.graph.output_node().args[0][1:1 + len(dropped)]}
    problem = _baseline_problem(report)
    assert len(returned) == 3 and not returned & {item.name for item in problem.items}
    assert report.schedule.method == "cp-sat" and report.schedule.chosen.peak_bytes <= report.budget_bytes
    assert problem.peak_bytes(solved[0].plan) == report.memory.peak_bytes


def test_a_derivatives_own_ops_are_not_counted_as_recomputation() -> None:
    """``x ** 3`` differentiates to ``grad * 3 * x ** 2``: ``3 * x ** 2`` reads forward values only (no
    tangent), yet eager autograd runs it in the backward, and so does the partitioner's backward here.
    Counting the backward's copies of forward ops (what the scheduler charges a plan, and what the
    benchmarks report) must not call it recomputation: ``forward_region`` leaves out the ops AOTAutograd
    traced in the backward. Before, GPT-2's tanh GELU charged every plan 0.375 ms on GPT-2 XL (h100)."""
    from memopt.schedule.problem import forward_region, rerun_forward_ops
    from memopt.schedule.simulate import backward_nodes

    class Cube(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.proj(x) ** 3).sum()

    model = Cube()
    backend = MemoptBackend({"codegen": "eager"})
    torch.compile(model, backend=backend)(torch.randn(8, 16)).backward()
    (report,) = backend.reports
    assert report.joint is not None and report.backward is not None
    joint, backward = report.joint, report.backward
    squares = [n.name for n in joint.graph.nodes if n.target == torch.ops.aten.pow.Tensor_Scalar
               and n.args[1] == 2]
    # The derivative's square depends on no tangent, and the backward computes it (it is no saved value).
    assert squares and not set(squares) & {n.name for n in backward_nodes(joint.graph)}
    assert set(squares) <= {n.name for n in backward.graph.nodes if n.op == "call_function"}
    region = forward_region(joint)
    assert not set(squares) & region
    assert [n.name for n in rerun_forward_ops(backward, region)] == []
    assert report.schedule is None or report.schedule.chosen.added_time_s == 0.0


def test_a_recomputation_is_not_charged_for_ops_the_backward_runs_again_anyway() -> None:
    """torch's min-cut recomputes cheap pointwise ops around what it saves: GPT-2's tanh GELU
    ``0.5 * x * (1 + tanh(...))`` saves ``x`` and the ``tanh``, and the backward runs ``0.5 * x`` and
    ``1 + tanh`` again for the GELU's derivative. Recomputing the GELU's output then adds only its last
    multiply: the model prices each plan by what it adds to the modelled cut, and verification measures
    the same (Note [Freed windows]). Charged for the ops the backward already runs, the GELU output cost
    twice what it adds (here and on GPT-2 XL), and refined GPT-2 XL plans verified up to 0.25 ms dearer
    than the model said."""
    from memopt.compiler.partition import realise_plan
    from memopt.schedule.model import RECOMPUTE

    torch._dynamo.reset()
    model = tiny_gpt2(layers=2)
    backend = MemoptBackend({"codegen": "eager", "cost_profile": "h100", "memory_budget": 0.5,
                             "offload": False}, fused_costs=True)
    hf_loss(torch.compile(model, backend=backend), token_batch(1, 256))
    report = backend.reports[-1]
    baseline, problem = report.schedule.baseline, _baseline_problem(report)
    plan = {item.name: max((o for o in item.options if o.kind == RECOMPUTE), key=lambda o: o.end)
            for item in problem.items if item.pattern.endswith("mlp.c_proj:t.default")
            and any(o.kind == RECOMPUTE for o in item.options)}
    found = realise_plan(problem.plan_of(plan), 1.0, report.realiser)
    added, modelled, planned = found.added_time_s - baseline.added_time_s, sum(o.time_s for o in plan.values()), len(plan)
    print("GELU outputs recomputed:", planned, "verified added", added, "modelled", modelled)
    assert planned == 2 and added > 0
    assert modelled == pytest.approx(added, rel=0.02)
