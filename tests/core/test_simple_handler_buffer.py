"""SimpleSpanHandler buffers records on the hot path and makes spans when they are read.

Whatever the order of reads and writes, a reader sees SimpleSpan objects (never a
buffered tuple), in the order the spans ended, the same objects on every read, and
at most ``max_completed_spans`` of them.
"""

from __future__ import annotations

import copy
import json
import pickle
import threading
import time
from collections import deque
from datetime import timezone
from typing import Any

import pytest
from stopped_streams import stop_one_and_fail_one

from instrumentation import SimpleSpan, SimpleSpanHandler, current_span, get_dispatcher
from instrumentation._spans import EMPTY_BOUND_ARGS
from instrumentation.span_handlers import simple as simple_module
from instrumentation.span_handlers._buffered import SpanDeque

from ._support import fresh


def traced(handler: SimpleSpanHandler, prefix: str = "buf") -> tuple[Any, tuple[Any, Any]]:
    d = get_dispatcher(fresh(prefix))
    d.add_span_handler(handler)

    @d.span
    def leaf(i: int) -> int:
        return i

    @d.span
    def parent(n: int) -> int:
        return sum(leaf(i) for i in range(n))

    return d, (leaf, parent)


def test_spans_read_after_the_calls_are_simple_spans_in_end_order() -> None:
    h = SimpleSpanHandler()
    _, (_leaf, parent) = traced(h)
    before = time.time()
    parent(3)
    after = time.time()
    spans = list(h.completed_spans)
    assert all(type(s) is SimpleSpan for s in spans)
    names = [s.name.rsplit(".", 1)[-1] for s in spans]
    assert names == ["leaf", "leaf", "leaf", "parent"]
    root = spans[-1]
    assert all(s.parent_id == root.id_ and s.trace_id == root.trace_id for s in spans[:3])
    for s in spans:
        assert s.start_time.tzinfo is timezone.utc and s.end_time is not None
        assert before - 0.001 <= s.start_time.timestamp() <= s.end_time.timestamp() <= after + 0.001
        assert s.duration == pytest.approx((s.end_time - s.start_time).total_seconds(), abs=2e-6)
        assert s.duration >= 0
    assert not h.open_spans


class _Subclassed(SimpleSpanHandler):
    """Makes its spans through new_span (the slow path), as a subclass does."""

    def new_span(self, *args: Any, **kwargs: Any) -> SimpleSpan | None:
        return super().new_span(*args, **kwargs)


