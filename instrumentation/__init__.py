"""See what an application does: dispatchers, events, spans and their handlers.

``get_dispatcher(__name__)`` in each module; ``@dispatcher.span`` on what should be
traced; ``dispatcher.event(...)`` for moments; handlers on the root see everything.
"""

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
from instrumentation.event_handlers import BaseEventHandler, NullEventHandler
from instrumentation.events import BaseEvent, SpanDropEvent
from instrumentation.span import BaseSpan, SimpleSpan
from instrumentation.span_handlers import BaseSpanHandler, NullSpanHandler, SimpleSpanHandler
from instrumentation.threads import ContextThreadPoolExecutor, Thread

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
