"""What a handler raises that is no ``Exception``.

pydantic-core's ``PanicException``, an ``asyncio.CancelledError`` out of a sync call
and ``GeneratorExit`` can only be the handler's own: reported and counted, as an
``Exception`` is. ``KeyboardInterrupt`` and ``SystemExit`` reach the caller, once the
span has ended in every span handler that saw it start.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from instrumentation import (
    BaseEvent,
    BaseEventHandler,
    SimpleSpanHandler,
    get_dispatcher,
    telemetry,
)
from instrumentation.context import current_span, register_bridge, unregister_bridge
from instrumentation.events.span import SpanDropEvent
from instrumentation.llms import OfflineLLM

from ._support import EventList, Recorder, fresh


class Note(BaseEvent):
    value: Any = None


class _GrowsItsDict:
    """Adds to the dict it is in when printed: another thread changing a dict in the
    moment pydantic reads it, made certain."""

    def __init__(self, owner: dict[Any, Any]) -> None:
        self.owner = owner

    def __repr__(self) -> str:
        self.owner[len(self.owner)] = "added"
        return "_GrowsItsDict()"


def _a_changing_dict() -> dict[Any, Any]:
    shared: dict[Any, Any] = {}
    shared["odd"] = _GrowsItsDict(shared)
    return shared


def _read_a_cancelled_future() -> None:
    """What a sync handler does that raises ``asyncio.CancelledError``: no cancellation
    of the caller's, which comes in at an ``await`` only."""
    loop = asyncio.new_event_loop()
    try:
        future = loop.create_future()
        future.cancel()
        future.result()
    finally:
        loop.close()


def _stop(kind: str) -> None:
    if kind == "sys.exit":
        sys.exit(3)
    raise KeyboardInterrupt


STOPS = {"sys.exit": SystemExit, "KeyboardInterrupt": KeyboardInterrupt}


class Dumps(BaseEventHandler):
    """Writes each event as JSON, as a handler shipping events does."""

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        event.model_dump_json(fallback=repr)


class ReadsCancelled(BaseEventHandler):
    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        _read_a_cancelled_future()


def test_a_pydantic_panic_in_an_event_handler_is_its_error() -> None:
    """pydantic-core panics on a dict that changes while it writes it, and its
    PanicException is no Exception: it reached the application out of ``event()``,
    and the handlers after the panicking one never got the event."""
    d = get_dispatcher(fresh())
    after = EventList()
    d.add_event_handler(Dumps())
    d.add_event_handler(after)
    d.event(Note(value=_a_changing_dict()))
    assert len(after.events) == 1
    assert telemetry.handler_errors() == {"Dumps": 1}


def test_a_cancelled_error_from_a_sync_event_handler_does_not_cancel_the_caller() -> None:
    """A sync handler's CancelledError is none of the caller's task's: it ended the task
    as cancelled."""
    d = get_dispatcher(fresh())
    after = EventList()
    d.add_event_handler(ReadsCancelled())
    d.add_event_handler(after)

    async def work() -> str:
        d.event(Note())
        return "done"

    assert asyncio.run(work()) == "done"
    assert len(after.events) == 1
    assert telemetry.handler_errors() == {"ReadsCancelled": 1}


@pytest.mark.parametrize("where", ["enter", "exit", "drop"])
def test_a_cancelled_error_from_a_span_handler_is_its_error(where: str) -> None:
    """In span_enter it kept the call from running, in span_exit it cancelled the
    caller's task, in span_drop it took the place of the application's own error."""

    class Cancelled(Recorder):
        def span_enter(self, *args: Any, **kwargs: Any) -> None:
            if where == "enter":
                _read_a_cancelled_future()

        def span_exit(self, *args: Any, **kwargs: Any) -> None:
            if where == "exit":
                _read_a_cancelled_future()

        def span_drop(self, *args: Any, **kwargs: Any) -> None:
            if where == "drop":
                _read_a_cancelled_future()

    d = get_dispatcher(fresh())
    d.add_span_handler(Cancelled())
    good = SimpleSpanHandler()
    d.add_span_handler(good)

    @d.span
    async def ok() -> int:
        return 5

    @d.span
    async def bad() -> None:
        raise ValueError("app error")

    async def both() -> None:
        assert await ok() == 5
        with pytest.raises(ValueError, match="app error"):
            await bad()

    asyncio.run(both())
    assert len(good.completed_spans) == 1 and len(good.dropped_spans) == 1
    assert good.open_spans == {}
    assert telemetry.handler_errors() == {"Cancelled": 2 if where == "enter" else 1}


