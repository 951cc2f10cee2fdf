"""Activation offload: custom ops that move a saved tensor to host memory and bring it back.

Three ``torch.library`` custom ops, each with a fake (meta) implementation so that ``torch.compile``
(Dynamo, AOTAutograd, Inductor) traces through them:

- ``memopt::offload(x) -> host``: copies ``x`` into the host pool. The device copy is freed by the graph
  as soon as nothing else reads it.
- ``memopt::reload(host, device) -> y``: allocates ``y`` on ``device`` and issues the copy back.
- ``memopt::wait_reload(y)``: the compute stream waits for ``y``'s copy. The scheduler issues ``reload``
  where a segment of the backward starts (Note [Reloads start at segment boundaries] in
  memopt/schedule/streams.py) and ``wait_reload`` right before the value's first use.

Each op asks the device's backend (:func:`memopt.runtime.device.get_device_backend`) for its host buffer
and its copy, and keeps a copy's completion by the storage it writes until the op that needs it takes it:
a reload waits for its offload, ``wait_reload`` for its reload (Note [One copy stream per device]).
"""

from __future__ import annotations

import weakref

import torch

from memopt.runtime.device import CopyDone, get_device_backend

# Copies in flight, by the storage they write.
_PENDING: weakref.WeakKeyDictionary[torch.UntypedStorage, CopyDone] = weakref.WeakKeyDictionary()


def _remember(tensor: torch.Tensor, done: CopyDone) -> None:
    if done is not None:
        _PENDING[tensor.untyped_storage()] = done


def _take(tensor: torch.Tensor) -> CopyDone:
    return _PENDING.pop(tensor.untyped_storage(), None)


@torch.library.custom_op("memopt::offload", mutates_args=())
def offload(x: torch.Tensor) -> torch.Tensor:
    """Copy ``x`` into the host pool (see the module notes)."""
    backend = get_device_backend(x.device)
    host = backend.host_buffer(x)
    _remember(host, backend.copy(host, x))
    return host


@offload.register_fake
def _offload_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, device="cpu")


@torch.library.custom_op("memopt::reload", mutates_args=())
def reload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Allocate on ``device`` and copy ``host`` back (asynchronously on CUDA: see ``wait_reload``)."""
    out = torch.empty_like(host, device=device)
    backend = get_device_backend(out.device)
    _remember(out, backend.copy(out, host, after=_take(host)))
    return out


@reload.register_fake
def _reload_fake(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.empty_like(host, device=device)


@torch.library.custom_op("memopt::wait_reload", mutates_args=("y",))
def wait_reload(y: torch.Tensor) -> None:
    """Make the compute stream wait for ``y``'s reload (nothing to wait for on CPU)."""
    get_device_backend(y.device).wait(_take(y))


@wait_reload.register_fake
def _wait_reload_fake(y: torch.Tensor) -> None:
    return None
