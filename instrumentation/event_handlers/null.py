from __future__ import annotations

from typing import Any

from instrumentation.event_handlers.base import BaseEventHandler
from instrumentation.events.base import BaseEvent


class NullEventHandler(BaseEventHandler):
    """Takes events and does nothing with them."""

    def handle(self, event: BaseEvent, **kwargs: Any) -> Any:
        return None


__all__ = ["NullEventHandler"]
