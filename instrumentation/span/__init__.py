"""Spans: pydantic models of stretches of execution."""

from instrumentation.context import active_span_id
from instrumentation.span.base import BaseSpan
from instrumentation.span.simple import SimpleSpan

__all__ = ["BaseSpan", "SimpleSpan", "active_span_id"]
