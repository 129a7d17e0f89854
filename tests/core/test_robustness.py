"""Concurrency, hand-made dispatchers, subclassed handlers, forests, the error log rate limit."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

from instrumentation import (
    BaseEvent,
    BaseEventHandler,
    Dispatcher,
    SimpleSpan,
    SimpleSpanHandler,
    get_dispatcher,
    root_manager,
    telemetry,
)
from instrumentation.tree import MAX_INDENT, draw_tree, format_duration

from ._support import EventList, fresh


def test_concurrent_spans_in_many_threads() -> None:
    """Eight threads making 300 nested calls each: every span is kept, none stays open, parents are
    right.
    """
    d = get_dispatcher(fresh())
    h = SimpleSpanHandler(max_completed_spans=100_000)
    d.add_span_handler(h)

    @d.span
    def inner(i: int) -> int:
        return i

    @d.span
    def outer(i: int) -> int:
        return inner(i)

    def run() -> None:
        for i in range(300):
            outer(i)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert h.open_spans == {} and len(h.completed_spans) == 8 * 300 * 2
    outers = {s.id_: s for s in h.completed_spans if s.name == outer.__qualname__}
    inners = [s for s in h.completed_spans if s.name == inner.__qualname__]
    assert len(outers) == len(inners) == 2400
    assert {s.parent_id for s in inners} == set(outers)
    assert all(s.trace_id == outers[s.parent_id or ""].trace_id for s in inners)


def test_concurrent_handler_changes_lose_nothing() -> None:
    """Eight threads adding 50 handlers each to one dispatcher while events flow: all 400 are
    attached.
    """
    d = get_dispatcher(fresh())
    child = get_dispatcher(f"{d.name}.child")
    stop = threading.Event()

    def emit() -> None:
        while not stop.is_set():
            child.event(BaseEvent())

    emitter = threading.Thread(target=emit)
    emitter.start()
    added: list[EventList] = []
    lock = threading.Lock()

    def add() -> None:
        mine = [EventList() for _ in range(50)]
        for h in mine:
            d.add_event_handler(h)
        with lock:
            added.extend(mine)

    threads = [threading.Thread(target=add) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    emitter.join()
    assert len(d.event_handlers) == 400 and set(map(id, d.event_handlers)) == set(map(id, added))
    before = [len(h.events) for h in added]
    child.event(BaseEvent())
    assert [len(h.events) for h in added] == [n + 1 for n in before]


def test_hand_made_dispatcher_and_add_dispatcher() -> None:
    """Dispatcher(...) made by hand reaches its own handlers; root_manager.add_dispatcher puts it
    in the tree.
    """
    own = EventList()
    name = fresh("hand")
    made = Dispatcher(name=f"{name}.x", event_handlers=[own], propagate=True, parent_name="root")
    made.event(BaseEvent())
    assert len(own.events) == 1 and made.parent is None
    root_manager.add_dispatcher(made)
    assert get_dispatcher(f"{name}.x") is made
    parent_handler = EventList()
    get_dispatcher(name).add_event_handler(parent_handler)
    assert made.parent is get_dispatcher(name)
    made.event(BaseEvent())
    assert len(own.events) == 2 and len(parent_handler.events) == 1
    with pytest.raises(TypeError):
        Dispatcher(name="y", event_handlers=[object()])  # type: ignore[list-item]
    misplaced = Dispatcher(name=f"{name}.y", parent_name="elsewhere")
    with pytest.raises(ValueError, match="dotted name"):
        root_manager.add_dispatcher(misplaced)
    assert root_manager.dispatchers.get(f"{name}.y") is None


def test_simple_span_handler_subclass_uses_its_overrides() -> None:
    """A SimpleSpanHandler subclass overriding prepare_to_exit_span is called (the fast path steps
    aside).
    """

    class Tagging(SimpleSpanHandler):
        def prepare_to_exit_span(
            self,
            id_: str,
            bound_args: Any,
            instance: Any | None = None,
            result: Any | None = None,
            **kwargs: Any,
        ) -> SimpleSpan | None:
            span = super().prepare_to_exit_span(id_, bound_args, instance, result, **kwargs)
            if span is not None:
                span.metadata = {"result": result}
            return span

    d = get_dispatcher(fresh())
    h = Tagging()
    d.add_span_handler(h)

    @d.span
    def f() -> int:
        return 7

    f()
    (span,) = h.completed_spans
    assert span.metadata == {"result": 7} and span.name == f.__qualname__ and span.trace_id


def test_forest_with_missing_parents_and_durations() -> None:
    """Items whose parent is absent become roots; children nest and sort; durations read well."""
    items = [("c", "b", 3), ("b", "a", 2), ("x", "gone", 1), ("d", "b", 4)]
    text = draw_tree(items, lambda i: i[0], lambda i: i[1], lambda i: i[0], lambda i: i[2])
    assert text.splitlines() == ["x", "b", "├── c", "└── d"]
    assert format_duration(None) == "open" and format_duration(5e-6) == "5 µs"
    assert format_duration(0.0123) == "12.3 ms" and format_duration(2.5) == "2.50 s"
    loop = [("a", "b", 1), ("b", "a", 2)]
    assert draw_tree(loop, lambda i: i[0], lambda i: i[1], lambda i: i[0]) == ""


def test_a_duration_that_rounds_up_to_the_next_unit_is_shown_in_it() -> None:
    """The unit was chosen before rounding: 999.7 µs printed as ``1000 µs`` and
    999.97 ms as ``1000.0 ms``, where the trees and ``list`` say ``1.0 ms`` and
    ``1.00 s``."""
    assert format_duration(0.0009997) == "1.0 ms"
    assert format_duration(0.0009994) == "999 µs"
    assert format_duration(0.99997) == "1.00 s"
    assert format_duration(0.99994) == "999.9 ms"


def test_a_duration_of_a_minute_or_more_is_shown_in_two_units() -> None:
    """``7322.00 s`` and ``259200.00 s`` had to be worked out: from a minute up the
    duration is in the larger unit and the next, rounded to the smaller."""
    assert format_duration(59.99) == "59.99 s"
    assert format_duration(59.996) == "1m 00s"  # rounds up to the next unit: shown in it
    assert format_duration(122.4) == "2m 02s"
    assert format_duration(3599.4) == "59m 59s" and format_duration(3599.6) == "1h 00m"
    assert format_duration(7322.0) == "2h 02m"
    assert format_duration(86399.0) == "1d 00h" and format_duration(259200.0) == "3d 00h"
    assert format_duration(float("inf")) == "inf s"


def test_simple_span_handler_draws_a_trace_thousands_of_levels_deep() -> None:
    """The trees were drawn by recursion, which stopped at about 500 levels: a traced
    recursive algorithm could not be printed."""
    from instrumentation import SimpleSpanHandler, get_dispatcher

    h = SimpleSpanHandler()
    d = get_dispatcher("tests.core.robustness.deep")
    d.add_span_handler(h)
    try:
        spans = [(f"s{i}", f"s{i - 1}" if i else None, i) for i in range(3000)]
        text = draw_tree(spans, lambda s: s[0], lambda s: s[1], lambda s: s[0], lambda s: s[2])
        lines = text.splitlines()
        assert len(lines) == 3000 and lines[-1].endswith("└── [2999] s2999")
        # The indentation stops growing past MAX_INDENT levels (the text grew with the
        # square of the depth: 200 million characters for 10,000 levels).
        assert max(len(line) for line in lines) < 4 * MAX_INDENT + 20
        assert lines[MAX_INDENT].endswith(f"└── s{MAX_INDENT}")

        import contextlib

        with contextlib.ExitStack() as nested:  # 1,500 spans, one inside the other
            for i in range(1500):
                nested.enter_context(d.span(f"level{i}"))
        drawn = h.format_trace_trees().splitlines()
        assert len(drawn) == 1500 and "└── [1499] level1499" in drawn[-1]
    finally:
        d.remove_span_handler(h)


def test_rate_limited_log_reports_the_suppressed_count(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the interval passes, the next log line says how many errors went unlogged."""

    class Boom(BaseEventHandler):
        def handle(self, event: BaseEvent, **kwargs: Any) -> None:
            raise RuntimeError("x")

    now = [1000.0]
    monkeypatch.setattr("instrumentation.telemetry.time.monotonic", lambda: now[0])
    d = get_dispatcher(fresh())
    d.add_event_handler(Boom())
    with caplog.at_level(logging.ERROR, logger="instrumentation"):
        for _ in range(3):
            d.event(BaseEvent())
        now[0] += telemetry.LOG_INTERVAL_SECONDS + 1
        d.event(BaseEvent())
    records = [r.getMessage() for r in caplog.records if r.name == "instrumentation"]
    assert len(records) == 2 and "2 more errors" in records[1]
    assert telemetry.handler_errors() == {"Boom": 4}


