"""Request-lifecycle audit handlers, in the style of db-ally's ``dbally.audit``.

One record per user request, with the LLM calls inside it::

    from instrumentation import audit

    handlers = [audit.FileEventHandler("logs")]
    with audit.request(question="...", collection="recipes", handlers=handlers) as req:
        req.result = answer()

or, for spans marked ``@dispatcher.span(request=True)``, ``audit.attach(dispatcher,
handlers)``. Handlers subclass :class:`EventHandler` (``async def`` or plain ``def``).
"""

from __future__ import annotations

from instrumentation.audit._loop import set_worker_threads
from instrumentation.audit.adapter import AuditAdapter, attach
from instrumentation.audit.base import AnyEventHandler, EventCtx, EventHandler, RequestCtx
from instrumentation.audit.events import (
    ChatFormat,
    Event,
    LLMEvent,
    RequestEnd,
    RequestStart,
    RetrievalEvent,
    ToolCallEvent,
)
from instrumentation.audit.handlers import CLIEventHandler, FileEventHandler, LoggingEventHandler
from instrumentation.audit.request import DEFAULT_TIMEOUT, AuditEvent, AuditRequest, event, request
from instrumentation.audit.runner import HandlerError

__all__ = [
    "DEFAULT_TIMEOUT",
    "AnyEventHandler",
    "AuditAdapter",
    "AuditEvent",
    "AuditRequest",
    "CLIEventHandler",
    "ChatFormat",
    "Event",
    "EventCtx",
    "EventHandler",
    "FileEventHandler",
    "HandlerError",
    "LLMEvent",
    "LoggingEventHandler",
    "RequestCtx",
    "RequestEnd",
    "RequestStart",
    "RetrievalEvent",
    "ToolCallEvent",
    "attach",
    "event",
    "request",
    "set_worker_threads",
]
