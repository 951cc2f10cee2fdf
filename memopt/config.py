"""The one typed configuration memopt runs on.

``options`` is a plain dict at the public edge (``torch.compile(..., options=...)``, ``memopt.prepare``,
``memopt plan --options``). :func:`parse_options` validates it into a frozen :class:`MemoptConfig`:
unknown keys are rejected with the closest valid name, wrong types and values with the key, what was
given and what is allowed.

Environment overrides (read when the options are parsed, never at import time):
- ``MEMOPT_DUMP_DIR``: dump directory when ``dump_dir`` is not given.
- ``MEMOPT_DISABLE_PASSES``: comma-separated pass names, added to ``disable_passes``.
- ``MEMOPT_STRICT=1`` (or true/yes/on): same as ``strict=True``; 0/false/no/off or unset: no change.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
from collections.abc import Mapping
from typing import Any, Literal

from memopt.errors import MemoptConfigError

Codegen = Literal["inductor", "triton", "eager"]
CODEGENS: tuple[str, ...] = ("inductor", "triton", "eager")
ADAPTER_METHODS: tuple[str, ...] = ("lora", "dora", "paca")
QUANT_WEIGHTS: tuple[str, ...] = ("nf4", "int8")
COMPRESSIONS: tuple[str, ...] = ("int8", "fp8")


def closest(name: str, valid: list[str] | tuple[str, ...]) -> str:
    """A ``did you mean`` suffix for an unknown ``name``, or an empty string."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else ""


# --------------------------------------------------------------------------------------------------------
# Memory budgets
# --------------------------------------------------------------------------------------------------------

_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_BUDGET_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]+)\s*$")


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
    """Either an absolute number of bytes for the peak, or a fraction of the unoptimised step's
    activation memory (``fraction`` in (0, 1])."""

    nbytes: int | None = None
    fraction: float | None = None

    def __str__(self) -> str:
        return f"{self.nbytes} bytes" if self.nbytes is not None else f"{self.fraction:g} of activations"


