"""Offload/reload custom ops: exact round trips, a host pool counted apart, and torch.compile support."""

from __future__ import annotations

import gc

import pytest
import torch

from memopt.runtime.offload import offload, reload, wait_reload
from memopt.runtime.tracker import track_memory


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_round_trip_is_exact(dtype: torch.dtype) -> None:
    x = (torch.randn(37, 53) * 100).to(dtype)
    host = offload(x)
    assert host.device.type == "cpu" and host.data_ptr() != x.data_ptr()
    y = reload(host, x.device)
    wait_reload(y)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y, x, rtol=0, atol=0)


def test_strided_and_empty_tensors() -> None:
    x = torch.randn(64, 48).t()[::2]               # non-contiguous view
    torch.testing.assert_close(reload(offload(x), x.device), x, rtol=0, atol=0)
    t = torch.randn(64, 48).t()                    # dense but transposed: the layout comes back
    y = reload(offload(t), t.device)
    assert y.stride() == t.stride()
    torch.testing.assert_close(y, t, rtol=0, atol=0)
    empty = torch.empty(0, 5)
    assert reload(offload(empty), empty.device).shape == (0, 5)


def test_host_pool_is_counted_apart_from_device_memory() -> None:
    x = torch.randn(256, 1024)                     # 1 MiB, alive before tracking
    nbytes = x.numel() * x.element_size()
    gc.collect()
    with track_memory("cpu") as mem:
        host = offload(x)
        del x                                      # the device copy goes; the host copy stays
        y = reload(host, torch.device("cpu"))
        del host
    assert mem.host_bytes == nbytes
    # Offloading allocates no device memory; reloading allocates one copy, while x's old bytes went.
    assert mem.peak_increase_bytes == 0
    assert mem.end_bytes == mem.baseline_bytes
    del y


def test_fake_implementations_satisfy_opcheck() -> None:
    x = torch.randn(8, 16)
    torch.library.opcheck(offload, (x,))
    torch.library.opcheck(reload, (offload(x), torch.device("cpu")))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiles_without_graph_breaks(backend: str) -> None:
    def step(x: torch.Tensor) -> torch.Tensor:
        saved = torch.sin(x)
        host = offload(saved)
        y = reload(host, x.device)
        wait_reload(y)
        return y * 2 + x

    torch._dynamo.reset()
    x = torch.randn(32, 32)
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(x), step(x))


@pytest.mark.parametrize("codegen", ["eager", "inductor"])
def test_offload_all_moves_every_saved_activation_and_keeps_gradients_exact(codegen: str) -> None:
    """``offload: "all"`` (the GPU check's runtime test): every saved value that can be offloaded is,
    the loss and every gradient equal eager's, and the device keeps less between forward and backward,
    the host pool holding the rest."""
    import copy

    from memopt.compiler.backend import MemoptBackend
    from tests.models import hf_loss, tiny_llama, token_batch
    from tests.tolerances import assert_close

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tiny_llama()
    reference = copy.deepcopy(model)
    batch = token_batch(2, 16)
    backend = MemoptBackend({"offload": "all", "codegen": codegen})
    step = torch.compile(model, backend=backend)
    loss, _ = hf_loss(step, batch)
    loss.backward()
    expected, _ = hf_loss(reference, batch)
    expected.backward()
    assert_close(loss, expected, msg="loss")
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, msg=name)
    (report,) = backend.reports
    schedule = report.schedule
    assert schedule is not None and schedule.method == "offload-all"
    offloadable = {c.name for c in schedule.baseline.candidates if c.offload_time_s != float("inf") and not c.held}
    assert offloadable and schedule.chosen.offload == offloadable
    chosen, baseline = schedule.chosen.timeline, schedule.baseline.timeline
    assert chosen.saved_activation_bytes < baseline.saved_activation_bytes
    assert chosen.host_peak_bytes >= sum(c.nbytes for c in schedule.baseline.candidates if c.name in offloadable) // 2


def test_the_device_interface_copies_through_counted_host_buffers() -> None:
    """Note [One copy stream per device]: the offload ops use only the device backend's host buffers,
    copies and waits; on the CPU a copy is done when it returns (nothing to wait for), and a host buffer
    is counted in the host pool exactly as long as it lives. The CUDA backend implements the same
    abstract methods (checked here by name: it cannot run without a GPU)."""
    import gc

    from memopt.runtime.device import CPUBackend, CUDABackend, DeviceBackend, get_device_backend, host_pool_bytes

    backend = get_device_backend("cpu")
    assert isinstance(backend, CPUBackend)
    like = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4).t()       # strided: a transpose
    before = host_pool_bytes()
    host = backend.host_buffer(like)
    assert host.device.type == "cpu" and host.stride() == like.stride() and host.dtype == like.dtype
    assert host_pool_bytes() - before == 24
    assert backend.copy(host, like) is None
    backend.wait(None)
    back = torch.empty_like(like)
    backend.wait(backend.copy(back, host))
    torch.testing.assert_close(back, like, rtol=0, atol=0)
    del host
    gc.collect()
    assert host_pool_bytes() == before
    for name in ("host_buffer", "copy", "wait"):
        assert name in DeviceBackend.__abstractmethods__
        assert getattr(CUDABackend, name) is not getattr(DeviceBackend, name)
