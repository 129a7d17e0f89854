"""Exceptions drop the span with a SpanDropEvent and are re-raised unchanged, cancellation and
interrupts included.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from typing import Any

import pytest

from instrumentation import (
    Dispatcher,
    SimpleSpanHandler,
    SpanDropEvent,
    current_span,
    get_dispatcher,
)
from instrumentation._text import MAX_TEXT_CHARS

from ._support import EventList, Recorder, fresh


@pytest.fixture
def d() -> Dispatcher:
    return get_dispatcher(fresh())


@pytest.fixture
def rec(d: Dispatcher) -> Recorder:
    r = Recorder()
    d.add_span_handler(r)
    return r


@pytest.fixture
def events(d: Dispatcher) -> EventList:
    h = EventList()
    d.add_event_handler(h)
    return h


class AppError(Exception):
    pass


def test_exception_drops_span_emits_event_and_reraises_same_object(
    d: Dispatcher, rec: Recorder, events: EventList
) -> None:
    """The very exception object reaches the caller; span_drop gets it; a SpanDropEvent names the
    span and the error.
    """
    err = AppError("bad thing")

    @d.span
    def f() -> None:
        raise err

    with pytest.raises(AppError) as caught:
        f()
    assert caught.value is err
    (r,) = rec.records.values()
    assert r.status == "drop" and r.err is err
    (ev,) = events.events
    assert isinstance(ev, SpanDropEvent)
    assert ev.span_id == r.id_ and ev.trace_id == r.trace_id and ev.err_str == "bad thing"
    assert current_span() is None


def test_traceback_is_unchanged(d: Dispatcher, rec: Recorder) -> None:
    """The re-raised exception's traceback still ends in the function that raised it."""

    @d.span
    def deep() -> None:
        raise AppError("x")

    with pytest.raises(AppError) as caught:
        deep()
    assert caught.traceback[-1].name == "deep"


def test_parent_survives_child_error(d: Dispatcher, rec: Recorder) -> None:
    """A child that raises is dropped while its parent, which catches, exits normally."""

    @d.span
    def child() -> None:
        raise AppError("x")

    @d.span
    def parent() -> str:
        try:
            child()
        except AppError:
            return "caught"
        return "no"

    assert parent() == "caught"
    p = rec.one(parent.__qualname__)
    c = rec.one(child.__qualname__)
    assert (p.status, c.status, c.parent_id) == ("exit", "drop", p.id_)


async def test_coroutine_exception(d: Dispatcher, rec: Recorder, events: EventList) -> None:
    """A coroutine's exception drops its span and is re-raised unchanged."""

    @d.span
    async def f() -> None:
        await asyncio.sleep(0)
        raise AppError("async bad")

    with pytest.raises(AppError, match="async bad"):
        await f()
    assert next(iter(rec.records.values())).status == "drop"
    assert isinstance(events.events[0], SpanDropEvent)


async def test_cancelled_error_drops_and_propagates(d: Dispatcher, rec: Recorder) -> None:
    """Cancelling a task inside a decorated coroutine drops its span and the task ends cancelled."""
    started = asyncio.Event()

    @d.span
    async def slow() -> None:
        started.set()
        await asyncio.sleep(30)

    task = asyncio.create_task(slow())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    (r,) = rec.records.values()
    assert r.status == "drop" and isinstance(r.err, asyncio.CancelledError)


async def test_wait_for_timeout_drops(d: Dispatcher, rec: Recorder) -> None:
    """asyncio.wait_for timing out a decorated coroutine drops its span and raises TimeoutError."""

    @d.span
    async def slow() -> None:
        await asyncio.sleep(30)

    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(slow(), 0.01)
    (r,) = rec.records.values()
    assert r.status == "drop" and isinstance(r.err, asyncio.CancelledError)


def test_keyboard_interrupt_drops_and_propagates(d: Dispatcher, rec: Recorder) -> None:
    """KeyboardInterrupt raised by the function drops the span and reaches the caller."""

    @d.span
    def f() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        f()
    (r,) = rec.records.values()
    assert r.status == "drop" and isinstance(r.err, KeyboardInterrupt)


