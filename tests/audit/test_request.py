from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from instrumentation import audit, get_dispatcher, telemetry
from instrumentation.audit import Event, RequestEnd, RequestStart, ToolCallEvent
from instrumentation.llms import ChatMessage, OfflineLLM

from .helpers import AsyncRecorder, EvCtx, ReqCtx, SyncRecorder


def _ask(llm: OfflineLLM, question: str) -> str:
    return str(llm.chat([ChatMessage(role="user", content=question)]).message.content)


@pytest.mark.parametrize("handler_type", [SyncRecorder, AsyncRecorder])
def test_sync_app_calls_every_method_in_order(handler_type: type) -> None:
    handler = handler_type()
    llm = OfflineLLM(answers={"soup": "tomato"})
    with audit.request(question="which soup?", collection="recipes", handlers=[handler]) as req:
        req.result = _ask(llm, "which soup?")
    # The block has exited: every call of the request has run.
    assert req.completed is True
    assert handler.rec.calls == ["request_start", "event_start", "event_end", "request_end"]
    handler.rec.check(expected_requests=1, events_per_request=1)
    output, _ = handler.rec.request_ends[0]
    assert output.result == "tomato" and output.error is None
    assert output.request_id == req.id
    (_, _, event) = handler.rec.event_ends[0]
    assert event.response == "tomato" and event.type == "chat"
    assert event.total_tokens == event.prompt_tokens + event.completion_tokens > 0


@pytest.mark.parametrize("handler_type", [SyncRecorder, AsyncRecorder])
async def test_async_app_with_sync_and_async_handlers(handler_type: type) -> None:
    handler = handler_type()
    llm = OfflineLLM(answers={"soup": "leek"})
    async with audit.request(question="soup?", collection="recipes", handlers=[handler]) as req:
        reply = await llm.achat([ChatMessage(role="user", content="soup?")])
        req.result = reply.message.content
        await llm.acomplete("soup? again")
    assert req.completed is True
    assert handler.rec.calls == ["request_start"] + ["event_start", "event_end"] * 2 + [
        "request_end"
    ]
    handler.rec.check(expected_requests=1, events_per_request=2)
    types = [event.type for _, _, event in handler.rec.event_ends]
    assert types == ["chat", "completion"]


def test_request_start_carries_question_collection_metadata() -> None:
    handler = SyncRecorder()
    seen: list[RequestStart] = []
    original = handler.request_start

    def spy(user_request: RequestStart) -> object:
        seen.append(user_request)
        return original(user_request)

    handler.request_start = spy  # type: ignore[method-assign]
    with audit.request(
        question="q", collection="c", handlers=[handler], metadata={"user": "ann"}
    ) as req:
        req.result = 1
    assert seen[0].question == "q" and seen[0].collection == "c"
    assert seen[0].metadata == {"user": "ann"}
    assert seen[0].request_id == req.id


@pytest.mark.parametrize("handler_type", [SyncRecorder, AsyncRecorder])
def test_request_that_raises_gets_request_end_with_error(handler_type: type) -> None:
    handler = handler_type()
    llm = OfflineLLM()
    with (
        pytest.raises(KeyError),
        audit.request(question="boom", collection="c", handlers=[handler]) as req,
    ):
        _ask(llm, "boom")
        raise KeyError("missing")
    output, _ = handler.rec.request_ends[0]
    assert isinstance(output, RequestEnd)
    assert isinstance(output.error, KeyError) and output.result is None
    assert req.completed is True
    handler.rec.check(expected_requests=1, events_per_request=1)


async def test_async_request_that_raises_gets_request_end_with_error() -> None:
    handler = AsyncRecorder()
    with pytest.raises(RuntimeError, match="nope"):
        async with audit.request(question="q", handlers=[handler]):
            raise RuntimeError("nope")
    assert isinstance(handler.rec.request_ends[0][0].error, RuntimeError)


