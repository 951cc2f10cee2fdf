"""Human-readable sizes for messages and reports."""

from __future__ import annotations


def format_bytes(nbytes: float) -> str:
    """``1.50 GiB``-style binary units; exact bytes below 1 KiB."""
    value = float(nbytes)
    if abs(value) < 1024:
        return f"{int(value)} B"
    unit = "B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024.0
        if abs(value) < 1024:
            break
    return f"{value:.2f} {unit}"
