"""Dispatchers and the tree they form.

Dispatchers are named like loggers and form the same kind of tree: ``a.b`` sits
under ``a``, everything under ``root``, whatever order they are created in. Missing
ancestors are held by placeholders that are replaced when the real dispatcher
appears (as ``logging.Manager`` does), and a name that merely shares a prefix with
another ("r" and "root", "ab" and "a") is never taken for its ancestor.

Changing the tree or a handler list takes the module lock; dispatching never does.
Each dispatcher keeps the tuple of handlers its events and spans reach (its own and
its ancestors', until one has ``propagate`` off); every change rebuilds those
tuples, so the hot path reads one attribute.
"""

from __future__ import annotations

import inspect
import os
import sys
import threading
from abc import ABC
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol, SupportsIndex, TypeVar, overload

from typing_extensions import Self

from instrumentation import _aio, _spans, telemetry
from instrumentation import context as _context
from instrumentation._ids import new_trace_id
from instrumentation._spans import (
    EMPTY_BOUND_ARGS,
    Chain,
    _deferred,
    activate_started,
    after,
    after_span_end,
    after_span_end_async,
    dispatch_event,
    end_after_a_stop,
    enter_extras,
    fail,
    finish,
    handle_after_a_stop,
    handle_all,
    must_wait,
    position,
    report_or_raise,
    run_deferred,
    start,
    stops_the_awaiting_caller,
    stops_the_caller,
)
from instrumentation._w3c import SAMPLED, read_baggage, read_traceparent, read_tracestate
from instrumentation._wrap import LLAMA_MARK, MARK, check_span_name, wrap
from instrumentation.context import (
    _EMPTY_TAGS,
    Propagated,
    RemoteSpanContext,
    SpanContext,
    _active_span,
    _active_tags,
    _propagated,
    _suppressed,
    active_instrument_tags,
    active_span_id,
    current_span,
    deactivate,
    forget_manual_trace,
    format_traceparent,
    instrument_tags,
    propagation_in_bridges,
    remember_manual_trace,
    restored_in_bridges,
    sampled_in_bridges,
    span_hex_of,
    span_name_of,
)
from instrumentation.event_handlers.base import BaseEventHandler
from instrumentation.events.base import BaseEvent
from instrumentation.events.span import SpanDropEvent
from instrumentation.span_handlers.base import _SPAN_METHODS, BaseSpanHandler

if TYPE_CHECKING:
    from instrumentation.span_handlers.null import NullSpanHandler
else:  # LlamaIndex's dispatcher module has it; imported at first use (instrumentation._lazy)
    from instrumentation import _lazy

    __getattr__, __dir__ = _lazy.lazy_exports(
        globals(), {"NullSpanHandler": "instrumentation.span_handlers.null"}
    )

F = TypeVar("F", bound=Callable[..., Any])

ROOT_NAME = "root"

#: LlamaIndex's name for the attribute that marks a function as already decorated.
DISPATCHER_SPAN_DECORATED_ATTR = LLAMA_MARK


class EventDispatcher(Protocol):
    """What :meth:`Dispatcher.get_dispatch_event` returns (LlamaIndex's name)."""

    def __call__(self, event: BaseEvent, **kwargs: Any) -> None: ...


_next = next
_events_dispatched = telemetry.EVENTS_DISPATCHED.ticks

#: Guards the tree and every handler list. Re-entrant because a handler's
#: ``close()`` or a placeholder fix-up may come back into the tree while it is held.
_lock = threading.RLock()


#: The threads forking now that hold ``_lock`` for it (see below), by ident: one
#: flag shared by all was cleared by a second fork whose wait timed out while the
#: first's fork went on, and the first then never let go of the lock.
_held_for_fork: list[int] = []


def _take_locks_before_fork() -> None:
    """A change (``_update``, ``propagate``, a new dispatcher) sets a handler list, then
    rebuilds the chains below one by one: a child forked in between kept that list
    with chains half rebuilt, events reaching handlers the tree no longer has and
    missing those it has, until the next change above. The fork waits for the change
    to finish (a bounded while, as ``logging`` does, which waits for ever).

    The drain of put-off ends (see :func:`instrumentation._spans.before_fork`) is
    waited for first: its handlers may make a dispatcher or change one, taking the
    tree's lock, while nothing holding the tree's lock waits for a drain. Taken the
    other way round, such a drain waited for the fork, which waited its whole second
    for the drain."""
    _spans.before_fork()
    if _lock.acquire(timeout=1.0):
        _held_for_fork.append(threading.get_ident())


def _release_locks_after_fork_in_parent() -> None:
    me = threading.get_ident()
    if me in _held_for_fork:
        _held_for_fork.remove(me)
        _lock.release()
    _spans.after_fork_in_parent()


def _reinit_locks_after_fork() -> None:
    global _lock
    _lock = threading.RLock()
    _held_for_fork.clear()
    _spans.after_fork_in_child()


if hasattr(os, "register_at_fork"):  # pragma: no branch
    os.register_at_fork(
        before=_take_locks_before_fork,
        after_in_parent=_release_locks_after_fork_in_parent,
        after_in_child=_reinit_locks_after_fork,
    )


#: Told of each change to a dispatcher's handler lists or ``propagate``, and to a
#: manager's taps, with the lock held, after the change: ``(owner, attribute, old,
#: new)``. The test kit sets it, to undo at the end of a capture block what the code
#: in the block changed (see ``instrumentation.testing``); ``None`` otherwise.
_on_change: Callable[[object, str, Any, Any], None] | None = None


def _noted(owner: object, attr: str, old: Any, new: Any) -> None:
    hook = _on_change
    if hook is not None:
        hook(owner, attr, old, new)


def _update_lists(
    owner: object,
    events: tuple[str, tuple[Any, ...], tuple[Any, ...]],
    spans: tuple[str, tuple[Any, ...], tuple[Any, ...]],
    rebuild: Callable[[], None],
) -> None:
    """Take handlers out of ``owner``'s two lists and put others in (``(attribute,
    in, out)`` each; by identity, each once), then ``rebuild`` once, or not at all when
    nothing changed; the test kit is told of each list changed."""
    with _lock:
        _set_lists(
            owner,
            {
                attr: _updated(getattr(owner, attr), put_in, take_out)
                for attr, put_in, take_out in (events, spans)
            },
            rebuild,
        )


def _set_lists(
    owner: object, lists: Mapping[str, tuple[Any, ...] | None], rebuild: Callable[[], None]
) -> None:
    """Give ``owner``'s handler lists the tuples ``lists`` has for them (None: as it is),
    then ``rebuild`` once, or not at all when nothing changed; the test kit is told of
    each list changed. The test kit puts handlers back where they were through it."""
    with _lock:
        changed = []
        for attr, new in lists.items():
            old = getattr(owner, attr)
            if new is not None and (
                len(new) != len(old) or any(a is not b for a, b in zip(new, old, strict=True))
            ):
                setattr(owner, attr, new)
                changed.append((attr, old, new))
        if not changed:
            return
        rebuild()
        for attr, old, new in changed:
            _noted(owner, attr, old, new)


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(
            "a dispatcher name must be a str such as __name__ or 'myapp.db'; "
            f"got {type(name).__name__}"
        )
    if not name or any(part == "" or part.strip() != part for part in name.split(".")):
        raise ValueError(
            f"a dispatcher name is dot-separated non-empty parts without surrounding spaces "
            f"(like 'myapp.db'); got {name!r}"
        )
    return name


_H = TypeVar("_H")