async def test_failing_ahandle_is_counted() -> None:
    """An async handler raising in ahandle() does not break aevent() and is counted."""

    class ABoom(BaseEventHandler):
        def handle(self, event: BaseEvent, **kwargs: Any) -> None:
            return None

        async def ahandle(self, event: BaseEvent, **kwargs: Any) -> None:
            raise RuntimeError("async handler")

    d = get_dispatcher(fresh())
    ok = EventList()
    d.add_event_handler(ABoom())
    d.add_event_handler(ok)
    await d.aevent(BaseEvent())
    assert len(ok.events) == 1 and telemetry.handler_errors() == {"ABoom": 1}


def test_a_misspelt_handler_option_is_an_error_not_ignored() -> None:
    """``SimpleSpanHandler(max_completed_span=5)`` would otherwise keep 10,000 spans."""
    from pydantic import ValidationError

    from instrumentation.event_handlers import NullEventHandler
    from instrumentation.span_handlers import SimpleSpanHandler

    with pytest.raises(ValidationError, match="max_completed_span\n"):
        SimpleSpanHandler(max_completed_span=5)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="colour"):
        NullEventHandler(colour="red")  # type: ignore[call-arg]
    assert SimpleSpanHandler(max_completed_spans=5).max_completed_spans == 5


def test_a_misspelt_handler_option_names_the_option_meant() -> None:
    """pydantic said "Extra inputs are not permitted" and nothing more: the error is
    the same ``ValidationError`` (of the same type, for the same argument) with the
    field's name it is close to. Other errors, and a name close to none, stay as
    they were."""
    from pydantic import BaseModel, ValidationError

    from instrumentation.span_handlers import SimpleSpanHandler
    from instrumentation.storage import SQLiteStore, StorageHandler

    with pytest.raises(ValidationError) as refused:
        SimpleSpanHandler(max_completed_span=5, max_completed_spans=-1)  # type: ignore[call-arg]
    too_few, misspelt = refused.value.errors()
    assert too_few["type"] == "greater_than_equal" and too_few["loc"] == ("max_completed_spans",)
    assert misspelt["type"] == "extra_forbidden" and misspelt["loc"] == ("max_completed_span",)
    assert misspelt["msg"] == (
        "Extra inputs are not permitted; did you mean 'max_completed_spans'?"
    )
    with pytest.raises(ValidationError, match="did you mean 'batch_size'"):
        StorageHandler(store=SQLiteStore(":memory:"), batchsize=3)  # type: ignore[call-arg]
    with pytest.raises(ValidationError) as refused:
        SimpleSpanHandler(zzz=1)  # type: ignore[call-arg]
    assert refused.value.errors()[0]["msg"] == "Extra inputs are not permitted"

    class Options(BaseModel, extra="forbid"):  # not the library's: as pydantic has it
        batch_size: int = 1

    with pytest.raises(ValidationError) as refused:
        Options(batchsize=3)  # type: ignore[call-arg]
    assert refused.value.errors()[0]["msg"] == "Extra inputs are not permitted"


