"""Finds the request an LLM call belongs to, whichever dispatcher it came through.

While at least one request is active, a collector is attached to the root
dispatcher (so it sees every event and span that propagates) and detached when the
last request ends, so an application without active requests pays nothing. A call
belongs to the innermost active request around it, found two ways:

* the request set in the current context (``audit.request()`` sets it; it follows
  asyncio tasks, ``instrumentation.Thread`` and ``ContextThreadPoolExecutor``), and
* the span tree: a span started under a request span (or under a span already
  mapped to a request) is mapped to that request.

When both name a request, the one that started later (the inner one) wins.
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
from contextvars import ContextVar
from typing import Any

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
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.span_runs: dict[str, RequestRun] = {}

    def innermost(self, *runs: RequestRun | None) -> RequestRun | None:
        best: RequestRun | None = None
        for run in runs:
            if run is not None and not run.ended and (best is None or run.seq > best.seq):
                best = run
        return best

    def run_for(self, span_id: str | None) -> RequestRun | None:
        mapped = self.span_runs.get(span_id) if span_id is not None else None
        return self.innermost(mapped, current_run.get())

    def activate(self, run: RequestRun, span_id: str | None = None) -> None:
        with self.lock:
            self.active += 1
            if span_id is not None:
                self.span_runs[span_id] = run
                run.span_ids.append(span_id)
            root_dispatcher.add_event_handler(_events)
            root_dispatcher.add_span_handler(_spans)

    def deactivate(self, run: RequestRun) -> None:
        with self.lock:
            for span_id in run.span_ids:
                if self.span_runs.get(span_id) is run:
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
        run = registry.run_for(parent_id)
        if run is not None and id_ not in registry.span_runs:
            with registry.lock:
                registry.span_runs[id_] = run
                run.span_ids.append(id_)

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
        run = registry.span_runs.get(id_)
        if run is not None and run.has_open(id_):
            # A failed LLM call emits no end event: end it here, with the error.
            error = f"{type(err).__name__}: {err}" if err is not None else "span dropped"
            started = _last_open(run, id_)
            if started is not None:
                # Ended now, on the application's side (no end event, so no latency).
                run.end_event(id_, dataclasses.replace(started, error=error, timestamp=_now()))
        self._forget(id_)

    def _forget(self, id_: str) -> None:
        run = registry.span_runs.get(id_)
        if run is None:
            return
        with registry.lock:
            if registry.span_runs.get(id_) is run:
                del registry.span_runs[id_]

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
        run = registry.run_for(event.span_id)
        if run is None:
            return
        phase, llm_type = kind
        key: object = event.span_id if event.span_id is not None else ("no-span", llm_type)
        if phase == "start":
            run.begin_event(key, _llm.start_event(event, llm_type))
        else:
            run.end_event(key, _llm.end_event(event, llm_type))


_events = _LLMCollector()
_spans = _SpanTracker()

__all__ = ["current_run", "registry"]
