"""Event handlers: subclass :class:`BaseEventHandler` and implement ``handle``;
:class:`NullEventHandler` takes events and does nothing with them."""

from typing import TYPE_CHECKING

from instrumentation.event_handlers.base import BaseEventHandler

if TYPE_CHECKING:
    from instrumentation.event_handlers.null import NullEventHandler
else:  # imported at first use (see instrumentation._lazy)
    from instrumentation import _lazy

    __getattr__, __dir__ = _lazy.lazy_exports(
        globals(),
        {
            "NullEventHandler": "instrumentation.event_handlers.null",
            "null": "instrumentation.event_handlers.null",
        },
    )

__all__ = ["BaseEventHandler", "NullEventHandler"]
