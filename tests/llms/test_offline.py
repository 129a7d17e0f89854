"""BaseLLM's traced calls, exercised through OfflineLLM."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from collecting import in_thread, leave_in_a_cycle
from pydantic import BaseModel

from instrumentation import (
    BaseEventHandler,
    NullSpanHandler,
    SpanDropEvent,
    get_dispatcher,
    telemetry,
)
from instrumentation.events.base import BaseEvent
from instrumentation.llms import (
    LLM_END_EVENTS,
    BaseLLM,
    ChatMessage,
    ChatResponse,
    LLMChatEndEvent,
    LLMChatInProgressEvent,
    LLMChatStartEvent,
    LLMCompletionEndEvent,
    LLMCompletionInProgressEvent,
    LLMCompletionStartEvent,
    LLMPredictEndEvent,
    LLMPredictStartEvent,
    LLMStructuredPredictEndEvent,
    OfflineLLM,
    OfflineLLMError,
    TokenUsage,
    count_tokens,
    set_model_price,
)
from instrumentation.testing import Capture, isolated

QUESTION = "What is the capital of France?"
ANSWER = "Paris is the capital of France."


def llm(**kwargs: Any) -> OfflineLLM:
    return OfflineLLM(answers={"capital": ANSWER}, **kwargs)


def test_chat_answers_and_emits_start_then_end_in_its_span(cap: Capture) -> None:
    """chat() returns the canned answer; start and end events carry the span id and usage."""
    response = llm().chat(QUESTION)
    assert response.message.content == ANSWER
    start, end = cap.events_of(LLMChatStartEvent), cap.events_of(LLMChatEndEvent)
    assert len(start) == len(end) == 1
    [span] = cap.spans
    assert span.name == "OfflineLLM.chat"
    assert start[0].span_id == end[0].span_id == span.id_
    assert start[0].messages[0].content == QUESTION
    assert start[0].model == end[0].model == "offline"
    assert end[0].provider == "offline"
    usage = end[0].usage
    assert usage is not None and not usage.estimated
    assert usage.prompt_tokens == count_tokens(QUESTION) == 7
    assert usage.completion_tokens == count_tokens(ANSWER) == 7
    assert end[0].finish_reason == "stop"
    assert end[0].response is not None and end[0].response.message.content == ANSWER
    assert end[0].latency_ms is not None and end[0].latency_ms >= 0


def test_echo_and_list_answers_are_deterministic() -> None:
    """Without a matching key the LLM echoes; a list of answers is used in turn."""
    assert OfflineLLM().chat("hello").message.content == "Echo: hello"
    turns = OfflineLLM(answers=["one", "two"])
    assert [turns.chat("q").message.content for _ in range(3)] == ["one", "two", "one"]


def test_latency_is_applied_and_measured(cap: Capture) -> None:
    """latency_s delays the answer, and the end event's latency covers it."""
    began = time.perf_counter()
    OfflineLLM(latency_s=0.05).chat("x")
    assert time.perf_counter() - began >= 0.05
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.latency_ms is not None and end.latency_ms >= 50


def test_stream_emits_one_in_progress_event_per_chunk(cap: Capture) -> None:
    """Each chunk is an in-progress event whose delta is the chunk; usage from the last."""
    chunks = list(llm().stream_chat(QUESTION))
    assert "".join(c.delta or "" for c in chunks) == ANSWER
    progress = cap.events_of(LLMChatInProgressEvent)
    assert [e.response.delta for e in progress] == [c.delta for c in chunks]
    assert progress[-1].response.message.content == ANSWER
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.usage is not None and not end.usage.estimated
    assert end.usage.completion_tokens == 7
    assert end.time_to_first_token_ms is not None
    assert end.latency_ms is not None and end.time_to_first_token_ms <= end.latency_ms
    [span] = cap.spans
    assert span.name == "OfflineLLM.stream_chat"
    assert {e.span_id for e in cap.events} == {span.id_}


def test_stream_without_provider_usage_reports_an_estimate(cap: Capture) -> None:
    """report_usage=False: the end event's usage is counted here and flagged estimated."""
    list(OfflineLLM(report_usage=False).stream_chat("a b c"))
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.usage is not None and end.usage.estimated
    assert end.usage.prompt_tokens == 3


def test_abandoned_stream_ends_its_span_with_tokens_seen(cap: Capture) -> None:
    """Closing a stream half way ends (not drops) its span; usage covers what was read."""
    stream = llm().stream_chat(QUESTION)
    first, second = next(stream), next(stream)
    stream.close()
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.finish_reason == "abandoned"
    assert end.usage is not None and end.usage.estimated
    assert (first.delta, second.delta) == ("Paris", " is")
    # "Paris is": two words, no punctuation -> 2 tokens by the word/punctuation rule.
    assert end.usage.completion_tokens == 2
    assert end.response is not None and end.response.message.content == "Paris is"
    assert not cap.events_of(SpanDropEvent)
    [span] = cap.spans
    assert span.end_time is not None and not (span.metadata or {}).get("error")


def test_stream_freed_by_the_collector_inside_a_handlers_lock_ends_after() -> None:
    """A stream only a reference cycle kept, freed by the cyclic garbage collector while
    an event handler held its (not re-entrant) lock: its abandoned end event comes once
    the collection is over, not inside it (where the handler waited for its own lock)."""
    lock = threading.Lock()
    seen: list[tuple[str, str | None]] = []
    collect_at: list[str] = []

    class Locking(BaseEventHandler):
        def handle(self, event: BaseEvent, **kwargs: Any) -> None:
            with lock:
                finish = getattr(event, "finish_reason", None)
                seen.append((type(event).__name__, finish))
                if collect_at and type(event).__name__ == collect_at[0]:
                    collect_at.clear()
                    gc.collect()

    handler = Locking()
    root = get_dispatcher()
    root.add_event_handler(handler)

    def work() -> None:
        leave_in_a_cycle(llm().stream_chat(QUESTION))
        collect_at.append("LLMChatStartEvent")
        llm().chat("another question")

    try:
        in_thread(work)
    finally:
        root.remove_event_handler(handler)
    ends = [(name, finish) for name, finish in seen if name == "LLMChatEndEvent"]
    # Put off during the other call's start event, made before its next event.
    assert ends == [("LLMChatEndEvent", "abandoned"), ("LLMChatEndEvent", "stop")]


def test_stream_dropped_by_the_caller_is_ended_by_garbage_collection(cap: Capture) -> None:
    """A stream the caller just forgets also ends its span."""
    stream = llm().stream_chat(QUESTION)
    next(stream)
    del stream
    gc.collect()
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.finish_reason == "abandoned"
    assert end.usage is not None and end.usage.completion_tokens == 1


def test_failure_drops_the_span_and_sends_no_end_event(cap: Capture) -> None:
    """An injected failure propagates; the span is dropped with its error, no end event."""
    with pytest.raises(OfflineLLMError, match="boom"):
        OfflineLLM(fail_with="boom").chat("x")
    assert cap.events_of(LLMChatStartEvent)
    assert not cap.events_of(LLMChatEndEvent)
    [drop] = cap.events_of(SpanDropEvent)
    assert drop.err_str == "boom"
    assert drop.span_id == cap.events_of(LLMChatStartEvent)[0].span_id


