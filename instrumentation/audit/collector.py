"""Finds the request an LLM call belongs to, whichever dispatcher it came through.

While at least one request is active, a collector is attached to the root
dispatcher (so it sees every event and span that propagates). It is detached once no
request has been open for :data:`IDLE_DETACH_SECONDS`, so an application without
requests pays nothing, and one serving them back to back does not rebuild the handler
chain of every dispatcher twice per request. A call belongs to the innermost active
request around it, found two ways:

* the request set in the current context (``audit.request()`` sets it; it follows
  asyncio tasks, ``instrumentation.Thread`` and ``ContextThreadPoolExecutor``), and
* the span tree: a span started under a request span (or under a span already
  mapped to a request) is mapped to that request.

When both name a request, the one that started later (the inner one) wins. A request
span that several adapters saw is several requests (one per adapter), all mapped to
the span: each of them gets its events.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import math
import sys
import threading
import time
from contextvars import ContextVar
from typing import Any

from instrumentation._spans import ending_now
from instrumentation._text import describe_error
from instrumentation.audit import _llm
from instrumentation.audit._loop import Worker, audit_loop
from instrumentation.audit.events import _now
from instrumentation.audit.runner import RequestRun
from instrumentation.dispatcher import root_dispatcher
from instrumentation.event_handlers.base import BaseEventHandler
from instrumentation.events.base import BaseEvent
from instrumentation.span.base import BaseSpan
from instrumentation.span_handlers.base import BaseSpanHandler

current_run: ContextVar[RequestRun | None] = ContextVar("instrumentation_audit_run", default=None)

#: Seconds the collector stays on the root dispatcher once no request is open; read
#: when the last one ends. Attaching or detaching it rebuilds the handler chain of
#: every dispatcher in the tree, under the tree's lock (0.8 ms with a dozen
#: dispatchers, 20 ms with a thousand, 200 ms with ten thousand): doing it at every
#: request, as when it was detached at once, made each request pay that twice. While
#: it stays, decorated calls make spans (it sees them) though no request is open. ``0``
#: detaches it when the last request ends; ``inf`` never does.
IDLE_DETACH_SECONDS = 1.0


class _Registry:
    """The active requests, and the spans mapped to them.

    A span maps to a tuple of runs: usually one, several when more than one adapter
    made a request of the same span (two ``attach()`` on one dispatcher, or one on
    ``org`` and one on ``org.team``). Every run of that tuple gets the span's events.
    """

    def __init__(self) -> None:
        # Re-entrant: a span started from a generator's finally, as the garbage
        # collector frees it, while this thread holds the lock, is mapped all the same.
        self.lock = threading.RLock()
        self.active = 0
        self.span_runs: dict[str, tuple[RequestRun, ...]] = {}
        # The idle check waiting on the audit loop to detach the collector: its token
        # (None: none waits; a newer one makes it moot), when it is due, and the loop's
        # worker (one whose thread ended runs it no more).
        self._check: object | None = None
        self._check_due = 0.0
        self._check_worker: Worker | None = None
        self._idle_since = 0.0

    def runs_for(self, span_id: str | None) -> tuple[RequestRun, ...]:
        """The runs an event of span ``span_id`` belongs to (the innermost request).

        The runs mapped to the span, unless the current context's request started
        later (then that one alone); ``()`` when there is none.
        """
        mapped = self.span_runs.get(span_id) if span_id is not None else None
        current = current_run.get()
        if current is not None and current.ended:
            current = None
        if mapped is None:
            return () if current is None else (current,)
        if len(mapped) == 1:  # the common case: no tuple made, no generator run
            only = mapped[0]
            if only.ended:
                return () if current is None else (current,)
            if current is None or current is only or current.seq < only.seq:
                return mapped
            return (current,)
        live = tuple(run for run in mapped if not run.ended)
        if current is not None and (not live or current.seq > max(run.seq for run in live)):
            return (current,)
        return live

    def activate(self, run: RequestRun, span_id: str | None = None) -> None:
        with self.lock:
            self.active += 1
            if span_id is not None:
                run.request_span = span_id
                # Other requests made of this same span stay (each adapter gets the
                # events); a mapping inherited from an outer request gives way.
                kept = tuple(
                    other
                    for other in self.span_runs.get(span_id, ())
                    if other.request_span == span_id and not other.ended
                )
                self.span_runs[span_id] = (*kept, run)
                run.span_ids.add(span_id)
            # Nothing to do while it is attached still (a request ended less than
            # IDLE_DETACH_SECONDS ago); else both at once, one rebuild of the tree.
            root_dispatcher._attach_together(_events, _spans)

    def map_span(self, span_id: str, runs: tuple[RequestRun, ...]) -> None:
        """Map ``span_id`` (started inside ``runs``' request) to them, unless mapped."""
        with self.lock:
            if span_id in self.span_runs:
                return
            self.span_runs[span_id] = runs
            for run in runs:
                run.span_ids.add(span_id)

    def forget(self, span_id: str) -> None:
        """An ended span: no longer mapped, nor kept by its requests (a request open
        for hours, an agent's loop, made one span after another)."""
        with self.lock:
            for run in self.span_runs.pop(span_id, ()):
                run.span_ids.discard(span_id)

    def deactivate(self, run: RequestRun) -> None:
        with self.lock:
            for span_id in tuple(run.span_ids):  # a span mapped meanwhile (see __init__)
                mapped = self.span_runs.get(span_id)
                if mapped is not None and run in mapped:
                    rest = tuple(other for other in mapped if other is not run)
                    if rest:
                        self.span_runs[span_id] = rest
                    else:
                        del self.span_runs[span_id]
            run.span_ids.clear()
            self.active -= 1
            if self.active > 0:
                return
            self.active = 0
            now = time.monotonic()
            self._idle_since = now
            delay = IDLE_DETACH_SECONDS
            if not delay > 0:  # 0 (or nan): at once
                root_dispatcher._detach_together(_events, _spans)
                return
            if delay == math.inf:
                return
            due = now + delay
            worker = self._check_worker
            if (
                self._check is not None
                and self._check_due <= due
                and worker is not None
                and worker.running()
            ):
                return  # the common case: the check waiting comes first, and looks again
            token = self._check = object()
            self._check_due = due
        self._schedule(token, delay)

    def _schedule(self, token: object, delay: float) -> None:
        """Run the idle check ``delay`` seconds from now on the audit loop.

        No thread per request: the audit loop's thread, started once, runs a timer.
        When the interpreter exits, or inside the garbage collector (which may have
        stopped this thread holding the audit loop's lock), the collector goes at once:
        a loop started then would never run (its start waits for ever).
        """
        try:
            if ending_now() or sys.is_finalizing():
                raise RuntimeError("no audit loop to start now")
            worker = audit_loop.worker()
            with self.lock:
                if self._check is token:
                    self._check_worker = worker
            if audit_loop.post(worker, self._arm, token, delay):
                return
        except Exception:
            pass
        with self.lock:
            if self._check is token:
                self._check = None
                if not self.active:
                    root_dispatcher._detach_together(_events, _spans)

    def _arm(self, token: object, delay: float) -> None:
        asyncio.get_running_loop().call_later(delay, self._idle_check, token)

    def _idle_check(self, token: object) -> None:
        """On the audit loop: detach the collector if no request was open meanwhile."""
        with self.lock:
            if self._check is not token:  # a later check replaced this one
                return
            if self.active:  # the request that ends them all schedules the next check
                self._check = None
                return
            now = time.monotonic()
            left = self._idle_since + IDLE_DETACH_SECONDS - now
            if left > 0:  # a request opened and ended meanwhile: idle since it ended
                if left == math.inf:
                    self._check = None
                    return
                self._check_due = now + left
                asyncio.get_running_loop().call_later(left, self._idle_check, token)
                return
            self._check = None
            root_dispatcher._detach_together(_events, _spans)


registry = _Registry()


class _SpanTracker(BaseSpanHandler[BaseSpan]):
    """Maps spans started inside a request to it; a dropped LLM span ends its event."""

    def span_enter(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        parent_id: str | None = None,
        tags: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not registry.active:
            return
        if id_ in registry.span_runs:  # a request span (its adapters mapped it)
            return
        runs = registry.runs_for(parent_id)
        if runs:
            registry.map_span(id_, runs)

    def span_exit(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        result: Any | None = None,
        **kwargs: Any,
    ) -> None:
        self._forget(id_)

    def span_drop(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        err: BaseException | None = None,
        **kwargs: Any,
    ) -> None:
        runs = registry.span_runs.get(id_)
        if runs is not None:
            error = describe_error(err) if err is not None else "span dropped"
            ended = _now()
            for run in runs:
                # A failed LLM call emits no end event: end it here, with the error.
                started = _last_open(run, id_)
                if started is not None:
                    # Ended now, on the application's side (no end event, no latency).
                    run.end_event(id_, dataclasses.replace(started, error=error, timestamp=ended))
        self._forget(id_)

    def _forget(self, id_: str) -> None:
        if id_ in registry.span_runs:
            registry.forget(id_)

    def new_span(self, *args: Any, **kwargs: Any) -> None:
        return None

    def prepare_to_exit_span(self, *args: Any, **kwargs: Any) -> None:
        return None

    def prepare_to_drop_span(self, *args: Any, **kwargs: Any) -> None:
        return None


def _last_open(run: RequestRun, key: object) -> Any:
    with run._lock:
        stack = run._open.get(key)
        return stack[-1][1] if stack else None


class _LLMCollector(BaseEventHandler):
    """Turns LLM start/end events into ``event_start``/``event_end`` of their request."""

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        if not registry.active:
            return
        kind = _llm.classify(event)
        if kind is None:
            return
        runs = registry.runs_for(event.span_id)
        if not runs:
            return
        phase, llm_type = kind
        key: object = event.span_id if event.span_id is not None else ("no-span", llm_type)
        # One event object for every request it belongs to: handlers never change them.
        if phase == "start":
            started = _llm.start_event(event, llm_type)
            for run in runs:
                run.begin_event(key, started)
        else:
            ended = _llm.end_event(event, llm_type)
            for run in runs:
                run.end_event(key, ended)


_events = _LLMCollector()
_spans = _SpanTracker()

__all__ = ["IDLE_DETACH_SECONDS"]
