"""Spans: pydantic models of stretches of execution."""

from typing import TYPE_CHECKING

from instrumentation.context import active_span_id
from instrumentation.span.base import BaseSpan

if TYPE_CHECKING:
    from instrumentation.span.simple import SimpleSpan
else:  # imported at first use (see instrumentation._lazy)
    from instrumentation import _lazy

    __getattr__, __dir__ = _lazy.lazy_exports(
        globals(),
        {"SimpleSpan": "instrumentation.span.simple", "simple": "instrumentation.span.simple"},
    )

__all__ = ["BaseSpan", "SimpleSpan", "active_span_id"]
