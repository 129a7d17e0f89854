"""A generator its caller stops reading, beside a call that fails: the two ways a span
ends "dropped", which every sink must tell apart (the first is no failure)."""

from __future__ import annotations

from typing import Any

import pytest

from instrumentation import Dispatcher


def stop_one_and_fail_one(d: Dispatcher, message: str = "bad input") -> tuple[str, str]:
    """Run, under ``d``, a traced generator closed after its first item and a traced
    call raising ``ValueError(message)``; their span names, in that order."""

    @d.span
    def words() -> Any:
        yield "a"
        yield "b"

    @d.span
    def broken() -> None:
        raise ValueError(message)

    stream = words()
    next(stream)
    stream.close()
    with pytest.raises(ValueError):
        broken()
    return words.__qualname__, broken.__qualname__
