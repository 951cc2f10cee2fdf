"""``memopt.prepare``: the module state a compile cannot create, made before the optimizer exists.

Sparse backprop (``options["sparse_backprop"]``): what the policy does not train is frozen and each
trained slice becomes a small parameter (Note [Sparse backprop] in :mod:`memopt.sparse`).

Adapters (``options["adapters"]``): every base parameter is frozen, and each targeted linear gets an
:class:`memopt.runtime.adapters.Adapter` child holding its trainable parameters, initialised as PEFT
initialises them, plus a forward hook that adds the adapter's output (Note [Adapters as a composite op]).
The model is changed in place and returned; preparing it again with the same adapter options does
nothing, with other options is an error.

Quantized base weights (``options["quantize"]``, with adapters): each targeted linear is replaced by a
:class:`memopt.runtime.qlinear.QuantizedLinear` holding its weight in NF4 or int8 (Note [Quantized
linears]); the full-precision weight is dropped, so its memory is freed once nothing else holds it. The
adapter is made from the full-precision weight first (LoRA's initialisation does not read it, but a
future method's might), then moves to the quantized module with its hook. DoRA and PaCA need the
weight's values in their own ops and are refused with a quantized base.

Targets, as PEFT reads ``target_modules``: a list of names (a module matches when its qualified name is
one of them or ends with ``"." + name``), a string (a regular expression the whole qualified name must
match), or ``"all-linear"`` (every ``nn.Linear`` and transformers ``Conv1D`` but the model's output
layer, ``model.get_output_embeddings()``).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch import nn

from memopt.config import AdapterConfig, MemoptConfig, QuantizeConfig, parse_options
from memopt.errors import MemoptConfigError, MemoptUnsupportedError
from memopt.runtime.adapters import ADAPTER_ATTR, Adapter, adapter_hook
from memopt.runtime.quant import NF4_BLOCK

__all__ = ["adapter_modules", "prepare", "prepared_adapters"]

# The attribute a prepared model keeps its adapter options under.
PREPARED_ATTR = "_memopt_adapters"
QUANTIZED_ATTR = "_memopt_quantize"


def prepare(model: nn.Module, options: Mapping[str, Any] | MemoptConfig | None, *,
            example_inputs: Mapping[str, Any] | None = None, optimizer: str = "adamw",
            progress: Callable[[str], None] | None = None) -> nn.Module:
    """Freeze the base and create the adapters or slices that ``options`` ask for (see the module
    docstring). ``sparse_backprop: "auto"`` chooses what trains for ``example_inputs`` (a batch of the
    shape trained on), ``optimizer``'s states and ``options["memory_budget"]``, reporting to ``progress``
    (Note [Automatic sparse update])."""
    config = parse_options(options)
    if config.sparse_backprop is not None:
        if config.adapters is not None or config.quantize is not None:
            raise MemoptUnsupportedError(
                "options['sparse_backprop'] with options['adapters'] or ['quantize']: memopt trains either "
                "adapters or slices of the model's own weights, not both in one model yet; drop one of them")
        from memopt.sparse import prepare_sparse
        from memopt.sparse_auto import prepare_auto

        if config.sparse_backprop.auto:
            return prepare_auto(model, config, example_inputs, optimizer=optimizer, progress=progress)
        return prepare_sparse(model, config)
    if config.adapters is None:
        if config.quantize is not None:
            raise MemoptConfigError(
                "options['quantize'] needs options['adapters']: the adapters' targets are the linears whose "
                "frozen weights are quantized (QLoRA), e.g. {'adapters': {'method': 'lora', 'targets': "
                "'all-linear'}, 'quantize': {'weights': 'nf4'}}")
        warnings.warn("memopt.prepare: the options ask for no adapters; the model is unchanged",
                      stacklevel=2)
        return model
    done = prepared_adapters(model)
    if done is not None:
        if done == config.adapters and getattr(model, QUANTIZED_ATTR, None) == config.quantize:
            return model
        raise MemoptConfigError(
            f"this model was prepared with adapters {done} and quantize "
            f"{getattr(model, QUANTIZED_ATTR, None)}; it cannot be prepared again with {config.adapters} and "
            f"{config.quantize}. Build a fresh model (or reload its base weights) to change them")
    adapters = config.adapters
    if config.quantize is not None and adapters.method != "lora":
        raise MemoptUnsupportedError(
            f"adapters.method {adapters.method!r} with a quantized base: {adapters.method.upper()} reads the "
            "base weight's values in its own ops, which memopt does not yet fuse with dequantization; use "
            "method 'lora' (QLoRA) or drop options['quantize']")
    if adapters.method == "paca" and adapters.dropout > 0:
        raise MemoptConfigError("adapters.dropout: PaCA has no adapter dropout (it trains weight columns "
                                "directly); set dropout to 0 or use method 'lora' or 'dora'")
    targets = find_targets(model, adapters.targets)
    shapes = []                     # (in, out, fan_in_fan_out) per target, all checked before any change
    for name, module in targets:
        weight = cast(torch.Tensor, module.weight)
        fan_in_fan_out = not isinstance(module, nn.Linear)        # Conv1D stores (in, out)
        rows, cols = int(weight.shape[0]), int(weight.shape[1])
        in_features, out_features = (rows, cols) if fan_in_fan_out else (cols, rows)
        if adapters.method == "paca" and adapters.rank > in_features:
            raise MemoptConfigError(f"adapters.rank {adapters.rank} exceeds the {in_features} input columns of "
                                    f"{name!r}: PaCA picks rank columns; lower the rank")
        if config.quantize is not None and config.quantize.weights == "nf4" and weight.numel() % NF4_BLOCK:
            raise MemoptUnsupportedError(
                f"{name!r} has {weight.numel()} weight values, not a multiple of {NF4_BLOCK}: NF4 stores blocks "
                f"of {NF4_BLOCK}. Leave it out of adapters.targets or quantize to int8")
        shapes.append((in_features, out_features, fan_in_fan_out))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    generator = torch.Generator().manual_seed(adapters.seed)
    for (name, module), (in_features, out_features, fan_in_fan_out) in zip(targets, shapes):
        adapter = Adapter(adapters.method, in_features, out_features, adapters.rank, adapters.alpha,
                          adapters.dropout, adapters.use_rslora, fan_in_fan_out,
                          weight=cast(torch.Tensor, module.weight), generator=generator)
        if config.quantize is not None:
            module = _quantize(model, name, module, config.quantize, fan_in_fan_out)
        module.add_module(ADAPTER_ATTR, adapter)
        module.register_forward_hook(adapter_hook, with_kwargs=True)
    setattr(model, PREPARED_ATTR, adapters)
    setattr(model, QUANTIZED_ATTR, config.quantize)
    return model


def _quantize(model: nn.Module, name: str, module: nn.Module, quantize: QuantizeConfig,
              fan_in_fan_out: bool) -> nn.Module:
    """Put a :class:`QuantizedLinear` in place of the linear ``name`` of ``model``; returns it."""
    from memopt.runtime.qlinear import QuantizedLinear

    quantized = QuantizedLinear.from_linear(module, quantize.weights, double_quant=quantize.double_quant,
                                            fan_in_fan_out=fan_in_fan_out)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, quantized)
    return quantized


def prepared_adapters(model: nn.Module) -> AdapterConfig | None:
    """The adapter options ``model`` was prepared with, or None."""
    value = getattr(model, PREPARED_ATTR, None)
    return value if isinstance(value, AdapterConfig) else None


def adapter_modules(model: nn.Module) -> list[tuple[str, nn.Module, Adapter]]:
    """(qualified name, linear, its adapter) for every prepared linear of ``model``, in module order."""
    return [(name, module, getattr(module, ADAPTER_ATTR)) for name, module in model.named_modules()
            if isinstance(getattr(module, ADAPTER_ATTR, None), Adapter)]


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear``, or transformers' ``Conv1D`` (a linear whose weight is stored ``(in, out)``)."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2


def find_targets(model: nn.Module, targets: tuple[str, ...] | str) -> list[tuple[str, nn.Module]]:
    """The modules ``targets`` names, as PEFT matches them (module docstring); errors name what was
    wrong and what the model has."""
    linears = [(name, m) for name, m in model.named_modules() if name and is_linear(m)]
    if targets == "all-linear":
        get_output = getattr(model, "get_output_embeddings", None)
        output = get_output() if callable(get_output) else None
        found = [(name, m) for name, m in linears if m is not output]
    else:
        if isinstance(targets, str):
            pattern = re.compile(targets)
            matched = [(name, m) for name, m in model.named_modules() if name and pattern.fullmatch(name)]
        else:
            matched = [(name, m) for name, m in model.named_modules() if name and any(
                name == t or name.endswith("." + t) for t in targets)]
        unsupported = [(name, type(m).__name__) for name, m in matched if not is_linear(m)]
        if unsupported:
            name, kind = unsupported[0]
            raise MemoptUnsupportedError(
                f"adapters.targets {targets!r} matches {name!r}, a {kind}; memopt's adapters go on nn.Linear "
                "and transformers' Conv1D only. Name the linear layers instead")
        found = matched
    if not found:
        names = sorted({name.rsplit(".", 1)[-1] for name, _ in linears})
        raise MemoptConfigError(
            f"adapters.targets {targets!r} matches no linear layer of this {type(model).__name__}; its linear "
            f"layers are named {', '.join(names[:20]) or '(none)'}" + (" ..." if len(names) > 20 else "")
            + ", or use 'all-linear'")
    return found
