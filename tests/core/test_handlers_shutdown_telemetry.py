"""SimpleSpanHandler's bounded buffers and trees, shutdown(), telemetry counters and the testing
kit.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from instrumentation import (
    BaseEvent,
    BaseEventHandler,
    BaseSpanHandler,
    Dispatcher,
    SimpleSpanHandler,
    current_span,
    get_dispatcher,
    root_dispatcher,
    telemetry,
)
from instrumentation.testing import Capture, capture_events, capture_spans, isolated

from ._support import EventList, Recorder, fresh


@pytest.fixture
def d() -> Dispatcher:
    return get_dispatcher(fresh())


def test_simple_span_handler_is_bounded(d: Dispatcher) -> None:
    """With max_completed_spans=5, 20 calls and 20 failures keep only the newest 5 of each."""
    h = SimpleSpanHandler(max_completed_spans=5)
    d.add_span_handler(h)

    made: dict[str, list[str]] = {"f": [], "bad": []}

    def own_id() -> str:
        span = current_span()
        assert span is not None
        return span.id_

    @d.span
    def f(i: int) -> int:
        made["f"].append(own_id())
        return i

    @d.span
    def bad() -> None:
        made["bad"].append(own_id())
        raise ValueError("x")

    for i in range(20):
        f(i)
        with pytest.raises(ValueError):
            bad()
    assert [s.id_ for s in h.completed_spans] == made["f"][15:]
    assert [s.id_ for s in h.dropped_spans] == made["bad"][15:]
    assert h.open_spans == {}
    assert all(s.end_time is not None and s.duration >= 0 for s in h.completed_spans)
    with pytest.raises(ValueError):
        SimpleSpanHandler(max_completed_spans=-1)
    with pytest.raises(ValueError, match="less than or equal to"):  # was an OverflowError
        SimpleSpanHandler(max_completed_spans=10**30)


def test_format_and_print_trace_trees(d: Dispatcher, capsys: pytest.CaptureFixture[str]) -> None:
    """format_trace_trees draws children indented under parents with durations and marks dropped
    spans' errors.
    """
    h = SimpleSpanHandler()
    d.add_span_handler(h)

    @d.span
    def leaf() -> None:
        return None

    @d.span
    def broken() -> None:
        raise RuntimeError("kaput")

    @d.span
    def top() -> None:
        leaf()
        try:
            broken()
        except RuntimeError:
            pass

    top()
    text = h.format_trace_trees()
    lines = text.splitlines()
    assert lines[0].startswith(top.__qualname__)
    assert lines[1].startswith("├── " + leaf.__qualname__)
    assert lines[2].startswith("└── " + broken.__qualname__) and "RuntimeError: kaput" in lines[2]
    assert all(("µs" in ln or "ms" in ln or " s" in ln) for ln in lines)
    h.print_trace_trees()
    assert capsys.readouterr().out.strip() == text
    SimpleSpanHandler().print_trace_trees()
    assert capsys.readouterr().out.strip() == "(no spans)"


_PRINT_IN_CP1252 = """
from instrumentation import get_dispatcher
from instrumentation.span_handlers import SimpleSpanHandler
d = get_dispatcher("cp1252")
h = SimpleSpanHandler()
d.add_span_handler(h)
leaf = d.span(lambda: None, name="leaf\u540d")
d.span(lambda: leaf(), name="root")()
h.print_trace_trees()
"""


def test_print_trace_trees_to_an_output_whose_encoding_lacks_the_tree() -> None:
    """Windows writes a redirected output in cp1252, which has no box-drawing
    characters: print_trace_trees failed with UnicodeEncodeError."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _PRINT_IN_CP1252],
        capture_output=True,
        env={**os.environ, "PYTHONIOENCODING": "cp1252", "PYTHONUTF8": "0"},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    lines = done.stdout.decode("cp1252").splitlines()
    assert lines[0].startswith("root  ") and lines[1].startswith("`-- leaf?  "), lines


class Closing(BaseEventHandler):
    closed: int = 0

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        return None

    def close(self) -> None:
        self.closed += 1


