"""Helpers for testing code that is instrumented, shipped with the library.

``capture_events()`` and ``capture_spans()`` record what a block of code emits, as
the pydantic objects themselves. The pytest plugin (registered automatically) offers
the same as the fixture ``instrumentation_capture``, and :func:`isolated` as a block.

At its end a block takes its own handler off again and undoes what was changed
during it: a handler attached is taken off, one detached (``shutdown()`` included) is
put back where it was, a ``propagate`` flag is set back. It leaves alone what other blocks open at
the same time changed in their own context (their thread or task, and the tasks and
threads that carry a copy of it), and what a module imported in the block set up at
its import (which happens once in a process). A change made outside any block's
context (a plain ``threading.Thread`` starts from an empty one; a task or thread
left running from a block that has ended is in none either) is every open block's:
the threads a test starts are undone with it. See :class:`_Journal`.
"""

from __future__ import annotations

import contextvars
import functools
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, SupportsIndex, TypeVar, cast, overload

from instrumentation import dispatcher as _dispatcher_module
from instrumentation import telemetry
from instrumentation._spans import run_deferred
from instrumentation.context import (
    _active_span,
    _active_tags,
    _propagated,
    _suppressed,
    context_keepers,
)
from instrumentation.dispatcher import Dispatcher, root_dispatcher, root_manager
from instrumentation.event_handlers.base import BaseEventHandler
from instrumentation.events.base import BaseEvent
from instrumentation.span.simple import SimpleSpan
from instrumentation.span_handlers.simple import SimpleSpanHandler

_E = TypeVar("_E", bound=BaseEvent)
_O = TypeVar("_O")


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
#: nesting (two asyncio tasks, two threads, each in its own block): when one ends,
#: the others' handlers stay attached.
_open_captures: dict[int, BaseEventHandler | SimpleSpanHandler] = {}


def _is_capture(handler: object) -> bool:
    return isinstance(handler, (_CapturingEvents, _CapturingSpans))


def _has(handlers: tuple[Any, ...], handler: object) -> bool:
    return any(h is handler for h in handlers)


