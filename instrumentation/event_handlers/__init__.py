"""Event handlers: subclass :class:`BaseEventHandler` and implement ``handle``;
:class:`NullEventHandler` takes events and does nothing with them."""

from instrumentation.event_handlers.base import BaseEventHandler
from instrumentation.event_handlers.null import NullEventHandler

__all__ = ["BaseEventHandler", "NullEventHandler"]