def test_slow_async_handler_finished_before_block_exits() -> None:
    done: list[str] = []

    class Slow(AsyncRecorder):
        async def request_end(self, output: RequestEnd, request_context: object) -> None:
            await asyncio.sleep(0.2)
            done.append(output.request_id)

    with audit.request(question="q", handlers=[Slow()], timeout=5) as req:
        pass
    assert done == [req.id]


@pytest.mark.parametrize("timeout", [float("inf"), 1e300])
def test_a_timeout_beyond_what_a_lock_can_wait_means_no_limit(timeout: float) -> None:
    """The sync exit raised OverflowError from the application's with block."""
    with audit.request(question="q", handlers=[AsyncRecorder(pause=0.05)], timeout=timeout) as req:
        pass
    assert req.completed is True
    d = get_dispatcher("tests.audit.no_limit")
    adapter = audit.attach(d, [SyncRecorder()], timeout=timeout)

    @d.span(request=True)
    def ask(question: str) -> None: ...

    ask("q")
    assert adapter.flush(timeout=timeout) is True
    adapter.detach()


def test_slow_async_handler_bounded_by_timeout() -> None:
    release = threading.Event()
    give_up_at = time.monotonic() + 10  # should the exit wait for it after all

    class Stuck(AsyncRecorder):
        async def request_end(self, output: RequestEnd, request_context: object) -> None:
            while not release.is_set() and time.monotonic() < give_up_at:
                await asyncio.sleep(0.01)

    began = time.monotonic()
    with audit.request(question="q", handlers=[Stuck()], timeout=0.2) as req:
        pass
    waited = time.monotonic() - began
    release.set()
    # Its 0.2 s, with room for a loaded machine; waiting for the handler would take 10 s.
    assert 0.15 <= waited < 3.2
    assert req.completed is False
    assert telemetry.counter("audit.timeouts").value == 1


async def test_async_exit_does_not_block_the_event_loop_while_waiting() -> None:
    ticks = 0
    ticked_meanwhile: list[int] = []
    give_up_at = time.monotonic() + 5  # should the application's loop stay blocked

    class WaitsForTicks(AsyncRecorder):
        """Ends once the application's loop has ticked 5 times since it began: it only
        begins when the exit posts it, and the exit's own code up to its wait does not
        let the loop run, so those ticks happened while the exit waited."""

        async def request_end(self, output: RequestEnd, request_context: object) -> None:
            first = ticks
            while ticks < first + 5 and time.monotonic() < give_up_at:
                await asyncio.sleep(0.005)
            ticked_meanwhile.append(ticks - first)
            self.rec.request_end(output, request_context)

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    handler = WaitsForTicks()
    tick_task = asyncio.ensure_future(ticker())
    try:
        async with audit.request(question="q", handlers=[handler], timeout=10) as req:
            pass
    finally:
        tick_task.cancel()
    assert req.completed is True and len(handler.rec.request_ends) == 1
    assert ticked_meanwhile[0] >= 5  # the loop kept running during the wait


def test_manual_events_tool_and_retrieval() -> None:
    handler = SyncRecorder()
    with audit.request(question="q", handlers=[handler]):
        with audit.event(ToolCallEvent(name="search", arguments={"q": "x"})) as ev:
            ev.update(output=["a", "b"])
        with (
            pytest.raises(ValueError),
            audit.event(audit.RetrievalEvent(query="x", source="sqlite")),
        ):
            raise ValueError("db down")
    ends = [event for _, _, event in handler.rec.event_ends]
    assert ends[0] == ToolCallEvent(name="search", arguments={"q": "x"}, output=["a", "b"])
    assert ends[1].error == "ValueError: db down"
    handler.rec.check(expected_requests=1, events_per_request=2)


