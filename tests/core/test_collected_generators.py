"""A traced generator that only a reference cycle kept is closed by the cyclic garbage
collector, which runs wherever its thread happens to be: possibly inside a handler
holding its own lock. The span's end must then wait for the collection to be over,
not call that handler again on the same thread (which waited for ever)."""

from __future__ import annotations

import contextvars
import gc
import inspect
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
from collecting import in_thread, leave_in_a_cycle
from pydantic import Field

from instrumentation import _spans, get_dispatcher
from instrumentation.event_handlers import BaseEventHandler
from instrumentation.events.base import BaseEvent
from instrumentation.events.span import SpanDropEvent
from instrumentation.span.simple import SimpleSpan
from instrumentation.span_handlers import SimpleSpanHandler
from instrumentation.testing import capture_spans

from ._support import fresh


def _name(span_id: str) -> str:
    """``stream`` for ``test_x.<locals>.stream-<hex>``."""
    return span_id.rsplit("-", 1)[0].rsplit(".", 1)[-1]


class LockingHandler(SimpleSpanHandler):
    """Takes a plain (not re-entrant) lock around each span's end, as a handler written
    from LlamaIndex's guide does with ``self.lock``; ``while_locked`` runs inside it."""

    ends: list[tuple[str, str]] = Field(default_factory=list)
    starts: list[str] = Field(default_factory=list)
    while_locked: Optional[Callable[[], None]] = None  # Optional: pydantic on 3.10

    def new_span(self, id_: str, *args: Any, **kwargs: Any) -> SimpleSpan | None:
        with self.lock:
            self.starts.append(_name(id_))
        return super().new_span(id_, *args, **kwargs)

    def prepare_to_exit_span(self, id_: str, *args: Any, **kwargs: Any) -> SimpleSpan | None:
        with self.lock:
            self.ends.append(("exit", _name(id_)))
            run, self.while_locked = self.while_locked, None
            if run is not None:
                run()
        return super().prepare_to_exit_span(id_, *args, **kwargs)

    def prepare_to_drop_span(self, id_: str, *args: Any, **kwargs: Any) -> SimpleSpan | None:
        with self.lock:
            self.ends.append(("drop", _name(id_)))
        return super().prepare_to_drop_span(id_, *args, **kwargs)


def _stream_and_step(d: Any) -> tuple[Callable[[], Iterator[int]], Callable[[], None]]:
    """A traced generator to leave in a cycle, and a traced call to end after it."""

    @d.span
    def stream() -> Iterator[int]:
        yield 1

    @d.span
    def step() -> None:
        return None

    return stream, step


@pytest.fixture
def setup(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, LockingHandler, list[BaseEvent]]]:
    """The tests using it check the ways what waits is made other than the drainer,
    which is kept out of their way (the tests of the drainer bring it back)."""
    monkeypatch.setattr(_spans, "_DRAIN_AFTER", None)
    d = get_dispatcher(fresh("collected"))
    handler = LockingHandler()
    events: list[BaseEvent] = []

    class Events(BaseEventHandler):
        def handle(self, event: BaseEvent, **kwargs: Any) -> None:
            events.append(event)

    d.add_span_handler(handler)
    d.add_event_handler(Events())
    gc.collect()
    yield d, handler, events
    if handler.lock.acquire(timeout=1):  # not if a deadlocked thread holds it
        handler.lock.release()
        d.shutdown()


def test_a_generator_collected_inside_a_handlers_lock_ends_after_the_collection(
    setup: tuple[Any, LockingHandler, list[BaseEvent]],
) -> None:
    d, handler, events = setup

    @d.span
    def stream() -> Iterator[int]:
        yield 1
        yield 2

    @d.span
    def step() -> None:
        return None

    @d.span
    def later() -> None:
        return None

    def work() -> None:
        leave_in_a_cycle(stream())
        handler.while_locked = gc.collect  # the collector runs while the lock is held
        step()
        assert ("drop", "stream") not in handler.ends  # not while the lock was held
        later()  # the next end runs what waited, first

    in_thread(work)
    assert handler.ends == [("exit", "step"), ("drop", "stream"), ("exit", "later")]
    drops = [e for e in events if isinstance(e, SpanDropEvent)]
    assert [(_name(e.span_id), e.err_type) for e in drops] == [("stream", "GeneratorExit")]
    assert not handler.open_spans


