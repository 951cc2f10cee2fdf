"""Sparse backprop: which slices of which parameters train, and the module state that makes them train.

Note [Sparse backprop]
~~~~~~~~~~~~~~~~~~~~~~
``options["sparse_backprop"]`` is an ordered mapping from glob patterns over qualified parameter names
(``fnmatch``: ``*`` crosses dots) to policies; the first rule that matches a parameter, and whose
``layers`` include the parameter's block, decides it; a parameter no rule matches is frozen (a sparse
update trains what it names, and nothing trains dense because a pattern missed). Policies:

- ``"full"`` / ``"frozen"``: the parameter trains or not (``requires_grad``; AOTAutograd then leaves the
  frozen ones' gradients out of the joint graph, and what was saved only for them).
- ``"bias"`` on a module's weight: the weight is frozen and the module's bias trains.
- ``{"columns": r}`` / ``{"rows": r}`` on a linear's weight: ``r`` (a ratio in (0, 1], or a count) of its
  input channels (columns) or output channels (rows) train, chosen at ``prepare`` by the largest L2 norm
  (``"select": "norm"``, the default) or at random (``"select": "random"``, ``"seed"``). ``prepare``
  makes them a small parameter (:class:`memopt.runtime.sparse_update.SliceUpdate`), so the optimizer's
  state is slice-sized; the weight the model reads is the frozen weight with the slice written in.
  Compiled, the ``prune_backprop`` pass computes a column slice's gradient ``dYᵀ · X[..., idx]`` from a
  saved copy of only those columns of the input, and a row slice's from only those rows of ``dY``.
- ``"layers"``: ``"first:N"``, ``"last:N"`` or a list of block indices restricts a rule to those blocks
  of a repeated stack (``model.layers.<i>``); ``{"sample": N, "every": S, "seed": s}`` trains N blocks
  drawn at random, redrawn every S steps by :class:`LayerSampler` (LISA).

Gradients are exact: a trained slice's gradient is the matching slice of the dense gradient, and a
frozen parameter is never changed.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import random
import re
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch
from torch import nn

from memopt.config import MemoptConfig, ParamPolicy, SparseBackpropConfig, parse_options
from memopt.errors import MemoptConfigError
from memopt.names import layer_of_name

__all__ = ["Decision", "LayerSampler", "canonical_name", "merge_sparse", "prepare_sparse", "resolve",
           "sparse_decisions"]

# The attribute a prepared model keeps its sparse plan under.
SPARSE_ATTR = "_memopt_sparse"
_PARAMETRIZED = re.compile(r"\.parametrizations\.([^.]+)\.(?:original|0\.values)$")


def canonical_name(name: str) -> str:
    """A parameter's name as the user's model names it: a prepared slice's ``values`` and the frozen
    ``original`` are both named after the weight they parametrize."""
    return _PARAMETRIZED.sub(r".\1", name)


@dataclasses.dataclass(frozen=True)
class Decision:
    """What trains of one parameter."""

    name: str                        # qualified name (before prepare)
    kind: str                        # "full" | "frozen" | "columns" | "rows"
    rule: str | None = None          # the pattern that decided it; None: no rule matched (frozen)
    dim: int | None = None           # columns/rows: the stored weight's dimension the slice is along
    index: tuple[int, ...] = ()      # columns/rows: the trained channels, sorted
    sampled: bool = False            # its rule draws blocks at a time (LayerSampler)

    def trainable(self, numel: int, shape: Sequence[int]) -> int:
        """How many values of a parameter of ``shape`` train."""
        if self.kind == "full":
            return numel
        if self.kind in ("columns", "rows"):
            assert self.dim is not None
            return numel // int(shape[self.dim]) * len(self.index)
        return 0


# --------------------------------------------------------------------------------------------------------
# Which rule decides a parameter
# --------------------------------------------------------------------------------------------------------


def _stacks(names: Iterable[str]) -> dict[str, int]:
    """Stack prefix (``model.layers.``) -> number of blocks in it."""
    out: dict[str, int] = {}
    for name in names:
        layer = layer_of_name(name)
        if layer is not None:
            prefix, _, index = layer.rpartition(".")
            out[prefix] = max(out.get(prefix, 0), int(index) + 1)
    return out


def _in_blocks(name: str, policy: ParamPolicy, stacks: dict[str, int]) -> bool:
    selection = policy.layers
    if selection is None:
        return True
    layer = layer_of_name(name)
    if layer is None:
        return False
    prefix, _, text = layer.rpartition(".")
    index, count = int(text), stacks[prefix]
    if selection.first is not None:
        return index < selection.first
    if selection.last is not None:
        return index >= count - selection.last
    if selection.indices is not None:
        return index in {i % count for i in selection.indices if -count <= i < count}
    return True                                   # sampled: every block is in scope; LayerSampler draws


def rule_of(name: str, config: SparseBackpropConfig, stacks: dict[str, int]) -> tuple[str, ParamPolicy] | None:
    """The first rule that decides the parameter ``name`` (a canonical name), or None."""
    for pattern, policy in config.rules:
        if fnmatch.fnmatchcase(name, pattern) and _in_blocks(name, policy, stacks):
            return pattern, policy
    return None


def frozen_by_policy(names: Sequence[str], config: SparseBackpropConfig) -> set[str]:
    """Of ``names`` (canonical parameter names), those the policy does not train at all: no rule, or a
    ``frozen`` rule (the ``prune_backprop`` pass drops their gradients when they still require one)."""
    stacks = _stacks(names)
    out = set()
    for name in names:
        rule = rule_of(name, config, stacks)
        if rule is not None and rule[1].kind != "frozen":
            continue
        owner, _, leaf = name.rpartition(".")
        weight_rule = rule_of(f"{owner}.weight", config, stacks) if leaf == "bias" else None
        if weight_rule is None or weight_rule[1].kind != "bias":         # "bias" on the weight trains it
            out.add(name)
    return out


def unprepared_slices(names: Sequence[str], config: SparseBackpropConfig) -> list[str]:
    """Of a graph's parameter ``names``, the weights the policy slices that were not prepared (no slice
    parameter among the names): compiled so, they would train dense."""
    prepared = {canonical_name(n) for n in names if n.endswith(".0.values")}
    plain = [n for n in names if canonical_name(n) == n]
    stacks = _stacks(plain)
    return [n for n in plain if n not in prepared and (rule := rule_of(n, config, stacks)) is not None
            and rule[1].kind in ("columns", "rows")]


# --------------------------------------------------------------------------------------------------------
# Resolving the policy on a model
# --------------------------------------------------------------------------------------------------------


def _channels(module: nn.Module, kind: str) -> int:
    """The stored weight's dimension holding input channels (columns) or output channels (rows)."""
    transposed = not isinstance(module, nn.Linear)            # transformers' Conv1D stores (in, out)
    return int((kind == "columns") != transposed)


