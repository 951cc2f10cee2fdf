"""Device profiles: the handful of numbers the roofline needs about one accelerator.

Built-in profiles are versioned JSON files in ``memopt/cost_model/profiles/`` (one per device, numbers
from public datasheets); ``memopt tune`` writes the same format from measurements. JSON and not pickle:
a profile is data a user may read, diff and edit, and loading one must not run code.

The file format, version 2 (every field required, no others allowed; a version-1 file, which lacks the
last two fields, is read as having no curves and no measurement key)::

    {
      "format_version": 2,
      "name": "h100",                       # short name, the file stem for built-ins
      "description": "...",                 # which variant, what was assumed
      "source": "...",                      # where the numbers come from, in words
      "memory_bytes": 85520809984,          # device memory, bytes
      "matmul_flops": {"float32": ..., "bfloat16": ...},   # dense FLOP/s per dtype name (+ "tf32")
      "vector_flops": 6.69e13,              # non-tensor-core fp32 FLOP/s
      "memory_bandwidth": 3.35e12,          # device memory, bytes/s
      "host_device_bandwidth": 5.0e10,      # one direction, bytes/s
      "launch_overhead_s": 5e-06,           # per kernel, seconds
      "efficiency": {                       # share of the peak reached, by op class, against the work
        "matmul.float32": [[1e6, 0.12], [1e9, 0.85]],   # [FLOPs, share of matmul_flops] (per dtype)
        "attention.float32": [[1e7, 0.1], [1e9, 0.4]],  # fused attention, as a share of the same
        "elementwise": [[4096, 0.05], [1e8, 0.9]],      # [bytes moved, share of memory_bandwidth]
        "reduction": [[4096, 0.04], [1e8, 0.8]]
      },                                    # {} for datasheet profiles: every kernel at its peak
      "measured_on": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.13.0", "cost_model": 2}
    }                                       # measured_on: null for datasheet profiles

Note [Efficiency curves]
~~~~~~~~~~~~~~~~~~~~~~~~
A kernel reaches its peak only when it has enough work: a 64x64 matmul runs at a few percent of a GPU's
tensor-core peak, a 4 KiB add at a few percent of its memory bandwidth, and a CPU's small tensors live in
cache and beat its DRAM bandwidth. One constant per device cannot say both, so a tuned profile carries,
per op class, the share of the peak reached as a function of the work (FLOPs for matmuls, bytes moved for
the rest), measured at a grid of sizes; between points it is interpolated linearly in log(work) and held
at the ends. The class of a node is decided by the cost model (estimate.py), which is why a profile names
the cost-model version it was fitted for: curves fitted under one classification mean something else
under another, and such a profile is refused (Note [Measured profiles are keyed]).

Note [Measured profiles are keyed]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A tuned profile records the device it was measured on, the torch version and COST_MODEL_VERSION. Using it
with another cost-model version or on another device (when the device is known: the backend's; ``memopt
plan`` plans for the profile's own device) is refused with the command that re-tunes, unless forced
(option ``force_profile`` or ``MEMOPT_FORCE_PROFILE=1``): prices from another machine are a wrong plan
that looks right. Another torch version only warns, since kernels change speed between releases but
rarely by the factor a device does.
"""

from __future__ import annotations

import typing

import dataclasses
import difflib
import functools
import importlib.resources
import json
import math
import os
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from memopt.errors import MemoptProfileError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = [
    "COST_MODEL_VERSION",
    "FORMAT_VERSION",
    "MEMORY_CLASSES",
    "check_measured_on",
    "dtype_name",
    "profile_origin",
    "DeviceProfile",
    "builtin_profile_names",
    "load_profile",
    "profile_to_json",
]

# Bump when a field changes meaning or a required field is added; load_profile rejects other versions
# instead of guessing, since a misread profile silently produces a wrong plan.
FORMAT_VERSION = 2
# Bump when estimate.py changes how it uses a profile (op classes, what "work" is, the roofline's form):
# a profile fitted for another version is refused (Note [Measured profiles are keyed]).
COST_MODEL_VERSION = 2

_DEFAULT_PROFILE = "cpu"
_TF32 = "tf32"  # not a torch dtype: fp32 matmuls on tensor cores when torch allows TF32

