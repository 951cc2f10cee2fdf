"""Offline cost-model tuning: measure this device (or read a dump's measured node times) and fit a profile.

``memopt tune --out PROFILE.json`` runs :func:`measure` (microbenchmarks of the op classes the cost
model prices) and :func:`fit` (peaks and efficiency curves from the samples), then :func:`write_profile`.
``memopt tune --from-dump DIR`` fits the same way from the per-node times a dump recorded in real steps
(:func:`samples_from_dump`). One fit for both, so a profile means the same whatever it was fitted from.

Note [What tuning measures]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
Each sample is one op class, its work (FLOPs for a matmul or a fused attention, bytes read plus written
otherwise) and the median seconds of one call, timed over enough calls to fill a few tens of
milliseconds. The ops are the aten overloads the graphs run (``aten.mm``, the device's fused causal
attention forward and backward, ``aten.add.Tensor``, ``aten.sum.dim_IntList``), called as a graph calls
them, so the launch overhead includes what each node of an op-by-op graph pays. The calls run as a step
runs them, not as a loop over one cached tensor would: inputs cycle through copies that together exceed
a CPU's last-level cache, and outputs are held until the timing ends, as a step holds its activations,
so that each call allocates fresh memory (a CPU's elementwise op is then 2-6x slower than on cached,
reused buffers: measured on this project's 2-core machine, where the hot-loop profile predicted steps
25-30% fast). On a CPU the allocator's state matters as much: glibc maps each allocation above its mmap
threshold afresh, paying a page fault per 4 KiB, until a large free raises the threshold, which any
process that has trained a step has done. A fresh process measured elementwise ops of 1-100 MB at 12%
of the bandwidth it measured after one such free (and 34-44% at 1-12 MB), and which of the two a
profile got decided whether it predicted the tiny Llama's step at -1% or +37%. So the measurement frees
one 24 MiB tensor first, putting the process where training processes are. The fit (Note [Fitting a profile]) then gives the model exactly
what it asks: a launch overhead, a peak per class and the share of it reached at each size
(Note [Efficiency curves]).

Note [Fitting a profile]) then gives the model exactly what it asks: a launch overhead, a peak per class
and the share of it reached at each size (Note [Efficiency curves]).

Note [Fitting a profile]
~~~~~~~~~~~~~~~~~~~~~~~~
The model prices a kernel as ``launch + work / (peak x efficiency(work))``. The launch overhead is the
median time of the smallest calls (``launch`` samples, or the smallest elementwise nodes of a dump); each
other sample gives a rate ``work / (seconds - launch)``; the peak of a class is its highest rate (the
memory classes share one memory bandwidth), and its curve is the median rate / peak at each distinct
work, sorted by work. A class with no samples keeps the base profile's figure and no curve.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import tempfile
import time
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from memopt.cost_model.profile import (
    COST_MODEL_VERSION,
    MEMORY_CLASSES,
    DeviceProfile,
    dtype_name,
    profile_to_json,
)
from memopt.errors import MemoptError, MemoptProfileError
from memopt.jsonfiles import json_field, read_json

__all__ = ["Sample", "curve_summary", "device_memory_bytes", "device_name", "fit", "measure", "samples_from_dump",
           "write_profile"]

_aten = torch.ops.aten
# Outputs a measurement holds at most, and inputs it cycles through at least: more than a CPU's last-level
# cache, so that neither is measured from cache when a step's would not be (Note [What tuning measures]).
_HELD_BYTES = 256 * 2**20
_INPUT_BYTES = 64 * 2**20
NODE_TIMES = "node_times.json"     # what a dump's timed steps write (dump_node_times), per graph folder


@dataclasses.dataclass(frozen=True)
class Sample:
    """One measured kernel: its op class (``matmul.<dtype>``, ``attention.<dtype>``, ``elementwise``,
    ``reduction``, ``copy`` and ``copy.pageable`` for host-device transfers, ``launch`` for an empty call,
    ``none`` for a node that moves nothing), its work and its median seconds."""

    op_class: str
    work: float
    seconds: float


def device_name(device: torch.device | str) -> str:
    """What a tuned profile is keyed by: the GPU's name, or the CPU's model and the threads torch uses."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {_cpu_model()} ({torch.get_num_threads()} threads)"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