@pytest.mark.parametrize("kind", [SimpleSpanHandler, _Subclassed])
def test_spans_shorter_than_a_coarse_wall_clock_tick_still_last(
    kind: type[SimpleSpanHandler], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows' time.time() before Python 3.13 ticks every 15.6 ms: there every span
    shorter than that lasted 0 s, and siblings tied at their start. There the handler
    reads the wall clock off perf_counter (simulated here by a coarse time.time)."""
    real_time = time.time

    def coarse() -> float:
        return real_time() // 0.015625 * 0.015625

    monkeypatch.setattr(time, "time", coarse)
    monkeypatch.setattr(simple_module, "_clock", simple_module._wall_clock_of_perf_counter())
    h = kind()
    _, (_leaf, parent) = traced(h)
    parent(3)
    spans = sorted(h.completed_spans, key=lambda s: s.start_time)
    assert len(spans) == 4 and all(s.duration > 0 for s in spans)
    assert len({s.start_time for s in spans}) == 4
    assert abs(spans[0].start_time.timestamp() - real_time()) < 1.0

    tick = coarse()
    monkeypatch.setattr(simple_module, "_clock", lambda: tick)  # time.time() within a tick
    h = kind()
    _, (_leaf, parent) = traced(h)
    parent(3)
    assert {s.duration for s in h.completed_spans} == {0.0}


def test_reads_hand_out_the_same_objects_and_len_counts_buffered_spans() -> None:
    h = SimpleSpanHandler()
    _, (leaf, _parent) = traced(h)
    leaf(1)
    assert len(h.completed_spans) == 1
    first = h.completed_spans[0]
    leaf(2)
    assert len(h.completed_spans) == 2 and bool(h.completed_spans)
    assert h.completed_spans[0] is first
    first.metadata = {"seen": True}
    assert h.completed_spans[0].metadata == {"seen": True}


def test_a_span_read_while_open_is_the_object_that_ends() -> None:
    h = SimpleSpanHandler()
    d = get_dispatcher(fresh("open"))
    d.add_span_handler(h)
    seen: list[SimpleSpan] = []

    @d.span
    def look() -> None:
        (span,) = h.open_spans.values()
        assert span.end_time is None and span.duration == 0.0
        seen.append(span)

    look()
    (ended,) = h.completed_spans
    assert ended is seen[0]
    assert ended.end_time is not None and ended.duration >= 0
    assert not h.open_spans


def test_open_spans_mapping_reads() -> None:
    h = SimpleSpanHandler()
    d = get_dispatcher(fresh("map"))
    d.add_span_handler(h)
    checks: dict[str, object] = {}

    @d.span
    def inner() -> None:
        ids = list(h.open_spans)
        checks["ids"] = ids
        checks["in"] = all(i in h.open_spans for i in ids)
        checks["get"] = [h.open_spans.get(i) for i in ids]
        checks["copy"] = dict(h.open_spans)
        checks["len"] = len(h.open_spans)

    @d.span
    def outer() -> None:
        inner()

    outer()
    ids = checks["ids"]
    assert isinstance(ids, list) and len(ids) == 2 and checks["len"] == 2
    assert ids[0].startswith(outer.__qualname__) and ids[1].startswith(inner.__qualname__)
    assert checks["in"] is True
    got = checks["get"]
    assert isinstance(got, list) and all(type(s) is SimpleSpan for s in got)
    copied = checks["copy"]
    assert isinstance(copied, dict) and all(type(s) is SimpleSpan for s in copied.values())
    # The two spans read while open ended as those same objects.
    assert [s.id_ for s in h.completed_spans] == [ids[1], ids[0]]
    assert h.completed_spans[0] is got[1]


def test_kept_spans_are_bounded_and_the_oldest_go_first() -> None:
    h = SimpleSpanHandler(max_completed_spans=5)
    d = get_dispatcher(fresh("buf"))
    d.add_span_handler(h)
    call_ids: list[str] = []

    @d.span
    def leaf() -> None:
        span = current_span()
        assert span is not None
        call_ids.append(span.id_)

    for _ in range(3):
        leaf()
    assert [s.id_ for s in h.completed_spans] == call_ids  # read in between
    for _ in range(3, 12):
        leaf()
    # The spans of the last five calls, oldest first.
    assert [s.id_ for s in h.completed_spans] == call_ids[7:]
    assert h.completed_spans.maxlen == 5


def test_completed_plus_dropped_is_a_list_of_all_of_them() -> None:
    """``completed_spans + dropped_spans`` (LlamaIndex's own idiom) kept the left deque's
    maxlen: once it was full, the sum silently lost its oldest spans."""
    h = SimpleSpanHandler(max_completed_spans=3)
    d = get_dispatcher(fresh("buf"))
    d.add_span_handler(h)

    @d.span
    def ok() -> None:
        return None

    @d.span
    def bad() -> None:
        raise ValueError("bad input")

    for _ in range(3):
        ok()
    for _ in range(2):
        with pytest.raises(ValueError):
            bad()
    both = h.completed_spans + h.dropped_spans
    assert type(both) is list
    assert [s.name.rsplit(".", 1)[-1] for s in both] == ["ok"] * 3 + ["bad"] * 2
    assert [s.id_ for s in [] + h.completed_spans] == [s.id_ for s in h.completed_spans]  # noqa: RUF005
    assert len(deque([None]) + h.completed_spans) == 4
    assert len(h.completed_spans) == 3  # the sum changed neither


def test_clear_and_reassign_forget_buffered_spans() -> None:
    h = SimpleSpanHandler()
    _, (leaf, _parent) = traced(h)
    leaf(1)
    h.completed_spans.clear()
    assert list(h.completed_spans) == []
    leaf(2)
    h.completed_spans = deque()
    assert len(h.completed_spans) == 0
    leaf(3)
    (span,) = h.completed_spans
    assert type(span) is SimpleSpan and span.end_time is not None


def test_a_raising_call_is_dropped_with_its_error_and_not_completed() -> None:
    h = SimpleSpanHandler()
    d = get_dispatcher(fresh("drop"))
    d.add_span_handler(h)

    @d.span
    def boom() -> None:
        raise ValueError("no")

    with pytest.raises(ValueError):
        boom()
    assert list(h.completed_spans) == [] and not h.open_spans
    (dropped,) = h.dropped_spans
    assert dropped.metadata == {"error": "ValueError: no"} and dropped.end_time is not None


def test_manual_exit_of_a_traced_span_ends_it_once() -> None:
    h = SimpleSpanHandler()
    d = get_dispatcher(fresh("manual"))
    d.add_span_handler(h)
    ids: list[str] = []

    @d.span
    def work() -> None:
        (span_id,) = h.open_spans.buffer
        ids.append(span_id)
        # Ending it by hand first (keyword path), then the decorator's own exit.
        h.span_exit(id_=span_id, bound_args=EMPTY_BOUND_ARGS)

    work()
    (span,) = h.completed_spans
    assert span.id_ == ids[0] and span.end_time is not None


def test_model_dump_copy_and_pickle_include_buffered_spans() -> None:
    h = SimpleSpanHandler()
    _, (leaf, _parent) = traced(h)
    leaf(1)
    dumped = h.model_dump()
    assert len(dumped["completed_spans"]) == 1
    assert dumped["completed_spans"][0]["end_time"] is not None
    leaf(2)
    plain = copy.copy(h.completed_spans)
    assert len(plain) == 2 and all(type(s) is SimpleSpan for s in plain)
    leaf(3)
    restored = pickle.loads(pickle.dumps(h.completed_spans))
    assert type(restored) is SpanDeque and len(restored) == 3  # no buffer of the handler
    assert [s.id_ for s in restored] == [s.id_ for s in h.completed_spans]


def test_shutdown_drops_buffered_open_spans() -> None:
    h = SimpleSpanHandler()
    d = get_dispatcher(fresh("shut"))
    d.add_span_handler(h)
    started, release = threading.Event(), threading.Event()

    @d.span
    def waits() -> None:
        started.set()
        release.wait(10)

    t = threading.Thread(target=waits)
    t.start()
    assert started.wait(10)
    assert h.open_spans.buffer  # buffered, not yet a span object
    d.shutdown()
    release.set()
    t.join()
    (dropped,) = h.dropped_spans
    assert dropped.metadata is not None and "shut down" in str(dropped.metadata["error"])
    assert list(h.completed_spans) == []


def test_a_reader_racing_writers_only_ever_sees_spans() -> None:
    h = SimpleSpanHandler(max_completed_spans=50_000)
    _, (_leaf, parent) = traced(h, "race")
    stop = threading.Event()
    bad: list[object] = []

    def write() -> None:
        while not stop.is_set():
            parent(2)

    writers = [threading.Thread(target=write) for _ in range(3)]
    for w in writers:
        w.start()
    try:
        deadline = time.monotonic() + 1.0
        reads = 0
        while time.monotonic() < deadline:
            for span in list(h.completed_spans):
                if type(span) is not SimpleSpan:
                    bad.append(span)
            for span in list(h.open_spans.values()):
                if type(span) is not SimpleSpan:
                    bad.append(span)
            reads += 1
    finally:
        stop.set()
        for w in writers:
            w.join()
    assert reads > 0 and not bad
    spans = list(h.completed_spans)
    assert len({s.id_ for s in spans}) == len(spans)
    assert not h.open_spans
    assert all(s.end_time is not None for s in spans)


def test_a_subclass_with_its_own_new_span_gets_span_objects_directly() -> None:
    class Tagged(SimpleSpanHandler):
        def new_span(self, *args: object, **kwargs: object) -> SimpleSpan:
            span = super().new_span(*args, **kwargs)  # type: ignore[arg-type]
            span.metadata = {"made": "by subclass"}
            return span

    h = Tagged()
    assert h.positional_span_enter is None
    _, (leaf, _parent) = traced(h)
    leaf(1)
    (span,) = h.completed_spans
    assert span.metadata == {"made": "by subclass"} and not h.open_spans.buffer


# -- regressions found by a second reading -----------------------------------------------


def test_a_drop_racing_a_reader_that_is_taking_the_span_in_is_not_lost() -> None:
    drop_started = threading.Event()

    class Watched(SimpleSpanHandler):
        def span_drop(self, *args: Any, **kwargs: Any) -> None:
            drop_started.set()
            super().span_drop(*args, **kwargs)

    h = Watched()
    d = get_dispatcher(fresh("droprace"))
    d.add_span_handler(h)
    open_spans = h.open_spans
    real_make = open_spans.make
    in_make, may_finish = threading.Event(), threading.Event()

    def slow_make(record: Any) -> SimpleSpan:
        in_make.set()
        may_finish.wait(10)  # a thread switch in the middle of making the span
        return real_make(record)  # type: ignore[misc]

    open_spans.make = slow_make
    reader = threading.Thread(target=lambda: len(h.open_spans))

    def release_reader_once_the_drop_runs() -> None:
        # The reader stays in the middle of taking the span in until the drop has
        # begun, and a moment longer, so that the drop meets it there.
        assert drop_started.wait(5)
        time.sleep(0.05)
        may_finish.set()

    releaser = threading.Thread(target=release_reader_once_the_drop_runs)

    @d.span
    def fails() -> None:
        reader.start()
        assert in_make.wait(5)
        releaser.start()
        raise ValueError("x")

    with pytest.raises(ValueError):
        fails()
    reader.join()
    releaser.join()
    assert drop_started.is_set()
    assert [s.name for s in h.dropped_spans] == [fails.__qualname__]
    assert not h.open_spans


def test_reading_again_on_the_same_thread_while_taking_in_does_not_deadlock() -> None:
    """A garbage-collector finalizer or a signal handler may read while a read runs."""
    h = SimpleSpanHandler()
    _, (leaf, _parent) = traced(h, "reenter")
    for i in range(5):
        leaf(i)
    completed = h.completed_spans
    real_make = completed.make
    nested: list[int] = []

    def make_and_read(item: Any) -> SimpleSpan:
        if not nested:
            nested.append(len(h.completed_spans) + len(h.open_spans))
        return real_make(item)  # type: ignore[misc]

    completed.make = make_and_read
    done = threading.Event()
    t = threading.Thread(target=lambda: (len(h.completed_spans), done.set()))
    t.start()
    assert done.wait(10), "a nested read on the same thread deadlocked"
    t.join()
    assert len(h.completed_spans) == 5 and nested


def test_a_reference_to_a_replaced_container_no_longer_takes_spans() -> None:
    h = SimpleSpanHandler()
    _, (leaf, _parent) = traced(h, "stale")
    old_completed = h.completed_spans
    leaf(1)
    h.completed_spans = deque(maxlen=2)
    assert len(old_completed) == 1  # what was buffered went with the old container
    for i in range(3):
        leaf(i)
    assert len(old_completed) == 1
    assert len(h.completed_spans) == 2 and h.completed_spans.maxlen == 2
    kept = h.completed_spans
    h.completed_spans += []
    assert h.completed_spans is kept


def test_the_handler_pickles_copies_compares_and_serialises_with_buffered_spans() -> None:
    import pydantic_core

    h = SimpleSpanHandler()
    d = get_dispatcher(fresh("ser"))
    d.add_span_handler(h)
    seen: dict[str, Any] = {}

    @d.span
    def running() -> None:
        seen["json"] = json.loads(pydantic_core.to_json(h))

    running()
    assert list(seen["json"]["open_spans"]) == [h.completed_spans[0].id_]
    assert SimpleSpanHandler() == SimpleSpanHandler()
    for copied in (pickle.loads(pickle.dumps(h)), copy.deepcopy(h), h.model_copy(deep=True)):
        assert [s.id_ for s in copied.completed_spans] == [s.id_ for s in h.completed_spans]


def test_a_subclass_that_skips_model_post_init_still_keeps_its_spans() -> None:
    class Forgetful(SimpleSpanHandler):
        def model_post_init(self, __context: Any) -> None:
            pass

    h = Forgetful()
    assert h.positional_span_enter is None
    _, (leaf, _parent) = traced(h, "forget")
    for i in range(3):
        leaf(i)
    assert len(h.completed_spans) == 3


@pytest.mark.parametrize("kind", ["simple", "guide"])
def test_spans_stay_bounded_after_the_containers_are_assigned(kind: str) -> None:
    """``handler.dropped_spans = []`` used to leave an unbounded list behind."""
    from collections import deque

    from instrumentation.span import SimpleSpan
    from instrumentation.span_handlers import BaseSpanHandler

    class Guide(BaseSpanHandler[SimpleSpan]):
        def new_span(self, id_: str, *args: Any, **kwargs: Any) -> SimpleSpan:
            return SimpleSpan(id_=id_)

        def prepare_to_exit_span(self, id_: str, *args: Any, **kwargs: Any) -> SimpleSpan:
            span = self.open_spans[id_]
            self.completed_spans.append(span)
            return span

        def prepare_to_drop_span(self, id_: str, *args: Any, **kwargs: Any) -> SimpleSpan:
            span = self.open_spans[id_]
            self.dropped_spans.append(span)
            return span

    handler: BaseSpanHandler[Any] = (
        SimpleSpanHandler(max_completed_spans=20)
        if kind == "simple"
        else Guide(max_completed_spans=20)
    )
    handler.completed_spans = []  # type: ignore[assignment]
    handler.dropped_spans = []  # type: ignore[assignment]
    get_dispatcher().add_span_handler(handler)
    d = get_dispatcher(f"bounded.{kind}")

    @d.span
    def ok() -> None:
        pass

    @d.span
    def broken() -> None:
        raise ValueError("no")

    for _ in range(50):
        ok()
        with pytest.raises(ValueError):
            broken()
    assert len(handler.completed_spans) == 20 and len(handler.dropped_spans) == 20
    handler.dropped_spans = deque(maxlen=5)
    assert handler.dropped_spans.maxlen == 5
    with pytest.raises(ValueError, match="fixed when the handler is made"):
        handler.max_completed_spans = 10


def test_a_generator_its_caller_stopped_reading_is_drawn_as_closed_early() -> None:
    """It was drawn with the failure mark, "✗ GeneratorExit: ", though stopping early
    is no failure (the store and the OpenTelemetry export keep it as ok)."""
    h = SimpleSpanHandler()
    d = get_dispatcher(fresh("buf"))
    d.add_span_handler(h)
    stop_one_and_fail_one(d)
    lines = h.format_trace_trees().splitlines()
    assert lines[0].endswith("(closed early)") and "✗" not in lines[0]
    assert lines[1].endswith("✗ ValueError: bad input")


def test_an_error_with_no_message_is_named_without_a_dangling_colon() -> None:
    """``GeneratorExit``, a bare ``raise KeyError()``: the kept error was "KeyError: "."""
    h = SimpleSpanHandler()
    d = get_dispatcher(fresh("buf"))
    d.add_span_handler(h)

    @d.span
    def bare() -> None:
        raise KeyError()

    @d.span
    def worded() -> None:
        raise KeyError("k")

    for call in (bare, worded):
        with pytest.raises(KeyError):
            call()
    assert [s.metadata for s in h.dropped_spans] == [
        {"error": "KeyError"},
        {"error": "KeyError: 'k'"},
    ]
