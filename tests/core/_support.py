"""Shared helpers for the core tests: a recording span handler and unique dispatcher names."""

from __future__ import annotations

import inspect
import itertools
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import PrivateAttr

from instrumentation import BaseEvent, BaseEventHandler, BaseSpan, BaseSpanHandler, SimpleSpan

_counter = itertools.count()


def fresh(prefix: str = "t") -> str:
    """A dispatcher name no other test uses, so the global tree never leaks between tests."""
    return f"{prefix}{next(_counter)}_{uuid.uuid4().hex[:8]}"


@dataclass
class SpanRecord:
    id_: str
    name: str | None
    parent_id: str | None
    trace_id: str | None
    tags: dict[str, Any] | None
    bound_args: inspect.BoundArguments
    instance: Any
    attributes: Any
    dispatcher: str | None
    status: str = "open"
    result: Any = None
    err: BaseException | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Recorder(BaseSpanHandler[BaseSpan]):
    """Records every span_enter/exit/drop call it gets, keyed by span id (thread-safe)."""

    _records: dict[str, SpanRecord] = PrivateAttr(default_factory=dict)
    _order: list[tuple[str, str]] = PrivateAttr(default_factory=list)
    _guard: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @property
    def records(self) -> dict[str, SpanRecord]:
        return self._records

    @property
    def order(self) -> list[tuple[str, str]]:
        return self._order

    def named(self, name: str) -> list[SpanRecord]:
        return [r for r in self._records.values() if r.name == name]

    def one(self, name: str) -> SpanRecord:
        found = self.named(name)
        assert len(found) == 1, (name, [r.name for r in self._records.values()])
        return found[0]

    def span_enter(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        parent_id: str | None = None,
        tags: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        with self._guard:
            assert id_ not in self._records, f"span {id_} entered twice"
            self._records[id_] = SpanRecord(
                id_=id_,
                name=kwargs.get("name"),
                parent_id=parent_id,
                trace_id=kwargs.get("trace_id"),
                tags=dict(tags) if tags is not None else None,
                bound_args=bound_args,
                instance=instance,
                attributes=kwargs.get("attributes"),
                dispatcher=kwargs.get("dispatcher"),
            )
            self._order.append(("enter", id_))

    def span_exit(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        result: Any | None = None,
        **kwargs: Any,
    ) -> None:
        with self._guard:
            rec = self._records[id_]
            assert rec.status == "open", f"span {id_} ended twice"
            rec.status, rec.result = "exit", result
            self._order.append(("exit", id_))

    def span_drop(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        err: BaseException | None = None,
        **kwargs: Any,
    ) -> None:
        with self._guard:
            rec = self._records.get(id_)
            if rec is None:
                return
            assert rec.status == "open", f"span {id_} ended twice"
            rec.status, rec.err = "drop", err
            self._order.append(("drop", id_))

    def new_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        parent_span_id: str | None = None,
        tags: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        return None

    def prepare_to_exit_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        result: Any | None = None,
        **kwargs: Any,
    ) -> None:
        return None

    def prepare_to_drop_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        err: BaseException | None = None,
        **kwargs: Any,
    ) -> None:
        return None


class EventList(BaseEventHandler):
    """Keeps the events it is given, in order."""

    _events: list[BaseEvent] = PrivateAttr(default_factory=list)

    @property
    def events(self) -> list[BaseEvent]:
        return self._events

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        self._events.append(event)


class GuideSpanHandler(BaseSpanHandler[SimpleSpan]):
    """A span handler written as the guide shows one: subclass it and override what a
    test needs to change."""

    def new_span(
        self,
        id_: str,
        bound_args: Any,
        instance: Any = None,
        parent_span_id: str | None = None,
        tags: Any = None,
        **kwargs: Any,
    ) -> SimpleSpan:
        return SimpleSpan(id_=id_, parent_id=parent_span_id)

    def prepare_to_exit_span(
        self, id_: str, bound_args: Any, instance: Any = None, result: Any = None, **kwargs: Any
    ) -> SimpleSpan | None:
        span = self.open_spans.get(id_)
        if span is not None:
            self.completed_spans.append(span)
        return span

    def prepare_to_drop_span(
        self,
        id_: str,
        bound_args: Any,
        instance: Any = None,
        err: BaseException | None = None,
        **kwargs: Any,
    ) -> SimpleSpan | None:
        span = self.open_spans.get(id_)
        if span is not None:
            self.dropped_spans.append(span)
        return span
