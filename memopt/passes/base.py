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
