"""What every pass shares: its signature, its result, and the context it reads.

A pass is a module ``memopt/passes/<verb>_<object>.py`` with ``run(gm, ctx) -> PassResult``. It rewrites
the graph (in place or into a new one), says whether anything changed, and returns counts in ``stats``
(pattern hits under the pattern's name). It never writes files, calls the solver or imports codegen: the
runner (``memopt/compiler/runner.py``) times it, lints it, tags its nodes and dumps it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch.fx

if TYPE_CHECKING:
    from memopt.config import MemoptConfig
    from memopt.cost_model.profile import DeviceProfile

Stage = Literal["model", "joint"]


@dataclasses.dataclass
class PassResult:
    gm: torch.fx.GraphModule          # the graph after the pass (may be the same object, mutated)
    changed: bool                     # False: the pass found nothing to do
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)   # JSON-able counts, by pattern name


@dataclasses.dataclass
class PassContext:
    """What a pass may read about the compilation it is part of."""

    config: MemoptConfig
    stage: Stage
    profile: DeviceProfile
    # Per input of the graph: "parameter", "buffer", "input" or "symint" (model graph and joint primals).
    input_kinds: tuple[str, ...] = ()


PassFn = Callable[[torch.fx.GraphModule, PassContext], PassResult]


@dataclasses.dataclass(frozen=True)
class Pass:
    """A named rewrite in the pipeline."""

    name: str                                   # the file's name: what it does, e.g. "inject_adapters"
    stage: Stage                                # "model": Dynamo graph before AOTAutograd; "joint": after
    run: PassFn
    # Whether the options ask for this pass at all (an adapter pass without adapter options is not run).
    wanted: Callable[[MemoptConfig], bool] = lambda config: True
    # Passes that must come before this one when both are in the pipeline; checked by the runner.
    after: tuple[str, ...] = ()


def call_argument(node: torch.fx.Node, name: str) -> Any:
    """The value ``node`` passes for its op's argument ``name``: positional, keyword or the schema's
    default (``KeyError`` when the op has no such argument)."""
    for index, argument in enumerate(node.target._schema.arguments):  # type: ignore[union-attr]
        if argument.name == name:
            return node.args[index] if index < len(node.args) else node.kwargs.get(name, argument.default_value)
    raise KeyError(f"{node.target} has no argument {name!r}")


def fake_result(node: torch.fx.Node, key: str) -> Any:
    """What ``node`` computes on its inputs' fake values (``meta[key]``: ``"example_value"`` in Dynamo's
    graph, ``"val"`` in the joint graph): the value a pass gives a node it creates."""
    from torch._subclasses.fake_tensor import FakeTensor

    def value(a: Any) -> Any:
        return a.meta[key] if isinstance(a, torch.fx.Node) else a

    args = torch.fx.node.map_aggregate(node.args, value)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, value)
    fakes: list[FakeTensor] = []
    torch.fx.node.map_aggregate((args, kwargs), lambda v: fakes.append(v) if isinstance(v, FakeTensor) else None)
    if not fakes:
        raise ValueError(f"no fake tensor among the inputs of {node.format_node()}")
    with fakes[0].fake_mode:
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)          # type: ignore[arg-type]
        return node.target(*args, **kwargs)                                     # type: ignore[operator]
