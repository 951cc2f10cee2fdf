"""The errors memopt raises at its users.

Every message names what was found, what was expected and what to do about it; nothing user-facing is a
bare ``AssertionError``.
"""

from __future__ import annotations

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class MemoptError(Exception):
    """Base class of every error memopt raises on purpose."""


class MemoptConfigError(MemoptError, ValueError):
    """An option, a budget string, a preset or a profile that is not valid."""


class MemoptProfileError(MemoptConfigError):
    """A device profile (built-in name or JSON file) that cannot be loaded or is not valid."""


class MemoptUnsupportedError(MemoptError):
    """The model or the call asks for something memopt does not support (yet)."""


class MemoptPassError(MemoptError):
    """A pass failed and the user asked for ``strict=True``; names the pass and the reason."""


class MemoptInfeasibleBudget(MemoptError):
    """No plan reaches the memory budget; carries the smallest reachable peak and what occupies it."""

    def __init__(self, message: str, *, min_peak_bytes: int | None = None,
                 breakdown: dict[str, int] | None = None) -> None:
        super().__init__(message)
        self.min_peak_bytes = min_peak_bytes
        self.breakdown = dict(breakdown or {})


class MemoptVerificationError(MemoptError):
    """``verify``: a compiled step's outputs or gradients differ from eager PyTorch's beyond the dtype's
    tolerance; names the graph, the step, the value and the difference."""


def memopt_cause(err: BaseException, cls: type[E]) -> E | None:
    """The ``cls`` error behind ``err``: Dynamo wraps an error raised in a backend (``BackendCompilerFailed``,
    with the original as ``__cause__`` or ``inner_exception``); None when there is none."""
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, cls):
        cause = cause.__cause__ or getattr(cause, "inner_exception", None)
    return cause
