"""The span life cycle shared by every kind of decorated callable.

A live span is a :class:`SpanContext`; it carries the handler chain that saw it
start, so that handlers added or removed while it runs never see an exit without an
enter. Dispatch takes no lock: handler chains are immutable tuples. (Making what was
put off, :func:`_run_deferred`, takes one, and never waits for it; a span or event
that finds it taken waits in line behind it instead.)
"""

from __future__ import annotations

import _thread
import atexit
import gc
import inspect
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from contextvars import copy_context
from functools import partial
from threading import get_ident
from types import FrameType
from typing import Any

from instrumentation import _aio, _ids, telemetry
from instrumentation import context as _context
from instrumentation._classcache import remember
from instrumentation._exit import run_exit_hooks
from instrumentation._text import cut
from instrumentation.context import SpanContext, _active_span, _active_tags, parent_for_new_span
from instrumentation.events.span import SpanDropEvent

_report = telemetry.report_handler_error
_LOST_AT_EXIT = telemetry.counter("spans.lost_at_exit")

#: Span ends put off near the recursion limit (a traced function recursing until
#: ``RecursionError``): there the handlers have no stack to run on, and would fail half
#: way through. Each is run by a later span end that has room, usually a caller's on
#: the way up, so that no handler keeps the span open for ever. Also what a garbage
#: collection caused (see :data:`_collecting`). Entries are
#: ``(handler or None, method, span id, end)``, oldest first.
_deferred: deque[tuple[Any, str, str, Callable[[], Any]]] = deque()
_DEFERRED_KEPT = 1_000
#: The frames an end needs left (a handler, its event, logging an error).
_HEADROOM = 120


def _stack_left() -> int:
    """How many more frames fit under the recursion limit (counted: only asked on the
    path of a ``RecursionError``, or while ends are put off)."""
    frame: FrameType | None = sys._getframe(1)
    depth = 0
    while frame is not None:
        depth += 1
        frame = frame.f_back
    return sys.getrecursionlimit() - depth


def _short_of_stack() -> bool:
    try:
        return _stack_left() < _HEADROOM
    except RecursionError:
        return True


def _put_off(handler: Any, method: str, span_id: str, end: Callable[[], Any]) -> bool:
    """Keep ``end`` for later if the stack is short here; whether it was kept."""
    if len(_deferred) >= _DEFERRED_KEPT or not _short_of_stack():
        return False
    _deferred.append((handler, method, span_id, end))
    return True


#: What a handler's call raises as its own error, to be reported as ``Exception`` is.
#: An ``asyncio.CancelledError`` is too (told apart by :mod:`instrumentation._aio`,
#: not to import asyncio), though no ``Exception``: a cancellation comes in at an
#: ``await``, and a handler's call has none (it read a cancelled future of its own,
#: say); ``GeneratorExit`` comes in at a ``yield`` only.
_HANDLERS_OWN = (Exception, GeneratorExit)


def stops_the_caller(exc: BaseException) -> bool:
    """Whether ``exc``, raised by a handler's call, is to reach the caller rather than
    be reported as the handler's error: ``KeyboardInterrupt``, ``SystemExit``, and
    what else comes in from outside at any point (gevent's ``Timeout``), which stop
    or interrupt the application. Not an ``Exception``, nor what can only be the
    handler's own (see :data:`_HANDLERS_OWN`), nor pyo3's ``PanicException``:
    pydantic-core given a dict that changed as it read it (its class cannot be
    imported; :mod:`instrumentation._dump` tells it by name too)."""
    return (
        not isinstance(exc, _HANDLERS_OWN)
        and not _aio.is_cancellation(exc)
        and type(exc).__name__ != "PanicException"
    )


def stops_the_awaiting_caller(exc: BaseException) -> bool:
    """:func:`stops_the_caller` for a handler's call the caller awaits, which comes
    to an ``await``: ``GeneratorExit`` there is the caller's coroutine being closed,
    and an ``asyncio.CancelledError`` may be its task being cancelled, taken so while
    the task is (``Task.cancelling()``); before Python 3.11, which cannot tell, always."""
    if _aio.is_cancellation(exc):
        import asyncio  # imported already: asyncio made exc

        task = asyncio.current_task() if _aio.loop_running() else None
        cancelling = getattr(task, "cancelling", None)
        return cancelling is None or cancelling() > 0
    return isinstance(exc, GeneratorExit) or stops_the_caller(exc)


def report_or_raise(handler: Any, where: str, subject: str, exc: BaseException) -> None:
    """Report ``exc`` as ``handler``'s error (raised in ``where``, handling
    ``subject``), or raise it if it stops the caller."""
    if stops_the_caller(exc):
        raise exc
    _report(handler, where, subject, exc)


def _forget(handler: Any, span_id: str) -> None:
    """The end of ``span_id`` failed for good: a handler's own ``open_spans`` must not
    keep it (the handler's error is reported)."""
    open_spans = getattr(handler, "open_spans", None)
    if isinstance(open_spans, dict):
        open_spans.pop(span_id, None)


def _give_up(handler: Any, method: str, span_id: str, exc: BaseException) -> None:
    if handler is not None:
        _forget(handler, span_id)
    _report(handler, method, span_id, exc)


