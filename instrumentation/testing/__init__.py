"""Helpers for testing code that is instrumented, shipped with the library.

``capture_events()`` and ``capture_spans()`` record what a block of code emits, as
the pydantic objects themselves, and afterwards put back the handler lists of the
dispatchers that existed before (see :class:`Snapshot`). The
pytest plugin (registered automatically) offers the same as the fixture
``instrumentation_capture``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, SupportsIndex, TypeVar, cast, overload

from instrumentation import dispatcher as _dispatcher_module
from instrumentation import telemetry
from instrumentation._spans import run_deferred
from instrumentation.context import _active_span, _active_tags, _suppressed, context_keepers
from instrumentation.dispatcher import Dispatcher, root_dispatcher, root_manager
from instrumentation.event_handlers.base import BaseEventHandler
from instrumentation.events.base import BaseEvent
from instrumentation.span.simple import SimpleSpan
from instrumentation.span_handlers.simple import SimpleSpanHandler

_E = TypeVar("_E", bound=BaseEvent)


class CapturedEvents(list[BaseEvent]):
    """The events recorded so far, in order, as a plain list with one addition."""

    __slots__ = ()

    def of(self, kind: type[_E] | tuple[type[_E], ...]) -> list[_E]:
        """The events that are instances of ``kind`` (a subclass of :class:`BaseEvent`,
        or a tuple of them such as ``LLM_END_EVENTS``), in order: typed, so that their
        fields type-check."""
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not kinds or not all(isinstance(k, type) and issubclass(k, BaseEvent) for k in kinds):
            raise TypeError(
                f"of() takes an event class (a BaseEvent subclass) or a tuple of them, not {kind!r}"
            )
        return [e for e in self if isinstance(e, kinds)]


class RecordingEventHandler(BaseEventHandler):
    """Keeps every event it is given, in order (thread-safe)."""

    events: list[BaseEvent] = []

    def model_post_init(self, __context: Any) -> None:
        self.events = CapturedEvents()
        self._guard = threading.Lock()

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        with self._guard:
            self.events.append(event)


class _CapturingEvents(RecordingEventHandler):
    """The event handler of a capture block: see :func:`_merge`."""


class _CapturingSpans(SimpleSpanHandler):
    """The span handler of a capture block: see :func:`_merge`."""


#: The handlers of the capture blocks open now, by id. Blocks may overlap without
#: nesting (two asyncio tasks, two threads, each in its own block): when one ends and
#: puts the handler lists back, the others' handlers stay attached.
_open_captures: dict[int, BaseEventHandler | SimpleSpanHandler] = {}


def _merge(saved: tuple[Any, ...], current: tuple[Any, ...]) -> tuple[Any, ...]:
    """The handler list to put back: ``saved``, without the handlers of capture blocks
    that have ended since, with those of blocks still open that came since."""
    kept = [
        h
        for h in saved
        if not isinstance(h, (_CapturingEvents, _CapturingSpans)) or id(h) in _open_captures
    ]
    for h in current:
        if id(h) in _open_captures and not any(h is k for k in kept):
            kept.append(h)
    return tuple(kept)


def _by_start(handler: SimpleSpanHandler) -> list[SimpleSpan]:
    """The handler's completed and dropped spans, by start."""
    return sorted([*handler.completed_spans, *handler.dropped_spans], key=lambda s: s.start_time)