class HandlerList(list[_H]):
    """A dispatcher's own handlers as a list; changing it changes the dispatcher.

    LlamaIndex keeps handlers in plain lists that code appends to and removes from.
    The dispatcher itself keeps a tuple (so that dispatching needs no lock), and each
    change made through this list is applied to the dispatcher's current handlers,
    checked, and re-links the handler chains, as ``add_*_handler`` does.
    """

    __slots__ = ("_assigned_back", "_attr", "_owner")

    def __init__(self, owner: Dispatcher, attr: str) -> None:
        super().__init__(getattr(owner, attr))
        self._owner = owner
        self._attr = attr
        self._assigned_back = False

    def _apply(self, change: Callable[[list[_H]], Any], *, by_position: bool = False) -> Any:
        owner, attr = self._owner, self._attr
        with _lock:
            # From the dispatcher's handlers as they are now, not as they were when
            # this list was made: another thread may have added one meanwhile.
            current: tuple[_H, ...] = getattr(owner, attr)
            if by_position and (
                len(current) != len(self)
                or any(a is not b for a, b in zip(current, self, strict=True))
            ):
                # A position in this list may name another handler by now.
                raise RuntimeError(
                    f"{owner.name!r}'s {attr[1:]} changed since this list was read; "
                    f"read dispatcher.{attr[1:]} again, or use append/remove"
                )
            handlers = list(current)
            result = change(handlers)
            owner._set_own(attr, handlers)
            list.__init__(self, getattr(owner, attr))
        return result

    def _position(
        self,
        handlers: list[_H],
        handler: object,
        start: SupportsIndex = 0,
        stop: SupportsIndex = 2**62,
    ) -> int:
        # By identity: two handlers of one class with the same fields compare equal.
        for i in range(*slice(start, stop).indices(len(handlers))):
            if list.__getitem__(handlers, i) is handler:
                return i
        raise ValueError(f"{handler!r} is not among {self._owner.name!r}'s {self._attr[1:]}")

    def append(self, handler: _H) -> None:
        self._apply(lambda hs: hs.append(handler))

    def extend(self, handlers: Iterable[_H]) -> None:
        more = list(handlers)
        self._apply(lambda hs: hs.extend(more))

    def insert(self, index: SupportsIndex, handler: _H) -> None:
        self._apply(lambda hs: hs.insert(index, handler), by_position=True)

    def remove(self, handler: _H) -> None:
        self._apply(lambda hs: hs.pop(self._position(hs, handler)))

    def pop(self, index: SupportsIndex = -1) -> _H:
        popped: _H = self._apply(lambda hs: hs.pop(index), by_position=True)
        return popped

    def clear(self) -> None:
        self._apply(lambda hs: hs.clear())

    def sort(self, *args: Any, **kwargs: Any) -> None:
        self._apply(lambda hs: hs.sort(*args, **kwargs))

    def reverse(self) -> None:
        self._apply(lambda hs: hs.reverse())

    def __setitem__(self, index: Any, value: Any) -> None:
        whole = isinstance(index, slice) and index == slice(None)
        self._apply(lambda hs: hs.__setitem__(index, value), by_position=not whole)

    def __delitem__(self, index: Any) -> None:
        whole = isinstance(index, slice) and index == slice(None)
        self._apply(lambda hs: hs.__delitem__(index), by_position=not whole)

    def __iadd__(self, handlers: Iterable[_H]) -> Self:  # type: ignore[override,misc]
        self.extend(handlers)
        self._assigned_back = True  # what Python does next: see Dispatcher._set_own
        return self

    def __imul__(self, times: SupportsIndex) -> Self:
        self._apply(lambda hs: hs.__imul__(times))
        self._assigned_back = True
        return self

    def __contains__(self, handler: object) -> bool:
        return any(h is handler for h in self)

    def index(self, handler: _H, start: SupportsIndex = 0, stop: SupportsIndex = 2**62) -> int:
        return self._position(self, handler, start, stop)

    def count(self, handler: _H) -> int:
        return sum(1 for h in self if h is handler)

    def __reduce__(self) -> tuple[Any, ...]:
        return (list, (list(self),))


class _PlaceHolder:
    """Stands for a missing ancestor and remembers the dispatchers below it."""

    __slots__ = ("children",)

    def __init__(self, child: Dispatcher) -> None:
        self.children: dict[int, Dispatcher] = {id(child): child}


_SHUTDOWN_ERROR_TEXT = "instrumentation shut down while the span was open"