def _slice_index(weight: torch.Tensor, dim: int, policy: ParamPolicy, name: str) -> tuple[int, ...]:
    size = int(weight.shape[dim])
    amount = policy.amount
    assert amount is not None
    count = max(1, round(amount * size)) if isinstance(amount, float) else int(amount)
    if count > size:
        raise MemoptConfigError(
            f"sparse_backprop: {policy.kind} {amount} of {name!r} asks for {count} {policy.kind}, but it has "
            f"{size}; give a count up to {size} or a ratio in (0, 1]")
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(weight) or weight.is_meta:
        return tuple(range(count))                 # planning on fake tensors: only the sizes matter
    if policy.select == "random":
        chosen = torch.randperm(size, generator=torch.Generator().manual_seed(policy.seed))[:count]
    else:
        norms = torch.linalg.vector_norm(weight.detach().float(), dim=1 - dim)
        chosen = torch.topk(norms, count, sorted=False).indices
    return tuple(sorted(int(i) for i in chosen))


def _owners(model: nn.Module) -> dict[str, nn.Module]:
    """Canonical parameter name -> the module that holds it."""
    out = {}
    for module_name, module in model.named_modules():
        for leaf, _ in module.named_parameters(recurse=False):
            name = canonical_name(f"{module_name}.{leaf}" if module_name else leaf)
            if name.endswith(".original") or name.endswith(".values"):
                continue
            out[name] = module
    for module_name, module in model.named_modules():         # parametrized: the module, by the weight
        for leaf in getattr(module, "parametrizations", {}):
            out[f"{module_name}.{leaf}" if module_name else leaf] = module
    return out


