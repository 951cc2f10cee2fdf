"""Checking that a memopt error reaches the user, also when Dynamo wraps it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


@contextmanager
def raises_memopt(cls: type[BaseException], match: str) -> Iterator[None]:
    """Like ``pytest.raises``, but looks through Dynamo's ``BackendCompilerFailed`` to its cause: an
    error raised inside a backend reaches the user wrapped, with the memopt error as ``__cause__``."""
    with pytest.raises(BaseException) as info:
        yield
    err: BaseException | None = info.value
    chain = []
    while err is not None and not isinstance(err, cls):
        chain.append(type(err).__name__)
        err = err.__cause__ or getattr(err, "inner_exception", None)
    assert err is not None, f"expected {cls.__name__}, got the chain {chain}: {info.value}"
    assert re.search(match, str(err)), f"{cls.__name__} message {str(err)!r} does not match {match!r}"
