"""A span handler that keeps spans in memory and prints them as trees."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, ClassVar

from pydantic import BaseModel

from instrumentation.span.simple import SimpleSpan
from instrumentation.span_handlers.base import BaseSpanHandler
from instrumentation.tree import build_forest, format_duration, render_forest

_utc = timezone.utc
_now = datetime.now
_new_span_object = object.__new__
_set = object.__setattr__
# pydantic's own slots, set through their descriptors (cheaper than setattr by name).
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__
_FIELDS_SET = frozenset(SimpleSpan.model_fields)
_fast_classes: dict[type, bool] = {}


def _uses_own_methods(cls: type) -> bool:
    """Whether ``cls`` keeps SimpleSpanHandler's span methods (so the fast path is right)."""
    found = _fast_classes.get(cls)
    if found is None:
        found = all(
            getattr(cls, name) is getattr(SimpleSpanHandler, name)
            for name in (
                "new_span",
                "prepare_to_exit_span",
                "prepare_to_drop_span",
                "span_enter",
                "span_exit",
            )
        )
        _fast_classes[cls] = found
    return found


class SimpleSpanHandler(BaseSpanHandler[SimpleSpan]):
    """Keeps the last ``max_completed_spans`` spans with their timings.

    Good for development, notebooks and tests; for keeping traces, use
    ``instrumentation.storage``. It runs on every traced call, so entering and
    leaving a span skip pydantic's validation (the values are ours and already of
    the right types); subclasses that override ``new_span`` or the ``prepare``
    methods go the ordinary way.
    """

    needs_bound_args: ClassVar[bool] = False

    @property
    def positional_span_enter(self) -> Callable[..., None] | None:
        """The dispatcher's fast entry point, unless a subclass changed how spans are made."""
        return self._enter if _uses_own_methods(type(self)) else None

    @property
    def positional_span_exit(self) -> Callable[..., None] | None:
        return self._exit if _uses_own_methods(type(self)) else None

    def _enter(
        self,
        id_: str,
        bound_args: Any,
        instance: Any,
        parent_id: str | None,
        tags: Any,
        name: str | None,
        trace_id: str | None,
        dispatcher: str | None,
        attributes: Any,
    ) -> None:
        open_spans = self.open_spans
        if id_ in open_spans:
            return
        span = _new_span_object(SimpleSpan)
        _set(
            span,
            "__dict__",
            {
                "id_": id_,
                "parent_id": parent_id,
                "tags": dict(tags) if tags else {},
                "trace_id": trace_id,
                "name": name,
                "start_time": _now(_utc),
                "end_time": None,
                "duration": 0.0,
                "metadata": None,
                "dispatcher": dispatcher,
            },
        )
        _set_fields_set(span, set(_FIELDS_SET))
        _set_extra(span, None)
        _set_private(span, None)
        open_spans[id_] = span

    def _exit(self, id_: str, bound_args: Any, instance: Any, result: Any) -> None:
        span = self.open_spans.pop(id_, None)
        if span is None:
            return
        fields = span.__dict__
        end = _now(_utc)
        fields["end_time"] = end
        fields["duration"] = (end - fields["start_time"]).total_seconds()
        self.completed_spans.append(span)

    def new_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        parent_span_id: str | None = None,
        tags: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> SimpleSpan:
        return SimpleSpan(
            id_=id_,
            parent_id=parent_span_id,
            tags=dict(tags) if tags else {},
            trace_id=kwargs.get("trace_id"),
            name=kwargs.get("name"),
            dispatcher=kwargs.get("dispatcher"),
        )

    def prepare_to_exit_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        result: Any | None = None,
        **kwargs: Any,
    ) -> SimpleSpan | None:
        span = self.open_spans.get(id_)
        if span is None:
            return None
        end = datetime.now(timezone.utc)
        span.end_time = end
        span.duration = (end - span.start_time).total_seconds()
        self.completed_spans.append(span)
        return span

    def prepare_to_drop_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        err: BaseException | None = None,
        **kwargs: Any,
    ) -> SimpleSpan | None:
        span = self.open_spans.get(id_)
        if span is None:
            return None
        end = datetime.now(timezone.utc)
        span.end_time = end
        span.duration = (end - span.start_time).total_seconds()
        span.metadata = {"error": f"{type(err).__name__}: {err}" if err is not None else None}
        self.dropped_spans.append(span)
        return span

    def all_spans(self) -> list[SimpleSpan]:
        """Completed, dropped and still open spans, oldest start first."""
        spans = [*self.completed_spans, *self.dropped_spans, *self.open_spans.values()]
        spans.sort(key=lambda s: s.start_time)
        return spans

    def format_trace_trees(self) -> str:
        """Every kept span as an indented tree with durations, one tree per root."""

        def label(span: SimpleSpan) -> str:
            took = format_duration(span.duration if span.end_time else None)
            text = f"{span.name or span.id_}  {took}"
            if span.metadata and span.metadata.get("error"):
                text += f"  ✗ {span.metadata['error']}"
            return text

        forest = build_forest(
            self.all_spans(), lambda s: s.id_, lambda s: s.parent_id, lambda s: s.start_time
        )
        return render_forest(forest, label)

    def print_trace_trees(self) -> None:
        """Print :meth:`format_trace_trees`."""
        text = self.format_trace_trees()
        print(text if text else "(no spans)")


__all__ = ["SimpleSpanHandler"]
