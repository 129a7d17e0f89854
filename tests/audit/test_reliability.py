"""A failing handler is logged and counted and breaks nothing else."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any

import pytest
from forking import in_child

from instrumentation import audit, telemetry
from instrumentation.audit import Event, RequestEnd, RequestStart
from instrumentation.llms import ChatMessage, OfflineLLM

from .helpers import AsyncRecorder, SyncRecorder

METHODS = ["request_start", "event_start", "event_end", "request_end"]


def _failing(base: type, method: str, error: type[BaseException] = ZeroDivisionError) -> Any:
    class Failing(base):  # type: ignore[valid-type, misc]
        def __init__(self) -> None:
            super().__init__()
            self.got: list[tuple[str, Any]] = []

    if base is AsyncRecorder:

        async def broken(self: Any, *args: Any) -> Any:
            self.got.append((method, args[1:]))
            raise error(f"bug in {method}")

    else:

        def broken(self: Any, *args: Any) -> Any:
            self.got.append((method, args[1:]))
            raise error(f"bug in {method}")

    setattr(Failing, method, broken)

    def recording(name: str) -> Any:
        original = getattr(base, name)

        def call(self: Any, *args: Any) -> Any:
            self.got.append((name, args[1:]))
            return original(self, *args)

        async def acall(self: Any, *args: Any) -> Any:
            self.got.append((name, args[1:]))
            return await original(self, *args)

        return acall if base is AsyncRecorder else call

    for other in METHODS:
        if other != method:
            setattr(Failing, other, recording(other))
    return Failing()


@pytest.mark.parametrize("error", [ZeroDivisionError, SystemExit, KeyboardInterrupt])
@pytest.mark.parametrize("base", [SyncRecorder, AsyncRecorder])
@pytest.mark.parametrize("method", METHODS)
def test_failing_method_breaks_nothing(
    base: type, method: str, error: type[BaseException], caplog: pytest.LogCaptureFixture
) -> None:
    broken = _failing(base, method, error)
    healthy = SyncRecorder()
    llm = OfflineLLM()
    with (
        caplog.at_level(logging.ERROR, logger="instrumentation.audit"),
        audit.request(question="q", handlers=[broken, healthy], timeout=5) as req,
    ):
        req.result = llm.chat([ChatMessage(role="user", content="q")]).message.content
    assert req.result == "Echo: q"
    assert req.completed is True
    healthy.rec.check(expected_requests=1, events_per_request=1)
    assert [m for m, _ in broken.got] == METHODS  # every later call still happened
    assert [(e.method, type(e.error)) for e in req.errors] == [(method, error)]
    assert telemetry.counter("audit.handler_errors").value == 1
    assert any(method in r.getMessage() and "Failing" in r.getMessage() for r in caplog.records)
    got = dict(broken.got)
    if method == "request_start":  # its context could not be made: None from then on
        assert got["event_start"][0] is None
        assert got["event_end"][0] is None and got["request_end"][-1] is None
    if method == "event_start":
        assert got["event_end"][-1] is None
        assert got["event_end"][0] is not None


WHAT_FOLLOWS = {
    "request_start": "its later calls of this request get None as request_context",
    "event_start": "its event_end of this event gets None as event_context",
    "event_end": "its later calls of this request run as usual",
    "request_end": "it was its last call of this request",
}


@pytest.mark.parametrize("method", METHODS)
def test_the_log_says_what_a_failure_means_for_that_method(
    method: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every failure was logged with 'its later calls get None for the context it could
    not make', though event_end and request_end make no context."""
    broken = _failing(SyncRecorder, method)
    with (
        caplog.at_level(logging.ERROR, logger="instrumentation.audit"),
        audit.request(question="q", handlers=[broken], timeout=5) as req,
        audit.event(audit.ToolCallEvent(name="t")),
    ):
        pass
    assert req.completed is True
    (message,) = [r.getMessage() for r in caplog.records if "Failing" in r.getMessage()]
    assert f"failed in {method}" in message
    assert WHAT_FOLLOWS[method] in message, message
    if method in ("event_end", "request_end"):
        assert "None" not in message, message