def test_fail_times_fails_only_the_first_calls() -> None:
    """fail_times=2: two failures, then answers (what retry logic needs)."""
    model = OfflineLLM(fail_with=TimeoutError("slow"), fail_times=2)
    for _ in range(2):
        with pytest.raises(TimeoutError):
            model.chat("x")
    assert model.chat("x").message.content == "Echo: x"


def test_mid_stream_failure_drops_the_span_after_the_chunks(cap: Capture) -> None:
    """fail_after_chunks=2: two chunks arrive, then the error; no end event."""
    stream = llm(fail_after_chunks=2).stream_chat(QUESTION)
    got = []
    with pytest.raises(OfflineLLMError):
        for chunk in stream:
            got.append(chunk)
    assert len(got) == 2
    assert len(cap.events_of(LLMChatInProgressEvent)) == 2
    assert not cap.events_of(LLMChatEndEvent)
    assert len(cap.events_of(SpanDropEvent)) == 1


def test_a_handler_raising_on_chunks_does_not_break_the_stream(cap: Capture) -> None:
    """A handler that raises on every in-progress event is reported; the stream goes on."""

    class Broken(BaseEventHandler):
        def handle(self, event: BaseEvent, **kwargs: Any) -> None:
            if isinstance(event, LLMChatInProgressEvent):
                raise RuntimeError("handler bug")

    get_dispatcher().add_event_handler(Broken())
    chunks = list(llm().stream_chat(QUESTION))
    assert "".join(c.delta or "" for c in chunks) == ANSWER
    assert len(cap.events_of(LLMChatEndEvent)) == 1
    assert telemetry.HANDLER_ERRORS.value == len(chunks)


def test_complete_and_stream_complete(cap: Capture) -> None:
    """Completion calls emit the completion events, streamed ones per chunk."""
    assert llm().complete(QUESTION).text == ANSWER
    text = "".join(c.delta or "" for c in llm(words_per_chunk=3).stream_complete(QUESTION))
    assert text == ANSWER
    assert [e.prompt for e in cap.events_of(LLMCompletionStartEvent)] == [QUESTION] * 2
    assert len(cap.events_of(LLMCompletionInProgressEvent)) == 2  # 6 words, 3 per chunk
    ends = cap.events_of(LLMCompletionEndEvent)
    assert [e.response.text for e in ends if e.response] == [ANSWER, ANSWER]
    assert [s.name for s in cap.spans] == ["OfflineLLM.complete", "OfflineLLM.stream_complete"]


async def test_async_calls(cap: Capture) -> None:
    """achat, acomplete and astream_chat emit the same events in their own spans."""
    model = llm()
    assert (await model.achat(QUESTION)).message.content == ANSWER
    assert (await model.acomplete(QUESTION)).text == ANSWER
    stream = await model.astream_chat(QUESTION)
    deltas = [c.delta async for c in stream]
    assert "".join(d or "" for d in deltas) == ANSWER
    stream2 = await model.astream_complete(QUESTION)
    assert "".join([c.delta or "" async for c in stream2]) == ANSWER
    assert len(cap.events_of(LLMChatInProgressEvent)) == len(deltas)
    names = [s.name for s in cap.spans]
    assert names == [
        "OfflineLLM.achat",
        "OfflineLLM.acomplete",
        "OfflineLLM.astream_chat",
        "OfflineLLM.astream_complete",
    ]


async def test_async_stream_closed_early_ends_with_tokens_seen(cap: Capture) -> None:
    """aclose() half way: end event with the tokens read, span ended not dropped."""
    stream = await llm().astream_chat(QUESTION)
    await stream.__anext__()
    await stream.aclose()
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.finish_reason == "abandoned"
    assert end.usage is not None and end.usage.completion_tokens == 1 and end.usage.estimated
    assert not cap.events_of(SpanDropEvent)