# ---------------------------------------------------------------------------------------------------------
# measuring


@dataclasses.dataclass(frozen=True)
class _Case:
    op_class: str
    work: float
    run: Callable[[int], object]      # call number -> output


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(run: Callable[[int], object], device: torch.device, *, target_s: float, repeats: int) -> float:
    """Median seconds of one call: each repeat times enough calls to fill ``target_s``, holding their
    outputs as a step holds its activations (Note [What tuning measures])."""
    first = run(0)
    out_bytes = sum(t.untyped_storage().nbytes() for t in _tensors(first))
    _sync(device)
    start = time.perf_counter()
    run(1)
    _sync(device)
    once = max(time.perf_counter() - start, 1e-7)
    calls = max(1, min(10_000, int(target_s / once), _HELD_BYTES // max(out_bytes, 1)))
    times = []
    for _ in range(repeats):
        held = []
        start = time.perf_counter()
        for i in range(calls):
            held.append(run(i))
        _sync(device)
        times.append((time.perf_counter() - start) / calls)
        held.clear()
    return statistics.median(times)


def _tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return [value] if isinstance(value, torch.Tensor) else []


def _fixed(fn: Callable[..., object], *args: object) -> Callable[[int], object]:
    """A case's run: ``fn(*args)``, whatever the call number."""
    return lambda i: fn(*args)


def _cycled(fn: Callable[..., object], *pools: Sequence[object]) -> Callable[[int], object]:
    """A case's run: call ``i`` takes the ``i``-th copy (cyclically) of each argument."""
    return lambda i: fn(*(pool[i % len(pool)] for pool in pools))


def _dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    if device.type == "cuda":
        return (torch.float32, torch.bfloat16, torch.float16)
    return (torch.float32, torch.bfloat16)


def _matmul_cases(device: torch.device, quick: bool) -> list[_Case]:
    sides = (32, 128, 512, 1024) if quick else (16, 32, 64, 128, 256, 512, 1024, 2048)
    # Transformer shapes too: tokens x hidden x hidden, which are not square.
    shapes = [(s, s, s) for s in sides] + [(1024, 256, 256), (256, 1024, 256), (2048, 64, 256)]
    if device.type == "cuda":
        shapes += [(4096, 4096, 4096), (8192, 4096, 4096)]
    cases = []
    for dtype in _dtypes(device):
        for m, k, n in shapes:
            a = torch.randn(m, k, device=device).to(dtype)
            b = torch.randn(k, n, device=device).to(dtype)
            cases.append(_Case(f"matmul.{dtype_name(dtype)}", 2.0 * m * k * n,
                               _fixed(_aten.mm.default, a, b)))
    return cases


def _attention_ops(device: torch.device) -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """(forward, backward) of the fused causal attention this device's ``scaled_dot_product_attention``
    runs in training, as functions of (q, k, v) and (grad, q, k, v, forward's outputs)."""
    if device.type == "cpu":
        fw, bw = _aten._scaled_dot_product_flash_attention_for_cpu, \
            _aten._scaled_dot_product_flash_attention_for_cpu_backward
        return (lambda q, k, v: fw.default(q, k, v, 0.0, True),
                lambda g, q, k, v, *o: bw.default(g, q, k, v, o[0], o[1], 0.0, True))
    if device.type == "cuda":
        fw, bw = _aten._scaled_dot_product_flash_attention, _aten._scaled_dot_product_flash_attention_backward
        return (lambda q, k, v: fw.default(q, k, v, 0.0, True),
                lambda g, q, k, v, *o: bw.default(g, q, k, v, o[0], o[1], o[2], o[3], o[4], o[5], 0.0, True,
                                                  o[6], o[7]))
    return None


def _attention_cases(device: torch.device, quick: bool) -> list[_Case]:
    """The fused attention forward and backward, priced as their own class (Note [Roofline per node]):
    a CPU's runs at a third of its matmul rate, a GPU's flash kernel near it."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from memopt.cost_model.flops import node_flops

    ops = _attention_ops(device)
    if ops is None:
        return []
    shapes = [(1, 4, 128, 64), (4, 4, 256, 64), (1, 8, 1024, 64)]
    if not quick:
        shapes += [(2, 8, 512, 64), (1, 8, 2048, 64)]
    if device.type == "cuda":
        shapes += [(1, 32, 4096, 128)]
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    cases = []
    for shape in shapes:
        q, k, v, g = (torch.randn(shape, device=device, dtype=dtype) for _ in range(4))
        try:
            outputs = tuple(ops[0](q, k, v))
            fw_gm = make_fx(ops[0], tracing_mode="fake")(q, k, v)
            bw_gm = make_fx(ops[1], tracing_mode="fake")(g, q, k, v, *outputs)
        except (RuntimeError, NotImplementedError):      # no such kernel here: matmul curves price it
            return []
        name = f"attention.{dtype_name(dtype)}"
        for gm, run in ((fw_gm, _fixed(ops[0], q, k, v)), (bw_gm, _fixed(ops[1], g, q, k, v, *outputs))):
            flops = sum(node_flops(n) for n in gm.graph.nodes)
            cases.append(_Case(name, float(flops), run))
    return cases


def _memory_cases(device: torch.device, quick: bool) -> list[_Case]:
    exponents = range(10, 25, 3) if quick else range(8, 26)
    cases = []
    for e in exponents:
        numel = 2 ** e
        copies = max(2, min(16, _INPUT_BYTES // (8 * numel)))
        a = [torch.randn(numel, device=device) for _ in range(copies)]
        b = [torch.randn(numel, device=device) for _ in range(copies)]
        cases.append(_Case("elementwise", 3.0 * 4 * numel, _cycled(_aten.add.Tensor, a, b)))
        rows = max(numel // 1024, 1)
        x = [t.view(rows, -1) for t in a]
        cases.append(_Case("reduction", 4.0 * (numel + rows), _cycled(_aten.sum.dim_IntList, x, [[-1]])))
    return cases


def _copy_cases(device: torch.device, quick: bool) -> list[_Case]:
    """Host-device copies as an offload makes them: into pinned memory on CUDA (and pageable, kept apart
    as ``copy.pageable``), a host memcpy on CPU, where 'device' and host are the same memory."""
    cases = []
    for e in ((22, 26) if quick else (20, 23, 26, 28)):
        numel = 2 ** e // 4
        src = torch.randn(numel, device=device)
        host = torch.empty(numel, pin_memory=device.type == "cuda")
        cases.append(_Case("copy", 4.0 * numel, _fixed(host.copy_, src, True)))
        if device.type == "cuda":
            cases.append(_Case("copy.pageable", 4.0 * numel, _fixed(torch.empty(numel).copy_, src)))
    return cases


def _launch_cases(device: torch.device) -> list[_Case]:
    a, b = torch.ones(1, device=device), torch.ones(1, device=device)
    return [_Case("launch", 0.0, _fixed(_aten.add.Tensor, a, b))]


def measure(device: torch.device | str | None = None, *, quick: bool = False,
            progress: Callable[[int, int, str], None] | None = None) -> list[Sample]:
    """Time the op classes on ``device`` (CUDA when present, else CPU); Note [What tuning measures].
    ``progress(done, total, what)`` is called after each measurement."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        _warm_allocator()
    cases = (_launch_cases(device) + _memory_cases(device, quick) + _matmul_cases(device, quick)
             + _attention_cases(device, quick) + _copy_cases(device, quick))
    target_s, repeats = (0.03, 5) if quick else (0.1, 7)
    samples = []
    for done, case in enumerate(cases, start=1):
        samples.append(Sample(case.op_class, case.work,
                              _seconds(case.run, device, target_s=target_s, repeats=repeats)))
        if progress is not None:
            progress(done, len(cases), case.op_class)
    return samples


def _warm_allocator() -> None:
    """Free one 24 MiB tensor first, as a training process has long done (Note [What tuning measures]):
    glibc then serves allocations below that size from its heap instead of fresh, faulting mappings."""
    scratch = torch.empty(6 * 2**20)
    scratch.fill_(0.0)
    del scratch


# ---------------------------------------------------------------------------------------------------------
# fitting


def _launch_s(samples: Sequence[Sample]) -> float:
    launches = [s.seconds for s in samples if s.op_class == "launch"]
    if launches:
        return statistics.median(launches)
    # From a dump: the smallest elementwise kernels are all launch (Note [Fitting a profile]).
    small = sorted((s for s in samples if s.op_class == "elementwise"), key=lambda s: s.work)[:20]
    if not small:
        raise MemoptError("cannot fit a launch overhead: no launch or elementwise samples were measured")
    return statistics.median(s.seconds for s in small)


def _rates(samples: Iterable[Sample], launch_s: float) -> dict[float, float]:
    """Median rate (work per second, launch removed) at each distinct work."""
    by_work: dict[float, list[float]] = {}
    for s in samples:
        if s.work > 0:
            busy = max(s.seconds - launch_s, 0.05 * s.seconds)
            by_work.setdefault(s.work, []).append(s.work / busy)
    return {work: statistics.median(rates) for work, rates in sorted(by_work.items())}


def _curve(rates: dict[float, float], peak: float) -> list[list[float]]:
    return [[work, float(f"{min(rate / peak, 1.0):.4g}")] for work, rate in rates.items()]


def fit(samples: Sequence[Sample], base: DeviceProfile, *, name: str, device: str, source: str,
        memory_bytes: int | None = None) -> DeviceProfile:
    """A profile from ``samples`` (Note [Fitting a profile]); what they do not cover comes from ``base``."""
    launch = _launch_s(samples)
    classes = sorted({s.op_class for s in samples})
    rates = {c: _rates((s for s in samples if s.op_class == c), launch) for c in classes}
    efficiency: dict[str, list[list[float]]] = {}
    matmul = dict(base.matmul_flops)
    for c in classes:
        if c.startswith("matmul.") and rates[c]:
            peak = max(rates[c].values())
            matmul[c.removeprefix("matmul.")] = float(f"{peak:.4g}")
            efficiency[c] = _curve(rates[c], peak)
    for c in classes:      # attention: a share of the matmul peak of its dtype (Note [Efficiency curves])
        if c.startswith("attention.") and rates[c]:
            peak = matmul.get(c.removeprefix("attention."), matmul["float32"])
            efficiency[c] = _curve(rates[c], peak)
    memory_rates = [r for c in MEMORY_CLASSES for r in rates.get(c, {}).values()]
    bandwidth = max(memory_rates) if memory_rates else base.memory_bandwidth
    for c in MEMORY_CLASSES:
        if rates.get(c):
            efficiency[c] = _curve(rates[c], bandwidth)
    copy = _largest_copy_rate(samples, "copy")
    pageable = _largest_copy_rate(samples, "copy.pageable")
    return DeviceProfile(
        name=name,
        description=f"Measured by memopt tune on {device}, torch {torch.__version__}."
                    + (f" Pageable host copies: {pageable / 1e9:.3g} GB/s (offloads use pinned memory)."
                       if pageable else ""),
        source=source,
        memory_bytes=memory_bytes or base.memory_bytes,
        matmul_flops=matmul,
        vector_flops=base.vector_flops,
        memory_bandwidth=float(f"{bandwidth:.4g}"),
        host_device_bandwidth=float(f"{copy:.4g}") if copy else base.host_device_bandwidth,
        launch_overhead_s=float(f"{launch:.4g}"),
        efficiency={c: efficiency[c] for c in sorted(efficiency)},  # type: ignore[misc]
        measured_on={"device": device, "torch": torch.__version__.split("+")[0],
                     "cost_model": COST_MODEL_VERSION},
    )


def _largest_copy_rate(samples: Sequence[Sample], op_class: str) -> float | None:
    """Bytes/s of the largest copy measured: an offloaded activation is megabytes, past any cache."""
    copies = [s for s in samples if s.op_class == op_class]
    if not copies:
        return None
    largest = max(copies, key=lambda s: s.work)
    return largest.work / largest.seconds


def device_memory_bytes(device: torch.device | str) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


# ---------------------------------------------------------------------------------------------------------
# from a dump


def samples_from_dump(folder: str | os.PathLike[str]) -> tuple[list[Sample], dict[str, str]]:
    """The per-node samples of every graph folder under ``folder`` that recorded node times, and the
    dump's keys (device, profile it was planned with). Raises MemoptProfileError naming the file and the
    field when the dump has none or is from another cost-model version."""
    root = Path(folder)
    if not root.is_dir():
        raise MemoptProfileError(f"--from-dump {str(root)!r} is not a directory; expected a dump folder "
                                 "(the dump_dir option of a run with 'dump_node_times')")
    files = sorted(root.glob(f"*/{NODE_TIMES}"))
    if not files:
        raise MemoptProfileError(
            f"dump folder '{root}' has no {NODE_TIMES} in any graph folder: the run did not record node "
            "times. Run a few steps with options {'dump_dir': ..., 'dump_node_times': 3, 'codegen': 'eager'}.")
    samples: list[Sample] = []
    keys: dict[str, str] = {}
    for path in files:
        data = read_json(path, MemoptProfileError, _AGAIN)
        version = data.get("cost_model")
        if version != COST_MODEL_VERSION:
            raise MemoptProfileError(
                f"'{path}' field 'cost_model' is {version!r}; this memopt's cost model is version "
                f"{COST_MODEL_VERSION}. Record the node times again with this memopt.")
        keys = {"device": str(data.get("device")), "profile": str(data.get("profile"))}
        nodes = typing.cast(list[object], json_field(path, data, "nodes", list, MemoptProfileError, _AGAIN))
        samples += [_node_sample(path, i, node) for i, node in enumerate(nodes)]
    return samples, keys


def _node_sample(path: Path, index: int, node: object) -> Sample:
    where = f"nodes[{index}]"
    if not isinstance(node, dict):
        raise MemoptProfileError(f"'{path}' field '{where}' is {node!r}; expected an object")
    op_class = json_field(path, node, "op_class", str, MemoptProfileError, _AGAIN, where)
    work, seconds = (json_field(path, node, k, (int, float), MemoptProfileError, _AGAIN, where)
                     for k in ("work", "seconds"))
    if work < 0 or not seconds > 0:
        raise MemoptProfileError(f"'{path}' field '{where}' has work={work!r}, seconds={seconds!r}; expected "
                                 "work >= 0 and seconds > 0")
    return Sample(op_class, float(work), float(seconds))


_AGAIN = "record the node times again (options dump_dir, dump_node_times, codegen='eager')"


# ---------------------------------------------------------------------------------------------------------
# writing


def write_profile(profile: DeviceProfile, path: str | os.PathLike[str]) -> None:
    """Write ``profile`` atomically: a temporary file in the same folder, then a rename, so that an
    interrupted tune never leaves a half-written profile where the old one was."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(profile_to_json(profile))
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def curve_summary(profile: DeviceProfile) -> str:
    """Lines that show a tuned profile's figures at a glance (for the CLI)."""
    lines = [f"launch overhead {profile.launch_overhead_s * 1e6:.1f} us, memory bandwidth "
             f"{profile.memory_bandwidth / 1e9:.1f} GB/s, host-device {profile.host_device_bandwidth / 1e9:.1f} GB/s"]
    for dtype, flops in profile.matmul_flops.items():
        lines.append(f"matmul {dtype}: peak {flops / 1e9:.1f} GFLOP/s")
    for c, curve in profile.efficiency.items():
        shares = ", ".join(f"{_si(w)}:{e:.0%}" for w, e in curve[:: max(1, math.ceil(len(curve) / 6))])
        lines.append(f"  {c} share of peak by work: {shares}")
    return "\n".join(lines)


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"
