"""A failing handler never breaks the caller or other handlers; it is logged (rate-limited) and
counted.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import pytest

from instrumentation import (
    BaseEvent,
    BaseEventHandler,
    SimpleSpanHandler,
    get_dispatcher,
    telemetry,
)

from ._support import EventList, Recorder, fresh


class Boom(BaseEventHandler):
    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        raise RuntimeError("handler bug")


class Interrupting(BaseEventHandler):
    exc: Any = KeyboardInterrupt

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        raise self.exc()


class BrokenSpans(Recorder):
    where: str = "enter"

    def span_enter(self, id_: str, bound_args: inspect.BoundArguments, *a: Any, **k: Any) -> None:
        if self.where == "enter":
            raise RuntimeError("enter bug")

    def span_exit(self, id_: str, bound_args: inspect.BoundArguments, *a: Any, **k: Any) -> None:
        if self.where == "exit":
            raise RuntimeError("exit bug")

    def span_drop(self, id_: str, bound_args: inspect.BoundArguments, *a: Any, **k: Any) -> None:
        if self.where == "drop":
            raise RuntimeError("drop bug")


class Ping(BaseEvent):
    pass


def test_raising_event_handler_is_logged_counted_and_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A handler raising between two good ones: caller unaffected, both others get the event, log
    names handler and event.
    """
    d = get_dispatcher(fresh())
    first, second = EventList(), EventList()
    d.add_event_handler(first)
    d.add_event_handler(Boom())
    d.add_event_handler(second)
    with caplog.at_level(logging.ERROR, logger="instrumentation"):
        d.event(Ping())
    assert len(first.events) == 1 and len(second.events) == 1
    assert telemetry.handler_errors() == {"Boom": 1}
    assert telemetry.HANDLER_ERRORS.value == 1
    assert telemetry.snapshot()["handler_errors_by_handler"] == {"Boom": 1}
    (record,) = [r for r in caplog.records if r.name == "instrumentation"]
    assert "Boom" in record.getMessage() and "Ping" in record.getMessage()
    assert "handler bug" in record.getMessage()


def test_errors_are_rate_limited_in_the_log_but_all_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Fifty failures of one handler give one log record but a count of fifty."""
    d = get_dispatcher(fresh())
    d.add_event_handler(Boom())
    with caplog.at_level(logging.ERROR, logger="instrumentation"):
        for _ in range(50):
            d.event(Ping())
    assert len([r for r in caplog.records if r.name == "instrumentation"]) == 1
    assert telemetry.handler_errors()["Boom"] == 50


def test_first_log_line_says_what_happens_to_the_next_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The one line a reader sees says that later errors are counted, not logged, where
    to read the count, and how to make them raise in tests: otherwise a handler failing
    on every event looks like one that failed once."""
    d = get_dispatcher(fresh())
    d.add_event_handler(Boom())
    with caplog.at_level(logging.ERROR, logger="instrumentation"):
        for _ in range(3):
            d.event(Ping())
    (record,) = [r for r in caplog.records if r.name == "instrumentation"]
    message = record.getMessage()
    assert "further errors within 10 s are counted, not logged" in message
    assert "telemetry.handler_errors()" in message
    assert "raise_handler_errors = True" in message


@pytest.mark.parametrize("where", ["enter", "exit", "drop"])
def test_raising_span_handler_does_not_break_the_call(where: str) -> None:
    """A span handler failing in span_enter/exit/drop leaves the call's result or error and the
    other handler intact.
    """
    d = get_dispatcher(fresh())
    good = SimpleSpanHandler()
    d.add_span_handler(BrokenSpans(where=where))
    d.add_span_handler(good)

    @d.span
    def ok() -> int:
        return 5

    @d.span
    def bad() -> None:
        raise ValueError("app error")

    assert ok() == 5
    with pytest.raises(ValueError, match="app error"):
        bad()
    assert len(good.completed_spans) == 1 and len(good.dropped_spans) == 1
    assert telemetry.handler_errors() == {"BrokenSpans": 2 if where == "enter" else 1}


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_keyboard_interrupt_in_a_handler_is_not_swallowed(exc: type[BaseException]) -> None:
    """KeyboardInterrupt/SystemExit raised inside an event handler reach the caller and are not
    counted as handler errors.
    """
    d = get_dispatcher(fresh())
    d.add_event_handler(Interrupting(exc=exc))
    with pytest.raises(exc):
        d.event(Ping())
    assert telemetry.HANDLER_ERRORS.value == 0