_TEXT_FIELDS = ("name", "description", "source")
_RATE_FIELDS = ("vector_flops", "memory_bandwidth", "host_device_bandwidth", "launch_overhead_s")
_FIELD_UNITS = {
    "memory_bytes": "a positive integer number of bytes",
    "vector_flops": "a positive number of FLOP/s",
    "memory_bandwidth": "a positive number of bytes/s",
    "host_device_bandwidth": "a positive number of bytes/s",
    "launch_overhead_s": "a positive number of seconds",
}
_FIELDS = ("format_version", *_TEXT_FIELDS, "memory_bytes", "matmul_flops", *_RATE_FIELDS, "efficiency",
           "measured_on")
# Op classes with an efficiency curve: matmuls and fused attention per input dtype (a share of that
# dtype's matmul peak), and the two memory-bound kinds (a share of the memory bandwidth).
MEMORY_CLASSES = ("elementwise", "reduction")
_COMPUTE_CLASSES = ("matmul", "attention")
_MEASURED_KEYS = {"device": str, "torch": str, "cost_model": int}

Curve = tuple[tuple[float, float], ...]


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """What the cost model knows about one device. Validated on construction; see the module docstring."""

    # Short name: the file stem for built-ins ("h100"), free text for tuned profiles.
    name: str
    # Which variant of the device and what was assumed (form factor, clocks, host link).
    description: str
    # Where the numbers come from, in words (datasheet / whitepaper names, or "measured by memopt tune").
    source: str
    # Device memory in bytes (what the driver reports as total, not what is free).
    memory_bytes: int
    # Dense (no 2:4 sparsity) matmul FLOP/s per torch dtype name, plus "tf32"; "float32" is required
    # and is the fallback for dtypes not listed.
    matmul_flops: Mapping[str, float] = dataclasses.field(hash=False)
    # Non-tensor-core fp32 FLOP/s (elementwise and reduction arithmetic).
    vector_flops: float
    # Device memory bandwidth in bytes/s.
    memory_bandwidth: float
    # Host <-> device copy bandwidth in one direction, bytes/s (what offloading pays).
    host_device_bandwidth: float
    # Fixed cost of launching one kernel, seconds.
    launch_overhead_s: float
    # Note [Efficiency curves]: per op class, (work, share of the peak) points, work increasing.
    efficiency: Mapping[str, Curve] = dataclasses.field(default_factory=dict, hash=False)
    # Note [Measured profiles are keyed]: device, torch and cost-model version; None for datasheets.
    measured_on: Mapping[str, str | int] | None = dataclasses.field(default=None, hash=False)

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        normalised = _validate(values, origin=f"DeviceProfile(name={self.name!r})")
        for key, value in normalised.items():
            object.__setattr__(self, key, value)

    def matmul_flops_for(self, dtype: torch.dtype, *, allow_tf32: bool = False) -> float:
        """Peak dense matmul FLOP/s for inputs of ``dtype``.

        float32 uses the float32 figure (CUDA cores) unless ``allow_tf32`` says torch runs fp32 matmuls
        as TF32 and the profile has a TF32 figure. Dtypes the profile does not list use float32's: a
        neutral guess, optimistic for float64 on GeForce cards (a tuned profile can list "float64").
        """
        key = dtype_name(dtype)
        if dtype == torch.float32 and allow_tf32 and _TF32 in self.matmul_flops:
            return self.matmul_flops[_TF32]
        return self.matmul_flops.get(key, self.matmul_flops["float32"])

    def efficiency_at(self, op_class: str, work: float) -> float:
        """Share of the peak an ``op_class`` kernel with ``work`` reaches (Note [Efficiency curves]);
        1.0 where the profile has no curve. ``attention.<dtype>`` falls back to ``matmul.<dtype>``, and
        ``matmul.<dtype>`` to ``matmul.float32``."""
        curve = self.efficiency.get(op_class)
        if curve is None and op_class.startswith("attention."):
            return self.efficiency_at("matmul." + op_class.removeprefix("attention."), work)
        if curve is None and op_class.startswith("matmul."):
            curve = self.efficiency.get("matmul.float32")
        if not curve:
            return 1.0
        x = math.log(max(work, 1.0))
        points = [(math.log(w), e) for w, e in curve]
        if x <= points[0][0]:
            return points[0][1]
        for (x0, e0), (x1, e1) in zip(points, points[1:]):
            if x <= x1:
                return e0 + (e1 - e0) * (x - x0) / (x1 - x0)
        return points[-1][1]