def test_a_misspelt_option_of_an_aliased_field_names_what_the_handler_takes() -> None:
    """A field taken by its alias alone was suggested by its name, which is refused
    too: ``max_items=3`` got "did you mean 'max_items'?", itself."""
    from pydantic import ConfigDict, Field, ValidationError

    from instrumentation.span_handlers import SimpleSpanHandler

    class Aliased(SimpleSpanHandler):
        max_items: int = Field(default=1, alias="maxItems")

    class ByNameToo(Aliased):
        model_config = ConfigDict(populate_by_name=True)

    for given in ("max_items", "maxItem"):
        with pytest.raises(ValidationError) as refused:
            Aliased(**{given: 3})
        assert refused.value.errors()[0]["msg"].endswith("did you mean 'maxItems'?"), given
    with pytest.raises(ValidationError, match="did you mean 'max_items'"):
        ByNameToo(max_item=3)  # type: ignore[call-arg]
    assert Aliased(maxItems=3).max_items == ByNameToo(max_items=3).max_items == 3


def test_a_misspelt_option_keeps_the_inputs_a_handler_hides_from_errors() -> None:
    """With the suggestion, the error showed every input, a handler's
    ``hide_input_in_errors=True`` notwithstanding: its secrets were printed."""
    from pydantic import ConfigDict, ValidationError

    from instrumentation.span_handlers import SimpleSpanHandler

    class Keyed(SimpleSpanHandler):
        model_config = ConfigDict(hide_input_in_errors=True)
        api_key: int = 0

    with pytest.raises(ValidationError) as refused:
        Keyed(api_key="sk-one", api_kye="sk-two")  # type: ignore[call-arg]
    shown = str(refused.value)
    assert "did you mean 'api_key'" in shown
    assert "sk-one" not in shown and "sk-two" not in shown


