"""Activation offload: custom ops that move a saved tensor to host memory and bring it back.

Three ``torch.library`` custom ops, each with a fake (meta) implementation so that ``torch.compile``
(Dynamo, AOTAutograd, Inductor) traces through them:

- ``memopt::offload(x) -> host``: copies ``x`` into the host pool. The device copy is freed by the graph
  as soon as nothing else reads it.
- ``memopt::reload(host, device) -> y``: allocates ``y`` on ``device`` and issues the copy back.
- ``memopt::wait_reload(y)``: the compute stream waits for ``y``'s copy. The scheduler places ``reload``
  ahead of the first use (prefetch) and ``wait_reload`` right before it.

Note [Offload on CUDA]
Host buffers come from pinned memory (``torch.empty(..., pin_memory=True)``) so copies are asynchronous.
Both directions run on one side stream per device. ``offload`` makes the side stream wait for the
compute stream (``x`` must be finished), copies, records an event, and keeps ``x`` alive until the copy
is done (``record_stream``). ``reload`` waits for the offload's event on the side stream, copies, and
records a new event; ``wait_reload`` makes the compute stream wait for it. That wait is GPU-side: the
host keeps queuing kernels, and the copy overlaps whatever the compute stream runs between ``reload``
and ``wait_reload``. This path is written for CUDA and cannot be exercised on the CPU-only machines the
project is developed and tested on.

Note [Offload on CPU]
On a CPU there is no separate device memory, so offload is an emulation for correctness, not a saving:
the host pool is memory from outside c10's CPU allocator (numpy buffers wrapped with
``torch.from_numpy``). The runtime tracker therefore does not count it as device memory; the pool
reports its bytes to :func:`memopt.runtime.tracker.record_host_alloc` / ``record_host_free``, which the
tracker shows apart as ``host_bytes``. ``reload`` allocates through c10, so reloaded tensors count as
device memory again, as they would on a GPU.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
import torch

from memopt.runtime.tracker import record_host_alloc, record_host_free


class _CudaStreams:
    """One side stream per CUDA device, and the events of copies in flight, keyed by storage."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[int, torch.cuda.Stream] = {}
        self.events: weakref.WeakKeyDictionary[torch.UntypedStorage, torch.cuda.Event] = \
            weakref.WeakKeyDictionary()

    def side(self, device: torch.device) -> torch.cuda.Stream:
        index = device.index if device.index is not None else torch.cuda.current_device()
        with self._lock:
            if index not in self._streams:
                self._streams[index] = torch.cuda.Stream(device=index)
            return self._streams[index]


_CUDA = _CudaStreams()


def _host_buffer(like: torch.Tensor, pinned: bool) -> torch.Tensor:
    """An empty host tensor with ``like``'s shape and, when it is dense, its strides (as ``empty_like``):
    the backward may reinterpret a saved value through its strides (a ``view`` of a transposed tensor)."""
    if pinned:
        return torch.empty_like(like, device="cpu", pin_memory=True)
    layout = torch.empty_like(like, device="meta")
    nbytes = layout.untyped_storage().nbytes()
    raw = np.empty(max(nbytes, 1), dtype=np.uint8)
    record_host_alloc(nbytes)
    weakref.finalize(raw, record_host_free, nbytes)
    # Reinterpret the bytes in the tensor's dtype (works for bf16, which numpy has no type for).
    flat = torch.from_numpy(raw)[:nbytes].view(like.dtype)
    return flat.as_strided(layout.shape, layout.stride())


@torch.library.custom_op("memopt::offload", mutates_args=())
def offload(x: torch.Tensor) -> torch.Tensor:
    """Copy ``x`` into the host pool (see the module notes)."""
    if x.device.type == "cuda":
        host = _host_buffer(x, pinned=True)
        side = _CUDA.side(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            host.copy_(x, non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
        x.record_stream(side)
        _CUDA.events[host.untyped_storage()] = event
        return host
    host = _host_buffer(x, pinned=False)
    host.copy_(x)
    return host


@offload.register_fake
def _offload_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, device="cpu")


@torch.library.custom_op("memopt::reload", mutates_args=())
def reload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Allocate on ``device`` and copy ``host`` back (asynchronously on CUDA: see ``wait_reload``)."""
    out = torch.empty_like(host, device=device)
    if out.device.type == "cuda":
        side = _CUDA.side(out.device)
        offloaded = _CUDA.events.pop(host.untyped_storage(), None)
        with torch.cuda.stream(side):
            if offloaded is not None:
                side.wait_event(offloaded)
            out.copy_(host, non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
        out.record_stream(torch.cuda.current_stream(out.device))
        _CUDA.events[out.untyped_storage()] = event
        return out
    out.copy_(host)
    return out


@reload.register_fake
def _reload_fake(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.empty_like(host, device=device)


@torch.library.custom_op("memopt::wait_reload", mutates_args=("y",))
def wait_reload(y: torch.Tensor) -> None:
    """Make the compute stream wait for ``y``'s reload (nothing to wait for on CPU)."""
    if y.device.type == "cuda":
        event = _CUDA.events.pop(y.untyped_storage(), None)
        if event is not None:
            torch.cuda.current_stream(y.device).wait_event(event)


@wait_reload.register_fake
def _wait_reload_fake(y: torch.Tensor) -> None:
    return None
