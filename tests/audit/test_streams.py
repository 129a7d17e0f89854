"""A streamed request (a generator) whose caller stops reading is an early stop, not a
failure: ``request_end`` gets ``error=None`` and ``abandoned=True``."""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import threading
import time
from collections.abc import AsyncGenerator, Generator
from pathlib import Path
from typing import Any

import pytest
from collecting import in_thread, leave_in_a_cycle

from instrumentation import audit, get_dispatcher, telemetry
from instrumentation.audit import RequestEnd, ToolCallEvent, runner
from instrumentation.audit.collector import registry
from instrumentation.llms import OfflineLLM

from .helpers import SyncRecorder

llm = OfflineLLM(answers=["one two three four five"])


def _ends(handler: SyncRecorder) -> list[RequestEnd]:
    return [output for output, _ in handler.rec.request_ends]


def test_a_request_span_stream_closed_early_is_abandoned_not_failed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = get_dispatcher("tests.audit.streams")
    handler, out = SyncRecorder(), io.StringIO()
    adapter = audit.attach(
        d,
        [
            handler,
            audit.CLIEventHandler(out),
            audit.LoggingEventHandler("tests.audit.streams.log"),
            audit.FileEventHandler(tmp_path),
        ],
    )

    @d.span(request=True)
    def answer(question: str) -> Generator[str, None, None]:
        for chunk in llm.stream_chat(question):
            yield chunk.delta or ""

    with caplog.at_level(logging.INFO):
        chunks = answer("stream please")
        assert next(chunks) == "one"
        chunks.close()  # the user closed the browser tab
        assert adapter.flush(timeout=10)

    (end,) = _ends(handler)
    assert end.abandoned is True and end.error is None and end.result is None
    text = out.getvalue()
    assert "GeneratorExit" not in text and "error" not in text
    assert text.count("ended early: the caller stopped reading the stream") == 2  # LLM, request
    (log,) = tmp_path.glob("*.log")
    assert "Output: none, ended early: the caller stopped reading the stream" in log.read_text()
    records = [r for r in caplog.records if r.name == "tests.audit.streams.log"]
    assert all(r.levelno < logging.ERROR for r in records)
    last = records[-1].audit  # type: ignore[attr-defined]
    assert last["phase"] == "request_end" and last["abandoned"] is True and last["error"] is None

    # Read to its end, it is an ordinary request (whose result is None: see the docs).
    assert "".join(answer("full stream")) == "one two three four five"
    assert adapter.flush(timeout=10)
    whole = _ends(handler)[-1]
    assert whole.abandoned is False and whole.error is None and whole.result is None


async def test_an_async_request_span_stream_closed_early_is_abandoned() -> None:
    d = get_dispatcher("tests.audit.streams.async")
    handler = SyncRecorder()
    adapter = audit.attach(d, [handler])

    @d.span(request=True)
    async def answer(question: str) -> AsyncGenerator[str, None]:
        for word in question.split():
            yield word

    chunks = answer("one two three")
    assert await chunks.__anext__() == "one"
    await chunks.aclose()
    assert await adapter.aflush(timeout=10)
    (end,) = _ends(handler)
    assert end.abandoned is True and end.error is None


def test_audit_request_in_a_generator_closed_early_is_abandoned() -> None:
    handler = SyncRecorder()

    def answer(question: str) -> Generator[str, None, None]:
        with audit.request(question=question, handlers=[handler]):
            yield from ["a", "b"]

    chunks = answer("by hand")
    next(chunks)
    chunks.close()
    (end,) = _ends(handler)
    assert end.abandoned is True and end.error is None


