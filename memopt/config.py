"""The one typed configuration memopt runs on.

``options`` is a plain dict at the public edge (``torch.compile(..., options=...)``, ``memopt.prepare``,
``memopt plan --options``). :func:`parse_options` validates it into a frozen :class:`MemoptConfig`:
unknown keys are rejected with the closest valid name, wrong types and values with the key, what was
given and what is allowed.

Environment overrides (read when the options are parsed, never at import time):
- ``MEMOPT_DUMP_DIR``: dump directory when ``dump_dir`` is not given.
- ``MEMOPT_DISABLE_PASSES``: comma-separated pass names, added to ``disable_passes``.
- ``MEMOPT_STRICT=1`` (or true/yes/on): same as ``strict=True``; 0/false/no/off or unset: no change.
- ``MEMOPT_FORCE_PROFILE=1``: same as ``force_profile=True`` (use a tuned profile measured elsewhere).
- ``MEMOPT_OPTIONS``: the options, as inline JSON (``'{"memory_budget": 0.5}'``) or the path of a JSON
  file, used when none are passed (``options=None``: ``torch.compile(model, backend="memopt")`` with no
  ``options``, as a training framework that only takes a backend name compiles). Validated like
  ``options``; passed options, even ``{}``, take precedence.
- ``MEMOPT_CACHE_DIR``: the plan cache's folder when ``plan_cache`` is True (read when a plan is cached;
  Note [The plan cache] in memopt/compiler/plan_cache.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
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
    activation memory (``fraction`` in [0, 1])."""

    nbytes: int | None = None
    fraction: float | None = None

    def __str__(self) -> str:
        return f"{self.nbytes} bytes" if self.nbytes is not None else f"{self.fraction:g} of activations"


def parse_budget(value: object, key: str = "memory_budget") -> MemoryBudget | None:
    """``None``, an int of bytes, a ``"12GiB"``-style string, or a float fraction in [0, 1]."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise MemoptConfigError(
            f"option {key!r}: got {value!r}; expected bytes (int), a size string like '12GiB', "
            "a fraction in [0, 1] of activation memory, or None")
    if isinstance(value, int):
        if value <= 0:
            raise MemoptConfigError(f"option {key!r}: got {value} bytes; a budget must be positive")
        return MemoryBudget(nbytes=value)
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise MemoptConfigError(
                f"option {key!r}: got the fraction {value}; a fractional budget is a share of the "
                "unoptimised activation memory and must lie in [0, 1] (0: the lowest peak memopt can plan). "
                "For bytes give an int or '12GiB'")
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
        "'12GiB', a fraction in [0, 1], or None")


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


SPARSE_KINDS: tuple[str, ...] = ("full", "frozen", "bias", "columns", "rows")
SLICE_SELECTIONS: tuple[str, ...] = ("norm", "random")


@dataclasses.dataclass(frozen=True)
class LayerSelection:
    """Which repeated blocks a sparse-backprop rule applies to (by index within their stack, e.g. the
    3 of ``model.layers.3``). Exactly one way is set."""

    first: int | None = None                 # "first:N": the first N blocks
    last: int | None = None                  # "last:N": the last N blocks
    indices: tuple[int, ...] | None = None   # [i, j, ...]; negative counts from the end
    sample: int | None = None                # {"sample": N, ...}: N blocks drawn at a time (LISA)
    every: int = 50                          # redraw every this many steps (memopt.LayerSampler)
    seed: int = 0                            # the draws' seed

    def to_option(self) -> Any:
        if self.first is not None:
            return f"first:{self.first}"
        if self.last is not None:
            return f"last:{self.last}"
        if self.indices is not None:
            return list(self.indices)
        return {"sample": self.sample, "every": self.every, "seed": self.seed}


@dataclasses.dataclass(frozen=True)
class ParamPolicy:
    """What one rule trains of the parameters it matches."""

    kind: str                                # full | frozen | bias | columns | rows
    amount: float | int | None = None        # columns/rows: a ratio in (0, 1] (float) or a count (int)
    select: str = "norm"                     # columns/rows: "norm" (largest L2 norm) or "random"
    seed: int = 0                            # the "random" selection's seed
    layers: LayerSelection | None = None     # only the parameters of these blocks; None: all

    def to_option(self) -> Any:
        if self.kind in ("full", "frozen", "bias") and self.layers is None:
            return self.kind
        out: dict[str, Any] = ({self.kind: self.amount} if self.kind in ("columns", "rows") else {"train": self.kind})
        if self.kind in ("columns", "rows") and (self.select, self.seed) != ("norm", 0):
            out.update(select=self.select, seed=self.seed)
        if self.layers is not None:
            out["layers"] = self.layers.to_option()
        return out


@dataclasses.dataclass(frozen=True)
class SparseBackpropConfig:
    """Which slices of which parameters train (Note [Sparse backprop] in :mod:`memopt.sparse`): ordered
    (glob pattern over qualified parameter names, policy) rules, the first that matches wins; a parameter
    no rule matches is frozen. ``auto``: memopt chooses, within the memory budget."""

    rules: tuple[tuple[str, ParamPolicy], ...] = ()
    auto: bool = False

    def to_option(self) -> Any:
        return "auto" if self.auto else {pattern: policy.to_option() for pattern, policy in self.rules}


@dataclasses.dataclass(frozen=True)
class TokenEliminationConfig:
    """LeMo-style token elimination (its own issue): which tokens each late layer's attention keeps."""

    keep_ratio: float = 0.4                  # share of token blocks each selected layer keeps, in (0, 1]
    start_layer: int | None = None           # first layer that eliminates; None: half the layers
    block_size: int = 64                     # tokens per scored block