def _run_deferred(whole: bool = True) -> bool:
    """Run what was put off, oldest first, if there is room for it here; whether
    nothing is left waiting behind another thread that is running it now (a caller's
    own end must then wait behind it: see :func:`must_wait`).

    Each item leaves the queue only once made: a span or event on another thread,
    seeing the queue empty, would otherwise overtake the one being made. Each round
    (one hold of the lock) makes what was there when it began, then lets go, so that
    threads waiting in line take their turn; not ``whole`` (a span's own call: what
    came before it is made), it stops there, and wakes the drainer for the rest."""
    global _draining_thread, _drain_round
    if _short_of_stack():
        return True
    if _drainer is None and not _START_IN_CALLBACK:
        _start_drainer()  # (3.10, 3.11) for what the next collections put off
    while True:
        lock = _draining  # the one released below, even if a fork in a handler replaced it
        if not lock.acquire(blocking=False):
            return False
        _draining_thread = get_ident()
        _drain_round += 1
        round_left = len(_deferred)
        try:
            while _deferred and round_left > 0:
                round_left -= 1
                item = _deferred[0]
                handler, method, span_id, end = item
                try:
                    end()
                except RecursionError as exc:
                    if _short_of_stack():
                        return True  # too deep after all: it stays first, for a later end
                    _made(item)
                    _give_up(handler, method, span_id, exc)  # it recurses at any depth
                except Exception as exc:
                    _made(item)
                    _give_up(handler, method, span_id, exc)
                except BaseException:  # Ctrl-C in a handler: not made again
                    _made(item)
                    raise
                else:
                    _made(item)
        finally:
            _draining_thread = None
            lock.release()
        if not _deferred:  # nothing put behind it between its last look and the release
            return True
        if not whole:
            _wake_drainer(start=True)  # for what others put behind, should they stop
            return True


def _made(item: tuple[Any, str, str, Callable[[], Any]]) -> None:
    """Take ``item`` off the front of the queue (which a fork inside it emptied)."""
    global _made_count
    _made_count += 1
    if _deferred and _deferred[0] is item:
        _deferred.popleft()


#: How many items were made, and how many times a thread took the drain (one round
#: each): see :func:`_wait_in_line`.
_made_count = 0
_drain_round = 0


#: Held by the call of :func:`_run_deferred` that is running what was put off, and
#: the thread it runs on.
_draining = threading.Lock()
_draining_thread: int | None = None

#: The thread the cyclic garbage collector runs on now, if it runs. It may run at
#: almost any point of that thread: inside a handler holding its lock, or inside a
#: library a handler calls into (an exporter, a logging queue) holding its own. There
#: it may close a traced generator that only a reference cycle kept, whose span's end
#: then called the handlers, which waited for that lock, held by their own thread,
#: for ever. So on that thread, while it collects, span starts and ends, events, and
#: the ends of LLM streams and audit blocks are put off (:func:`later`), and made, in
#: the order they came and in the context each came from, by the next span start or
#: end or event on any thread (which waits behind them: :func:`must_wait`), the
#: drainer thread shortly after the collection (:data:`_DRAIN_AFTER`),
#: ``Dispatcher.shutdown()``, the exit flushes, or the interpreter's exit; not on that
#: thread as the collection ends, which is inside the same lock.
_collecting: int | None = None
#: How many may wait so; past it, they are made at once, as before.
_COLLECTED_KEPT = 100_000
#: Whether the exit's last drain has run: what is put off after it would be lost.
_exited = False


#: Before 3.12 a collection may start inside ``ContextVar.set`` or ``reset`` (a node of
#: the context's mapping being allocated), and what it closes (a traced generator's
#: wrapper, the calls in its ``finally``) sets context variables in that same context,
#: which frees the mapping the interrupted call is still reading: a crash
#: (python/cpython#148891). A copy of the context taken as the collection starts
#: keeps that mapping alive; the last few are kept, since the interrupted call goes on
#: reading it after the collection (a later collection, possibly inside the same
#: call, lets go of the oldest).
_HOLD_MAPPING = sys.version_info < (3, 12)
_held_mappings: deque[Any] = deque(maxlen=16)


def _watch_collections(phase: str, info: dict[str, int]) -> None:
    global _collecting
    if phase == "start":
        _collecting = get_ident()
        if _HOLD_MAPPING:
            _held_mappings.append(copy_context())
        return
    _collecting = None
    if _deferred:
        _wake_drainer(start=_START_IN_CALLBACK)


#: What a collection put off is made on a thread of its own (the drainer) if, this
#: many seconds after the collection, nothing on the collecting thread has made it: a
#: program that goes quiet would otherwise end those spans at its next span or event,
#: timed then (minutes late in an idle server). The drainer waits for the locks the
#: collecting thread held, which that thread lets go of as it goes on. Waiting first
#: leaves them to a busy thread, whose next span or event makes them in its own order.
#: ``None``: only the next span or event makes them.
_DRAIN_AFTER: float | None = 0.05
#: From 3.12 a collection runs only between bytecodes, so the collector's callback may
#: start the drainer (``_thread.start_new_thread`` waits for nothing, and takes none of
#: ``threading``'s locks). Before, a collection may run inside C code that holds the
#: interpreter's thread-list lock (``sys._current_frames()``), which starting a thread
#: takes: there the drainer is started by the first drain outside a collection, and
#: the first collection's ends wait for the next span or event.
_START_IN_CALLBACK = sys.version_info >= (3, 12)
#: The drainer ends after this many seconds with nothing to make, and the next
#: collection that puts something off starts another: a process is left with no
#: thread of ours (``fork`` on 3.12 and newer warns about threads) but for a moment.
#: Before 3.12 it stays (the callback cannot start another).
_DRAINER_IDLE: float | None = 2.0 if _START_IN_CALLBACK else None
#: Held while the drainer has nothing to do; the collector's callback releases it.
_wakeup = threading.Lock()
_wakeup.acquire()
#: The drainer's thread id while it runs (0 while it starts), else None.
_drainer: int | None = None
#: When a drainer could not be started (threads refused: the interpreter exiting, a
#: thread limit, an audit hook): none is tried again before then.
_drainer_refused_until = 0.0
#: How long ``run_deferred()`` waits for another thread (the drainer) to finish making
#: what was put off, so that a read, a shutdown or an exit flush sees all of it.
_WAIT_FOR_DRAIN = 2.0