def test_a_collected_generators_end_reaches_the_handlers_at_shutdown(
    setup: tuple[Any, LockingHandler, list[BaseEvent]],
) -> None:
    d, handler, _ = setup

    stream, step = _stream_and_step(d)

    def work() -> None:
        leave_in_a_cycle(stream())
        handler.while_locked = gc.collect
        step()

    in_thread(work)
    assert ("drop", "stream") not in handler.ends
    d.shutdown()  # no span ended since: shutdown makes the end before closing
    assert handler.ends[-1] == ("drop", "stream")
    assert [_name(s.id_) for s in handler.dropped_spans] == ["stream"]


#: The start of the programs the tests below run on their own: a handler that runs a
#: collection inside its lock as a span called ``step`` ends, with a suspended traced
#: generator left in a cycle for it (``freed_in_a_cycle()``).
_CHILD = """
import gc
gc.disable()  # only the collection the handler makes
from instrumentation import _spans
_spans._DRAIN_AFTER = None  # these programs check the other ways what waits is made
from instrumentation import get_dispatcher
from instrumentation.span_handlers import SimpleSpanHandler

class Handler(SimpleSpanHandler):
    def prepare_to_exit_span(self, id_, *args, **kwargs):
        with self.lock:
            if id_.startswith("step"):
                gc.collect()
        return super().prepare_to_exit_span(id_, *args, **kwargs)

    def prepare_to_drop_span(self, id_, *args, **kwargs):
        with self.lock:
            print("dropped", id_.split("-")[0], flush=True)
        return super().prepare_to_drop_span(id_, *args, **kwargs)

d = get_dispatcher("child")
d.add_span_handler(Handler())

@d.span
def stream():
    yield 1

@d.span
def step():
    return None

def freed_in_a_cycle():
    g = stream()
    next(g)
    cycle = [g, None]
    cycle[1] = cycle
"""


def _run_child(scenario: str) -> list[str]:
    code = _CHILD + textwrap.dedent(scenario)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_an_end_put_off_is_made_at_exit() -> None:
    """No span ends after the collection: the interpreter's exit makes the end."""
    scenario = """
        freed_in_a_cycle()
        step()
        print("main done", flush=True)
        """
    assert _run_child(scenario) == ["main done", "dropped stream"]


def test_a_collection_in_the_applications_own_code_waits_for_the_next_end_too(
    setup: tuple[Any, LockingHandler, list[BaseEvent]],
) -> None:
    """``gc.collect()`` in a decorated function's body: where the collection ran says
    nothing of the locks held there (a library's, say), so its ends wait as well, for
    the next span end, which makes them first; the test kit's reads make them too."""
    d, handler, _ = setup

    @d.span
    def stream() -> Iterator[int]:
        yield 1

    @d.span
    def body() -> None:
        leave_in_a_cycle(stream())
        gc.collect()
        assert ("drop", "stream") not in handler.ends

    gc.disable()
    try:
        with capture_spans(d) as spans:
            body()
            leave_in_a_cycle(stream())
            gc.collect()
            assert len(spans) == 2  # body, and the stream its end made
    finally:
        gc.enable()
    # The block's end made the last one.
    assert [s.name.rsplit(".", 1)[-1] for s in spans] == ["body", "stream", "stream"]
    assert handler.ends == [("drop", "stream"), ("exit", "body"), ("drop", "stream")]


def test_an_exporter_lock_held_where_the_collection_ran_is_not_taken_again() -> None:
    """The application reads an OpenTelemetry in-memory exporter (which holds the
    exporter's lock) and the collector runs there: a dropped span exported as the
    collection ended waited for that lock for ever."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from instrumentation.otel import OpenTelemetrySpanHandler

    class Collecting(InMemorySpanExporter):
        """Reads under its lock, as the SDK's does; the collector runs there."""

        def get_finished_spans(self) -> Any:
            with self._lock:
                gc.collect()
                return tuple(self._finished_spans)

    exporter = Collecting()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    d = get_dispatcher(fresh("collected_otel"))
    d.add_span_handler(OpenTelemetrySpanHandler(tracer_provider=provider))

    stream, step = _stream_and_step(d)

    def work() -> None:
        leave_in_a_cycle(stream())
        exporter.get_finished_spans()
        step()

    try:
        in_thread(work)
    finally:
        d.shutdown()
    names = [span.name.rsplit(".", 1)[-1] for span in exporter.get_finished_spans()]
    assert names == ["stream", "step"]


