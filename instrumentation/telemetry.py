"""Counters that tell whether observability itself is failing.

A broken handler must never break the application, but it must not be invisible
either: every failure is counted here and logged (rate-limited) through ``logging``,
and anyone can read the figures with :func:`snapshot`. Integrations (storage, OTLP,
LLM layers) register their own counters by name with :func:`counter`.

Counting is on the hot path, so a counter is an ``itertools.count``: ``next()`` on
it is atomic in CPython and costs a few tens of nanoseconds, with no lock.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Hashable
from typing import Any

logger = logging.getLogger("instrumentation")

#: When true, a handler's exception is re-raised instead of logged and counted.
#: Tests switch it on to see handler bugs at once (like ``logging.raiseExceptions``).
raise_handler_errors: bool = False

#: At most one log record per handler in this many seconds; the rest are counted.
LOG_INTERVAL_SECONDS: float = 10.0


class Counter:
    """A monotonic, thread-safe counter read with :attr:`value`."""

    __slots__ = ("_base", "_lock", "_more", "_ticks", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        # Never replaced, so hot paths may bind ``next`` to it once (``ticks``).
        self._ticks = itertools.count()
        self._base = 0
        self._more = 0
        self._lock = threading.Lock()

    @property
    def ticks(self) -> itertools.count[int]:
        """The underlying ``itertools.count``: ``next(counter.ticks)`` adds one."""
        return self._ticks

    def inc(self) -> None:
        """Add one; never blocks."""
        next(self._ticks)

    def add(self, n: int) -> None:
        """Add ``n`` (takes a short lock: not for the hottest paths)."""
        if n < 0:
            raise ValueError(f"counter {self.name!r} only goes up; got {n}")
        with self._lock:
            self._more += n

    @property
    def value(self) -> int:
        # repr(itertools.count(7)) == "count(7)": the only way to read it without
        # advancing it, and stable across CPython versions.
        return self._read_ticks() - self._base + self._more

    def _read_ticks(self) -> int:
        return int(repr(self._ticks)[6:-1])

    def reset(self) -> None:
        with self._lock:
            self._base = self._read_ticks()
            self._more = 0

    def __repr__(self) -> str:
        return f"Counter({self.name!r}, value={self.value})"


_registry_lock = threading.Lock()
_counters: dict[str, Counter] = {}
_handler_errors: dict[str, Counter] = {}
_last_logged: dict[Hashable, float] = {}
_suppressed_since_log: dict[Hashable, int] = {}


def counter(name: str) -> Counter:
    """The counter called ``name``, created at first use."""
    found = _counters.get(name)
    if found is not None:
        return found
    with _registry_lock:
        return _counters.setdefault(name, Counter(name))


def _start_afresh_after_fork() -> None:
    # A lock held by another thread at fork() stays held forever in the child, so
    # every lock is made anew. The counts start from zero: what the parent counted
    # before the fork is the parent's to report, and a pre-fork server whose workers
    # each kept it would have it summed once per worker by whoever adds them up.
    global _registry_lock
    _registry_lock = threading.Lock()
    for c in _counters.values():
        c._lock = threading.Lock()
        c.reset()
    _handler_errors.clear()
    _last_logged.clear()
    _suppressed_since_log.clear()


if hasattr(os, "register_at_fork"):  # pragma: no branch - absent on Windows only
    os.register_at_fork(after_in_child=_start_afresh_after_fork)


EVENTS_DISPATCHED = counter("events.dispatched")
SPANS_STARTED = counter("spans.started")
SPANS_ENDED = counter("spans.ended")
SPANS_DROPPED = counter("spans.dropped")
SPANS_DROPPED_BY_SHUTDOWN = counter("spans.dropped_by_shutdown")
HANDLER_ERRORS = counter("handler.errors")


def handler_name(handler: object) -> str:
    class_name = getattr(handler, "class_name", None)
    try:
        name = class_name() if callable(class_name) else type(handler).__name__
    except Exception:  # a broken class_name() must not hide the real error
        name = type(handler).__name__
    return str(name)


def log_turn(key: Hashable) -> int | None:
    """Whether a rate-limited log line about ``key`` may go out now.

    At most one line per key every ``LOG_INTERVAL_SECONDS``, so that a handler failing
    on every call cannot flood the log. Returns how many lines were held back since
    the last one went out, or None when this one is held back too.
    """
    now = time.monotonic()
    last = _last_logged.get(key)
    if last is not None and now - last < LOG_INTERVAL_SECONDS:
        _suppressed_since_log[key] = _suppressed_since_log.get(key, 0) + 1
        return None
    _last_logged[key] = now
    return _suppressed_since_log.pop(key, 0)


def report_handler_error(handler: object, where: str, subject: str, exc: BaseException) -> None:
    """Count and log an exception raised by a handler; never raises (unless asked to).

    ``where`` is the handler method that failed and ``subject`` what it was handling
    (an event's class name or a span's id), so the log line says which and why.
    """
    if raise_handler_errors:
        raise exc
    try:
        name = handler_name(handler)
        per_handler = _handler_errors.get(name)
        if per_handler is None:
            with _registry_lock:
                per_handler = _handler_errors.setdefault(name, Counter(name))
        per_handler.inc()
        HANDLER_ERRORS.inc()
        suppressed = log_turn(name)
        if suppressed is None:
            return
        more = (
            f" ({suppressed} more errors from it in the last interval)"
            if suppressed
            else (
                f"; its further errors within {LOG_INTERVAL_SECONDS:g} s are counted, not"
                " logged (instrumentation.telemetry.handler_errors()); set"
                " instrumentation.telemetry.raise_handler_errors = True to raise them"
                " instead, in tests"
            )
        )
        logger.error(
            "instrumentation handler %s failed in %s while handling %s: %r%s",
            name,
            where,
            subject,
            exc,
            more,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
    except Exception:  # pragma: no cover - the error path itself must not raise
        pass


def handler_errors() -> dict[str, int]:
    """Errors raised by handlers so far, by handler class name."""
    return {name: c.value for name, c in list(_handler_errors.items())}


def snapshot() -> dict[str, Any]:
    """Every counter's current value, plus ``handler_errors_by_handler`` (the
    handler errors counted per handler name)."""
    out: dict[str, Any] = {name: c.value for name, c in list(_counters.items())}
    out["handler_errors_by_handler"] = handler_errors()
    return out


def reset() -> None:
    """Zero every counter (tests and long-running dashboards)."""
    for c in list(_counters.values()):
        c.reset()
    with _registry_lock:
        _handler_errors.clear()
    _last_logged.clear()
    _suppressed_since_log.clear()


__all__ = ["Counter", "counter", "handler_errors", "raise_handler_errors", "reset", "snapshot"]
