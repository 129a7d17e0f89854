"""Request spans on a dispatcher become audited requests."""

from __future__ import annotations

import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from instrumentation import Dispatcher, audit, get_dispatcher
from instrumentation.audit import RequestStart
from instrumentation.llms import ChatMessage, OfflineLLM, OfflineLLMError

from .helpers import AsyncRecorder, SyncRecorder


class Starts(SyncRecorder):
    def __init__(self) -> None:
        super().__init__()
        self.starts: list[RequestStart] = []

    def request_start(self, user_request: RequestStart) -> Any:
        self.starts.append(user_request)
        return super().request_start(user_request)


def test_request_span_becomes_a_request_and_llm_calls_its_events() -> None:
    d = get_dispatcher("tests.audit.app")
    handler = Starts()
    audit.attach(d, [handler])
    llm = OfflineLLM(answers={"cake": "carrot cake"})  # its spans go through instrumentation.llms

    @d.span(request=True)
    def ask(question: str, user: str = "ann") -> str:
        return str(llm.chat([ChatMessage(role="user", content=question)]).message.content)

    @d.span
    def not_a_request(question: str) -> str:
        return str(llm.chat([ChatMessage(role="user", content=question)]).message.content)

    assert ask("which cake?") == "carrot cake"
    not_a_request("which cake? (not audited)")
    handler.rec.check(expected_requests=1, events_per_request=1)
    start = handler.starts[0]
    assert start.question == "which cake?"
    assert start.collection == "tests.audit.app"  # no collection given: the dispatcher's name
    assert start.metadata["span_name"].endswith("ask")
    assert handler.rec.request_ends[0][0].result == "carrot cake"


def test_question_and_collection_mapping() -> None:
    d = get_dispatcher("tests.audit.mapping")
    handler = Starts()
    audit.attach(d, [handler], collection="fixed")

    @d.span(request=True)
    def by_query(limit: int, query: str) -> None: ...

    @d.span(request=True)
    def first_str(limit: int, text: str, other: str) -> None: ...

    @d.span(request=True)
    def with_collection_arg(question: str, collection: str) -> None: ...

    @d.span(request=True, attributes={"collection": "from-attributes"})
    def with_attribute(question: str) -> None: ...

    @d.span(request=True)
    def nothing(limit: int) -> None: ...

    by_query(3, "q1")
    first_str(3, "q2", "ignored")
    with_collection_arg("q3", "recipes")
    with_attribute(question="q4")
    nothing(1)
    got = [(s.question, s.collection) for s in handler.starts]
    assert got == [
        ("q1", "fixed"),
        ("q2", "fixed"),
        ("q3", "recipes"),
        ("q4", "from-attributes"),
        ("", "fixed"),
    ]


def test_defaults_count_as_arguments_and_other_handlers_see_the_call_as_made() -> None:
    """A question or collection the call leaves to its default is the request's too;
    the bound arguments the other span handlers get stay the call's own."""
    from instrumentation.span_handlers import SimpleSpanHandler

    d = get_dispatcher("tests.audit.defaults")
    handler = Starts()
    audit.attach(d, [handler], collection="fixed")
    seen: list[dict[str, Any]] = []

    class Arguments(SimpleSpanHandler):
        def span_enter(self, id_: str, bound_args: Any, *args: Any, **kwargs: Any) -> None:
            seen.append(dict(bound_args.arguments))

    d.add_span_handler(Arguments())

    @d.span(request=True)
    def ask(limit: int, query: str = "the default", collection: str = "menu") -> None: ...

    class Service:
        @d.span(request=True)
        def ask(self, question: str = "default question") -> None: ...

    @d.span(request=True)
    def handle(body: dict[str, Any], system_prompt: str = "secret rules") -> None: ...

    @d.span(request=True)
    def answer(text: str, query: str = "") -> None: ...

    @d.span(request=True)
    def search(top_k: int = 5, collection: str = "docs") -> None: ...

    ask(1)
    ask(1, "given", collection="wines")
    Service().ask()
    handle({"text": 1})  # another str default is no question: it stays out of the audit
    answer("What is passed?")  # a string passed comes before a question's default
    search(3)  # the collection's default is no question
    got = [(s.question, s.collection) for s in handler.starts]
    assert got == [
        ("the default", "menu"),
        ("given", "wines"),
        ("default question", "fixed"),
        ("", "fixed"),
        ("What is passed?", "fixed"),
        ("", "docs"),
    ]
    assert seen[:4] == [
        {"limit": 1},
        {"limit": 1, "query": "given", "collection": "wines"},
        {},
        {"body": {"text": 1}},
    ]


