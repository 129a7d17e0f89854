"""The event: one moment in the application, as a pydantic model."""

from __future__ import annotations

import builtins
from datetime import datetime, timezone
from functools import partial
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from instrumentation._ids import new_event_id
from instrumentation.context import current_span_id, current_trace_id

_utcnow = partial(datetime.now, timezone.utc)


class BaseEvent(BaseModel):
    """Subclass it and add fields for your own events.

    ``span_id`` and ``trace_id`` default to the span active where the event is
    *created*; ``tags`` gain the active :func:`instrument_tags` when it is dispatched
    (the event's own tags win on a clash). ``timestamp`` is always timezone-aware UTC:
    a naive datetime given by hand is taken as local time and converted.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    timestamp: datetime = Field(default_factory=_utcnow)
    id_: str = Field(default_factory=new_event_id)
    span_id: str | None = Field(default_factory=current_span_id)
    trace_id: str | None = Field(default_factory=current_trace_id)
    # builtins.dict: the class defines a dict() method, which would shadow it here.
    tags: builtins.dict[str, Any] = Field(default_factory=builtins.dict)

    @field_validator("timestamp")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        return value.astimezone(timezone.utc)

    @classmethod
    def class_name(cls) -> str:
        """The event's type name, as stored and shown (the class name by default)."""
        return cls.__name__

    def model_dump(self, **kwargs: Any) -> builtins.dict[str, Any]:
        """The fields, plus ``class_name`` (unless ``include`` leaves it out or
        ``exclude`` names it), so that a stored event says what it was."""
        data = super().model_dump(**kwargs)
        include, exclude = kwargs.get("include"), kwargs.get("exclude")
        if (include is None or "class_name" in include) and not (
            exclude is not None and "class_name" in exclude
        ):
            data["class_name"] = self.class_name()
        return data

    def dict(self, **kwargs: Any) -> builtins.dict[str, Any]:
        """Pydantic 1 spelling, kept for handlers written against LlamaIndex."""
        return self.model_dump(**kwargs)


__all__ = ["BaseEvent"]