@pytest.mark.parametrize("kind", STOPS)
def test_a_stop_in_span_enter_drops_the_span_where_it_started(kind: str) -> None:
    """The call is not made, and the stop reaches the caller; the handlers told that
    the span started kept it open for good."""

    class Stops(Recorder):
        def span_enter(self, *args: Any, **kwargs: Any) -> None:
            super().span_enter(*args, **kwargs)
            _stop(kind)

    d = get_dispatcher(fresh())
    before, stops, after = SimpleSpanHandler(), Stops(), Recorder()
    events = EventList()
    for handler in (before, stops, after):
        d.add_span_handler(handler)
    d.add_event_handler(events)
    ran: list[bool] = []

    @d.span
    def work() -> None:
        ran.append(True)

    with pytest.raises(STOPS[kind]):
        work()
    assert ran == []
    assert before.open_spans == {} and len(before.dropped_spans) == 1
    [record] = stops.records.values()
    assert record.status == "drop" and isinstance(record.err, STOPS[kind])
    assert after.records == {}
    [drop] = events.events
    assert isinstance(drop, SpanDropEvent) and drop.err_type == STOPS[kind].__name__
    assert telemetry.SPANS_STARTED.value == telemetry.SPANS_DROPPED.value == 1
    assert telemetry.HANDLER_ERRORS.value == 0


@pytest.mark.parametrize("kind", STOPS)
@pytest.mark.parametrize("where", ["exit", "drop"])
def test_a_stop_in_a_span_end_still_ends_the_span_in_the_handlers_after(
    where: str, kind: str
) -> None:
    """The stop reaches the caller once the handlers after the stopping one have ended
    the span: they kept it open for good (one more open span per Ctrl-C in a
    notebook)."""

    class Stops(Recorder):
        def span_exit(self, *args: Any, **kwargs: Any) -> None:
            if where == "exit":
                _stop(kind)

        def span_drop(self, *args: Any, **kwargs: Any) -> None:
            if where == "drop":
                _stop(kind)

    d = get_dispatcher(fresh())
    stops, after = Stops(), SimpleSpanHandler()
    d.add_span_handler(stops)
    d.add_span_handler(after)

    @d.span
    def work(fails: bool) -> int:
        if fails:
            raise ValueError("app error")
        return 1

    with pytest.raises(STOPS[kind]):
        work(fails=where == "drop")
    assert after.open_spans == {}
    assert len(after.completed_spans if where == "exit" else after.dropped_spans) == 1
    assert telemetry.HANDLER_ERRORS.value == 0


def test_a_stop_in_an_event_handler_of_the_drop_event_still_drops_the_span() -> None:
    """The SpanDropEvent goes out before span_drop: a Ctrl-C in an event handler
    handling it left the span open in every span handler."""

    class StopsOnDrop(BaseEventHandler):
        def handle(self, event: BaseEvent, **kwargs: Any) -> None:
            if isinstance(event, SpanDropEvent):
                raise KeyboardInterrupt

    d = get_dispatcher(fresh())
    spans = SimpleSpanHandler()
    d.add_span_handler(spans)
    d.add_event_handler(StopsOnDrop())

    @d.span
    def work() -> None:
        raise ValueError("app error")

    with pytest.raises(KeyboardInterrupt):
        work()
    assert spans.open_spans == {} and len(spans.dropped_spans) == 1


