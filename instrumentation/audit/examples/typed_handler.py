"""The how-to's handler annotated with its context types; ``mypy --strict`` accepts it.

``EventHandler[TextIOWrapper, datetime]``: ``request_start`` returns the open file
that every later call gets back, ``event_start`` the time that ``event_end`` gets.
(The elapsed time is computed correctly here, unlike in the how-to, and from the
events' own timestamps, taken where the event happened: a handler runs later, on
another thread, so its own clock would time the handler, not the event.) The same
class written with plain ``def`` methods type-checks too: see :class:`SyncTypedHandler`.
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime
from io import TextIOWrapper
from pathlib import Path

from instrumentation.audit import Event, EventHandler, RequestEnd, RequestStart


class TypedFileEventHandler(EventHandler[TextIOWrapper, datetime]):
    """One file per request; async methods, as in db-ally."""

    def __init__(self, directory: str | os.PathLike[str] = "logs") -> None:
        self.log_dir = Path(directory)
        self.log_dir.mkdir(parents=True, exist_ok=True)

    async def request_start(self, user_request: RequestStart) -> TextIOWrapper:
        log_file = open(self.log_dir / f"{uuid.uuid4().hex}.log", "w", encoding="utf-8")  # noqa: SIM115
        log_file.write(f"Collection: {user_request.collection}\n")
        log_file.write(f"Question: {user_request.question}\n")
        return log_file

    async def event_start(self, event: Event, request_context: TextIOWrapper) -> datetime:
        request_context.write(f"{event}\n")
        return event.timestamp

    async def event_end(
        self, event: Event | None, request_context: TextIOWrapper, event_context: datetime
    ) -> None:
        if event is not None:
            elapsed = event.timestamp - event_context
            request_context.write(f"Elapsed Time: {elapsed.total_seconds() * 1000:.3f} ms\n")
        request_context.write(f"{event}\n")

    async def request_end(self, output: RequestEnd, request_context: TextIOWrapper) -> None:
        request_context.write(f"Output: {output.result}\n")
        request_context.close()


class SyncTypedHandler(EventHandler[list[str], float]):
    """Plain ``def`` methods with their context types."""

    def __init__(self) -> None:
        self.finished: list[list[str]] = []

    def request_start(self, user_request: RequestStart) -> list[str]:
        return [user_request.question]

    def event_start(self, event: Event, request_context: list[str]) -> float:
        return event.timestamp.timestamp()

    def event_end(
        self, event: Event | None, request_context: list[str], event_context: float
    ) -> None:
        if event is not None:
            took_ms = (event.timestamp.timestamp() - event_context) * 1000
            request_context.append(f"{type(event).__name__} took {took_ms:.1f} ms")

    def request_end(self, output: RequestEnd, request_context: list[str]) -> None:
        self.finished.append(request_context)


__all__ = ["SyncTypedHandler", "TypedFileEventHandler"]