class ClosingSpans(SimpleSpanHandler):
    closed: int = 0

    def close(self) -> None:
        self.closed += 1


def test_shutdown_drops_open_spans_closes_handlers_and_is_safe_twice(d: Dispatcher) -> None:
    """shutdown() drops open spans (counted), closes and detaches handlers once, and a second call
    does nothing.
    """
    spans, events = ClosingSpans(), Closing()
    child = get_dispatcher(f"{d.name}.child")
    child_events = Closing()
    d.add_span_handler(spans)
    d.add_event_handler(events)
    child.add_event_handler(child_events)

    @d.span
    def gen() -> Iterator[int]:
        yield 1
        yield 2

    it = gen()
    next(it)
    blk = d.span("open-block")
    blk.__enter__()
    assert len(spans.open_spans) == 2
    d.shutdown()
    blk.__exit__(None, None, None)
    assert spans.open_spans == {} and len(spans.dropped_spans) == 2
    assert all("shut down" in (s.metadata or {}).get("error", "") for s in spans.dropped_spans)
    assert telemetry.SPANS_DROPPED_BY_SHUTDOWN.value == 2
    assert (spans.closed, events.closed, child_events.closed) == (1, 1, 1)
    assert d.span_handlers == [] and d.event_handlers == [] and child.event_handlers == []
    assert list(it) == [2]  # the application goes on after shutdown
    d.shutdown()
    assert (spans.closed, events.closed) == (1, 1)
    assert telemetry.SPANS_DROPPED_BY_SHUTDOWN.value == 2


class Listening(Closing):
    """Counts the events it gets after it was closed."""

    after_close: list[str] = []

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        if self.closed:
            self.after_close.append(event.class_name())


def test_a_span_ending_after_shutdown_sends_nothing_to_closed_handlers(d: Dispatcher) -> None:
    """A generator open at shutdown() is closed later: its drop event used to reach the
    event handler shutdown() had closed (it went to the handlers the span started with)."""
    events = Listening(after_close=[])
    d.add_event_handler(events)
    d.add_span_handler(SimpleSpanHandler())

    @d.span
    def gen() -> Iterator[int]:
        yield 1
        yield 2

    it = gen()
    next(it)
    d.shutdown()
    it.close()
    assert events.closed == 1 and events.after_close == []
    # A handler attached after the span started sees its drop, as any event then.
    late = EventList()
    d.add_event_handler(late)
    it = gen()
    next(it)
    d.remove_event_handler(late)
    later = EventList()
    d.add_event_handler(later)
    it.close()
    assert [e.class_name() for e in later.events] == ["SpanDropEvent"] and late.events == []


def test_shutting_down_a_subtree_leaves_a_handler_the_rest_of_the_tree_uses(
    d: Dispatcher,
) -> None:
    """A handler attached to ``d`` and to ``d.sub``: ``d.sub.shutdown()`` detaches it from
    ``d.sub`` but does not close it, nor drop the spans it has open elsewhere."""
    sub = get_dispatcher(f"{d.name}.sub")
    shared, own = Listening(after_close=[]), Listening(after_close=[])
    spans = ClosingSpans()
    d.add_event_handler(shared)
    d.add_span_handler(spans)
    sub.add_event_handler(shared)
    sub.add_event_handler(own)
    sub.add_span_handler(spans)
    with d.span("open elsewhere"):
        sub.shutdown()
        assert len(spans.open_spans) == 1
    assert (shared.closed, own.closed, spans.closed) == (0, 1, 0)
    assert sub.event_handlers == [] and sub.span_handlers == []
    assert d.event_handlers == [shared] and d.span_handlers == [spans]
    assert [s.name for s in spans.completed_spans] == ["open elsewhere"]
    sub.event(BaseEvent())  # reaches ``shared`` through ``d`` still
    assert shared.after_close == [] and own.after_close == []
    assert telemetry.SPANS_DROPPED_BY_SHUTDOWN.value == 0


def test_shutdown_survives_a_failing_close(d: Dispatcher) -> None:
    """A handler whose close() raises is counted as a handler error and the others are still
    closed.
    """

    class BadClose(Closing):
        def close(self) -> None:
            raise OSError("disk gone")

    good = Closing()
    d.add_event_handler(BadClose())
    d.add_event_handler(good)
    d.shutdown()
    assert good.closed == 1 and telemetry.handler_errors() == {"BadClose": 1}


