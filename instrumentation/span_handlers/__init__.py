"""Span handlers: subclass :class:`BaseSpanHandler` for your own; :class:`SimpleSpanHandler`
keeps the last spans in memory and prints them as trees; :class:`NullSpanHandler`
keeps nothing. ``completed_spans`` and ``dropped_spans`` are each a :class:`SpanDeque`,
a bounded deque that reads like the list LlamaIndex keeps."""

from instrumentation.span_handlers._buffered import SpanDeque
from instrumentation.span_handlers.base import BaseSpanHandler
from instrumentation.span_handlers.null import NullSpanHandler
from instrumentation.span_handlers.simple import SimpleSpanHandler

__all__ = ["BaseSpanHandler", "NullSpanHandler", "SimpleSpanHandler", "SpanDeque"]