def test_generator_close_drops_with_generator_exit(d: Dispatcher, rec: Recorder) -> None:
    """close() on a half-consumed generator drops its span with GeneratorExit and runs its finally
    block.
    """
    cleaned: list[bool] = []

    @d.span
    def gen() -> Generator[int, None, None]:
        try:
            yield 1
            yield 2
        finally:
            cleaned.append(current_span() is not None)

    it = gen()
    assert next(it) == 1
    it.close()
    (r,) = rec.records.values()
    assert r.status == "drop" and isinstance(r.err, GeneratorExit)
    assert cleaned == [True]  # the generator's cleanup ran inside its own span
    assert current_span() is None


def test_generator_that_returns_when_closed_ends_its_span(d: Dispatcher, rec: Recorder) -> None:
    """A generator that catches the close and returns chose to finish there: its span
    ends normally, with its cleanup inside it. One that yields again after the close
    gets Python's RuntimeError, and its span is dropped with it."""
    seen: list[str | None] = []

    @d.span
    def finishes() -> Generator[int, None, str]:
        try:
            yield 1
        except GeneratorExit:
            span = current_span()
            seen.append(span.id_ if span is not None else None)
            return "closed"
        return "done"

    @d.span
    def stubborn() -> Iterator[int]:
        while True:
            try:
                yield 1
            except GeneratorExit:
                pass

    it = finishes()
    assert next(it) == 1
    it.close()
    r = rec.one(finishes.__qualname__)
    assert r.status == "exit" and r.result == "closed"
    assert seen == [r.id_]  # its cleanup ran inside its own span
    assert current_span() is None
    bad = stubborn()
    next(bad)
    with pytest.raises(RuntimeError, match="ignored GeneratorExit"):
        bad.close()
    r = rec.one(stubborn.__qualname__)
    assert r.status == "drop" and isinstance(r.err, RuntimeError)


async def test_async_generator_that_returns_when_closed_ends_its_span(
    d: Dispatcher, rec: Recorder
) -> None:
    @d.span
    async def finishes() -> AsyncIterator[int]:
        try:
            yield 1
        except GeneratorExit:
            return

    @d.span
    async def stubborn() -> AsyncIterator[int]:
        while True:
            try:
                yield 1
            except GeneratorExit:
                pass

    it = finishes()
    assert await it.__anext__() == 1
    await it.aclose()
    assert rec.one(finishes.__qualname__).status == "exit"
    bad = stubborn()
    await bad.__anext__()
    with pytest.raises(RuntimeError, match="ignored GeneratorExit"):
        await bad.aclose()
    r = rec.one(stubborn.__qualname__)
    assert r.status == "drop" and isinstance(r.err, RuntimeError)


def test_generator_closed_before_start(d: Dispatcher, rec: Recorder) -> None:
    """Closing a generator that never ran leaves no span behind: its span starts with
    its first step, and it never took one."""

    @d.span
    def gen() -> Generator[int, None, None]:
        yield 1

    unstarted = gen()
    assert rec.records == {}
    unstarted.close()
    assert rec.records == {}


def test_generator_raising_mid_iteration(d: Dispatcher, rec: Recorder) -> None:
    """A generator that raises after some items drops its span and the consumer gets the same
    exception.
    """
    err = AppError("mid")

    @d.span
    def gen() -> Iterator[int]:
        yield 1
        raise err

    it = gen()
    assert next(it) == 1
    with pytest.raises(AppError) as caught:
        next(it)
    assert caught.value is err
    (r,) = rec.records.values()
    assert r.status == "drop" and r.err is err


async def test_async_generator_aclose_and_raise(d: Dispatcher, rec: Recorder) -> None:
    """aclose() drops an async generator's span with GeneratorExit; raising inside drops it with
    the error.
    """

    @d.span
    async def agen() -> AsyncGenerator[int, None]:
        yield 1
        yield 2

    @d.span
    async def bad() -> AsyncIterator[int]:
        yield 1
        raise AppError("agen")

    it = agen()
    assert await it.__anext__() == 1
    await it.aclose()
    r = rec.one(agen.__qualname__)
    assert r.status == "drop" and isinstance(r.err, GeneratorExit)
    with pytest.raises(AppError, match="agen"):
        async for _ in bad():
            pass
    assert rec.one(bad.__qualname__).status == "drop"


async def test_async_generator_cancelled(d: Dispatcher, rec: Recorder) -> None:
    """Cancelling a task iterating a traced async generator drops its span (CancelledError)."""
    started = asyncio.Event()

    @d.span
    async def agen() -> AsyncIterator[int]:
        yield 1
        started.set()
        await asyncio.sleep(30)
        yield 2

    async def consume() -> None:
        async for _ in agen():
            pass

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (r,) = rec.records.values()
    assert r.status == "drop" and isinstance(r.err, asyncio.CancelledError)


