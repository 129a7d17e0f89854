"""Ctrl-C, SystemExit or a cancellation leaving a request does not wait for its handlers:
the application is being stopped. Their calls go on (the exit flush waits for them)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from instrumentation import audit, get_dispatcher

from .helpers import SyncRecorder


class HeldEnd(SyncRecorder):
    """Its request_end waits until released (at most 10 s)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def request_end(self, output: Any, request_context: Any) -> None:
        self.release.wait(10)
        super().request_end(output, request_context)


@pytest.fixture
def held() -> Iterator[HeldEnd]:
    handler = HeldEnd()
    try:
        yield handler
    finally:
        handler.release.set()


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_leaving_a_request_with_ctrl_c_or_exit_does_not_wait(
    held: HeldEnd, stop: type[BaseException]
) -> None:
    began = time.monotonic()
    with pytest.raises(stop), audit.request(question="q", handlers=[held], timeout=5) as req:
        raise stop()
    assert time.monotonic() - began < 1
    assert req.completed is False
    held.release.set()
    deadline = time.monotonic() + 5
    while not held.rec.request_ends and time.monotonic() < deadline:
        time.sleep(0.01)
    (output, _) = held.rec.request_ends[0]
    assert isinstance(output.error, stop)  # the calls went on in the background


async def test_a_cancelled_async_request_does_not_wait(held: HeldEnd) -> None:
    entered = asyncio.Event()

    async def serve() -> None:
        async with audit.request(question="q", handlers=[held], timeout=5):
            entered.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(serve())
    await entered.wait()
    began = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - began < 1


def test_a_request_span_left_with_ctrl_c_does_not_wait(held: HeldEnd) -> None:
    d = get_dispatcher("tests.audit.interrupts")
    audit.attach(d, [held], timeout=5)

    @d.span(request=True)
    def ask(question: str) -> None:
        raise KeyboardInterrupt

    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        ask("q")
    assert time.monotonic() - began < 1


@pytest.mark.parametrize("error", [ValueError, type("OwnBaseException", (BaseException,), {})])
def test_an_ordinary_error_still_waits(held: HeldEnd, error: type[BaseException]) -> None:
    """Only the three stops the docs name leave without waiting: an application's own
    BaseException (pytest's failures are one) is an error like any other."""
    threading.Timer(0.3, held.release.set).start()
    with pytest.raises(error), audit.request(question="q", handlers=[held]) as req:
        raise error("a bug")
    assert req.completed is True