def _wake_drainer(start: bool) -> None:
    """Wake the drainer, or (``start``) start it; from the collector's callback too,
    wherever the collection ran, so nothing here may wait. Nothing once drainers are
    off (``_DRAIN_AFTER`` None) or the exit made what waited."""
    if _DRAIN_AFTER is None or _exited:
        return
    if _drainer is None:
        if start:
            _start_drainer()
        return
    if _wakeup.locked():
        try:
            _wakeup.release()
        except RuntimeError:  # another thread woke it meanwhile
            pass


def _start_drainer() -> None:
    global _drainer, _drainer_refused_until
    if _drainer is not None or _DRAIN_AFTER is None or _exited:
        return
    _drainer = 0  # no switch of threads between the look and this (no call between)
    if time.monotonic() < _drainer_refused_until:
        _drainer = None
        return
    try:
        _thread.start_new_thread(_drain_after_collections, ())
    except Exception:  # no thread to be had (exiting, a limit, an audit hook refused)
        _drainer = None
        _drainer_refused_until = time.monotonic() + 60.0


def _drain_after_collections() -> None:
    global _drainer
    me = get_ident()
    if _drainer == 0:
        _drainer = me
    # The first wake-up is the collection's that started it (the lock may still be
    # held: then what waits is made after the pause all the same).
    woken = True
    while True:
        if woken:
            pause = _DRAIN_AFTER
            if pause is None:
                pause = 0.0 if _drainer != me else None  # an old drainer goes on its way
            if pause is not None:
                time.sleep(pause)
                _make_what_waits()
        if _drainer != me:  # another drainer took over (two woken at once): it stays
            _make_what_waits()
            return
        idle = _DRAINER_IDLE
        woken = _wakeup.acquire(timeout=idle) if idle is not None else _wakeup.acquire()
        if woken:
            continue
        _drainer = None  # from here, a collection starts another
        if _deferred and _drainer is None and not _exited:
            _drainer = me  # put off just as it was ending: it stays for them
            woken = True
            continue
        _make_what_waits()  # what another drainer, starting now, would make too
        return


def _make_what_waits() -> None:
    """Make what waits, unless another thread is making it (then it makes all)."""
    while _deferred and not _exited:
        try:
            _run_deferred()
            return
        except BaseException:  # an item's SystemExit: it is off the queue, the rest goes on
            telemetry.logger.exception("instrumentation: making what was put off failed")


def in_collection() -> bool:
    """Whether the cyclic garbage collector runs on this thread now."""
    collecting = _collecting
    return collecting is not None and collecting == get_ident()


def ending_now() -> bool:
    """Whether a wait for handlers would be inside the collector, after the exit, or
    hold up the unrelated call that is making what was put off."""
    return _exited or in_collection() or _draining_thread == get_ident()


def later(method: str, span_id: str, end: Callable[[], Any]) -> bool:
    """Put ``end`` off, behind what waits already, to be made in the context it was
    put off in; whether it was."""
    if _exited:
        drainer = _draining_thread
        if drainer is not None and drainer != get_ident():
            # A thread frozen by the exit in the middle of a drain holds what the
            # handlers need: made now, this would wait for ever. Lost, counted.
            _LOST_AT_EXIT.inc()
            return True
        return False
    if len(_deferred) >= _COLLECTED_KEPT:
        return False
    _deferred.append((None, method, span_id, partial(copy_context().run, end)))
    return True


def put_off_in_collection(method: str, span_id: str, end: Callable[[], Any]) -> bool:
    """For an audit request's or block's start or end: whether ``end`` was put off
    (the collector runs here); if not, what waited has been made first, here."""
    if in_collection():
        return later(method, span_id, end)
    run_deferred()
    return False


#: How long a span or event waits for another thread making what was put off: at
#: most :data:`_WAIT_IN_LINE_MOST` in all, and no longer than :data:`_WAIT_IN_LINE`
#: without an item made (see :func:`_wait_in_line`).
_WAIT_IN_LINE = 0.1
_WAIT_IN_LINE_MOST = 0.5
#: The drain round each thread gave up waiting for: it goes in line at once after,
#: until this many wait in line (then it waits each time: in line is cheaper than
#: made, and a line of tens of thousands left one thread a second's work).
_gave_up = threading.local()
_IN_LINE_BEFORE_WAITING = 1_000
_DONE, _FREE, _GAVE_UP = 1, 2, 0


