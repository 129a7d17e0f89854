"""Helpers for testing code that is instrumented, shipped with the library.

``capture_events()`` and ``capture_spans()`` record what a block of code emits, as
the pydantic objects themselves, and afterwards put back the handler lists of the
dispatchers that existed before (see :class:`Snapshot`). The
pytest plugin (registered automatically) offers the same as the fixture
``instrumentation_capture``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from instrumentation import dispatcher as _dispatcher_module
from instrumentation import telemetry
from instrumentation.context import _active_span, _active_tags, _suppressed, context_keepers
from instrumentation.dispatcher import Dispatcher, root_dispatcher, root_manager
from instrumentation.event_handlers.base import BaseEventHandler
from instrumentation.events.base import BaseEvent
from instrumentation.span.simple import SimpleSpan
from instrumentation.span_handlers.simple import SimpleSpanHandler


class RecordingEventHandler(BaseEventHandler):
    """Keeps every event it is given, in order (thread-safe)."""

    events: list[BaseEvent] = []

    def model_post_init(self, __context: Any) -> None:
        self.events = []
        self._guard = threading.Lock()

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        with self._guard:
            self.events.append(event)


class CapturedSpans(list[SimpleSpan]):
    """The spans recorded by :func:`capture_spans` (completed and dropped), by start."""

    def __init__(self, handler: SimpleSpanHandler) -> None:
        super().__init__()
        self.handler = handler

    def refresh(self) -> CapturedSpans:
        self[:] = sorted(
            [*self.handler.completed_spans, *self.handler.dropped_spans],
            key=lambda s: s.start_time,
        )
        return self

    def named(self, name: str) -> list[SimpleSpan]:
        return [s for s in self if s.name == name]

    def tree(self) -> str:
        return self.handler.format_trace_trees()


@contextmanager
def capture_events(dispatcher: Dispatcher | None = None) -> Iterator[list[BaseEvent]]:
    """Record the events that reach ``dispatcher`` (the root by default) in the block."""
    target = root_dispatcher if dispatcher is None else dispatcher
    handler = RecordingEventHandler()
    events = handler.events
    snapshot = Snapshot()
    target.add_event_handler(handler)
    try:
        yield events
    finally:
        snapshot.restore()
        target.remove_event_handler(handler)  # a dispatcher made by hand is not in the tree


@contextmanager
def capture_spans(
    dispatcher: Dispatcher | None = None, max_spans: int = 100_000
) -> Iterator[CapturedSpans]:
    """Record the spans that reach ``dispatcher`` (the root by default) in the block.

    The list is filled when the block ends; call ``.refresh()`` to look inside it.
    """
    target = root_dispatcher if dispatcher is None else dispatcher
    handler = SimpleSpanHandler(max_completed_spans=max_spans)
    spans = CapturedSpans(handler)
    snapshot = Snapshot()
    target.add_span_handler(handler)
    try:
        yield spans
    finally:
        snapshot.restore()
        target.remove_span_handler(handler)  # a dispatcher made by hand is not in the tree
        spans.refresh()


class Snapshot:
    """The global state a test can change, to put back later.

    The handler lists and ``propagate`` flags of every dispatcher (one made after the
    snapshot is left as it is), the tree's taps,
    ``telemetry.raise_handler_errors``, and the current span, tags and suppression
    (which ``restore_propagation_context`` sets without a token to undo it), with
    what integrations keep beside them (OpenTelemetry's current context).
    """

    def __init__(self) -> None:
        with _dispatcher_module._lock:  # looked up each time: re-made after fork
            self.state = {
                name: (node._event_handlers, node._span_handlers, node._propagate)
                for name, node in root_manager.dispatchers.items()
            }
            self.taps = (root_manager.tap_event_handlers, root_manager.tap_span_handlers)
        self.raise_handler_errors = telemetry.raise_handler_errors
        self.context = (_active_span.get(), _active_tags.get(), _suppressed.get())
        self.kept = {keeper: keeper.save() for keeper in context_keepers()}

    def restore(self) -> None:
        with _dispatcher_module._lock:  # looked up each time: re-made after fork
            for name, node in root_manager.dispatchers.items():
                found = self.state.get(name)
                if found is None:
                    # Made in the block (a module imported there): its handlers and
                    # ``propagate`` are that module's set-up, which must outlive the test.
                    continue
                node._event_handlers, node._span_handlers, node._propagate = found
            root_manager.tap_event_handlers, root_manager.tap_span_handlers = self.taps
            root_manager._rebuild_all()
        telemetry.raise_handler_errors = self.raise_handler_errors
        span, tags, suppressed = self.context
        _active_span.set(span)
        _active_tags.set(tags)
        _suppressed.set(suppressed)
        for keeper in context_keepers():
            keeper.put_back(self.kept.get(keeper))


class Capture:
    """What the ``instrumentation_capture`` fixture gives: events and spans of the test.

    Its handlers tap the whole tree, so dispatchers with ``propagate = False`` are
    recorded too.
    """

    def __init__(self) -> None:
        self._events = RecordingEventHandler()
        self._spans = SimpleSpanHandler(max_completed_spans=100_000)
        root_manager.tap(
            (*root_manager.tap_event_handlers, self._events),
            (*root_manager.tap_span_handlers, self._spans),
        )

    @property
    def events(self) -> list[BaseEvent]:
        return self._events.events

    @property
    def spans(self) -> list[SimpleSpan]:
        return sorted(
            [*self._spans.completed_spans, *self._spans.dropped_spans],
            key=lambda s: s.start_time,
        )

    def events_of(self, kind: type[BaseEvent]) -> list[BaseEvent]:
        return [e for e in self.events if isinstance(e, kind)]

    def tree(self) -> str:
        return self._spans.format_trace_trees()


@contextmanager
def isolated() -> Iterator[Capture]:
    """Record everything in the block, then put back the state :class:`Snapshot` keeps.

    Counters are not zeroed (see :func:`reset_counters`)."""
    snapshot = Snapshot()
    try:
        yield Capture()
    finally:
        snapshot.restore()


def reset_counters() -> None:
    telemetry.reset()


__all__ = [
    "Capture",
    "CapturedSpans",
    "RecordingEventHandler",
    "Snapshot",
    "capture_events",
    "capture_spans",
    "isolated",
    "reset_counters",
]
