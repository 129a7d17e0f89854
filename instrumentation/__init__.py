"""See what an application does: dispatchers, events, spans and their handlers.

``get_dispatcher(__name__)`` in each module; ``@dispatcher.span`` on what should be
traced; ``dispatcher.event(...)`` for moments; handlers on the root see everything.
"""

from typing import TYPE_CHECKING

from instrumentation import base
from instrumentation.context import (
    active_span_id,
    current_span,
    instrument_tags,
    suppress_instrumentation,
)
from instrumentation.dispatcher import (
    DISPATCHER_SPAN_DECORATED_ATTR,
    Dispatcher,
    DispatcherSpanMixin,
    Manager,
    SpanBlock,
    get_dispatcher,
    root_dispatcher,
    root_manager,
)
from instrumentation.event_handlers import BaseEventHandler
from instrumentation.events import BaseEvent, SpanDropEvent
from instrumentation.span import BaseSpan
from instrumentation.span_handlers import BaseSpanHandler

if TYPE_CHECKING:
    from instrumentation.event_handlers.null import NullEventHandler
    from instrumentation.span.simple import SimpleSpan
    from instrumentation.span_handlers.null import NullSpanHandler
    from instrumentation.span_handlers.simple import SimpleSpanHandler
    from instrumentation.threads import ContextThreadPoolExecutor, Thread
else:  # imported at first use (see instrumentation._lazy)
    from instrumentation import _lazy

    __getattr__, __dir__ = _lazy.lazy_exports(
        globals(),
        {
            "ContextThreadPoolExecutor": "instrumentation.threads",
            "NullEventHandler": "instrumentation.event_handlers.null",
            "NullSpanHandler": "instrumentation.span_handlers.null",
            "SimpleSpan": "instrumentation.span.simple",
            "SimpleSpanHandler": "instrumentation.span_handlers.simple",
            "Thread": "instrumentation.threads",
            "threads": "instrumentation.threads",
            "tree": "instrumentation.tree",
        },
    )

__version__ = "0.1.0"

__all__ = [
    "DISPATCHER_SPAN_DECORATED_ATTR",
    "BaseEvent",
    "BaseEventHandler",
    "BaseSpan",
    "BaseSpanHandler",
    "ContextThreadPoolExecutor",
    "Dispatcher",
    "DispatcherSpanMixin",
    "Manager",
    "NullEventHandler",
    "NullSpanHandler",
    "SimpleSpan",
    "SimpleSpanHandler",
    "SpanBlock",
    "SpanDropEvent",
    "Thread",
    "active_span_id",
    "base",
    "current_span",
    "get_dispatcher",
    "instrument_tags",
    "root_dispatcher",
    "root_manager",
    "suppress_instrumentation",
]