@dataclasses.dataclass(frozen=True)
class ChunkSequenceConfig:
    """Position-wise sublayers (the MLP) run ``chunks`` slices of the sequence at a time, each slice's
    intermediates recomputed in the backward; the LM head's cross-entropy runs without its logits
    (exact)."""

    chunks: int = 8                          # slices of the sequence, at least 2
    min_tokens: int = 1024                   # shorter sequences are left whole (chunking costs a recompute)
    logits: str = "keep"                     # "keep": the model still returns its logits (computed once more
                                             # for the caller); "drop": it returns an empty tensor instead


@dataclasses.dataclass(frozen=True)
class MemoptConfig:
    """Validated options. Build it with :func:`parse_options`, not directly."""

    memory_budget: MemoryBudget | None = None   # peak limit; None = no limit
    codegen: str = "inductor"                   # inductor | triton | eager
    dump_dir: str | None = None                 # per-graph dumps of every pass (or MEMOPT_DUMP_DIR)
    dump_node_times: int = 0                    # with dump_dir and codegen="eager": profile the first N
                                                # steps node by node (memopt tune --from-dump fits them)
    cost_profile: str | None = None             # built-in device name or a profile JSON path; None = cpu
    force_profile: bool = False                 # use a tuned profile from another device or cost model
    adapters: AdapterConfig | None = None       # adapter injection (needs memopt.prepare)
    quantize: QuantizeConfig | None = None      # quantized frozen base weights (needs memopt.prepare)
    offload: str | bool = "auto"                # "auto": the scheduler may offload; False forbids it; "all":
                                                # every saved activation is offloaded (a runtime check)
    host_memory: int | None = None              # bytes the offload host pool may hold; None = no bound
    compress_activations: str | None = None     # None | int8 | fp8 (lossy, only when asked)
    solver_time_limit_s: float = 15.0           # CP-SAT's deterministic time per solve, and as much for refining
    plan_cache: bool | str = True               # keep budget plans on disk (Note [The plan cache]); a path: there
    sparse_backprop: SparseBackpropConfig | None = None     # which parameter slices train (memopt.sparse)
    token_elimination: TokenEliminationConfig | None = None  # LeMo settings (lossy; its own issue)
    chunk_sequence: ChunkSequenceConfig | None = None  # the MLP a slice of the sequence at a time (exact)
    strict: bool = False                        # a failing pass raises instead of falling back
    verify: int = 0                             # check each graph's first N training calls against eager
    disable_passes: tuple[str, ...] = ()        # pass names to skip (plus MEMOPT_DISABLE_PASSES)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view, for dumps and reports."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, MemoryBudget):
                value = value.nbytes if value.nbytes is not None else value.fraction
            elif isinstance(value, SparseBackpropConfig):
                value = value.to_option()
            elif isinstance(value, (AdapterConfig, QuantizeConfig, TokenEliminationConfig)):
                value = dataclasses.asdict(value)
                if isinstance(value.get("targets"), tuple):
                    value["targets"] = list(value["targets"])
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


