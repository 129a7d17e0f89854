"""Short, readable text for events, shared by the built-in handlers."""

from __future__ import annotations

import dataclasses
import math
from datetime import datetime
from typing import Any

from instrumentation.audit.events import Event, LLMEvent, RetrievalEvent, ToolCallEvent

MAX_TEXT = 2_000


def clip(value: Any, limit: int = MAX_TEXT) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    try:
        return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt)
    except (AttributeError, TypeError):
        return repr(prompt)


def started_at(event: Event | None) -> datetime | None:
    """When ``event`` began, as the application stamped it: what ``event_start`` keeps."""
    stamp = getattr(event, "timestamp", None)
    return stamp if isinstance(stamp, datetime) else None


def duration_ms(event: Event | None, started: datetime | None) -> float | None:
    """How long ``event`` took, measured on the application's side, in milliseconds.

    Its own ``latency_ms`` when it has one (an LLM call, timed by the LLM layer), else
    its end's ``timestamp`` minus its start's (``started``); ``None`` when neither is
    known. Never a handler's own clock: handlers run later, maybe behind slow calls.
    """
    latency = getattr(event, "latency_ms", None)
    if (
        isinstance(latency, (int, float))
        and not isinstance(latency, bool)
        and math.isfinite(latency)
        and latency >= 0
    ):
        return float(latency)
    ended = started_at(event)
    if ended is None or started is None:
        return None
    try:
        return max((ended - started).total_seconds() * 1000, 0.0)
    except TypeError:  # one naive, one aware: not comparable
        return None


def title(event: Event | None) -> str:
    if isinstance(event, LLMEvent):
        model = f" {event.model}" if event.model else ""
        return f"LLM {event.type}{model}"
    if isinstance(event, RetrievalEvent):
        return "retrieval"
    if isinstance(event, ToolCallEvent):
        return f"tool {event.name}"
    return type(event).__name__


def fields(event: Event | None) -> dict[str, Any]:
    """The event as a JSON-friendly dict (``kind`` added), for structured records."""
    if event is None or not dataclasses.is_dataclass(event):
        return {"kind": type(event).__name__}
    out: dict[str, Any] = {"kind": type(event).__name__}
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        if isinstance(value, datetime):
            out[f.name] = value.isoformat()
        else:
            out[f.name] = (
                value if isinstance(value, (str, int, float, bool, type(None))) else clip(value)
            )
    return out


def end_lines(event: Event | None) -> list[str]:
    """What happened, one line per item, for the text handlers."""
    lines: list[str] = []
    if isinstance(event, LLMEvent):
        lines.append(f"prompt: {clip(prompt_text(event.prompt))}")
        if event.response is not None:
            lines.append(f"response: {clip(event.response)}")
        if event.finish_reason == "abandoned":
            lines.append("ended early: the caller stopped reading the stream")
        if event.total_tokens is not None:
            lines.append(
                f"tokens: {event.prompt_tokens} prompt + {event.completion_tokens} completion"
                f" = {event.total_tokens}" + (" (estimated)" if event.tokens_estimated else "")
            )
    elif isinstance(event, RetrievalEvent):
        lines.append(f"query: {clip(event.query)}")
        if event.documents is not None:
            lines.append(f"documents: {len(event.documents)}")
    elif isinstance(event, ToolCallEvent):
        lines.append(f"arguments: {clip(event.arguments)}")
        lines.append(f"output: {clip(event.output)}")
    elif event is not None:
        lines.append(clip(event))
    error = getattr(event, "error", None)
    if error:
        lines.append(f"error: {clip(error)}")
    return [line.replace("\n", "\n    ") for line in lines]


__all__ = ["clip", "duration_ms", "end_lines", "fields", "prompt_text", "started_at", "title"]
