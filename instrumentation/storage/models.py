"""What reading a store gives back: trace summaries, spans with their events, events.

Plain dataclasses, not pydantic models: read-back builds thousands of them at a time
and they are never validated (the database is the source of truth). Times are
timezone-aware UTC datetimes; durations are seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

#: The application metadata every span and event row carries, as (key, column).
#: ``key`` is what users write (``StorageHandler(metadata={"user": ...})``, a tag
#: named ``user``); ``column`` is where it is stored.
METADATA_KEYS: dict[str, str] = {
    "application": "application",
    "environment": "environment",
    "user": "user_id",
    "session": "session_id",
    "run_id": "run_id",
    "step_id": "step_id",
}


#: Column names accepted as keys too (``metadata={"user_id": ...}`` is ``"user"``).
METADATA_ALIASES: dict[str, str] = {
    column: key for key, column in METADATA_KEYS.items() if column != key
}


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def to_datetime(epoch: float | None) -> datetime | None:
    """Seconds since the epoch -> aware UTC datetime (``None`` stays ``None``).

    Added to the epoch rather than ``datetime.fromtimestamp``, which on Windows fails
    before 1970 and after 3000 (an event's timestamp may be any year): the same
    microsecond for every time that both take."""
    if epoch is None:
        return None
    return _EPOCH + timedelta(seconds=float(epoch))


@dataclass
class StoredEvent:
    """One event as stored: the columns, and the event's other fields in ``payload``
    (a streamed chunk's without what its call's start and end events hold: the
    messages or prompt, and the answer so far; its ``delta`` is there)."""

    id_: str
    type: str
    time: datetime
    span_id: str | None
    trace_id: str | None
    payload: dict[str, Any]
    model: str | None = None
    provider: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cost_usd: float | None = None
    latency_ms: float | None = None
    error: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class StoredSpan:
    """One finished span, with its ``events`` and ``children`` filled in by ``store.trace()``."""

    id_: str
    trace_id: str
    parent_id: str | None
    name: str | None
    dispatcher: str | None
    start: datetime
    end: datetime | None
    duration: float
    status: str
    error: str | None = None
    tags: dict[str, Any] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    events: list[StoredEvent] = field(default_factory=list, repr=False)
    children: list[StoredSpan] = field(default_factory=list, repr=False)

    @property
    def total_tokens(self) -> int:
        """Tokens reported by this span's own events (not its children's)."""
        return sum(e.total_tokens or 0 for e in self.events)

    @property
    def cost_usd(self) -> float | None:
        costs = [e.cost_usd for e in self.events if e.cost_usd is not None]
        return sum(costs) if costs else None

    def walk(self) -> Iterator[tuple[int, StoredSpan]]:
        """This span and everything below it, depth first, as ``(depth, span)``."""
        stack: list[tuple[int, StoredSpan]] = [(0, self)]
        while stack:
            depth, span = stack.pop()
            yield depth, span
            stack.extend((depth + 1, c) for c in reversed(span.children))


@dataclass
class TraceSummary:
    """One trace as ``store.traces()`` lists it: its root span and totals over the trace."""

    trace_id: str
    root_span_id: str
    name: str | None
    dispatcher: str | None
    start: datetime
    end: datetime | None
    duration: float
    status: str
    error: str | None
    span_count: int
    error_count: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float | None
    metadata: dict[str, str] = field(default_factory=dict)


def roots_of(spans: list[StoredSpan]) -> list[StoredSpan]:
    """The spans of ``spans`` whose parent is not among them (the tops of the tree)."""
    ids = {s.id_ for s in spans}
    return [s for s in spans if s.parent_id is None or s.parent_id not in ids]


__all__ = ["StoredEvent", "StoredSpan", "TraceSummary", "roots_of"]
