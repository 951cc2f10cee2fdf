"""``sparse_backprop: "auto"``: which blocks and channels train, chosen so that the step fits a budget.

Note [Automatic sparse update]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
TTE (On-Device Training Under 256KB Memory) measures each layer's contribution to accuracy when it alone
is updated, then picks the update that maximises the summed contribution under the memory limit. Two of
its findings carry over without fine-tuning runs, and make the score here:

- later blocks matter more, and backpropagation stops at the first block that trains, so a sparse update
  trains the **last d blocks** of the model's largest repeated stack (embeddings and head stay frozen);
- a layer's contribution grows quickly with the first channels updated and then saturates, so the score of
  a block that trains a share ``r`` of every linear's input channels is ``sqrt(r)``: the score of a choice
  is ``d * sqrt(r)`` (block-equivalents). Ties go to the choice that trains more values.

Within a trained block every linear weight trains ``{"columns": r}`` (``r = 1``: the whole weight) and its
norms and biases train fully. ``r`` is one of ``RATIOS``.

Cost: the peak of the whole step, optimizer states and the optimizer update included, measured as
``memopt plan`` measures it — the model's fake copy prepared with the candidate rules and compiled through
the real pipeline — with no recomputation, so that what fits is bought by training less, not by a slower
step (a ``memory_budget`` still schedules the compiled step as usual). Ratios are tried from the largest;
at each, the deepest d that fits is found from d = 1 and 2 by regula falsi on the peak, which grows with d
about linearly (the blocks of a stack are alike). A ratio whose best possible score (every block) cannot
beat the best found ends the search.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from memopt.config import MemoptConfig, parse_options
from memopt.errors import MemoptConfigError, MemoptInfeasibleBudget, MemoptUnsupportedError
from memopt.units import format_bytes

__all__ = ["AutoChoice", "Candidate", "RATIOS", "choose_sparse_policy", "fake_copy", "prepare_auto"]

RATIOS = (1.0, 0.5, 0.25, 0.125)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One choice: the last ``depth`` blocks train ``ratio`` of their linears' input channels."""

    depth: int
    ratio: float
    trainable: int              # values that train
    peak_bytes: int             # of the whole step, measured on the model's fake copy

    @property
    def score(self) -> float:
        return self.depth * math.sqrt(self.ratio)


@dataclasses.dataclass
class AutoChoice:
    """What ``"auto"`` chose, and what it weighed."""

    stack: str
    blocks: int
    budget_bytes: int
    optimizer: str
    chosen: Candidate
    policy: dict[str, Any]               # the chosen rules, as ``options["sparse_backprop"]`` takes them
    candidates: list[Candidate]
    seconds: float

    def summary(self) -> str:
        c = self.chosen
        what = "whole weights" if c.ratio == 1 else f"{c.ratio:g} of each linear's input columns"
        return (f"sparse_backprop auto: the last {c.depth} of {self.blocks} blocks of {self.stack} train "
                f"{what} ({c.trainable:,} values, score {c.score:.2f}); step peak {format_bytes(c.peak_bytes)} "
                f"within {format_bytes(self.budget_bytes)} ({self.optimizer} states included)")

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["chosen"]["score"] = self.chosen.score
        for row, candidate in zip(out["candidates"], self.candidates):
            row["score"] = candidate.score
        return out


