"""Test-wide settings that must hold before anything is imported."""

import os

# Triton's kernels run through its interpreter on this CPU-only machine; the mode must be chosen before
# Triton is first imported (Note [Triton on a CPU-only machine] in memopt/codegen/triton_kernels.py).
# memopt's ops still run their PyTorch kernels on CPU unless a test sets MEMOPT_TRITON_CPU=1.
os.environ.setdefault("TRITON_INTERPRET", "1")
