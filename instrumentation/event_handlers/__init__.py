"""Event handlers."""

from instrumentation.event_handlers.base import BaseEventHandler
from instrumentation.event_handlers.null import NullEventHandler

__all__ = ["BaseEventHandler", "NullEventHandler"]