class _Journal:
    """What the code in one capture block changed in the tree, net of what it undid.

    The dispatcher tells :func:`_note` of each change (``_on_change``, with its lock
    held); the change is the block's when it is made in the block's context, where
    :data:`_journals` holds the block's journal: the block's thread or task, and the
    tasks and threads (``instrumentation.Thread``, ``ContextThreadPoolExecutor``,
    ``asyncio.to_thread``) that start from a copy of it; and when it is made in no
    block's context, as every open block's. Nested blocks each keep the change. Kept
    per handler, as whether it was there before the block first moved it, so that
    attaching and detaching one handler a thousand times keeps nothing. The owners
    are held weakly: a dispatcher made and dropped in the block (one per request,
    ``Dispatcher(...)`` by hand) is freed with its handlers, and what it changed is
    forgotten with it, there being nothing left to undo.
    """

    __slots__ = ("flags", "handlers", "open")

    def __init__(self) -> None:
        #: False once the block has ended: a thread started in it with a copy of its
        #: context, and outliving it, adds nothing more here (see :func:`_note`).
        self.open = True
        #: (id of the dispatcher or manager, attribute) -> (weak reference to the
        #: owner, attribute, {id(handler): (handler, whether it was there, the list it
        #: was taken out of, None for one put in)}), in the order they were moved.
        self.handlers: dict[
            tuple[int, str],
            tuple[weakref.ref[Any], str, dict[int, tuple[Any, bool, tuple[Any, ...] | None]]],
        ] = {}
        #: id of the dispatcher -> (weak reference to it, its ``propagate`` before the
        #: block set it).
        self.flags: dict[int, tuple[weakref.ref[Dispatcher], bool]] = {}

    def note(self, owner: object, attr: str, old: Any, new: Any) -> None:
        if not self.open:
            return
        if attr == "_propagate":
            flag = self.flags.get(id(owner))
            if flag is None:
                self.flags[id(owner)] = (self._watch(cast(Dispatcher, owner)), old)
            elif flag[1] is new:
                del self.flags[id(owner)]  # set back as it was
            return
        key = (id(owner), attr)
        entry = self.handlers.get(key)
        if entry is None:
            entry = self.handlers[key] = (self._watch(owner), attr, {})
        moved = entry[2]
        for handler, there in [
            *((h, False) for h in old if not _has(new, h)),
            *((h, True) for h in new if not _has(old, h)),
        ]:
            was = moved.get(id(handler))
            if was is None:
                moved[id(handler)] = (handler, not there, None if there else old)
            elif was[1] is there:
                del moved[id(handler)]  # back as it was before the block moved it
        if not moved:  # nor the owner: a block making throwaway dispatchers kept them all
            del self.handlers[key]

    def _watch(self, owner: _O) -> weakref.ref[_O]:
        """A weak reference to ``owner`` that forgets its changes when it is freed."""
        return weakref.ref(owner, functools.partial(self._forget, id(owner)))

    def _forget(self, owner_id: int, _freed: object) -> None:
        # Called as the owner is freed, before its id can be another's.
        self.flags.pop(owner_id, None)
        for key in list(self.handlers):
            if key[0] == owner_id:
                self.handlers.pop(key, None)

    def undo(self) -> None:
        """Take off the handlers the block attached and put back those it detached
        where they were in their lists (one rebuild per dispatcher), unless something
        else has since; set ``propagate`` back."""
        with _dispatcher_module._lock:
            self.open = False
            changes: dict[int, tuple[Any, dict[str, tuple[Any, ...]]]] = {}
            for ref, attr, moved in list(self.handlers.values()):
                owner = ref()
                if owner is None:
                    continue
                now: tuple[Any, ...] = getattr(owner, attr)
                added = tuple(
                    h for h, was, _ in moved.values() if not was and id(h) not in _open_captures
                )
                handlers = [h for h in now if not _has(added, h)]
                # The last one taken out first: each goes back into the list as it was
                # when it left, between the same neighbours.
                for h, was, left in reversed(moved.values()):
                    if was and not _has(now, h) and (not _is_capture(h) or id(h) in _open_captures):
                        handlers.insert(_place(handlers, h, cast(tuple[Any, ...], left)), h)
                changes.setdefault(id(owner), (owner, {}))[1][attr] = tuple(handlers)
            for owner, lists in changes.values():
                rebuild = owner._changed if isinstance(owner, Dispatcher) else owner._rebuild_all
                _dispatcher_module._set_lists(owner, lists, rebuild)
            for node_ref, propagate in list(self.flags.values()):
                node = node_ref()
                if node is not None and node.propagate is not propagate:
                    node.propagate = propagate
        self.handlers.clear()
        self.flags.clear()


def _place(handlers: list[Any], handler: Any, left: tuple[Any, ...]) -> int:
    """Where ``handler``, taken out of the list ``left``, goes back into ``handlers``:
    after the nearest handler before it there that is in ``handlers``, else before the
    nearest after it, else at the end (handlers run in list order, and a handler put
    back at the end ran after those it used to run before, in every later test)."""
    at = next(i for i, h in enumerate(left) if h is handler)
    for before in reversed(left[:at]):
        for i, h in enumerate(handlers):
            if h is before:
                return i + 1
    for after in left[at + 1 :]:
        for i, h in enumerate(handlers):
            if h is after:
                return i
    return len(handlers)


#: The journals of the capture blocks this context is in, outermost first; in
#: :func:`keep_changes`, :data:`_KEEP` first, then those of the blocks opened in it
#: since (their ends leave ``(_KEEP,)``: a bare ``()`` left it for None, and what the
#: ``keep_changes()`` block changed after a block nested in it ended was undone by the
#: blocks around it); None in no block's context (never in one, or all ended).
_journals: contextvars.ContextVar[tuple[_Journal, ...] | None] = contextvars.ContextVar(
    "instrumentation_testing_journals", default=None
)

