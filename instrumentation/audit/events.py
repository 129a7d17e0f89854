"""What audit handlers receive: a request's start and end, and the events inside it.

These are plain dataclasses, as in db-ally, so a handler written for db-ally reads
the same attributes (``question``, ``collection``, ``result``, ``prompt``, ``response``,
``*_tokens``). Each object is handed to every handler and never changed afterwards:
an event's end is a new object (``dataclasses.replace``), so a handler that keeps the
start event still sees the start.

Times are taken on the application's side, where things happen, never on the thread
a handler runs on (handlers run later, and maybe behind a slow call): every event has
a ``timestamp`` (its start event when it began, its end event when it ended),
:class:`RequestStart` has ``started_at``, and :class:`RequestEnd` has ``ended_at`` and
``duration_s``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Union


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _new_id() -> str:
    return uuid.uuid4().hex


@dataclass
class RequestStart:
    """One user request begins: what was asked, of which collection, and free metadata."""

    question: str
    collection: str
    metadata: dict[str, Any] = field(default_factory=dict)
    request_id: str = field(default_factory=_new_id)
    started_at: datetime = field(default_factory=_now)

    @property
    def collection_name(self) -> str:
        """``collection`` under db-ally's name: its ``RequestStart`` has ``collection_name``,
        which its own handlers (CLI, LangSmith, OpenTelemetry) read; its how-to says
        ``collection``. Read-only, and not a field (``asdict()`` and ``==`` leave it out)."""
        return self.collection


@dataclass
class RequestEnd:
    """The request ended: its ``result``, or the ``error`` it raised (then ``result`` is None).

    ``abandoned`` is True for a streamed request (a generator) whose caller stopped
    reading it before its end (``close()``, a ``break`` out of the loop): an early
    stop, not a failure, so ``error`` is None; ``result`` is None too.
    """

    result: Any = None
    error: BaseException | None = None
    request_id: str = ""
    #: How long the request ran, measured on the application's side.
    duration_s: float = 0.0
    #: When the request ended (UTC), on the application's side: not when a handler ran.
    ended_at: datetime = field(default_factory=_now)
    #: The caller stopped reading a streamed request early (an early stop, no error).
    abandoned: bool = False
    #: Events of the request this handler was not handed, neither start nor end: it was
    #: ``runner.MAX_QUEUED_CALLS`` calls behind, or the audit loop was blocked. Its
    #: record of the request lacks that many events (each handler gets its own count).
    events_dropped: int = 0


@dataclass
class Event:
    """Base of every event inside a request (subclass it for your own kinds).

    ``timestamp`` (UTC, keyword-only) is when the event happened, taken on the
    application's side: a start event's is when it began, an end event's when it
    ended, so ``end.timestamp - start.timestamp`` is how long it took, whenever the
    handlers run. It is left out of ``==`` and ``repr()``.
    """

    timestamp: datetime = field(default_factory=_now, kw_only=True, compare=False, repr=False)


ChatFormat = tuple[dict[str, Any], ...]
"""A chat prompt as db-ally spells it: ``({"role": ..., "content": ...}, ...)``."""


@dataclass
class LLMEvent(Event):
    """One LLM call: the prompt, the response and the token usage.

    ``type`` is ``"chat"`` or ``"completion"``. The start event has ``response`` and the
    token counts unset; the end event has them (``error`` instead when the call failed
    or never ended before the request did). ``span_id`` is the LLM call's span.
    ``latency_ms`` is the call's duration as the LLM layer measured it (end events);
    ``timestamp`` is the LLM layer's own event time. ``finish_reason`` is the
    provider's, or ``"abandoned"`` for a stream its caller stopped reading;
    ``tokens_estimated`` says the counts were estimated, the provider giving none.
    """

    prompt: str | ChatFormat
    type: str
    response: str | None = None
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    total_tokens: int | None = None
    model: str | None = None
    provider: str | None = None
    latency_ms: float | None = None
    cost_usd: float | None = None
    error: str | None = None
    span_id: str | None = None
    finish_reason: str | None = None
    tokens_estimated: bool = False


@dataclass
class RetrievalEvent(Event):
    """A lookup of documents for a query (vector search, SQL, full text...)."""

    query: str
    source: str | None = None
    documents: list[str] | None = None
    error: str | None = None


@dataclass
class ToolCallEvent(Event):
    """A tool the application (or the model) called, its arguments and its output."""

    name: str
    arguments: Any = None
    output: Any = None
    error: str | None = None


AnyEvent = Union[LLMEvent, RetrievalEvent, ToolCallEvent]

__all__ = [
    "ChatFormat",
    "Event",
    "LLMEvent",
    "RequestEnd",
    "RequestStart",
    "RetrievalEvent",
    "ToolCallEvent",
]
