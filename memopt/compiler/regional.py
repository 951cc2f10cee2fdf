"""Compile a model block by block: ``memopt.compile_blocks(model, options)``.

Note [Block-wise compilation]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
``torch.compile(model)`` makes one graph of the whole step, and Dynamo guards it on each parameter's
``requires_grad``. LISA's layer sampling (:class:`memopt.LayerSampler`) changes those flags at every redraw,
so a whole-model graph is compiled again for each distinct set of drawn blocks: up to C(blocks, drawn)
graphs, and past ``torch._dynamo.config.recompile_limit`` Dynamo stops compiling and runs the model eagerly.

Compiled block by block, every block of one class runs the same code, so Dynamo keeps one cache for all
of them, keyed by what its guards see: whether the block's parameters train, and whether its input
carries a gradient (a frozen block after a trained one still backpropagates to it). That is at most
**4 graphs per block class, whatever the draws**. Each graph goes through memopt's whole pipeline; what
is lost is a schedule across blocks, so ``memory_budget`` must be a fraction, applied to each block's
activations. The rest of the model (embeddings, the head and the loss) runs eagerly.

Parameter names inside a block graph are relative to the block (``self_attn.q_proj.weight``), so the
blocks are compiled without the ``sparse_backprop`` rules: ``memopt.prepare`` has already set which
parameters train, and ``prune_backprop`` works from the graph alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import nn

from memopt.config import MemoptConfig, parse_options
from memopt.errors import MemoptConfigError

__all__ = ["compile_blocks", "repeated_blocks"]

# Set on a model whose blocks memopt compiled; LayerSampler reads it.
BLOCKWISE_ATTR = "_memopt_blockwise"


def repeated_blocks(model: nn.Module) -> dict[str, nn.ModuleList]:
    """The outermost ``ModuleList``s of two or more modules of one class (a transformer's layers), by name."""
    found: dict[str, nn.ModuleList] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        if any(name.startswith(f"{outer}.") for outer in found):
            continue
        found[name] = module
    return found


def compile_blocks(model: nn.Module, options: Mapping[str, Any] | MemoptConfig | None = None,
                   **compile_kwargs: Any) -> nn.Module:
    """Compile each block of ``model``'s repeated stacks in place with the memopt backend; returns
    ``model``. ``compile_kwargs`` go to ``nn.Module.compile`` (e.g. ``dynamic=False``).

    Use it with :class:`memopt.LayerSampler`: the number of compiled graphs stays bounded (Note
    [Block-wise compilation]).
    """
    from memopt.compiler.backend import MemoptBackend

    config = parse_options(options)
    if config.memory_budget is not None and config.memory_budget.nbytes is not None:
        raise MemoptConfigError(
            f"compile_blocks schedules each block on its own, so a memory_budget in bytes "
            f"({config.memory_budget}) has no single graph to apply to; give a fraction of each block's "
            "activations instead, e.g. 'memory_budget': 0.5")
    stacks = repeated_blocks(model)
    if not stacks:
        raise MemoptConfigError(
            f"{type(model).__name__} has no repeated blocks (an nn.ModuleList of two or more modules of one "
            "class) to compile one by one; compile it whole with torch.compile(model, backend='memopt')")
    backend = MemoptBackend(dataclasses.replace(config, sparse_backprop=None))
    for blocks in stacks.values():
        for block in blocks:
            block.compile(backend=backend, **compile_kwargs)
    setattr(model, BLOCKWISE_ATTR, backend)
    return model