@pytest.mark.parametrize("failing", ["prepare_to_exit_span", "prepare_to_drop_span"])
def test_a_handler_failing_to_end_spans_does_not_keep_them_open(failing: str) -> None:
    """A handler whose prepare method raises on every span is reported each time, and
    its ``open_spans`` (the library's to keep) does not grow with every call."""
    from ._support import GuideSpanHandler

    class Failing(GuideSpanHandler):
        def prepare_to_exit_span(self, id_: str, *args: Any, **kwargs: Any) -> SimpleSpan | None:
            if failing == "prepare_to_exit_span":
                raise RuntimeError("broken exit")
            return super().prepare_to_exit_span(id_, *args, **kwargs)

        def prepare_to_drop_span(self, id_: str, *args: Any, **kwargs: Any) -> SimpleSpan | None:
            if failing == "prepare_to_drop_span":
                raise RuntimeError("broken drop")
            return super().prepare_to_drop_span(id_, *args, **kwargs)

    handler = Failing()
    d = get_dispatcher(fresh())
    d.add_span_handler(handler)

    @d.span
    def work(fail: bool) -> None:
        if fail:
            raise ValueError("app error")

    before = telemetry.handler_errors().get("Failing", 0)
    for _ in range(50):
        work(False)
        with pytest.raises(ValueError, match="app error"):
            work(True)
    assert handler.open_spans == {}
    assert telemetry.handler_errors().get("Failing", 0) == before + 50


def test_nan_cleaning_keeps_containers_made_while_it_walks_apart() -> None:
    """Copies were remembered by ``id()`` to copy a container met twice once; a list
    whose iteration makes its rows freed each row once copied, the next row got its
    address, and was taken for it: the second list came out as the first's rows."""
    from instrumentation._finite import finite

    class Rows(list):  # type: ignore[type-arg]
        def __init__(self, tag: str) -> None:
            super().__init__()
            self.tag = tag

        def __iter__(self):  # type: ignore[no-untyped-def]
            for i in range(3):
                yield [self.tag, i, float("nan")]

    assert finite([Rows("A"), Rows("B")]) == [
        [[tag, i, None] for i in range(3)] for tag in ("A", "B")
    ]