def test_fields_set_on_the_event_object_in_the_block_reach_its_end() -> None:
    """The caller's own object is what the end is made from; the handlers' start event
    is a copy, so it does not change after it was handed over."""
    starts: list[Event] = []

    class KeepsStarts(SyncRecorder):
        def event_start(self, event: Event, request_context: ReqCtx) -> EvCtx:
            starts.append(event)
            return super().event_start(event, request_context)

    handler = KeepsStarts()
    call = ToolCallEvent(name="search", arguments={"q": "x"})
    with audit.request(question="q", handlers=[handler]), audit.event(call):
        call.output = "set in place"
        assert call.arguments is not None
        call.arguments["page"] = 2
    [start] = starts
    [(_, _, end)] = handler.rec.event_ends
    assert isinstance(start, ToolCallEvent) and isinstance(end, ToolCallEvent)
    assert end.output == "set in place"
    assert start.output is None and start is not call
    assert start.arguments == {"q": "x"} and end.arguments == {"q": "x", "page": 2}


def test_end_event_does_not_change_after_it_is_handed_over() -> None:
    """The end event is a copy too: the handlers run later, on another thread, and see
    a list the application reuses after the block as it was when the event ended."""
    may_run = threading.Event()

    class Late(SyncRecorder):
        def request_start(self, user_request: RequestStart) -> ReqCtx:
            may_run.wait(10)  # the handler calls run once the application went on
            return super().request_start(user_request)

    handler = Late()
    call = ToolCallEvent(name="search", arguments={"q": "x"})
    with audit.request(question="q", handlers=[handler]):
        docs = ["eggs", "pecorino"]
        with audit.event(audit.RetrievalEvent(query="pantry", documents=docs)) as ev:
            docs.append("spaghetti")  # found during the retrieval
            ev.update(documents=docs)
        with audit.event(call):
            call.output = ["carbonara"]
        docs.clear()  # the application reuses its buffers
        assert call.arguments is not None and isinstance(call.output, list)
        call.arguments.clear()
        call.output.append("amatriciana")
        may_run.set()
    [(_, _, retrieval), (_, _, tool)] = handler.rec.event_ends
    assert isinstance(retrieval, audit.RetrievalEvent) and isinstance(tool, ToolCallEvent)
    assert retrieval.documents == ["eggs", "pecorino", "spaghetti"]
    assert tool.arguments == {"q": "x"} and tool.output == ["carbonara"]


def test_event_fields_that_cannot_be_copied_are_handed_over_as_they_are() -> None:
    lock = threading.Lock()  # deepcopy() refuses it
    handler = SyncRecorder()
    with (
        audit.request(question="q", handlers=[handler]),
        audit.event(ToolCallEvent(name="t", arguments=lock)) as ev,
    ):
        ev.update(output=lock)
    [(_, _, end)] = handler.rec.event_ends
    assert isinstance(end, ToolCallEvent)
    assert end.arguments is lock and end.output is lock


def test_timeout_zero_does_not_wait_and_is_not_a_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """timeout=0 means "do not wait": no warning, nothing counted in audit.timeouts."""
    release = threading.Event()

    class Held(SyncRecorder):
        def request_end(self, output: RequestEnd, request_context: object) -> None:
            release.wait(10)
            super().request_end(output, request_context)

    handler = Held()

    async def in_async_code() -> audit.AuditRequest:
        async with audit.request(question="async", handlers=[handler], timeout=0) as req:
            req.result = "ok"
        return req

    caplog.set_level(logging.WARNING, logger="instrumentation.audit")
    try:
        with audit.request(question="sync", handlers=[handler], timeout=0) as first:
            first.result = "ok"
        second = asyncio.run(in_async_code())
        assert first.completed is False and second.completed is False  # not waited for
        assert handler.rec.request_ends == []
    finally:
        release.set()
    assert first._run is not None and first._run.wait(10)
    assert second._run is not None and second._run.wait(10)
    assert len(handler.rec.request_ends) == 2
    assert telemetry.counter("audit.timeouts").value == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_event_outside_a_request_is_a_no_op() -> None:
    with audit.event(ToolCallEvent(name="t")) as ev:
        ev.update(output=1)
    with pytest.raises(TypeError, match="no field"):
        ev.update(nonsense=1)