def test_ends_made_by_hand_keep_their_place_and_wait_too(
    setup: tuple[Any, LockingHandler, list[BaseEvent]],
) -> None:
    """``Dispatcher.span_exit`` by hand makes the ends put off before its own, and is
    put off itself when the collector ends such a span (a generator's ``finally``)."""
    d, handler, _ = setup
    no_args = inspect.Signature().bind()

    stream, step = _stream_and_step(d)

    def by_hand() -> Iterator[int]:
        d.span_enter("manual-1", bound_args=no_args)
        try:
            yield 1
        finally:
            d.span_exit("manual-1", bound_args=no_args)

    def work() -> None:
        d.span_enter("parent-1", bound_args=no_args)
        leave_in_a_cycle(stream())
        leave_in_a_cycle(by_hand())
        handler.while_locked = gc.collect
        step()
        d.span_exit("parent-1", bound_args=no_args)

    in_thread(work)
    # The two freed together end in the collector's order; both before the parent's.
    assert len(handler.ends) == 4
    assert handler.ends[0] == ("exit", "step") and handler.ends[3] == ("exit", "parent")
    assert set(handler.ends[1:3]) == {("drop", "stream"), ("exit", "manual")}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork here")
def test_a_forked_child_leaves_the_parents_put_off_ends_to_it(
    setup: tuple[Any, LockingHandler, list[BaseEvent]], tmp_path: Path
) -> None:
    """Made in the child too, an end put off before the fork reached the handlers
    twice (each process stored a drop event of its own)."""
    d, handler, _ = setup

    stream, step = _stream_and_step(d)

    gc.disable()
    try:
        leave_in_a_cycle(stream())
        handler.while_locked = gc.collect
        step()
        assert ("drop", "stream") not in handler.ends
        out = tmp_path / "child.json"
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's result is read below
            try:
                step()
                out.write_text(json.dumps(handler.ends))
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        step()
    finally:
        gc.enable()
    child = [tuple(end) for end in json.loads(out.read_text())]
    assert ("drop", "stream") not in child
    assert handler.ends.count(("drop", "stream")) == 1


