"""Calls posted to the audit loop: in order, none lost, and the loop woken (a write to
its socket, on the application's thread) only when nothing posted is waiting already."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from instrumentation import audit, telemetry
from instrumentation.audit._loop import Worker, audit_loop
from instrumentation.llms import OfflineLLM

from .helpers import SyncRecorder


def _wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _hold(worker: Worker) -> threading.Event:
    """Keep ``worker``'s loop busy in a posted call until the event returned is set."""
    release, holding = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        release.wait(10)

    audit_loop.post(worker, hold)
    assert holding.wait(5)
    return release


@pytest.fixture
def held_loop(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Worker, list[int]]]:
    """The running audit loop, held busy until the test ends; yields it with a list of
    the loop wake-ups asked for from then on (by call_soon_threadsafe)."""
    worker = audit_loop.worker()
    release = _hold(worker)
    wakes: list[int] = []
    real = worker.loop.call_soon_threadsafe

    def counting(*args: Any, **kwargs: Any) -> Any:
        wakes.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(worker.loop, "call_soon_threadsafe", counting)
    try:
        yield worker, wakes
    finally:
        release.set()


def test_posts_made_while_the_loop_is_busy_wake_it_once(
    held_loop: tuple[Worker, list[int]],
) -> None:
    worker, wakes = held_loop
    ran: list[int] = []
    for number in range(100):
        assert audit_loop.post(worker, ran.append, number)
    assert len(wakes) == 1


def test_posted_calls_all_run_in_order_from_many_threads() -> None:
    worker = audit_loop.worker()
    ran: list[tuple[int, int]] = []
    threads = [
        threading.Thread(
            target=lambda t=t: [audit_loop.post(worker, ran.append, (t, n)) for n in range(500)]
        )
        for t in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    _wait_for(lambda: len(ran) == 8 * 500)
    for t in range(8):
        assert [n for who, n in ran if who == t] == list(range(500))


def test_a_posted_call_that_raises_loses_none_after_it() -> None:
    worker = audit_loop.worker()
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("bug in a posted call")

    release = _hold(worker)
    audit_loop.post(worker, ran.append, "before")
    audit_loop.post(worker, broken)
    audit_loop.post(worker, ran.append, "after")
    release.set()
    _wait_for(lambda: len(ran) == 2)
    assert ran == ["before", "after"]
    assert telemetry.counter("audit.loop_errors").value == 1


def test_llm_calls_inside_a_request_do_not_wake_the_loop_each(
    held_loop: tuple[Worker, list[int]],
) -> None:
    _, wakes = held_loop
    llm = OfflineLLM()
    handler = SyncRecorder()
    with audit.request(question="many calls", handlers=[handler], timeout=0) as req:
        for _ in range(50):
            llm.chat("many calls")
    app = threading.get_ident()
    assert wakes.count(app) == 1  # request_start, 100 LLM events, request_end: one wake-up
    assert req.completed is False