def _wait_in_line() -> int:
    """Wait while another thread makes what was put off before this call: ``_DONE``
    once all of that is made (what others put off since may follow this span),
    ``_FREE`` if the drain ended first, ``_GAVE_UP`` if it made nothing for
    :data:`_WAIT_IN_LINE` (a slow handler, or one waiting for a lock this thread
    holds) or took :data:`_WAIT_IN_LINE_MOST` in all; a thread that gave up on a drain
    does not wait for it again.

    Going in line behind it at once, two busy threads kept a third making their spans
    for good (in line is cheaper than made), and the line reached its bound."""
    drain = _drain_round
    if getattr(_gave_up, "round", -1) == drain and len(_deferred) < _IN_LINE_BEFORE_WAITING:
        return _GAVE_UP
    target = _made_count + len(_deferred)
    deadline = time.monotonic() + _WAIT_IN_LINE_MOST
    while _made_count < target:
        seen = _made_count
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if _draining.acquire(timeout=min(_WAIT_IN_LINE, left)):
            _draining.release()
            return _FREE
        if _made_count == seen:
            break
    else:
        return _DONE
    _gave_up.round = drain
    return _GAVE_UP


def must_wait(method: str, span_id: str, end: Callable[[], Any]) -> bool:
    """For a span start or end, an event: whether ``end`` (the caller's own) was put
    off, inside a collection or behind what another thread is making now; if not, what
    waited has been made first, here (see :func:`_wait_in_line`)."""
    if in_collection():
        return later(method, span_id, end)
    if _draining_thread == get_ident():
        return False  # one of those put off, being made now
    try:
        if _run_deferred(whole=False):
            return False
        waited = _wait_in_line()
        if waited == _DONE or (waited == _FREE and _run_deferred(whole=False)):
            return False
    except RecursionError:  # no room to look even: a later end runs them
        return False
    queued = later(method, span_id, end)
    try:  # the other thread may have let go meanwhile, leaving it
        _run_deferred(whole=False)
    except RecursionError:
        pass
    return queued


def run_deferred() -> None:
    """Make what was put off now, or wait (for at most :data:`_WAIT_FOR_DRAIN`) for the
    thread making it: by ``Dispatcher.shutdown()``, the test kit's reads, and at exit
    before a store or an exporter is flushed for the last time. (What is being made
    stays first in the queue until it is made: an empty queue means nothing waits.)"""
    global _exit_wait
    if not _deferred or in_collection() or _draining_thread == get_ident():
        return
    deadline = time.monotonic() + _WAIT_FOR_DRAIN
    if _exit_began:  # the exit's flushes wait for one drain once in all, not each
        if _exit_wait is None or _exit_wait[0] != _drain_round:
            _exit_wait = (_drain_round, deadline)
        deadline = _exit_wait[1]
    while not _run_deferred():  # another thread makes them: wait for it, then look again
        left = deadline - time.monotonic()
        if left <= 0 or not _draining.acquire(timeout=left):
            return
        _draining.release()


#: Whether the exit began (its first hook ran), and the drain round the exit's flushes
#: wait for with the moment they stop waiting for it: one stuck in a handler made each
#: flush wait its own 2 s in turn. A drain begun later gets its own 2 s.
_exit_began = False
_exit_wait: tuple[int, float] | None = None


def _run_deferred_as_the_exit_begins() -> None:
    global _exit_began
    _exit_began = True
    run_deferred()


def _run_deferred_at_exit() -> None:
    global _exited
    try:
        try:
            run_exit_hooks()  # when no exit flush ran them (see instrumentation._exit)
        finally:
            _run_deferred_as_the_exit_begins()
    finally:  # a Ctrl-C in a hook too: what is put off after this would wait for good
        _exited = True


def prepare_exit_flush() -> None:
    """What a store's or an exporter's exit flush makes first: the exit hooks (see
    :mod:`instrumentation._exit`), then what was put off (:func:`run_deferred`); a
    Ctrl-C in a hook is raised once that is made, not in place of it."""
    try:
        run_exit_hooks()
    finally:
        run_deferred()


#: The threads forking now that hold ``_draining`` for it (see below), by ident: one
#: flag shared by all was cleared by a second fork whose wait timed out meanwhile,
#: and the first fork's thread then never let go of it (no drain ever ran again).
_held_for_fork: list[int] = []


def before_fork() -> None:
    """A child must not inherit a handler's lock that the drainer (or another thread
    making what was put off) holds, and that no thread of the child would let go of:
    the fork waits for the drain to finish, a bounded while."""
    me = get_ident()
    if _draining_thread != me and _draining.acquire(timeout=1.0):
        _held_for_fork.append(me)


def after_fork_in_parent() -> None:
    me = get_ident()
    if me in _held_for_fork:
        _held_for_fork.remove(me)
        _draining.release()
        if _deferred:
            _wake_drainer(start=True)  # what went behind the drain the fork held off


def after_fork_in_child() -> None:
    """The parent makes the ends it put off; a drain it was running is not the child's,
    nor is its drainer thread (the child starts its own when it needs one)."""
    global _draining, _collecting, _drainer, _wakeup, _draining_thread
    _deferred.clear()
    _draining = threading.Lock()
    _draining_thread = None
    _held_for_fork.clear()
    _collecting = None
    _drainer = None
    _wakeup = threading.Lock()
    _wakeup.acquire()


gc.callbacks.append(_watch_collections)
# Before the threads stop (as concurrent.futures does), and again as atexit's last.
_register_before_threads_stop = getattr(threading, "_register_atexit", None)
if _register_before_threads_stop is not None:  # pragma: no branch
    _register_before_threads_stop(_run_deferred_as_the_exit_begins)
atexit.register(_run_deferred_at_exit)
# The fork hooks (before_fork and the two after it) are registered by the dispatcher,
# with the tree's own in the order they must run in.