def test_keyboard_interrupt_in_a_span_handler_propagates_and_resets_context() -> None:
    """KeyboardInterrupt from span_exit reaches the caller, and the current span is reset
    afterwards.
    """
    from instrumentation import current_span

    class Interrupt(Recorder):
        def span_exit(self, *a: Any, **k: Any) -> None:
            raise KeyboardInterrupt

    d = get_dispatcher(fresh())
    d.add_span_handler(Interrupt())

    @d.span
    def work() -> int:
        return 1

    with pytest.raises(KeyboardInterrupt):
        work()
    assert current_span() is None


def test_raise_handler_errors_switch_reraises(monkeypatch: pytest.MonkeyPatch) -> None:
    """With telemetry.raise_handler_errors on, a handler's exception reaches the caller (for
    debugging).
    """
    monkeypatch.setattr(telemetry, "raise_handler_errors", True)
    d = get_dispatcher(fresh())
    d.add_event_handler(Boom())
    with pytest.raises(RuntimeError, match="handler bug"):
        d.event(Ping())


def test_broken_class_name_still_reported() -> None:
    """A handler whose class_name() itself raises is still counted under its type name."""

    class Weird(Boom):
        @classmethod
        def class_name(cls) -> str:
            raise RuntimeError("no name")

    d = get_dispatcher(fresh())
    d.add_event_handler(Weird())
    d.event(Ping())
    assert telemetry.handler_errors() == {"Weird": 1}


def test_a_handler_cannot_change_the_active_tags() -> None:
    """A span handler writing into the shared empty tags fails (counted) instead of tagging all."""

    class Scribbler(Recorder):
        def span_enter(self, id_: str, bound_args: Any, *a: Any, **k: Any) -> None:
            tags: Any = k.get("tags") if "tags" in k else a[2]
            tags["polluted"] = True

        def span_exit(self, *a: Any, **k: Any) -> None:
            return None

    from instrumentation import instrument_tags
    from instrumentation.context import current_tags

    d = get_dispatcher(fresh())
    d.add_span_handler(Scribbler())
    ev = EventList()
    d.add_event_handler(ev)

    @d.span
    def f() -> None:
        d.event(Ping())

    f()
    f()
    assert dict(current_tags()) == {}
    assert [e.tags for e in ev.events] == [{}, {}]
    assert telemetry.handler_errors() == {"Scribbler": 2}
    with instrument_tags({"a": 1}):
        d.event(Ping())
    assert ev.events[-1].tags == {"a": 1}


def test_the_tags_outside_any_block_are_an_empty_dict_a_handler_can_serialise() -> None:
    """Handlers written for LlamaIndex check ``isinstance(tags, dict)``, ``json.dumps`` or
    deep-copy the tags: outside every instrument_tags block (the usual case) they were a
    mappingproxy, and each of those failed, losing every such span to the handler."""
    import copy
    import json
    import pickle

    seen: list[Any] = []

    class Serialising(Recorder):
        def span_enter(self, id_: str, bound_args: Any, *a: Any, **k: Any) -> None:
            tags: Any = k.get("tags") if "tags" in k else a[2]
            assert isinstance(tags, dict)
            seen.append((json.dumps(tags), copy.deepcopy(tags), pickle.loads(pickle.dumps(tags))))
            mine = copy.copy(tags)
            mine["changed"] = True  # a copy is the handler's own

        def span_exit(self, *a: Any, **k: Any) -> None:
            return None

    d = get_dispatcher(fresh())
    d.add_span_handler(Serialising())

    @d.span
    def f() -> None:
        return None

    f()
    f()
    assert seen == [("{}", {}, {}), ("{}", {}, {})]
    assert telemetry.handler_errors() == {}
    from instrumentation.context import current_tags

    assert dict(current_tags()) == {}
    with pytest.raises(TypeError, match=r"read-only .* dict\(tags\)"):
        current_tags().update(a=1)  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="read-only"):
        current_tags().__init__(a=1)  # type: ignore[misc]
    assert repr(current_tags()) == "{}" and len(current_tags()) == 0
