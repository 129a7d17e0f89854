"""Events the dispatcher emits about spans."""

from __future__ import annotations

from instrumentation.events.base import BaseEvent


class SpanDropEvent(BaseEvent):
    """A span ended with an exception; ``span_id`` is the span that was dropped.

    ``err_str`` is ``str()`` of the exception, as in LlamaIndex, cut to 8,192 characters
    (see :data:`instrumentation._text.MAX_TEXT_CHARS`); ``err_type`` its class
    name (``"GeneratorExit"`` tells a generator its caller stopped reading, which the
    store and the OpenTelemetry export keep as ok, from a failure with an empty
    message)."""

    err_str: str
    err_type: str | None = None


__all__ = ["SpanDropEvent"]
