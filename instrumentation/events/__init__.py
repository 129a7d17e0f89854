"""Events: pydantic models of moments in the application."""

from instrumentation.events.base import BaseEvent
from instrumentation.events.span import SpanDropEvent

__all__ = ["BaseEvent", "SpanDropEvent"]