def dtype_name(dtype: torch.dtype) -> str:
    """The name a profile keys a dtype by: ``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def _is_dtype_key(key: str) -> bool:
    if key == _TF32:
        return True
    dtype = getattr(torch, key, None)
    # Canonical names only: "half" is torch.float16 too, but matmul_flops_for looks up "float16".
    return isinstance(dtype, torch.dtype) and dtype_name(dtype) == key


def _is_positive_number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _found(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def _validate(values: Mapping[str, object], origin: str) -> dict[str, object]:
    """Check every field of a profile; raise one MemoptProfileError listing every problem found."""
    problems: list[str] = []
    out: dict[str, object] = {}

    for key in _TEXT_FIELDS:
        value = values.get(key)
        if not isinstance(value, str) or (key == "name" and not value.strip()):
            expected = "a non-empty string" if key == "name" else "a string"
            problems.append(f"field '{key}' is {_found(value)}; expected {expected}")
        else:
            out[key] = value

    memory = values.get("memory_bytes")
    if not _is_positive_number(memory) or not float(memory).is_integer():  # type: ignore[arg-type]
        problems.append(f"field 'memory_bytes' is {_found(memory)}; expected {_FIELD_UNITS['memory_bytes']}")
    else:
        out["memory_bytes"] = int(typing.cast(float, memory))

    for key in _RATE_FIELDS:
        value = values.get(key)
        if not _is_positive_number(value):
            problems.append(f"field '{key}' is {_found(value)}; expected {_FIELD_UNITS[key]}")
        else:
            out[key] = float(value)  # type: ignore[arg-type]

    matmul = values.get("matmul_flops")
    if not isinstance(matmul, Mapping):
        problems.append(
            f"field 'matmul_flops' is {_found(matmul)}; expected an object mapping dtype names "
            "(\"float32\", \"bfloat16\", ...) to dense FLOP/s"
        )
    else:
        table: dict[str, float] = {}
        for key, value in matmul.items():
            if not isinstance(key, str) or not _is_dtype_key(key):
                close = difflib.get_close_matches(str(key), _known_dtype_names(), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                problems.append(
                    f"field 'matmul_flops' has key {key!r}, which is not a torch dtype name{hint}; "
                    "expected names such as float32, tf32, float16, bfloat16, float8_e4m3fn, int8"
                )
            elif not _is_positive_number(value):
                problems.append(
                    f"field 'matmul_flops.{key}' is {_found(value)}; expected a positive number of FLOP/s"
                )
            else:
                table[key] = float(value)
        if "float32" not in matmul:
            problems.append(
                "field 'matmul_flops.float32' is missing; expected the fp32 matmul FLOP/s, which is also "
                "the fallback for dtypes the profile does not list"
            )
        out["matmul_flops"] = types.MappingProxyType(dict(sorted(table.items())))
    out["efficiency"] = _validate_curves(values.get("efficiency"), problems)
    out["measured_on"] = _validate_measured(values.get("measured_on"), problems)

    if problems:
        raise MemoptProfileError(
            f"{origin} is not a valid device profile:\n  - " + "\n  - ".join(problems) + "\n"
            "Fix the values (see memopt/cost_model/profile.py for the format), or write a new profile "
            "with `memopt tune --out PROFILE.json`."
        )
    return out


def _is_curve_class(key: object) -> bool:
    if not isinstance(key, str):
        return False
    kind, _, dtype = key.partition(".")
    return key in MEMORY_CLASSES or (kind in _COMPUTE_CLASSES and _is_dtype_key(dtype))


def _validate_curves(value: object, problems: list[str]) -> Mapping[str, Curve]:
    """Note [Efficiency curves]: {class: [[work, share], ...]}, work positive and increasing, share in
    (0, 1]."""
    if not isinstance(value, Mapping):
        problems.append(f"field 'efficiency' is {_found(value)}; expected an object mapping op classes "
                        f"(matmul.<dtype>, attention.<dtype>, {', '.join(MEMORY_CLASSES)}) to "
                        "[[work, share of peak], ...]")
        return types.MappingProxyType({})
    curves: dict[str, Curve] = {}
    for key, points in value.items():
        where = f"field 'efficiency.{key}'"
        if not _is_curve_class(key):
            problems.append(f"field 'efficiency' has key {key!r}; expected matmul.<torch dtype name> "
                            f"(e.g. matmul.float32), attention.<dtype> or one of {', '.join(MEMORY_CLASSES)}")
            continue
        ok = isinstance(points, (list, tuple)) and len(points) > 0 and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and _is_positive_number(p[0])
            and _is_positive_number(p[1]) and p[1] <= 1.0 for p in points)
        if not ok:
            problems.append(f"{where} is {_found(points)}; expected a non-empty list of [work, share] pairs, "
                            "work a positive number and share of the peak in (0, 1]")
        elif any(a[0] >= b[0] for a, b in zip(points, points[1:])):
            problems.append(f"{where} has work values {[p[0] for p in points]}; expected them increasing")
        else:
            curves[key] = tuple((float(w), float(e)) for w, e in points)
    return types.MappingProxyType(dict(sorted(curves.items())))


def _validate_measured(value: object, problems: list[str]) -> Mapping[str, str | int] | None:
    """Note [Measured profiles are keyed]: null, or {"device": str, "torch": str, "cost_model": int}."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) != set(_MEASURED_KEYS) or any(
            not isinstance(value[k], kind) or isinstance(value[k], bool) for k, kind in _MEASURED_KEYS.items()):
        problems.append(f"field 'measured_on' is {_found(value)}; expected null (a datasheet profile) or "
                        '{"device": str, "torch": str, "cost_model": int}, as `memopt tune` writes it')
        return None
    return types.MappingProxyType(dict(sorted(value.items())))