def _check_kind(name: str, module: nn.Module, policy: ParamPolicy, pattern: str) -> None:
    from memopt.prepare import is_linear

    leaf = name.rpartition(".")[2]
    if policy.kind in ("columns", "rows") and not (leaf == "weight" and is_linear(module)):
        raise MemoptConfigError(
            f"sparse_backprop[{pattern}] gives {policy.kind} to {name!r}, a {type(module).__name__} "
            f"{leaf}; columns and rows apply to the weights of nn.Linear and transformers' Conv1D only. "
            "Narrow the pattern (e.g. '*.mlp.down_proj.weight') or use 'full' / 'frozen'")
    if policy.kind == "bias" and leaf != "bias" and not isinstance(getattr(module, "bias", None), nn.Parameter):
        raise MemoptConfigError(
            f"sparse_backprop[{pattern}] gives 'bias' to {name!r}, but its {type(module).__name__} has no bias "
            "to train; 'bias' applies to a module's weight when the module has a bias. Use 'frozen' instead")


def resolve(model: nn.Module, config: SparseBackpropConfig) -> dict[str, Decision]:
    """One :class:`Decision` per parameter of ``model`` (by canonical name), checked against the model."""
    if config.auto:
        raise MemoptConfigError(
            "sparse_backprop 'auto' is chosen by memopt.prepare(model, options, example_inputs=batch), which "
            "measures the step on that batch's shapes; call it before anything else prepares the model")
    owners = _owners(model)
    weights = {canonical_name(n): p for n, p in model.named_parameters()}
    stacks = _stacks(owners)
    _check_patterns(list(owners), config, stacks, type(model).__name__)
    decisions: dict[str, Decision] = {}
    for name, module in owners.items():
        rule = rule_of(name, config, stacks)
        if rule is None:
            decisions.setdefault(name, Decision(name, "frozen"))
            continue
        pattern, policy = rule
        _check_kind(name, module, policy, pattern)
        sampled = policy.layers is not None and policy.layers.sample is not None
        if policy.kind in ("columns", "rows"):
            dim = _channels(module, policy.kind)
            index = _slice_index(_full_weight(module, weights[name]), dim, policy, name)
            decisions[name] = Decision(name, policy.kind, pattern, dim, index, sampled)
        elif policy.kind == "bias" and not name.endswith(".bias"):
            decisions[name] = Decision(name, "frozen", pattern, sampled=sampled)
            bias = name.rpartition(".")[0] + ".bias"
            decisions[bias] = Decision(bias, "full", pattern, sampled=sampled)
        elif name not in decisions:                                 # a "bias" rule may have decided it
            decisions[name] = Decision(name, "frozen" if policy.kind == "frozen" else "full", pattern,
                                       sampled=sampled)
    _check_tied(model, decisions)
    return decisions


