"""What differs between devices: measuring memory, and copying to and from the host.

One abstraction, :class:`DeviceBackend`, with one implementation per device type, which the memory
tracker (:mod:`memopt.runtime.tracker`) and the offload runtime (:mod:`memopt.runtime.offload`) both use:

- :class:`CUDABackend` reads the caching allocator's statistics (``memory_allocated``,
  ``reset_peak_memory_stats``, ``memory_stats``), and copies on a side stream of its own into pinned
  host buffers (Note [One copy stream per device]). Written for CUDA (and ROCm, which answers to
  ``torch.cuda``); it cannot be exercised on a machine without a GPU.
- :class:`CPUBackend` has no allocator statistics to read, so it records every allocation and free made
  through c10's CPU allocator with PyTorch's profiler and replays them. How, and what that cannot see, is
  described in :mod:`memopt.runtime.tracker` (the user-facing text) and in the Notes below (the
  mechanics). Its copies are synchronous, into host buffers from outside c10's allocator.

Note [One copy stream per device]
An offload copies a saved tensor to a host buffer and a reload copies it back, both on one copy stream
per device, in the order they are issued: the scheduler prices exactly that queue (Note [Reloads start
at segment boundaries] in memopt/schedule/streams.py). :meth:`DeviceBackend.copy` starts a copy once
the compute stream has reached it (the source is finished) and returns its completion, which a later
copy may wait for (a reload waits for its own offload) and which :meth:`DeviceBackend.wait` makes the
compute stream wait for, on the device: the host goes on queuing kernels, and the copy overlaps the
compute between the issue and the wait. A device tensor a copy reads or writes is kept alive for the
copy stream (``record_stream``). On CUDA, host buffers are pinned (asynchronous copies need it); on the
CPU, where there is no separate device memory, offload is an emulation for correctness, not a saving:
buffers come from outside c10's allocator (numpy), so the tracker does not count them as device
memory, and copies are done when :meth:`DeviceBackend.copy` returns. Either way the host pool's bytes
are counted apart (:class:`HostPoolRegistry`), and the tracker reports them as ``host_bytes``.

The user-facing API is :func:`memopt.runtime.tracker.track_memory`; this module is what it stands on.
Nothing here touches CUDA at import time, so it imports on CPU-only builds.
"""

from __future__ import annotations

import typing

import contextlib
import functools
import gc
import itertools
import os
import sys
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from memopt.errors import MemoptError, MemoptUnsupportedError

__all__ = [
    "CPUBackend",
    "CUDABackend",
    "CopyDone",
    "DeviceBackend",
    "HostPoolRegistry",
    "PeakReading",
    "get_device_backend",
    "host_pool_bytes",
    "live_cpu_storage_bytes",
    "record_host_alloc",
    "record_host_free",
]

# A copy's completion, to wait for: a CUDA event; None where copies are done when issued (the CPU).
CopyDone = Any


@dataclass(frozen=True)
class PeakReading:
    """What one peak-tracking window measured on one device; every figure is in bytes."""

    # Bytes live when the window opened (CPU: unique storages of live tensors; CUDA: memory_allocated).
    baseline_bytes: int
    # Highest number of bytes live at any moment of the window, never below baseline_bytes.
    peak_bytes: int
    # Bytes live when the window closed.
    end_bytes: int
    # (time_ns, live_bytes) samples, time on the Unix epoch clock in ns. CPU: one sample per allocation
    # or free event; CUDA: one at entry and one at exit.
    timeline: tuple[tuple[int, int], ...]
    # CUDA only: highest reserved (cached) bytes in the window; None on CPU, where nothing is cached.
    reserved_peak_bytes: int | None = None