@functools.lru_cache(maxsize=1)
def _known_dtype_names() -> tuple[str, ...]:
    names = {dtype_name(v) for v in vars(torch).values() if isinstance(v, torch.dtype)}
    return tuple(sorted(names | {_TF32}))


def _profile_from_data(data: object, origin: str) -> DeviceProfile:
    if not isinstance(data, dict):
        raise MemoptProfileError(
            f"{origin} holds a JSON {type(data).__name__}; expected a JSON object with the fields "
            f"{', '.join(_FIELDS)}."
        )
    version = data.get("format_version")
    if "format_version" not in data:
        raise MemoptProfileError(
            f"{origin} has no field 'format_version'; expected \"format_version\": {FORMAT_VERSION}. "
            "Add it if the file is otherwise in the current format, or regenerate the file with "
            "`memopt tune --out PROFILE.json`."
        )
    if version == 1 and not isinstance(version, bool):    # read as version 2 without curves or key
        data = {**data, "format_version": FORMAT_VERSION, "efficiency": {}, "measured_on": None}
    elif isinstance(version, bool) or version != FORMAT_VERSION:
        raise MemoptProfileError(
            f"{origin} has field 'format_version' = {_found(version)}; this version of memopt reads formats "
            f"1 and {FORMAT_VERSION}. Regenerate the profile with this memopt's `memopt tune --out PROFILE.json`."
        )

    unknown = sorted(k for k in data if k not in _FIELDS)
    missing = [k for k in _FIELDS if k not in data]
    problems = []
    for key in unknown:
        close = difflib.get_close_matches(key, _FIELDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        problems.append(f"unknown field '{key}'{hint}")
    if missing:
        problems.append(f"missing field(s) {', '.join(repr(k) for k in missing)}")
    if problems:
        raise MemoptProfileError(
            f"{origin} is not a valid device profile:\n  - " + "\n  - ".join(problems) + "\n"
            f"Expected exactly the fields {', '.join(_FIELDS)}; see memopt/cost_model/profile.py."
        )

    fields = {k: v for k, v in data.items() if k != "format_version"}
    normalised = _validate(fields, origin)
    return DeviceProfile(**normalised)  # type: ignore[arg-type]


def _parse(text: str, origin: str) -> DeviceProfile:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MemoptProfileError(
            f"{origin} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}. "
            "A profile is a JSON object as written by `memopt tune --out PROFILE.json`."
        ) from exc
    return _profile_from_data(data, origin)


def _profiles_dir() -> Traversable:
    return importlib.resources.files(__package__ or "memopt.cost_model").joinpath("profiles")


def builtin_profile_names() -> list[str]:
    """Names of the profiles shipped with memopt, sorted."""
    return sorted(
        entry.name.removesuffix(".json")
        for entry in _profiles_dir().iterdir()
        if entry.is_file() and entry.name.endswith(".json")
    )


@functools.lru_cache(maxsize=None)
def _load_builtin(name: str) -> DeviceProfile:
    # Cached: profiles are frozen, and the compiler looks the same one up for every graph.
    origin = f"built-in profile '{name}' (memopt/cost_model/profiles/{name}.json)"
    profile = _parse(_profiles_dir().joinpath(f"{name}.json").read_text(encoding="utf-8"), origin)
    if profile.name != name:
        raise MemoptProfileError(
            f"{origin} has field 'name' = {profile.name!r}; expected {name!r}, the file's stem. "
            "This is a packaging bug in memopt: please report it."
        )
    return profile


def _closest_name(key: str, names: list[str]) -> str | None:
    # A name that contains what was typed ("a100" in "a100-80gb") beats edit distance, which would
    # suggest "h100" for "a100".
    containing = sorted((n for n in names if key and key in n), key=lambda n: (len(n), n))
    if containing:
        return containing[0]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.0)
    return close[0] if close else None