def test_an_end_put_off_while_the_exit_runs_is_made() -> None:
    """An exit-time callback whose span's handler runs a collection: the exit's own
    drain runs after it (atexit did not run a drain registered while it ran)."""
    scenario = """
        import atexit

        def at_exit():
            freed_in_a_cycle()
            step()
            print("at_exit done", flush=True)

        atexit.register(at_exit)
        print("main done", flush=True)
        """
    assert _run_child(scenario) == ["main done", "at_exit done", "dropped stream"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork start method here")
def test_an_end_put_off_in_a_multiprocessing_child_is_made_before_it_exits() -> None:
    """A multiprocessing child ends with ``os._exit`` (no atexit): its threads' exit
    hooks make what was put off after its last span end."""
    scenario = """
        import multiprocessing

        def target():
            freed_in_a_cycle()
            step()
            print("child done", flush=True)

        if __name__ == "__main__":
            child = multiprocessing.get_context("fork").Process(target=target)
            child.start()
            child.join()
            print("exit code", child.exitcode, flush=True)
        """
    assert _run_child(scenario) == ["child done", "dropped stream", "exit code 0"]


def test_an_event_sent_from_a_finally_the_collector_runs_waits_too() -> None:
    """A generator's own ``finally`` sending an event as the collector frees it, while
    an event handler holds its lock: the event is handled after the collection."""
    d = get_dispatcher(fresh("collected_event"))
    lock = threading.Lock()
    seen: list[str] = []

    class Note(BaseEvent):
        text: str

    class Locking(BaseEventHandler):
        def handle(self, event: BaseEvent, **kwargs: Any) -> None:
            with lock:
                seen.append(getattr(event, "text", ""))
                if getattr(event, "text", "") == "collect here":
                    gc.collect()

    def chunks() -> Iterator[int]:
        try:
            yield 1
        finally:
            d.event(Note(text="closed"))

    d.add_event_handler(Locking())

    def work() -> None:
        leave_in_a_cycle(chunks())
        d.event(Note(text="collect here"))
        d.event(Note(text="after"))

    try:
        in_thread(work)
    finally:
        d.shutdown()
    assert seen == ["collect here", "closed", "after"]


def test_a_traced_call_in_a_finally_the_collector_runs_waits_too(
    setup: tuple[Any, LockingHandler, list[BaseEvent]],
) -> None:
    """A generator's ``finally`` calls a traced function as the collector frees it,
    inside a handler's lock: the call runs, its span's start and end wait, in order."""
    d, handler, _ = setup

    @d.span
    def cleanup() -> str:
        return "cleaned"

    def chunks() -> Iterator[int]:
        try:
            yield 1
        finally:
            assert cleanup() == "cleaned"

    @d.span
    def step() -> None:
        return None

    def work() -> None:
        leave_in_a_cycle(chunks())
        handler.while_locked = gc.collect
        step()
        step()

    in_thread(work)
    assert handler.starts == ["step", "cleanup", "step"]
    assert handler.ends == [("exit", "step"), ("exit", "cleanup"), ("exit", "step")]


def test_what_waits_keeps_its_place_while_another_thread_makes_it(
    setup: tuple[Any, LockingHandler, list[BaseEvent]],
) -> None:
    """Thread A is making what was put off, slowly; thread B's own start, put off by a
    collection, and then B's end of that span must come after it, not before (the span
    was ended before it started, and stayed open for good)."""
    d, handler, _ = setup
    stream, step = _stream_and_step(d)
    slow = threading.Event()

    @d.span
    def later_gen() -> Iterator[int]:
        yield 1
        yield 2

    kept: list[Iterator[int]] = []

    def starts_in_finally() -> Iterator[int]:
        try:
            yield 1
        finally:
            started = later_gen()
            next(started)
            kept.append(started)

    original = handler.prepare_to_drop_span

    def slow_drop(id_: str, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == "drainer" and not slow.is_set():
            slow.set()
            time.sleep(0.5)
        return original(id_, *args, **kwargs)

    object.__setattr__(handler, "prepare_to_drop_span", slow_drop)

    def work() -> None:
        leave_in_a_cycle(stream())
        gc.collect()  # stream's drop put off
        drainer = threading.Thread(target=step, name="drainer")
        drainer.start()  # makes stream's drop, slowly
        assert slow.wait(10)
        leave_in_a_cycle(starts_in_finally())
        gc.collect()  # later_gen's start put off, behind the drop being made
        kept.pop().close()  # later_gen ends while the drainer still works
        drainer.join()

    in_thread(work)
    assert handler.starts.count("later_gen") == 1
    order = [e for e in handler.ends if e[1] in ("stream", "later_gen")]
    assert order == [("drop", "stream"), ("drop", "later_gen")]
    assert not handler.open_spans


def test_what_waits_is_made_in_the_context_it_was_put_off_in(
    setup: tuple[Any, LockingHandler, list[BaseEvent]],
) -> None:
    """A span started from a ``finally`` during a collection is made later, on whatever
    thread makes what waited: its handlers read the context it started in (an audit
    request, OpenTelemetry's current span), not that thread's."""
    d, _, _ = setup
    where: contextvars.ContextVar[str] = contextvars.ContextVar("where", default="none")
    seen: list[tuple[str, str]] = []

    class Reads(SimpleSpanHandler):
        def new_span(self, id_: str, *args: Any, **kwargs: Any) -> SimpleSpan | None:
            seen.append((_name(id_), where.get()))
            return super().new_span(id_, *args, **kwargs)

    d.add_span_handler(Reads())

    @d.span
    def tool() -> None:
        return None

    @d.span
    def step() -> None:
        return None

    def chunks() -> Iterator[int]:
        try:
            yield 1
        finally:
            tool()

    def elsewhere() -> None:
        where.set("thread X")
        step()

    def work() -> None:
        where.set("thread B")
        leave_in_a_cycle(chunks())
        gc.collect()  # tool's start and end put off, in thread B's context
        other = threading.Thread(target=elsewhere)
        other.start()
        other.join()

    in_thread(work)
    assert ("tool", "thread B") in seen


def test_a_span_entered_by_hand_in_a_collection_waits_too(
    setup: tuple[Any, LockingHandler, list[BaseEvent]],
) -> None:
    """``Dispatcher.span_enter`` from a generator's ``finally`` as the collector runs
    inside a handler's lock: put off, as its ``span_exit`` is."""
    d, handler, _ = setup
    no_args = inspect.Signature().bind()
    _, step = _stream_and_step(d)

    def by_hand() -> Iterator[int]:
        try:
            yield 1
        finally:
            d.span_enter("manual-2", bound_args=no_args)
            d.span_exit("manual-2", bound_args=no_args)

    def work() -> None:
        leave_in_a_cycle(by_hand())
        handler.while_locked = gc.collect
        step()
        step()

    in_thread(work)
    assert handler.starts == ["step", "manual", "step"]
    assert handler.ends == [("exit", "step"), ("exit", "manual"), ("exit", "step")]


# -- the drainer: what a collection put off, made soon after it in a quiet program ----


def _wait_for(check: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "never made"
        time.sleep(0.01)


def _with_a_drainer() -> None:
    """Before 3.12 the drainer is started by the first drain outside a collection (what
    the collector's callback cannot do safely there): as an earlier test may have."""
    if not _spans._START_IN_CALLBACK:
        _spans._start_drainer()
        _wait_for(lambda: bool(_spans._drainer))


NEW_PYTHON = pytest.mark.skipif(
    sys.version_info < (3, 12), reason="the collector's callback starts the drainer on 3.12+"
)


def test_in_a_program_gone_quiet_what_a_collection_put_off_is_made_soon(
    setup: tuple[Any, LockingHandler, list[BaseEvent]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No span or event after the collection: the drop was made only at the next one,
    and timed then (here, at shutdown, a second late). Now the drainer makes it."""
    monkeypatch.setattr(_spans, "_DRAIN_AFTER", 0.05)
    _with_a_drainer()
    d, handler, events = setup
    stream, step = _stream_and_step(d)
    collected_at: list[float] = []

    def collect() -> None:
        gc.collect()
        collected_at.append(time.time())

    def work() -> None:
        leave_in_a_cycle(stream())
        handler.while_locked = collect
        step()
        time.sleep(1)  # quiet: no span, no event
        assert ("drop", "stream") in handler.ends

    in_thread(work)
    assert handler.ends == [("exit", "step"), ("drop", "stream")]
    (dropped,) = handler.dropped_spans
    assert dropped.end_time is not None
    assert dropped.end_time.timestamp() - collected_at[0] < 0.5  # not the second of quiet
    assert [_name(e.span_id) for e in events if isinstance(e, SpanDropEvent)] == ["stream"]


def test_the_drainer_waits_for_the_lock_the_collecting_thread_still_holds(
    setup: tuple[Any, LockingHandler, list[BaseEvent]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The collecting thread keeps the handler's lock a while after the collection
    (and sends nothing): the drainer waits for it, then makes the drop; spans that
    thread starts meanwhile line up behind the drop."""
    monkeypatch.setattr(_spans, "_DRAIN_AFTER", 0.0)
    _with_a_drainer()
    d, handler, _ = setup
    stream, step = _stream_and_step(d)

    @d.span
    def after() -> None:
        return None

    def collect_and_hold() -> None:
        gc.collect()
        time.sleep(0.3)  # the drainer is waiting for the lock by now

    def work() -> None:
        leave_in_a_cycle(stream())
        handler.while_locked = collect_and_hold
        step()
        after()

    in_thread(work)
    _wait_for(lambda: ("exit", "after") in handler.ends)
    assert handler.ends == [("exit", "step"), ("drop", "stream"), ("exit", "after")]
    assert not handler.open_spans


def test_reads_and_shutdown_wait_for_what_the_drainer_is_making(
    setup: tuple[Any, LockingHandler, list[BaseEvent]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A capture block ending, or ``shutdown()``, while the drainer is half way through
    a slow handler: they wait for it, so that the block holds the drop."""
    monkeypatch.setattr(_spans, "_DRAIN_AFTER", 0.0)
    _with_a_drainer()
    d, handler, _ = setup
    stream, step = _stream_and_step(d)
    draining = threading.Event()
    original = handler.prepare_to_drop_span

    def slow_drop(id_: str, *args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() == _spans._drainer:
            draining.set()
            time.sleep(0.3)
        return original(id_, *args, **kwargs)

    object.__setattr__(handler, "prepare_to_drop_span", slow_drop)

    def work() -> None:
        with capture_spans(d) as spans:
            leave_in_a_cycle(stream())
            handler.while_locked = gc.collect
            step()
            assert draining.wait(10)
        assert [_name(s.id_) for s in spans] == ["stream", "step"]  # by start time

    in_thread(work)
    assert handler.ends == [("exit", "step"), ("drop", "stream")]


@NEW_PYTHON
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork here")
def test_a_forked_child_starts_a_drainer_of_its_own() -> None:
    """The parent's drainer thread is not copied by ``fork``: the child starts its own,
    so its quiet end is made even though it leaves with ``os._exit``."""
    scenario = """
        import os, time
        _spans._DRAIN_AFTER = 0.05
        freed_in_a_cycle()
        step()  # the parent's drainer starts, and makes the drop
        time.sleep(0.5)
        assert _spans._drainer, "the parent's drainer runs"
        pid = os.fork()
        if pid == 0:
            freed_in_a_cycle()
            step()
            time.sleep(1)
            print("child quiet", flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        print("parent done", flush=True)
        """
    assert _run_child(scenario) == [
        "dropped stream",
        "dropped stream",
        "child quiet",
        "parent done",
    ]


def _threads() -> int:
    """The process's threads, as the OS counts them (``fork`` warns by this count)."""
    return len(os.listdir("/proc/self/task"))


@NEW_PYTHON
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc")
def test_no_thread_runs_until_a_collection_puts_something_off_nor_long_after() -> None:
    """A thread started at the first traced generator made every later ``fork`` warn
    (3.12+) in processes where nothing is ever put off. The drainer starts when a
    collection puts something off, and ends once idle."""
    scenario = """
        import os, time
        _spans._DRAIN_AFTER = 0.05
        _spans._DRAINER_IDLE = 0.3
        threads = lambda: len(os.listdir("/proc/self/task"))
        before = threads()
        list(stream())
        step()
        print("after spans", threads() - before, _spans._drainer, flush=True)
        freed_in_a_cycle()
        step()
        time.sleep(0.2)
        print("after a collection", threads() - before, bool(_spans._drainer), flush=True)
        time.sleep(1)
        print("idle", threads() - before, _spans._drainer, flush=True)
        freed_in_a_cycle()
        step()
        time.sleep(0.2)
        print("again", threads() - before, bool(_spans._drainer), flush=True)
        """
    assert _run_child(scenario) == [
        "after spans 0 None",
        "dropped stream",
        "after a collection 1 True",
        "idle 0 None",
        "dropped stream",
        "again 1 True",
    ]


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.10 and 3.11 only")
def test_before_3_12_the_first_drain_starts_the_drainer_for_the_next_collections() -> None:
    """There a collection may run inside C code holding the interpreter's thread-list
    lock, which starting a thread takes (the process froze): the callback only wakes a
    drainer that the first drain outside a collection started."""
    scenario = """
        import time
        _spans._DRAIN_AFTER = 0.05
        freed_in_a_cycle()
        step()
        time.sleep(0.3)
        print("quiet, no drainer yet", _spans._drainer, flush=True)
        step()  # makes the drop first, and starts the drainer
        freed_in_a_cycle()
        step()
        time.sleep(0.3)
        print("quiet", bool(_spans._drainer), flush=True)
        """
    assert _run_child(scenario) == [
        "quiet, no drainer yet None",
        "dropped stream",
        "dropped stream",
        "quiet True",
    ]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork here")
def test_a_fork_waits_for_a_drain_holding_a_handlers_lock() -> None:
    """Forked while the drainer was inside a handler's lock, the child inherited the lock
    held, by a thread it does not have, and hung at its first span."""
    scenario = """
        import os, threading, time
        _spans._DRAIN_AFTER = 0.0

        class Slow(SimpleSpanHandler):
            def prepare_to_drop_span(self, id_, *args, **kwargs):
                with self.lock:
                    time.sleep(0.3)
                return super().prepare_to_drop_span(id_, *args, **kwargs)

            def prepare_to_exit_span(self, id_, *args, **kwargs):
                with self.lock:
                    pass
                return super().prepare_to_exit_span(id_, *args, **kwargs)

        d.add_span_handler(Slow())
        if not _spans._START_IN_CALLBACK:
            _spans._start_drainer()
            time.sleep(0.1)
        freed_in_a_cycle()
        gc.collect()  # the drop is put off, and the drainer makes it at once
        time.sleep(0.15)  # inside Slow's lock by now
        pid = os.fork()
        if pid == 0:
            t = threading.Thread(target=step, daemon=True)
            t.start()
            t.join(5)
            print("child", "hung" if t.is_alive() else "ok", flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        """
    assert _run_child(scenario) == ["dropped stream", "child ok"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork here")
def test_a_fork_does_not_wait_out_a_drain_whose_handler_needs_the_tree() -> None:
    """The fork took the tree's lock, then waited for the drain; the drain's handler,
    making a dispatcher (which takes the tree's lock), waited for the fork: the fork
    waited its whole second and went on without the drain, its child inheriting
    whatever the handler held. The drain is now taken first, then the tree."""
    scenario = """
        import os, threading, time
        _spans._DRAIN_AFTER = 0.0

        class NeedsTheTree(SimpleSpanHandler):
            def prepare_to_drop_span(self, id_, *args, **kwargs):
                time.sleep(0.3)
                get_dispatcher("made.inside.a.drain")
                return super().prepare_to_drop_span(id_, *args, **kwargs)

        d.add_span_handler(NeedsTheTree())
        if not _spans._START_IN_CALLBACK:
            _spans._start_drainer()
            time.sleep(0.1)
        freed_in_a_cycle()
        gc.collect()  # the drop is put off, and the drainer makes it at once
        time.sleep(0.15)  # inside the handler by now
        began = time.monotonic()
        pid = os.fork()
        if pid == 0:
            step()
            os._exit(0)
        took = time.monotonic() - began
        os.waitpid(pid, 0)
        print("fork waited", "its second" if took >= 0.9 else "for the drain", flush=True)
        """
    assert _run_child(scenario) == ["dropped stream", "fork waited for the drain"]


def test_busy_threads_keep_their_pace_behind_a_slow_drain(
    setup: tuple[Any, LockingHandler, list[BaseEvent]],
) -> None:
    """One end put off, made slowly by one of two busy threads: the other's spans went
    in line behind it, the first made them all, for good (0 spans a second returned on
    its own), and the line grew to its bound, past which ends came before starts. Now
    the other waits while the drain goes on (in line only while it is stuck)."""
    d, handler, _ = setup
    stream, step = _stream_and_step(d)
    original = handler.prepare_to_drop_span

    def slow_drop(id_: str, *args: Any, **kwargs: Any) -> Any:
        time.sleep(0.3)  # an exporter's lock, say: longer than a span waits in line
        return original(id_, *args, **kwargs)

    object.__setattr__(handler, "prepare_to_drop_span", slow_drop)
    stop = threading.Event()
    made = [0, 0]

    def work(k: int) -> None:
        while not stop.is_set():
            step()
            made[k] += 1

    workers = [threading.Thread(target=work, args=(k,), daemon=True) for k in (0, 1)]
    longest = 0
    gc.disable()
    try:
        for worker in workers:
            worker.start()
        time.sleep(0.2)
        leave_in_a_cycle(stream())
        gc.collect()  # one drop put off; the next step of either thread makes it
        time.sleep(0.5)
        before = list(made)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            longest = max(longest, len(_spans._deferred))
            time.sleep(0.005)
        after = list(made)
    finally:
        stop.set()
        for worker in workers:
            worker.join(10)
        gc.enable()
    _spans.run_deferred()
    assert all(b - a > 100 for a, b in zip(before, after, strict=True)), (before, after)
    assert longest < _spans._COLLECTED_KEPT  # past it, ends were made before their starts
    assert not handler.open_spans and not _spans._deferred


def test_a_collection_inside_sys_current_frames_does_not_freeze_the_process() -> None:
    """Before 3.12 a collection may run inside C code holding the interpreter's
    thread-list lock (``sys._current_frames()``, as sampling profilers call it):
    starting the drainer there, which takes that lock, froze every thread."""
    scenario = """
        import sys, threading, time
        _spans._DRAIN_AFTER = 0.05
        release = threading.Event()

        def deep(n):
            return deep(n - 1) if n else release.wait()

        for _ in range(3):
            threading.Thread(target=deep, args=(20,), daemon=True).start()
        time.sleep(0.1)
        gc.set_threshold(1)
        gc.enable()
        freed_in_a_cycle()
        frames = sys._current_frames()  # collections run as it makes frame objects
        gc.set_threshold(700)
        gc.disable()
        release.set()
        print("returned", len(frames) >= 4, flush=True)
        """
    lines = _run_child(scenario)
    assert lines[0] == "returned True"


def test_the_exit_waits_once_for_a_stuck_drain_not_once_per_flush() -> None:
    """A drain stuck in a handler at exit: each exit flush (a store's, an exporter's,
    the audit handlers') waited its own 2 s for it, in turn."""
    scenario = """
        import atexit, threading, time
        _spans._DRAIN_AFTER = 0.0
        never = threading.Event()

        class Stuck(SimpleSpanHandler):
            def prepare_to_drop_span(self, id_, *args, **kwargs):
                never.wait()

        d.add_span_handler(Stuck())
        if not _spans._START_IN_CALLBACK:
            _spans._start_drainer()
            time.sleep(0.1)
        for _ in range(3):  # as storage, OpenTelemetry and audit register theirs
            atexit.register(_spans.run_deferred)
        freed_in_a_cycle()
        gc.collect()  # the drainer takes the drop, and never comes back
        time.sleep(0.2)
        print("main done", flush=True)
        """
    began = time.monotonic()
    lines = _run_child(scenario)
    took = time.monotonic() - began
    assert lines == ["dropped stream", "main done"]  # Handler's, before Stuck's wait
    assert took < 5, took  # one wait of 2 s; it was five


def test_generators_closed_by_collections_inside_context_var_sets_do_not_crash() -> None:
    """Before 3.12 a collection may start inside ``ContextVar.set`` (allocating a node
    of the context's mapping); closing a traced generator there sets context variables
    in the same context, which freed the mapping the interrupted set was still reading
    (python/cpython#148891): the process died of a segmentation fault within a few
    thousand such generators."""
    code = textwrap.dedent(
        """
        import contextvars
        import instrumentation as instrument
        from instrumentation.span_handlers import SimpleSpanHandler

        d = instrument.get_dispatcher("crash")
        instrument.root_dispatcher.add_span_handler(SimpleSpanHandler(max_completed_spans=10))

        @d.span
        def leaf(n):
            return n

        @d.span
        def numbers(n):
            try:
                for i in range(n):
                    yield leaf(i)
            finally:
                leaf(-1)

        class Holder:
            pass

        def run():
            for _ in range(3_000):
                with d.span("request"):
                    stream = numbers(10)
                    next(stream)
                    holder = Holder()
                    holder.stream, holder.me = stream, holder  # only the collector frees it
                    del stream, holder

        # Other context variables (the application's, a framework's) shape the
        # context's mapping: one of these shapes has a collection start inside a node
        # allocation, in a few hundred milliseconds.
        pads = [contextvars.ContextVar(f"pad{i}") for i in range(24)]
        for count in range(len(pads) + 1):
            contextvars.Context().run(lambda: ([v.set(object()) for v in pads[:count]], run()))
        print("survived")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split() == ["survived"]
