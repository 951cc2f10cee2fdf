"""``memopt.save_adapters`` / ``memopt.load_adapters``: adapters on disk, in PEFT's format.

LoRA, rsLoRA and DoRA are written as PEFT writes them, so ``peft.PeftModel.from_pretrained(base, path)``
loads them and memopt loads what PEFT wrote:

- ``adapter_config.json``: a ``LoraConfig`` (``peft_type`` ``"LORA"``, ``r``, ``lora_alpha``,
  ``lora_dropout``, ``use_rslora``, ``use_dora``, ``fan_in_fan_out``, ``target_modules`` as the qualified
  names of the prepared linears, which PEFT matches exactly);
- ``adapter_model.safetensors``: ``base_model.model.<linear>.lora_A.weight`` ``(r, in)``,
  ``...lora_B.weight`` ``(out, r)`` and, for DoRA, ``...lora_magnitude_vector`` ``(out,)``.

Sparse backprop (``options["sparse_backprop"]``, :mod:`memopt.sparse`) writes only what trains, in the
same two files with a format of memopt's own: ``adapter_config.json`` has ``"peft_type":
"MEMOPT_SPARSE"``, ``"memopt_format": 1``, ``sparse_backprop`` (the policy, as given) and ``trained``
(per trained parameter: ``kind`` full/columns/rows and, for slices, ``dim``); the tensors are
``<param>`` for a parameter trained whole, and ``<param>.values`` (the slice) with ``<param>.index``
(int64, the channels along ``dim``) for a slice. Loading prepares a fresh model with the stored policy
and the stored indices, so the slices land where they were trained.

PaCA, which PEFT does not have, uses the same two files with a format of memopt's own:
``adapter_config.json`` has ``"peft_type": "MEMOPT_PACA"``, ``"memopt_format": 1``, ``r``, ``seed`` and
``target_modules``; the tensors are ``<linear>.paca.columns`` ``(out, r)``, the change to the chosen
input columns of the weight, and ``<linear>.paca.index`` ``(r,)``, int64, those columns.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memopt.errors import MemoptConfigError, MemoptUnsupportedError
from memopt.jsonfiles import read_json
from memopt.prepare import adapter_modules, prepare, prepared_adapters
from memopt.runtime.adapters import Adapter
from memopt.sparse import Decision, prepare_sparse, sparse_decisions, trained_parameters

__all__ = ["load_adapters", "save_adapters"]

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PACA_TYPE, PACA_FORMAT = "MEMOPT_PACA", 1
SPARSE_TYPE, SPARSE_FORMAT = "MEMOPT_SPARSE", 1


def save_adapters(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model``'s adapters to ``directory`` (created if needed); returns it."""
    from safetensors.torch import save_file

    if sparse_decisions(model) is not None:
        return _save_sparse(model, Path(directory))
    config = prepared_adapters(model)
    if config is None:
        raise MemoptConfigError("this model has no memopt adapters to save; call memopt.prepare(model, options) "
                                "with options['adapters'] first")
    prepared = adapter_modules(model)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    names = [name for name, _, _ in prepared]
    # PaCA's index is int64 already (torch.randperm's dtype, kept by load_adapters' copy).
    tensors = {key: value.detach().contiguous().cpu().clone() for key, value in _file_tensors(prepared).items()}
    if config.method == "paca":
        meta: dict[str, Any] = {"peft_type": PACA_TYPE, "memopt_format": PACA_FORMAT, "r": config.rank,
                                "seed": config.seed, "target_modules": names}
    else:
        meta = {
            "peft_type": "LORA", "task_type": None, "inference_mode": True, "r": config.rank,
            "lora_alpha": config.alpha, "lora_dropout": config.dropout, "use_rslora": config.use_rslora,
            "use_dora": config.method == "dora", "target_modules": names, "bias": "none",
            "fan_in_fan_out": any(a.fan_in_fan_out for _, _, a in prepared), "init_lora_weights": True,
            "modules_to_save": None,
            "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        }
    save_file(tensors, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _file_tensors(prepared: list[tuple[str, nn.Module, Adapter]]) -> dict[str, torch.Tensor]:
    """Each adapter tensor under its key in the files (the module docstring), the model's own tensors."""
    out: dict[str, torch.Tensor] = {}
    for name, _, adapter in prepared:
        if adapter.method == "paca":
            assert adapter.columns is not None and adapter.index is not None
            out[f"{name}.paca.columns"], out[f"{name}.paca.index"] = adapter.columns, adapter.index
            continue
        assert adapter.lora_A is not None and adapter.lora_B is not None
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = adapter.lora_A
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = adapter.lora_B
        if adapter.magnitude is not None:
            out[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = adapter.magnitude
    return out


def load_adapters(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load adapters written by :func:`save_adapters` or by PEFT onto ``model``: an unprepared model is
    prepared from the file's settings first; a prepared one must have the same method, rank and targets."""
    folder = Path(directory)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise MemoptConfigError(f"{folder} holds no adapters: expected {CONFIG_FILE} and {WEIGHTS_FILE} "
                                "(written by memopt.save_adapters or PEFT's save_pretrained)")
    meta = read_json(folder / CONFIG_FILE, MemoptConfigError, "expected the adapter_config.json that "
                     "memopt.save_adapters or PEFT's save_pretrained writes")
    kind = meta.get("peft_type")
    if kind == SPARSE_TYPE:
        return _load_sparse(model, folder, meta)
    if kind == PACA_TYPE:
        if meta.get("memopt_format") != PACA_FORMAT:
            raise MemoptUnsupportedError(f"{folder}: PaCA format {meta.get('memopt_format')!r}; this memopt "
                                         f"reads format {PACA_FORMAT}")
        adapters: dict[str, Any] = {"method": "paca", "rank": _required(meta, "r", folder),
                                    "seed": meta.get("seed", 0)}
    elif kind == "LORA":
        unsupported = [k for k in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform")
                       if meta.get(k)]
        if unsupported or meta.get("bias", "none") != "none":
            raise MemoptUnsupportedError(
                f"{folder}: PEFT options memopt's adapters do not have: "
                f"{', '.join(unsupported + (['bias'] if meta.get('bias', 'none') != 'none' else []))}")
        adapters = {"method": "dora" if meta.get("use_dora") else "lora", "rank": _required(meta, "r", folder),
                    "alpha": _required(meta, "lora_alpha", folder), "dropout": meta.get("lora_dropout", 0.0),
                    "use_rslora": bool(meta.get("use_rslora"))}
    else:
        raise MemoptUnsupportedError(f"{folder}: adapter type {kind!r}; memopt reads PEFT's LORA (LoRA, rsLoRA, "
                                     f"DoRA) and its own {PACA_TYPE}")
    targets = meta.get("target_modules")
    if not (targets is None or isinstance(targets, str)
            or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise MemoptConfigError(f"{folder / CONFIG_FILE} field 'target_modules' is {targets!r}; expected a list "
                                "of module names or a regex string")
    adapters["targets"] = targets if isinstance(targets, str) else list(targets or [])
    if prepared_adapters(model) is None:
        try:
            prepare(model, {"adapters": adapters})
        except MemoptConfigError as err:
            raise MemoptConfigError(f"{folder / CONFIG_FILE}: {err}") from None
    current = prepared_adapters(model)
    assert current is not None
    if (current.method, current.rank) != (adapters["method"], adapters["rank"]):
        raise MemoptConfigError(
            f"{folder} holds {adapters['method']} adapters of rank {adapters['rank']}; this model was prepared "
            f"with {current.method} of rank {current.rank}. Load them onto a fresh model instead")
    tensors = _read_weights(folder / WEIGHTS_FILE)
    expected = _file_tensors(adapter_modules(model))
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise MemoptConfigError(
            f"{folder} does not fit this model's adapters: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}"
            f", unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    with torch.no_grad():
        for key, target in expected.items():
            value = tensors[key]
            if value.shape != target.shape:
                raise MemoptConfigError(f"{folder}: {key} has shape {tuple(value.shape)}, the model's adapter "
                                        f"{tuple(target.shape)}")
            target.copy_(value.to(device=target.device, dtype=target.dtype))
    return model


def _required(meta: dict[str, Any], key: str, folder: Path) -> Any:
    if key not in meta:
        raise MemoptConfigError(f"{folder / CONFIG_FILE} has no field {key!r}; it is not a complete adapter config")
    return meta[key]


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError and others
        raise MemoptConfigError(f"{path} cannot be read as safetensors ({type(err).__name__}: {err}); the file "
                                "is damaged or not the adapter weights memopt.save_adapters writes") from None


def _sparse_tensors(model: nn.Module, decisions: list[Decision]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for decision in decisions:
        (parameter,) = trained_parameters(model, decision)
        if decision.kind == "full":
            out[decision.name] = parameter
        else:
            out[f"{decision.name}.values"] = parameter
            out[f"{decision.name}.index"] = torch.tensor(decision.index, dtype=torch.int64)
    return out


def _save_sparse(model: nn.Module, out: Path) -> Path:
    from safetensors.torch import save_file

    plan = sparse_decisions(model)
    assert plan is not None
    trained = [d for d in plan.decisions.values() if d.kind != "frozen"]
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in _sparse_tensors(model, trained).items()}
    save_file(tensors, str(out / WEIGHTS_FILE))
    meta = {"peft_type": SPARSE_TYPE, "memopt_format": SPARSE_FORMAT,
            "sparse_backprop": plan.config.to_option(),
            "trained": {d.name: {"kind": d.kind, **({"dim": d.dim} if d.dim is not None else {})} for d in trained}}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _load_sparse(model: nn.Module, folder: Path, meta: dict[str, Any]) -> nn.Module:
    from memopt.config import parse_options

    if meta.get("memopt_format") != SPARSE_FORMAT:
        raise MemoptUnsupportedError(f"{folder}: sparse format {meta.get('memopt_format')!r}; this memopt reads "
                                     f"format {SPARSE_FORMAT}")
    tensors = _read_weights(folder / WEIGHTS_FILE)
    indices = {name[:-len(".index")]: tuple(t.tolist()) for name, t in tensors.items() if name.endswith(".index")}
    config = parse_options({"sparse_backprop": meta["sparse_backprop"]}).sparse_backprop
    assert config is not None
    if sparse_decisions(model) is None:
        prepare_sparse(model, config, indices=indices)
    plan = sparse_decisions(model)
    assert plan is not None
    trained = [d for d in plan.decisions.values() if d.kind != "frozen"]
    if plan.config != config or any(d.index != indices.get(d.name, ()) for d in trained):
        raise MemoptConfigError(f"{folder} holds slices of another policy or other channels than this model was "
                                "prepared with; load them onto a fresh model instead")
    expected = _sparse_tensors(model, trained)
    if expected.keys() != tensors.keys():
        raise MemoptConfigError(f"{folder} does not fit this model: missing "
                                f"{sorted(expected.keys() - tensors.keys())[:5]}, unexpected "
                                f"{sorted(tensors.keys() - expected.keys())[:5]}")
    with torch.no_grad():
        for key, target in expected.items():
            if not key.endswith(".index"):
                target.copy_(tensors[key].to(device=target.device, dtype=target.dtype))
    return model