_SPARSE_FORM = ("a dict of {glob pattern: policy} (first match wins), e.g. {'*.mlp.down_proj.weight': "
                "{'columns': 0.25}, '*.bias': 'full', '*': 'frozen'}, or 'auto'")


def _parse_layers(key: str, value: object) -> LayerSelection:
    if isinstance(value, str):
        head, _, count = value.partition(":")
        if head in ("first", "last") and count.isdigit() and int(count) > 0:
            return LayerSelection(first=int(count)) if head == "first" else LayerSelection(last=int(count))
    elif isinstance(value, (list, tuple)) and value and all(isinstance(i, int) and not isinstance(i, bool)
                                                            for i in value):
        return LayerSelection(indices=tuple(value))
    elif isinstance(value, dict):
        _check_keys(key + ".", value, ("sample", "every", "seed"))
        for name in value:
            _expect(f"{key}.{name}", value[name], (int,), "an int")
        if not isinstance(value.get("sample"), int) or value["sample"] <= 0 or value.get("every", 50) <= 0:
            raise MemoptConfigError(f"option {key!r}: got {value!r}; a sampled selection needs 'sample' (blocks "
                                    "at a time, > 0) and optionally 'every' (steps, > 0) and 'seed'")
        return LayerSelection(sample=value["sample"], every=value.get("every", 50), seed=value.get("seed", 0))
    raise MemoptConfigError(
        f"option {key!r}: got {value!r}; expected 'first:N', 'last:N', a list of block indices, or "
        "{'sample': N, 'every': STEPS, 'seed': S}")


def _parse_policy(key: str, value: object) -> ParamPolicy:
    if isinstance(value, str):
        if value not in ("full", "frozen", "bias"):
            raise MemoptConfigError(
                f"option {key!r}: unknown policy {value!r}; allowed: 'full', 'frozen', 'bias', "
                f"{{'columns': r}} or {{'rows': r}}.{closest(value, SPARSE_KINDS)}")
        return ParamPolicy(value)
    if not isinstance(value, dict):
        raise MemoptConfigError(f"option {key!r}: got {type(value).__name__} {value!r}; expected a policy name "
                                "('full', 'frozen', 'bias') or a dict like {'columns': 0.25}")
    _check_keys(key + ".", value, ("train", "columns", "rows", "select", "seed", "layers"))
    kinds = [k for k in ("train", "columns", "rows") if k in value]
    if len(kinds) != 1:
        raise MemoptConfigError(f"option {key!r}: got {value!r}; give exactly one of 'train' (full, frozen, "
                                "bias), 'columns' or 'rows'")
    layers = _parse_layers(key + ".layers", value["layers"]) if "layers" in value else None
    if kinds[0] == "train":
        if not isinstance(value["train"], str):
            raise MemoptConfigError(f"option {key + '.train'!r}: got {value['train']!r}; expected 'full', "
                                    "'frozen' or 'bias'")
        policy = _parse_policy(key, value["train"])
        if value.keys() - {"train", "layers"}:
            raise MemoptConfigError(f"option {key!r}: 'select' and 'seed' apply to 'columns' and 'rows' only")
        return dataclasses.replace(policy, layers=layers)
    amount = value[kinds[0]]
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0 or (
            isinstance(amount, float) and amount > 1):
        raise MemoptConfigError(
            f"option {key + '.' + kinds[0]!r}: got {amount!r}; expected a ratio in (0, 1] (a float) or a "
            "positive count of channels (an int)")
    select = _choice(key + ".select", value.get("select", "norm"), SLICE_SELECTIONS)
    seed = value.get("seed", 0)
    _expect(key + ".seed", seed, (int,), "an int")
    return ParamPolicy(kinds[0], amount, select, seed, layers)


