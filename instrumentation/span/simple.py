from __future__ import annotations

from datetime import datetime, timezone
from functools import partial
from typing import Any

from pydantic import Field, field_validator

from instrumentation.span.base import BaseSpan

_utcnow = partial(datetime.now, timezone.utc)


class SimpleSpan(BaseSpan):
    """A span with its timings; ``metadata["error"]`` holds the error of a dropped span."""

    start_time: datetime = Field(default_factory=_utcnow)
    end_time: datetime | None = Field(default=None)
    duration: float = Field(default=0.0, description="Duration of the span in seconds.")
    metadata: dict[str, Any] | None = Field(default=None)
    dispatcher: str | None = Field(default=None, description="Name of the dispatcher.")

    @field_validator("start_time", "end_time")
    @classmethod
    def _to_utc(cls, value: datetime | None) -> datetime | None:
        return None if value is None else value.astimezone(timezone.utc)

    def __setattr__(self, name: str, value: Any) -> None:
        # LlamaIndex's spans are in naive local time, and span handlers written for it
        # stamp ``span.end_time = datetime.now()`` and subtract ``start_time``: with
        # one naive time and one aware, every span of such a handler failed. A time
        # set by hand is made UTC here as one given to the constructor is (a naive
        # one taken as local time), without validating every other assignment.
        if isinstance(value, datetime) and (name == "end_time" or name == "start_time"):
            value = value.astimezone(timezone.utc)
        super().__setattr__(name, value)


__all__ = ["SimpleSpan"]
