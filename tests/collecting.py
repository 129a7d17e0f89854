"""For tests of what the cyclic garbage collector causes: it runs inside a lock the
test holds, on a thread the test can give up on."""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterator
from typing import Any


def in_thread(work: Callable[[], None], seconds: float = 20) -> None:
    """Run ``work`` on a thread with automatic collections off (only the test's own
    ``gc.collect()`` runs, where it means to); fail, instead of hanging the suite, if
    it never ends."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    gc.disable()
    try:
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(seconds)
    finally:
        gc.enable()
    assert not thread.is_alive(), "deadlocked: a handler waited for a lock its thread held"
    if errors:
        raise errors[0]


def leave_in_a_cycle(gen: Iterator[Any]) -> None:
    """Start ``gen`` and drop it where only the cyclic collector will find it."""
    next(gen)
    cycle: list[Any] = [gen]
    cycle.append(cycle)