def _parse_sparse_backprop(value: object) -> SparseBackpropConfig | None:
    if value is None:
        return None
    if value == "auto":
        return SparseBackpropConfig(auto=True)
    if not isinstance(value, dict) or not value:
        raise MemoptConfigError(f"option 'sparse_backprop': got {value!r}; expected {_SPARSE_FORM}")
    rules = []
    for pattern, policy in value.items():
        if not isinstance(pattern, str) or not pattern:
            raise MemoptConfigError(f"option 'sparse_backprop': pattern {pattern!r} is not a non-empty string; "
                                    f"expected {_SPARSE_FORM}")
        rules.append((pattern, _parse_policy(f"sparse_backprop[{pattern}]", policy)))
    return SparseBackpropConfig(tuple(rules))


def _parse_chunk_sequence(value: object) -> ChunkSequenceConfig | None:
    if value is None:
        return None
    value = _expect_dict("chunk_sequence", value, "a dict like {'chunks': 8}")
    _check_keys("chunk_sequence.", value, tuple(f.name for f in dataclasses.fields(ChunkSequenceConfig)))
    for key, least, what in (("chunks", 2, "slices of the sequence"), ("min_tokens", 1, "tokens")):
        if key in value:
            _expect(f"chunk_sequence.{key}", value[key], (int,), f"a whole number of {what}")
            if value[key] < least:
                raise MemoptConfigError(f"option 'chunk_sequence.{key}': got {value[key]}; expected at least "
                                        f"{least} {what}")
    if "logits" in value:
        value = {**value, "logits": _choice("chunk_sequence.logits", value["logits"], ("keep", "drop"))}
    return ChunkSequenceConfig(**value)


def _parse_token_elimination(value: object) -> TokenEliminationConfig | None:
    if value is None:
        return None
    value = _expect_dict("token_elimination", value, "a dict like {'keep_ratio': 0.4, 'block_size': 64}")
    _check_keys("token_elimination.", value, tuple(f.name for f in dataclasses.fields(TokenEliminationConfig)))
    cfg = dict(value)
    if "keep_ratio" in cfg:
        _expect("token_elimination.keep_ratio", cfg["keep_ratio"], (int, float), "a ratio in (0, 1]")
        if not 0 < cfg["keep_ratio"] <= 1:
            raise MemoptConfigError(f"option 'token_elimination.keep_ratio': got {cfg['keep_ratio']}; expected a "
                                    "ratio in (0, 1]")
        cfg["keep_ratio"] = float(cfg["keep_ratio"])
    if cfg.get("start_layer") is not None:
        _expect("token_elimination.start_layer", cfg["start_layer"], (int,), "a layer index or None")
        if cfg["start_layer"] < 0:
            raise MemoptConfigError(f"option 'token_elimination.start_layer': got {cfg['start_layer']}; expected "
                                    "a layer index >= 0 or None (half the layers)")
    if "block_size" in cfg:
        _expect("token_elimination.block_size", cfg["block_size"], (int,), "a positive power of two")
        if cfg["block_size"] <= 0 or cfg["block_size"] & (cfg["block_size"] - 1):
            raise MemoptConfigError(f"option 'token_elimination.block_size': got {cfg['block_size']}; expected a "
                                    "positive power of two (tokens per scored block, e.g. 64)")
    return TokenEliminationConfig(**cfg)