def parse_budget(value: object, key: str = "memory_budget") -> MemoryBudget | None:
    """``None``, an int of bytes, a ``"12GiB"``-style string, or a float fraction in (0, 1]."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise MemoptConfigError(
            f"option {key!r}: got {value!r}; expected bytes (int), a size string like '12GiB', "
            "a fraction in (0, 1] of activation memory, or None")
    if isinstance(value, int):
        if value <= 0:
            raise MemoptConfigError(f"option {key!r}: got {value} bytes; a budget must be positive")
        return MemoryBudget(nbytes=value)
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise MemoptConfigError(
                f"option {key!r}: got the fraction {value}; a fractional budget is a share of the "
                "unoptimised activation memory and must lie in (0, 1]. For bytes give an int or '12GiB'")
        return MemoryBudget(fraction=value)
    if isinstance(value, str):
        match = _BUDGET_RE.match(value)
        unit = match.group(2).lower() if match else ""
        if not match or unit not in _UNITS:
            raise MemoptConfigError(
                f"option {key!r}: cannot parse {value!r} as a size. Write a number and a unit, e.g. "
                f"'12GiB', '512MiB' or '24GB' (units: {', '.join(sorted(_UNITS))}), or give a fraction "
                "like 0.5 or an int of bytes")
        nbytes = int(float(match.group(1)) * _UNITS[unit])
        if nbytes <= 0:
            raise MemoptConfigError(f"option {key!r}: {value!r} is zero bytes; a budget must be positive")
        return MemoryBudget(nbytes=nbytes)
    raise MemoptConfigError(
        f"option {key!r}: got {type(value).__name__} {value!r}; expected bytes (int), a size string like "
        "'12GiB', a fraction in (0, 1], or None")


# --------------------------------------------------------------------------------------------------------
# Sub-configs. Their semantics belong to the passes that read them; here they are only validated.
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    method: str = "lora"                 # lora | dora | paca
    rank: int = 16                       # adapter rank r
    alpha: float = 32.0                  # scaling numerator: scale = alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0                 # dropout on the adapter input, as PEFT's lora_dropout
    use_rslora: bool = False             # rank-stabilised scaling
    targets: tuple[str, ...] | str = ("q_proj", "v_proj")   # module names, a regex, or "all-linear"
    seed: int = 0                        # PaCA's column choice


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    weights: str = "nf4"                 # nf4 | int8
    double_quant: bool = True            # quantize the per-block absmax too (QLoRA)


@dataclasses.dataclass(frozen=True)
class MemoptConfig:
    """Validated options. Build it with :func:`parse_options`, not directly."""

    memory_budget: MemoryBudget | None = None   # peak limit; None = no limit
    codegen: str = "inductor"                   # inductor | triton | eager
    dump_dir: str | None = None                 # per-graph dumps of every pass (or MEMOPT_DUMP_DIR)
    cost_profile: str | None = None             # built-in device name or a profile JSON path; None = cpu
    adapters: AdapterConfig | None = None       # adapter injection (needs memopt.prepare)
    quantize: QuantizeConfig | None = None      # quantized frozen base weights (needs memopt.prepare)
    offload: str | bool = "auto"                # "auto": the scheduler may offload; False forbids it
    compress_activations: str | None = None     # None | int8 | fp8 (lossy, only when asked)
    solver_time_limit_s: float = 15.0           # CP-SAT's deterministic time per solve, and as much for refining
    sparse_backprop: Mapping[str, Any] | None = None    # per-parameter policy (its own issue)
    token_elimination: Mapping[str, Any] | None = None  # LeMo settings (its own issue)
    strict: bool = False                        # a failing pass raises instead of falling back
    disable_passes: tuple[str, ...] = ()        # pass names to skip (plus MEMOPT_DISABLE_PASSES)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view, for dumps and reports."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, MemoryBudget):
                value = value.nbytes if value.nbytes is not None else value.fraction
            elif isinstance(value, (AdapterConfig, QuantizeConfig)):
                value = dataclasses.asdict(value)
                if isinstance(value.get("targets"), tuple):
                    value["targets"] = list(value["targets"])
            elif isinstance(value, Mapping):
                value = copy.deepcopy(dict(value))
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        return out


_TOP_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(MemoptConfig))


def _expect(key: str, value: object, allowed: tuple[type, ...], what: str) -> None:
    if isinstance(value, bool) and bool not in allowed:
        raise MemoptConfigError(f"option {key!r}: got {value!r}; expected {what}")
    if not isinstance(value, allowed):
        raise MemoptConfigError(f"option {key!r}: got {type(value).__name__} {value!r}; expected {what}")


def _expect_dict(key: str, value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MemoptConfigError(f"option {key!r}: got {type(value).__name__} {value!r}; expected {what}")
    return value


def _choice(key: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        hint = closest(value, choices) if isinstance(value, str) else ""
        raise MemoptConfigError(
            f"option {key!r}: got {value!r}; allowed values are {', '.join(map(repr, choices))}.{hint}")
    return value


def _check_keys(where: str, given: Mapping[str, Any], valid: tuple[str, ...]) -> None:
    for key in given:
        if key not in valid:
            raise MemoptConfigError(
                f"unknown option {where + str(key)!r}.{closest(str(key), valid)} "
                f"Valid keys: {', '.join(valid)}")


def _parse_adapters(value: object) -> AdapterConfig | None:
    if value is None:
        return None
    value = _expect_dict("adapters", value, "a dict like {'method': 'lora', 'rank': 16, 'targets': [...]}")
    valid = tuple(f.name for f in dataclasses.fields(AdapterConfig))
    _check_keys("adapters.", value, valid)
    cfg = dict(value)
    if "method" in cfg:
        _choice("adapters.method", cfg["method"], ADAPTER_METHODS)
    if "rank" in cfg:
        _expect("adapters.rank", cfg["rank"], (int,), "a positive int")
        if cfg["rank"] <= 0:
            raise MemoptConfigError(f"option 'adapters.rank': got {cfg['rank']}; expected a positive int")
    if "alpha" in cfg:
        _expect("adapters.alpha", cfg["alpha"], (int, float), "a number")
        cfg["alpha"] = float(cfg["alpha"])
    if "dropout" in cfg:
        _expect("adapters.dropout", cfg["dropout"], (int, float), "a probability in [0, 1)")
        if not 0.0 <= cfg["dropout"] < 1.0:
            raise MemoptConfigError(
                f"option 'adapters.dropout': got {cfg['dropout']}; expected a probability in [0, 1)")
        cfg["dropout"] = float(cfg["dropout"])
    if "use_rslora" in cfg:
        _expect("adapters.use_rslora", cfg["use_rslora"], (bool,), "True or False")
    if "seed" in cfg:
        _expect("adapters.seed", cfg["seed"], (int,), "an int")
    if "targets" in cfg:
        targets = cfg["targets"]
        if isinstance(targets, str):
            if targets != "all-linear":
                try:
                    re.compile(targets)
                except re.error as err:
                    raise MemoptConfigError(
                        f"option 'adapters.targets': {targets!r} is not a valid regex ({err}); give "
                        "module names as a list, a regex, or 'all-linear'") from None
        elif isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) for t in targets):
            cfg["targets"] = tuple(targets)
        else:
            raise MemoptConfigError(
                f"option 'adapters.targets': got {targets!r}; expected a non-empty list of module names, "
                "a regex string, or 'all-linear'")
    return AdapterConfig(**cfg)


def _parse_quantize(value: object) -> QuantizeConfig | None:
    if value is None:
        return None
    value = _expect_dict("quantize", value, "a dict like {'weights': 'nf4', 'double_quant': True}")
    _check_keys("quantize.", value, tuple(f.name for f in dataclasses.fields(QuantizeConfig)))
    if "weights" in value:
        _choice("quantize.weights", value["weights"], QUANT_WEIGHTS)
    if "double_quant" in value:
        _expect("quantize.double_quant", value["double_quant"], (bool,), "True or False")
    return QuantizeConfig(**value)


def parse_options(options: Mapping[str, Any] | MemoptConfig | None = None,
                  environ: Mapping[str, str] | None = None) -> MemoptConfig:
    """Validate user ``options`` (plus the documented environment overrides) into a :class:`MemoptConfig`."""
    env = os.environ if environ is None else environ
    if isinstance(options, MemoptConfig):
        config = options
    else:
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise MemoptConfigError(
                f"memopt options must be a dict, got {type(options).__name__}; "
                "e.g. torch.compile(model, backend='memopt', options={'memory_budget': '12GiB'})")
        _check_keys("", options, _TOP_KEYS)
        opts = dict(options)
        kwargs: dict[str, Any] = {}
        kwargs["memory_budget"] = parse_budget(opts.get("memory_budget"))
        if "codegen" in opts:
            kwargs["codegen"] = _choice("codegen", opts["codegen"], CODEGENS)
        if opts.get("dump_dir") is not None:
            _expect("dump_dir", opts["dump_dir"], (str, os.PathLike), "a directory path or None")
            kwargs["dump_dir"] = os.fspath(opts["dump_dir"])
        if opts.get("cost_profile") is not None:
            _expect("cost_profile", opts["cost_profile"], (str, os.PathLike),
                    "a built-in device name such as 'h100' or a profile JSON path")
            kwargs["cost_profile"] = os.fspath(opts["cost_profile"])
        kwargs["adapters"] = _parse_adapters(opts.get("adapters"))
        kwargs["quantize"] = _parse_quantize(opts.get("quantize"))
        if "offload" in opts:
            if opts["offload"] not in ("auto", False):
                raise MemoptConfigError(
                    f"option 'offload': got {opts['offload']!r}; allowed values are 'auto' and False")
            kwargs["offload"] = opts["offload"]
        if opts.get("compress_activations") is not None:
            kwargs["compress_activations"] = _choice(
                "compress_activations", opts["compress_activations"], COMPRESSIONS)
        if "solver_time_limit_s" in opts:
            limit = opts["solver_time_limit_s"]
            _expect("solver_time_limit_s", limit, (int, float), "a number of seconds")
            if not 0 < limit <= 3600:
                raise MemoptConfigError(
                    f"option 'solver_time_limit_s': got {limit}; expected seconds in (0, 3600]")
            kwargs["solver_time_limit_s"] = float(limit)
        for key in ("sparse_backprop", "token_elimination"):
            if opts.get(key) is not None:
                _expect(key, opts[key], (dict,), "a dict of settings or None")
                # A snapshot: later changes to the user's (nested) dict must not reach the config.
                # Read-only: one backend compiles many graphs, and none may change what the next sees.
                kwargs[key] = types.MappingProxyType(copy.deepcopy(dict(opts[key])))
        if "strict" in opts:
            _expect("strict", opts["strict"], (bool,), "True or False")
            kwargs["strict"] = opts["strict"]
        if "disable_passes" in opts:
            names = opts["disable_passes"]
            if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(
                    isinstance(n, str) for n in names):
                raise MemoptConfigError(
                    f"option 'disable_passes': got {names!r}; expected a list of pass names")
            kwargs["disable_passes"] = tuple(names)
        config = MemoptConfig(**kwargs)
    changes: dict[str, Any] = {}
    if config.dump_dir is None and env.get("MEMOPT_DUMP_DIR"):
        changes["dump_dir"] = env["MEMOPT_DUMP_DIR"]
    extra = tuple(n.strip() for n in env.get("MEMOPT_DISABLE_PASSES", "").split(",") if n.strip())
    if extra:
        changes["disable_passes"] = tuple(dict.fromkeys(config.disable_passes + extra))
    strict = env.get("MEMOPT_STRICT", "").strip().lower()
    if strict in ("1", "true", "yes", "on"):
        changes["strict"] = True
    elif strict not in ("", "0", "false", "no", "off"):
        raise MemoptConfigError(
            f"environment variable MEMOPT_STRICT={env['MEMOPT_STRICT']!r}: expected 1/true/yes/on or "
            "0/false/no/off")
    return dataclasses.replace(config, **changes) if changes else config
