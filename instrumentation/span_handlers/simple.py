"""A span handler that keeps spans in memory and prints them as trees."""

from __future__ import annotations

import inspect
from datetime import datetime, timezone
from typing import Any

from instrumentation.span.simple import SimpleSpan
from instrumentation.span_handlers.base import BaseSpanHandler
from instrumentation.tree import build_forest, format_duration, render_forest


class SimpleSpanHandler(BaseSpanHandler[SimpleSpan]):
    """Keeps the last ``max_completed_spans`` spans with their timings.

    Good for development, notebooks and tests; for keeping traces, use
    ``instrumentation.storage``.
    """

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
            text = f"{span.name or span.id_}  {format_duration(span.duration if span.end_time else None)}"
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