class DeviceBackend(ABC):
    """The device-specific half of memory measurement.

    A window is opened with :meth:`start_peak_tracking` and closed with :meth:`stop_peak_tracking`;
    windows on one device may nest (the inner one must close first), and each one's reading covers
    exactly its own span.
    """

    device: torch.device

    @abstractmethod
    def synchronize(self) -> None:
        """Wait for queued work on the device, so that what is measured has happened."""

    @abstractmethod
    def allocated_bytes(self) -> int:
        """Bytes of tensor memory live on the device right now."""

    @abstractmethod
    def start_peak_tracking(self) -> int:
        """Open a window; returns its id for :meth:`stop_peak_tracking`."""

    @abstractmethod
    def stop_peak_tracking(self, window: int) -> PeakReading:
        """Close window ``window`` and return what it measured."""

    @abstractmethod
    def host_buffer(self, like: torch.Tensor) -> torch.Tensor:
        """An empty host tensor for a copy of ``like`` (its shape, and its strides when it is dense: the
        backward may read a saved value through them), counted in the host pool while it lives."""

    @abstractmethod
    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: CopyDone = None) -> CopyDone:
        """Copy ``src`` into ``dst`` on the copy stream, behind the compute stream's work so far and
        behind ``after`` (Note [One copy stream per device]); returns the copy's completion."""

    @abstractmethod
    def wait(self, done: CopyDone) -> None:
        """Make the compute stream wait for a copy's completion (None: nothing to wait for)."""


def _counted(buffer: Any, nbytes: int) -> Any:
    """``buffer``, counted in the host pool until it is freed."""
    record_host_alloc(nbytes)
    weakref.finalize(buffer, record_host_free, nbytes)
    return buffer


class HostPoolRegistry:
    """A count of the bytes memopt's host (offload) pool holds, with the peak seen by each open block.

    The offload engine calls :func:`record_host_alloc` when its pool takes host memory and
    :func:`record_host_free` when it gives it back; nothing else feeds it. It is a separate category
    from device memory: on CUDA the pool is pinned host memory, which device statistics do not count;
    on CPU the pool's tensors are already c10 allocations inside ``peak_bytes``, so adding the two would
    count them twice.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current = 0
        self._peaks: dict[int, int] = {}
        self._ids = itertools.count()

    @property
    def current_bytes(self) -> int:
        return self._current

    def record_alloc(self, nbytes: int) -> None:
        if nbytes < 0:
            raise MemoptError(f"record_host_alloc got {nbytes} bytes; the size of a host-pool "
                              "allocation is >= 0 (report a release with record_host_free).")
        with self._lock:
            self._current += nbytes
            for watch, peak in self._peaks.items():
                self._peaks[watch] = max(peak, self._current)

    def record_free(self, nbytes: int) -> None:
        with self._lock:
            if nbytes < 0 or nbytes > self._current:
                raise MemoptError(
                    f"record_host_free got {nbytes} bytes while the host pool holds {self._current}; "
                    "every free must match bytes earlier reported with record_host_alloc.")
            self._current -= nbytes

    def open_watch(self) -> int:
        """Start following the peak; returns an id for :meth:`close_watch`."""
        with self._lock:
            watch = next(self._ids)
            self._peaks[watch] = self._current
            return watch

    def close_watch(self, watch: int) -> int:
        """Stop following and return the most bytes held since :meth:`open_watch`."""
        with self._lock:
            return self._peaks.pop(watch)


# The pool is one per process, so its count is too.
_HOST_POOL = HostPoolRegistry()


def record_host_alloc(nbytes: int) -> None:
    """Report that memopt's host pool took ``nbytes`` more bytes (called by the offload engine)."""
    _HOST_POOL.record_alloc(nbytes)


def record_host_free(nbytes: int) -> None:
    """Report that memopt's host pool released ``nbytes`` bytes (called by the offload engine)."""
    _HOST_POOL.record_free(nbytes)


def host_pool_bytes() -> int:
    """Bytes memopt's host pool holds right now."""
    return _HOST_POOL.current_bytes



# --------------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------------


@dataclass
class _CUDAWindow:
    baseline_bytes: int
    start_ns: int
    # The device's peak counters are reset when a window opens; an enclosing window would lose what it
    # saw before that reset, so it is folded in here first (see Note [Nested windows on CUDA]).
    folded_peak_bytes: int
    folded_reserved_peak_bytes: int


