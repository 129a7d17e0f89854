"""Finds the request an LLM call belongs to, whichever dispatcher it came through.

While at least one request is active, a collector is attached to the root
dispatcher (so it sees every event and span that propagates) and detached when the
last request ends, so an application without active requests pays nothing. A call
belongs to the innermost active request around it, found two ways:

* the request set in the current context (``audit.request()`` sets it; it follows
  asyncio tasks, ``instrumentation.Thread`` and ``ContextThreadPoolExecutor``), and
* the span tree: a span started under a request span (or under a span already
  mapped to a request) is mapped to that request.

When both name a request, the one that started later (the inner one) wins. A request
span that several adapters saw is several requests (one per adapter), all mapped to
the span: each of them gets its events.
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
from contextvars import ContextVar
from typing import Any

from instrumentation._text import describe_error
from instrumentation.audit import _llm
from instrumentation.audit.events import _now
from instrumentation.audit.runner import RequestRun
from instrumentation.dispatcher import root_dispatcher
from instrumentation.event_handlers.base import BaseEventHandler
from instrumentation.events.base import BaseEvent
from instrumentation.span.base import BaseSpan
from instrumentation.span_handlers.base import BaseSpanHandler

current_run: ContextVar[RequestRun | None] = ContextVar("instrumentation_audit_run", default=None)


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
            root_dispatcher.add_event_handler(_events)
            root_dispatcher.add_span_handler(_spans)

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
            if self.active <= 0:
                self.active = 0
                root_dispatcher.remove_event_handler(_events)
                root_dispatcher.remove_span_handler(_spans)


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

__all__ = ["current_run", "registry"]