class ClosingSource(OfflineLLM):
    """An LLM whose own stream notes that it was closed (its clean-up ran)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.closed: list[bool] = []

    async def _astream_chat(
        self, messages: list[ChatMessage], **kwargs: Any
    ) -> AsyncIterator[ChatResponse]:
        try:
            async for chunk in super()._astream_chat(messages, **kwargs):
                yield chunk
        finally:
            self.closed.append(True)


async def test_a_reader_cancelled_mid_stream_still_reports_what_was_produced(
    cap: Capture,
) -> None:
    """The reader's task cancelled between chunks (an ASGI server whose client went
    away): no end event went out, so the tokens produced (and billed) were in no sink.
    Now the end event goes out as abandoned with them, and the span ends with the
    cancellation, which goes on to the reader; the source is closed."""
    model = ClosingSource(answers=["one two three four five six"], chunk_delay_s=0.05)
    two = asyncio.Event()

    async def read() -> None:
        stream = await model.astream_chat(QUESTION)
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 2:
                two.set()

    reader = asyncio.create_task(read())
    await two.wait()
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.finish_reason == "abandoned"
    assert end.usage is not None and end.usage.completion_tokens >= 2 and end.usage.estimated
    [drop] = cap.events_of(SpanDropEvent)
    assert drop.span_id == end.span_id
    assert model.closed == [True]


async def _cancel_a_reader_between_chunks(model: OfflineLLM) -> None:
    """Read two chunks of ``model``'s stream in a task that then awaits its own I/O (an
    ASGI ``send``), and cancel the task there: the cancellation never enters the
    stream. Returns once the task is over."""
    two = asyncio.Event()

    async def read() -> None:
        async with _work.span("reader"):
            stream = await model.astream_chat(QUESTION)
            seen = 0
            async for _ in stream:
                seen += 1
                if seen == 2:
                    two.set()
                    await asyncio.sleep(10)  # sends the chunk on, to a client gone quiet

    reader = asyncio.create_task(read())
    await two.wait()
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    with _work.span("after"):  # nothing of the stream's is current here
        pass


def _ended_as_left_early(cap: Capture) -> None:
    """One end event, as abandoned with the two chunks read, in the stream's span,
    which ends once, as a stream left early does (the cancellation came into the
    reader's own code, not into a read of the stream), under its reader's span, which
    is dropped with the cancellation; nothing left open, and what comes after is no
    child of the stream's."""
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.finish_reason == "abandoned"
    assert end.usage is not None and end.usage.completion_tokens == 2 and end.usage.estimated
    [stream] = [s for s in cap.spans if s.name.endswith("astream_chat")]
    [reader] = cap.spans.named("reader")
    [after] = cap.spans.named("after")
    assert end.span_id == stream.id_ and stream.parent_id == reader.id_
    assert after.parent_id is None
    drops = {d.span_id: d.err_type for d in cap.events_of(SpanDropEvent)}
    assert drops == {reader.id_: "CancelledError"}
    assert stream in cap._spans.completed_spans and not cap._spans.open_spans


async def test_a_reader_cancelled_in_its_own_await_between_chunks_ends_the_call_when_let_go(
    cap: Capture,
) -> None:
    """The reader's task cancelled while it awaits its own I/O between chunks, as an
    ASGI server cancels a request whose client went away: the stream never sees the
    cancellation; it is left unfinished, as a ``break`` leaves it, and ends so once the
    loop closes it (the source closed, the end event sent once)."""
    model = ClosingSource(answers=["one two three four five six"])
    await _cancel_a_reader_between_chunks(model)
    await _until(lambda: model.closed == [True])
    for _ in range(3):
        await asyncio.sleep(0)
    _ended_as_left_early(cap)


def test_a_reader_cancelled_between_chunks_as_asyncio_run_returns_leaves_no_span_open(
    cap: Capture, caplog: pytest.LogCaptureFixture
) -> None:
    """The same, with ``asyncio.run`` returning as soon as the reader is gone: the span
    stayed open for good (the loop's shutdown cancelled the task that was to close the
    stream, and that cancellation, which came into the stream from no read of it,
    ended nothing but the call). It ends as left early."""
    model = ClosingSource(answers=["one two three four five six"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(_cancel_a_reader_between_chunks(model))
        gc.collect()
    _ended_as_left_early(cap)
    assert model.closed == [True]
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert not [r for r in caplog.records if r.name == "asyncio"]


async def test_a_task_that_handed_its_stream_on_ends_nothing_when_it_ends(cap: Capture) -> None:
    """Only the task that last read a stream counts: one that read it and handed it on
    ends nothing when it is cancelled later, nor one that only made it, nor one that
    returns it (a first token read in a task of its own); the stream is read on to its
    end elsewhere."""
    handed = asyncio.Event()
    streams: list[Any] = []

    async def make_then_wait() -> None:
        streams.append(await llm().astream_chat(QUESTION))
        handed.set()
        await asyncio.sleep(10)

    maker = asyncio.create_task(make_then_wait())
    await handed.wait()
    maker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await maker
    assert len([c async for c in streams.pop()]) == len(ANSWER.split())
    handed.clear()

    async def read_one_then_wait() -> None:
        streams.append(await llm().astream_chat(QUESTION))
        await streams[0].__anext__()
        handed.set()
        await asyncio.sleep(10)

    first = asyncio.create_task(read_one_then_wait())
    await handed.wait()
    await streams[0].__anext__()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert len([c async for c in streams[0]]) == len(ANSWER.split()) - 2

    async def first_token() -> Any:
        stream = await llm().astream_chat(QUESTION)
        await stream.__anext__()
        return stream

    second = await asyncio.create_task(first_token())
    await asyncio.sleep(0)
    assert len([c async for c in second]) == len(ANSWER.split()) - 1
    assert [e.finish_reason for e in cap.events_of(LLMChatEndEvent)] == ["stop"] * 3
    assert not cap.events_of(SpanDropEvent)


def test_a_stream_left_by_break_as_asyncio_run_returns_is_ended_not_dropped(
    cap: Capture, caplog: pytest.LogCaptureFixture
) -> None:
    """A reader that breaks out and returns, with ``asyncio.run`` ending at once: the
    loop's shutdown cancels the task the loop made to close the dropped stream before
    it runs. The call ends as abandoned and its span as closed early, as when the
    loop's shutdown closes the stream itself (the span stayed open for good)."""

    async def main() -> None:
        async for _ in await llm().astream_chat(QUESTION):
            break

    asyncio.run(main())
    gc.collect()
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.finish_reason == "abandoned"
    [span] = cap.spans
    assert span.id_ == end.span_id and span.end_time is not None
    assert not cap.events_of(SpanDropEvent) and not cap._spans.open_spans
    assert not [r for r in caplog.records if r.name == "asyncio"]


# From Python 3.13 the loop's close warns of the close it had scheduled and never ran;
# a warning pytest records keeps its source, that aclose() and its generator, alive
# until the test ends.
@pytest.mark.filterwarnings("ignore:coroutine method 'aclose':RuntimeWarning")
def test_streams_left_in_a_loop_closed_without_shutdown_asyncgens_end_as_abandoned(
    cap: Capture, manual_gc: None
) -> None:
    """A loop closed without ``shutdown_asyncgens()`` (``loop.close()`` after
    ``run_until_complete``, as older code does) closes no stream: one left by ``break``
    (whose close the loop had scheduled, never to run it) and one kept past the loop
    were freed unclosed, and their spans stayed open for good, with no end event. Now
    each call ends once, as abandoned with what was read, in its span, as soon as it is
    freed; a stream read to its end is not ended again."""
    kept: list[Any] = []

    async def read_whole() -> None:
        assert len([c async for c in await llm().astream_chat(QUESTION)]) == len(ANSWER.split())

    async def left_by_break() -> None:
        async for _ in await llm().astream_chat(QUESTION):
            break

    async def kept_past_the_loop() -> None:
        stream = await llm().astream_complete(QUESTION)
        await stream.__anext__()
        await stream.__anext__()
        kept.append(stream)

    for _ in range(2):
        loop = asyncio.new_event_loop()
        try:
            for run in (read_whole, left_by_break, kept_past_the_loop):
                loop.run_until_complete(run())
        finally:
            loop.close()  # no shutdown_asyncgens(): the loop closes nothing
        kept.clear()  # freed here, and ended here: no collection needed
    assert [e.finish_reason for e in cap.events_of(LLMChatEndEvent)] == ["stop", "abandoned"] * 2
    completions = cap.events_of(LLMCompletionEndEvent)
    assert [(e.finish_reason, e.usage and e.usage.completion_tokens) for e in completions] == [
        ("abandoned", 2)
    ] * 2
    gc.collect()  # ends nothing more
    ends = cap.events_of(LLMChatEndEvent) + cap.events_of(LLMCompletionEndEvent)
    assert len(ends) == 6
    assert not cap.events_of(SpanDropEvent) and not cap._spans.open_spans
    assert len(cap.spans) == 6 and all(s.end_time is not None for s in cap.spans)
    assert {e.span_id for e in ends} == {s.id_ for s in cap.spans}


def test_a_stream_freed_by_the_collector_after_its_loop_closed_ends_after_the_collection() -> None:
    """The same stream in a reference cycle, freed by the cyclic garbage collector
    while an event handler holds its (not re-entrant) lock: its abandoned end event
    comes once the collection is over, not inside it, and its span ends."""
    lock = threading.Lock()
    seen: list[tuple[str, str | None]] = []
    collect_at: list[str] = []

    class Locking(BaseEventHandler):
        def handle(self, event: BaseEvent, **kwargs: Any) -> None:
            with lock:
                seen.append((type(event).__name__, getattr(event, "finish_reason", None)))
                if collect_at and type(event).__name__ == collect_at[0]:
                    collect_at.clear()
                    gc.collect()

    async def read_one_and_leave() -> None:
        stream = await llm().astream_chat(QUESTION)
        await stream.__anext__()
        cycle: list[Any] = [stream]
        cycle.append(cycle)

    def work() -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(read_one_and_leave())
        finally:
            loop.close()
        collect_at.append("LLMChatStartEvent")
        llm().chat("another question")

    handler = Locking()
    root = get_dispatcher()
    with isolated() as cap:
        root.add_event_handler(handler)
        try:
            in_thread(work)
        finally:
            root.remove_event_handler(handler)
        ends = [(name, finish) for name, finish in seen if name == "LLMChatEndEvent"]
        assert ends == [("LLMChatEndEvent", "abandoned"), ("LLMChatEndEvent", "stop")]
        [stream] = cap.spans.named("OfflineLLM.astream_chat")
        assert stream.end_time is not None and not cap._spans.open_spans
        assert not cap.events_of(SpanDropEvent)


@pytest.mark.filterwarnings("ignore:coroutine method 'aclose':RuntimeWarning")  # see above
def test_a_reader_cancelled_between_chunks_in_a_loop_closed_without_shutdown_ends(
    cap: Capture, manual_gc: None
) -> None:
    """A reader's task cancelled between chunks leaves the stream as a ``break`` does:
    with the loop then closed without ``shutdown_asyncgens()``, its span stayed open
    for good. It ends as left early once freed."""
    model = ClosingSource(answers=["one two three four five six"])
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_cancel_a_reader_between_chunks(model))
    finally:
        loop.close()
    gc.collect()
    _ended_as_left_early(cap)


@pytest.mark.filterwarnings("ignore:coroutine method 'aclose':RuntimeWarning")  # see above
def test_a_reader_waiting_when_its_loop_closes_leaves_the_stream_as_abandoned(
    cap: Capture, manual_gc: None
) -> None:
    """A reader's task still waiting for a chunk when its loop is closed (the loop run
    until another coroutine returned, then closed) is destroyed with the loop: its
    coroutine is closed where it waits. That is the stream left early, not a failed
    call: the span was dropped with ``GeneratorExit`` (on Python 3.11), with no end
    event for the chunk read."""
    model = llm(chunk_delay_s=10.0)

    async def reader() -> None:
        async for _ in await model.astream_chat(QUESTION):
            pass

    async def main() -> None:
        asyncio.get_running_loop().create_task(reader())
        await asyncio.sleep(0.05)  # the reader has its first chunk, and waits for the next

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()  # the reader's task is still pending
    gc.collect()
    assert not cap.events_of(SpanDropEvent)
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.finish_reason == "abandoned"
    assert end.usage is not None and end.usage.completion_tokens == 1
    [stream] = cap.spans
    assert stream.end_time is not None and end.span_id == stream.id_
    assert not cap._spans.open_spans


async def test_async_stream_closed_before_reading_ends_as_abandoned(cap: Capture) -> None:
    """aclose() before the first chunk (of astream_chat or astream_complete) ends the span
    as abandoned, once however often it is called; the stream is then over."""
    chat = await llm().astream_chat(QUESTION)
    await chat.aclose()
    await chat.aclose()
    assert [c async for c in chat] == []
    complete = await llm().astream_complete(QUESTION)
    await complete.aclose()
    assert not cap.events_of(SpanDropEvent)
    [chat_end] = cap.events_of(LLMChatEndEvent)
    [complete_end] = cap.events_of(LLMCompletionEndEvent)
    for end in (chat_end, complete_end):
        assert end.finish_reason == "abandoned"
        assert end.usage is not None and end.usage.completion_tokens == 0
    assert [s.name for s in cap.spans] == ["OfflineLLM.astream_chat", "OfflineLLM.astream_complete"]
    assert all(s.end_time is not None for s in cap.spans)


async def test_async_stream_closed_early_closes_the_source(cap: Capture) -> None:
    """The subclass's own stream is closed when the caller stops (its clean-up runs)."""
    model = ClosingSource(answers={"capital": ANSWER})
    stream = await model.astream_chat(QUESTION)
    await stream.__anext__()
    await stream.aclose()
    assert model.closed == [True]
    assert [e.finish_reason for e in cap.events_of(LLMChatEndEvent)] == ["abandoned"]


def _over(cap: Capture) -> bool:
    """Whether the span is over: ended, or dropped."""
    return bool(cap.events_of(LLMChatEndEvent) or cap.events_of(SpanDropEvent))


async def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        gc.collect()
        await asyncio.sleep(0)  # lets the loop run what the collection scheduled


def test_stream_collected_in_a_reference_cycle_is_ended(cap: Capture, manual_gc: None) -> None:
    """A stream held in a cycle is ended as abandoned by the cyclic GC, not dropped."""
    cycle: list[Any] = [llm().stream_chat(QUESTION)]
    cycle.append(cycle)
    next(cycle[0])
    body = weakref.ref(cycle[0]._body)
    del cycle
    gc.collect()
    assert not cap.events_of(SpanDropEvent)
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.finish_reason == "abandoned" and end.usage is not None
    assert end.usage.completion_tokens == 1
    assert end.span_id == cap.spans[0].id_
    assert body() is None


class KeepsItsStream(OfflineLLM):
    """An LLM that keeps the last stream it made: the stream is reachable from the
    body that reads it."""

    def remember(self, stream: Any) -> Any:
        object.__setattr__(self, "_last", stream)
        return stream


def test_a_stream_reachable_from_its_own_body_is_collected(cap: Capture, manual_gc: None) -> None:
    """Nothing keeps a stream's runner alive but the stream: a stream its own LLM holds
    is collected with it (it used to be kept for ever) and ended as abandoned."""
    model = KeepsItsStream(answers={"capital": ANSWER})
    stream = model.remember(model.stream_chat(QUESTION))
    next(stream)
    gone = weakref.ref(stream)
    del model, stream
    gc.collect()
    assert gone() is None
    assert [e.finish_reason for e in cap.events_of(LLMChatEndEvent)] == ["abandoned"]
    assert not cap.events_of(SpanDropEvent)


class Messages(list[ChatMessage]):
    """A list of messages that a weak reference can watch."""


async def test_a_stream_kept_after_its_end_keeps_no_messages(cap: Capture) -> None:
    """A handler that may read the call's arguments (one written for LlamaIndex, the
    storage's, the audit's) has them bound for the stream's span: a stream its caller
    kept after reading it through, or closing it, kept its messages (a long prompt)
    alive for as long. An untraced stream does not."""
    get_dispatcher().add_span_handler(NullSpanHandler())
    model, kept, watched = llm(), [], []
    for read in ("whole", "closed"):
        messages = Messages([ChatMessage(role="user", content=QUESTION)])
        stream = model.stream_chat(messages)
        if read == "whole":
            assert "".join(chunk.delta or "" for chunk in stream) == ANSWER
        else:
            next(stream)
            stream.close()
        astream = await model.astream_chat(messages)
        async for _ in astream:
            pass
        kept += [stream, astream]
        watched.append(weakref.ref(messages))
        del messages
    gc.collect()
    assert [ref() for ref in watched] == [None, None]
    assert [e.finish_reason for e in cap.events_of(LLMChatEndEvent)].count("abandoned") == 1


async def test_async_stream_collected_in_a_reference_cycle_is_ended(
    cap: Capture, manual_gc: None
) -> None:
    """Async: the collected body's call ends (the event loop closes the body); the
    span ends, not dropped."""
    cycle: list[Any] = [await llm().astream_chat(QUESTION)]
    cycle.append(cycle)
    await cycle[0].__anext__()
    body = weakref.ref(cycle[0]._body)
    del cycle
    await _until(lambda: bool(cap.spans) and body() is None)
    assert not cap.events_of(SpanDropEvent)
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.finish_reason == "abandoned" and end.span_id == cap.spans[0].id_


async def test_async_stream_interface(cap: Capture) -> None:
    """The stream is an async generator: asend() reads on, athrow() raises in the body
    (the span is dropped with that error) and ends the stream."""
    stream = await llm().astream_chat(QUESTION)
    first = await stream.asend(None)
    assert first.delta == "Paris"
    with pytest.raises(KeyError):
        await stream.athrow(KeyError("stop it"))
    assert [c async for c in stream] == []
    await stream.aclose()
    assert not cap.events_of(LLMChatEndEvent)
    [drop] = cap.events_of(SpanDropEvent)
    assert "stop it" in drop.err_str


async def test_async_failure_drops_span(cap: Capture) -> None:
    """An async failure, upfront or mid-stream, drops the span with no end event."""
    with pytest.raises(OfflineLLMError):
        await OfflineLLM(fail_with="no").achat("x")
    stream = await llm(fail_after_chunks=1).astream_chat(QUESTION)
    with pytest.raises(OfflineLLMError):
        async for _ in stream:
            pass
    assert not cap.events_of(LLMChatEndEvent)
    assert len(cap.events_of(SpanDropEvent)) == 2


def test_stream_calls_nest_under_the_callers_span(cap: Capture) -> None:
    """An LLM call inside an application span is its child, in the same trace."""
    d = get_dispatcher("tests.llms.app")
    with d.span("answer") as block:
        parent_id = block.id_
        list(llm().stream_chat(QUESTION))
        llm().chat(QUESTION)
    assert parent_id is not None
    children = [s for s in cap.spans if s.name.startswith("OfflineLLM")]
    assert len(children) == 2
    assert {s.parent_id for s in children} == {parent_id}
    [outer] = [s for s in cap.spans if s.name == "answer"]
    assert {s.trace_id for s in children} == {outer.trace_id}


class Capital(BaseModel):
    city: str


def test_predict_and_structured_predict(cap: Capture) -> None:
    """predict fills the template; structured_predict parses JSON; both emit their events."""
    model = OfflineLLM(answers={"json": '{"city": "Paris"}', "capital": ANSWER})
    assert model.predict("The capital of {country}?", country="France") == ANSWER
    assert model.structured_predict(Capital, "Reply in json for {c}", c="France") == Capital(
        city="Paris"
    )
    [start, _] = cap.events_of(LLMPredictStartEvent)
    assert start.template_args == {"country": "France"}
    assert cap.events_of(LLMPredictEndEvent)[0].output == ANSWER
    [structured] = cap.events_of(LLMStructuredPredictEndEvent)
    assert structured.output == Capital(city="Paris")
    names = [s.name for s in cap.spans]
    assert "OfflineLLM.structured_predict" in names and names.count("OfflineLLM.chat") == 2
    assert names.count("OfflineLLM.predict") == 2
    # They carry a latency and the chat's finish reason; the usage and cost are the
    # chat call's, on its own end event only (summed over all, it counts once).
    first, second = cap.events_of(LLMChatEndEvent)
    ends = [*cap.events_of(LLMPredictEndEvent), structured]
    for end, chat in zip(ends, [first, second, second], strict=True):
        assert chat.usage is not None and chat.usage.total_tokens > 0
        assert end.usage is None and end.cost_usd is None
        assert end.finish_reason == chat.finish_reason == "stop"
        assert end.latency_ms is not None and end.latency_ms >= chat.latency_ms  # type: ignore[operator]
        assert end.model == chat.model


def test_no_handler_means_no_events_and_the_same_answer(dispatched: list[str]) -> None:
    """With nothing listening no event is even built, and calls answer the same; once
    a handler listens, the very same calls do build and dispatch their events."""
    assert not get_dispatcher("instrumentation.llms.base").is_listening  # no handler anywhere
    assert llm().chat(QUESTION).message.content == ANSWER
    assert llm().complete(QUESTION).text == ANSWER
    assert "".join(c.delta or "" for c in llm().stream_chat(QUESTION)) == ANSWER
    assert llm().predict("{q}", q=QUESTION) == ANSWER
    assert dispatched == []
    with isolated():  # a handler at the root: now the events are built
        assert llm().chat(QUESTION).message.content == ANSWER
        assert "".join(c.delta or "" for c in llm().stream_chat(QUESTION)) == ANSWER
    # ANSWER streams one word per chunk: "Paris", " is", " the", " capital", " of",
    # " France." -- six in-progress events between start and end.
    progress = ["LLMChatInProgressEvent"] * 6
    assert dispatched == [
        *("LLMChatStartEvent", "LLMChatEndEvent"),
        *("LLMChatStartEvent", *progress, "LLMChatEndEvent"),
    ]


def test_messages_may_be_dicts_and_bad_ones_are_rejected() -> None:
    """Dict messages are validated; an unknown role is a ValidationError naming role."""
    from pydantic import ValidationError

    model = OfflineLLM()
    answer = model.chat(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    )
    assert answer.message.content == "Echo: hi"
    with pytest.raises(ValidationError, match="role"):
        model.chat([{"role": "boss", "content": "hi"}])
    with pytest.raises(TypeError, match="messages"):
        model.chat(ChatMessage(content="hi"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="prompt"):
        model.complete(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"latency_s": -1}, ValueError),
        ({"words_per_chunk": 0}, ValueError),
        ({"fail_times": -2}, ValueError),
        ({"answers": "just one"}, TypeError),
        ({"model": 5}, TypeError),
        ({"fail_with": 3}, TypeError),
    ],
)
def test_bad_configuration_is_rejected(kwargs: dict[str, Any], error: type[Exception]) -> None:
    """OfflineLLM's settings are checked up front with a message naming the setting."""
    with pytest.raises(error):
        OfflineLLM(**kwargs)