def test_telemetry_counters(d: Dispatcher) -> None:
    """Counters count spans started, ended and dropped and events dispatched; snapshot() shows them
    all.
    """
    d.add_span_handler(Recorder())
    d.add_event_handler(EventList())

    @d.span
    def ok() -> None:
        d.event(BaseEvent())

    @d.span
    def bad() -> None:
        raise ValueError

    for _ in range(3):
        ok()
    with pytest.raises(ValueError):
        bad()
    snap = telemetry.snapshot()
    assert snap["spans.started"] == 4 and snap["spans.ended"] == 3 and snap["spans.dropped"] == 1
    assert snap["events.dispatched"] == 4  # three events plus the SpanDropEvent
    assert telemetry.SPANS_STARTED.value == 4
    mine = telemetry.counter("core_tests.things")
    assert telemetry.counter("core_tests.things") is mine
    mine.inc()
    mine.add(4)
    assert mine.value == 5 and telemetry.snapshot()["core_tests.things"] == 5
    with pytest.raises(ValueError, match="only goes up"):
        mine.add(-1)
    telemetry.reset()
    assert mine.value == 0 and telemetry.SPANS_STARTED.value == 0


def test_counters_are_thread_safe() -> None:
    """Eight threads incrementing one counter 10,000 times each give exactly 80,000."""
    import threading

    c = telemetry.counter("core_tests.concurrent")

    def bump() -> None:
        for _ in range(10_000):
            c.inc()

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.value == 80_000


def test_no_handler_means_nothing_counted(d: Dispatcher) -> None:
    """With no handlers the decorated call and event() do no bookkeeping at all."""

    @d.span
    def f() -> None:
        d.event(BaseEvent())

    f()
    assert telemetry.SPANS_STARTED.value == 0 and telemetry.EVENTS_DISPATCHED.value == 0


def test_capture_events_and_spans_restore_handlers(d: Dispatcher) -> None:
    """capture_events()/capture_spans() record the block's pydantic objects and leave the handler
    lists as they were.
    """
    before = (root_dispatcher.event_handlers, root_dispatcher.span_handlers, d.event_handlers)

    @d.span
    def f() -> None:
        d.event(BaseEvent(tags={"a": 1}))

    with capture_events() as events, capture_spans() as spans, capture_events(d) as local:
        f()
    f()
    assert len(events) == 1 and isinstance(events[0], BaseEvent) and events[0].tags == {"a": 1}
    assert len(local) == 1 and local[0] is events[0]
    assert [s.name for s in spans] == [f.__qualname__] and spans.named(f.__qualname__)
    assert f.__qualname__ in spans.tree()
    assert events[0].span_id == spans[0].id_
    assert (
        root_dispatcher.event_handlers,
        root_dispatcher.span_handlers,
        d.event_handlers,
    ) == before


def test_capture_blocks_given_a_name_say_to_pass_the_dispatcher() -> None:
    with pytest.raises(TypeError, match=r"write capture_events\(get_dispatcher\('app'\)\)"):
        capture_events("app").__enter__()  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"capture_spans\(\) takes a Dispatcher or None; got int"):
        capture_spans(3).__enter__()  # type: ignore[arg-type]


def test_captured_events_pick_one_class(d: Dispatcher) -> None:
    """``of(kind)`` on capture_events()' list (and the fixture's events) keeps the events
    of one class and its subclasses, in order; a non-event class is refused."""

    class Miss(BaseEvent):
        key: str

    class DeepMiss(Miss):
        pass

    with capture_events() as events, isolated() as capture:
        d.event(Miss(key="a"))
        d.event(BaseEvent())
        d.event(DeepMiss(key="b"))
    assert [e.key for e in events.of(Miss)] == ["a", "b"]
    assert [e.key for e in capture.events_of(Miss)] == ["a", "b"]
    assert [type(e) for e in capture.events.of(DeepMiss)] == [DeepMiss]
    assert len(events.of(BaseEvent)) == 3 and events == capture.events
    both = capture.events_of((DeepMiss, BaseEvent))  # a tuple, as LLM_END_EVENTS is
    assert [type(e) for e in both] == [Miss, BaseEvent, DeepMiss]
    with pytest.raises(TypeError, match="BaseEvent subclass"):
        events.of(int)  # type: ignore[type-var]


