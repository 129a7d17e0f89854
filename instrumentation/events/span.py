"""Events the dispatcher emits about spans."""

from __future__ import annotations

from instrumentation.events.base import BaseEvent


class SpanDropEvent(BaseEvent):
    """A span ended with an exception; ``span_id`` is the span that was dropped."""

    err_str: str


__all__ = ["SpanDropEvent"]
