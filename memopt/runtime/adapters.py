"""Adapter modules and the ``memopt::adapter_delta`` op: what a prepared linear adds to its output.

Note [Adapters as a composite op]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
``memopt.prepare`` gives every targeted linear an :class:`Adapter` child (its parameters are the model's:
the optimizer sees them, ``state_dict`` saves them) and a forward hook that adds
``memopt::adapter_delta(x, output, weight, ...)`` to the module's output. The op is registered
``CompositeImplicitAutograd``: eager PyTorch runs its reference implementation below with autograd
through it, and Dynamo records it as one node per targeted linear (the parameters it reads become graph
inputs, so the model needs no code change and the graph no break). The ``inject_adapters`` pass
(:mod:`memopt.passes.inject_adapters`) replaces each such node by the method's explicit ops, where later
passes and the scheduler see them; when that pass does not run, AOTAutograd decomposes the op itself into
the same computation, so a prepared model is exact with or without it.

The reference follows PEFT (``peft.tuners.lora``) term by term, with the base layer's output as given:

- LoRA: ``dropout(x) @ A.T @ B.T * scale``, ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
- DoRA: with ``n = ||W + scale * B @ A||`` per output row, detached (DoRA's section 4.3, as PEFT does),
  ``(m / n - 1) * base + (m / n) * scale * dropout(x) @ A.T @ B.T``, where ``base`` is the output
  without bias, or ``dropout(x) @ W.T`` when dropout is active. ``n`` is computed without forming
  ``W + scale * B @ A``: ``||W_i||^2 + 2 scale (B * (W @ A.T))_i. + scale^2 (B @ (A @ A.T) * B)_i.``
  (an ``out x r`` temporary instead of ``out x in``).
- PaCA (partial connection adaptation): ``x[..., index] @ P.T``, where ``index`` holds ``r`` input
  columns drawn at prepare and ``P`` (``out x r``, zero at start) is the change to those columns of
  ``W``. ``index_select`` copies the columns, so the backward keeps ``r`` of them for ``P``'s gradient,
  not ``x`` (a view would keep all of ``x`` alive). Training ``P`` from zero is training the columns
  themselves from ``W``; only weight decay differs (it pulls the change, not the column, towards zero).

``fan_in_fan_out``: the weight is stored ``(in, out)`` (transformers' ``Conv1D`` in GPT-2).
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ADAPTER_ATTR", "Adapter", "adapter_delta", "dora_weight_norm"]

# The child module name a prepared linear holds its adapter under (state_dict: "<path>.memopt_adapter.*").
ADAPTER_ATTR = "memopt_adapter"
METHOD_CODES = {"lora": 0, "dora": 1, "paca": 2}

_lib = torch.library.Library("memopt", "FRAGMENT")
_lib.define(
    "adapter_delta(Tensor x, Tensor base, Tensor? weight, Tensor? bias, Tensor a, Tensor? b, Tensor? magnitude, "
    "Tensor? index, float scale, float dropout, bool training, bool fan_in_fan_out, int method) -> Tensor")


def dora_weight_norm(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``||weight + scale * b @ a||`` per output row, without forming the ``out x in`` sum (Note [Adapters
    as a composite op]); ``weight`` is ``(out, in)``."""
    wa = weight @ a.t()                                    # (out, r)
    squared = (torch.linalg.vector_norm(weight, dim=1) ** 2 + 2 * scale * (b * wa).sum(dim=1)
               + scale * scale * ((b @ (a @ a.t())) * b).sum(dim=1))
    return squared.clamp_min(0).sqrt()


def _adapter_delta(x: torch.Tensor, base: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   a: torch.Tensor, b: torch.Tensor | None, magnitude: torch.Tensor | None,
                   index: torch.Tensor | None, scale: float, dropout: float, training: bool,
                   fan_in_fan_out: bool, method: int) -> torch.Tensor:
    """The reference of ``memopt::adapter_delta`` (Note [Adapters as a composite op])."""
    if method == METHOD_CODES["paca"]:
        assert index is not None
        return torch.index_select(x, -1, index) @ a.t()
    assert b is not None
    dropped = F.dropout(x, dropout, training) if dropout > 0 else x
    lora = (dropped @ a.t()) @ b.t()
    if method == METHOD_CODES["lora"]:
        return lora * scale
    assert magnitude is not None and weight is not None
    w = weight.t() if fan_in_fan_out else weight
    norm = dora_weight_norm(w.detach(), a.detach(), b.detach(), scale).detach()
    ratio = magnitude / norm
    if dropout > 0 and training:
        plain = dropped @ w.t()
    else:
        plain = base - bias if bias is not None else base
    return (ratio - 1) * plain + ratio * lora * scale