#: What :func:`keep_changes` puts first in :data:`_journals`: the blocks open around
#: it are not told; a journal that is never open.
_KEEP = _Journal()
_KEEP.open = False


def _in_import(frame: FrameType | None) -> bool:
    """Whether ``frame`` or one of its callers is the body of a module being imported:
    what a module sets up at its import, it sets up once in a process, and later tests
    rely on it whichever test imported it first.

    ``spec._initializing`` is importlib's own mark for that (its "partially initialized
    module" error reads it), set on 3.10 to 3.13. No public attribute tells: the module
    is in ``sys.modules``, with the same ``__spec__``, before its body runs and after.
    """
    while frame is not None:
        if frame.f_code.co_name == "<module>":
            spec = frame.f_globals.get("__spec__")
            if getattr(spec, "_initializing", False):  # importlib's mark, while it runs
                return True
        frame = frame.f_back
    return False


#: Every capture block open now, in any thread or task.
_open_journals: list[_Journal] = []


def _note(owner: object, attr: str, old: Any, new: Any) -> None:
    """The dispatcher's ``_on_change``: a change made in capture blocks' context goes
    into their journals; one made outside any block's context (a plain
    ``threading.Thread``, which starts from an empty context, say one the code under
    test started) into every open block's, so that a test's threads are undone too.
    What a module's import sets up goes into none.

    A context whose blocks have all ended (a task or thread started in a block with a
    copy of its context, outliving it) is in no open block's: what it changes is every
    open block's, as a plain thread's is. Ignored, what a test's leftover task changed
    during a later test outlived every block."""
    journals = _journals.get()
    if journals is not None and not all(j.open for j in journals):
        keep = journals[0] is _KEEP
        journals = tuple(j for j in journals if j.open)
        if not journals and not keep:
            journals = None
    if journals is None:
        journals = tuple(_open_journals)
    if journals and not _in_import(sys._getframe(1)):
        for journal in journals:
            journal.note(owner, attr, old, new)


@contextmanager
def keep_changes() -> Iterator[None]:
    """What is attached, detached or set in this block (and in the tasks and threads
    that carry its context) outlives the capture blocks open around it: for set-up a
    test does lazily, at its first use, that later tests rely on."""
    token = _journals.set((_KEEP,))
    try:
        yield
    finally:
        _journals.reset(token)


_dispatcher_module._on_change = _note


def _open_journal() -> _Journal:
    journal = _Journal()
    with _dispatcher_module._lock:  # the changes are noted with it held
        _open_journals.append(journal)
    _journals.set((*(_journals.get() or ()), journal))
    return journal


def _close_journal(journal: _Journal) -> None:
    with _dispatcher_module._lock:
        _open_journals[:] = [j for j in _open_journals if j is not journal]
    # Set, not reset with a token: blocks that overlap without nesting end in any order.
    rest = tuple(j for j in _journals.get() or () if j is not journal)
    _journals.set(rest or None)


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
    """Attach a capture block's ``handler`` for the block; then undo what the block
    changed (see :class:`_Journal`), take the handler off, and put back what
    :class:`_Outside` keeps."""
    outside = _Outside()
    _open_captures[id(handler)] = handler
    attach(handler)
    journal = _open_journal()
    try:
        yield
    finally:
        try:
            run_deferred()  # what a garbage collection put off is part of the block
        finally:
            _close_journal(journal)
            _open_captures.pop(id(handler), None)
            try:
                # Not noted by the other blocks open now: undoing is not a change of theirs.
                with keep_changes():
                    try:
                        journal.undo()
                    finally:
                        detach(handler)
            finally:
                outside.restore()


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