def fake_copy(model: nn.Module, inputs: Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``model`` and ``inputs`` on fake tensors (no storage is copied), with fresh parameter
    objects, so that preparing the copy leaves ``model`` as it was."""
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    modes = {id(t.fake_mode): t.fake_mode for t in tensors if is_fake(t)}   # type: ignore[attr-defined]
    mode = next(iter(modes.values())) if modes else FakeTensorMode(allow_non_fake_inputs=True,
                                                                    shape_env=ShapeEnv())

    def fake(t: torch.Tensor) -> torch.Tensor:
        return (t if is_fake(t) else mode.from_tensor(t, static_shapes=True)).detach()

    memo: dict[int, Any] = {}
    for t in tensors:
        memo[id(t)] = nn.Parameter(fake(t), requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) \
            else fake(t)
    clone = copy.deepcopy(model, memo)
    return clone, {k: fake(v) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _largest_stack(model: nn.Module) -> tuple[str, nn.ModuleList, list[str]]:
    """The repeated stack with the most parameters, and its blocks' linears (names within a block)."""
    from memopt.compiler.regional import repeated_blocks
    from memopt.prepare import is_linear

    stacks = repeated_blocks(model)
    if not stacks:
        raise MemoptUnsupportedError(
            f"sparse_backprop 'auto' trains the last blocks of a repeated stack (an nn.ModuleList of "
            f"alike blocks), and {type(model).__name__} has none; give the policy as rules")
    name, blocks = max(stacks.items(), key=lambda kv: sum(p.numel() for p in kv[1].parameters()))
    linears = [n for n, m in blocks[0].named_modules() if n and is_linear(m)]
    if not linears:
        raise MemoptUnsupportedError(f"sparse_backprop 'auto': the blocks of {name} hold no linear to train")
    return name, blocks, linears


def candidate_policy(stack: str, blocks: int, linears: list[str], depth: int, ratio: float) -> dict[str, Any]:
    """The rules of one candidate, as ``options["sparse_backprop"]`` takes them."""
    scope = {"layers": f"last:{depth}"} if depth < blocks else {}
    rules: dict[str, Any] = {}
    if ratio < 1:
        for linear in linears:
            rules[f"{stack}.*.{linear}.weight"] = {"columns": ratio, **scope}
    rules[f"{stack}.*"] = {"train": "full", **scope}
    return rules


class _Search:
    """Measures candidates (each a fake compile through ``memopt.plan``) and remembers them."""

    def __init__(self, model: nn.Module, inputs: Mapping[str, Any], config: MemoptConfig, optimizer: str,
                 say: Callable[[str], None]) -> None:
        self.stack, blocks, self.linears = _largest_stack(model)
        self.blocks = len(blocks)
        self.model, self.inputs, self.optimizer, self.say = model, inputs, optimizer, say
        self.config = dataclasses.replace(config, memory_budget=None, dump_dir=None, codegen="eager")
        self.measured: dict[tuple[int, float], Candidate] = {}

    def policy(self, depth: int, ratio: float) -> dict[str, Any]:
        return candidate_policy(self.stack, self.blocks, self.linears, depth, ratio)

    def measure(self, depth: int, ratio: float) -> Candidate:
        if (depth, ratio) not in self.measured:
            from memopt.plan import plan

            clone, inputs = fake_copy(self.model, self.inputs)
            options = dataclasses.replace(self.config, sparse_backprop=parse_options(
                {"sparse_backprop": self.policy(depth, ratio)}).sparse_backprop)
            self.say(f"measuring the last {depth} blocks at {ratio:g} of their columns")
            report = plan(clone, inputs, options, optimizer=self.optimizer)
            self.measured[(depth, ratio)] = Candidate(depth, ratio, report.trainable_parameters,
                                                      report.peak_bytes)
        return self.measured[(depth, ratio)]

    def fit(self, ratio: float, budget: int) -> Candidate | None:
        """The deepest candidate at ``ratio`` whose measured peak fits ``budget``, or None. The peak grows
        with depth, about linearly (the blocks of a stack are alike): each guess is the line through the
        deepest fitting depth and the last other measurement, kept strictly between the deepest depth
        that fits and the shallowest that does not (regula falsi)."""
        low = self.measure(1, ratio)
        if low.peak_bytes > budget:
            return None
        top = self.blocks + 1                        # the shallowest depth known not to fit
        last, probe = low, self.measure(min(2, self.blocks), ratio)
        while True:
            if probe.peak_bytes <= budget:
                low = max(low, probe, key=lambda c: c.depth)
            else:
                top = min(top, probe.depth)
            if top - low.depth <= 1:
                return low
            ref = probe if probe.depth != low.depth else last
            slope = max((ref.peak_bytes - low.peak_bytes) / (ref.depth - low.depth), 1.0)
            guess = min(max(low.depth + int((budget - low.peak_bytes) // slope), low.depth + 1), top - 1)
            last, probe = probe, self.measure(guess, ratio)


def _key(candidate: Candidate) -> tuple[float, int]:
    return round(candidate.score, 9), candidate.trainable


def choose_sparse_policy(model: nn.Module, example_inputs: Mapping[str, Any],
                         options: Mapping[str, Any] | MemoptConfig, *, optimizer: str = "adamw",
                         progress: Callable[[str], None] | None = None) -> AutoChoice:
    """Choose the sparse update of ``model`` that fits ``options["memory_budget"]`` (bytes; the whole step
    with ``optimizer``'s states) with the best score (Note [Automatic sparse update]). ``model`` is not
    changed; ``memopt.prepare`` applies the choice."""
    config = parse_options(options)
    budget = config.memory_budget
    if budget is None or budget.nbytes is None:
        raise MemoptConfigError(
            f"sparse_backprop 'auto' chooses what trains so that the step fits a memory_budget in bytes, and "
            f"got {budget if budget is not None else 'no budget'}; give e.g. 'memory_budget': '20GiB'")
    from memopt.prepare import prepared_adapters
    from memopt.sparse import sparse_decisions

    if sparse_decisions(model) is not None or prepared_adapters(model) is not None:
        raise MemoptConfigError(
            "sparse_backprop 'auto' chooses what trains in a model as built, and this one was already prepared "
            "(memopt.prepare with adapters or sparse_backprop rules); build a fresh model for 'auto'")
    say = progress or (lambda message: None)
    started = time.perf_counter()
    search = _Search(model, example_inputs, config, optimizer, say)
    say(f"sparse_backprop auto: {search.blocks} blocks in {search.stack}, budget {format_bytes(budget.nbytes)}")
    best: Candidate | None = None
    for ratio in RATIOS:
        if best is not None and best.score >= search.blocks * math.sqrt(ratio):
            break                                   # no depth at this ratio or below can score higher
        found = search.fit(ratio, budget.nbytes)
        if found is not None and (best is None or _key(found) > _key(best)):
            best = found
    if best is not None:
        return AutoChoice(search.stack, search.blocks, budget.nbytes, optimizer, best,
                          search.policy(best.depth, best.ratio),
                          sorted(search.measured.values(), key=lambda c: (-c.ratio, c.depth)),
                          time.perf_counter() - started)
    least = min(search.measured.values(), key=lambda c: c.peak_bytes)
    raise MemoptInfeasibleBudget(
        f"sparse_backprop 'auto': nothing fits {format_bytes(budget.nbytes)}. The smallest update tried (the "
        f"last block of {search.stack} at {least.ratio:g} of its columns) peaks at "
        f"{format_bytes(least.peak_bytes)} with {optimizer} states; give a larger budget, or quantize the "
        "frozen weights and train adapters", min_peak_bytes=least.peak_bytes)


# Set on every parameter of a model "auto" prepared: the backend finds the choice through the graph's
# inputs (Dynamo passes the parameters themselves) and writes it to the dump.
CHOICE_ATTR = "_memopt_sparse_auto"


def prepare_auto(model: nn.Module, config: MemoptConfig, example_inputs: Mapping[str, Any] | None, *,
                 optimizer: str = "adamw", progress: Callable[[str], None] | None = None) -> nn.Module:
    """Choose the update (:func:`choose_sparse_policy`) and prepare ``model`` with it, in place."""
    from memopt.sparse import prepare_sparse, sparse_decisions

    done = sparse_decisions(model)
    if done is not None and done.auto is not None:
        return model
    if example_inputs is None:
        raise MemoptConfigError(
            "sparse_backprop 'auto' measures the step it chooses for: call memopt.prepare(model, options, "
            "example_inputs=batch) with a batch (keyword inputs of the model) of the shape you train on")
    choice = choose_sparse_policy(model, example_inputs, config, optimizer=optimizer, progress=progress)
    chosen = parse_options({"sparse_backprop": choice.policy}).sparse_backprop
    assert chosen is not None
    from torch._subclasses.fake_tensor import is_fake

    fake_modes = [p.fake_mode for p in model.parameters() if is_fake(p)]   # type: ignore[attr-defined]
    with fake_modes[0] if fake_modes else contextlib.nullcontext():       # a fake model: `memopt plan`
        prepare_sparse(model, chosen)
    plan = sparse_decisions(model)
    assert plan is not None
    plan.auto = choice
    for parameter in model.parameters():
        setattr(parameter, CHOICE_ATTR, choice)
    return model


def choice_of(example_inputs: Any) -> AutoChoice | None:
    """The choice of the model whose parameters are among ``example_inputs``, if "auto" prepared it."""
    for value in example_inputs:
        choice = getattr(value, CHOICE_ATTR, None)
        if isinstance(choice, AutoChoice):
            return choice
    return None