@pytest.mark.parametrize("where", ["enter", "exit", "drop"])
def test_a_stop_in_a_span_by_hand_leaves_no_span_open(where: str) -> None:
    """``Dispatcher.span_enter``/``span_exit``/``span_drop`` as the decorated calls:
    a stop in ``span_enter`` drops the span in the handlers told of it; in an end,
    the handlers after ends it all the same."""

    class Stops(Recorder):
        def span_enter(self, *args: Any, **kwargs: Any) -> None:
            super().span_enter(*args, **kwargs)
            if where == "enter":
                raise KeyboardInterrupt

        def span_exit(self, *args: Any, **kwargs: Any) -> None:
            super().span_exit(*args, **kwargs)
            if where == "exit":
                raise KeyboardInterrupt

        def span_drop(self, *args: Any, **kwargs: Any) -> None:
            super().span_drop(*args, **kwargs)
            if where == "drop":
                raise KeyboardInterrupt

    d = get_dispatcher(fresh())
    before, stops, after = SimpleSpanHandler(), Stops(), SimpleSpanHandler()
    for handler in (before, stops, after):
        d.add_span_handler(handler)
    bound = inspect.Signature().bind()
    with pytest.raises(KeyboardInterrupt):
        d.span_enter("by-hand-1", bound_args=bound)
        if where == "exit":
            d.span_exit("by-hand-1", bound_args=bound)
        else:
            d.span_drop("by-hand-1", bound_args=bound, err=ValueError("x"))
    assert before.open_spans == {} and after.open_spans == {}
    assert stops.one("by-hand").status != "open"
    assert len(after.completed_spans) + len(after.dropped_spans) == (where != "enter")


class Awaits(BaseEventHandler):
    future: Any = None

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        return None

    async def ahandle(self, event: BaseEvent, **kwargs: Any) -> None:
        await self.future


@pytest.mark.skipif(sys.version_info < (3, 11), reason="Task.cancelling() is 3.11's")
@pytest.mark.parametrize("handlers", [1, 2])
def test_an_async_handlers_own_cancelled_error_does_not_cancel_the_caller(handlers: int) -> None:
    """An ``ahandle`` awaiting a future that something else cancelled: its
    CancelledError ended the caller's task as cancelled (awaited there, or through
    ``gather``)."""

    async def work() -> str:
        future = asyncio.get_running_loop().create_future()
        future.cancel()
        d = get_dispatcher(fresh())
        for _ in range(handlers):
            d.add_event_handler(Awaits(future=future))
        await d.aevent(Note())
        return "done"

    assert asyncio.run(work()) == "done"
    assert telemetry.handler_errors() == {"Awaits": handlers}


@pytest.mark.parametrize("handlers", [1, 2])
def test_the_callers_cancellation_inside_an_async_handler_reaches_it(handlers: int) -> None:
    """The caller's task cancelled while a handler awaits: the cancellation is the
    caller's, and is raised, not reported."""

    async def work() -> None:
        never = asyncio.get_running_loop().create_future()
        d = get_dispatcher(fresh())
        for _ in range(handlers):
            d.add_event_handler(Awaits(future=never))
        task = asyncio.ensure_future(d.aevent(Note()))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(work())
    assert telemetry.HANDLER_ERRORS.value == 0


def test_a_coroutine_closed_while_an_async_handler_awaits_is_closed() -> None:
    """There ``GeneratorExit`` is the caller's, not the handler's error: reported, it
    left the coroutine running on after its close ("coroutine ignored GeneratorExit")."""
    loop = asyncio.new_event_loop()
    try:
        d = get_dispatcher(fresh())
        d.add_event_handler(Awaits(future=loop.create_future()))

        async def work() -> None:
            await d.aevent(Note())

        coro = work()
        coro.send(None)  # to the handler's await
        coro.close()
    finally:
        loop.close()
    assert telemetry.HANDLER_ERRORS.value == 0


class StopsHandling(BaseEventHandler):
    """Ctrl-C (or ``sys.exit()``) while it handles an event, sync or awaited."""

    kind: str = "KeyboardInterrupt"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        _stop(self.kind)


class AwaitsThenStops(StopsHandling):
    async def ahandle(self, event: BaseEvent, **kwargs: Any) -> None:
        await asyncio.sleep(0)
        _stop(self.kind)


class AwaitedList(EventList):
    """Keeps the events given to its own ``ahandle``, which waits its turn first."""

    async def ahandle(self, event: BaseEvent, **kwargs: Any) -> None:
        await asyncio.sleep(0.01)
        self.events.append(event)


def _stopping_tree(stops: BaseEventHandler, after: BaseEventHandler) -> tuple[Any, EventList]:
    """A dispatcher whose chain is ``stops``, ``after``, then its parent's handler."""
    parent = get_dispatcher(fresh())
    child = get_dispatcher(f"{parent.name}.child")
    parents = EventList()
    parent.add_event_handler(parents)
    child.add_event_handler(stops)
    child.add_event_handler(after)
    return child, parents


