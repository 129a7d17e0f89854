"""Turn our values into OpenTelemetry attribute values.

OpenTelemetry accepts ``str``, ``bool``, ``int``, ``float`` and homogeneous sequences
of them. Everything else an event may carry (pydantic models, dicts, mixed lists)
becomes compact JSON, cut at :data:`MAX_VALUE_CHARS` so one large field cannot blow
an exporter's request size.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import BaseModel

#: Longest string value we put in an attribute (longer ones end with "...").
MAX_VALUE_CHARS = 8192

#: Fields every event has, reported through the span event itself rather than as attributes.
BASE_EVENT_FIELDS = frozenset({"timestamp", "id_", "span_id", "trace_id", "tags"})

_PRIMITIVES = (str, bool, int, float)

#: OTLP carries integers as int64; the exporter drops a larger one (and only logs it).
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

AttributeValue = str | bool | int | float | tuple[str, ...] | tuple[int, ...] | tuple[float, ...]


def clip(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def to_json(value: Any) -> str:
    """Compact JSON for any value (models dumped in JSON mode, the rest via ``str``)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_none=True)
    elif isinstance(value, (list, tuple)):
        value = [
            v.model_dump(mode="json", exclude_none=True) if isinstance(v, BaseModel) else v
            for v in value
        ]
    try:
        text = json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError):
        text = str(value)
    return clip(text)


def to_attribute(value: Any) -> AttributeValue | None:
    """``value`` as an attribute value, or ``None`` to leave it out."""
    if value is None:
        return None
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, str):
        return clip(value)
    if isinstance(value, _PRIMITIVES):
        if type(value) is int and not _INT64_MIN <= value <= _INT64_MAX:
            return str(value)  # exact, where an int64 could not hold it
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (list, tuple)) and value:
        kind = type(value[0])
        if kind in _PRIMITIVES and all(type(v) is kind for v in value):
            if kind is str:
                return tuple(clip(v) for v in value)
            if kind is int and not all(_INT64_MIN <= v <= _INT64_MAX for v in value):
                return tuple(str(v) for v in value)
            return tuple(value)
    return to_json(value)


def tag_attributes(tags: Mapping[str, Any] | None, out: dict[str, Any]) -> None:
    """Add ``instrumentation.tag.<key>`` for each tag."""
    if not tags:
        return
    for key, value in tags.items():
        converted = to_attribute(value)
        if converted is not None:
            out[f"instrumentation.tag.{key}"] = converted


def event_attributes(event: Any) -> dict[str, Any]:
    """The attributes of the span event that stands for one of our events."""
    out: dict[str, Any] = {"instrumentation.event_id": event.id_}
    for name in type(event).model_fields:
        if name in BASE_EVENT_FIELDS:
            continue
        converted = to_attribute(getattr(event, name, None))
        if converted is not None:
            out[name] = converted
    tag_attributes(event.tags, out)
    return out


__all__ = [
    "BASE_EVENT_FIELDS",
    "MAX_VALUE_CHARS",
    "AttributeValue",
    "clip",
    "event_attributes",
    "tag_attributes",
    "to_attribute",
    "to_json",
]