class CUDABackend(DeviceBackend):
    """Allocator statistics of one CUDA device."""

    # Note [Nested windows on CUDA]
    # `reset_peak_memory_stats` is per device, not per caller. Opening a window folds the current
    # peak into every window still open before it resets, and closing a window takes the max of what
    # was folded and the counter; the counter is not reset at close, so an enclosing window still sees
    # the inner span's peak when it closes.

    def __init__(self, index: int) -> None:
        self.device = torch.device("cuda", index)
        self._windows: dict[int, _CUDAWindow] = {}
        self._ids = itertools.count()
        self._copy_stream: torch.cuda.Stream | None = None
        self._lock = threading.Lock()

    def _side(self) -> torch.cuda.Stream:
        with self._lock:
            if self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream(device=self.device)
            return self._copy_stream

    def host_buffer(self, like: torch.Tensor) -> torch.Tensor:
        buffer = torch.empty_like(like, device="cpu", pin_memory=True)
        return _counted(buffer, buffer.untyped_storage().nbytes())

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: CopyDone = None) -> CopyDone:
        side = self._side()
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            if after is not None:
                side.wait_event(after)
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        for tensor in (src, dst):
            if tensor.device.type == "cuda":
                tensor.record_stream(side)        # not reused before the copy stream is done with it
        return done

    def wait(self, done: CopyDone) -> None:
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def allocated_bytes(self) -> int:
        return int(torch.cuda.memory_allocated(self.device))

    def start_peak_tracking(self) -> int:
        self.synchronize()
        stats = torch.cuda.memory_stats(self.device)
        for outer in self._windows.values():
            outer.folded_peak_bytes = max(outer.folded_peak_bytes,
                                          int(stats.get("allocated_bytes.all.peak", 0)))
            outer.folded_reserved_peak_bytes = max(outer.folded_reserved_peak_bytes,
                                                   int(stats.get("reserved_bytes.all.peak", 0)))
        baseline = self.allocated_bytes()
        torch.cuda.reset_peak_memory_stats(self.device)
        window = next(self._ids)
        self._windows[window] = _CUDAWindow(
            baseline_bytes=baseline, start_ns=time.time_ns(), folded_peak_bytes=baseline,
            folded_reserved_peak_bytes=int(torch.cuda.memory_reserved(self.device)))
        return window

    def stop_peak_tracking(self, window: int) -> PeakReading:
        if window not in self._windows:
            raise MemoptError(f"memory-tracking window {window} is not open on {self.device}; each "
                              "window is closed once, by the track_memory block that opened it.")
        self.synchronize()
        state = self._windows.pop(window)
        stats = torch.cuda.memory_stats(self.device)
        end = int(stats.get("allocated_bytes.all.current", 0))
        peak = max(state.folded_peak_bytes, int(torch.cuda.max_memory_allocated(self.device)))
        reserved_peak = max(state.folded_reserved_peak_bytes,
                            int(stats.get("reserved_bytes.all.peak", 0)))
        return PeakReading(
            baseline_bytes=state.baseline_bytes, peak_bytes=max(peak, state.baseline_bytes),
            end_bytes=end,
            timeline=((state.start_ns, state.baseline_bytes), (time.time_ns(), end)),
            reserved_peak_bytes=reserved_peak)


# --------------------------------------------------------------------------------------------------
# CPU: live storages (the baseline)
# --------------------------------------------------------------------------------------------------


def _cpu_storage_of(obj: object, is_fake: Callable[[torch.Tensor], bool]
                    ) -> torch.UntypedStorage | None:
    """The CPU storage holding ``obj``'s bytes, or None if it has no real CPU storage of its own."""
    if isinstance(obj, torch.UntypedStorage):
        storage = obj
    elif isinstance(obj, torch.Tensor):
        if obj.device.type != "cpu" or obj.layout != torch.strided or is_fake(obj):
            return None
        try:
            storage = obj.untyped_storage()
        except (RuntimeError, NotImplementedError):
            # Tensors without a storage of their own (wrapper subclasses, functorch and functional
            # wrappers) raise here; their inner tensors are Python objects and are found on their own.
            return None
    else:
        return None
    if storage.device.type != "cpu":
        return None
    try:
        # A wrapper subclass hands out a storage whose data pointer cannot be read.
        ptr = storage.data_ptr()
    except RuntimeError:
        return None
    if ptr == 0 or storage.nbytes() == 0:
        return None
    return storage