# On 3.13 a warning pytest records (the loop's close, never awaited) keeps the
# generator alive until the test ends.
@pytest.mark.filterwarnings("ignore:coroutine method 'aclose':RuntimeWarning")
def test_audit_request_in_an_async_generator_a_closed_loop_frees_is_abandoned() -> None:
    """An event loop closed without shutdown_asyncgens() frees an async generator left
    unfinished without running its finally blocks: the request in it stayed active for
    good (its run kept till exit, the collector attached for every later LLM call).
    Freed, it ends as abandoned, as a generator closed early does."""
    handler = SyncRecorder()

    async def answer(question: str) -> AsyncGenerator[str, None]:
        async with audit.request(question=question, handlers=[handler]):
            yield "a"
            yield "b"

    async def first_chunk() -> str:
        async for chunk in answer("by hand"):
            return chunk
        raise AssertionError("no chunk")

    for _ in range(3):
        loop = asyncio.new_event_loop()
        try:
            assert loop.run_until_complete(first_chunk()) == "a"
        finally:
            loop.close()  # no shutdown_asyncgens(): the loop closes nothing
    gc.collect()
    assert not registry.active and all(run.ended for run in runner._in_flight.runs())
    deadline = time.monotonic() + 10
    while len(_ends(handler)) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [(end.abandoned, end.error) for end in _ends(handler)] == [(True, None)] * 3


def test_a_request_made_before_its_generator_and_freed_with_it_ends_once() -> None:
    """The request made first (kept by the object whose generator enters it), the two
    garbage together: the collector ran the request's __del__ first (it ended the
    request), then closed the generator, whose exit ended it again: "this request has
    ended already" logged as a handler error, and the registry counted one request
    less than were active (the collector detached under another one still running)."""
    handler = SyncRecorder()

    class Answer:
        def __init__(self) -> None:
            self.request = audit.request(question="freed", handlers=[handler])
            self.chunks = self.read()  # made after the request

        def read(self) -> Generator[str, None, None]:
            with self.request:
                yield from ["a", "b"]

    errors_before = telemetry.handler_errors()
    with audit.request(question="still running", handlers=[SyncRecorder()]):
        answer = Answer()
        assert next(answer.chunks) == "a"
        del answer  # the generator's frame holds the Answer: a cycle
        gc.collect()
        with audit.event(ToolCallEvent(name="after")):  # made what the collection put off
            pass
        assert registry.active == 1
    deadline = time.monotonic() + 10
    while not _ends(handler) and time.monotonic() < deadline:
        time.sleep(0.01)
    (end,) = _ends(handler)
    assert end.abandoned is True and end.error is None
    assert telemetry.handler_errors() == errors_before


def test_a_request_in_a_generator_the_collector_frees_inside_the_registry_ends_after() -> None:
    """A generator holding a request, freed by the cyclic garbage collector while the
    library held the request registry's lock (mapping a span started inside another
    request): its request ends once the collection is over. Before, its end waited for
    that lock, which its own thread held, for ever."""
    handler = SyncRecorder()
    d = get_dispatcher("tests.audit.collected")

    def answer() -> Generator[str, None, None]:
        with audit.request(question="freed", handlers=[handler]):
            yield from ["a", "b"]

    @d.span
    def step() -> None:
        return None

    fired: list[int] = []

    class CollectOnce(dict):  # type: ignore[type-arg]
        """The collector runs at an allocation made while the lock is held."""

        def __setitem__(self, key: Any, value: Any) -> None:
            super().__setitem__(key, value)
            if not fired:
                fired.append(1)
                gc.collect()

    def work() -> None:
        leave_in_a_cycle(answer())
        with audit.request(question="outer", handlers=[SyncRecorder()]):
            step()

    registry.span_runs = CollectOnce(registry.span_runs)
    try:
        in_thread(work)
    finally:
        registry.span_runs = dict(registry.span_runs)
    assert fired
    deadline = time.monotonic() + 10
    while not _ends(handler) and time.monotonic() < deadline:
        time.sleep(0.01)
    (end,) = _ends(handler)
    assert end.abandoned is True and end.error is None
    assert not registry.span_runs and not registry.active


def _collect_holding_the_lock_of(req: Any) -> None:
    """A collection where the request's own bookkeeping holds its lock."""
    run = req._run
    assert run is not None
    with run._lock:
        gc.collect()