def test_span_block_exception(d: Dispatcher, rec: Recorder, events: EventList) -> None:
    """An exception in a `with d.span(...)` block drops its span and propagates unchanged."""
    err = AppError("in block")
    with pytest.raises(AppError) as caught, d.span("block"):
        raise err
    assert caught.value is err
    r = rec.one("block")
    assert r.status == "drop" and r.err is err
    assert isinstance(events.events[0], SpanDropEvent)


def test_async_generator_open_when_asyncio_run_returns_is_dropped_once(
    d: Dispatcher, rec: Recorder
) -> None:
    """The loop's shutdown closes the traced wrapper and the generator inside it at the
    same time: the span is dropped once, for the close, whichever goes first (it used to
    be dropped with 'athrow(): asynchronous generator is already running')."""

    @d.span
    async def agen() -> AsyncIterator[int]:
        try:
            yield 1
            yield 2
        finally:
            await asyncio.sleep(0)  # clean-up that awaits, like closing a response

    kept: list[object] = []

    async def main() -> None:
        it = agen()
        await it.__anext__()
        kept.append(it)

    for _ in range(8):
        asyncio.run(main())
        kept.clear()
    records = rec.named(agen.__qualname__)
    assert len(records) == 8
    assert all(r.status == "drop" and isinstance(r.err, GeneratorExit) for r in records)