class _Outside:
    """What a capture block puts back besides the tree: ``telemetry.raise_handler_errors``
    (if it differs at the end), and the current span, tags and suppression and what a
    restore received (which ``restore_propagation_context`` sets without a token to
    undo it), with what integrations keep beside them (OpenTelemetry's current
    context). All but the switch are the block's context's own."""

    def __init__(self) -> None:
        self.raise_handler_errors = telemetry.raise_handler_errors
        self.context = (
            _active_span.get(),
            _active_tags.get(),
            _suppressed.get(),
            _propagated.get(),
        )
        self.kept = {keeper: keeper.save() for keeper in context_keepers()}

    def restore(self) -> None:
        if telemetry.raise_handler_errors is not self.raise_handler_errors:
            telemetry.raise_handler_errors = self.raise_handler_errors
        span, tags, suppressed, propagated = self.context
        _active_span.set(span)
        _active_tags.set(tags)
        _suppressed.set(suppressed)
        _propagated.set(propagated)
        for keeper in context_keepers():
            keeper.put_back(self.kept.get(keeper))


class Snapshot:
    """The whole global state, to put back later as it was, whoever changed it since.

    The handler lists and ``propagate`` flags of every dispatcher (one made after the
    snapshot is left as it is; the handlers of capture blocks still open are kept, so
    that blocks may overlap), the tree's taps, ``telemetry.raise_handler_errors``, and
    the current span, tags and suppression (which ``restore_propagation_context`` sets
    without a token to undo it), with what integrations keep beside them
    (OpenTelemetry's current context).

    Unlike the capture blocks, which undo only what was changed in them, this puts
    back every list as it was: what other threads attached or detached meanwhile is
    undone too. For a test suite's own set-up between tests, with nothing else running.
    """

    def __init__(self) -> None:
        with _dispatcher_module._lock:  # looked up each time: re-made after fork
            self.state = {
                name: (node._event_handlers, node._span_handlers, node._propagate)
                for name, node in root_manager.dispatchers.items()
            }
            self.taps = (root_manager.tap_event_handlers, root_manager.tap_span_handlers)
        self.outside = _Outside()

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
        self.outside.restore()


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
        root_manager._update_taps(events_in=(self._events,), spans_in=(self._spans,))

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
        """The block is over: its handlers are no longer kept by others' ends."""
        _open_captures.pop(id(self._events), None)
        _open_captures.pop(id(self._spans), None)

    def _detach(self) -> None:
        root_manager._update_taps(events_out=(self._events,), spans_out=(self._spans,))

    def events_of(self, kind: type[_E] | tuple[type[_E], ...]) -> list[_E]:
        """``events.of(kind)``: the events of one class, typed."""
        return self.events.of(kind)

    def tree(self) -> str:
        run_deferred()
        return self._spans.format_trace_trees()


@contextmanager
def isolated() -> Iterator[Capture]:
    """Record everything in the block, then undo what the block changed, as the capture
    blocks do (see the module's docstring).

    Counters are not zeroed (see :func:`reset_counters`)."""
    outside = _Outside()
    capture = Capture()
    journal = _open_journal()
    try:
        yield capture
    finally:
        try:
            run_deferred()
        finally:
            _close_journal(journal)
            capture._end()
            try:
                with keep_changes():  # as in _open_capture
                    try:
                        journal.undo()
                    finally:
                        capture._detach()
            finally:
                outside.restore()


def reset_counters() -> None:
    telemetry.reset()


def _fixture() -> Iterator[Capture]:
    """The ``instrumentation_capture`` fixture, for both modules that define it
    (:mod:`instrumentation_pytest`, and ``pytest_plugin`` under its former name): the
    counters from zero, then :func:`isolated` around the test."""
    telemetry.reset()
    with isolated() as capture:
        yield capture


__all__ = [
    "Capture",
    "CapturedEvents",
    "CapturedSpans",
    "RecordingEventHandler",
    "Snapshot",
    "capture_events",
    "capture_spans",
    "isolated",
    "keep_changes",
    "reset_counters",
]