class Dispatcher:
    """Emits events and spans to its handlers and, unless ``propagate`` is off, its ancestors'.

    Get one with :func:`get_dispatcher` (``get_dispatcher(__name__)`` in each module).
    One made directly is not in the tree, and reaches only its own handlers, unless
    it is given ``manager=root_manager``.
    """

    __slots__ = (
        "__weakref__",
        "_ev",
        "_event_handlers",
        "_hot",
        "_manager",
        "_parent",
        "_parent_name_given",
        "_propagate",
        "_span_handlers",
        "name",
    )

    def __init__(
        self,
        name: str = ROOT_NAME,
        event_handlers: Iterable[BaseEventHandler] = (),
        span_handlers: Iterable[BaseSpanHandler[Any]] = (),
        parent_name: str | None = None,
        manager: Manager | None = None,
        root_name: str = ROOT_NAME,
        propagate: bool = True,
        *,
        current_span_ids: object = None,
    ) -> None:
        """LlamaIndex's arguments, in its order: ``manager`` puts the dispatcher in
        that manager's tree at once (as ``get_dispatcher`` would); ``parent_name``, if
        given, must be the parent the dotted name gives when the dispatcher joins the
        tree (a ``ValueError`` then says so); ``current_span_ids`` is ignored (current
        spans live in context variables here)."""
        self.name = _check_name(name)
        if not isinstance(propagate, bool):
            raise TypeError(f"propagate is True or False, got {propagate!r}")
        if root_name != ROOT_NAME:
            raise ValueError(
                f"the root dispatcher is called {ROOT_NAME!r}; got root_name={root_name!r}"
            )
        if isinstance(parent_name, bool):
            raise TypeError(
                f"the 4th argument is parent_name (LlamaIndex's order: name, "
                f"event_handlers, span_handlers, parent_name, manager, root_name, "
                f"propagate); got {parent_name!r}: pass propagate={parent_name!r} by keyword"
            )
        if parent_name is not None and not isinstance(parent_name, str):
            raise TypeError(f"parent_name is a dispatcher name (str); got {parent_name!r}")
        if manager is not None and not isinstance(manager, Manager):
            raise TypeError(
                f"manager is a Manager (such as root_manager); got {type(manager).__name__}"
            )
        self._event_handlers: tuple[BaseEventHandler, ...] = tuple(
            _check_event_handler(h) for h in event_handlers
        )
        self._span_handlers: tuple[BaseSpanHandler[Any], ...] = tuple(
            _check_span_handler(h) for h in span_handlers
        )
        self._propagate = propagate
        self._parent: Dispatcher | None = None
        self._manager: Manager | None = None
        self._ev: tuple[BaseEventHandler, ...] = ()
        self._hot: Chain | None = None
        self._rebuild()
        self._parent_name_given = parent_name or None
        if manager is not None:
            self._join(manager)

    # -- the tree -------------------------------------------------------------------

    @property
    def parent(self) -> Dispatcher | None:
        """The nearest existing ancestor (``None`` for the root)."""
        return self._parent

    @property
    def parent_name(self) -> str:
        return "" if self._parent is None else self._parent.name

    @property
    def root(self) -> Dispatcher:
        node = self
        while node._parent is not None:
            node = node._parent
        return node

    @property
    def root_name(self) -> str:
        return self.root.name

    @property
    def manager(self) -> Manager | None:
        return self._manager

    @manager.setter
    def manager(self, manager: Manager) -> None:
        """LlamaIndex's field, set after ``add_dispatcher`` by code written for it: the
        same manager changes nothing; a dispatcher in no tree joins ``manager``'s, as
        ``manager.add_dispatcher`` would. A dispatcher leaves no tree for another."""
        if manager is self._manager:
            return
        if not isinstance(manager, Manager):
            raise TypeError(
                f"manager is a Manager (such as root_manager); got {type(manager).__name__}"
            )
        if self._manager is not None:
            raise ValueError(
                f"dispatcher {self.name!r} is in a tree already, and stays in it; make "
                "another dispatcher for the other tree"
            )
        self._join(manager)

    def _join(self, manager: Manager) -> None:
        """Put this dispatcher in ``manager``'s tree, unless its name is taken there."""
        manager.add_dispatcher(self)
        if manager.dispatchers.get(self.name) is not self:
            raise ValueError(
                f"the tree already has a dispatcher {self.name!r}: use "
                f"get_dispatcher({self.name!r}) (or manager.dispatchers[{self.name!r}]) "
                "to get it"
            )

    @property
    def current_span_ids(self) -> dict[Any, str]:
        """LlamaIndex's field, kept for code that reads it: the current span by dispatcher
        name (an empty dict when no span is current)."""
        span = _active_span.get()
        return {} if span is None else {self.name: span.id_}

    def get_dispatch_event(self) -> EventDispatcher:
        """LlamaIndex's older spelling: the dispatcher's :meth:`event`."""
        return self.event

    @property
    def log_name(self) -> str:
        return self.name

    @property
    def is_listening(self) -> bool:
        """Whether a handler (its own or an ancestor's) would see this dispatcher's
        events and spans here and now; producers check it to skip building events."""
        return self._hot is not None and not _suppressed.get()

    @property
    def propagate(self) -> bool:
        """Whether events and spans also reach the ancestors' handlers."""
        return self._propagate

    @propagate.setter
    def propagate(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"propagate is True or False, got {value!r}")
        with _lock:
            old, self._propagate = self._propagate, value
            self._changed()
            if old is not value:
                _noted(self, "_propagate", old, value)

    # -- handlers -------------------------------------------------------------------

    @property
    def event_handlers(self) -> HandlerList[BaseEventHandler]:
        """This dispatcher's own event handlers, as a list that may be changed in place
        (``d.event_handlers.append(h)``, as LlamaIndex code does) or replaced."""
        return HandlerList(self, "_event_handlers")

    @event_handlers.setter
    def event_handlers(self, handlers: Iterable[BaseEventHandler]) -> None:
        self._set_own("_event_handlers", handlers)

    @property
    def span_handlers(self) -> HandlerList[BaseSpanHandler[Any]]:
        """This dispatcher's own span handlers, as a list that may be changed in place
        (``d.span_handlers.append(h)``, as LlamaIndex code does) or replaced."""
        return HandlerList(self, "_span_handlers")

    @span_handlers.setter
    def span_handlers(self, handlers: Iterable[BaseSpanHandler[Any]]) -> None:
        self._set_own("_span_handlers", handlers)

    def _set_own(self, attr: str, handlers: Iterable[Any]) -> None:
        if (
            isinstance(handlers, HandlerList)
            and handlers._owner is self
            and handlers._attr == attr
            and handlers._assigned_back
        ):
            # ``d.span_handlers += [h]`` assigns the list back after changing it in
            # place: the change is made already, and the list may be stale by now.
            handlers._assigned_back = False
            return
        check = _check_event_handler if attr == "_event_handlers" else _check_span_handler
        checked = tuple(check(h) for h in handlers)
        with _lock:
            old = getattr(self, attr)
            setattr(self, attr, checked)
            self._changed()
            _noted(self, attr, old, checked)

    def add_event_handler(self, handler: BaseEventHandler) -> None:
        """Attach ``handler``; attaching the same handler twice is a no-op."""
        self._update(events_in=(_check_event_handler(handler),))

    def add_span_handler(self, handler: BaseSpanHandler[Any]) -> None:
        """Attach ``handler``; attaching the same handler twice is a no-op."""
        self._update(spans_in=(_check_span_handler(handler),))

    def remove_event_handler(self, handler: BaseEventHandler) -> None:
        """Detach ``handler``; a handler that is not attached is ignored."""
        self._update(events_out=(handler,))

    def remove_span_handler(self, handler: BaseSpanHandler[Any]) -> None:
        """Detach ``handler``; a handler that is not attached is ignored."""
        self._update(spans_out=(handler,))

    def _attach_together(
        self, event_handler: BaseEventHandler, span_handler: BaseSpanHandler[Any]
    ) -> None:
        """Attach both, with one rebuild of the chains below (none if both are there):
        for the library's own pairs, the audit collector's, attached for requests. Each
        change rebuilds the chain of every dispatcher below, milliseconds in a tree of
        thousands."""
        self._update(events_in=(event_handler,), spans_in=(span_handler,))

    def _detach_together(
        self, event_handler: BaseEventHandler, span_handler: BaseSpanHandler[Any]
    ) -> None:
        """Detach both, with one rebuild of the chains below (none if neither is there)."""
        self._update(events_out=(event_handler,), spans_out=(span_handler,))

    def _update(
        self,
        *,
        events_in: tuple[Any, ...] = (),
        spans_in: tuple[Any, ...] = (),
        events_out: tuple[Any, ...] = (),
        spans_out: tuple[Any, ...] = (),
    ) -> None:
        """Take handlers out and put others in (by identity, each once), rebuilding the
        chains below once, and not at all when nothing changed."""
        _update_lists(
            self,
            ("_event_handlers", events_in, events_out),
            ("_span_handlers", spans_in, spans_out),
            self._changed,
        )

    def _changed(self) -> None:
        # Only the chains of this dispatcher and those below it include its handlers
        # and depend on its ``propagate``: rebuilding every chain in the tree made each
        # change cost milliseconds in an application with a thousand dispatchers.
        if self._manager is not None:
            self._manager._rebuild_below(self)
        else:
            self._rebuild()

    def _rebuild(self, shared: dict[tuple[int, ...], tuple[Any, ...]] | None = None) -> None:
        """Recompute the handler chains (called with the lock held); ``shared`` is what
        the chains rebuilt together share (see :class:`Chain`)."""
        events: list[BaseEventHandler] = []
        spans: list[BaseSpanHandler[Any]] = []
        node: Dispatcher | None = self
        # Most dispatchers have no handlers of their own: an empty tuple is skipped
        # rather than filtered (each change rebuilds every chain below it).
        while node is not None:
            if node._event_handlers:
                events.extend(h for h in node._event_handlers if not any(h is e for e in events))
            if node._span_handlers:
                spans.extend(h for h in node._span_handlers if not any(h is s for s in spans))
            if not node._propagate:
                break
            node = node._parent
        manager = self._manager
        if manager is not None:
            if manager.tap_event_handlers:
                events.extend(
                    h for h in manager.tap_event_handlers if not any(h is e for e in events)
                )
            if manager.tap_span_handlers:
                spans.extend(h for h in manager.tap_span_handlers if not any(h is s for s in spans))
        self._ev = tuple(events)
        self._hot = (
            Chain(self.name, self._ev, tuple(spans), self, shared) if events or spans else None
        )

    # -- events ---------------------------------------------------------------------

    def event(self, event: BaseEvent, **kwargs: Any) -> None:
        """Send ``event`` to the handlers; the active tags are merged into its ``tags``."""
        if not isinstance(event, BaseEvent):
            raise _not_an_event("event", event)
        handlers = self._ev
        if not handlers or _suppressed.get():
            return
        tags = _active_tags.get()
        if tags:
            own = event.tags
            for key, value in tags.items():
                own.setdefault(key, value)
        # Sent from a generator's ``finally`` as the garbage collector frees it, maybe
        # inside a handler holding its lock, or while what was put off is made on
        # another thread: handled after those (see instrumentation._spans).
        if (_deferred or _spans._collecting is not None) and must_wait(
            "handle", event.id_, partial(dispatch_event, handlers, event, kwargs)
        ):
            return
        _next(_events_dispatched)
        for handler in handlers:
            try:
                # Without keywords, no empty dict is built for each handler call.
                if kwargs:
                    handler.handle(event, **kwargs)
                else:
                    handler.handle(event)
            except BaseException as exc:
                if stops_the_caller(exc):
                    handle_after_a_stop(handlers, handler, event, kwargs, "handle")
                    raise
                telemetry.report_handler_error(handler, "handle", event.class_name(), exc)

    async def aevent(self, event: BaseEvent, **kwargs: Any) -> None:
        """Like :meth:`event`, awaiting the handlers' own ``ahandle`` methods side by
        side (each in a task, as LlamaIndex does), so that a slow one does not hold up
        the others; ``aevent`` returns when all are done, and raises a stop one of them
        raised (Ctrl-C, ``sys.exit()``) then."""
        if not isinstance(event, BaseEvent):
            raise _not_an_event("aevent", event)
        handlers = self._ev
        if not handlers or _suppressed.get():
            return
        tags = _active_tags.get()
        if tags:
            for key, value in tags.items():
                event.tags.setdefault(key, value)
        telemetry.EVENTS_DISPATCHED.inc()
        # Handlers that keep BaseEventHandler's ahandle (which calls handle) never
        # wait: with only those, they run here, in order, without a task, under any
        # event loop or none. Otherwise each runs in its own task, started in order.
        if all(type(h).ahandle is _DEFAULT_AHANDLE for h in handlers):
            handle_all(handlers, event, kwargs, "ahandle")
            return
        stops: list[BaseException] = []
        try:
            if len(handlers) == 1:  # nothing to run beside it: no task to make
                await _ahandle(handlers[0], event, kwargs, stops)
            else:
                import asyncio  # here, not at import: only an awaited aevent needs it

                await asyncio.gather(*[_ahandle(h, event, kwargs, stops) for h in handlers])
        finally:
            # Also when the caller's task was cancelled as it waited for the others
            # (a timeout): the stop wins, the cancellation its __context__.
            if stops:
                raise stops[0]

    # -- spans by hand --------------------------------------------------------------

    def span_enter(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        parent_id: str | None = None,
        tags: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Tell the span handlers that span ``id_`` started (it is not made current)."""
        if not isinstance(id_, str):
            raise _not_a_span_id("span_enter", id_)
        if (_deferred or _spans._collecting is not None) and must_wait(
            "span_enter",
            id_,
            partial(self.span_enter, id_, bound_args, instance, parent_id, tags, **kwargs),
        ):
            return
        chain = self._hot
        if chain is None:
            return
        if "trace_id" not in kwargs:
            parent = _active_span.get()
            kwargs["trace_id"] = parent.trace_id if parent is not None else new_trace_id()
        remember_manual_trace(id_, kwargs["trace_id"])
        kwargs.setdefault("name", span_name_of(id_))
        kwargs.setdefault("dispatcher", self.name)
        kwargs.setdefault("attributes", None)
        telemetry.SPANS_STARTED.inc()
        for handler in chain.spans:
            extras = enter_extras(type(handler))
            try:
                handler.span_enter(
                    id_=id_,
                    bound_args=bound_args,
                    instance=instance,
                    parent_id=parent_id,
                    tags=tags,
                    **(kwargs if extras is None else {k: kwargs[k] for k in extras}),
                )
            except BaseException as exc:
                if stops_the_caller(exc):  # dropped where it started, as a call's span is
                    telemetry.SPANS_DROPPED.inc()
                    forget_manual_trace(id_)
                    told = chain.spans[: position(chain, handler) + 1]
                    end_after_a_stop(
                        told, "span_drop", id_, bound_args=bound_args, instance=instance, err=exc
                    )
                    raise
                telemetry.report_handler_error(handler, "span_enter", id_, exc)

    def span_exit(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        result: Any | None = None,
        **kwargs: Any,
    ) -> None:
        """Tell the span handlers that span ``id_`` ended with ``result``."""
        if not isinstance(id_, str):
            raise _not_a_span_id("span_exit", id_)
        if (_deferred or _spans._collecting is not None) and must_wait(
            "span_exit",
            id_,
            partial(self.span_exit, id_, bound_args, instance, result, **kwargs),
        ):
            return
        forget_manual_trace(id_)
        chain = self._hot
        if chain is None:
            return
        telemetry.SPANS_ENDED.inc()
        for handler in chain.spans:
            try:
                handler.span_exit(
                    id_=id_, bound_args=bound_args, instance=instance, result=result, **kwargs
                )
            except BaseException as exc:
                if stops_the_caller(exc):  # the handlers after it end the span all the same
                    end_after_a_stop(
                        after(chain, handler),
                        "span_exit",
                        id_,
                        bound_args=bound_args,
                        instance=instance,
                        result=result,
                        **kwargs,
                    )
                    raise
                telemetry.report_handler_error(handler, "span_exit", id_, exc)
        if chain.afters:
            after_span_end(chain, id_)

    def span_drop(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        err: BaseException | None = None,
        **kwargs: Any,
    ) -> None:
        """Tell the span handlers that span ``id_`` ended early because of ``err``."""
        if not isinstance(id_, str):
            raise _not_a_span_id("span_drop", id_)
        if (_deferred or _spans._collecting is not None) and must_wait(
            "span_drop", id_, partial(self.span_drop, id_, bound_args, instance, err, **kwargs)
        ):
            return
        forget_manual_trace(id_)
        chain = self._hot
        if chain is None:
            return
        telemetry.SPANS_DROPPED.inc()
        for handler in chain.spans:
            try:
                handler.span_drop(
                    id_=id_, bound_args=bound_args, instance=instance, err=err, **kwargs
                )
            except BaseException as exc:
                if stops_the_caller(exc):  # the handlers after it end the span all the same
                    end_after_a_stop(
                        after(chain, handler),
                        "span_drop",
                        id_,
                        bound_args=bound_args,
                        instance=instance,
                        err=err,
                        **kwargs,
                    )
                    raise
                telemetry.report_handler_error(handler, "span_drop", id_, exc)
        if chain.afters:
            after_span_end(chain, id_)

    # -- the decorator and the block --------------------------------------------------

    @overload
    def span(
        self,
        func: F,
        *,
        name: str | None = None,
        request: bool = False,
        attributes: Mapping[str, Any] | None = None,
    ) -> F: ...

    @overload
    def span(
        self,
        func: str,
        *,
        tags: Mapping[str, Any] | None = None,
        request: bool = False,
        attributes: Mapping[str, Any] | None = None,
    ) -> SpanBlock: ...

    @overload
    def span(
        self,
        func: None = None,
        *,
        name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        request: bool = False,
        attributes: Mapping[str, Any] | None = None,
    ) -> SpanBlock: ...

    def span(
        self,
        func: Any = None,
        *,
        name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        request: bool = False,
        attributes: Mapping[str, Any] | None = None,
    ) -> Any:
        """Trace calls of a function, or a block of code.

        - ``@dispatcher.span`` on a function, method, coroutine, generator or async
          generator: each call is a span.
        - ``@dispatcher.span(name=..., request=True, attributes={...})``: the same with
          options; ``request=True`` marks the span as one user request (see
          ``instrumentation.audit``) and ``attributes`` reach the span handlers.
        - ``with dispatcher.span("name"):`` / ``async with``: the block is a span.
        """
        attrs = _merge_attributes(attributes, request)
        if func is None:
            return SpanBlock(self, name, tags, attrs)
        if isinstance(func, str):
            if name is not None:
                raise TypeError("give the span's name once: span('name') or span(name='name')")
            return SpanBlock(self, func, tags, attrs)
        if tags is not None:
            raise TypeError(
                "tags= applies to span blocks; for decorated calls use instrument_tags()"
            )
        return wrap(self, func, name, attrs)

    # -- propagation ------------------------------------------------------------------

    def capture_propagation_context(self) -> dict[str, Any]:
        """The current trace as a JSON-able dict, to continue it in another process.

        Holds a W3C ``traceparent``, the active span id, the active tags, and whatever
        the span handlers add; when known, also the W3C ``tracestate`` and ``baggage``
        header values (OpenTelemetry's, with its bridge; else those a restore received,
        forwarded unchanged). Pass it to :meth:`restore_propagation_context` there.
        """
        out: dict[str, Any] = {}
        chain = self._hot
        for handler in chain.spans if chain is not None else ():
            try:
                out.update(handler.capture_propagation_context())
            except BaseException as exc:
                report_or_raise(handler, "capture_propagation_context", self.name, exc)
        span = current_span()
        flags, tracestate, baggage = propagation_in_bridges(span)
        received = _propagated.get()
        if received is not None:  # what a restore here received, where no bridge knows
            if span is not None and received.trace_id == span.trace_id:
                if flags is None:
                    flags = received.flags
                if tracestate is None:
                    tracestate = received.tracestate
            if baggage is None:
                baggage = received.baggage
        # All three keys are always there, so that restoring a context captured outside
        # any span, or without tags, also clears what an earlier restore left current.
        if span is not None:
            if flags is None:
                flags = SAMPLED
            sampled = bool(flags & SAMPLED) and sampled_in_bridges()
            out["traceparent"] = format_traceparent(span.trace_id, span.span_hex, sampled, flags)
            if tracestate:
                out["tracestate"] = tracestate
        else:  # unless a handler's bridge knows another system's current span
            out.setdefault("traceparent", None)
        out["active_span_id"] = None if span is None else span.id_
        tags = _active_tags.get()
        out["instrument_tags"] = dict(tags) if isinstance(tags, Mapping) else {}
        if baggage:
            out["baggage"] = baggage
        return out

    def restore_propagation_context(self, context: Mapping[str, Any]) -> None:
        """Continue the trace captured by :meth:`capture_propagation_context`.

        Spans started afterwards in this context (thread, task) are children of the
        captured span, in its trace, with its tags. The ``traceparent``'s flags (its
        sampling decision), ``tracestate`` and ``baggage`` go with the span: sent on by
        :meth:`capture_propagation_context` here, and made current in OpenTelemetry's
        context when its bridge is in use. Absent, there are none. A ``baggage`` with no
        span key (W3C Baggage does not need a trace) replaces only the baggage.
        """
        if not isinstance(context, Mapping):
            raise TypeError(
                f"restore_propagation_context() takes the dict that capture_propagation_context() "
                f"returned; got {type(context).__name__}"
            )
        # Everything is checked before anything changes: a rejected context leaves the
        # current span, the tags and the handlers as they were.
        # A key that is not there leaves its part as it is (as in LlamaIndex); what
        # capture_propagation_context() gives always has both. tracestate and baggage
        # belong to the span's part: restored (absent: cleared) with it.
        parent: RemoteSpanContext | None = None
        traceparent = context.get("traceparent")
        span_id = context.get("active_span_id")
        if span_id is not None and not isinstance(span_id, str):
            raise TypeError(f"active_span_id must be a str or None, got {type(span_id).__name__}")
        tracestate = read_tracestate(context.get("tracestate"))
        baggage = read_baggage(context.get("baggage"))
        flags = SAMPLED
        if traceparent is not None:
            trace_id, span_hex, flags = read_traceparent(traceparent)
            if span_id is None or span_hex_of(span_id) != span_hex:
                span_id = span_hex
            parent = RemoteSpanContext(span_id, trace_id, None, None)
        else:
            tracestate = None  # W3C: it goes with a traceparent only
            if span_id is not None:  # LlamaIndex's own key alone: the trace is not known
                parent = RemoteSpanContext(span_id, new_trace_id(), None, None)
        sets_span = "traceparent" in context or "active_span_id" in context
        tags = context.get("instrument_tags")
        if tags and not isinstance(tags, Mapping):
            raise TypeError(f"instrument_tags must be a mapping, got {type(tags).__name__}")
        chain = self._hot
        for handler in chain.spans if chain is not None else ():
            try:
                handler.restore_propagation_context(dict(context))
            except BaseException as exc:
                report_or_raise(handler, "restore_propagation_context", self.name, exc)
        if sets_span:
            _active_span.set(parent)
            _propagated.set(
                None
                if parent is None and baggage is None
                else Propagated(
                    None if parent is None else parent.trace_id, flags, tracestate, baggage
                )
            )
            restored_in_bridges(parent, bool(flags & SAMPLED))
        elif "baggage" in context:
            _restore_baggage_alone(baggage)
        if "instrument_tags" in context:
            _active_tags.set(dict(tags) if tags else _EMPTY_TAGS)

    # -- shutting down ----------------------------------------------------------------

    def shutdown(self) -> None:
        """Drop open spans, close and detach the handlers of this dispatcher and those below
        (for the root, also the handlers that tap the whole tree). A handler also
        attached outside this subtree is only detached from it: it goes on serving there.

        Safe to call twice: the second call finds nothing attached. Spans dropped here
        are counted in ``telemetry.SPANS_DROPPED_BY_SHUTDOWN``.
        """
        # Ends put off (a generator the garbage collector closed, say) reach the
        # handlers before they are closed.
        run_deferred()
        with _lock:
            manager = self._manager
            nodes = [self] if manager is None else manager._subtree(self)
            event_handlers: list[BaseEventHandler] = []
            span_handlers: list[BaseSpanHandler[Any]] = []
            # What was taken off, for the test kit (see _on_change), told once rebuilt.
            detached: list[tuple[object, str, tuple[Any, ...]]] = []
            for node in nodes:
                for attr, found in (
                    ("_event_handlers", node._event_handlers),
                    ("_span_handlers", node._span_handlers),
                ):
                    if found:
                        detached.append((node, attr, found))
                event_handlers.extend(node._event_handlers)
                span_handlers.extend(node._span_handlers)
                node._event_handlers = ()
                node._span_handlers = ()
            if manager is not None and manager.root is self:  # the whole tree: taps too
                detached.append((manager, "tap_event_handlers", manager.tap_event_handlers))
                detached.append((manager, "tap_span_handlers", manager.tap_span_handlers))
                event_handlers.extend(manager.tap_event_handlers)
                span_handlers.extend(manager.tap_span_handlers)
                manager.tap_event_handlers = manager.tap_span_handlers = ()
            if manager is not None and manager.root is not self:
                # A handler also attached outside this subtree goes on serving there:
                # it is detached here, not closed, and its open spans are not ours to drop.
                elsewhere = manager._attached_handler_ids()
                event_handlers = [h for h in event_handlers if id(h) not in elsewhere]
                span_handlers = [h for h in span_handlers if id(h) not in elsewhere]
            self._changed()
            for owner, attr, found in detached:
                if found:
                    _noted(owner, attr, found, ())
        error = RuntimeError(_SHUTDOWN_ERROR_TEXT)
        closed: list[object] = []
        dropped: set[str] = set()  # a span open in two handlers is one span dropped
        for handler in span_handlers:
            if any(handler is c for c in closed):
                continue
            closed.append(handler)
            open_spans = getattr(handler, "open_spans", {})
            # A call may end one of these spans on its thread while it is dropped here:
            # each end claims the span first (see BaseSpanHandler._claim_end), and the
            # claim is held until the drop is noted, so that the handler sees one end.
            claim = handler._claim_end if isinstance(handler, BaseSpanHandler) else None
            for span_id in list(open_spans):
                claimed = claim(span_id) if claim is not None else False
                if claimed is None:
                    continue  # its call is ending it now, on another thread
                try:
                    if span_id not in open_spans:
                        continue  # its call ended meanwhile, on another thread
                    outcome = handler.span_drop(id_=span_id, bound_args=EMPTY_BOUND_ARGS, err=error)
                except BaseException as exc:
                    report_or_raise(handler, "span_drop", span_id, exc)
                else:
                    if outcome is False:
                        continue  # it ended meanwhile: nothing was dropped
                    if isinstance(handler, BaseSpanHandler):
                        handler._dropped_at_shutdown(span_id)
                    if span_id not in dropped:
                        dropped.add(span_id)
                        telemetry.SPANS_DROPPED_BY_SHUTDOWN.inc()
                finally:
                    if claimed:
                        handler._release_end(span_id)
            _close(handler)
        for ev_handler in event_handlers:
            if not any(ev_handler is c for c in closed):
                closed.append(ev_handler)
                _close(ev_handler)

    def __reduce_ex__(self, protocol: SupportsIndex) -> str | tuple[Any, ...]:
        """Pickled by name, as ``logging.Logger`` is: a dispatcher of the tree handed to
        a process started with ``spawn`` or ``forkserver`` (the default on macOS and
        Windows) is that process's dispatcher of the same name, with that process's
        handlers. Pickled whole, it came back detached (its events reached no handler),
        or not at all (a handler holding a lock). Copies are the dispatcher itself."""
        if self._manager is root_manager and root_manager._nodes.get(self.name) is self:
            return (get_dispatcher, (self.name,))
        return super().__reduce_ex__(protocol)

    def __repr__(self) -> str:
        return (
            f"<Dispatcher {self.name!r} parent={self.parent_name!r} propagate={self._propagate} "
            f"event_handlers={len(self._event_handlers)} span_handlers={len(self._span_handlers)}>"
        )


_DEFAULT_AHANDLE = BaseEventHandler.ahandle


async def _ahandle(
    handler: BaseEventHandler,
    event: BaseEvent,
    kwargs: dict[str, Any],
    stops: list[BaseException],
) -> None:
    """Await ``handler.ahandle(event)``; a stop (see :func:`stops_the_caller`) is put
    in ``stops``, for :meth:`Dispatcher.aevent` to raise once the others are done: raised
    in a task of ``gather``, it stopped the event loop there and then, out of reach of
    the caller's ``except``, and the handlers beside it never had the event. (Returned
    as ``gather``'s result, it was lost when the caller's task was cancelled meanwhile.)"""
    try:
        await handler.ahandle(event, **kwargs)
    except BaseException as exc:
        if stops_the_caller(exc):
            stops.append(exc)
        elif stops_the_awaiting_caller(exc):
            raise
        else:
            telemetry.report_handler_error(handler, "ahandle", event.class_name(), exc)


def _restore_baggage_alone(baggage: str | None) -> None:
    """Restore a context that has ``baggage`` and no span key: the baggage is replaced,
    the current span (with its flags and ``tracestate``) stays.

    W3C Baggage is independent of Trace Context, and OpenTelemetry's propagators read a
    ``baggage`` header that came without a ``traceparent``; ignoring it lost what the
    sender set. The entries stay baggage: they are not made tags, which would copy
    whatever a caller sends into every span.
    """
    received = _propagated.get() or Propagated(None, SAMPLED, None, None)
    received = received._replace(baggage=baggage)
    _propagated.set(None if received.trace_id is None and baggage is None else received)
    span = _active_span.get()
    restored_in_bridges(
        span if span is not None and span.remote else None, bool(received.flags & SAMPLED)
    )


def _close(handler: Any) -> None:
    try:
        handler.close()
    except BaseException as exc:
        report_or_raise(handler, "close", "shutdown", exc)


def _merge_attributes(attributes: Mapping[str, Any] | None, request: bool) -> dict[str, Any] | None:
    if attributes is not None and not isinstance(attributes, Mapping):
        raise TypeError(f"attributes must be a mapping, got {type(attributes).__name__}")
    if not request:
        return dict(attributes) if attributes else None
    return {**(attributes or {}), "request": True}


def _got(handler: object, own_base: type, other_kind: type, other: str, add_other: str) -> str:
    """What a refused handler is, and what to write instead."""
    if isinstance(handler, type):
        name = handler.__name__
        if issubclass(handler, other_kind):
            return f"got the class {name} itself, {other}: write {add_other}({name}())"
        return f"got the class {name} itself: write {name}()"
    if isinstance(handler, other_kind):
        return f"got {type(handler).__name__}, {other}: use {add_other}()"
    if callable(handler):
        qualname = getattr(handler, "__qualname__", None)
        return (
            f"got {type(handler).__name__}{f' {qualname}' if qualname else ''}, a callable: "
            f"subclass {own_base.__name__} and call yours from its methods"
        )
    return f"got {type(handler).__name__}"


def _check_event_handler(handler: object) -> BaseEventHandler:
    if not isinstance(handler, BaseEventHandler):
        raise TypeError(
            "expected an event handler (a subclass of BaseEventHandler with handle()); "
            + _got(handler, BaseEventHandler, BaseSpanHandler, "a span handler", "add_span_handler")
        )
    _check_not_async(handler, ("handle",), "; async code goes in ahandle(), awaited by aevent()")
    return handler


def _check_span_handler(handler: object) -> BaseSpanHandler[Any]:
    if not isinstance(handler, BaseSpanHandler):
        raise TypeError(
            "expected a span handler (a subclass of BaseSpanHandler); "
            + _got(
                handler, BaseSpanHandler, BaseEventHandler, "an event handler", "add_event_handler"
            )
        )
    _check_not_async(handler, _SPAN_METHODS, "")  # called in the traced call
    return handler


def _check_not_async(handler: object, hooks: tuple[str, ...], hint: str) -> None:
    """An ``async def`` hook would be called and never awaited: each call would make a
    coroutine and drop it, losing everything, with no error to log or count."""
    for hook in hooks:
        method = getattr(type(handler), hook, None)
        if inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method):
            raise TypeError(
                f"{type(handler).__name__}.{hook}() is async: handlers are called inside the "
                f"application's call and never awaited; make it a plain def{hint}"
            )


def _not_a_span_id(method: str, id_: object) -> TypeError:
    return TypeError(
        f"dispatcher.{method}() takes the span's id as a str, one per span (such as "
        f"'my_step-<hex>'); got {type(id_).__name__}"
    )


def _not_an_event(method: str, event: object) -> TypeError:
    if isinstance(event, type) and issubclass(event, BaseEvent):
        got = f"the class {event.__name__} itself: write {event.__name__}(...)"
    else:
        got = type(event).__name__
    return TypeError(
        f"dispatcher.{method}() takes a BaseEvent (subclass it for your data); got {got}"
    )


class SpanBlock:
    """A span around a block of code (``with``/``async with``), or a decorator with options.

    Each ``with`` opens a new span; one ``SpanBlock`` must not be entered twice at
    the same time (make one per use: ``with dispatcher.span("step"):``). Inside the
    block, ``block.id_`` and ``block.trace_id`` name the span (``None`` when no
    handler listens), and ``block.result`` is handed to ``span_exit``.
    """

    __slots__ = (
        "_attributes",
        "_chain",
        "_dispatcher",
        "_handle",
        "_name",
        "_tags",
        "context",
        "result",
    )

    def __init__(
        self,
        dispatcher: Dispatcher,
        name: str | None,
        tags: Mapping[str, Any] | None,
        attributes: dict[str, Any] | None,
    ) -> None:
        if name is not None and (type(name) is not str or not name):
            check_span_name(name)  # raises, saying what is wrong
        if tags is not None and not isinstance(tags, Mapping):
            raise TypeError(f"tags must be a mapping, got {type(tags).__name__}")
        self._dispatcher = dispatcher
        self._name = name
        self._tags = tags
        self._attributes = attributes
        self._handle: Any = None
        self._chain: Chain | None = None
        self.context: SpanContext | None = None
        self.result: Any = None

    @property
    def id_(self) -> str | None:
        return None if self.context is None else self.context.id_

    @property
    def trace_id(self) -> str | None:
        return None if self.context is None else self.context.trace_id

    def __call__(self, func: F) -> F:
        if self._tags is not None:
            raise TypeError(
                "tags= applies to span blocks; for decorated calls use instrument_tags()"
            )
        return wrap(self._dispatcher, func, self._name, self._attributes)  # type: ignore[no-any-return]

    def __enter__(self) -> SpanBlock:
        if self._name is None:
            raise TypeError("a span block needs a name: with dispatcher.span('name'):")
        if self.context is not None:
            raise RuntimeError("this span block is already open; make a new one per use")
        self.result = None
        chain = self._dispatcher._hot
        if chain is None or _suppressed.get():
            return self
        span = start(chain, self._name, None, EMPTY_BOUND_ARGS, self._attributes, self._tags)
        self._handle = (
            _active_span.set(span)
            if not _context._bridges
            else activate_started(chain, span, EMPTY_BOUND_ARGS, None)
        )
        self.context = span
        self._chain = chain
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self._close(exc, False)

    def _close(self, exc: BaseException | None, in_async: bool) -> None:
        span = self.context
        chain = self._chain
        if span is None or chain is None:
            return
        try:
            if exc is not None:
                fail(chain, span, EMPTY_BOUND_ARGS, None, exc, in_async)
            else:
                finish(chain, span, EMPTY_BOUND_ARGS, None, self.result, in_async)
        finally:
            deactivate(self._handle, span)
            self.context = None
            self._handle = None
            self._chain = None

    async def __aenter__(self) -> SpanBlock:
        return self.__enter__()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        chain, span = self._chain, self.context
        in_async = not isinstance(exc, GeneratorExit) or _closed_by_aclose()
        self._close(exc, in_async)
        if chain is not None and span is not None and chain.async_afters and in_async:
            await after_span_end_async(chain, span.id_)


def _closed_by_aclose() -> bool:
    """Whether a block left with ``GeneratorExit`` may still await: it is an async
    generator's, closed by ``aclose()`` in a running event loop (a reader that stopped,
    the loop closing one dropped), which awaits its ``finally`` blocks. A coroutine
    being closed may not (an await there is "ignored GeneratorExit"), nor a generator
    closed with no loop: the block then waits for its handlers as sync code does.

    The frame leaving the block is the first one up the stack that is no coroutine
    (``__aexit__``, and an ``AsyncExitStack`` holding the block, are)."""
    if not _aio.loop_running():
        return False
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code.co_flags & inspect.CO_COROUTINE:
        frame = frame.f_back
    return frame is not None and bool(frame.f_code.co_flags & inspect.CO_ASYNC_GENERATOR)


def _updated(
    handlers: tuple[Any, ...], put_in: tuple[Any, ...], take_out: tuple[Any, ...]
) -> tuple[Any, ...] | None:
    """``handlers`` without ``take_out`` and with ``put_in`` appended (those not in it
    already), compared by identity: handlers are pydantic models, equal when their
    fields are. ``None`` when that changes nothing."""
    kept = tuple(h for h in handlers if not any(h is x for x in take_out))
    added = tuple(h for h in put_in if not any(h is k for k in kept))
    if not added and len(kept) == len(handlers):
        return None
    return (*kept, *added)


def _ancestor_names(name: str) -> Iterator[str]:
    """``"a.b.c"`` gives ``"a.b"`` then ``"a"``: nearest first, whole name parts only."""
    i = name.rfind(".")
    while i > 0:
        yield name[:i]
        i = name.rfind(".", 0, i)


class DispatcherMap(Mapping[str, "Dispatcher"]):
    """A read-only view of the tree's dispatchers by name.

    Iterating it while other threads make dispatchers is safe: it walks a copy.
    """

    __slots__ = ("_nodes",)

    def __init__(self, nodes: dict[str, Dispatcher | _PlaceHolder]) -> None:
        self._nodes = nodes

    def __getitem__(self, name: str) -> Dispatcher:
        found = self._nodes.get(name)
        if not isinstance(found, Dispatcher):
            raise KeyError(name)
        return found

    def __iter__(self) -> Iterator[str]:
        return iter(
            [name for name, node in self._nodes.copy().items() if isinstance(node, Dispatcher)]
        )

    def __len__(self) -> int:
        return sum(isinstance(node, Dispatcher) for node in self._nodes.copy().values())

    def __setitem__(self, name: str, value: object) -> None:
        raise TypeError(
            "Manager.dispatchers is read-only: use get_dispatcher(name), or "
            "manager.add_dispatcher(dispatcher) for one made by hand"
        )

    def __repr__(self) -> str:
        return f"DispatcherMap({list(self)!r})"


class Manager:
    """Owns the name tree; one per process (``root_manager``)."""

    def __init__(self, root: Dispatcher) -> None:
        if not isinstance(root, Dispatcher):
            got = type(root).__name__
            raise TypeError(f"Manager(root) takes the Dispatcher at the top of the tree; got {got}")
        self.root = root
        # Placeholders stand in the same dict as dispatchers, as in ``logging``; the
        # public ``dispatchers`` shows the dispatchers only.
        self._nodes: dict[str, Dispatcher | _PlaceHolder] = {root.name: root}
        #: The dispatchers by name (LlamaIndex's ``Manager.dispatchers``): read-only, and
        #: never a stand-in for a missing ancestor. Add one with :meth:`add_dispatcher`.
        self.dispatchers: DispatcherMap = DispatcherMap(self._nodes)
        #: Handlers every dispatcher in the tree reaches, ``propagate`` or not: what the
        #: test kit uses to see everything a test emits. Change them with :meth:`tap`.
        self.tap_event_handlers: tuple[BaseEventHandler, ...] = ()
        self.tap_span_handlers: tuple[BaseSpanHandler[Any], ...] = ()
        root._manager = self

    def tap(
        self,
        event_handlers: Iterable[BaseEventHandler] = (),
        span_handlers: Iterable[BaseSpanHandler[Any]] = (),
    ) -> None:
        """Replace the handlers that every dispatcher in the tree reaches."""
        ev = tuple(_check_event_handler(h) for h in event_handlers)
        sp = tuple(_check_span_handler(h) for h in span_handlers)
        with _lock:
            old = (self.tap_event_handlers, self.tap_span_handlers)
            self.tap_event_handlers, self.tap_span_handlers = ev, sp
            self._rebuild_all()
            _noted(self, "tap_event_handlers", old[0], ev)
            _noted(self, "tap_span_handlers", old[1], sp)

    def _update_taps(
        self,
        *,
        events_in: tuple[Any, ...] = (),
        spans_in: tuple[Any, ...] = (),
        events_out: tuple[Any, ...] = (),
        spans_out: tuple[Any, ...] = (),
    ) -> None:
        """What :meth:`Dispatcher._update` does for a dispatcher's own handlers, for the
        taps: by identity, one rebuild, none when nothing changes. Another tap set
        meanwhile (a capture block on another thread) stays."""
        _update_lists(
            self,
            ("tap_event_handlers", events_in, events_out),
            ("tap_span_handlers", spans_in, spans_out),
            self._rebuild_all,
        )

    def get(self, name: str) -> Dispatcher:
        found = self._nodes.get(name)
        if type(found) is Dispatcher:
            return found
        with _lock:
            found = self._nodes.get(name)
            if isinstance(found, Dispatcher):
                return found
            made = Dispatcher(name)
            self._place(made, found)
            return made

    def _place(self, made: Dispatcher, found: Dispatcher | _PlaceHolder | None) -> None:
        # Published last: the lock-free lookup in get_dispatcher() may hand ``made`` out
        # the moment it is in ``dispatchers``, so it must be linked and listening by then.
        made._manager = self
        self._fix_parent(made)
        if isinstance(found, _PlaceHolder):
            self._fix_children(found, made)
        made._rebuild()
        self._nodes[made.name] = made
        if made._event_handlers or made._span_handlers or not made._propagate:
            # Made by hand with handlers, or not propagating: every chain below it changes.
            self._rebuild_below(made)
        elif isinstance(found, _PlaceHolder):
            # No chain changes (``get_dispatcher``'s case, a large application's every
            # module): those now hung from it reach the same handlers through it. Theirs
            # are rebuilt all the same, so that none is older than its place in the tree.
            for child in found.children.values():
                child._rebuild()

    def _fix_parent(self, made: Dispatcher) -> None:
        # Up to the nearest dispatcher, each missing ancestor gets a placeholder that
        # remembers ``made``, so that it can be re-hung when that ancestor is made.
        for prefix in _ancestor_names(made.name):
            node = self._nodes.get(prefix)
            if isinstance(node, Dispatcher):
                made._parent = node
                return
            if node is None:
                self._nodes[prefix] = _PlaceHolder(made)
            else:
                node.children[id(made)] = made
        made._parent = self.root

    def _fix_children(self, holder: _PlaceHolder, made: Dispatcher) -> None:
        # Each dispatcher below the placeholder whose parent is above ``made`` now
        # hangs from ``made``. "Above" is decided by whole name parts, so "root" is
        # never taken for a descendant of "r" (CPython's logging compares prefixes).
        prefix = made.name + "."
        for child in holder.children.values():
            current = child._parent
            if (
                current is None
                or current is self.root
                or not (current.name == made.name or current.name.startswith(prefix))
            ):
                child._parent = made

    def _subtree(self, top: Dispatcher) -> list[Dispatcher]:
        with _lock:  # re-entrant: shutdown holds it already
            nodes = [d for d in self._nodes.values() if isinstance(d, Dispatcher)]
        if top is self.root:
            return nodes
        prefix = top.name + "."
        return [d for d in nodes if d is top or d.name.startswith(prefix)]

    def _attached_handler_ids(self) -> set[int]:
        """The ids of every handler attached anywhere in the tree (lock held)."""
        found = {id(h) for h in (*self.tap_event_handlers, *self.tap_span_handlers)}
        for node in self._nodes.values():
            if isinstance(node, Dispatcher):
                found.update(id(h) for h in node._event_handlers)
                found.update(id(h) for h in node._span_handlers)
        return found

    def _rebuild_all(self) -> None:
        self._rebuild_below(self.root)

    def _rebuild_below(self, top: Dispatcher) -> None:
        """Rebuild the chains of ``top`` and the dispatchers below it (lock held),
        sharing what they can (see :class:`Chain`)."""
        shared: dict[tuple[int, ...], tuple[Any, ...]] = {}
        for node in self._subtree(top):
            node._rebuild(shared)

    def parent_name_for(self, name: str) -> str:
        """The name of the dispatcher that one called ``name`` would hang from now."""
        if not isinstance(name, str):
            raise TypeError(f"a dispatcher's name must be a str; got {type(name).__name__}")
        for prefix in _ancestor_names(name):
            if isinstance(self._nodes.get(prefix), Dispatcher):
                return prefix
        return self.root.name

    def add_dispatcher(self, d: Dispatcher) -> None:
        """Put a dispatcher made by hand into the tree (LlamaIndex's spelling); a name
        the tree has already is left as it is."""
        if not isinstance(d, Dispatcher):
            hint = f": write get_dispatcher({d!r})" if isinstance(d, str) else ""
            raise TypeError(f"add_dispatcher() takes a Dispatcher; got {type(d).__name__}{hint}")
        with _lock:
            if isinstance(self._nodes.get(d.name), Dispatcher):
                return
            wanted = d._parent_name_given
            if (
                wanted is not None
                and wanted != self.root.name
                and not d.name.startswith(wanted + ".")
                and d is not self.root
            ):
                raise ValueError(
                    f"a dispatcher's parent comes from its dotted name: {d.name!r} hangs from "
                    f"the nearest of its ancestors ({self.parent_name_for(d.name)!r} now), "
                    f"not {wanted!r}; name it '{wanted}.{d.name.rpartition('.')[2]}' to hang "
                    f"it there, or leave parent_name out"
                )
            self._place(d, self._nodes.get(d.name))


root_dispatcher: Dispatcher = Dispatcher(ROOT_NAME)
root_manager: Manager = Manager(root_dispatcher)


def get_dispatcher(name: str = ROOT_NAME) -> Dispatcher:
    """The dispatcher called ``name``, made (and placed in the tree) at first use.

    Use ``get_dispatcher(__name__)`` in each module; ``get_dispatcher()`` is the root,
    whose handlers see everything that propagates.
    """
    try:
        found = root_manager._nodes.get(name)
    except TypeError:  # an unhashable name: let _check_name say what was expected
        found = None
    if type(found) is Dispatcher:
        return found
    return root_manager.get(_check_name(name))


class DispatcherSpanMixin(ABC):  # noqa: B024 - abstract for its subclasses, as in LlamaIndex
    """Spans for subclasses' implementations of abstract and already-traced methods.

    An ``ABC``, as in LlamaIndex: a subclass that leaves an abstract method
    unimplemented cannot be instantiated.

    A subclass's implementation of an abstract method, or its override of a method
    decorated with ``@dispatcher.span`` in a base class, is decorated with the
    dispatcher of the subclass's module. Decorating by hand as well is harmless: the
    decorator is idempotent.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        wanted: set[str] = set()
        for base in cls.__mro__[1:]:
            for attr, member in vars(base).items():
                func = getattr(member, "__func__", member)
                if (
                    getattr(func, "__isabstractmethod__", False)
                    or getattr(func, MARK, None)
                    or getattr(func, LLAMA_MARK, False)
                ):
                    wanted.add(attr)
        if not wanted:
            return
        dispatcher = get_dispatcher(cls.__module__)
        for attr, member in list(vars(cls).items()):
            if attr not in wanted:
                continue
            func = getattr(member, "__func__", member)
            if not callable(func) or getattr(func, "__isabstractmethod__", False):
                continue
            if getattr(func, MARK, None) is not None:
                continue  # already traced (by any dispatcher)
            setattr(cls, attr, dispatcher.span(member))


__all__ = [
    "DISPATCHER_SPAN_DECORATED_ATTR",
    "Dispatcher",
    "DispatcherSpanMixin",
    "EventDispatcher",
    "Manager",
    "NullSpanHandler",
    "SpanBlock",
    "SpanDropEvent",
    "active_instrument_tags",
    "active_span_id",
    "get_dispatcher",
    "instrument_tags",
    "root_dispatcher",
    "root_manager",
]