def _looks_like_path(text: str) -> bool:
    return text.endswith(".json") or os.sep in text or "/" in text or Path(text).exists()


def load_profile(name_or_path: str | os.PathLike[str] | None) -> DeviceProfile:
    """A device profile by built-in name ("h100", ...), by path to a JSON file, or "cpu" for None."""
    if name_or_path is None:
        return _load_builtin(_DEFAULT_PROFILE)
    if isinstance(name_or_path, os.PathLike):
        return _load_file(Path(name_or_path))
    if not isinstance(name_or_path, str):
        raise MemoptProfileError(
            f"cost profile is {_found(name_or_path)}; expected a built-in profile name "
            f"({', '.join(builtin_profile_names())}), a path to a profile JSON file, or None for 'cpu'."
        )

    names = builtin_profile_names()
    key = name_or_path.strip().lower()
    if key in names:
        return _load_builtin(key)
    if _looks_like_path(name_or_path):
        return _load_file(Path(name_or_path))
    closest = _closest_name(key, names)
    suggestion = f"did you mean '{closest}'? " if closest else ""
    raise MemoptProfileError(
        f"unknown device profile {name_or_path!r}; {suggestion}The built-in profiles are: "
        f"{', '.join(names)}. For another device, pass the path to a JSON profile written by "
        "`memopt tune --out PROFILE.json`."
    )


def _load_file(path: Path) -> DeviceProfile:
    origin = f"profile file '{path}'"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise MemoptProfileError(
            f"{origin} does not exist. Pass a built-in profile name ({', '.join(builtin_profile_names())}) "
            "or the path of a file written by `memopt tune --out PROFILE.json`."
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise MemoptProfileError(
            f"{origin} cannot be read as UTF-8 text ({exc}); expected a JSON profile file."
        ) from exc
    return _parse(text, origin)


def profile_to_json(profile: DeviceProfile) -> str:
    """The profile as JSON in the file format (sorted keys, fixed indentation, trailing newline).

    Stable: the same profile always gives the same text, so tuned profiles diff cleanly.
    """
    data: dict[str, object] = {"format_version": FORMAT_VERSION}
    for field in dataclasses.fields(profile):
        value = getattr(profile, field.name)
        if field.name == "efficiency":
            value = {key: [list(point) for point in curve] for key, curve in value.items()}
        data[field.name] = dict(value) if isinstance(value, Mapping) else value
    text = json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False)
    # One line per curve point ("[work, share]"), not four.
    return re.sub(r"\[\s+([^\[\]\s,]+),\s+([^\[\]\s,]+)\s+\]", r"[\1, \2]", text) + "\n"


def check_measured_on(profile: DeviceProfile, device: str | None, *, force: bool = False) -> None:
    """Refuse a tuned profile fitted for another cost-model version, or measured on another device than
    ``device`` (None: not checked); warn on another torch version. Note [Measured profiles are keyed]."""
    measured = profile.measured_on
    if measured is None:
        return
    retune = ("Re-tune on the device it is for with `memopt tune --out PROFILE.json`, or force it with "
              "options={'force_profile': True} (or MEMOPT_FORCE_PROFILE=1, or `memopt plan --force-profile`).")
    problems = []
    if measured["cost_model"] != COST_MODEL_VERSION:
        problems.append(f"it was fitted for cost-model version {measured['cost_model']}, and this memopt's is "
                        f"{COST_MODEL_VERSION}")
    if device is not None and measured["device"] != device:
        problems.append(f"it was measured on {measured['device']!r}, and this device is {device!r}")
    if problems and not force:
        raise MemoptProfileError(f"profile {profile.name!r} does not fit here: {'; '.join(problems)}. {retune}")
    torch_version = torch.__version__.split("+")[0]
    if measured["torch"] != torch_version or problems:
        import warnings

        what = "; ".join(problems) if problems else (
            f"it was measured with torch {measured['torch']} and this is torch {torch_version}")
        warnings.warn(f"profile {profile.name!r}: {what}; its prices may be off. {retune}", stacklevel=2)


def profile_origin(profile: DeviceProfile, requested: str | None) -> dict[str, object]:
    """Where a plan's prices come from, for dumps: what was asked for (a built-in name or a file), the
    profile's source and, for a tuned one, what it was measured on."""
    return {"requested": requested or _DEFAULT_PROFILE, "name": profile.name, "source": profile.source,
            "measured_on": None if profile.measured_on is None else dict(profile.measured_on)}