def _live_cpu_storages() -> dict[int, list[torch.UntypedStorage]]:
    """Every distinct CPU storage reachable from a Python object, grouped by data pointer."""
    # Imported here, not at the top: `import memopt` stays fast.
    from torch._subclasses.fake_tensor import is_fake

    # Cycles that are already garbage would be freed at some arbitrary moment inside the window.
    gc.collect()
    tensor_types: dict[type, bool] = {}
    by_ptr: dict[int, list[torch.UntypedStorage]] = {}
    seen: set[int] = set()
    for obj in gc.get_objects():
        # `type(obj)`, not `isinstance`: isinstance reads `__class__`, which some module proxies
        # answer with a deprecation warning; and the per-type cache keeps the scan short (0.08 s
        # for ~300k objects on a 2-core VM, after 0.15 s of gc.collect()).
        tp = type(obj)
        keep = tensor_types.get(tp)
        if keep is None:
            keep = tensor_types[tp] = issubclass(tp, (torch.Tensor, torch.UntypedStorage))
        if not keep:
            continue
        storage = _cpu_storage_of(obj, is_fake)
        if storage is None or id(storage) in seen:
            continue
        seen.add(id(storage))
        by_ptr.setdefault(storage.data_ptr(), []).append(storage)
    return by_ptr


def live_cpu_storage_bytes() -> int:
    """Bytes of the unique CPU storages of every live tensor (deduplicated by data pointer).

    Runs ``gc.collect()`` and walks every Python object: ~0.25 s with transformers imported.
    """
    return sum(storages[0].nbytes() for storages in _live_cpu_storages().values())


# --------------------------------------------------------------------------------------------------
# CPU: the allocation recorder
# --------------------------------------------------------------------------------------------------

# Note [CPU allocation events from the profiler]
# c10's CPU allocator reports each allocation and free to the profiler while a profiler with
# profile_memory=True is enabled (ProfiledCPUMemoryReporter in c10/core/CPUAllocator.cpp). That is the
# only place every CPU tensor allocation passes through, including Inductor's `empty_strided_cpu`, which
# skips the dispatcher and so is invisible to a TorchDispatchMode. We enable the profiler through
# torch._C._autograd directly rather than `torch.profiler.profile`, for three reasons:
# - scopes={USER_SCOPE}: operators are not recorded, only memory events and `record_function` ranges,
#   so the window's code runs at full speed (within noise, see the tracker's module docstring) and
#   the event tree stays small;
# - the results are not parsed into Python FunctionEvents, a cost we would pay per window for nothing;
# - `torch.autograd.profiler._is_profiler_enabled` stays False, so Dynamo and Inductor do not add
#   their own annotations: the code measured is the code that runs without the tracker.
# Events come from `_ProfilerResult.experimental_event_tree()`: `_EventType.Allocation` nodes carry
# `ptr`, `alloc_size` (negative for a free) and `start_time_ns`. Sorting by time and pairing frees
# with allocations by pointer gives the live bytes after every event.
# `profile_all_threads=True` was tried and reports no memory events at all in torch 2.13; the default
# records the calling thread and the threads the profiler's state is propagated to (autograd's).