_lib.impl("adapter_delta", _adapter_delta, "CompositeImplicitAutograd")


def adapter_delta(x: torch.Tensor, base: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  adapter: Adapter, training: bool) -> torch.Tensor:
    """What ``adapter`` adds to its linear's output ``base`` for input ``x``."""
    a = adapter.columns if adapter.method == "paca" else adapter.lora_A
    return torch.ops.memopt.adapter_delta(
        x, base, weight, bias, a, adapter.lora_B, adapter.magnitude, adapter.index,
        adapter.scale, adapter.dropout, training, adapter.fan_in_fan_out, METHOD_CODES[adapter.method])


class Adapter(nn.Module):
    """One targeted linear's adapter. Parameters (PEFT's names where PEFT has the method):

    - ``lora_A`` ``(r, in)``, ``lora_B`` ``(out, r)``: LoRA's and DoRA's down and up projections.
    - ``magnitude`` ``(out,)``: DoRA's magnitude vector (PEFT's ``lora_magnitude_vector``).
    - ``columns`` ``(out, r)`` and buffer ``index`` ``(r,)``: PaCA's change to the input columns
      ``index`` (sorted) of the weight.
    """

    lora_A: nn.Parameter | None
    lora_B: nn.Parameter | None
    columns: nn.Parameter | None
    magnitude: nn.Parameter | None
    index: torch.Tensor | None

    def __init__(self, method: str, in_features: int, out_features: int, rank: int, alpha: float,
                 dropout: float, use_rslora: bool, fan_in_fan_out: bool, *, weight: torch.Tensor,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.method, self.rank, self.alpha, self.dropout = method, rank, float(alpha), float(dropout)
        self.use_rslora, self.fan_in_fan_out = use_rslora, fan_in_fan_out
        self.in_features, self.out_features = in_features, out_features
        self.scale = self.alpha / (math.sqrt(rank) if use_rslora else rank)
        factory: dict[str, Any] = {"device": weight.device, "dtype": weight.dtype}
        if method == "paca":
            if rank > in_features:
                raise ValueError(f"PaCA rank {rank} exceeds the {in_features} input columns")
            index = torch.randperm(in_features, generator=generator)[:rank].sort().values
            self.columns = nn.Parameter(torch.zeros(out_features, rank, **factory))
            self.register_parameter("lora_A", None)
            self.register_parameter("lora_B", None)
            self.register_parameter("magnitude", None)
            self.register_buffer("index", index.to(weight.device))
            return
        # PEFT's init: A Kaiming-uniform with a = sqrt(5) (nn.Linear's own), B zeros. Drawn on the CPU,
        # where the (seeded) generator lives, then moved to the weight's device.
        a = torch.empty(rank, in_features, dtype=weight.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a.to(weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **factory))
        self.register_parameter("columns", None)
        self.register_buffer("index", None)
        if method == "dora":
            w = weight.t() if fan_in_fan_out else weight
            with torch.no_grad():
                norm = dora_weight_norm(w.detach(), self.lora_A, self.lora_B, self.scale)
            self.magnitude = nn.Parameter(norm.clone())
        else:
            self.register_parameter("magnitude", None)

    def extra_repr(self) -> str:
        return (f"method={self.method}, rank={self.rank}, in={self.in_features}, out={self.out_features}, "
                f"scale={self.scale:g}, dropout={self.dropout:g}")


def adapter_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 output: torch.Tensor) -> torch.Tensor:
    """The forward hook ``memopt.prepare`` puts on a targeted linear (registered ``with_kwargs``): its
    output plus its adapter's."""
    adapter = getattr(module, ADAPTER_ATTR)
    x = args[0] if args else kwargs["input"]
    # A quantized linear (memopt.runtime.qlinear) has no weight tensor; LoRA does not read it.
    weight = cast("torch.Tensor | None", getattr(module, "weight", None))
    bias = getattr(module, "bias", None)
    return output + adapter_delta(x, output, weight, bias, adapter, module.training)
