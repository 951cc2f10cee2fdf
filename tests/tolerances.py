"""One table of tolerances per dtype, for every parity test (torch.testing.assert_close's defaults)."""

from __future__ import annotations

import torch

# (rtol, atol): torch.testing.assert_close's own defaults for each dtype.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    # Integers (e.g. BatchNorm's num_batches_tracked) must match exactly.
    torch.int64: (0.0, 0.0),
    torch.int32: (0.0, 0.0),
    torch.bool: (0.0, 0.0),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    rtol, atol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol,
                               msg=(lambda m: f"{msg}: {m}") if msg else None)