@pytest.mark.parametrize("setting", ["latency_s", "chunk_delay_s"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_a_delay_that_is_not_finite_is_rejected(setting: str, value: float) -> None:
    """latency_s=inf was accepted: achat then hung for ever and chat raised an
    OverflowError; nan made chat raise a ValueError and achat return at once."""
    kwargs: dict[str, Any] = {setting: value}
    with pytest.raises(ValueError, match=f"{setting} is a finite number of seconds >= 0"):
        OfflineLLM(**kwargs)


def test_the_model_may_be_given_first_as_to_any_llm(cap: Capture) -> None:
    """OfflineLLM("gpt-4o-mini") was a TypeError (it took the model by keyword only),
    where BaseLLM subclasses take it first; by keyword still works."""
    by_position, by_keyword = OfflineLLM("gpt-4o-mini"), OfflineLLM(model="gpt-4o-mini")
    assert by_position.model == by_keyword.model == "gpt-4o-mini"
    assert OfflineLLM().model == "offline"
    by_position.chat("hi")
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.model == "gpt-4o-mini" and end.cost_usd is not None  # priced as that model
    with pytest.raises(TypeError):
        OfflineLLM("gpt-4o-mini", {"hi": "there"})  # type: ignore[call-arg]


def test_structured_predict_goes_through_an_overridden_predict(cap: Capture) -> None:
    """A subclass's predict (a cache, say) is what structured_predict uses."""

    class Cached(OfflineLLM):
        calls = 0

        def predict(self, template: str, **template_args: Any) -> str:
            type(self).calls += 1
            return '{"city": "Paris (cached)"}'

    model = Cached()
    assert model.structured_predict(Capital, "Reply in json for {c}", c="France") == Capital(
        city="Paris (cached)"
    )
    assert Cached.calls == 1 and cap.events_of(LLMChatEndEvent) == []
    [structured] = cap.events_of(LLMStructuredPredictEndEvent)
    assert structured.usage is None and structured.latency_ms is not None


def test_summing_cost_over_the_end_events_counts_each_model_call_once(cap: Capture) -> None:
    """structured_predict -> predict -> chat is one model call: summed over
    LLM_END_EVENTS (as a cost meter does), its usage and cost count once, and an
    override asking a second model adds that call's, once."""
    set_model_price("main-model", input=1.0, output=2.0)
    set_model_price("judge-model", input=3.0, output=4.0)
    judge = OfflineLLM(model="judge-model", answers=["yes " * 50])

    class Checked(OfflineLLM):
        def predict(self, template: str, **template_args: Any) -> str:
            out = super().predict(template, **template_args)
            judge.predict("Is this JSON? {x}", x=out)
            return out

    Checked(model="main-model", answers=['{"city": "Paris"}']).structured_predict(
        Capital, "Capital of {c} as json", c="France"
    )
    ends = [e for e in cap.events if isinstance(e, LLM_END_EVENTS)]
    chats = cap.events_of(LLMChatEndEvent)
    assert len(chats) == 2 and len(ends) == 5  # 2 chats, 2 predicts, 1 structured
    assert all(c.cost_usd is not None and c.usage is not None for c in chats)
    total = sum(e.cost_usd for e in ends if e.cost_usd is not None)
    assert total == pytest.approx(sum(c.cost_usd or 0.0 for c in chats))
    tokens = sum(e.usage.total_tokens for e in ends if e.usage is not None)
    assert tokens == sum(c.usage.total_tokens for c in chats if c.usage is not None)
    [structured] = cap.events_of(LLMStructuredPredictEndEvent)
    assert structured.finish_reason == "stop" and structured.model == "main-model"


# -- what is current while a stream runs ------------------------------------------------

_work = get_dispatcher("tests.llms.stream_work")


@_work.span
def provider_step() -> None:
    pass


@_work.span
def consumer_step() -> None:
    pass


class TracedProvider(OfflineLLM):
    """A provider whose stream does traced work of its own for each chunk."""

    def _stream_chat(self, messages: list[ChatMessage], **kwargs: Any) -> Iterator[ChatResponse]:
        for chunk in super()._stream_chat(messages, **kwargs):
            provider_step()
            yield chunk

    async def _astream_chat(
        self, messages: list[ChatMessage], **kwargs: Any
    ) -> AsyncIterator[ChatResponse]:
        async for chunk in super()._astream_chat(messages, **kwargs):
            provider_step()
            yield chunk


def _check_parents(cap: Capture) -> None:
    by_name: dict[str, list[Any]] = {}
    for span in cap.spans:
        by_name.setdefault(span.name.rsplit(".", 1)[-1], []).append(span)
    [stream] = [s for s in cap.spans if "stream_chat" in s.name]
    assert stream.end_time is not None
    assert {s.parent_id for s in by_name["provider_step"]} == {stream.id_}
    assert {s.parent_id for s in by_name["consumer_step"]} == {stream.parent_id}
    assert len(by_name["consumer_step"]) == len(by_name["provider_step"]) >= 2
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.span_id == stream.id_


def test_a_streams_span_is_current_in_its_provider_not_in_the_consumer(cap: Capture) -> None:
    """Work the provider does while streaming is under the stream's span; what the caller
    does between chunks is not (it is under the caller's own span)."""
    with _work.span("caller"):
        for _ in TracedProvider(answers={"capital": ANSWER}).stream_chat(QUESTION):
            consumer_step()
    _check_parents(cap)


async def test_an_async_streams_span_is_current_in_its_provider_not_in_the_consumer(
    cap: Capture,
) -> None:
    async with _work.span("caller"):
        async for _ in await TracedProvider(answers={"capital": ANSWER}).astream_chat(QUESTION):
            consumer_step()
    _check_parents(cap)


# -- stopping a stream: from elsewhere, interrupted, at the loop's end ----------------------


class SlowToClose(OfflineLLM):
    """A provider whose stream awaits in its clean-up (as ``async with
    client.stream(...)`` does); when sync, its clean-up is :meth:`sync_cleanup`:
    here it is interrupted (Ctrl-C)."""

    def sync_cleanup(self) -> None:
        raise KeyboardInterrupt

    def _stream_chat(self, messages: list[ChatMessage], **kwargs: Any) -> Iterator[ChatResponse]:
        try:
            yield from super()._stream_chat(messages, **kwargs)
        finally:
            self.sync_cleanup()

    async def _astream_chat(
        self, messages: list[ChatMessage], **kwargs: Any
    ) -> AsyncIterator[ChatResponse]:
        try:
            async for chunk in super()._astream_chat(messages, **kwargs):
                yield chunk
        finally:
            await asyncio.sleep(0)


def test_an_interrupt_while_the_source_closes_still_ends_the_span(cap: Capture) -> None:
    """Ctrl-C while the provider closes its stream reaches the caller, and the call and
    its span are over all the same (the span used to stay open)."""
    stream = SlowToClose(answers={"capital": ANSWER}).stream_chat(QUESTION)
    next(stream)
    with pytest.raises(KeyboardInterrupt):
        stream.close()
    assert [e.finish_reason for e in cap.events_of(LLMChatEndEvent)] == ["abandoned"]
    [span] = cap.spans
    assert span.end_time is not None and not cap.events_of(SpanDropEvent)


def test_streams_open_when_asyncio_run_returns_are_ended_not_dropped() -> None:
    """The loop's shutdown closes every async generator it ran at once, the body and
    the provider's own: each call still ends once, as abandoned, in its span."""
    kept: list[Any] = []

    async def main() -> None:
        stream = await SlowToClose(answers={"capital": ANSWER}).astream_chat(QUESTION)
        await stream.__anext__()
        kept.append(stream)

    for _ in range(5):
        with isolated() as cap:
            asyncio.run(main())
            kept.clear()
            [end] = cap.events_of(LLMChatEndEvent)
            [span] = cap.spans
            assert end.finish_reason == "abandoned" and end.span_id == span.id_
            assert span.end_time is not None and not cap.events_of(SpanDropEvent)


async def test_aclose_from_another_task_stops_the_stream_at_its_next_chunk(
    cap: Capture,
) -> None:
    """A provider that cannot be interrupted: the reader gets the end of the stream in
    place of the next chunk, and the call ends as abandoned in its span (the reader used
    to read on to the end, and the end event landed in the caller's span)."""
    model = OfflineLLM(answers=["w1 w2 w3 w4 w5 w6 w7 w8"], chunk_delay_s=0.02)
    got: list[str] = []
    async with _work.span("caller"):
        stream = await model.astream_chat(QUESTION)

        async def reader() -> None:
            async for chunk in stream:
                got.append(chunk.delta or "")

        task = asyncio.create_task(reader())
        while len(got) < 2:
            await asyncio.sleep(0.005)
        await stream.aclose()
        await task
    assert 2 <= len(got) <= 3
    [end] = cap.events_of(LLMChatEndEvent)
    [stream_span] = [s for s in cap.spans if "astream_chat" in s.name]
    assert end.finish_reason == "abandoned" and end.span_id == stream_span.id_
    assert not cap.events_of(SpanDropEvent)


class SlowTeardown(SlowToClose):
    """A provider whose stream takes a while to close, as an HTTP connection does."""

    def sync_cleanup(self) -> None:
        time.sleep(0.05)


LONG = " ".join(f"w{i}" for i in range(50))


def _stopped_once(cap: Capture) -> None:
    [end] = cap.events_of(LLMChatEndEvent)
    [stream_span] = [s for s in cap.spans if "stream_chat" in s.name]
    assert end.finish_reason == "abandoned" and end.span_id == stream_span.id_
    assert stream_span.end_time is not None and not cap.events_of(SpanDropEvent)


def test_close_from_another_thread_between_chunks_ends_the_stream_there(cap: Capture) -> None:
    """The reader asks for its next chunk while another thread is closing the stream:
    it gets the end of the stream (it used to get 'generator already executing', and
    the span was both ended and dropped)."""
    stream = SlowTeardown(answers=[LONG]).stream_chat(QUESTION)
    outcome: list[str] = []

    def reader() -> None:
        try:
            for _ in stream:
                time.sleep(0.02)  # renders the chunk
            outcome.append("end")
        except BaseException as exc:
            outcome.append(repr(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.05)
    stream.close()
    thread.join(10)
    assert outcome == ["end"]
    _stopped_once(cap)


async def test_aclose_from_another_task_between_chunks_ends_the_stream_there(
    cap: Capture,
) -> None:
    stream = await SlowTeardown(answers=[LONG]).astream_chat(QUESTION)
    outcome: list[str] = []

    async def reader() -> None:
        try:
            async for _ in stream:
                await asyncio.sleep(0)  # renders the chunk
            outcome.append("end")
        except BaseException as exc:
            outcome.append(repr(exc))

    task = asyncio.create_task(reader())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    await stream.aclose()
    await task
    assert outcome == ["end"]
    _stopped_once(cap)


class _CallsBack(BaseEventHandler):
    """Calls ``action`` once, from inside the stream, on the first event of ``kind``."""

    kind: Any
    action: Any
    outcome: list[str] = []

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        if isinstance(event, self.kind) and not self.outcome:
            try:
                self.outcome.append(repr(self.action()))
            except BaseException as exc:
                self.outcome.append(repr(exc))


def _in_thread(run: Callable[[], None]) -> None:
    """Run ``run`` where a deadlock fails the test instead of hanging the suite."""
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "deadlocked"


def test_reading_a_stream_from_inside_its_own_body_is_refused_as_python_does(
    cap: Capture,
) -> None:
    """A handler that calls next() on the stream whose event it handles gets Python's
    'generator already executing' (it used to wait for itself for ever); the stream
    goes on and ends normally."""
    got: list[str] = []
    stream = llm().stream_chat(QUESTION)
    handler = _CallsBack(kind=LLMChatInProgressEvent, action=lambda: next(stream))
    get_dispatcher().add_event_handler(handler)
    _in_thread(lambda: got.extend(c.delta or "" for c in stream))
    assert handler.outcome == ["ValueError('generator already executing')"]
    assert "".join(got) == ANSWER
    assert [e.finish_reason for e in cap.events_of(LLMChatEndEvent)] == ["stop"]


def test_reading_a_stream_while_it_closes_finds_its_end(cap: Capture) -> None:
    """A handler of the abandoned end event that reads the stream on gets its end, as
    from a closed generator (it used to deadlock in close())."""
    stream = llm().stream_chat(QUESTION)
    handler = _CallsBack(kind=LLMChatEndEvent, action=lambda: next(stream, "END"))
    get_dispatcher().add_event_handler(handler)

    def read_one_and_close() -> None:
        next(stream)
        stream.close()

    _in_thread(read_one_and_close)
    assert handler.outcome == ["'END'"]
    assert [e.finish_reason for e in cap.events_of(LLMChatEndEvent)] == ["abandoned"]


async def test_a_second_reader_is_refused_and_the_stream_stays_whole(cap: Capture) -> None:
    """Two tasks reading one async stream at once: the second gets Python's 'already
    running' error; the span is not dropped for it (it was, and the first reader's
    chunks then went out in no span)."""
    stream = await OfflineLLM(answers=["a b c d"], chunk_delay_s=0.02).astream_chat(QUESTION)
    await stream.__anext__()
    first = asyncio.create_task(stream.__anext__())
    await asyncio.sleep(0.005)
    with pytest.raises(RuntimeError, match="already running"):
        await stream.__anext__()
    await first
    async for _ in stream:
        pass
    [span] = cap.spans
    assert not cap.events_of(SpanDropEvent)
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.finish_reason == "stop" and end.span_id == span.id_
    assert {e.span_id for e in cap.events_of(LLMChatInProgressEvent)} == {span.id_}


def _from_another_thread(action: Callable[[], object]) -> Callable[[], object]:
    """``action`` run in a new thread, waited for: what it returned or raised."""

    def run() -> object:
        outcome: list[object] = []

        def target() -> None:
            try:
                outcome.append(action())
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join(5)
        assert not thread.is_alive(), "the other thread was left waiting"
        [result] = outcome
        if isinstance(result, BaseException):
            raise result
        return result

    return run


def test_another_thread_reading_while_the_body_runs_is_refused_at_once(cap: Capture) -> None:
    """A handler waiting for another thread that reads the same stream: that thread
    gets Python's 'generator already executing' at once (it used to wait for the
    handler, which waited for it); while the stream closes, it gets the end."""
    stream = llm().stream_chat(QUESTION)
    reads = _CallsBack(
        kind=LLMChatInProgressEvent, action=_from_another_thread(lambda: next(stream))
    )
    get_dispatcher().add_event_handler(reads)

    def read_two() -> None:
        next(stream)
        next(stream)

    _in_thread(read_two)
    stream.close()
    assert reads.outcome == ["ValueError('generator already executing')"]

    closing = llm().stream_chat(QUESTION)
    at_end = _CallsBack(
        kind=LLMChatEndEvent, action=_from_another_thread(lambda: next(closing, "END"))
    )
    get_dispatcher().add_event_handler(at_end)

    def read_one_and_close() -> None:
        next(closing)
        closing.close()

    _in_thread(read_one_and_close)
    assert at_end.outcome == ["'END'"]
    assert not cap.events_of(SpanDropEvent)


@pytest.mark.parametrize("cumulative", [True, False])
async def test_a_stream_that_sets_no_delta_still_records_its_text(
    cap: Capture, cumulative: bool
) -> None:
    """A BaseLLM whose stream sets only the message's text (so far, or the new piece),
    not ``delta``, as the docs' own example does: the in-progress events carry the new
    text and the end event the whole answer, sync and async, chat and completion."""
    from instrumentation.llms import (
        BaseLLM,
        ChatMessage,
        ChatResponse,
        LLMChatEndEvent,
        LLMChatInProgressEvent,
        LLMCompletionEndEvent,
        LLMCompletionInProgressEvent,
    )

    pieces = ["Hel", "lo", " there"]

    class NoDelta(BaseLLM):
        def _chat(self, messages: list[ChatMessage], **kwargs: Any) -> ChatResponse:
            return ChatResponse(message=ChatMessage(role="assistant", content="".join(pieces)))

        def _stream_chat(
            self, messages: list[ChatMessage], **kwargs: Any
        ) -> Iterator[ChatResponse]:
            for i, piece in enumerate(pieces):
                text = "".join(pieces[: i + 1]) if cumulative else piece
                yield ChatResponse(message=ChatMessage(role="assistant", content=text))

    llm = NoDelta("no-delta")
    assert [c.message.content for c in llm.stream_chat("hi")][-1] in ("Hello there", " there")
    [c async for c in await llm.astream_chat("hi")]
    list(llm.stream_complete("hi"))
    progress = cap.events_of(LLMChatInProgressEvent)
    assert [e.response.delta for e in progress] == pieces * 2
    ends = cap.events_of(LLMChatEndEvent)
    assert [e.response.message.content for e in ends if e.response] == ["Hello there"] * 2
    assert [e.response.delta for e in cap.events_of(LLMCompletionInProgressEvent)] == pieces
    (end,) = cap.events_of(LLMCompletionEndEvent)
    assert end.response is not None and end.response.text == "Hello there"


# -- usage given by a subclass, streams of pieces -----------------------------------------


class ReportsUsage(BaseLLM):
    """Reports whatever usage it is given, as a provider wrapper passes its provider's on."""

    def __init__(self, usage: Any) -> None:
        super().__init__("gpt-4o")
        self.usage = usage

    def _chat(self, messages: list[ChatMessage], **kwargs: Any) -> ChatResponse:
        return ChatResponse(
            message=ChatMessage(role="assistant", content="four words of answer"),
            additional_kwargs={"finish_reason": "stop", "usage": self.usage},
        )

    def _stream_chat(self, messages: list[ChatMessage], **kwargs: Any) -> Iterator[ChatResponse]:
        yield self._chat(messages, **kwargs)


OPENAI_USAGE = {
    "prompt_tokens": 1000,
    "completion_tokens": 100,
    "total_tokens": 1100,
    "prompt_tokens_details": {"cached_tokens": 800, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 50},
}


def test_usage_as_an_openai_shaped_dict_is_read_as_the_object_is(cap: Capture) -> None:
    """usage.model_dump() gives what the usage object gives: the nested cached and
    reasoning tokens too, so the cached tokens are priced at the cached rate."""
    from openai.types import CompletionUsage

    ReportsUsage(OPENAI_USAGE).chat("hello")
    ReportsUsage(CompletionUsage.model_validate(OPENAI_USAGE)).chat("hello")
    ReportsUsage(TokenUsage(prompt_tokens=7, cached_tokens=2, estimated=True).model_dump()).chat(
        "hello"
    )
    from_dict, from_object, round_trip = cap.events_of(LLMChatEndEvent)
    expected = TokenUsage(
        prompt_tokens=1000,
        completion_tokens=100,
        total_tokens=1100,
        cached_tokens=800,
        reasoning_tokens=50,
    )
    assert from_dict.usage == from_object.usage == expected
    assert (
        from_dict.cost_usd
        == from_object.cost_usd
        == pytest.approx((200 * 2.5 + 800 * 1.25 + 100 * 10.0) / 1e6)
    )
    assert round_trip.usage == TokenUsage(prompt_tokens=7, cached_tokens=2, estimated=True)


@pytest.mark.parametrize(
    "usage",
    [
        {"input_tokens": 1000, "output_tokens": 100},
        {"prompt_tokens": 1000, "completion_tokens": None, "total_tokens": 1000},
        {"prompt_tokens": "many"},
        {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": -1}},
    ],
    ids=["unknown-keys", "none-count", "text-count", "negative-detail"],
)
def test_usage_that_cannot_be_read_falls_back_to_the_estimate(
    cap: Capture, caplog: pytest.LogCaptureFixture, usage: dict[str, Any]
) -> None:
    """Usage with no count we know, or a count that is not one, never fails the call and
    never claims exact zeros: the event carries the estimate; a bad count is logged by
    the module's logger and counted."""
    errors = telemetry.counter("llms.usage_errors")
    before = errors.value
    with caplog.at_level("WARNING", logger="instrumentation.llms._call"):
        answer = ReportsUsage(usage).chat("hello")
    assert answer.message.content == "four words of answer"
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.usage == TokenUsage(prompt_tokens=1, completion_tokens=4, estimated=True)
    assert not cap.events_of(SpanDropEvent)
    bad = "input_tokens" not in usage
    assert errors.value == before + bad
    assert bool(caplog.records) is bad


async def test_default_stream_complete_builds_the_text_so_far(cap: Capture) -> None:
    """A BaseLLM whose chat chunks set only delta (as the docs recommend): each chunk of
    stream_complete and astream_complete has the completion so far as its text."""

    class Pieces(BaseLLM):
        def _chat(self, messages: list[ChatMessage], **kwargs: Any) -> ChatResponse:
            return ChatResponse(message=ChatMessage(role="assistant", content="ha ha ha"))

        def _stream_chat(
            self, messages: list[ChatMessage], **kwargs: Any
        ) -> Iterator[ChatResponse]:
            for piece in ("ha", " ha", " ha"):
                yield ChatResponse(message=ChatMessage(role="assistant"), delta=piece)

    model = Pieces("pieces")
    expected = [("ha", "ha"), ("ha ha", " ha"), ("ha ha ha", " ha")]
    assert [(c.text, c.delta) for c in model.stream_complete("laugh")] == expected
    stream = await model.astream_complete("laugh")
    assert [(c.text, c.delta) async for c in stream] == expected
    progress = cap.events_of(LLMCompletionInProgressEvent)
    assert [e.response.text for e in progress] == [text for text, _ in expected] * 2
