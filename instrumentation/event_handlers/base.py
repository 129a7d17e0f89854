"""The event handler: what receives events."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from pydantic import ConfigDict

from instrumentation._options import SpellCheckedOptions
from instrumentation.events.base import BaseEvent


class BaseEventHandler(SpellCheckedOptions):
    """Subclass it and implement :meth:`handle`.

    ``handle`` runs on the application's thread, inside its call: it should be quick,
    and it must not block for long. If it raises, the error is logged and counted
    (see :mod:`instrumentation.telemetry`) and the application goes on.
    """

    # A misspelt option (max_completed_span=5) is an error, not silently ignored (and
    # the error names the option meant: see SpellCheckedOptions).
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    @classmethod
    def class_name(cls) -> str:
        return cls.__name__

    @abstractmethod
    def handle(self, event: BaseEvent, **kwargs: Any) -> Any:
        """Take one event."""

    async def ahandle(self, event: BaseEvent, **kwargs: Any) -> Any:
        """Take one event from :meth:`Dispatcher.aevent`; calls :meth:`handle` by default."""
        return self.handle(event, **kwargs)

    def close(self) -> None:
        """Release resources; called by :meth:`Dispatcher.shutdown`. A no-op by default."""


__all__ = ["BaseEventHandler"]