class CapturedSpans(list[SimpleSpan]):
    """The spans recorded by :func:`capture_spans` (completed and dropped), by start.

    Read inside the block, it holds the spans ended so far, as the list of
    :func:`capture_events` does: a read first takes in what ended since (sorting
    again only when something did).
    """

    def __init__(self, handler: SimpleSpanHandler) -> None:
        super().__init__()
        self.handler = handler
        self._seen = (0, 0)

    def refresh(self) -> CapturedSpans:
        handler = self.handler
        completed, dropped = handler.completed_spans, handler.dropped_spans
        seen = (len(completed), len(dropped))  # takes in what is buffered
        full = seen[0] == completed.maxlen or seen[1] == dropped.maxlen  # counts stay put
        if full or seen != self._seen or seen[0] + seen[1] != list.__len__(self):
            list.__setitem__(self, slice(None), _by_start(handler))
            self._seen = seen
        return self

    def __len__(self) -> int:
        return list.__len__(self.refresh())

    def __iter__(self) -> Iterator[SimpleSpan]:
        return list.__iter__(self.refresh())

    def __reversed__(self) -> Iterator[SimpleSpan]:
        return list.__reversed__(self.refresh())

    @overload
    def __getitem__(self, index: SupportsIndex) -> SimpleSpan: ...
    @overload
    def __getitem__(self, index: slice) -> list[SimpleSpan]: ...
    def __getitem__(self, index: SupportsIndex | slice) -> SimpleSpan | list[SimpleSpan]:
        return list.__getitem__(self.refresh(), index)

    def __contains__(self, item: object) -> bool:
        return list.__contains__(self.refresh(), item)

    def __eq__(self, other: object) -> bool:
        return list.__eq__(self.refresh(), other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None

    def __add__(self, other: list[SimpleSpan]) -> list[SimpleSpan]:  # type: ignore[override]
        return list.__add__(self.refresh(), other)

    def __repr__(self) -> str:
        return list.__repr__(self.refresh())

    def copy(self) -> list[SimpleSpan]:
        return list(self.refresh())

    def index(self, *args: Any) -> int:
        return list.index(self.refresh(), *args)

    def count(self, value: Any) -> int:
        return list.count(self.refresh(), value)

    def named(self, name: str) -> list[SimpleSpan]:
        return [s for s in self if s.name == name]

    def tree(self) -> str:
        return self.handler.format_trace_trees()


@contextmanager
def _open_capture(
    handler: Any, attach: Callable[[Any], None], detach: Callable[[Any], None]
) -> Iterator[None]:
    """Attach a capture block's ``handler`` for the block; then put back the state
    :class:`Snapshot` keeps (other blocks still open keep theirs)."""
    snapshot = Snapshot()
    _open_captures[id(handler)] = handler
    attach(handler)
    try:
        yield
    finally:
        run_deferred()  # what a garbage collection put off is part of the block
        _open_captures.pop(id(handler), None)
        snapshot.restore()
        detach(handler)  # a dispatcher made by hand is not in the tree


def _target(block: str, dispatcher: object) -> Dispatcher:
    if dispatcher is None:
        return root_dispatcher
    if isinstance(dispatcher, Dispatcher):
        return dispatcher
    hint = f": write {block}(get_dispatcher({dispatcher!r}))" if isinstance(dispatcher, str) else ""
    raise TypeError(f"{block}() takes a Dispatcher or None; got {type(dispatcher).__name__}{hint}")


@contextmanager
def capture_events(dispatcher: Dispatcher | None = None) -> Iterator[CapturedEvents]:
    """Record the events that reach ``dispatcher`` (the root by default) in the block.

    ``of(kind)`` on the list picks the events of one class."""
    target = _target("capture_events", dispatcher)
    handler = _CapturingEvents()
    events = cast(CapturedEvents, handler.events)  # made so in model_post_init
    with _open_capture(handler, target.add_event_handler, target.remove_event_handler):
        yield events


@contextmanager
def capture_spans(
    dispatcher: Dispatcher | None = None, max_spans: int = 100_000
) -> Iterator[CapturedSpans]:
    """Record the spans that reach ``dispatcher`` (the root by default) in the block.

    The list holds the spans ended so far whenever it is read, in the block or after.
    """
    target = _target("capture_spans", dispatcher)
    handler = _CapturingSpans(max_completed_spans=max_spans)
    with _open_capture(handler, target.add_span_handler, target.remove_span_handler):
        yield CapturedSpans(handler)


class Snapshot:
    """The global state a test can change, to put back later.

    The handler lists and ``propagate`` flags of every dispatcher (one made after the
    snapshot is left as it is; the handlers of capture blocks still open are kept, so
    that blocks may overlap), the tree's taps,
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
                events, spans, node._propagate = found
                node._event_handlers = _merge(events, node._event_handlers)
                node._span_handlers = _merge(spans, node._span_handlers)
            root_manager.tap_event_handlers = _merge(self.taps[0], root_manager.tap_event_handlers)
            root_manager.tap_span_handlers = _merge(self.taps[1], root_manager.tap_span_handlers)
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
        self._events = _CapturingEvents()
        self._spans = _CapturingSpans(max_completed_spans=100_000)
        _open_captures[id(self._events)] = self._events
        _open_captures[id(self._spans)] = self._spans
        root_manager.tap(
            (*root_manager.tap_event_handlers, self._events),
            (*root_manager.tap_span_handlers, self._spans),
        )

    @property
    def events(self) -> CapturedEvents:
        """The events so far (what a garbage collection put off included)."""
        run_deferred()
        return cast(CapturedEvents, self._events.events)  # made so in model_post_init

    @property
    def spans(self) -> CapturedSpans:
        """The spans ended so far, by start time (``named()``, ``tree()`` as for
        :func:`capture_spans`; what a garbage collection put off included)."""
        run_deferred()
        return CapturedSpans(self._spans)

    def clear(self) -> None:
        """Forget what was recorded so far (one Hypothesis example from the next)."""
        self._events.events.clear()
        self._spans.completed_spans.clear()
        self._spans.dropped_spans.clear()

    def __repr__(self) -> str:
        spans = len(self._spans.completed_spans) + len(self._spans.dropped_spans)
        return f"<Capture: {len(self.events)} events, {spans} spans ended>"

    def _end(self) -> None:
        """The block is over: its handlers go when the state is put back."""
        _open_captures.pop(id(self._events), None)
        _open_captures.pop(id(self._spans), None)

    def events_of(self, kind: type[_E] | tuple[type[_E], ...]) -> list[_E]:
        """``events.of(kind)``: the events of one class, typed."""
        return self.events.of(kind)

    def tree(self) -> str:
        run_deferred()
        return self._spans.format_trace_trees()


@contextmanager
def isolated() -> Iterator[Capture]:
    """Record everything in the block, then put back the state :class:`Snapshot` keeps.

    Counters are not zeroed (see :func:`reset_counters`)."""
    snapshot = Snapshot()
    capture = Capture()
    try:
        yield capture
    finally:
        run_deferred()
        capture._end()
        snapshot.restore()


def reset_counters() -> None:
    telemetry.reset()


__all__ = [
    "Capture",
    "CapturedEvents",
    "CapturedSpans",
    "RecordingEventHandler",
    "Snapshot",
    "capture_events",
    "capture_spans",
    "isolated",
    "reset_counters",
]
