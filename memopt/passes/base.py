"""What every pass shares: its signature, its result, and the context it reads.

A pass is a module ``memopt/passes/<verb>_<object>.py`` with ``run(gm, ctx) -> PassResult``. It rewrites
the graph (in place or into a new one), says whether anything changed, and returns counts in ``stats``
(pattern hits under the pattern's name). It never writes files, calls the solver or imports codegen: the
runner (``memopt/compiler/runner.py``) times it, lints it, checks what it must keep, tags its nodes and
dumps it. Graph helpers (make or replace a node with its metadata and fake value, dead-code
elimination) are in :mod:`memopt.passes.rewrite`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch.fx

if TYPE_CHECKING:
    from memopt.config import MemoptConfig
    from memopt.cost_model.profile import DeviceProfile
    from memopt.names import GraphInput

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
    # Per input of the graph (the model graph's placeholders; the joint graph's ``primals_*``): its kind
    # and, for parameters and buffers, its qualified name in the model (:mod:`memopt.names`).
    inputs: tuple[GraphInput, ...] = ()

    @property
    def input_kinds(self) -> tuple[str, ...]:
        return tuple(i.kind for i in self.inputs)

    def input_of(self, placeholder: torch.fx.Node) -> GraphInput | None:
        """The graph input ``placeholder`` stands for (None for a joint graph's tangents)."""
        placeholders = [n for n in placeholder.graph.nodes if n.op == "placeholder"
                        and not n.name.startswith("tangents")]
        index = placeholders.index(placeholder) if placeholder in placeholders else -1
        return self.inputs[index] if 0 <= index < len(self.inputs) else None


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
    # Lossy: changes values (token elimination, compression). Runs only when its option asks for it
    # (``wanted``), and the dumps' index says so.
    lossy: bool = False
    # A joint pass that turns gradient outputs into None on purpose (backprop pruning of parameters the
    # policy freezes). Every other change to the joint graph's outputs fails the runner's check.
    drops_gradients: bool = False
    # A model pass that may return an empty tensor (same dtype) in place of an output the user asked it
    # not to make (chunk_sequence's logits: "drop"). Every other change fails the runner's check.
    empties_outputs: bool = False


def call_argument(node: torch.fx.Node, name: str) -> Any:
    """The value ``node`` passes for its op's argument ``name``: positional, keyword or the schema's
    default (``KeyError`` when the op has no such argument)."""
    for index, argument in enumerate(node.target._schema.arguments):  # type: ignore[union-attr]
        if argument.name == name:
            return node.args[index] if index < len(node.args) else node.kwargs.get(name, argument.default_value)
    raise KeyError(f"{node.target} has no argument {name!r}")