def test_an_event_block_the_collector_closes_inside_the_requests_lock_ends_after() -> None:
    """``with audit.event(...)`` in a generator the garbage collector frees while this
    thread holds the request's lock (as its own bookkeeping does): the event's end
    waits for the collection, and comes before the request's end."""
    handler = SyncRecorder()

    def steps() -> Generator[int, None, None]:
        with audit.event(ToolCallEvent(name="search")):
            yield 1
            yield 2

    def work() -> None:
        with audit.request(question="q", handlers=[handler]) as req:
            leave_in_a_cycle(steps())
            _collect_holding_the_lock_of(req)

    in_thread(work)
    deadline = time.monotonic() + 10
    while not _ends(handler) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handler.rec.calls == ["request_start", "event_start", "event_end", "request_end"]
    [(_, _, ended)] = handler.rec.event_ends
    assert isinstance(ended, ToolCallEvent) and ended.name == "search"


def test_an_event_block_opened_by_a_finally_the_collector_runs_waits_too() -> None:
    """A generator's ``finally`` opens ``with audit.event(...)`` as the collector frees
    it, while this thread holds the request's lock: the block's start waits as its end
    does, and both come, in order, before the enclosing block's end."""
    order: list[tuple[str, ...]] = []

    class Ordered(SyncRecorder):
        def event_start(self, event: Any, request_context: Any) -> Any:
            order.append(("start", event.name))
            return super().event_start(event, request_context)

        def event_end(self, event: Any, request_context: Any, event_context: Any) -> None:
            order.append(("end", event.name))
            super().event_end(event, request_context, event_context)

    handler = Ordered()

    def steps() -> Generator[int, None, None]:
        try:
            yield 1
        finally:
            with audit.event(ToolCallEvent(name="cleanup")):
                pass

    def work() -> None:
        with (
            audit.request(question="q", handlers=[handler], timeout=5) as req,
            audit.event(ToolCallEvent(name="outer")),
        ):
            leave_in_a_cycle(steps())
            _collect_holding_the_lock_of(req)

    in_thread(work)
    assert order == [
        ("start", "outer"),
        ("start", "cleanup"),
        ("end", "cleanup"),
        ("end", "outer"),
    ]


def test_a_request_span_end_made_for_another_thread_does_not_wait_there() -> None:
    """A request span the collector ended is made by the next span on any thread:
    that unrelated call does not wait for the request's handlers."""
    release = threading.Event()

    class Slow(SyncRecorder):
        def request_end(self, output: RequestEnd, request_context: Any) -> None:
            release.wait(10)
            super().request_end(output, request_context)

    handler = Slow()
    d = get_dispatcher("tests.audit.collected_wait")
    adapter = audit.attach(d, [handler], timeout=30)

    @d.span(request=True)
    def answer(question: str) -> Generator[str, None, None]:
        yield "a"
        yield "b"

    @d.span
    def unrelated() -> None:
        return None

    took: list[float] = []

    def work() -> None:
        leave_in_a_cycle(answer("q"))
        gc.collect()  # the request's end put off

        def other() -> None:
            began = time.monotonic()
            unrelated()  # makes the request's end, and must not wait for Slow
            took.append(time.monotonic() - began)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(20)

    try:
        in_thread(work)
        assert took and took[0] < 5
    finally:
        release.set()
        adapter.flush(10)
        adapter.detach()
    (end,) = _ends(handler)
    assert end.abandoned is True


def test_a_failing_stream_is_still_a_failure() -> None:
    d = get_dispatcher("tests.audit.streams.failing")
    handler = SyncRecorder()
    audit.attach(d, [handler])

    @d.span(request=True)
    def answer(question: str) -> Generator[str, None, None]:
        yield "one"
        raise RuntimeError("model went away")

    with pytest.raises(RuntimeError):
        list(answer("q"))
    (end,) = _ends(handler)
    assert end.abandoned is False and isinstance(end.error, RuntimeError)