# Note [Frees of blocks that were live at entry]
# c10 only knows the size of blocks allocated while profiling; freeing an older block logs "Memory
# block of unknown size..." and reports nothing. Its size table also keeps stale entries from earlier
# sessions, so when it does report such a free the size may belong to an older block at that address.
# So the replay ignores c10's free events for pointers not allocated in the window, and learns about
# blocks live at entry from Python instead: every CPU storage found at entry gets a weakref finalizer
# (storages keep their Python object alive as long as the C++ storage lives, so the finalizer runs when
# the bytes are freed) which emits a `record_function` marker naming the window and the pointer. The
# marker is timestamped by the same clock as the allocation events, so the replay subtracts the block
# at the right moment. The finalizer's callback is `_record_function_with_args_enter` itself, a C
# function: a storage can die while compiled code runs, and Dynamo compiles every Python frame it meets
# there (a Python callback was seen to become a graph of its own), but weakref's own frame is on its
# skip list and a C function has no frame. It also creates the range without the dispatcher, so no
# TorchDispatchMode active at that moment sees it.
# An allocation at the address of a block the replay still counts as live proves that block was freed
# (a free we did not see, e.g. on a thread the profiler does not follow), so it is dropped then.

# Note [Keeping stderr clean]
# Kineto writes "profiler_start"/"profiler_stop" lines to fd 2 on every enable/disable (whatever
# KINETO_LOG_LEVEL says), and c10 logs the unknown-block warning of Note [Frees of blocks that were
# live at entry] for the 1st, 1001st, 2001st... such free in the process (a counter in
# ProfiledCPUMemoryReporter, not a time-based limit). Each enable and disable therefore runs with fd 2
# pointed at /dev/null, and the enable also frees one block allocated just before it, so the warning
# that would have printed at the first unknown free goes to /dev/null too. What remains visible is at
# most one warning line per 1000 frees of blocks older than the window. The user's code never runs with
# fd 2 redirected; another thread writing to stderr during an enable/disable (~1 ms) would lose it.

