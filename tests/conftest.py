"""Test-wide settings that must hold before anything is imported, and fixtures shared by test files."""

import os
from collections.abc import Iterator

import pytest

# Triton's kernels run through its interpreter on this CPU-only machine; the mode must be chosen before
# Triton is first imported (Note [Triton on a CPU-only machine] in memopt/codegen/triton_kernels.py).
# memopt's ops still run their PyTorch kernels on CPU unless a test sets MEMOPT_TRITON_CPU=1.
os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker computes on one thread: two workers of torch's default two threads
    each on this 2-core machine fight for the cores (the token-quality training test took 619 s so, 378 s
    with one thread each; the parallel part 2040 s, then 1123-1329 s). Tests run alone (``-m serial``)
    keep torch's default."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"     # the processes a test starts, too (a profile names its threads)


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """A test that compiles starts and ends with Dynamo's caches empty, so that no graph or guard of
    another test is reused (modules opt in: pytestmark = pytest.mark.usefixtures("fresh_dynamo"))."""
    import torch

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def plan_cache_per_test(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test plans with an empty plan cache of its own (Note [The plan cache]): a plan another test
    searched must not stand in for the search a test checks, and nothing is written to the user's cache."""
    monkeypatch.setenv("MEMOPT_CACHE_DIR", str(tmp_path_factory.mktemp("memopt-cache")))
