"""What memopt's Triton kernels share: lazy compilation, tile rules, dot dtypes and the kernel registry.

Note [Triton on a CPU-only machine]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Triton runs kernels through its interpreter when ``TRITON_INTERPRET=1`` is set *before Triton is
imported*: its own library functions (``tl.zeros``, ``tl.max``, ...) are compiled for one mode at import.
The test suite sets it in ``tests/conftest.py``. memopt's kernel files keep plain Python functions and
:func:`jit` compiles each at its first launch, so importing memopt needs neither Triton nor a GPU.

Where the kernels run: on CUDA, always (the ``cuda`` kernels of memopt's ops). On CPU, the ops run their
tiled PyTorch kernels, unless ``MEMOPT_TRITON_CPU=1`` is set too, in which case they run the Triton
kernels through the interpreter (slow: for checking the kernels inside compiled graphs, see
:func:`kernels_on_cpu`).

The interpreter does not check GPU rules, so :func:`check_tiles` does (powers of two, at least 16
along every ``tl.dot`` dimension, operand tiles that fit in shared memory with the pipeline's stages);
every launcher checks its tiles before launching, and the tests check every tile configuration the
launchers use. bf16 arithmetic is wrong in the interpreter (values are handled as raw 16-bit integers):
kernels load bf16 and cast to fp32 at once, and take the ``tl.dot`` operand dtype as a ``tl.constexpr``
(:func:`dot_dtype`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["KERNELS", "SHARED_MEMORY_BYTES", "Tiles", "check_tiles", "dot_dtype", "interpreting", "jit",
           "kernel_sources", "kernels_on_cpu", "kernels_run_on"]

# Shared memory a block may use on the smallest GPU memopt targets (sm_89, e.g. RTX 4090: 99 KiB).
SHARED_MEMORY_BYTES = 99 * 1024


def interpreting() -> bool:
    """Whether Triton's interpreter runs kernels (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernels_run_on(device: torch.device) -> bool:
    """Whether memopt's ops run their Triton kernels on ``device``: always on CUDA, on CPU only with
    :func:`kernels_on_cpu` (Note [Triton on a CPU-only machine])."""
    return device.type == "cuda" or (device.type == "cpu" and kernels_on_cpu())


def kernels_on_cpu() -> bool:
    """Whether memopt's ops run their Triton kernels on CPU tensors (Note [Triton on a CPU-only
    machine]): ``MEMOPT_TRITON_CPU=1``, which needs ``TRITON_INTERPRET=1`` from the process start."""
    if os.environ.get("MEMOPT_TRITON_CPU", "0") in ("", "0"):
        return False
    if not interpreting():
        raise RuntimeError("MEMOPT_TRITON_CPU=1 runs memopt's Triton kernels on CPU through Triton's "
                           "interpreter; set TRITON_INTERPRET=1 too, before Python starts")
    return True


_compiled: dict[tuple[Callable[..., Any], bool], Any] = {}


def jit(fn: Callable[..., Any]) -> Any:
    """``triton.jit(fn)`` for the current mode, compiled once per mode (Note [Triton on a CPU-only
    machine])."""
    import triton

    key = (fn, interpreting())
    if key not in _compiled:
        _compiled[key] = triton.jit(fn)
    return _compiled[key]


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One launch configuration of a matmul-shaped kernel."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_tiles(tiles: Tiles, operand_bytes: int = 2) -> None:
    """Raise ``ValueError`` if ``tiles`` break a GPU rule the interpreter does not enforce."""
    problems = [f"{name} {value} is not a power of two" for name, value in dataclasses.asdict(tiles).items()
                if name.startswith("block") and not _power_of_two(value)]
    problems += [f"{name} {value} is below 16 (tl.dot's minimum)" for name, value in
                 (("block_m", tiles.block_m), ("block_n", tiles.block_n), ("block_k", tiles.block_k))
                 if value < 16]
    if not _power_of_two(tiles.num_warps) or tiles.num_warps > 32:
        problems.append(f"num_warps {tiles.num_warps} is not a power of two up to 32")
    shared = tiles.num_stages * (tiles.block_m + tiles.block_n) * tiles.block_k * operand_bytes
    if shared > SHARED_MEMORY_BYTES:
        problems.append(f"{tiles.num_stages} stages of {tiles.block_m}x{tiles.block_k} and "
                        f"{tiles.block_k}x{tiles.block_n} operand tiles need {shared} B of shared memory, "
                        f"more than {SHARED_MEMORY_BYTES}")
    if problems:
        raise ValueError(f"memopt: invalid Triton tiles {tiles}: " + "; ".join(problems))


def dot_dtype(dtype: torch.dtype) -> Any:
    """The ``tl.dot`` operand type for inputs of ``dtype``: their own 16-bit type on a GPU, fp32 in the
    interpreter (Note [Triton on a CPU-only machine]) and for fp32 inputs."""
    import triton.language as tl

    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16 and not interpreting():
        return tl.bfloat16
    return tl.float32


def next_power_of_two(n: int, least: int = 16) -> int:
    return max(least, 1 << max(0, int(n) - 1).bit_length())


# op name -> the module holding its kernel (its source goes to the dumps of graphs that call the op).
KERNELS: dict[str, str] = {
    "memopt.nf4_mm": "memopt.codegen.nf4_matmul",
    "memopt.nf4_mm_lora": "memopt.codegen.nf4_matmul",
    "memopt.int8_mm": "memopt.codegen.int8_matmul",
    "memopt.compress": "memopt.codegen.compress_rows",
    "memopt.decompress": "memopt.codegen.compress_rows",
    "memopt.gather_rows": "memopt.codegen.token_rows",
    "memopt.scatter_add_rows": "memopt.codegen.token_rows",
    "memopt.linear_cross_entropy": "memopt.codegen.linear_cross_entropy",
    "memopt.linear_cross_entropy_backward": "memopt.codegen.linear_cross_entropy",
}


def kernel_sources(graphs: list[torch.fx.GraphModule]) -> dict[str, str]:
    """``{file name: Triton source}`` of every memopt kernel the ``graphs`` call (read from the kernel
    files, not imported: the dumps need no Triton)."""
    import importlib.util
    from pathlib import Path

    used = {str(n.target).rsplit(".", 1)[0] for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    out: dict[str, str] = {}
    for op, module_name in KERNELS.items():
        spec = importlib.util.find_spec(module_name)
        if op in used and spec is not None and spec.origin is not None:
            out[module_name.rsplit(".", 1)[-1] + ".py"] = Path(spec.origin).read_text()
    return out
