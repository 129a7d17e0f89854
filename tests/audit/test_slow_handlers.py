"""Slow handlers: the worker threads for plain ``def`` methods can be set, and a call
that runs too long is logged (a WARNING naming handler and method, once per call)."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from instrumentation import audit, telemetry
from instrumentation.audit import runner
from instrumentation.audit._loop import SYNC_WORKERS, audit_loop

from .helpers import SyncRecorder


@pytest.fixture(autouse=True)
def _default_workers() -> Iterator[None]:
    try:
        yield
    finally:
        audit.set_worker_threads(SYNC_WORKERS)


class Held(SyncRecorder):
    """Its request_start waits until released (at most 10 s)."""

    def __init__(self, release: threading.Event) -> None:
        super().__init__()
        self.release = release

    def request_start(self, user_request: Any) -> Any:
        self.release.wait(10)
        return super().request_start(user_request)


def _slow_warnings(caplog: pytest.LogCaptureFixture, about: str = "") -> list[str]:
    """The slow-call warnings logged about handler ``about`` (a class name).

    Other tests' requests may still have calls running in the background, on the same
    audit loop: only this test's handler's are counted.
    """
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "instrumentation.audit"
        and r.levelno == logging.WARNING
        and "SLOW_CALL_SECONDS" in r.getMessage()
        and f"handler {about}" in r.getMessage()
    ]


def test_worker_threads_can_be_set_and_are_checked() -> None:
    with pytest.raises(TypeError, match="int"):
        audit.set_worker_threads("8")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="int"):
        audit.set_worker_threads(True)
    with pytest.raises(ValueError, match="from 1 to 256"):
        audit.set_worker_threads(0)
    before = threading.active_count()
    with pytest.raises(ValueError, match="from 1 to 256"):  # started 22,000, then failed
        audit.set_worker_threads(200_000)
    assert threading.active_count() == before


def test_more_worker_threads_let_a_fast_handler_pass_slow_ones() -> None:
    release = threading.Event()
    try:
        with audit.request(question="warm up", handlers=[SyncRecorder()]):
            pass  # the pool runs, with its default size
        audit.set_worker_threads(SYNC_WORKERS + 2)
        slow = [
            audit.request(question=f"slow {i}", handlers=[Held(release)], timeout=0)
            for i in range(SYNC_WORKERS + 1)
        ]
        for req in slow:
            with req:
                pass
        began = time.monotonic()
        with audit.request(question="fast", handlers=[SyncRecorder()], timeout=5) as fast:
            pass
        assert fast.completed and time.monotonic() - began < 2
    finally:
        release.set()


def test_fewer_worker_threads_take_effect_at_once() -> None:
    release = threading.Event()
    try:
        audit.set_worker_threads(1)
        with audit.request(question="slow", handlers=[Held(release)], timeout=0):
            pass
        with audit.request(question="queued", handlers=[SyncRecorder()], timeout=0.3) as queued:
            pass
        assert queued.completed is False  # behind the one slow call
    finally:
        release.set()
    assert audit_loop.sync_workers == 1


def test_a_sync_call_running_long_is_logged_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "SLOW_CALL_SECONDS", 0.2)

    class Sleepy(SyncRecorder):
        def request_start(self, user_request: Any) -> Any:
            time.sleep(0.6)
            return super().request_start(user_request)

    with (
        caplog.at_level(logging.WARNING, logger="instrumentation.audit"),
        audit.request(question="q", handlers=[Sleepy()]) as req,
    ):
        pass
    assert req.completed
    (message,) = _slow_warnings(caplog, "Sleepy")
    assert f"Sleepy.request_start of request {req.id} has been running for" in message
    assert telemetry.counter("audit.slow_calls").value >= 1


def test_a_call_waiting_for_a_worker_thread_says_so(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "SLOW_CALL_SECONDS", 0.2)
    audit.set_worker_threads(1)
    release = threading.Event()

    class Waiting(SyncRecorder):
        pass

    try:
        with caplog.at_level(logging.WARNING, logger="instrumentation.audit"):
            with audit.request(question="slow", handlers=[Held(release)], timeout=0):
                pass
            with audit.request(question="queued", handlers=[Waiting()], timeout=0.5):
                pass
    finally:
        release.set()
    waiting = _slow_warnings(caplog, "Waiting")
    assert len(waiting) == 1 and "Waiting.request_start" in waiting[0]
    assert "for a worker thread: all 1 are busy" in waiting[0]
    assert "audit.set_worker_threads()" in waiting[0]


def test_an_async_handler_blocking_the_loop_is_logged_when_it_ends(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "SLOW_CALL_SECONDS", 0.2)

    class Blocking(SyncRecorder):
        async def request_start(self, user_request: Any) -> Any:  # type: ignore[override]
            time.sleep(0.6)  # blocks the audit loop: the timer cannot fire
            return super().request_start(user_request)

    with (
        caplog.at_level(logging.WARNING, logger="instrumentation.audit"),
        audit.request(question="q", handlers=[Blocking()]) as req,
    ):
        pass
    assert req.completed
    (message,) = _slow_warnings(caplog, "Blocking")
    assert "Blocking.request_start" in message and re.search(r"took \d", message)
    assert "the audit loop was blocked meanwhile" in message
    assert "asyncio.to_thread()" in message


def test_fast_calls_are_not_logged_and_the_threshold_can_be_off(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Sleepy(SyncRecorder):
        def request_end(self, output: Any, request_context: Any) -> None:
            time.sleep(0.3)
            super().request_end(output, request_context)

    with caplog.at_level(logging.WARNING, logger="instrumentation.audit"):
        with audit.request(question="fast", handlers=[SyncRecorder()]):
            pass
        monkeypatch.setattr(runner, "SLOW_CALL_SECONDS", 0)
        with audit.request(question="slow, not watched", handlers=[Sleepy()]):
            pass
    assert _slow_warnings(caplog, "SyncRecorder") == []
    assert _slow_warnings(caplog, "Sleepy") == []


def test_requests_beyond_those_waiting_for_slow_handlers_are_dropped_and_counted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Handlers slower than the application (timeout=0) left every request waiting in
    memory, without limit (50,000 requests and 583 MB in 20 s in a soak). Beyond
    MAX_PENDING_REQUESTS a request is not audited: dropped, counted and logged once."""
    monkeypatch.setattr(runner, "MAX_PENDING_REQUESTS", 3)
    monkeypatch.setattr(runner, "_dropped_logged_at", [float("-inf")])
    release = threading.Event()

    class Stuck(SyncRecorder):
        def request_start(self, user_request: audit.RequestStart) -> Any:
            release.wait(30)
            return super().request_start(user_request)

    handler = Stuck()
    requests = []
    with caplog.at_level(logging.WARNING, logger="instrumentation.audit"):
        for i in range(5):
            with audit.request(question=f"q{i}", handlers=[handler], timeout=0) as req:
                req.result = i
            requests.append(req)
    assert [r.dropped for r in requests] == [False, False, False, True, True]
    assert [r.completed for r in requests] == [False] * 5
    assert telemetry.counter("audit.requests_dropped").value == 2
    warnings = [r.getMessage() for r in caplog.records if "not audited" in r.getMessage()]
    assert len(warnings) == 1 and requests[3].id in warnings[0]
    release.set()
    assert all(r._run is not None and r._run.wait(10) for r in requests[:3])
    handler.rec.check(expected_requests=3, events_per_request=0)
    with audit.request(question="after", handlers=[handler]) as req:  # room again
        req.result = "ok"
    assert req.completed is True and not req.dropped


def test_requests_that_are_open_do_not_count_against_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Long requests open at once (chat sessions, streams) whose handlers keep up are
    not waiting for anything: a new request beside them is audited."""
    monkeypatch.setattr(runner, "MAX_PENDING_REQUESTS", 3)
    handler = SyncRecorder()
    opened = [audit.request(question=f"open {i}", handlers=[handler]) for i in range(4)]
    for req in opened:
        req.__enter__()
    try:
        with audit.request(question="beside them", handlers=[handler]) as req:
            req.result = "ok"
        assert req.completed is True and not req.dropped
    finally:
        for req in reversed(opened):
            req.__exit__(None, None, None)
    assert not any(req.dropped for req in opened)
    assert telemetry.counter("audit.requests_dropped").value == 0