def test_capture_spans_can_be_read_inside_its_block(d: Dispatcher) -> None:
    """As capture_events' list fills as events come, capture_spans' holds the spans
    ended so far whenever it is read."""

    @d.span
    def f() -> None:
        pass

    with capture_spans() as spans:
        assert len(spans) == 0
        f()
        assert len(spans) == 1 and spans[0].name == f.__qualname__
        f()
        assert [s.name for s in spans] == [f.__qualname__] * 2
        f()
        assert [s.name for s in reversed(spans)] == [f.__qualname__] * 3
        f()
        assert len(spans.copy()) == 4 and spans.count(spans[0]) == 1
        assert spans.index(spans[3]) == 3 and len(spans + []) == 4  # noqa: RUF005
    assert len(spans) == 4
    # Reading sorts again only when spans arrived: an index loop stays linear.
    first = spans[0]
    assert all(spans[i] is not None for i in range(len(spans))) and spans[0] is first


def test_capture_spans_at_its_bound_shows_the_newest(d: Dispatcher) -> None:
    """Full (``max_spans``), the list holds the newest spans, though its length no
    longer changes."""

    @d.span
    def f(n: int) -> int:
        return n

    with capture_spans(max_spans=3) as spans:
        for n in range(3):
            f(n)
        assert len(spans) == 3
        first = list(spans)
        for n in range(3, 5):
            f(n)
        assert len(spans) == 3 and list(spans) != first
        assert spans[0].start_time >= first[2].start_time


async def test_capture_blocks_that_overlap_without_nesting_each_see_their_spans(
    d: Dispatcher,
) -> None:
    """Two tasks, each in its own capture block, the second starting before the first
    ends and ending after it: each block sees all its spans, and no handler is left
    attached afterwards (the first block's end used to detach the second's handler,
    and the second's end to attach the first's again, for good)."""
    import asyncio

    before = (root_dispatcher.event_handlers, root_dispatcher.span_handlers)
    first_in, second_in, first_out = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def first() -> int:
        with capture_spans() as spans, capture_events():
            first_in.set()
            await second_in.wait()
            with d.span("first"):
                pass
        first_out.set()
        return len(spans.named("first"))

    async def second() -> int:
        await first_in.wait()
        with capture_spans() as spans, capture_events() as events:
            second_in.set()
            await first_out.wait()  # the first block has ended: this one goes on
            for _ in range(3):
                with d.span("second"):
                    d.event(BaseEvent())
        return len(spans.named("second")) * 10 + len(events)

    assert await asyncio.gather(first(), second()) == [1, 33]
    after = (root_dispatcher.event_handlers, root_dispatcher.span_handlers)
    assert after == before


def test_isolated_restores_state_even_on_error(d: Dispatcher) -> None:
    """isolated() records everything and restores every handler list and propagate flag, also after
    an exception.
    """
    keep = EventList()
    d.add_event_handler(keep)

    @d.span
    def f() -> None:
        d.event(BaseEvent())

    with pytest.raises(RuntimeError), isolated() as cap:
        d.propagate = False
        d.add_event_handler(EventList())
        d.propagate = True
        f()
        assert len(cap.events) == 1 and len(cap.spans) == 1
        assert cap.events_of(BaseEvent) == cap.events and f.__qualname__ in cap.tree()
        d.propagate = False
        raise RuntimeError
    assert d.event_handlers == [keep] and d.propagate is True
    assert root_dispatcher.event_handlers == [] and root_dispatcher.span_handlers == []


def test_pytest_fixture(instrumentation_capture: Capture) -> None:
    """The instrumentation_capture fixture (pytest plugin) records what the test emits."""
    d = get_dispatcher(fresh())

    @d.span
    def f() -> None:
        d.event(BaseEvent())

    f()
    assert len(instrumentation_capture.events) == 1
    assert [s.name for s in instrumentation_capture.spans] == [f.__qualname__]


