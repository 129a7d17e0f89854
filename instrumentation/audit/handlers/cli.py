"""``CLIEventHandler``: each request as one readable block in the terminal.

A request's lines are gathered in its context and written in one piece when it ends,
under a lock shared by every instance, so concurrent requests never interleave.
Colour (ANSI) is on when the stream is a terminal and ``NO_COLOR`` is not set (to
anything but an empty string: https://no-color.org), unless ``color=`` says otherwise.
Times shown are measured on the application's side (an LLM call's ``latency_ms``, the
events' timestamps, the request's ``duration_s``), never when this handler runs.
"""

from __future__ import annotations

import os
import sys
import threading
from datetime import datetime
from typing import TextIO

from instrumentation._text import escape_controls, safe_str
from instrumentation.audit.base import EventHandler
from instrumentation.audit.events import Event, RequestEnd, RequestStart
from instrumentation.audit.handlers._format import (
    ENDED_EARLY,
    block,
    clip,
    duration_ms,
    end_lines,
    events_dropped_text,
    one_line,
    started_at,
    title,
)

_write_lock = threading.Lock()

_BOLD, _DIM, _RED, _GREEN, _CYAN, _RESET = (
    "\033[1m",
    "\033[2m",
    "\033[31m",
    "\033[32m",
    "\033[36m",
    "\033[0m",
)


def _shown(text: str) -> str:
    """User text (a question, a model's answer) shown, not obeyed by the terminal."""
    return escape_controls(text, multiline=True)


class CLIEventHandler(EventHandler[list[str], datetime | None]):
    """Prints requests to ``stream`` (``sys.stderr`` at the time of writing by default)."""

    def __init__(self, stream: TextIO | None = None, color: bool | None = None) -> None:
        if stream is not None and not hasattr(stream, "write"):
            raise TypeError(
                f"stream must have write(), like sys.stdout; got {type(stream).__name__}"
            )
        if color is not None and not isinstance(color, bool):
            raise TypeError(f"color is True, False or None (auto); got {color!r}")
        self.stream = stream
        self.color = color

    def _out(self) -> TextIO | None:
        return self.stream if self.stream is not None else sys.stderr

    def _colored(self) -> bool:
        """``color`` if given (the handler's own setting wins, as no-color.org asks);
        else a terminal is coloured unless ``NO_COLOR`` is set and not empty."""
        if self.color is not None:
            return self.color
        if os.environ.get("NO_COLOR"):
            return False
        isatty = getattr(self._out(), "isatty", None)
        return bool(isatty()) if callable(isatty) else False

    def _paint(self, code: str, text: str) -> str:
        text = _shown(text)
        return f"{code}{text}{_RESET}" if self._colored() else text

    def request_start(self, user_request: RequestStart) -> list[str]:
        head = self._paint(_BOLD, f"Request {user_request.request_id[:8]}")
        collection = f" [{one_line(user_request.collection)}]" if user_request.collection else ""
        return [f"{head}{collection} {block(clip(user_request.question, 500))}"]

    def event_start(self, event: Event, request_context: list[str]) -> datetime | None:
        return started_at(event)

    def event_end(
        self, event: Event | None, request_context: list[str], event_context: datetime | None
    ) -> None:
        if request_context is None:
            return
        elapsed = duration_ms(event, event_context)
        took = "" if elapsed is None else f" ({elapsed:.1f} ms)"
        failed = getattr(event, "error", None)
        request_context.append(
            "  "
            + self._paint(_RED if failed else _CYAN, one_line(title(event)))
            + self._paint(_DIM, took)
        )
        request_context.extend(f"    {line}" for line in end_lines(event))  # escaped there

    def request_end(self, output: RequestEnd, request_context: list[str]) -> None:
        lines = list(request_context or [f"Request {output.request_id[:8]}"])
        if output.error is not None:
            lines.append(
                "  "
                + self._paint(
                    _RED,
                    f"error: {type(output.error).__name__}: "
                    + block(clip(safe_str(output.error), 500)),
                )
            )
        elif output.abandoned:
            lines.append("  " + self._paint(_DIM, ENDED_EARLY))
        else:
            lines.append("  " + self._paint(_GREEN, f"result: {block(clip(output.result, 500))}"))
        if output.events_dropped:
            lines.append("  " + self._paint(_RED, events_dropped_text(output.events_dropped)))
        lines.append(self._paint(_DIM, f"  took {output.duration_s * 1000:.1f} ms"))
        text = "\n".join(lines) + "\n"
        with _write_lock:
            out = self._out()
            if out is None:  # no stderr (pythonw): nowhere to show it, as print() does
                return
            out.write(text)
            out.flush()


__all__ = ["CLIEventHandler"]