def test_request_span_on_a_child_dispatcher_and_span_block() -> None:
    parent = get_dispatcher("tests.audit.tree")
    child = get_dispatcher("tests.audit.tree.child")
    handler = SyncRecorder()
    audit.attach(parent, [handler])
    llm = OfflineLLM()
    with child.span("handle", request=True) as block:
        llm.chat([ChatMessage(role="user", content="")])
        block.result = "done"
    handler.rec.check(expected_requests=1, events_per_request=1)
    assert handler.rec.request_ends[0][0].result == "done"


def test_raising_request_span_and_failed_llm_call() -> None:
    d = get_dispatcher("tests.audit.fail")
    handler = SyncRecorder()
    audit.attach(d, [handler])
    llm = OfflineLLM(fail_with="provider down")

    @d.span(request=True)
    def ask(question: str) -> str:
        try:
            llm.chat([ChatMessage(role="user", content=question)])
        except OfflineLLMError:
            pass
        raise LookupError("no answer")

    with pytest.raises(LookupError):
        ask("q")
    output, _ = handler.rec.request_ends[0]
    assert isinstance(output.error, LookupError)
    (_, event_ctx, event) = handler.rec.event_ends[0]
    assert event.response is None and "provider down" in event.error
    assert event_ctx is handler.rec.returned_events[0]


def test_llm_call_in_a_plain_sub_span_and_thread_is_attributed() -> None:
    from instrumentation import Thread

    d = get_dispatcher("tests.audit.deep")
    other = get_dispatcher("somewhere.else.entirely")
    handler = AsyncRecorder()
    audit.attach(d, [handler])
    llm = OfflineLLM()

    @other.span
    def helper(question: str) -> None:
        llm.chat([ChatMessage(role="user", content=question)])

    @d.span(request=True)
    def ask(question: str) -> None:
        helper(question)
        worker = Thread(target=helper, args=(question + " (thread)",))
        worker.start()
        worker.join()

    ask("deep question")
    handler.rec.check(expected_requests=1, events_per_request=2)


def test_detach_and_bad_arguments() -> None:
    d = get_dispatcher("tests.audit.detach")
    handler = SyncRecorder()
    adapter = audit.attach(d, [handler])

    @d.span(request=True)
    def ask(question: str) -> None: ...

    adapter.detach()
    ask("q")
    assert handler.rec.calls == []
    with pytest.raises(TypeError, match="dispatcher"):
        audit.attach("tests.audit", [handler])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must subclass"):
        audit.attach(d, [object()])  # type: ignore[list-item]


@contextmanager
def _request_held_open(d: Dispatcher) -> Iterator[None]:
    """A request (a ``request=True`` span of ``d``) running in a thread and held open
    for the block; let go and joined after it."""
    entered, release = threading.Event(), threading.Event()

    @d.span(request=True)
    def ask(question: str) -> None:
        entered.set()
        release.wait(5)

    worker = threading.Thread(target=ask, args=("q",))
    worker.start()
    try:
        assert entered.wait(5)
        yield
    finally:
        release.set()
        worker.join(5)


def test_shutdown_ends_open_requests() -> None:
    d = get_dispatcher("tests.audit.shutdown")
    handler = SyncRecorder()
    audit.attach(d, [handler])
    with _request_held_open(d):
        d.shutdown()
    for _ in range(200):
        if handler.rec.request_ends:
            break
        threading.Event().wait(0.01)
    assert "shut down" in str(handler.rec.request_ends[0][0].error)


def test_flush_after_shutdown_waits_for_the_requests_it_ended() -> None:
    """Requests ended by Dispatcher.shutdown() were not tracked: flush() answered True
    at once while their handlers were still running."""
    import asyncio

    from instrumentation.audit import RequestEnd

    class Slow(AsyncRecorder):
        async def request_end(self, output: RequestEnd, request_context: Any) -> None:
            await asyncio.sleep(0.2)
            self.rec.request_end(output, request_context)

    d = get_dispatcher("tests.audit.shutdown_flush")
    handler = Slow()
    adapter = audit.attach(d, [handler], timeout=0)
    with _request_held_open(d):
        d.shutdown()
        assert adapter.flush(timeout=5) is True
        assert len(handler.rec.request_ends) == 1  # was 0: flush did not wait
        assert "shut down" in str(handler.rec.request_ends[0][0].error)


