"""What one long request may keep waiting for its handlers is bounded.

``MAX_PENDING_REQUESTS`` counts ended requests only: a request open for hours (an
agent's loop making LLM calls) queued every event for a handler slower than it, and
kept every error of a handler failing on each, without limit.
"""

from __future__ import annotations

import logging
import threading

import pytest

from instrumentation import audit, telemetry
from instrumentation.audit import Event, RequestStart, runner
from instrumentation.llms import ChatMessage, OfflineLLM

from .helpers import EvCtx, ReqCtx, SyncRecorder


class Gated(SyncRecorder):
    """Held in ``request_start`` until the gate opens: every later call waits."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.gate = threading.Event()

    def request_start(self, user_request: RequestStart) -> ReqCtx:
        self.entered.set()
        assert self.gate.wait(10)
        return super().request_start(user_request)


def _ask(llm: OfflineLLM, question: str) -> None:
    llm.chat([ChatMessage(role="user", content=question)])


def test_a_handler_far_behind_is_handed_whole_events_then_its_request_end(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(runner, "MAX_QUEUED_CALLS", 5)
    handler = Gated()
    llm = OfflineLLM()
    with (
        caplog.at_level(logging.WARNING, logger="instrumentation.audit"),
        audit.request(question="agent loop", handlers=[handler]) as req,
    ):
        assert handler.entered.wait(10)  # request_start runs: no longer queued
        for step in range(20):
            _ask(llm, f"agent loop step {step}")
        handler.gate.set()
    assert req.completed is True
    # Waiting behind request_start: start 1, end 1, start 2, end 2, start 3 (5 calls);
    # the end of event 3 is owed (its start was queued). Events 4 to 20 are dropped,
    # start and end alike: the handler never sees an end without its start.
    calls = handler.rec.calls
    assert calls == ["request_start", *["event_start", "event_end"] * 3, "request_end"]
    handler.rec.check(expected_requests=1, events_per_request=3)
    assert req.calls_dropped == 2 * 17
    assert telemetry.counter("audit.calls_dropped").value == 2 * 17
    warnings = [r for r in caplog.records if "MAX_QUEUED_CALLS" in r.getMessage()]
    assert len(warnings) == 1  # once per interval, not once per dropped call
    assert req.id in warnings[0].getMessage()


def test_the_end_of_an_event_cut_short_follows_its_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The request's end closes its open events: one the handler was given ends for it,
    one it was not given does not."""
    monkeypatch.setattr(runner, "MAX_QUEUED_CALLS", 1)
    handler = Gated()
    with audit.request(question="tools", handlers=[handler]) as req:
        assert handler.entered.wait(10)
        first = audit.event(audit.ToolCallEvent(name="kept")).__enter__()
        second = audit.event(audit.ToolCallEvent(name="dropped")).__enter__()
        handler.gate.set()
        assert first and second  # left open: the request's end ends them
    assert req.completed is True
    assert handler.rec.calls == ["request_start", "event_start", "event_end", "request_end"]
    ((_, event_ctx, event),) = handler.rec.event_ends
    assert isinstance(event_ctx, EvCtx)
    assert isinstance(event, audit.ToolCallEvent) and event.name == "kept"
    assert event.error == runner.UNFINISHED
    assert req.calls_dropped == 2


class FailsOnEachEnd(SyncRecorder):
    def event_end(self, event: Event | None, request_context: ReqCtx, event_context: EvCtx) -> None:
        raise RuntimeError("log service said 500")


def test_a_request_keeps_its_first_errors_and_counts_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runner, "MAX_KEPT_ERRORS", 3)
    llm = OfflineLLM()
    with audit.request(question="many steps", handlers=[FailsOnEachEnd()]) as req:
        for step in range(10):
            _ask(llm, f"many steps {step}")
    assert req.completed is True
    assert [(e.method, str(e.error)) for e in req.errors] == [
        ("event_end", "log service said 500")
    ] * 3
    assert req.errors_omitted == 7
    assert telemetry.counter("audit.handler_errors").value == 10  # all counted still


class BlocksTheLoop(SyncRecorder):
    """An ``async def`` request_start that blocks (a blocking call where it should
    await): the audit loop's thread, every async handler's, waits with it."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.gate = threading.Event()

    async def request_start(self, user_request: RequestStart) -> ReqCtx:  # type: ignore[override]
        self.entered.set()
        assert self.gate.wait(10)
        return super().request_start(user_request)


def test_what_waits_for_a_blocked_audit_loop_is_bounded_too(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The calls posted to the audit loop wait there until it takes them: a loop that a
    handler blocks takes none, and every event of a long request piled up there, past
    MAX_QUEUED_CALLS (which bounds the handlers' queues, filled by the loop)."""
    monkeypatch.setattr(runner, "MAX_POSTED_EVENTS", 5)
    handler = BlocksTheLoop()
    with (
        caplog.at_level(logging.WARNING, logger="instrumentation.audit"),
        audit.request(question="agent loop", handlers=[handler]) as req,
    ):
        try:
            assert handler.entered.wait(10)  # the loop is blocked from here
            worker = req._run._worker  # type: ignore[union-attr]
            assert worker is not None
            for step in range(200):
                with audit.event(audit.ToolCallEvent(name=f"step {step}")):
                    pass
            waiting = len(worker.posted)
        finally:
            handler.gate.set()
    assert waiting <= 2 * 5, f"{waiting} calls waited for the blocked loop"
    assert req.completed is True
    # Each handler was handed whole events (never an end without its start), and told
    # in its request_end how many of the request's events it was not handed.
    handler.rec.check(expected_requests=1, events_per_request=5)
    ((end, _),) = handler.rec.request_ends
    assert end.events_dropped == 200 - 5
    assert req.calls_dropped == 2 * (200 - 5)
    warnings = [r.getMessage() for r in caplog.records if "blocking it" in r.getMessage()]
    assert len(warnings) == 1 and req.id in warnings[0]


def test_a_handler_is_told_of_the_events_it_was_not_handed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each handler's request_end says how many of the request's events it missed: a
    record written from its calls alone looked complete."""
    monkeypatch.setattr(runner, "MAX_QUEUED_CALLS", 5)
    behind, fast = Gated(), SyncRecorder()
    with audit.request(question="agent loop", handlers=[behind, fast]) as req:
        assert behind.entered.wait(10)
        for step in range(20):
            _ask(OfflineLLM(), f"agent loop step {step}")
        behind.gate.set()
    assert req.completed is True
    ((behind_end, _),) = behind.rec.request_ends
    ((fast_end, _),) = fast.rec.request_ends
    assert behind_end.events_dropped == 17
    # The other handler was handed what it could take, and is told of the rest (none,
    # unless it too fell this far behind the burst).
    assert fast_end.events_dropped == 20 - len(fast.rec.returned_events)
    assert req.calls_dropped == 2 * (behind_end.events_dropped + fast_end.events_dropped)
