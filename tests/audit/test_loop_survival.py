"""Nothing a handler raises or does stops the audit loop for later requests.

SystemExit and KeyboardInterrupt raised by a handler are handler errors like any
other (reported on the request, logged, counted); what reaches the loop around the
runner is survived; and a loop thread that ends anyway is replaced, its requests told
at once instead of waiting out their timeout.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest

from instrumentation import audit, telemetry
from instrumentation.audit import Event, RequestEnd, RequestStart, _loop, runner
from instrumentation.audit._loop import audit_loop

from .helpers import AsyncRecorder, ReqCtx, SyncRecorder

FAST = 2.0  # well under the 5 s timeout the requests below are given


def _raising(error: type[BaseException], style: str) -> Any:
    if style == "async":

        class AsyncRaises(AsyncRecorder):
            async def request_start(self, user_request: RequestStart) -> ReqCtx:
                raise error("from a handler")

        return AsyncRaises()

    class SyncRaises(SyncRecorder):
        def request_start(self, user_request: RequestStart) -> ReqCtx:
            raise error("from a handler")

    return SyncRaises()


def _healthy_request(question: str = "later") -> tuple[audit.AuditRequest, SyncRecorder, float]:
    handler = SyncRecorder()
    began = time.monotonic()
    with (
        audit.request(question=question, handlers=[handler], timeout=5) as req,
        audit.event(audit.ToolCallEvent(name="t")),
    ):
        pass
    return req, handler, time.monotonic() - began


@pytest.mark.parametrize("error", [SystemExit, KeyboardInterrupt])
@pytest.mark.parametrize("style", ["sync", "async"])
@pytest.mark.parametrize("app", ["sync", "async"])
def test_systemexit_or_keyboardinterrupt_in_a_handler_is_a_handler_error(
    error: type[BaseException], style: str, app: str, caplog: pytest.LogCaptureFixture
) -> None:
    broken = _raising(error, style)
    healthy = SyncRecorder()

    async def in_async_app() -> audit.AuditRequest:
        async with audit.request(question="q", handlers=[broken, healthy], timeout=5) as req:
            req.result = "ok"
        return req

    began = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="instrumentation.audit"):
        if app == "async":
            req = asyncio.run(in_async_app())
        else:
            with audit.request(question="q", handlers=[broken, healthy], timeout=5) as req:
                req.result = "ok"
    assert time.monotonic() - began < FAST
    assert req.completed is True
    assert [(e.method, type(e.error)) for e in req.errors] == [("request_start", error)]
    assert telemetry.counter("audit.handler_errors").value == 1
    assert any(
        "request_start" in r.getMessage() and error.__name__ in r.getMessage()
        for r in caplog.records
    )
    assert broken.rec.calls == ["request_end"]  # its later calls still ran
    assert healthy.rec.calls == ["request_start", "request_end"]

    # The loop is still there: later requests run all their calls, without waiting.
    for n in range(3):
        later, handler, took = _healthy_request(f"later {n}")
        assert later.completed is True and took < FAST
        handler.rec.check(expected_requests=1, events_per_request=1)
    assert telemetry.counter("audit.timeouts").value == 0
    assert telemetry.counter("audit.loop_restarts").value == 0


async def _keyboard_interrupt() -> None:
    raise KeyboardInterrupt("from a task a handler started")


def test_keyboardinterrupt_from_a_task_a_handler_awaits_is_reported_on_the_request() -> None:
    class AwaitsTask(AsyncRecorder):
        async def request_start(self, user_request: RequestStart) -> ReqCtx:
            # Its own task, which asyncio lets re-raise out of the loop. (Not wait_for on
            # the coroutine: from 3.12 on, that runs it in this handler's task instead.)
            task = asyncio.get_running_loop().create_task(_keyboard_interrupt())
            await asyncio.wait_for(task, 5)
            raise AssertionError("not reached")

    handler = AwaitsTask()
    with audit.request(question="q", handlers=[handler], timeout=5) as req:
        pass
    assert req.completed is True
    assert [(e.method, type(e.error)) for e in req.errors] == [("request_start", KeyboardInterrupt)]
    assert telemetry.counter("audit.loop_errors").value == 1  # it reached the loop too
    later, _, took = _healthy_request()
    assert later.completed is True and took < FAST


def test_keyboardinterrupt_from_a_task_nobody_awaits_is_logged_and_survived(
    caplog: pytest.LogCaptureFixture,
) -> None:
    spawned: list[asyncio.Task[None]] = []

    class SpawnsTask(AsyncRecorder):
        async def event_start(self, event: Event, request_context: ReqCtx) -> Any:
            spawned.append(asyncio.get_running_loop().create_task(_keyboard_interrupt()))
            return await super().event_start(event, request_context)

    handler = SpawnsTask()
    with (
        caplog.at_level(logging.ERROR, logger="instrumentation.audit"),
        audit.request(question="q", handlers=[handler], timeout=5) as req,
        audit.event(audit.ToolCallEvent(name="t")),
    ):
        pass
    assert req.completed is True
    handler.rec.check(expected_requests=1, events_per_request=1)
    assert telemetry.counter("audit.loop_errors").value == 1
    assert any("KeyboardInterrupt" in r.getMessage() for r in caplog.records)
    # Retrieved, so asyncio does not log it again whenever the task is collected.
    assert spawned[0].done() and isinstance(spawned[0].exception(), KeyboardInterrupt)
    later, _, took = _healthy_request()
    assert later.completed is True and took < FAST


def test_a_handler_stopping_the_loop_does_not_stop_it() -> None:
    class Stops(AsyncRecorder):
        async def request_start(self, user_request: RequestStart) -> ReqCtx:
            asyncio.get_running_loop().stop()
            return await super().request_start(user_request)

    handler = Stops()
    with (
        audit.request(question="q", handlers=[handler], timeout=5) as req,
        audit.event(audit.ToolCallEvent(name="t")),
    ):
        pass
    assert req.completed is True
    handler.rec.check(expected_requests=1, events_per_request=1)
    assert telemetry.counter("audit.loop_errors").value == 1
    later, _, took = _healthy_request()
    assert later.completed is True and took < FAST


def test_generator_exit_from_a_handler_is_reported_and_its_later_calls_run() -> None:
    class RaisesGeneratorExit(AsyncRecorder):
        async def event_start(self, event: Event, request_context: ReqCtx) -> Any:
            raise GeneratorExit()

    handler = RaisesGeneratorExit()
    with audit.request(question="q", handlers=[handler], timeout=5) as req:
        with audit.event(audit.ToolCallEvent(name="a")):
            pass
        with audit.event(audit.ToolCallEvent(name="b")):
            pass
    assert req.completed is True
    assert [(e.method, type(e.error)) for e in req.errors] == [
        ("event_start", GeneratorExit),
        ("event_start", GeneratorExit),
    ]
    assert handler.rec.calls == ["request_start", "event_end", "event_end", "request_end"]


@pytest.mark.parametrize("when", ["inside the request", "while its exit waits"])
def test_a_loop_thread_that_ends_is_replaced_and_its_requests_end_at_once(
    when: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Fault injection: a defect in the loop's own error path lets an error end its thread.
    def defect(error: BaseException | None, what: str) -> None:
        raise RuntimeError("a defect in the audit loop itself")

    monkeypatch.setattr(_loop, "report_loop_error", defect)
    loop_threads: list[threading.Thread] = []
    stopped = threading.Event()

    class Stops(AsyncRecorder):
        def _stop(self) -> None:
            loop_threads.append(threading.current_thread())
            asyncio.get_running_loop().stop()
            stopped.set()

        async def request_start(self, user_request: RequestStart) -> ReqCtx:
            if when == "inside the request":
                self._stop()
            return await super().request_start(user_request)

        async def request_end(self, output: RequestEnd, request_context: ReqCtx) -> None:
            if when == "while its exit waits":
                self._stop()
            await super().request_end(output, request_context)

    class SlowEnd(SyncRecorder):  # still busy when the loop goes
        def request_end(self, output: RequestEnd, request_context: ReqCtx) -> None:
            stopped.wait(5)
            super().request_end(output, request_context)

    began = time.monotonic()
    with (
        caplog.at_level(logging.ERROR, logger="instrumentation.audit"),
        audit.request(question="q", handlers=[Stops(), SlowEnd()], timeout=5) as req,
    ):
        if when == "inside the request":
            deadline = time.monotonic() + 5
            while not loop_threads and time.monotonic() < deadline:
                time.sleep(0.01)
            loop_threads[0].join(5)
            assert not loop_threads[0].is_alive()
    assert req.completed is False
    assert time.monotonic() - began < FAST  # told at once, not after the 5 s timeout
    assert stopped.is_set()
    loop_threads[0].join(5)
    assert not loop_threads[0].is_alive()
    assert telemetry.counter("audit.loop_restarts").value == 1
    assert any("thread ended" in r.getMessage() for r in caplog.records)

    later, handler, took = _healthy_request()
    assert later.completed is True and took < FAST
    handler.rec.check(expected_requests=1, events_per_request=1)
    assert audit_loop._thread is not None and audit_loop._thread.is_alive()
    assert audit_loop._thread is not loop_threads[0]
    assert telemetry.counter("audit.timeouts").value == 0


def _loop_dies_in_request_end(
    loop_threads: list[threading.Thread], other_is_ready: asyncio.Event
) -> AsyncRecorder:
    """A handler whose request_end stops the loop, once the other handler has set
    ``other_is_ready`` (just before it waits: it is suspended when the loop stops).

    Should the other handler never get there, this request_end fails (a handler error)
    and the loop goes on: the test then finds no loop thread ended.
    """

    class StopsLater(AsyncRecorder):
        async def request_end(self, output: RequestEnd, request_context: ReqCtx) -> None:
            await asyncio.wait_for(other_is_ready.wait(), 5)
            loop_threads.append(threading.current_thread())
            asyncio.get_running_loop().stop()
            await super().request_end(output, request_context)

    return StopsLater()


def _request_losing_its_loop(
    handler: AsyncRecorder,
    other_is_ready: asyncio.Event,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> tuple[float, float]:
    """One request with ``handler`` whose audit loop's thread ends in request_end (see
    :func:`_loop_dies_in_request_end`), a defect in the loop itself making sure it does
    end; checks the request ends not completed and the dying thread ends in its time.
    Returns when the request began and how long it took to end (``time.monotonic()``).
    """

    def defect(error: BaseException | None, what: str) -> None:
        raise RuntimeError("a defect in the audit loop itself")

    monkeypatch.setattr(_loop, "report_loop_error", defect)
    monkeypatch.setattr(_loop, "DISPOSE_SECONDS", 0.2)
    loop_threads: list[threading.Thread] = []
    began = time.monotonic()
    with (
        caplog.at_level(logging.ERROR, logger="instrumentation.audit"),
        audit.request(
            question="q",
            handlers=[handler, _loop_dies_in_request_end(loop_threads, other_is_ready)],
            timeout=5,
        ) as req,
    ):
        pass
    took = time.monotonic() - began
    assert req.completed is False
    loop_threads[0].join(5)
    assert not loop_threads[0].is_alive()  # the dying thread gave up in its time
    return began, took


@pytest.mark.parametrize("after_swallowing", ["waits again", "waits on something else"])
def test_a_handler_ignoring_cancellation_is_closed_when_its_loop_is_lost(
    after_swallowing: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The loop's thread ends while an async handler swallows every CancelledError: the
    request ends at once, and its call is closed (its finally blocks run), counted and
    logged, instead of staying pending forever on the closed loop."""

    calls: list[asyncio.Task[Any]] = []
    cleaned_up = threading.Event()
    waiting = asyncio.Event()

    class IgnoresCancellation(AsyncRecorder):
        async def request_end(self, output: RequestEnd, request_context: ReqCtx) -> None:
            task = asyncio.current_task()
            assert task is not None
            calls.append(task)
            waiting.set()  # suspended below before the other handler resumes
            try:
                while True:
                    try:
                        await asyncio.sleep(3600)
                    except asyncio.CancelledError:
                        if after_swallowing == "waits on something else":
                            await asyncio.Event().wait()
            finally:
                cleaned_up.set()

    _, took = _request_losing_its_loop(IgnoresCancellation(), waiting, monkeypatch, caplog)
    assert took < FAST
    assert cleaned_up.is_set()  # was never: the call stayed suspended
    assert calls[0].done()  # was pending forever, on a closed loop
    assert calls[0] not in runner._tasks  # nothing keeps it
    assert telemetry.counter("audit.calls_abandoned").value == 1
    assert telemetry.counter("audit.loop_restarts").value == 1
    assert any(
        "IgnoresCancellation" in r.getMessage() and "ignored its cancellation" in r.getMessage()
        for r in caplog.records
    ), caplog.messages

    later, handler, took = _healthy_request()
    assert later.completed is True and took < FAST
    handler.rec.check(expected_requests=1, events_per_request=1)


