from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from functools import partial
from typing import Any, cast

from pydantic import Field, field_validator
from typing_extensions import Self

from instrumentation.span.base import BaseSpan

_utcnow = partial(datetime.now, timezone.utc)
_TIMES = ("start_time", "end_time")


class SimpleSpan(BaseSpan):
    """A span with its timings; ``metadata["error"]`` holds the error of a dropped span."""

    start_time: datetime = Field(default_factory=_utcnow)
    end_time: datetime | None = Field(default=None)
    duration: float = Field(default=0.0, description="Duration of the span in seconds.")
    metadata: dict[str, Any] | None = Field(default=None)
    dispatcher: str | None = Field(default=None, description="Name of the dispatcher.")

    @field_validator("start_time", "end_time")
    @classmethod
    def _to_utc(cls, value: Any) -> Any:
        return _as_utc(value)

    def __setattr__(self, name: str, value: Any) -> None:
        # LlamaIndex's spans are in naive local time, and span handlers written for it
        # stamp ``span.end_time = datetime.now()`` and subtract ``start_time``: with
        # one naive time and one aware, every span of such a handler failed. A time
        # set by hand is made UTC here as one given to the constructor is (a naive
        # one taken as local time), without validating every other assignment.
        if name == "end_time" or name == "start_time":
            value = _as_utc(value)
        super().__setattr__(name, value)

    # ``model_copy(update=...)`` and ``model_construct(...)`` skip validation: a naive
    # time given there stayed naive, and subtracting the other time failed as above.
    # Neither is on the path of a span the handlers make.

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        return super().model_copy(update=update and _times_as_utc(update), deep=deep)

    # The pydantic mypy plugin types it with the fields as keywords, in every model.
    @classmethod
    def model_construct(  # type: ignore[override]
        cls, _fields_set: set[str] | None = None, **values: Any
    ) -> Self:
        return cast(Self, super().model_construct(_fields_set, **_times_as_utc(values)))


def _times_as_utc(values: Mapping[str, Any]) -> Mapping[str, Any]:
    """``values`` (field name -> value) with the span's times made UTC."""
    if "start_time" in values or "end_time" in values:
        return {k: _as_utc(v) if k in _TIMES else v for k, v in values.items()}
    return values


def _as_utc(value: Any) -> Any:
    """A datetime in UTC (a naive one taken as local time); anything else, or one that
    has no UTC form (``datetime.min`` east of Greenwich), as it is: a subclass may
    keep its times as floats."""
    if isinstance(value, datetime):
        try:
            return value.astimezone(timezone.utc)
        except (OverflowError, ValueError):
            return value
    return value


__all__ = ["SimpleSpan"]
