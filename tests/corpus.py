"""A small real text corpus from what every machine with Python has: the standard library's docstrings,
tokenized at byte level (vocabulary 256)."""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

import torch


def stdlib_docstrings(max_bytes: int = 1 << 20) -> bytes:
    """Docstrings of the standard library's modules, classes and functions, in a fixed (sorted) file
    order, joined by blank lines, up to ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[bytes] = []
    size = 0
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    data = doc.encode("utf-8") + b"\n\n"
                    out.append(data)
                    size += len(data)
                    if size >= max_bytes:
                        return b"".join(out)[:max_bytes]
    return b"".join(out)


def byte_batches(text: bytes, batch: int, seq: int, steps: int, seed: int = 0) -> list[dict[str, object]]:
    """``steps`` batches of ``batch`` random windows of ``seq`` bytes (inputs are their own labels: the
    model shifts them)."""
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq, (batch,), generator=generator)
        ids = torch.stack([data[s:s + seq] for s in starts.tolist()])
        batches.append({"input_ids": ids, "labels": ids.clone(), "use_cache": False})
    return batches
