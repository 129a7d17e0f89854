from __future__ import annotations

from datetime import datetime, timezone
from functools import partial
from typing import Any

from pydantic import Field

from instrumentation.span.base import BaseSpan

_utcnow = partial(datetime.now, timezone.utc)


class SimpleSpan(BaseSpan):
    """A span with its timings; ``metadata["error"]`` holds the error of a dropped span."""

    start_time: datetime = Field(default_factory=_utcnow)
    end_time: datetime | None = Field(default=None)
    duration: float = Field(default=0.0, description="Duration of the span in seconds.")
    metadata: dict[str, Any] | None = Field(default=None)
    dispatcher: str | None = Field(default=None, description="Name of the dispatcher.")


__all__ = ["SimpleSpan"]
