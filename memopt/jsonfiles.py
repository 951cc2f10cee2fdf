"""Reading memopt's JSON files (dumps, node times, adapter configs) so that a damaged one is an error that
names the file and the field, of the caller's MemoptError class, with the caller's advice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memopt.errors import MemoptError

__all__ = ["json_field", "read_json"]


def read_json(path: Path, error: type[MemoptError], advice: str, *, object_only: bool = True) -> Any:
    """The JSON value in ``path``; ``error`` (naming the file, then ``advice``) when it cannot be read,
    or, with ``object_only``, when it is not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"'{path}' cannot be read as JSON ({err}); {advice}") from None
    if object_only and not isinstance(data, dict):
        raise error(f"'{path}' holds a JSON {type(data).__name__}; expected an object. {advice}")
    return data


def json_field(path: Path, data: Any, key: str, kind: type | tuple[type, ...], error: type[MemoptError],
               advice: str, where: str = "") -> Any:
    """``data[key]`` when ``data`` is an object holding a ``kind`` there (a bool is not a number); else
    ``error`` naming the file and the field (``where.key``)."""
    name = f"{where}.{key}" if where else key
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(data, dict) or key not in data or not isinstance(value, kind) or (
            isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))):
        found = data.get(key, "missing") if isinstance(data, dict) else type(data).__name__
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise error(f"'{path}' field '{name}' is {found!r}; expected {expected}. {advice}")
    return value