def test_the_fixture_gives_each_test_its_own_counters_and_error_logs(tmp_path: Any) -> None:
    """A handler's errors in one test were counted in the next, and the 10-second log
    limit kept the next test's first error of the same handler out of its log."""
    import subprocess
    import sys
    import textwrap

    (tmp_path / "test_two.py").write_text(
        textwrap.dedent(
            """
            import logging
            from instrumentation import BaseEvent, BaseEventHandler, get_dispatcher, telemetry

            class Broken(BaseEventHandler):
                def handle(self, event, **kwargs):
                    raise RuntimeError("broken")

            d = get_dispatcher("kit.app")

            def test_first(instrumentation_capture):
                d.add_event_handler(Broken())
                d.event(BaseEvent())
                d.event(BaseEvent())
                assert telemetry.handler_errors() == {"Broken": 2}

            def test_second(instrumentation_capture, caplog):
                assert telemetry.handler_errors() == {}
                d.add_event_handler(Broken())
                with caplog.at_level(logging.ERROR):
                    d.event(BaseEvent())
                assert "Broken" in caplog.text
                assert telemetry.handler_errors() == {"Broken": 1}
                spans = instrumentation_capture.spans
                assert spans.named("nothing") == [] and "0 events" not in repr(
                    instrumentation_capture
                )
            """
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_two.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout


def test_a_capture_clears_between_examples_and_shows_its_counts(d: Dispatcher) -> None:
    """With Hypothesis, one isolated() around the test and clear() per example."""

    @d.span
    def f() -> None:
        d.event(BaseEvent())

    with isolated() as cap:
        f()
        assert repr(cap) == "<Capture: 1 events, 1 spans ended>"
        assert cap.spans.named(f.__qualname__) == list(cap.spans)
        cap.clear()
        assert cap.events == [] and len(cap.spans) == 0
        f()
        assert len(cap.events) == 1 and len(cap.spans) == 1


def test_capture_on_a_dispatcher_made_by_hand_leaves_no_handler() -> None:
    """A dispatcher outside the tree is not in the snapshot; the capture still detaches."""
    alone = Dispatcher(fresh("alone"))
    with capture_events(alone) as events, capture_spans(alone):
        alone.event(BaseEvent())
    assert len(events) == 1
    assert alone.event_handlers == [] and alone.span_handlers == []


def test_isolated_records_dispatchers_that_do_not_propagate(d: Dispatcher) -> None:
    """The capture taps the whole tree, so ``propagate = False`` hides nothing from it."""

    @d.span
    def f() -> None:
        d.event(BaseEvent())

    d.propagate = False
    with isolated() as cap:
        f()
        late = get_dispatcher(fresh("late"))
        late.propagate = False
        late.event(BaseEvent())
    assert len(cap.events) == 2 and [s.name for s in cap.spans] == [f.__qualname__]
    f()
    assert len(cap.events) == 2  # detached afterwards


def test_isolated_puts_back_the_context_and_the_error_switch(d: Dispatcher) -> None:
    """restore_propagation_context() sets the current span and tags with no token to undo
    them; the next test must not inherit them, nor raise_handler_errors.
    """

    @d.span
    def work() -> None:
        return None

    carried = {"traceparent": f"00-{'a' * 32}-{'b' * 16}-01", "instrument_tags": {"tenant": "t1"}}
    with isolated() as cap:
        d.restore_propagation_context(carried)
        telemetry.raise_handler_errors = True
        work()
    assert cap.spans[0].trace_id == "a" * 32
    assert telemetry.raise_handler_errors is False
    with isolated() as after:
        work()
    (span,) = after.spans
    assert span.parent_id is None and span.trace_id != "a" * 32 and span.tags == {}


def test_a_span_open_in_two_handlers_counts_as_one_dropped_by_shutdown(d: Dispatcher) -> None:
    d.add_span_handler(SimpleSpanHandler())
    d.add_span_handler(SimpleSpanHandler())
    with d.span("open-at-shutdown"):
        d.shutdown()
    assert telemetry.SPANS_DROPPED_BY_SHUTDOWN.value == 1


def test_root_shutdown_also_shuts_the_capture_that_taps_the_tree(d: Dispatcher) -> None:
    with isolated() as cap:
        with d.span("open-at-shutdown"):
            root_dispatcher.shutdown()
        d.event(BaseEvent())
    assert [(s.name, s in cap._spans.dropped_spans) for s in cap.spans] == [
        ("open-at-shutdown", True)
    ]
    assert cap.events == []


def test_spans_ending_while_shutdown_drops_them_end_once_and_are_counted_right(
    d: Dispatcher,
) -> None:
    """Another thread ends the calls while shutdown drops their spans: each span is
    completed or dropped, never both, and only the dropped ones are counted."""
    import threading

    class Slow(SimpleSpanHandler):  # an override: the ordinary (locked) way
        def new_span(self, *args: Any, **kwargs: Any) -> Any:
            return super().new_span(*args, **kwargs)

    @d.span
    def rows() -> Iterator[int]:
        yield 1
        yield 2

    for _ in range(3):
        handlers = [SimpleSpanHandler(), Slow()]
        for handler in handlers:
            d.add_span_handler(handler)
        open_rows = [rows() for _ in range(1500)]
        for it in open_rows:
            next(it)
        before = telemetry.SPANS_DROPPED_BY_SHUTDOWN.value
        go = threading.Event()

        def finish(open_rows: list[Iterator[int]] = open_rows, go: threading.Event = go) -> None:
            go.wait()
            for it in open_rows:
                for _ in it:
                    pass

        finisher = threading.Thread(target=finish)
        finisher.start()
        go.set()
        d.shutdown()
        finisher.join()
        dropped: set[str] = set()
        for handler in handlers:
            completed = {s.id_ for s in handler.completed_spans}
            dropped_here = {s.id_ for s in handler.dropped_spans}
            assert not completed & dropped_here
            assert len(completed | dropped_here) == 1500 and not handler.open_spans
            dropped |= dropped_here
        assert telemetry.SPANS_DROPPED_BY_SHUTDOWN.value - before == len(dropped)


@pytest.mark.timeout(60)
def test_shutdown_drop_and_the_calls_own_end_on_another_thread_reach_a_handler_once() -> None:
    """shutdown() dropping a span while its call ends it on another thread: the handler
    sees one end, not the drop and then the exit (the call's end came while a slow
    prepare_to_drop_span ran, before the drop was noted)."""
    import threading

    from instrumentation.span.base import BaseSpan

    in_call, call_may_end, call_ended = threading.Event(), threading.Event(), threading.Event()
    seen: list[str] = []

    class Slow(BaseSpanHandler[BaseSpan]):
        def new_span(
            self,
            id_: str,
            bound_args: Any,
            instance: Any = None,
            parent_span_id: str | None = None,
            tags: Any = None,
            **kwargs: Any,
        ) -> BaseSpan:
            return BaseSpan(id_=id_, parent_id=parent_span_id)

        def prepare_to_exit_span(
            self, id_: str, bound_args: Any, instance: Any = None, result: Any = None, **kwargs: Any
        ) -> BaseSpan:
            seen.append("exit")
            return self.open_spans[id_]

        def prepare_to_drop_span(
            self,
            id_: str,
            bound_args: Any,
            instance: Any = None,
            err: BaseException | None = None,
            **kwargs: Any,
        ) -> BaseSpan:
            seen.append("drop")
            call_may_end.set()
            call_ended.wait(0.5)  # the call's end comes meanwhile (it waits, fixed)
            return self.open_spans[id_]

    d = get_dispatcher(fresh("shutrace"))
    d.add_span_handler(Slow())

    @d.span
    def work() -> None:
        in_call.set()
        call_may_end.wait(10)

    worker = threading.Thread(target=lambda: (work(), call_ended.set()))
    worker.start()
    assert in_call.wait(10)
    d.shutdown()
    worker.join(10)
    assert seen == ["drop"]
    assert telemetry.handler_errors().get("Slow", 0) == 0
