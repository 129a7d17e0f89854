"""Span handlers."""

from instrumentation.span_handlers._buffered import SpanDeque
from instrumentation.span_handlers.base import BaseSpanHandler
from instrumentation.span_handlers.null import NullSpanHandler
from instrumentation.span_handlers.simple import SimpleSpanHandler

__all__ = ["BaseSpanHandler", "NullSpanHandler", "SimpleSpanHandler", "SpanDeque"]
