"""The audit loop: one background thread with an event loop, where handler calls run.

Handler calls never run on the application's thread: application code may be sync or
async, handlers may be ``async def`` or plain ``def``, and neither should wait for the
other. ``async def`` methods run as tasks on this loop; plain ``def`` methods run on a
few worker threads, so a blocking write never stalls the loop (nor the application's).
Everything here runs with instrumentation suppressed, so handlers are never traced.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from instrumentation.context import suppress_instrumentation

#: Worker threads for handler methods written as plain ``def``.
SYNC_WORKERS = 4


class AuditLoop:
    """Starts its thread at first use; ``call_soon`` is safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._context: contextvars.Context | None = None
        self._executor: ThreadPoolExecutor | None = None

    def _start(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is not None:
                return self._loop
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                with suppress_instrumentation():
                    self._context = contextvars.copy_context()
                    ready.set()
                    loop.run_forever()

            thread = threading.Thread(target=run, name="instrumentation-audit", daemon=True)
            thread.start()
            ready.wait()
            self._executor = ThreadPoolExecutor(
                max_workers=SYNC_WORKERS, thread_name_prefix="instrumentation-audit-sync"
            )
            self._thread = thread
            self._loop = loop
            return loop

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop if self._loop is not None else self._start()

    def in_loop_thread(self) -> bool:
        """True on the audit loop's own thread (waiting there would deadlock)."""
        return self._thread is not None and threading.current_thread() is self._thread

    def call_soon(self, func: Callable[..., object], *args: Any) -> None:
        """Run ``func(*args)`` on the loop, in its suppressed context; FIFO per caller."""
        loop = self.loop
        loop.call_soon_threadsafe(func, *args, context=self._context)

    async def run_sync(self, func: Callable[..., Any], *args: Any) -> Any:
        """Run a plain function on a worker thread (instrumentation suppressed) and await it."""
        loop = asyncio.get_running_loop()
        context = self._context.copy() if self._context is not None else contextvars.Context()
        return await loop.run_in_executor(self._executor, context.run, func, *args)

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._loop = None
        self._thread = None
        self._context = None
        self._executor = None


audit_loop = AuditLoop()

if hasattr(os, "register_at_fork"):  # pragma: no branch
    os.register_at_fork(after_in_child=audit_loop.reset_after_fork)

__all__ = ["SYNC_WORKERS", "AuditLoop", "audit_loop"]
