"""Short, readable text for events, shared by the built-in handlers."""

from __future__ import annotations

import dataclasses
import itertools
import math
from datetime import datetime
from typing import Any

from instrumentation._text import escape_controls, printable_int, safe_repr, safe_str
from instrumentation.audit.events import Event, LLMEvent, RetrievalEvent, ToolCallEvent

MAX_TEXT = 2_000

#: How deep and how many items :func:`jsonable` keeps of nested lists and dicts.
MAX_DEPTH = 4
MAX_ITEMS = 100

#: What a request or an LLM call that its caller stopped reading says, in text.
ENDED_EARLY = "ended early: the caller stopped reading the stream"


def events_dropped_text(count: int) -> str:
    """What a record says of the request's events its handler was not handed."""
    return (
        f"{count} event(s) of this request not recorded: this handler fell behind "
        "(see audit.calls_dropped)"
    )


def clip(value: Any, limit: int = MAX_TEXT) -> str:
    text = value if isinstance(value, str) else safe_repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def block(text: str) -> str:
    """User text as one entry of a file read line by line: its later lines indented, so
    that no question or answer can start a line of its own and pass for one the handler
    wrote, and its control characters escaped, so that ``cat`` on a terminal shows them
    instead of obeying them."""
    if text.isascii() and text.isprintable():
        return text
    return "\n    ".join(escape_controls(line, multiline=True) for line in text.splitlines())


def one_line(text: str) -> str:
    """User text inside a one-line log message: line breaks and control characters
    escaped, so that one record is one line, whatever the question held."""
    return escape_controls(text)


def prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    try:
        return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt)
    except Exception:  # not a list of message dicts
        return safe_repr(prompt)


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
    """What an event is, on one line (a model or tool name can hold anything)."""
    if isinstance(event, LLMEvent):
        model = f" {one_line(str(event.model))}" if event.model else ""
        return f"LLM {one_line(str(event.type))}{model}"
    if isinstance(event, RetrievalEvent):
        return "retrieval"
    if isinstance(event, ToolCallEvent):
        return f"tool {one_line(safe_str(event.name))}"
    return type(event).__name__


def jsonable(value: Any, depth: int = MAX_DEPTH) -> Any:
    """``value`` as what ``json.dumps`` takes: lists and dicts kept as such (a chat
    prompt stays a list of ``{"role", "content"}`` dicts), datetimes as ISO text,
    anything else as its clipped ``repr()``. At most :data:`MAX_ITEMS` items per list
    or dict (then ``"..."``) and :data:`MAX_DEPTH` levels; text inside them is clipped
    (a chat message's content) as a ``repr()`` is, text given alone is not."""
    if isinstance(value, str):
        return value if depth == MAX_DEPTH else clip(value)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return printable_int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)  # JSON has no nan/inf (float repr)
    if isinstance(value, datetime):
        return value.isoformat()
    if depth > 0 and isinstance(value, (list, tuple)):
        items = [jsonable(item, depth - 1) for item in value[:MAX_ITEMS]]
        return [*items, "..."] if len(value) > MAX_ITEMS else items
    if depth > 0 and isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in itertools.islice(value.items(), MAX_ITEMS):
            key = k if isinstance(k, str) else clip(k, 200)
            if key in out:  # 1 and "1": both kept, the one that is not a str as its repr
                key = safe_repr(k)
            out[key] = jsonable(v, depth - 1)
        if len(value) > MAX_ITEMS:
            out["..."] = f"{len(value) - MAX_ITEMS} more"
        return out
    return clip(value)


def fields(event: Event | None) -> dict[str, Any]:
    """The event as a JSON-friendly dict (``kind`` added), for structured records."""
    if event is None or not dataclasses.is_dataclass(event):
        return {"kind": type(event).__name__}
    out: dict[str, Any] = {"kind": type(event).__name__}
    for f in dataclasses.fields(event):
        out[f.name] = jsonable(getattr(event, f.name))
    return out


def cost_text(cost: Any) -> str | None:
    """``$0.000123`` for a known cost in US dollars, else None."""
    if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not math.isfinite(cost):
        return None
    return f"${cost:.6f}" if cost < 0.01 else f"${cost:.4f}"


def end_lines(event: Event | None) -> list[str]:
    """What happened, one line per item, for the text handlers."""
    lines: list[str] = []
    if isinstance(event, LLMEvent):
        lines.append(f"prompt: {clip(prompt_text(event.prompt))}")
        if event.response is not None:
            lines.append(f"response: {clip(event.response)}")
        if event.finish_reason == "abandoned":
            lines.append(ENDED_EARLY)
        if event.total_tokens is not None:
            lines.append(
                f"tokens: {event.prompt_tokens} prompt + {event.completion_tokens} completion"
                f" = {event.total_tokens}" + (" (estimated)" if event.tokens_estimated else "")
            )
        cost = cost_text(event.cost_usd)
        if cost is not None:
            lines.append(f"cost: {cost}" + (" (estimated)" if event.tokens_estimated else ""))
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
    return [block(line) for line in lines]


__all__ = [
    "ENDED_EARLY",
    "block",
    "clip",
    "cost_text",
    "duration_ms",
    "end_lines",
    "events_dropped_text",
    "fields",
    "jsonable",
    "one_line",
    "prompt_text",
    "started_at",
    "title",
]