_MARKER_PREFIX = "memopt.track_memory.entry_block_freed:"


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Point fd 2 at /dev/null for the duration (see Note [Keeping stderr clean])."""
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        # No usable fd 2 (a daemon, a closed stream): nothing to keep clean.
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


_ALLOC, _FREE, _ENTRY_FREED = 0, 1, 2


class _Event(NamedTuple):
    # A NamedTuple, not a dataclass: a training step yields thousands of events, and tuples build and
    # sort (by time, then kind) at C speed.
    time_ns: int
    kind: int  # _ALLOC, _FREE or _ENTRY_FREED
    ptr: int
    nbytes: int  # allocations only; 0 otherwise
    window: int  # _ENTRY_FREED only: the window whose finalizer emitted it; -1 otherwise


@dataclass
class _CPUWindow:
    # ptr -> [nbytes, number of distinct storage objects at that pointer still alive]
    entry_blocks: dict[int, list[int]]
    baseline_bytes: int
    first_event: int
    finalizers: list[weakref.finalize] = field(default_factory=list)
    # Set when a profiler session started inside the window replaced ours: its events are gone.
    session_lost: bool = False


def _collect_events(result: torch._C._autograd._ProfilerResult) -> list[_Event]:
    """The CPU allocation events and our markers of one profiler session, in time order."""
    from torch._C._profiler import _EventType

    allocation = _EventType.Allocation
    events: list[_Event] = []
    stack = list(result.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == allocation:  # a leaf
            fields = typing.cast("torch._C._profiler._ExtraFields_Allocation", node.extra_fields)
            size = fields.alloc_size
            if size == 0 or fields.device.type != "cpu":
                continue
            if size > 0:
                events.append(_Event(node.start_time_ns, _ALLOC, fields.ptr, size, -1))
            else:
                events.append(_Event(node.start_time_ns, _FREE, fields.ptr, 0, -1))
            continue
        stack.extend(node.children)
        if node.name.startswith(_MARKER_PREFIX):
            window, ptr = node.name[len(_MARKER_PREFIX):].split(":")
            events.append(_Event(node.start_time_ns, _ENTRY_FREED, int(ptr), 0, int(window)))
    # Sorted by time, ties allocation-first (_ALLOC < _FREE): when the order is unknown, the higher
    # peak is the safe answer.
    events.sort()
    return events


class _CPUAllocationRecorder:
    """The one profiler session that every open CPU window shares.

    The profiler cannot be enabled twice, so nested windows share it: opening or closing any window
    ends the current profiler segment (its events are appended to ``_events``) and, while windows
    remain open, starts the next one. A window's events are then exactly a slice of ``_events``.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._events: list[_Event] = []
        self._windows: dict[int, _CPUWindow] = {}
        self._ids = itertools.count()
        self._profiling = False

    def open_window(self) -> int:
        with self._lock:
            if not self._windows and torch._C._autograd._profiler_enabled():
                raise MemoptUnsupportedError(
                    "track_memory on CPU records allocations with the PyTorch profiler, and a profiler "
                    "session is already active. Exit the torch.profiler session before entering "
                    "track_memory, or enter track_memory outside of it.")
            window = next(self._ids)
            by_ptr = _live_cpu_storages()
            state = _CPUWindow(
                entry_blocks={ptr: [storages[0].nbytes(), len(storages)]
                              for ptr, storages in by_ptr.items()},
                baseline_bytes=sum(storages[0].nbytes() for storages in by_ptr.values()),
                first_event=0)
            for ptr, storages in by_ptr.items():
                marker = f"{_MARKER_PREFIX}{window}:{ptr}"
                for storage in storages:
                    # The marker's range ends when the handle enter() returns is dropped; the callback
                    # is a C function, see Note [Frees of blocks that were live at entry].
                    finalizer = weakref.finalize(
                        storage, torch._C._autograd._record_function_with_args_enter, marker)
                    # A window left open at interpreter exit must not emit markers from atexit.
                    finalizer.atexit = False
                    state.finalizers.append(finalizer)
            self._end_segment()
            state.first_event = len(self._events)
            self._windows[window] = state
            try:
                self._start_segment()
            except BaseException:
                del self._windows[window]
                for finalizer in state.finalizers:
                    finalizer.detach()
                raise
            return window

    def close_window(self, window: int) -> PeakReading:
        with self._lock:
            if window not in self._windows:
                raise MemoptError(f"CPU memory-tracking window {window} is not open; each window is "
                                  "closed once, by the track_memory block that opened it.")
            self._end_segment()
            state = self._windows.pop(window)
            for finalizer in state.finalizers:
                finalizer.detach()
            reading = _replay(self._events[state.first_event:], window, state)
            if self._windows:
                self._start_segment()
            else:
                self._events.clear()
            if state.session_lost:
                raise MemoptUnsupportedError(
                    "a PyTorch profiler session was started inside this track_memory block on CPU; "
                    "it replaced the profiler session the tracker records allocations with, so the "
                    "block's measurement is lost. Start the profiler outside the block, or profile "
                    "and track memory in separate runs.")
            return reading

    def _start_segment(self) -> None:
        from torch._C._profiler import (
            ProfilerActivity,
            ProfilerConfig,
            ProfilerState,
            RecordScope,
            _ExperimentalConfig,
        )

        if not torch.autograd.kineto_available():
            raise MemoptUnsupportedError(
                "track_memory on CPU needs PyTorch's Kineto profiler, which this PyTorch build lacks; "
                "use a standard build (pip wheels include it) or track on CUDA.")
        config = ProfilerConfig(
            ProfilerState.KINETO,
            False,  # report_input_shapes
            True,  # profile_memory
            False,  # with_stack
            False,  # with_flops
            False,  # with_modules
            _ExperimentalConfig(),
        )
        activities = {ProfilerActivity.CPU}
        # Freed after the enable: absorbs c10's unknown-block warning (Note [Keeping stderr clean]).
        primer = torch.empty(1, dtype=torch.uint8)
        with _native_stderr_silenced():
            torch._C._autograd._prepare_profiler(config, activities)
            torch._C._autograd._enable_profiler(  # type: ignore[call-arg]  # the stub lags torch 2.13
                config, activities, {RecordScope.USER_SCOPE})
            del primer
        self._profiling = True

    def _end_segment(self) -> None:
        if not self._profiling:
            return
        if not torch._C._autograd._profiler_enabled():
            # A torch.profiler session entered inside a window replaces ours (torch does not refuse
            # it) and disables it at its exit, taking this segment's events with it.
            self._profiling = False
            for state in self._windows.values():
                state.session_lost = True
            return
        with _native_stderr_silenced():
            result = torch._C._autograd._disable_profiler()
            self._profiling = False
            self._events.extend(_collect_events(result))