def test_async_generator_open_when_asyncio_run_returns_closes_quietly(
    d: Dispatcher, rec: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """At ``asyncio.run``'s end a traced async generator left open is closed as an
    undecorated one is: its clean-up runs to the end and asyncio logs nothing. The loop
    used to close the generator inside the wrapper too, beside the wrapper, and log
    'aclose(): asynchronous generator is already running' whenever the wrapper went
    first."""
    cleaned: list[int] = []

    @d.span
    async def agen(n: int) -> AsyncIterator[int]:
        try:
            yield n
            yield n + 1
        finally:
            await asyncio.sleep(0)  # clean-up that awaits, like closing a response
            cleaned.append(n)

    kept: list[object] = []

    async def main() -> None:
        for n in range(6):
            it = agen(n)
            await it.__anext__()
            kept.append(it)

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(main())
    kept.clear()
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
    assert sorted(cleaned) == list(range(6))
    records = rec.named(agen.__qualname__)
    assert len(records) == 6
    assert all(r.status == "drop" and isinstance(r.err, GeneratorExit) for r in records)


def test_async_generators_a_traced_one_starts_stay_the_loops_to_close(d: Dispatcher) -> None:
    """Hiding the generator inside the wrapper from the loop hides nothing else: an
    async generator its body starts is still closed by ``asyncio.run``'s shutdown, with
    its awaiting clean-up run there."""
    cleaned: list[str] = []

    async def child() -> AsyncIterator[int]:
        try:
            yield 1
            yield 2
        finally:
            await asyncio.sleep(0)
            cleaned.append("child")

    kept: list[object] = []

    @d.span
    async def parent() -> AsyncIterator[int]:
        inner = child()
        kept.append(inner)
        yield await inner.__anext__()
        yield 3

    async def main() -> None:
        it = parent()
        kept.append(it)
        await it.__anext__()

    asyncio.run(main())
    assert cleaned == ["child"]
    kept.clear()


def test_spans_of_a_recursion_that_hits_the_limit_are_all_ended(
    d: Dispatcher, events: EventList
) -> None:
    """A traced function recursing until ``RecursionError`` (which the application
    catches): the spans ended at the limit, where even a handler has no stack left,
    are ended once there is room again, instead of staying open for ever."""
    from instrumentation.span_handlers import SimpleSpanHandler

    spans = SimpleSpanHandler()
    d.add_span_handler(spans)

    @d.span
    def down(n: int) -> int:
        return down(n + 1)

    def pad(k: int) -> int:
        return down(0) if k == 0 else pad(k - 1)

    from instrumentation import telemetry

    started = telemetry.SPANS_STARTED.value
    for k in range(20):
        with pytest.raises(RecursionError):
            pad(k)
    started = telemetry.SPANS_STARTED.value - started
    assert spans.open_spans == {}
    dropped = [s.id_ for s in spans.dropped_spans]
    assert len(set(dropped)) == len(dropped) and not spans.completed_spans
    # Each span is dropped, not lost; at most the deepest of each recursion, whose
    # enter itself found no stack left, is not known to the handler at all.
    assert started - 20 <= len(dropped) <= started
    assert {e.span_id for e in events.events if isinstance(e, SpanDropEvent)} >= set(dropped)


def test_spans_ending_normally_at_the_recursion_limit_are_not_lost(d: Dispatcher) -> None:
    """A recursion caught inside the traced function: every call returns, the deepest
    ones where a handler needing more stack for its exit than its enter has none. Their
    exits are put off, not half done: each span is completed once."""
    from ._support import GuideSpanHandler

    def nested(k: int) -> int:  # the work an exporting handler does at each exit
        return 0 if k == 0 else nested(k - 1)

    known: list[str] = []

    class Exporting(GuideSpanHandler):
        def span_enter(self, id_: str, *args: Any, **kwargs: Any) -> None:
            super().span_enter(id_, *args, **kwargs)
            if id_ in self.open_spans:
                known.append(id_)

        def prepare_to_exit_span(self, id_: str, *args: Any, **kwargs: Any) -> Any:
            nested(15)
            return super().prepare_to_exit_span(id_, *args, **kwargs)

    handler = Exporting()
    d.add_span_handler(handler)

    @d.span
    def down(n: int) -> int:
        try:
            return down(n + 1)
        except RecursionError:
            return n

    def pad(k: int) -> int:
        return down(0) if k == 0 else pad(k - 1)

    for k in range(10):
        pad(k)
    completed = [s.id_ for s in handler.completed_spans]
    # Every span the handler took in is completed, once (the deepest few of each
    # recursion, whose enter itself found no stack left, it never knew of).
    assert len(known) > 1000 and sorted(completed) == sorted(known)
    assert handler.open_spans == {}


def test_drops_put_off_at_the_recursion_limit_keep_their_own_tags(
    d: Dispatcher, events: EventList
) -> None:
    """A drop run later, from another span's end, carries the tags active where its
    own span ended, as every other drop event does."""
    from instrumentation import instrument_tags

    @d.span
    def rec(n: int) -> int:
        with instrument_tags({"level": n}):
            return rec(n + 1)

    with pytest.raises(RecursionError):
        rec(0)
    levels = [e.tags.get("level") for e in events.events if isinstance(e, SpanDropEvent)]
    assert len(levels) > 100 and len(set(levels)) == len(levels)


def test_a_handler_whose_exit_recurses_at_any_depth_is_reported_at_once(d: Dispatcher) -> None:
    """Not a recursion limit reached by the application but a handler's own bug: with
    stack to spare, its RecursionError is reported when the call returns, once."""
    from instrumentation import telemetry

    from ._support import GuideSpanHandler

    calls: list[str] = []

    class Recursing(GuideSpanHandler):
        def prepare_to_exit_span(self, id_: str, *args: Any, **kwargs: Any) -> Any:
            calls.append(id_)
            return self.prepare_to_exit_span(id_, *args, **kwargs)

    handler = Recursing()
    d.add_span_handler(handler)

    @d.span
    def f() -> int:
        return 1

    before = telemetry.handler_errors().get("Recursing", 0)
    f()
    assert telemetry.handler_errors().get("Recursing", 0) == before + 1
    first = len(calls)
    f()  # an unrelated end does not run the first one again
    assert len(calls) == 2 * first and handler.open_spans == {}


def test_a_huge_error_message_is_cut_where_it_becomes_text(
    d: Dispatcher, rec: Recorder, events: EventList
) -> None:
    """An exception's ``str()`` of megabytes (a document quoted in a ValueError) was
    copied whole into the drop event, the span's error and the printed tree; the
    exception itself reaches the caller untouched, and ``span_drop`` gets it."""
    message = "x" * 1_000_000
    err = AppError(message)
    simple = SimpleSpanHandler()
    d.add_span_handler(simple)

    @d.span
    def f() -> None:
        raise err

    with pytest.raises(AppError) as caught:
        f()
    assert caught.value is err and str(err) is message
    (record,) = rec.records.values()
    assert record.err is err
    (drop,) = events.events
    assert isinstance(drop, SpanDropEvent)
    assert drop.err_str == "x" * (MAX_TEXT_CHARS - 3) + "..."
    (span,) = simple.dropped_spans
    assert span.metadata == {"error": f"AppError: {'x' * (MAX_TEXT_CHARS - 3)}..."}
    assert len(simple.format_trace_trees()) < MAX_TEXT_CHARS + 100
