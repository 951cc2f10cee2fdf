"""Token elimination's data movements as custom ops, for ``codegen="triton"``.

- ``memopt::gather_rows(x, index) -> (B, K, H)``: ``x[b, index[b, j]]``, the kept tokens' rows of the
  sublayer's input ``x`` (B, S, H).
- ``memopt::scatter_add_rows(base, index, rows, seq) -> (B, S, H)``: ``base`` (zeros when None) with
  ``rows`` (B, K, H) added at the kept positions: the residual stream after an eliminated sublayer.

Each is the other's backward: the gradient of a gather is a scatter-add into zeros, the gradient of
``rows`` is a gather of the incoming gradient (``base``'s gradient is the incoming gradient itself).
On CUDA (and on CPU with ``MEMOPT_TRITON_CPU=1``) they run memopt's Triton kernels
(:mod:`memopt.codegen.token_rows`), which read the kept rows straight from the tensor and add into the
output in place, with no permuted copy of the sequence; elsewhere the same PyTorch ops as
:func:`memopt.tokens.gather_tokens` / :func:`memopt.tokens.scatter_tokens`. The output of the scatter is
a new tensor: ``base`` is the residual stream, which the sublayer's norm has saved for its backward, so it
is never written.
"""

from __future__ import annotations

from typing import Any

import torch

from memopt.codegen.triton_kernels import kernels_run_on

__all__ = ["gather_rows", "scatter_add_rows"]


def _check(x: torch.Tensor, index: torch.Tensor, what: str) -> None:
    if x.dim() != 3 or index.dim() != 2 or index.shape[0] != x.shape[0]:
        raise ValueError(f"memopt::{what}: expected (B, S, H) rows and (B, K) positions; got "
                         f"{tuple(x.shape)} and {tuple(index.shape)}")


@torch.library.custom_op("memopt::gather_rows", mutates_args=())
def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, j]]`` for every ``b, j``: (B, K, H)."""
    _check(x, index, "gather_rows")
    if kernels_run_on(x.device):
        from memopt.codegen import token_rows

        return token_rows.gather_rows(x if x.stride(-1) == 1 else x.contiguous(), index)
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[2]))


@gather_rows.register_fake
def _gather_fake(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    _check(x, index, "gather_rows")
    return x.new_empty(x.shape[0], index.shape[1], x.shape[2])


@torch.library.custom_op("memopt::scatter_add_rows", mutates_args=())
def scatter_add_rows(base: torch.Tensor | None, index: torch.Tensor, rows: torch.Tensor, seq: int) -> torch.Tensor:
    """``base`` (zeros of (B, seq, H) when None) with ``rows[b, j]`` added at row ``index[b, j]``."""
    _check(rows, index, "scatter_add_rows")
    shape = (rows.shape[0], seq, rows.shape[2])
    out = rows.new_zeros(shape) if base is None else base.clone(memory_format=torch.contiguous_format)
    if kernels_run_on(rows.device):
        from memopt.codegen import token_rows

        return token_rows.scatter_add_rows_(out, index, rows.contiguous())
    return out.scatter_add_(1, index[..., None].expand(-1, -1, rows.shape[2]), rows)


@scatter_add_rows.register_fake
def _scatter_fake(base: torch.Tensor | None, index: torch.Tensor, rows: torch.Tensor, seq: int) -> torch.Tensor:
    _check(rows, index, "scatter_add_rows")
    return rows.new_empty(rows.shape[0], seq, rows.shape[2])


def _gather_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, index = inputs
    ctx.save_for_backward(index)
    ctx.seq = x.shape[1]


def _gather_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    (index,) = ctx.saved_tensors
    return scatter_add_rows(None, index, grad, ctx.seq), None


def _scatter_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    base, index, _, _ = inputs
    ctx.save_for_backward(index)
    ctx.has_base = base is not None


def _scatter_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    (index,) = ctx.saved_tensors
    return (grad if ctx.has_base else None), None, gather_rows(grad, index), None


gather_rows.register_autograd(_gather_backward, setup_context=_gather_setup)
scatter_add_rows.register_autograd(_scatter_backward, setup_context=_scatter_setup)