@pytest.mark.parametrize("kind", STOPS)
def test_a_stop_in_an_event_handler_still_reaches_the_handlers_after(kind: str) -> None:
    """The stop reaches the caller once the handlers after the stopping one, its
    parents' among them, have the event: they never got it (a Ctrl-C cost the
    storage and the exporter on the root the event)."""
    after = EventList()
    d, parents = _stopping_tree(StopsHandling(kind=kind), after)
    with pytest.raises(STOPS[kind]):
        d.event(Note(value=1))
    assert [e.value for e in after.events] == [1]  # type: ignore[attr-defined]
    assert [e.value for e in parents.events] == [1]  # type: ignore[attr-defined]
    assert telemetry.HANDLER_ERRORS.value == 0


def test_a_second_stop_in_an_event_handler_after_a_stop_is_raised_at_once() -> None:
    """As for a span's end (``end_after_a_stop``): Ctrl-C pressed again stops there."""
    d, parents = _stopping_tree(StopsHandling(), StopsHandling(kind="sys.exit"))
    with pytest.raises((KeyboardInterrupt, SystemExit)) as raised:
        d.event(Note())
    assert type(raised.value) is SystemExit
    assert isinstance(raised.value.__context__, KeyboardInterrupt)
    assert parents.events == []


@pytest.mark.parametrize("awaited", [False, True], ids=["default-ahandle", "own-ahandle"])
def test_a_stop_in_an_event_handler_under_aevent_reaches_the_others_and_the_caller(
    awaited: bool,
) -> None:
    """With handlers that keep the default ``ahandle``, as with ``event()``. With
    their own, each in a task of ``gather``: the stop, raised in its task, stopped the
    event loop there and then, so that the handlers beside it never had the event,
    and the caller's ``except KeyboardInterrupt`` never saw it."""
    after = AwaitedList() if awaited else EventList()
    stops = AwaitsThenStops() if awaited else StopsHandling()
    d, parents = _stopping_tree(stops, after)

    async def caller() -> str:
        try:
            await d.aevent(Note(value=2))
        except KeyboardInterrupt:
            return "caught"
        return "not raised"

    try:
        outcome = asyncio.run(caller())
    except KeyboardInterrupt:
        outcome = "out of the event loop"
    assert outcome == "caught"
    assert [e.value for e in after.events] == [2]  # type: ignore[attr-defined]
    assert [e.value for e in parents.events] == [2]  # type: ignore[attr-defined]
    assert telemetry.HANDLER_ERRORS.value == 0


def test_a_stop_in_an_event_handler_of_the_drop_event_reaches_the_handlers_after() -> None:
    """The SpanDropEvent goes to the event handlers after the stopping one as well."""
    d = get_dispatcher(fresh())
    spans, after = SimpleSpanHandler(), EventList()
    d.add_span_handler(spans)
    d.add_event_handler(StopsHandling())
    d.add_event_handler(after)

    @d.span
    def work() -> None:
        raise ValueError("app error")

    with pytest.raises(KeyboardInterrupt):
        work()
    assert [type(e) for e in after.events] == [SpanDropEvent]
    assert spans.open_spans == {} and len(spans.dropped_spans) == 1


class StopsAttaching:
    """A bridge (see ``instrumentation.context.ContextBridge``) whose ``attach`` is
    where Ctrl-C comes."""

    def __init__(self) -> None:
        self.attached: list[Any] = []

    def parent_for(self, own: Any) -> Any:
        return own

    def attach(self, span: Any) -> object:
        raise KeyboardInterrupt

    def detach(self, token: object) -> None:
        self.attached.remove(token)


class Attaches(StopsAttaching):
    """A bridge that works: what it holds attached is in ``attached``."""

    def attach(self, span: Any) -> object:
        self.attached.append(span)
        return span


def _run_traced(kind: str, d: Any) -> None:
    """Enter a span of ``d`` the way ``kind`` says (each makes the span current)."""

    @d.span
    def call() -> None:
        pass

    @d.span
    async def coroutine() -> None:
        pass

    @d.span
    def generator() -> Iterator[int]:
        yield 1

    @d.span
    async def async_generator() -> AsyncIterator[int]:
        yield 1

    async def read_all() -> None:
        async for _ in async_generator():
            pass

    if kind == "LLM stream":
        list(OfflineLLM().stream_chat("hi"))
    elif kind == "call":
        call()
    elif kind == "coroutine":
        asyncio.run(coroutine())
    elif kind == "generator":
        list(generator())
    elif kind == "async generator":
        asyncio.run(read_all())
    else:
        with d.span("block"):
            pass


