"""``LoggingEventHandler``: one structured ``logging`` record per request start, event and end.

Each record carries its data in ``record.audit`` (a dict: ``phase``, ``request_id``,
and the event's fields), for JSON formatters and log shippers; the message is a short
human line. Logging is thread-safe, so the methods are plain ``def``. Durations are
measured on the application's side (an LLM call's ``latency_ms``, the events'
timestamps, the request's ``duration_s``), never when this handler runs.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from instrumentation._text import describe_error
from instrumentation.audit.base import EventHandler
from instrumentation.audit.events import Event, RequestEnd, RequestStart
from instrumentation.audit.handlers._format import (
    ENDED_EARLY,
    clip,
    duration_ms,
    events_dropped_text,
    fields,
    jsonable,
    one_line,
    started_at,
    title,
)

DEFAULT_LOGGER = "instrumentation.audit.events"


class LoggingEventHandler(EventHandler[str, datetime | None]):
    """Logs to ``logger`` (a name or a Logger) at ``level``; errors at ``logging.ERROR``."""

    def __init__(
        self, logger: str | logging.Logger = DEFAULT_LOGGER, level: int = logging.INFO
    ) -> None:
        if isinstance(logger, str):
            logger = logging.getLogger(logger)
        if not isinstance(logger, logging.Logger):
            raise TypeError(
                f"logger is a logger name or a logging.Logger; got {type(logger).__name__}"
            )
        if isinstance(level, bool) or not isinstance(level, int):
            raise TypeError(f"level is a logging level such as logging.INFO; got {level!r}")
        self.logger = logger
        self.level = level

    def _log(self, level: int, message: str, data: dict[str, Any]) -> None:
        self.logger.log(level, message, extra={"audit": data})

    def request_start(self, user_request: RequestStart) -> str:
        rid = user_request.request_id
        self._log(
            self.level,
            f"audit request {one_line(rid[:8])} started"
            + (f" [{one_line(user_request.collection)}]" if user_request.collection else "")
            + f": {one_line(clip(user_request.question, 200))}",
            {
                "phase": "request_start",
                "request_id": rid,
                "question": user_request.question,
                "collection": user_request.collection,
                "metadata": jsonable(user_request.metadata),
            },
        )
        return rid

    def event_start(self, event: Event, request_context: str) -> datetime | None:
        return started_at(event)

    def event_end(
        self, event: Event | None, request_context: str, event_context: datetime | None
    ) -> None:
        duration = duration_ms(event, event_context)
        data = {
            "phase": "event",
            "request_id": request_context,
            "duration_ms": duration,
            **fields(event),
        }
        error = getattr(event, "error", None)
        self._log(
            logging.ERROR if error else self.level,
            f"audit request {one_line(str(request_context)[:8])}: {title(event)}"
            + (f" failed: {one_line(clip(error, 200))}" if error else "")
            + ("" if duration is None else f" ({duration:.1f} ms)"),
            data,
        )

    def request_end(self, output: RequestEnd, request_context: str) -> None:
        error = None if output.error is None else describe_error(output.error)
        if error:
            how = f"failed: {one_line(clip(error, 200))}"
        elif output.abandoned:
            how = ENDED_EARLY
        else:
            how = f"ended: {one_line(clip(output.result, 200))}"
        self._log(
            logging.ERROR if error else self.level,
            f"audit request {one_line(output.request_id[:8])} {how}"
            + (f"; {events_dropped_text(output.events_dropped)}" if output.events_dropped else ""),
            {
                "phase": "request_end",
                "request_id": output.request_id,
                # As the events' fields are: JSON's own None, numbers, lists, dicts.
                "result": clip(output.result)
                if isinstance(output.result, str)
                else jsonable(output.result),
                "error": error,
                "abandoned": output.abandoned,
                "events_dropped": output.events_dropped,
                "duration_ms": output.duration_s * 1000,
            },
        )


__all__ = ["DEFAULT_LOGGER", "LoggingEventHandler"]