def _replay(events: list[_Event], window: int, state: _CPUWindow) -> PeakReading:
    """Live bytes after every event of one window; see Note [CPU allocation events from the profiler]."""
    entry_blocks = {ptr: list(v) for ptr, v in state.entry_blocks.items()}
    live: dict[int, int] = {}
    current = peak = state.baseline_bytes
    timeline: list[tuple[int, int]] = []
    for event in events:
        if event.kind == _ALLOC:
            # Address reuse proves the previous block there was freed (Note [Frees of blocks that
            # were live at entry]).
            current -= live.pop(event.ptr, 0)
            stale = entry_blocks.pop(event.ptr, None)
            if stale is not None:
                current -= stale[0]
            live[event.ptr] = event.nbytes
            current += event.nbytes
        elif event.kind == _FREE:
            if event.ptr not in live:
                continue
            current -= live.pop(event.ptr)
        else:
            block = entry_blocks.get(event.ptr) if event.window == window else None
            if block is None:
                continue
            block[1] -= 1
            if block[1] > 0:
                continue
            del entry_blocks[event.ptr]
            current -= block[0]
        peak = max(peak, current)
        timeline.append((event.time_ns, current))
    return PeakReading(baseline_bytes=state.baseline_bytes, peak_bytes=peak, end_bytes=current,
                       timeline=tuple(timeline))


class CPUBackend(DeviceBackend):
    """CPU memory, measured from c10's allocation events (see :mod:`memopt.runtime.tracker`)."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self._recorder = _CPUAllocationRecorder()

    def synchronize(self) -> None:
        # CPU kernels have returned by the time the Python call that launched them does.
        pass

    def allocated_bytes(self) -> int:
        return live_cpu_storage_bytes()

    def start_peak_tracking(self) -> int:
        return self._recorder.open_window()

    def stop_peak_tracking(self, window: int) -> PeakReading:
        return self._recorder.close_window(window)

    def host_buffer(self, like: torch.Tensor) -> torch.Tensor:
        layout = torch.empty_like(like, device="meta")
        nbytes = layout.untyped_storage().nbytes()
        raw = _counted(np.empty(max(nbytes, 1), dtype=np.uint8), nbytes)    # the views keep ``raw`` alive
        # The bytes in the tensor's dtype (works for bf16, which numpy has no type for).
        return torch.from_numpy(raw)[:nbytes].view(like.dtype).as_strided(layout.shape, layout.stride())

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: CopyDone = None) -> CopyDone:
        dst.copy_(src)
        return None

    def wait(self, done: CopyDone) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# Lookup
# --------------------------------------------------------------------------------------------------

_backends: dict[torch.device, DeviceBackend] = {}
_backends_lock = threading.Lock()


def get_device_backend(device: torch.device | str | None = None) -> DeviceBackend:
    """The backend of ``device``; None means the current CUDA device if there is one, else the CPU.

    Backends are shared per device, because the state they keep (the CPU profiler session, the CUDA
    peak counters) is per device too.
    """
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise MemoptUnsupportedError(
            f"memory tracking got device {device!r}, which torch does not parse as a device "
            f"({exc}); pass 'cpu', 'cuda', 'cuda:N' or a torch.device.") from exc
    if dev.type == "cpu":
        key = torch.device("cpu")
        make: Callable[[], DeviceBackend] = CPUBackend
    elif dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MemoptUnsupportedError(
                f"memory tracking was asked for {dev}, but this PyTorch build sees no CUDA device; "
                "track on 'cpu' or run on a machine with a GPU.")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        key = torch.device("cuda", index)
        make = functools.partial(CUDABackend, index)
    else:
        raise MemoptUnsupportedError(
            f"memory tracking supports 'cpu' and 'cuda' devices, not {dev.type!r}; track one of those.")
    with _backends_lock:
        backend = _backends.get(key)
        if backend is None:
            backend = _backends[key] = make()
        return backend

