"""What the core asks of asyncio, answered without importing it.

Importing asyncio (with ``ssl``, ``subprocess`` and ``concurrent.futures`` that it
imports) was a tenth of ``import instrumentation``, for a script or a command line
that never runs an event loop. Nothing asyncio makes (a running loop, a future, a
``CancelledError``) can exist before asyncio is imported, so these read it from
``sys.modules``: not imported (or not yet done importing), the answer is "no".
Not for hot paths: each call is a few dictionary and attribute lookups.
"""

from __future__ import annotations

import sys


def loop_running() -> bool:
    """Whether an asyncio event loop runs in this thread (``asyncio._get_running_loop``)."""
    get_running_loop = getattr(sys.modules.get("asyncio.events"), "_get_running_loop", None)
    return get_running_loop is not None and get_running_loop() is not None


def is_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` is an ``asyncio.CancelledError``."""
    cancelled_error = _cancelled_error_class()
    return cancelled_error is not None and isinstance(exc, cancelled_error)


def is_cancellation_class(kind: type) -> bool:
    """Whether ``kind`` is ``asyncio.CancelledError`` or a subclass of it."""
    cancelled_error = _cancelled_error_class()
    return cancelled_error is not None and issubclass(kind, cancelled_error)


def is_future_class(kind: type) -> bool:
    """Whether ``kind`` is ``asyncio.Future`` or a subclass of it (``Task``)."""
    future = getattr(sys.modules.get("asyncio.futures"), "Future", None)
    return future is not None and issubclass(kind, future)


def _cancelled_error_class() -> type | None:
    cancelled_error: type | None = getattr(
        sys.modules.get("asyncio.exceptions"), "CancelledError", None
    )
    return cancelled_error


__all__ = ["is_cancellation", "is_cancellation_class", "is_future_class", "loop_running"]
