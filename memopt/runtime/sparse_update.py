"""The module that makes a slice of a frozen weight trainable (Note [Sparse backprop] in :mod:`memopt.sparse`).

``memopt.prepare`` registers a :class:`SliceUpdate` as a parametrization of a linear's weight
(``torch.nn.utils.parametrize``, ``unsafe=True``): the weight the module reads is then
``original.index_copy(dim, index, values)``, where ``original`` is the full weight, frozen, and
``values`` is a small trainable parameter holding the selected slice (initialised from it). The optimizer
sees ``values`` only, so its state is slice-sized. Autograd gives ``values`` exactly the dense weight
gradient's slice (``index_copy``'s backward for its source is ``grad.index_select(dim, index)``); the
``prune_backprop`` pass makes the compiled backward compute only that slice.

``dim``: the dimension of the stored weight that ``index`` selects along: input channels (columns) are
dim 1 of an ``nn.Linear`` weight ``(out, in)`` and dim 0 of a transformers ``Conv1D`` weight ``(in, out)``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SliceUpdate"]


class SliceUpdate(nn.Module):
    """``values`` (trainable) written over the slice ``index`` along ``dim`` of the weight it parametrizes."""

    index: torch.Tensor

    def __init__(self, weight: torch.Tensor, dim: int, index: torch.Tensor) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("index", index.to(device=weight.device, dtype=torch.long))
        self.values = nn.Parameter(weight.detach().index_select(dim, self.index).clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.index_copy(self.dim, self.index, self.values)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, slices={self.index.numel()}"