def _parse_tuning(opts: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "dump_node_times" in opts:
        steps = opts["dump_node_times"]
        _expect("dump_node_times", steps, (int,), "a number of steps (0: off)")
        if steps < 0:
            raise MemoptConfigError(f"option 'dump_node_times': got {steps}; expected 0 (off) or more steps")
        if steps and opts.get("codegen") != "eager":
            raise MemoptConfigError(
                "option 'dump_node_times' needs codegen='eager': only a graph run op by op has a time per "
                "node (Inductor fuses nodes into kernels)")
        out["dump_node_times"] = steps
    if "force_profile" in opts:
        _expect("force_profile", opts["force_profile"], (bool,), "True or False")
        out["force_profile"] = opts["force_profile"]
    if "verify" in opts:
        steps = opts["verify"]
        _expect("verify", steps, (int,), "a number of steps (0: off)")
        if steps < 0:
            raise MemoptConfigError(f"option 'verify': got {steps}; expected 0 (off) or a number of steps to check")
        lossy = [name for name in ("compress_activations", "token_elimination") if opts.get(name) is not None]
        if steps and lossy:
            raise MemoptConfigError(
                f"option 'verify' compares every gradient with eager PyTorch's, but {' and '.join(lossy)} "
                "change gradients on purpose (lossy): verify without them, or drop 'verify'")
        out["verify"] = steps
    return out


def _env_flag(env: Mapping[str, str], name: str) -> bool:
    value = env.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value not in ("", "0", "false", "no", "off"):
        raise MemoptConfigError(f"environment variable {name}={env[name]!r}: expected 1/true/yes/on or "
                                "0/false/no/off")
    return False


def _parse_env_options(env: Mapping[str, str]) -> MemoptConfig:
    """The options in ``MEMOPT_OPTIONS`` (inline JSON or a JSON file's path), validated; none: defaults."""
    text = env.get("MEMOPT_OPTIONS", "").strip()
    if not text:
        return parse_options({}, env)
    where = "environment variable MEMOPT_OPTIONS"
    if not text.startswith(("{", "[")):
        where = f"{where} = {text!r}"
        try:
            text = Path(text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise MemoptConfigError(f"{where}: cannot read it ({err}); give inline JSON such as "
                                    "'{\"memory_budget\": 0.5}' or the path of a JSON file of options") from None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise MemoptConfigError(f"{where}: not valid JSON ({err.msg} at line {err.lineno}, column "
                                f"{err.colno}); expected an object of options") from None
    if not isinstance(options, dict):
        raise MemoptConfigError(f"{where}: holds a JSON {type(options).__name__}; expected an object of options")
    try:
        return parse_options(options, env)
    except MemoptConfigError as err:
        raise MemoptConfigError(f"{where}: {err}") from None


def parse_options(options: Mapping[str, Any] | MemoptConfig | None = None,
                  environ: Mapping[str, str] | None = None) -> MemoptConfig:
    """Validate user ``options`` (plus the documented environment overrides) into a :class:`MemoptConfig`."""
    env = os.environ if environ is None else environ
    if isinstance(options, MemoptConfig):
        config = options
    else:
        if options is None:
            return _parse_env_options(env)
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
        kwargs.update(_parse_tuning(opts))
        if opts.get("cost_profile") is not None:
            _expect("cost_profile", opts["cost_profile"], (str, os.PathLike),
                    "a built-in device name such as 'h100' or a profile JSON path")
            kwargs["cost_profile"] = os.fspath(opts["cost_profile"])
        kwargs["adapters"] = _parse_adapters(opts.get("adapters"))
        kwargs["quantize"] = _parse_quantize(opts.get("quantize"))
        if "offload" in opts:
            if opts["offload"] not in ("auto", False, "all"):
                raise MemoptConfigError(
                    f"option 'offload': got {opts['offload']!r}; allowed values are 'auto', False and 'all'")
            kwargs["offload"] = opts["offload"]
        if opts.get("host_memory") is not None:
            host = parse_budget(opts["host_memory"], key="host_memory")
            if host is None or host.nbytes is None:
                raise MemoptConfigError(f"option 'host_memory': got {opts['host_memory']!r}; expected bytes "
                                        "(int) or a size string like '64GiB', not a fraction")
            kwargs["host_memory"] = host.nbytes
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
        if "plan_cache" in opts:
            cache = opts["plan_cache"]
            _expect("plan_cache", cache, (bool, str, os.PathLike), "True, False or a folder path")
            kwargs["plan_cache"] = cache if isinstance(cache, bool) else os.fspath(cache)
        kwargs["sparse_backprop"] = _parse_sparse_backprop(opts.get("sparse_backprop"))
        kwargs["token_elimination"] = _parse_token_elimination(opts.get("token_elimination"))
        kwargs["chunk_sequence"] = _parse_chunk_sequence(opts.get("chunk_sequence"))
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
    for flag, field in (("MEMOPT_STRICT", "strict"), ("MEMOPT_FORCE_PROFILE", "force_profile")):
        if _env_flag(env, flag):
            changes[field] = True
    return dataclasses.replace(config, **changes) if changes else config