def _check_tied(model: nn.Module, decisions: dict[str, Decision]) -> None:
    """A tensor the model holds under several names (tied embeddings) gets one policy: the compiled
    graph sees it under one name only."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(canonical_name(name))
    for group in names.values():
        kinds = {decisions[n].kind for n in group if n in decisions}
        if len(kinds) > 1:
            raise MemoptConfigError(
                f"sparse_backprop: {' and '.join(map(repr, group))} are one tensor (tied), but the rules give "
                f"them {' and '.join(sorted(kinds))}; give every name of a tied tensor the same policy")


def _full_weight(module: nn.Module, fallback: torch.Tensor) -> torch.Tensor:
    weight = getattr(module, "weight", fallback)
    return weight if isinstance(weight, torch.Tensor) else fallback


def _check_patterns(names: list[str], config: SparseBackpropConfig, stacks: dict[str, int], model: str) -> None:
    """Every rule matches some parameter in its blocks: a pattern that misses is a mistake, never a
    silently different training run."""
    for pattern, policy in config.rules:
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            leaves = sorted({".".join(n.split(".")[-2:]) for n in names})
            raise MemoptConfigError(
                f"sparse_backprop pattern {pattern!r} matches no parameter of this {model}; patterns are globs "
                f"over qualified names such as {names[0]!r} (parameters end in {', '.join(leaves[:12])}"
                + (" ..." if len(leaves) > 12 else "") + "). Start a pattern with '*.' to match at any depth")
        if not any(_in_blocks(n, policy, stacks) for n in matched):
            raise MemoptConfigError(
                f"sparse_backprop pattern {pattern!r} matches {len(matched)} parameters, none in the blocks "
                f"{policy.layers.to_option() if policy.layers else None!r} (stacks: "
                f"{', '.join(f'{p} with {c} blocks' for p, c in stacks.items()) or 'none'})")


# --------------------------------------------------------------------------------------------------------
# Module state: prepare, merge, sample
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SparsePlan:
    """What ``prepare`` did to a model, kept on it (``SPARSE_ATTR``)."""

    config: SparseBackpropConfig
    decisions: dict[str, Decision]
    active: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)   # sampled stack -> blocks
    steps: int = 0                                                                  # LayerSampler.step calls
    auto: Any = None                # memopt.sparse_auto.AutoChoice when "auto" chose ``config``


def sparse_decisions(model: nn.Module) -> SparsePlan | None:
    """The sparse plan ``model`` was prepared with, or None."""
    plan = getattr(model, SPARSE_ATTR, None)
    return plan if isinstance(plan, SparsePlan) else None


def prepare_sparse(model: nn.Module, options: SparseBackpropConfig | MemoptConfig, *,
                   indices: dict[str, tuple[int, ...]] | None = None) -> nn.Module:
    """Freeze what the policy does not train and make each trained slice a small parameter (in place).
    ``indices``: slices' channels by parameter name, instead of choosing them (loading saved slices)."""
    config = options.sparse_backprop if isinstance(options, MemoptConfig) else options
    assert config is not None
    done = sparse_decisions(model)
    if done is not None:
        if done.config == config or (config.auto and done.auto is not None):
            return model
        raise MemoptConfigError(
            f"this model was prepared with sparse_backprop {done.config.to_option()}; it cannot be prepared again "
            f"with {config.to_option()}. Merge it (memopt.merge_sparse) or build a fresh model to change it")
    decisions = resolve(model, config)
    for name, index in (indices or {}).items():
        if name in decisions:
            decisions[name] = dataclasses.replace(decisions[name], index=index)
    from torch.nn.utils import parametrize

    from memopt.runtime.sparse_update import SliceUpdate

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for decision in decisions.values():
        module_name, _, leaf = decision.name.rpartition(".")
        module = model.get_submodule(module_name)
        if decision.kind == "full":
            getattr(module, leaf).requires_grad_(True)
        elif decision.kind in ("columns", "rows"):
            assert decision.dim is not None
            update = SliceUpdate(getattr(module, leaf), decision.dim, torch.tensor(decision.index))
            parametrize.register_parametrization(module, leaf, update, unsafe=True)
    plan = SparsePlan(config, decisions)
    setattr(model, SPARSE_ATTR, plan)
    _draw(model, plan)
    return model


def trained_parameters(model: nn.Module, decision: Decision) -> list[nn.Parameter]:
    """The parameters through which ``decision``'s parameter trains: itself, or its slice's ``values``."""
    module_name, _, leaf = decision.name.rpartition(".")
    module = model.get_submodule(module_name)
    if decision.kind in ("columns", "rows"):
        update = module.parametrizations[leaf][0]                      # type: ignore[index]
        return [cast(nn.Parameter, update.values)]
    if decision.kind == "full":
        return [getattr(module, leaf)]
    return []


