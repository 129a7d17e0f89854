"""Span handlers: subclass :class:`BaseSpanHandler` for your own; :class:`SimpleSpanHandler`
keeps the last spans in memory and prints them as trees; :class:`NullSpanHandler`
keeps nothing. ``completed_spans`` and ``dropped_spans`` are each a :class:`SpanDeque`,
a bounded deque that reads like the list LlamaIndex keeps."""

from typing import TYPE_CHECKING

from instrumentation.span_handlers._buffered import SpanDeque
from instrumentation.span_handlers.base import BaseSpanHandler

if TYPE_CHECKING:
    from instrumentation.span_handlers.null import NullSpanHandler
    from instrumentation.span_handlers.simple import SimpleSpanHandler
else:  # imported at first use (see instrumentation._lazy)
    from instrumentation import _lazy

    __getattr__, __dir__ = _lazy.lazy_exports(
        globals(),
        {
            "NullSpanHandler": "instrumentation.span_handlers.null",
            "SimpleSpanHandler": "instrumentation.span_handlers.simple",
            "null": "instrumentation.span_handlers.null",
            "simple": "instrumentation.span_handlers.simple",
        },
    )

__all__ = ["BaseSpanHandler", "NullSpanHandler", "SimpleSpanHandler", "SpanDeque"]
