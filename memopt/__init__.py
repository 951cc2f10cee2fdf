"""memopt: a torch.compile backend that makes training and fine-tuning fit in less accelerator memory.

``import memopt`` is light: torch is imported, Inductor, OR-Tools and Triton only where used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memopt.config import MemoptConfig, parse_options
from memopt.errors import (
    MemoptConfigError,
    MemoptError,
    MemoptInfeasibleBudget,
    MemoptPassError,
    MemoptProfileError,
    MemoptUnsupportedError,
    MemoptVerificationError,
)

# Eager, not lazy: importing the submodule memopt.prepare would otherwise shadow the function of the
# same name on the package.
from memopt.prepare import prepare  # noqa: E402

__version__ = "0.1.0"

if TYPE_CHECKING:
    from memopt.compiler.backend import MemoptBackend


def __getattr__(name: str) -> Any:
    # Lazy: the backend pulls in Inductor, the tracker the profiler; `import memopt` stays fast.
    if name in ("MemoptBackend", "memopt_backend"):
        from memopt.compiler import backend
        return backend.MemoptBackend if name == "MemoptBackend" else backend.memopt
    if name == "track_memory":
        from memopt.runtime.tracker import track_memory
        return track_memory
    if name in ("save_adapters", "load_adapters"):
        from memopt import adapter_files
        return getattr(adapter_files, name)
    if name in ("merge_sparse", "LayerSampler"):
        from memopt import sparse
        return getattr(sparse, name)
    if name == "compile_blocks":
        from memopt.compiler.regional import compile_blocks
        return compile_blocks
    if name == "plan":
        from memopt.plan import plan
        return plan
    raise AttributeError(f"module 'memopt' has no attribute {name!r}")


__all__ = [
    "LayerSampler", "MemoptBackend", "MemoptConfig", "MemoptConfigError", "MemoptError", "MemoptInfeasibleBudget",
    "MemoptPassError", "MemoptProfileError", "MemoptUnsupportedError", "MemoptVerificationError", "compile_blocks", "load_adapters", "merge_sparse", "parse_options", "plan",
    "prepare", "save_adapters", "track_memory", "__version__",
]