def merge_sparse(model: nn.Module) -> nn.Module:
    """Write every trained slice into its full weight and remove memopt's slice modules (in place): the
    model is then plain PyTorch again, with the weights training made (all frozen but the ``full`` ones)."""
    from torch.nn.utils import parametrize

    plan = sparse_decisions(model)
    if plan is None:
        raise MemoptConfigError("this model has no sparse_backprop slices to merge; it was not prepared with "
                                "options['sparse_backprop']")
    for decision in plan.decisions.values():
        if decision.kind in ("columns", "rows"):
            module_name, _, leaf = decision.name.rpartition(".")
            module = model.get_submodule(module_name)
            parametrize.remove_parametrizations(module, leaf, leave_parametrized=True)
            getattr(module, leaf).requires_grad_(False)
    delattr(model, SPARSE_ATTR)
    return model


def _draw(model: nn.Module, plan: SparsePlan) -> None:
    """Draw the active blocks of every sampled rule and set ``requires_grad`` to match."""
    sampled = [(pattern, policy) for pattern, policy in plan.config.rules
               if policy.layers is not None and policy.layers.sample is not None]
    if not sampled:
        return
    stacks = _stacks(plan.decisions)
    for pattern, policy in sampled:
        assert policy.layers is not None and policy.layers.sample is not None
        for prefix, count in stacks.items():
            rng = random.Random(f"{policy.layers.seed}:{prefix}:{plan.steps // policy.layers.every}")
            plan.active[f"{pattern}@{prefix}"] = tuple(sorted(rng.sample(range(count), min(policy.layers.sample,
                                                                                         count))))
    for decision in plan.decisions.values():
        if not decision.sampled or decision.rule is None:
            continue
        layer = layer_of_name(decision.name)
        prefix, _, index = (layer or "").rpartition(".")
        on = layer is not None and int(index) in plan.active.get(f"{decision.rule}@{prefix}", ())
        for parameter in trained_parameters(model, decision):
            parameter.requires_grad_(on)


class LayerSampler:
    """LISA's layer sampling: call :meth:`step` once per optimizer step; every ``every`` steps (of each
    sampled rule) it draws ``sample`` blocks anew and sets ``requires_grad`` so that only they train.

    A redraw changes which parameters require gradients, which torch.compile guards on: a model compiled
    whole is compiled again for each new set of blocks, one compiled with :func:`memopt.compile_blocks`
    at most 4 times per block class (Note [Block-wise compilation]).
    """

    def __init__(self, model: nn.Module) -> None:
        plan = sparse_decisions(model)
        if plan is None or not any(d.sampled for d in plan.decisions.values()):
            raise MemoptConfigError(
                "memopt.LayerSampler needs a model prepared with a sampled sparse_backprop rule, e.g. "
                "{'*.layers.*': {'train': 'full', 'layers': {'sample': 2, 'every': 50}}, '*': 'frozen'}")
        self.model, self.plan = model, plan
        self._seen = {tuple(sorted(plan.active.items()))}
        self._warned = False

    @property
    def active(self) -> dict[str, tuple[int, ...]]:
        """Per sampled rule and stack (``pattern@stack``), the blocks that train now."""
        return dict(self.plan.active)

    def step(self) -> bool:
        """Count one step; redraw when a rule's period is over. Returns whether the blocks changed."""
        before = dict(self.plan.active)
        self.plan.steps += 1
        _draw(self.model, self.plan)
        self._seen.add(tuple(sorted(self.plan.active.items())))
        self._warn_recompiles()
        return self.plan.active != before

    def _warn_recompiles(self) -> None:
        import torch._dynamo

        from memopt.compiler.regional import BLOCKWISE_ATTR

        limit = torch._dynamo.config.recompile_limit
        if self._warned or hasattr(self.model, BLOCKWISE_ATTR) or len(self._seen) <= limit:
            return
        self._warned = True
        warnings.warn(
            f"memopt.LayerSampler has drawn {len(self._seen)} distinct sets of blocks; a model compiled whole "
            f"is compiled once per set, and past torch._dynamo.config.recompile_limit ({limit}) Dynamo runs "
            "it eagerly, without memopt. Compile it with memopt.compile_blocks(model, options) instead "
            "(at most 4 graphs per block class, whatever the draws)", stacklevel=2)