# Python itself reports the handler's coroutine ignoring GeneratorExit when it is collected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_handler_ignoring_even_generator_exit_does_not_hold_up_the_dying_loop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Even a handler that swallows GeneratorExit and awaits again neither keeps the dying
    thread (closing it outside a running loop would spin forever) nor stays pending."""

    release = threading.Event()
    waiting = asyncio.Event()

    class IgnoresEverything(AsyncRecorder):
        async def request_end(self, output: RequestEnd, request_context: ReqCtx) -> None:
            waiting.set()  # suspended below before the other handler resumes
            while not release.is_set():
                try:
                    await asyncio.sleep(3600)
                except BaseException:  # the point of the test: it swallows everything
                    pass

    _request_losing_its_loop(IgnoresEverything(), waiting, monkeypatch, caplog)
    assert telemetry.counter("audit.calls_abandoned").value == 1
    assert any(
        "IgnoresEverything" in r.getMessage() and "ignored GeneratorExit too" in r.getMessage()
        for r in caplog.records
    ), caplog.messages
    assert not [t for t in runner._tasks if "IgnoresEverything" in t.get_name()]
    release.set()
    later, _, took = _healthy_request()
    assert later.completed is True and took < FAST


@pytest.mark.parametrize("finally_block", ["quick", "awaits too long"])
def test_async_generators_a_handler_left_suspended_are_closed_with_its_loop(
    finally_block: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The dying loop was closed without loop.shutdown_asyncgens(): an async generator
    a handler kept, suspended at a yield, never ran its finally block. Now it does, and
    one whose finally awaits too long is cut short in bounded time."""

    finally_ran = threading.Event()
    kept: list[Any] = []
    suspended = asyncio.Event()

    async def rows() -> Any:
        try:
            yield 1
            yield 2
        finally:
            finally_ran.set()
            if finally_block == "awaits too long":
                await asyncio.sleep(3600)

    class KeepsAGenerator(AsyncRecorder):
        async def request_start(self, user_request: RequestStart) -> ReqCtx:
            generator = rows()
            kept.append(generator)  # the handler holds it: never garbage-collected
            assert await generator.__anext__() == 1
            suspended.set()  # the generator waits at its first yield
            return await super().request_start(user_request)

    # The dying thread ends in bounded time, even with a finally awaiting an hour.
    began, _ = _request_losing_its_loop(KeepsAGenerator(), suspended, monkeypatch, caplog)
    assert time.monotonic() - began < FAST
    assert finally_ran.is_set()  # was never: the generator stayed suspended at its yield
    cut_short = any("were still closing" in m for m in caplog.messages)
    assert cut_short is (finally_block == "awaits too long")
    later, _, took = _healthy_request()
    assert later.completed is True and took < FAST
