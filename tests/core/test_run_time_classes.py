"""Event classes made at run time (pydantic's ``create_model``, one per request or per
tool) are freed once the application lets go of them: a per-class cache that held them
kept every one for the life of the process (tens of kB each). So are the classes of
what traced calls return, and of the instances whose traced methods they call."""

from __future__ import annotations

import gc
import inspect
import weakref
from pathlib import Path
from typing import Any

from pydantic import create_model

from instrumentation import BaseEvent, _spans, _wrap, audit, get_dispatcher, storage
from instrumentation.audit import EventHandler
from instrumentation.span.simple import SimpleSpan
from instrumentation.span_handlers import BaseSpanHandler, SimpleSpanHandler
from instrumentation.span_handlers import base as span_handlers_base
from instrumentation.span_handlers import simple as simple_module

d = get_dispatcher("tests.core.run_time_classes")


def _made_at_run_time(name: str) -> type[BaseEvent]:
    made: type[BaseEvent] = create_model(name, __base__=BaseEvent, value=(int, 0))
    return made


def _freed(ref: weakref.ref[type[BaseEvent]]) -> bool:
    for _ in range(3):  # a pydantic class is in reference cycles of its own
        gc.collect()
    return ref() is None


def test_an_event_class_stored_once_is_not_kept_by_the_storage(tmp_path: Path) -> None:
    with storage.record_to(tmp_path / "t.db") as recorder:
        cls = _made_at_run_time("StoredOnce")
        d.event(cls(value=1))
        assert recorder.flush(10)
    ref = weakref.ref(cls)
    del cls
    assert _freed(ref)


class _Quiet(EventHandler[None, None]):
    def request_start(self, user_request: object) -> None:
        return None

    def event_start(self, event: object, request_context: None) -> None:
        return None

    def event_end(self, event: object, request_context: None, event_context: None) -> None:
        return None

    def request_end(self, output: object, request_context: None) -> None:
        return None


def test_an_event_class_seen_in_a_request_is_not_kept_by_the_audit() -> None:
    with audit.request(question="q", handlers=[_Quiet()]) as req:
        cls = _made_at_run_time("AuditedOnce")
        d.event(cls(value=1))
        req.result = "done"
    ref = weakref.ref(cls)
    del cls
    assert _freed(ref)


def _span_handler_classes() -> list[type[BaseSpanHandler[Any]]]:
    """Handler classes made at run time (a factory's, one per tenant or test), each
    taking a path of its own: SimpleSpanHandler's fast one, and a LlamaIndex-style
    handler without ``**kwargs``, with its own span list."""

    class Fast(SimpleSpanHandler):
        pass

    class LlamaStyle(BaseSpanHandler[SimpleSpan]):
        completed_spans: list[SimpleSpan] = []

        def new_span(
            self,
            id_: str,
            bound_args: inspect.BoundArguments,
            instance: Any | None = None,
            parent_span_id: str | None = None,
            tags: dict[str, Any] | None = None,
        ) -> SimpleSpan | None:
            return SimpleSpan(id_=id_, parent_id=parent_span_id)

        def prepare_to_exit_span(
            self,
            id_: str,
            bound_args: inspect.BoundArguments,
            instance: Any | None = None,
            result: Any | None = None,
        ) -> SimpleSpan | None:
            span = self.open_spans.get(id_)
            if span is not None:
                self.completed_spans.append(span)
            return span

        def prepare_to_drop_span(
            self,
            id_: str,
            bound_args: inspect.BoundArguments,
            instance: Any | None = None,
            err: BaseException | None = None,
        ) -> SimpleSpan | None:
            return None

        def span_enter(
            self,
            id_: str,
            bound_args: inspect.BoundArguments,
            instance: Any | None = None,
            parent_id: str | None = None,
            tags: dict[str, Any] | None = None,
        ) -> None:
            super().span_enter(id_, bound_args, instance, parent_id, tags)

    return [Fast, LlamaStyle]


def test_span_handler_classes_made_at_run_time_are_freed() -> None:
    refs = []
    ids = []
    for cls in _span_handler_classes():
        ids.append(id(cls))
        handler = cls()
        d.add_span_handler(handler)
        try:
            d.span(lambda: None)()
            with d.span("block"):
                pass
        finally:
            d.remove_span_handler(handler)
        assert handler.open_spans == {} and len(handler.completed_spans) == 2, cls
        refs.append(weakref.ref(cls))
        del cls, handler
    assert all(_freed(ref) for ref in refs)
    # What was worked out for them goes too, from every table that asked (an id is
    # reused: a stale answer would be another class's).
    tables = (
        span_handlers_base._bounded_found,
        span_handlers_base._takes_kwargs_found,
        simple_module._fast_found,
        _spans._enter_extras_found,
    )
    assert [i for i in ids for table in tables if i in table] == []


def test_a_subclass_works_its_own_answers_out() -> None:
    """What is kept on a class for it is not taken by its subclasses: a subclass of the
    fast handler that overrides a span method takes the ordinary path."""
    fast, _ = _span_handler_classes()
    seen: list[str] = []

    class Overriding(fast):  # type: ignore[valid-type,misc]
        def prepare_to_exit_span(self, id_: str, *args: Any, **kwargs: Any) -> SimpleSpan | None:
            seen.append(id_)
            return super().prepare_to_exit_span(id_, *args, **kwargs)  # type: ignore[no-any-return]

    for cls in (fast, Overriding, fast):
        handler = cls()
        d.add_span_handler(handler)
        try:
            d.span(lambda: None)()
        finally:
            d.remove_span_handler(handler)
        assert len(handler.completed_spans) == 1
    assert len(seen) == 1


def test_a_result_class_made_at_run_time_is_not_kept_by_the_traced_call() -> None:
    """A pydantic model made for one request's structured output, returned by a traced
    call: what the call worked out about the result's class (whether to await it) kept
    up to 4096 such classes."""

    @d.span
    def structured(model: type[BaseEvent], value: int) -> BaseEvent:
        return model(value=value)

    handler = SimpleSpanHandler()
    d.add_span_handler(handler)
    try:
        model = _made_at_run_time("StructuredAnswer")
        assert [structured(model, i).value for i in range(2)] == [0, 1]  # asked, then known
    finally:
        d.remove_span_handler(handler)
    assert len(handler.completed_spans) == 2
    ref, key = weakref.ref(model), id(model)
    del model
    assert _freed(ref)
    assert key not in _wrap._awaitable_made_types


def test_a_subclass_made_at_run_time_is_not_kept_by_an_inherited_traced_method() -> None:
    """A traced method's span is named after the instance's class ("Tenant.answer"):
    the name kept for each class kept the class (up to 1024 per method)."""

    class Service:
        @d.span
        def answer(self) -> int:
            return 1

    handler = SimpleSpanHandler()
    d.add_span_handler(handler)
    try:
        tenant = type("Tenant", (Service,), {})
        assert tenant().answer() + tenant().answer() == 2
    finally:
        d.remove_span_handler(handler)
    assert [s.name for s in handler.completed_spans] == ["Tenant.answer"] * 2
    ref = weakref.ref(tenant)
    del tenant
    assert _freed(ref)