def test_llm_call_outside_any_request_is_not_audited() -> None:
    handler = SyncRecorder()
    llm = OfflineLLM()
    _ask(llm, "before")
    with audit.request(question="inside", handlers=[handler]):
        _ask(llm, "inside")
    _ask(llm, "after")
    handler.rec.check(expected_requests=1, events_per_request=1)


def test_nested_requests_llm_call_goes_to_the_inner_one() -> None:
    outer, inner = SyncRecorder(), SyncRecorder()
    llm = OfflineLLM()
    with audit.request(question="outer", handlers=[outer]):
        _ask(llm, "outer")
        with audit.request(question="inner", handlers=[inner]):
            _ask(llm, "inner")
    outer.rec.check(expected_requests=1, events_per_request=1)
    inner.rec.check(expected_requests=1, events_per_request=1)


def test_collector_detached_when_no_request_is_active(monkeypatch: pytest.MonkeyPatch) -> None:
    from instrumentation import root_dispatcher
    from instrumentation.audit import collector

    # 0: at once, when the last request ends (see test_collector_idle for the delay).
    monkeypatch.setattr(collector, "IDLE_DETACH_SECONDS", 0.0)
    before = (len(root_dispatcher.event_handlers), len(root_dispatcher.span_handlers))
    with audit.request(question="q", handlers=[SyncRecorder()]):
        assert len(root_dispatcher.event_handlers) == before[0] + 1
        assert len(root_dispatcher.span_handlers) == before[1] + 1
    assert (len(root_dispatcher.event_handlers), len(root_dispatcher.span_handlers)) == before


def test_bad_arguments_say_what_to_do() -> None:
    with pytest.raises(TypeError, match="list of audit EventHandler"):
        audit.request(question="q", handlers=SyncRecorder())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"SyncRecorder\(\)"):
        audit.request(question="q", handlers=[SyncRecorder])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="must subclass"):
        audit.request(question="q", handlers=[object()])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="question"):
        audit.request(question=3, handlers=[])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="collection"):
        audit.request(question="q", collection=None, handlers=[])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        audit.request(question="q", handlers=[], timeout=-1)
    with pytest.raises(TypeError, match="audit event"):
        audit.event("tool")  # type: ignore[type-var]
    req = audit.request(question="q", handlers=[])
    with req:
        pass
    with pytest.raises(RuntimeError, match="entered once"), req:
        pass


def test_handler_is_abstract() -> None:
    class Half(audit.EventHandler[None, None]):
        def request_start(self, user_request: RequestStart) -> None:
            return None

    with pytest.raises(TypeError):
        Half()  # type: ignore[abstract]


def test_async_exit_bounded_by_timeout_and_late_finish_is_quiet(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = threading.Event()

    give_up_at = time.monotonic() + 10  # should the exit wait for it after all

    class Stuck(AsyncRecorder):
        async def request_end(self, output: RequestEnd, request_context: object) -> None:
            while not release.is_set() and time.monotonic() < give_up_at:
                await asyncio.sleep(0.01)
            self.rec.request_end(output, request_context)

    handler = Stuck()

    async def main() -> audit.AuditRequest:
        async with audit.request(question="q", handlers=[handler], timeout=0.1) as req:
            pass
        return req

    began = time.monotonic()
    req = asyncio.run(main())  # the caller's loop is closed after this
    # Its 0.1 s, with room for a loaded machine; waiting for the handler would take 10 s.
    assert 0.09 < time.monotonic() - began < 3.1 and req.completed is False
    release.set()
    assert req._run is not None and req._run.wait(5)  # finishes later, in the background
    assert len(handler.rec.request_ends) == 1
    assert not [r for r in caplog.records if "closed" in r.getMessage()]