class Chain:
    """The handlers a dispatcher's spans and events reach, parents included."""

    __slots__ = (
        "afters",
        "async_afters",
        "dispatcher",
        "enters",
        "events",
        "exits",
        "needs_bound_args",
        "owner",
        "spans",
    )

    def __init__(
        self,
        dispatcher: str,
        events: tuple[Any, ...],
        spans: tuple[Any, ...],
        owner: Any = None,
        shared: dict[tuple[int, ...], tuple[Any, ...]] | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        #: The dispatcher whose chain this is (its ``_ev`` holds the event handlers now).
        self.owner = owner
        self.events = events
        self.spans = spans
        # What is worked out from the span handlers alone is shared, through
        # ``shared``, by the chains rebuilt together that have the same handlers (most
        # of a tree, after a change at the root).
        key = tuple(map(id, spans))
        parts = shared.get(key) if shared is not None else None
        if parts is None:
            parts = _parts(spans)
            if shared is not None:
                shared[key] = parts
        self.needs_bound_args, self.enters, self.exits, self.afters, self.async_afters = parts


def _parts(spans: tuple[Any, ...]) -> tuple[Any, ...]:
    # Handlers that never look at the arguments (needs_bound_args = False) spare every
    # call the making of a BoundArguments.
    needs_bound_args = any(getattr(h, "needs_bound_args", True) for h in spans)
    # A handler may offer positional versions of span_enter/span_exit (keyword calls
    # with nine arguments cost several times more); None means "use the public method
    # with keywords".
    enters = tuple((h, _positional_enter(h)) for h in spans)
    exits = tuple((h, getattr(h, "positional_span_exit", None)) for h in spans)
    # Handlers with work to do once every handler has seen a span end (the audit
    # adapter waits there, so that the handlers after it do not count its wait).
    afters = tuple(
        (h, after) for h in spans if (after := getattr(h, "after_span_end", None)) is not None
    )
    # The same for a span that ends in async code (a coroutine, an async generator, an
    # ``async with`` block), awaited there: waiting in after_span_end would block the
    # event loop, and every other task on it with the caller.
    async_afters = tuple(
        (h, after) for h in spans if (after := getattr(h, "after_span_end_async", None)) is not None
    )
    return needs_bound_args, enters, exits, afters, async_afters


#: What the dispatcher passes to ``span_enter`` besides the guide's arguments.
ENTER_EXTRAS = ("name", "trace_id", "dispatcher", "attributes")


_enter_extras_found: dict[int, tuple[str, ...] | None] = {}


def enter_extras(cls: type) -> tuple[str, ...] | None:
    """Which of :data:`ENTER_EXTRAS` ``cls.span_enter`` takes; None when it takes them all.

    A handler written for LlamaIndex may override ``span_enter`` with the guide's
    arguments only, without ``**kwargs``; it is then called with those (and whichever
    extras it names), instead of failing on every span.
    """
    try:
        return _enter_extras_found[id(cls)]
    except KeyError:
        return remember(_enter_extras_found, cls, _work_out_enter_extras(cls))


def _work_out_enter_extras(cls: type) -> tuple[str, ...] | None:
    try:
        params = inspect.signature(cls.span_enter).parameters  # type: ignore[attr-defined]
    except (AttributeError, TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return tuple(name for name in ENTER_EXTRAS if name in params)


def _positional_enter(handler: Any) -> Any:
    """The callable :func:`start` calls positionally, or None for ``span_enter(**all)``."""
    positional = getattr(handler, "positional_span_enter", None)
    if positional is not None:
        return positional
    extras = enter_extras(type(handler))
    if extras is None:
        return None
    span_enter = handler.span_enter

    def enter(
        id_: str,
        bound_args: Any,
        instance: Any,
        parent_id: str | None,
        tags: Any,
        name: str,
        trace_id: str,
        dispatcher: str,
        attributes: Any,
    ) -> None:
        given = dict(zip(ENTER_EXTRAS, (name, trace_id, dispatcher, attributes), strict=True))
        span_enter(
            id_=id_,
            bound_args=bound_args,
            instance=instance,
            parent_id=parent_id,
            tags=tags,
            **{key: given[key] for key in extras},
        )

    return enter


class LazySignature:
    """``inspect.signature`` of a function, computed once and only if a handler asks."""

    __slots__ = ("_drop_first", "_func", "_sig")

    def __init__(self, func: Any, drop_first: bool) -> None:
        self._func = func
        self._drop_first = drop_first
        self._sig: inspect.Signature | None = None

    def get(self) -> inspect.Signature:
        sig = self._sig
        if sig is None:
            try:
                sig = inspect.signature(self._func)
            except (TypeError, ValueError):
                sig = inspect.Signature()
            if self._drop_first and sig.parameters:
                sig = sig.replace(parameters=list(sig.parameters.values())[1:])
            self._sig = sig
        return sig


EMPTY_SIGNATURE = inspect.Signature()


class LazyBoundArguments(inspect.BoundArguments):
    """An ``inspect.BoundArguments`` that binds the call's arguments on first use.

    Binding costs microseconds; most handlers never look at the arguments, so the
    dispatcher hands this over and only a handler that reads ``arguments``, ``args``
    or ``kwargs`` pays for it. A call whose arguments do not fit the signature binds
    what it can (``bind_partial``), and failing that, nothing.
    """

    __slots__ = ("_lazy_bound", "_lazy_call")

    _lazy_bound: dict[str, Any]

    def __init__(
        self, signature: LazySignature | None, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self._lazy_call = (signature, args, kwargs)

    @property
    def _signature(self) -> inspect.Signature:
        holder = self._lazy_call[0]
        return EMPTY_SIGNATURE if holder is None else holder.get()

    @property
    def arguments(self) -> dict[str, Any]:
        try:
            return self._lazy_bound
        except AttributeError:
            pass
        sig = self._signature
        _, args, kwargs = self._lazy_call
        try:
            bound = sig.bind(*args, **kwargs).arguments
        except TypeError:
            try:
                bound = sig.bind_partial(*args, **kwargs).arguments
            except TypeError:
                bound = {}
        self._lazy_bound = bound
        return bound

    @arguments.setter
    def arguments(self, value: dict[str, Any]) -> None:
        self._lazy_bound = value

    def __repr__(self) -> str:
        # As inspect.BoundArguments reads (binding now, if not done yet): a handler
        # that logs the arguments shows what it would show undecorated.
        shown = ", ".join(f"{k}={v!r}" for k, v in self.arguments.items())
        return f"<BoundArguments ({shown})>"

    def __reduce__(self) -> tuple[Any, ...]:
        # Copied or pickled (a handler that keeps or queues the arguments), it is the
        # plain ``inspect.BoundArguments`` it stands for, bound now.
        return (inspect.BoundArguments, (self._signature, dict(self.arguments)))


class _NoArguments(LazyBoundArguments):
    """The arguments of a span that has none (a block, a drop at shutdown, or a call
    whose handlers do not ask). One object serves them all, so it must not carry a
    handler's edits from one span to the next: each read gives a fresh empty dict,
    and assigning is ignored."""

    __slots__ = ()

    @property
    def arguments(self) -> dict[str, Any]:
        return {}

    @arguments.setter
    def arguments(self, value: dict[str, Any]) -> None:
        return None

    def __repr__(self) -> str:
        return "<BoundArguments ()>"


EMPTY_BOUND_ARGS: LazyBoundArguments = _NoArguments(None, (), {})


_next = next
_started = telemetry.SPANS_STARTED.ticks
_ended = telemetry.SPANS_ENDED.ticks
_dropped = telemetry.SPANS_DROPPED.ticks
_events_dispatched = telemetry.EVENTS_DISPATCHED.ticks
_pop_span_hex = _ids.pop_span_hex
_pop_trace_hex = _ids.pop_trace_hex
_refill_span_hex = _ids.refill_span_hex
_refill_trace_hex = _ids.refill_trace_hex
_new_context = tuple.__new__


def start(
    chain: Chain,
    name: str,
    instance: Any,
    bound_args: Any,
    attributes: Mapping[str, Any] | None,
    extra_tags: Mapping[str, Any] | None = None,
) -> SpanContext:
    """Open a span under the current one and tell the chain's span handlers.

    The caller keeps ``chain``, ``bound_args`` and ``instance`` and hands them to
    :func:`finish` or :func:`fail`: the span context itself stays small, since one
    is made for every call.
    """
    # _context._bridges is read each time: the tuple is replaced when bridges change.
    parent = parent_for_new_span() if _context._bridges else _active_span.get()
    if parent is None:
        try:
            trace_id = _pop_trace_hex()
        except IndexError:
            trace_id = _refill_trace_hex()
        parent_id = None
    else:
        trace_id = parent.trace_id
        parent_id = parent.id_
    tags = _active_tags.get()
    if extra_tags:
        tags = {**tags, **extra_tags}
    try:
        span_hex = _pop_span_hex()
    except IndexError:
        span_hex = _refill_span_hex()
    span_id = name + "-" + span_hex
    span = _new_context(SpanContext, (span_id, trace_id, parent_id, name))
    _next(_started)
    if (_deferred or _collecting is not None) and must_wait(
        "span_enter",
        span_id,
        partial(
            _enter_all,
            chain,
            (span_id, bound_args, instance, parent_id, tags, name, trace_id),
            attributes,
        ),
    ):
        return span  # in a collection (a generator's finally), or behind what waits
    for handler, positional in chain.enters:
        try:
            if positional is not None:
                positional(
                    span_id,
                    bound_args,
                    instance,
                    parent_id,
                    tags,
                    name,
                    trace_id,
                    chain.dispatcher,
                    attributes,
                )
            else:
                handler.span_enter(
                    id_=span_id,
                    bound_args=bound_args,
                    instance=instance,
                    parent_id=parent_id,
                    tags=tags,
                    name=name,
                    trace_id=trace_id,
                    dispatcher=chain.dispatcher,
                    attributes=attributes,
                )
        except Exception as exc:
            _report(handler, "span_enter", span_id, exc)
        except BaseException as exc:
            if stops_the_caller(exc):
                _drop_where_entered(chain, span, bound_args, instance, handler, exc)
                raise
            _report(handler, "span_enter", span_id, exc)
    return span


def _drop_where_entered(
    chain: Chain,
    span: SpanContext,
    bound_args: Any,
    instance: Any,
    handler: Any,
    err: BaseException,
) -> None:
    """A stop (see :func:`stops_the_caller`) came out of ``handler``'s ``span_enter``:
    the call is not made. The span is dropped with it in the handlers told that it
    started, ``handler`` included (it may keep it half made), as a call's span is when
    the stop comes in its first line; those after ``handler`` never hear of it."""
    told = chain.spans[: position(chain, handler) + 1]
    _fail(
        Chain(chain.dispatcher, chain.events, told, chain.owner),
        span,
        bound_args,
        instance,
        err,
        None,
    )


def activate_started(chain: Chain, span: SpanContext, bound_args: Any, instance: Any) -> Any:
    """Make ``span``, just started, current (see :func:`instrumentation.context.activate`).
    A stop a bridge raises there (which leaves nothing current) drops the span in its
    handlers before it reaches the caller, as a stop in ``span_enter`` does: the call
    is not made, and no span is left open in them for good."""
    try:
        return _context.activate(span)
    except BaseException as err:
        fail(chain, span, bound_args, instance, err)
        raise


def position(chain: Chain, handler: Any) -> int:
    """Where ``handler`` is in ``chain.spans`` (and so in ``enters`` and ``exits``)."""
    return next(i for i, each in enumerate(chain.spans) if each is handler)


def after(chain: Chain, handler: Any) -> tuple[Any, ...]:
    """The span handlers of ``chain`` after ``handler``."""
    return chain.spans[position(chain, handler) + 1 :]


def end_after_a_stop(handlers: Iterable[Any], method: str, span_id: str, **fields: Any) -> None:
    """A stop (see :func:`stops_the_caller`) came out of a handler's end of span
    ``span_id``: each of ``handlers`` (those after it) ends the span all the same, by
    ``method`` (``span_exit`` or ``span_drop``) with ``fields``, before the stop is
    raised, so that none keeps it open for good. A second stop (Ctrl-C pressed again)
    is raised at once."""
    for handler in handlers:
        try:
            getattr(handler, method)(id_=span_id, **fields)
        except BaseException as exc:
            if stops_the_caller(exc):
                raise
            _give_up(handler, method, span_id, exc)


def _enter_all(chain: Chain, given: tuple[Any, ...], attributes: Any) -> None:
    """The ``span_enter`` calls of :func:`start`, made later (see :func:`later`)."""
    span_id, bound_args, instance, parent_id, tags, name, trace_id = given
    for handler, positional in chain.enters:
        try:
            if positional is not None:
                positional(*given, chain.dispatcher, attributes)
            else:
                handler.span_enter(
                    id_=span_id,
                    bound_args=bound_args,
                    instance=instance,
                    parent_id=parent_id,
                    tags=tags,
                    name=name,
                    trace_id=trace_id,
                    dispatcher=chain.dispatcher,
                    attributes=attributes,
                )
        except BaseException as exc:
            report_or_raise(handler, "span_enter", span_id, exc)


def finish(
    chain: Chain,
    span: SpanContext,
    bound_args: Any,
    instance: Any,
    result: Any,
    in_async: bool = False,
) -> None:
    """Close ``span`` normally. ``in_async``: async code ends it, and awaits
    :func:`after_span_end_async` next."""
    # What a recursion caught inside a traced call, or a collection, put off: first.
    if (_deferred or _collecting is not None) and must_wait(
        "span_exit", span.id_, partial(finish, chain, span, bound_args, instance, result)
    ):
        return
    _next(_ended)
    span_id = span.id_
    for handler, positional in chain.exits:
        try:
            if positional is not None:
                positional(span_id, bound_args, instance, result)
            else:
                handler.span_exit(
                    id_=span_id, bound_args=bound_args, instance=instance, result=result
                )
        except Exception as exc:
            if type(exc) is RecursionError and _put_off(
                handler,
                "span_exit",
                span_id,
                partial(_exit, handler, positional, span_id, bound_args, instance, result),
            ):
                continue
            _give_up(handler, "span_exit", span_id, exc)
        except BaseException as exc:
            if stops_the_caller(exc):
                _forget(handler, span_id)
                end_after_a_stop(
                    after(chain, handler),
                    "span_exit",
                    span_id,
                    bound_args=bound_args,
                    instance=instance,
                    result=result,
                )
                raise
            _give_up(handler, "span_exit", span_id, exc)
    if chain.afters:
        after_span_end(chain, span_id, in_async)


def _exit(
    handler: Any, positional: Any, span_id: str, bound_args: Any, instance: Any, result: Any
) -> None:
    if positional is not None:
        positional(span_id, bound_args, instance, result)
    else:
        handler.span_exit(id_=span_id, bound_args=bound_args, instance=instance, result=result)


def fail(
    chain: Chain,
    span: SpanContext,
    bound_args: Any,
    instance: Any,
    err: BaseException,
    in_async: bool = False,
) -> None:
    """Close ``span`` because of ``err``: a ``SpanDropEvent``, then ``span_drop``
    (``in_async`` as for :func:`finish`)."""
    if (_deferred or _collecting is not None) and must_wait(
        "span_drop",
        span.id_,
        partial(_fail, chain, span, bound_args, instance, err, _active_tags.get()),
    ):
        return
    if type(err) is RecursionError and _put_off(
        None,
        "span_drop",
        span.id_,
        partial(_fail, chain, span, bound_args, instance, err, _active_tags.get()),
    ):
        return  # not even tried here: handlers would fail half way and lose the span
    _fail(chain, span, bound_args, instance, err, None, in_async)


def _fail(
    chain: Chain,
    span: SpanContext,
    bound_args: Any,
    instance: Any,
    err: BaseException,
    tags: Mapping[str, Any] | None,
    in_async: bool = False,
) -> None:
    _next(_dropped)
    span_id = span.id_
    # The span's own handlers see it end (it started with them), but the drop event,
    # like any event, goes to the event handlers attached now, as in LlamaIndex: not to
    # one removed, or closed by ``shutdown()``, while the span was open.
    events = chain.events if chain.owner is None else chain.owner._ev
    if events:
        try:
            _drop_event(events, span, err, _active_tags.get() if tags is None else tags)
        except BaseException:  # a stop in an event handler (their errors are reported)
            end_after_a_stop(
                chain.spans, "span_drop", span_id, bound_args=bound_args, instance=instance, err=err
            )
            raise
    for handler in chain.spans:
        try:
            handler.span_drop(id_=span_id, bound_args=bound_args, instance=instance, err=err)
        except Exception as exc:
            if type(exc) is RecursionError and _put_off(
                handler,
                "span_drop",
                span_id,
                partial(
                    handler.span_drop,
                    id_=span_id,
                    bound_args=bound_args,
                    instance=instance,
                    err=err,
                ),
            ):
                continue
            _give_up(handler, "span_drop", span_id, exc)
        except BaseException as exc:
            if stops_the_caller(exc):
                _forget(handler, span_id)
                end_after_a_stop(
                    after(chain, handler),
                    "span_drop",
                    span_id,
                    bound_args=bound_args,
                    instance=instance,
                    err=err,
                )
                raise
            _give_up(handler, "span_drop", span_id, exc)
    if chain.afters:
        after_span_end(chain, span_id, in_async)


def _drop_event(
    events: tuple[Any, ...], span: SpanContext, err: BaseException, tags: Mapping[str, Any]
) -> None:
    try:
        text = cut(str(err))
    except Exception:  # str() of a broken exception can itself raise
        text = type(err).__name__
    drop_event = SpanDropEvent(
        span_id=span.id_,
        trace_id=span.trace_id,
        err_str=text,
        err_type=type(err).__name__,
        tags=dict(tags),
    )
    dispatch_event(events, drop_event, {})


def after_span_end(chain: Chain, span_id: str, in_async: bool = False) -> None:
    """Call ``after_span_end(span_id)`` of the handlers that have one, in chain order;
    ``in_async``, not of those that have ``after_span_end_async``: it is awaited next."""
    for handler, after in chain.afters:
        if in_async and hasattr(handler, "after_span_end_async"):
            continue
        try:
            after(span_id)
        except BaseException as exc:
            report_or_raise(handler, "after_span_end", span_id, exc)


async def after_span_end_async(chain: Chain, span_id: str) -> None:
    """Await ``after_span_end_async(span_id)`` of the handlers that have one, in chain
    order: what async code does once its span ended, after :func:`after_span_end`."""
    for handler, after in chain.async_afters:
        try:
            await after(span_id)
        except Exception as exc:
            _report(handler, "after_span_end_async", span_id, exc)
        except BaseException as exc:
            if stops_the_awaiting_caller(exc):
                raise
            _report(handler, "after_span_end_async", span_id, exc)


def dispatch_event(handlers: tuple[Any, ...], event: Any, kwargs: dict[str, Any]) -> None:
    _next(_events_dispatched)
    handle_all(handlers, event, kwargs)


def handle_all(
    handlers: tuple[Any, ...], event: Any, kwargs: dict[str, Any], where: str = "handle"
) -> None:
    """``handle(event)`` of each handler in turn; an error is reported (as raised in
    ``where``), not raised, and a stop is raised once the handlers after have the event
    (see :func:`handle_after_a_stop`)."""
    for handler in handlers:
        try:
            _handle(handler, event, kwargs)
        except BaseException as exc:
            if stops_the_caller(exc):
                handle_after_a_stop(handlers, handler, event, kwargs, where)
                raise
            _report(handler, where, event.class_name(), exc)


def handle_after_a_stop(
    handlers: tuple[Any, ...], stopped: Any, event: Any, kwargs: dict[str, Any], where: str
) -> None:
    """A stop (see :func:`stops_the_caller`) came out of ``stopped``'s ``handle(event)``:
    each of ``handlers`` after it gets the event all the same, before the stop is
    raised, as the span handlers after a stop still end the span (see
    :func:`end_after_a_stop`): a Ctrl-C in one handler lost the event for the others,
    a parent's storage or exporter among them. A second stop is raised at once."""
    rest = handlers[next(i for i, each in enumerate(handlers) if each is stopped) + 1 :]
    for handler in rest:
        try:
            _handle(handler, event, kwargs)
        except BaseException as exc:
            report_or_raise(handler, where, event.class_name(), exc)


def _handle(handler: Any, event: Any, kwargs: dict[str, Any]) -> None:
    # Without kwargs, as Dispatcher.event calls it (an empty ** costs a dict).
    if kwargs:
        handler.handle(event, **kwargs)
    else:
        handler.handle(event)


__all__ = [
    "EMPTY_BOUND_ARGS",
    "ENTER_EXTRAS",
    "Chain",
    "LazyBoundArguments",
    "LazySignature",
    "activate_started",
    "after",
    "after_span_end",
    "after_span_end_async",
    "dispatch_event",
    "end_after_a_stop",
    "ending_now",
    "enter_extras",
    "fail",
    "finish",
    "handle_after_a_stop",
    "handle_all",
    "in_collection",
    "later",
    "must_wait",
    "position",
    "prepare_exit_flush",
    "put_off_in_collection",
    "report_or_raise",
    "run_deferred",
    "start",
    "stops_the_awaiting_caller",
    "stops_the_caller",
]