@pytest.mark.parametrize(
    "kind", ["call", "coroutine", "generator", "async generator", "block", "LLM stream"]
)
def test_a_stop_in_a_bridges_attach_leaves_nothing_current_nor_open(kind: str) -> None:
    """A bridge's ``attach`` raising Ctrl-C as a span was entered: the span stayed
    current, the bridges before it attached, and the span open in every handler."""
    d = get_dispatcher(fresh())
    spans, recorder = SimpleSpanHandler(), Recorder()
    get_dispatcher().add_span_handler(spans)  # the root: the LLM's spans reach it too
    get_dispatcher().add_span_handler(recorder)
    works, stops = Attaches(), StopsAttaching()
    register_bridge(works)
    register_bridge(stops)
    try:
        with pytest.raises(KeyboardInterrupt):
            _run_traced(kind, d)
    finally:
        unregister_bridge(stops)
        unregister_bridge(works)
    assert current_span() is None
    assert works.attached == []
    assert spans.open_spans == {} and len(spans.dropped_spans) == 1
    [record] = recorder.records.values()
    assert record.status == "drop" and isinstance(record.err, KeyboardInterrupt)
    assert telemetry.SPANS_STARTED.value == telemetry.SPANS_DROPPED.value == 1
    assert telemetry.HANDLER_ERRORS.value == 0


class StopsAttachingWhenArmed(Attaches):
    """A bridge that works until ``armed``, then raises Ctrl-C in ``attach``."""

    armed = False

    def attach(self, span: Any) -> object:
        if self.armed:
            raise KeyboardInterrupt
        return super().attach(span)


@pytest.mark.parametrize("kind", ["generator", "async generator"])
def test_a_stop_in_a_bridges_attach_as_a_traced_generator_is_closed_drops_its_span(
    kind: str,
) -> None:
    """Closing a traced generator makes its span current again (its ``finally`` runs
    in it). A bridge's stop there, unlike one as it is entered or resumed, left the
    span open for good in every handler."""
    d = get_dispatcher(fresh())
    spans, recorder = SimpleSpanHandler(), Recorder()
    d.add_span_handler(spans)
    d.add_span_handler(recorder)
    bridge = StopsAttachingWhenArmed()

    @d.span
    def generator() -> Iterator[int]:
        yield 1
        yield 2

    @d.span
    async def async_generator() -> AsyncIterator[int]:
        yield 1
        yield 2

    async def close_after_one() -> None:
        agen = async_generator()
        await agen.__anext__()
        bridge.armed = True
        await agen.aclose()

    register_bridge(bridge)
    try:
        with pytest.raises(KeyboardInterrupt):
            if kind == "generator":
                gen = generator()
                next(gen)
                bridge.armed = True
                gen.close()
            else:
                asyncio.run(close_after_one())
    finally:
        unregister_bridge(bridge)
    assert current_span() is None and bridge.attached == []
    assert spans.open_spans == {} and len(spans.dropped_spans) == 1
    [record] = recorder.records.values()
    assert record.status == "drop" and isinstance(record.err, KeyboardInterrupt)
    assert telemetry.HANDLER_ERRORS.value == 0


class Slow(EventList):
    """Its own ``ahandle`` takes a while (long past the caller's timeout below)."""

    async def ahandle(self, event: BaseEvent, **kwargs: Any) -> None:
        await asyncio.sleep(5)


def test_a_stop_in_an_event_handler_under_aevent_survives_the_callers_cancellation() -> None:
    """A handler's Ctrl-C, waiting for a slow handler beside it, was lost when the
    caller's task was cancelled meanwhile (a timeout): the caller saw only the
    cancellation, and nothing logged or counted the stop."""
    d, _ = _stopping_tree(AwaitsThenStops(), Slow())

    async def caller() -> str:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().call_later(0.2, task.cancel)
        try:
            await d.aevent(Note())
        except KeyboardInterrupt as stop:
            assert isinstance(stop.__context__, asyncio.CancelledError)
            return "stopped"
        except asyncio.CancelledError:
            return "cancelled, the stop lost"
        return "not raised"

    assert asyncio.run(caller()) == "stopped"
    assert telemetry.HANDLER_ERRORS.value == 0