def test_flush_waits_for_handlers_when_the_span_does_not() -> None:
    import asyncio

    from instrumentation.audit import RequestEnd

    class Slow(AsyncRecorder):
        async def request_end(self, output: RequestEnd, request_context: Any) -> None:
            await asyncio.sleep(0.1)
            self.rec.request_end(output, request_context)

    d = get_dispatcher("tests.audit.flush")
    handler = Slow()
    adapter = audit.attach(d, [handler], timeout=0)

    @d.span(request=True)
    def ask(question: str) -> None: ...

    ask("q")
    assert handler.rec.request_ends == []  # timeout=0: the span did not wait
    assert adapter.flush(timeout=5) is True
    assert len(handler.rec.request_ends) == 1


@pytest.mark.parametrize("raises", [False, True])
def test_waiting_for_the_handlers_does_not_lengthen_the_other_handlers_spans(
    raises: bool,
) -> None:
    """The adapter waited inside its span_exit, before the span handlers after it in the
    chain (OpenTelemetry on the root) ended their spans: a call of microseconds was
    exported as a span as long as the audit handlers took. It waits once they all saw
    the span end, still before the call returns."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider

    from instrumentation import root_dispatcher
    from instrumentation.audit import RequestEnd
    from instrumentation.context import unregister_bridge
    from instrumentation.otel import OpenTelemetrySpanHandler
    from instrumentation.otel.bridge import BRIDGE

    span_ended = threading.Event()
    ended: list[ReadableSpan] = []

    class Ends(SpanProcessor):
        def on_end(self, span: ReadableSpan) -> None:
            ended.append(span)
            span_ended.set()

    class WaitsForTheSpanToEnd(SyncRecorder):
        def __init__(self) -> None:
            super().__init__()
            self.span_had_ended: list[bool] = []

        def request_end(self, output: RequestEnd, request_context: Any) -> None:
            # Before the fix the OTel span could only end after this returned.
            self.span_had_ended.append(span_ended.wait(5))
            super().request_end(output, request_context)

    provider = TracerProvider()
    provider.add_span_processor(Ends())
    otel = OpenTelemetrySpanHandler(tracer_provider=provider)
    root_dispatcher.add_span_handler(otel)  # after the adapter in the app's chain
    d = get_dispatcher("tests.audit.otel_after")
    handler = WaitsForTheSpanToEnd()
    adapter = audit.attach(d, [handler], timeout=30)

    @d.span(request=True)
    def ask(question: str) -> str:
        if raises:
            raise ValueError("no answer")
        return "fast answer"

    try:
        if raises:
            with pytest.raises(ValueError):
                ask("q")
        else:
            assert ask("q") == "fast answer"
        # The adapter still waited for its handlers before the call returned.
        assert len(handler.rec.request_ends) == 1
    finally:
        adapter.detach()
        root_dispatcher.remove_span_handler(otel)
        otel.close()
        provider.shutdown()
        unregister_bridge(BRIDGE)
    assert handler.span_had_ended == [True]
    assert [s.name.rsplit(".", 1)[-1] for s in ended] == ["ask"]
    assert adapter._deferred == {}


def test_a_long_request_does_not_keep_the_spans_that_ended_inside_it() -> None:
    """A request span open for long (an agent's loop, a chat session) kept the id of
    every span started inside it until it ended: 400,000 steps, 31 MB."""
    from instrumentation.audit import collector

    d = get_dispatcher("tests.audit.long")
    handler = SyncRecorder()
    audit.attach(d, [handler])
    kept: list[int] = []

    @d.span
    def step(i: int) -> int:
        return i

    @d.span(request=True)
    def session(question: str) -> int:
        for i in range(2_000):
            step(i)
        runs = {run for runs in collector.registry.span_runs.values() for run in runs}
        kept.extend(len(run.span_ids) for run in runs)
        return 0

    session("many steps")
    assert kept == [1]  # the request's own span, not its 2,000 steps
    handler.rec.check(expected_requests=1, events_per_request=0)
    assert not collector.registry.span_runs


def test_a_handler_attached_twice_for_the_same_requests_is_refused() -> None:
    """It ran twice per request (two files from a FileEventHandler); attaching it again
    at the same dispatcher, above it or below it is refused, saying what to do."""
    top = get_dispatcher("tests.audit.twice")
    below = get_dispatcher("tests.audit.twice.below")
    handler, other = SyncRecorder(), SyncRecorder()
    first = audit.attach(top, [handler])
    try:
        for where in (top, below, get_dispatcher("tests.audit")):
            with pytest.raises(ValueError, match="pass all handlers to one attach"):
                audit.attach(where, [other, handler])
        second = audit.attach(below, [other])  # another handler: fine
        second.detach()
    finally:
        first.detach()
    again = audit.attach(below, [handler])  # the first one is gone
    again.detach()
    assert not top.span_handlers and not below.span_handlers


class _SlowEnd(AsyncRecorder):
    """request_end takes a while, as a handler posting to a remote service does."""

    def __init__(self, pause: float) -> None:
        super().__init__()
        self.end_pause = pause

    async def request_end(self, output: Any, request_context: Any) -> None:
        import asyncio

        await asyncio.sleep(self.end_pause)
        self.rec.request_end(output, request_context)


def _ticks_while(coro: Any) -> tuple[int, Any]:
    """How often a 10 ms heartbeat task ran while ``coro`` ran on the same loop."""
    import asyncio

    async def main() -> tuple[int, Any]:
        ticks = 0
        stop = asyncio.Event()

        async def beat() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        beater = asyncio.create_task(beat())
        try:
            result = await coro
        finally:
            stop.set()
            await beater
        return ticks, result

    return asyncio.run(main())


@pytest.mark.parametrize(
    "kind", ["coroutine", "async generator", "async with", "awaitable", "types.coroutine"]
)
def test_async_requests_await_their_handlers_without_blocking_the_loop(kind: str) -> None:
    """An async request returns once its handlers ran (as a sync one does), awaiting
    them: the loop's other tasks run meanwhile. Blocking there held up every task of
    the loop, and concurrent requests waited for each other's handlers in turn."""
    import asyncio

    d = get_dispatcher(f"tests.audit.async_wait.{kind.replace(' ', '_')}")
    handler = _SlowEnd(0.3)
    adapter = audit.attach(d, [handler])  # the default timeout: wait for the handlers

    @d.span(request=True)
    async def ask(question: str) -> str:
        await asyncio.sleep(0)
        return question

    @d.span(request=True)
    async def stream(question: str) -> Any:
        yield question

    @d.span(request=True)
    def later(question: str) -> Any:
        return ask.__wrapped__(question)  # a sync function returning a coroutine

    @d.span(request=True)
    @types.coroutine
    def legacy(question: str) -> Any:  # a generator-based coroutine: it blocked the loop
        yield from asyncio.sleep(0)
        return question

    async def one(i: int) -> None:
        q = f"q{i}"
        if kind == "coroutine":
            await ask(q)
        elif kind == "async generator":
            assert [x async for x in stream(q)] == [q]
        elif kind == "async with":
            async with d.span("block", attributes={"request": True}):
                await asyncio.sleep(0)
        elif kind == "awaitable":
            await later(q)
        else:
            assert await legacy(q) == q
        # Done before the call returned, as for a sync request.
        assert len(handler.rec.request_ends) >= 1

    async def four() -> float:
        loop = asyncio.get_running_loop()
        began = loop.time()
        await asyncio.gather(*(one(i) for i in range(4)))
        return loop.time() - began

    try:
        ticks, took = _ticks_while(four())
    finally:
        adapter.detach()
    assert len(handler.rec.request_ends) == 4
    assert took < 1.0, f"the four requests' handlers ran one after another ({took:.2f}s)"
    assert ticks >= 10, f"the loop was blocked: the heartbeat ran {ticks} times"


@pytest.mark.parametrize("kind", ["traced", "span block"])
def test_an_async_stream_read_no_further_awaits_its_handlers_without_blocking_the_loop(
    kind: str,
) -> None:
    """A stream its caller stops reading is closed by ``aclose()`` (``aclosing``, or the
    loop's hook for one dropped): the span ends there, in async code. It waited for
    the handlers blocking the loop, as in sync code (an ``async with`` request block in
    the stream did until now)."""
    import contextlib

    d = get_dispatcher(f"tests.audit.async_wait.abandoned.{kind.replace(' ', '_')}")
    handler = _SlowEnd(0.3)
    adapter = audit.attach(d, [handler])

    @d.span(request=True)
    async def stream(question: str) -> Any:
        for i in range(10):
            yield i

    async def stream_in_a_block(question: str) -> Any:
        async with d.span("stream", request=True):
            for i in range(10):
                yield i

    async def read_one() -> None:
        made = stream("q") if kind == "traced" else stream_in_a_block("q")
        async with contextlib.aclosing(made) as s:
            async for _ in s:
                break
        assert len(handler.rec.request_ends) == 1  # done before the close returned

    try:
        ticks, _ = _ticks_while(read_one())
    finally:
        adapter.detach()
    assert handler.rec.request_ends[0][0].abandoned is True
    assert ticks >= 10, f"the loop was blocked: the heartbeat ran {ticks} times"


def test_an_async_request_run_without_asyncio_still_waits_for_its_handlers() -> None:
    """A coroutine another event loop runs (trio), or one driven by hand, has no asyncio
    loop to await on: its handlers are waited for as in sync code. asyncio's
    get_running_loop() raised there: reported as the adapter's error on every request,
    and nothing waited."""
    from instrumentation import telemetry

    d = get_dispatcher("tests.audit.async_wait.no_asyncio")
    handler = _SlowEnd(0.2)
    adapter = audit.attach(d, [handler])

    @d.span(request=True)
    async def ask(question: str) -> str:
        return question

    coro = ask("q")
    try:
        with pytest.raises(StopIteration) as stop:
            coro.send(None)
        assert stop.value.value == "q"
        assert len(handler.rec.request_ends) == 1
        assert "AuditAdapter" not in telemetry.handler_errors()
    finally:
        adapter.flush()
        adapter.detach()


def test_two_adapters_with_the_same_fields_are_two() -> None:
    """Each adapter runs requests of its own: equal fields do not make them one."""
    handler = SyncRecorder()
    first = audit.AuditAdapter(handlers=[handler])
    second = audit.AuditAdapter(handlers=[handler])
    assert first == first and first != second
    assert [first, second].index(second) == 1
    assert len({first, second}) == 2


class _FailsOnEachEnd(SyncRecorder):
    def event_end(self, event: Any, request_context: Any, event_context: Any) -> None:
        raise RuntimeError("log service said 500")


class _Gated(SyncRecorder):
    """Held in request_start until its gate opens: every later call waits."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.gate = threading.Event()

    def request_start(self, user_request: Any) -> Any:
        self.entered.set()
        assert self.gate.wait(10)
        return super().request_start(user_request)


def test_an_adapter_sums_what_its_requests_ran_into(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request span has no object to read its handler errors and dropped calls from,
    as an ``audit.request()`` block has: the adapter sums them (logged and counted
    before, but neither readable for its requests alone)."""
    from instrumentation.audit import runner

    monkeypatch.setattr(runner, "MAX_KEPT_ERRORS", 2)
    monkeypatch.setattr(runner, "MAX_QUEUED_CALLS", 5)
    d = get_dispatcher("tests.audit.adapter.tally")
    failing, behind = _FailsOnEachEnd(), _Gated()
    adapter = audit.attach(d, [failing, behind])
    llm = OfflineLLM()

    @d.span(request=True)
    def ask(question: str, steps: int) -> str:
        if not behind.gate.is_set():
            assert behind.entered.wait(10)
        for step in range(steps):
            llm.chat(f"{question} {step}")
        behind.gate.set()
        return question

    try:
        assert adapter.errors == [] and adapter.calls_dropped == 0
        ask("first", 20)
        ask("second", 1)
        assert adapter.flush()
        assert [(e.method, str(e.error)) for e in adapter.errors] == [
            ("event_end", "log service said 500")
        ] * 2
        # Each event_end it was handed failed: the two kept, the others counted.
        handed = len(failing.rec.returned_events)
        assert adapter.errors_omitted == handed - 2
        # The held handler missed 17 events of the first request; the failing one, fast
        # but plain def, what it could not take of the burst (start and end count one).
        assert adapter.calls_dropped == 2 * (17 + 21 - handed)
        monkeypatch.setattr(runner, "MAX_PENDING_REQUESTS", 0)
        ask("third", 0)
        assert adapter.requests_dropped == 1
    finally:
        behind.gate.set()
        adapter.detach()