def test_a_handler_error_says_which_request_it_was_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A handler serves many requests (an adapter gathers the errors of all of them):
    the error it left, and its log line, named no request."""
    broken = _failing(SyncRecorder, "event_end")
    requests = []
    with caplog.at_level(logging.ERROR, logger="instrumentation.audit"):
        for _ in range(2):
            with (
                audit.request(question="q", handlers=[broken], timeout=5) as req,
                audit.event(audit.ToolCallEvent(name="t")),
            ):
                requests.append(req)
    first, second = requests
    assert [e.request_id for e in first.errors + second.errors] == [
        first.id,
        second.id,
    ]
    (message,) = [r.getMessage() for r in caplog.records if "Failing" in r.getMessage()]
    assert f"failed in event_end of request {first.id}:" in message


def test_raising_base_exception_subclass_cancelled_is_survived() -> None:
    class Cancels(AsyncRecorder):
        async def event_start(self, event: Event, request_context: Any) -> Any:
            raise asyncio.CancelledError()

    handler = Cancels()
    with (
        audit.request(question="q", handlers=[handler], timeout=5) as req,
        audit.event(audit.ToolCallEvent(name="t")),
    ):
        pass
    assert req.completed is True
    assert len(handler.rec.request_ends) == 1
    assert handler.rec.event_ends[0][1] is None


def test_slow_sync_handler_does_not_block_the_caller_beyond_timeout() -> None:
    release = threading.Event()

    class Slow(SyncRecorder):
        def event_start(self, event: Event, request_context: Any) -> Any:
            release.wait(5)
            return super().event_start(event, request_context)

    llm = OfflineLLM()
    began = time.monotonic()
    with audit.request(question="q", handlers=[Slow()], timeout=0.1) as req:
        for _ in range(5):  # events are queued, the caller never waits for them
            llm.chat([ChatMessage(role="user", content="q")])
        inside = time.monotonic() - began
    total = time.monotonic() - began
    release.set()
    # Bounds with room for a loaded machine: waiting for the handler would take 5 s an
    # event (25 s in all).
    assert inside < 3  # the events did not wait for the stuck handler
    assert 0.09 < total < 3.1 and req.completed is False  # the exit waited its 0.1 s


def test_sync_app_slow_async_handler_per_event_is_not_waited_for() -> None:
    release = threading.Event()
    give_up_at = time.monotonic() + 5  # should the application wait for them after all

    class Slow(AsyncRecorder):
        async def event_end(self, event: Event | None, request_context: Any, ctx: Any) -> None:
            while not release.is_set() and time.monotonic() < give_up_at:
                await asyncio.sleep(0.01)  # held until the application's block is over
            self.rec.event_end(event, request_context, ctx)

    handler = Slow()
    llm = OfflineLLM()
    with audit.request(question="q", handlers=[handler], timeout=10):
        for _ in range(10):
            llm.chat([ChatMessage(role="user", content="q")])
        # Ten event_end calls held in the handler, and the application went on past them.
        assert handler.rec.event_ends == []
        release.set()
    handler.rec.check(expected_requests=1, events_per_request=10)  # but all ran by the exit


def test_handler_that_starts_a_request_is_not_audited_and_does_not_deadlock() -> None:
    inner = SyncRecorder()

    class Nested(SyncRecorder):
        def request_start(self, user_request: RequestStart) -> Any:
            with audit.request(question="from a handler", handlers=[inner]):
                pass
            return super().request_start(user_request)

    handler = Nested()
    with audit.request(question="q", handlers=[handler], timeout=5) as req:
        pass
    assert req.completed is True
    assert inner.rec.calls == []  # handlers run with instrumentation suppressed


def test_events_after_the_request_ended_are_dropped() -> None:
    handler = SyncRecorder()
    with audit.request(question="q", handlers=[handler]) as req:
        pass
    run = req._run
    assert run is not None
    assert run.begin_event("late", audit.ToolCallEvent(name="late")) is False
    with pytest.raises(RuntimeError, match="ended already"):
        run.finish()


def test_unfinished_event_is_ended_with_the_request() -> None:
    handler = SyncRecorder()
    with audit.request(question="q", handlers=[handler]) as req:
        assert req._run is not None
        req._run.begin_event("never-ends", audit.ToolCallEvent(name="t"))
    (_, ctx, event) = handler.rec.event_ends[0]
    assert ctx is handler.rec.returned_events[0]
    assert "ended before" in event.error


def test_request_end_error_does_not_hide_the_application_error() -> None:
    class Bad(SyncRecorder):
        def request_end(self, output: RequestEnd, request_context: Any) -> None:
            raise OSError("disk full")

    with pytest.raises(KeyError), audit.request(question="q", handlers=[Bad()]):
        raise KeyError("app")
    assert telemetry.counter("audit.handler_errors").value == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.timeout(60)
def test_a_request_open_at_fork_ends_at_once_in_the_child() -> None:
    """Its handler calls run on the parent's audit loop, which the child has not: the
    child used to wait the whole timeout when it left the block."""
    handler = SyncRecorder()
    block = audit.request(question="q", handlers=[handler], timeout=30)

    def leave_in_child() -> dict[str, Any]:
        began = time.monotonic()
        block.__exit__(None, None, None)
        return {
            "completed": block.completed,
            "seconds": time.monotonic() - began,
            "lost": telemetry.counter("audit.requests_lost_in_fork").value,
        }

    with block:
        child = in_child(leave_in_child)
    assert child["completed"] is False and child["lost"] == 1
    assert child["seconds"] < 5  # not the 30 s timeout
    # The parent's request is its own, untouched by the child.
    assert block.completed is True and len(handler.rec.request_ends) == 1


def test_a_rate_limited_error_log_says_how_many_errors_it_held_back(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(telemetry, "LOG_INTERVAL_SECONDS", 1.0)

    class FailsOften(SyncRecorder):
        def request_start(self, user_request: RequestStart) -> Any:
            raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="instrumentation.audit"):
        for _ in range(5):  # one line, four held back
            with audit.request(question="q", handlers=[FailsOften()]):
                pass
        time.sleep(1.05)
        with audit.request(question="q", handlers=[FailsOften()]):
            pass
    lines = [r.getMessage() for r in caplog.records if "FailsOften" in r.getMessage()]
    assert len(lines) == 2
    assert "more errors" not in lines[0]
    assert lines[1].endswith("(4 more errors from it in request_start in the last interval)")
    assert telemetry.counter("audit.handler_errors").value == 6
