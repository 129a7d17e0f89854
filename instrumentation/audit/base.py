"""The audit handler interface, as db-ally has it: four calls per request.

``request_start`` returns the handler's request context, ``event_start`` its event
context; the runner hands each back, unchanged, to the same handler's later calls
of that request and that event. Methods may be ``async def`` (as in db-ally) or
plain ``def``: the return types below accept either, so a subclass annotated with
its own context types passes ``mypy --strict`` both ways.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable
from typing import Any, Generic, TypeVar

from instrumentation.audit.events import Event, RequestEnd, RequestStart

RequestCtx = TypeVar("RequestCtx")
EventCtx = TypeVar("EventCtx")


class EventHandler(Generic[RequestCtx, EventCtx], ABC):
    """Subclass it, implement the four methods, pass instances to ``audit.request()``.

    Calls run off the application's thread (on the audit loop; plain ``def`` methods
    on its worker threads), one at a time per handler and request, in order. An
    exception in any of them is logged and counted, and the handler's later calls
    still run: after a failed ``request_start`` they get ``None`` as
    ``request_context``, after a failed ``event_start`` that event's ``event_end``
    gets ``None`` as ``event_context``; a failed ``event_end`` or ``request_end``
    changes nothing for the other calls.
    """

    @abstractmethod
    def request_start(self, user_request: RequestStart) -> RequestCtx | Awaitable[RequestCtx]:
        """A request begins; return what :meth:`event_start` and :meth:`request_end` need."""

    @abstractmethod
    def event_start(
        self, event: Event, request_context: RequestCtx
    ) -> EventCtx | Awaitable[EventCtx]:
        """An event begins inside the request; return what :meth:`event_end` needs."""

    @abstractmethod
    def event_end(
        self, event: Event | None, request_context: RequestCtx, event_context: EventCtx
    ) -> Awaitable[None] | None:
        """The event ended; ``event_context`` is exactly what :meth:`event_start` returned."""

    @abstractmethod
    def request_end(
        self, output: RequestEnd, request_context: RequestCtx
    ) -> Awaitable[None] | None:
        """The request ended (``output.error`` is set when it raised)."""


#: Any handler, whatever its context types: annotate a list of different handlers
#: with it (``handlers: list[AnyEventHandler] = [...]``), or mypy joins them to
#: ``list[object]``, which ``audit.request()`` refuses.
AnyEventHandler = EventHandler[Any, Any]

__all__ = ["AnyEventHandler", "EventCtx", "EventHandler", "RequestCtx"]
