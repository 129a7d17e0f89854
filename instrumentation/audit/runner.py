"""One request's run: calls each handler in order and keeps the contexts it returned.

The application side (any thread) posts calls; the audit loop queues them per
handler and runs them one at a time, so ``event_start`` always sees the context
``request_start`` returned and ``event_end`` the one its own ``event_start`` returned,
however many requests and events are interleaved. Contexts live in this run object
(one per request, one slot per handler, one per open event), never in the handler.

Requests whose handler calls are still running when the interpreter exits (a request
or an adapter with ``timeout=0``, or a timeout that ran out) are waited for then, at most
:data:`EXIT_FLUSH_SECONDS` in all; what still has not finished is logged and counted in
``audit.exit_unfinished``. The wait happens twice, as CPython 3.10-3.13 exit in this
order: ``threading``'s exit hooks (ours, then ``concurrent.futures``' which stops every
``ThreadPoolExecutor``, so an ``async`` handler's ``asyncio.to_thread`` still works for
the requests ended so far), then the joining of non-daemon threads (which may end more
requests), then ``atexit`` (ours waits for those, then reports what is left).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures

# Imported before our exit hook is registered, so that ours runs first: threading runs
# them last registered first, and this module's stops every ThreadPoolExecutor.
import concurrent.futures.thread
import dataclasses
import inspect
import itertools
import logging
import math
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

from instrumentation import telemetry
from instrumentation._exit import run_exit_hooks
from instrumentation._spans import run_deferred
from instrumentation.audit._loop import Worker, audit_loop, report_loop_error
from instrumentation.audit.base import EventHandler
from instrumentation.audit.events import Event, RequestEnd, RequestStart, _now

logger = logging.getLogger("instrumentation.audit")

HANDLER_ERRORS = telemetry.counter("audit.handler_errors")
TIMEOUTS = telemetry.counter("audit.timeouts")
REQUESTS = telemetry.counter("audit.requests")
EVENTS = telemetry.counter("audit.events")
EXIT_UNFINISHED = telemetry.counter("audit.exit_unfinished")
SLOW_CALLS = telemetry.counter("audit.slow_calls")
LOST_IN_FORK = telemetry.counter("audit.requests_lost_in_fork")
REQUESTS_DROPPED = telemetry.counter("audit.requests_dropped")
CALLS_DROPPED = telemetry.counter("audit.calls_dropped")

#: Ended requests whose handler calls may be waiting at once; read at each request.
#: Handlers slower than the application (a 2 ms call, 4 threads, ``timeout=0``) left
#: tens of thousands waiting, 11 KB each, without limit: a request started while this
#: many wait is not audited (no handler sees it), and is counted in
#: ``audit.requests_dropped`` and logged, as the storage and OpenTelemetry queues drop
#: what does not fit. Requests still open do not count: the application holds them.
MAX_PENDING_REQUESTS = 10_000

#: Calls of one request that may wait for one handler at once; read at each call. The
#: bound above counts ended requests only, so one request open for hours (an agent's
#: loop) queued every event for a slow handler without limit: 255,000 calls and 170 MB
#: in 30 seconds. An event whose ``event_start`` finds this many waiting is not handed
#: to that handler (its ``event_end`` neither), and both calls are counted in
#: ``audit.calls_dropped``; ``request_start``, ``request_end`` and the end of an event
#: the handler was given are never dropped, so each handler's calls stay consistent.
MAX_QUEUED_CALLS = 10_000

#: Event starts of one request posted to the audit loop and not yet taken by it; read
#: at each event. The loop takes them at once, into the handlers' queues (bounded
#: above), unless something blocks it: an ``async def`` handler making a blocking call
#: to a service that hangs left every later event of a long request waiting there,
#: without limit. An event that finds this many waiting is handed to no handler, and
#: counted as above (its start and end, for each handler).
MAX_POSTED_EVENTS = 10_000

#: Handler errors a request keeps in ``errors``, each with its traceback (and the
#: frames, events included, it holds); read at each error. Later ones are counted in
#: ``errors_omitted`` (and logged and counted as usual): a handler failing on every
#: event of a long request kept them all.
MAX_KEPT_ERRORS = 100

#: Seconds after which a handler call not finished is logged (a WARNING naming the
#: handler and the method, once per call) and counted in ``audit.slow_calls``; read at
#: each call. 0 or ``inf``: never.
SLOW_CALL_SECONDS = 5.0

# A slow call's timer overdue by more than this when the call ended: the loop was blocked.
BLOCKED_MARGIN_SECONDS = 0.1

#: Seconds an exiting interpreter waits, in all, for the handler calls of the requests
#: still in flight (read at exit: set it before then to wait longer or not at all).
EXIT_FLUSH_SECONDS = 5.0

_sequence = itertools.count(1)
_tasks: set[asyncio.Task[None]] = set()

UNFINISHED = "the request ended before this event did"


class HandlerError(NamedTuple):
    """A handler method that raised: which handler, which method, what, and in which
    request (``RequestStart.request_id``: a handler serves many requests, and an
    adapter's ``errors`` gathers those of all of them)."""

    handler: EventHandler[Any, Any]
    method: str
    error: BaseException
    request_id: str


#: The handler methods and the arguments the runner passes them, positionally.
PROTOCOL: dict[str, tuple[str, ...]] = {
    "request_start": ("user_request",),
    "event_start": ("event", "request_context"),
    "event_end": ("event", "request_context", "event_context"),
    "request_end": ("output", "request_context"),
}

# Handler classes whose methods were found callable as the runner calls them, with
# the methods checked: audit.request() checks its handlers on every request, and
# inspect.signature() is far too slow to run that often. A class whose methods are
# replaced later is checked again.
_checked: weakref.WeakKeyDictionary[type, tuple[object, ...]] = weakref.WeakKeyDictionary()


def _defined(cls: type) -> tuple[object, ...]:
    """The protocol's methods as ``cls`` defines them (``inspect.getattr_static``'s
    answer): looked up in the MRO's own dicts first, about a fifth of its cost, as every
    request asks."""
    mro = cls.__mro__
    found: list[object] = []
    for name in PROTOCOL:
        for klass in mro:
            own = klass.__dict__
            if name in own:
                found.append(own[name])
                break
        else:
            found.append(inspect.getattr_static(cls, name, None))
    return tuple(found)


def _check_methods(handler: EventHandler[Any, Any]) -> None:
    """A TypeError, at once, for a method the runner could not call (see PROTOCOL)."""
    cls = type(handler)
    own = getattr(handler, "__dict__", None) or {}
    shadowed = any(name in own for name in PROTOCOL)
    if not shadowed:
        # As defined on the class: getattr() makes a new object on each access for a
        # classmethod or a descriptor such as a wrapt decorator, never found again.
        methods = _defined(cls)
        known = _checked.get(cls)
        if known is not None and all(a is b for a, b in zip(known, methods, strict=True)):
            return
    for name, parameters in PROTOCOL.items():
        method = getattr(handler, name, None)
        expected = f"{name}(self, {', '.join(parameters)})"
        if not callable(method):
            raise TypeError(
                f"{cls.__name__}.{name} is {type(method).__name__}, not a method; "
                f"an audit handler defines {expected}"
            )
        try:
            signature = inspect.signature(method)
        except (TypeError, ValueError):  # no signature to read (a builtin): trusted
            continue
        if _binds(signature, parameters):
            misplaced = _misplaced(signature, parameters)
            if misplaced and not _fits_unwrapped(method, signature, parameters):
                raise TypeError(
                    f"{cls.__name__}.{name}{_shown(signature)} names its parameters in another "
                    "order than the audit runner passes them: it passes them by position, so "
                    + ", ".join(f"{mine} would get the {given}" for mine, given in misplaced)
                    + f"; define it as {expected} (db-ally passed request_context= and "
                    "event_context= by keyword, where the order did not matter)"
                )
            continue
        # inspect.signature follows __wrapped__, to the function a decorator wraps
        # (singledispatchmethod, a decorator adding an argument): what is called
        # is the wrapper, which is refused only if it cannot take the call either.
        try:
            outer = inspect.signature(method, follow_wrapped=False)
        except (TypeError, ValueError):
            continue
        if _binds(outer, parameters):
            continue
        raise TypeError(
            f"{cls.__name__}.{name}{_shown(signature)} cannot be called as the audit "
            f"runner calls it: define it as {expected}"
            + (
                " (db-ally's how-to stub leaves out event_context; its reference has it)"
                if name == "event_end"
                else ""
            )
        ) from None
    if not shadowed:
        try:
            _checked[cls] = methods
        except TypeError:  # pragma: no cover - a class that cannot be weakly referenced
            pass


def _binds(signature: inspect.Signature, parameters: tuple[str, ...]) -> bool:
    try:
        signature.bind(*parameters)
    except TypeError:
        return False
    return True


def _misplaced(signature: inspect.Signature, parameters: tuple[str, ...]) -> list[tuple[str, str]]:
    """``(parameter, argument)`` pairs where a parameter named as one of the runner's
    arguments would get another one of them (``event_context`` the request context, say)."""
    bound = signature.bind(*parameters)
    return [
        (mine, given)
        for mine, given in bound.arguments.items()
        if mine in parameters and isinstance(given, str) and given != mine
    ]


def _fits_unwrapped(method: Any, signature: inspect.Signature, parameters: tuple[str, ...]) -> bool:
    """The method as called (not the function a decorator wraps) takes the arguments
    in parameters of its own, none named as another one: a decorator that adds an
    argument of its own, or passes them on by name.

    One that takes them as ``*args`` (``@functools.wraps(f) def call(*args, **kwargs)``,
    a logging or retrying decorator) passes them on in the order they came: the
    function it wraps gets them by position, and its names are the ones that count.
    """
    try:
        outer = inspect.signature(method, follow_wrapped=False)
    except (TypeError, ValueError):
        return True
    if outer == signature or not _binds(outer, parameters):
        return False
    taken = outer.bind(*parameters).arguments
    if any(outer.parameters[name].kind is inspect.Parameter.VAR_POSITIONAL for name in taken):
        return False
    return not _misplaced(outer, parameters)


def _shown(signature: inspect.Signature) -> str:
    """``(self, a, b)``: the signature of a bound method, with its ``self`` shown."""
    bare = signature.replace(
        parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
        return_annotation=inspect.Signature.empty,
    )
    text = str(bare)
    return "(self)" if text == "()" else "(self, " + text[1:]


def check_handlers(handlers: object) -> tuple[EventHandler[Any, Any], ...]:
    """The handlers as a tuple, or a TypeError saying what was expected.

    Each handler's four methods must take the arguments the runner passes (see
    :data:`PROTOCOL`): one that cannot is refused here, not reported on every call.
    """
    if isinstance(handlers, (str, bytes)) or not isinstance(handlers, (list, tuple)):
        raise TypeError(
            "handlers= takes a list of audit EventHandler instances, "
            f"e.g. handlers=[FileEventHandler('logs')]; got {type(handlers).__name__}"
        )
    for handler in handlers:
        if isinstance(handler, type):
            raise TypeError(
                f"handlers= takes instances: write {handler.__name__}(), not {handler.__name__}"
            )
        if not isinstance(handler, EventHandler):
            raise TypeError(
                "each audit handler must subclass instrumentation.audit.EventHandler; "
                f"got {type(handler).__name__}"
            )
        _check_methods(handler)
    return tuple(handlers)


def check_timeout(timeout: object) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout is a number of seconds, got {type(timeout).__name__}")
    if not timeout >= 0:
        raise ValueError(f"timeout is seconds >= 0 (0 = do not wait); got {timeout!r}")
    return float(timeout)


def interrupting(error: BaseException | None) -> bool:
    """Whether a request that ended with ``error`` should not wait for its handlers.

    ``KeyboardInterrupt``, ``SystemExit``, ``asyncio.CancelledError``: the application
    is being stopped, and the handlers' calls go on in the background (the exit flush
    waits for them). ``GeneratorExit`` is no such stop: a stream read no further.
    """
    return isinstance(error, (KeyboardInterrupt, SystemExit, asyncio.CancelledError))


#: What follows when each handler method fails, for the log.
CONSEQUENCES = {
    "request_start": "its later calls of this request get None as request_context",
    "event_start": "its event_end of this event gets None as event_context",
    "event_end": "its later calls of this request run as usual",
    "request_end": "it was its last call of this request",
}


def _report(
    handler: EventHandler[Any, Any], method: str, request_id: str, exc: BaseException
) -> None:
    HANDLER_ERRORS.inc()
    name = type(handler).__name__
    held = telemetry.log_turn(("audit", name, method))
    if held is None:
        return
    # SystemExit, KeyboardInterrupt and the like are reported too, never raised: the
    # call ran on an audit thread, where they could only have stopped the audit loop.
    note = "" if isinstance(exc, Exception) else "; raised in a handler, it stops nothing"
    try:
        logger.error(
            "audit handler %s failed in %s of request %s: %r (the request goes on; %s%s)%s",
            name,
            method,
            request_id,
            exc,
            CONSEQUENCES.get(method, "its later calls run as usual"),
            note,
            f" ({held} more errors from it in {method} in the last interval)" if held else "",
            exc_info=(type(exc), exc, exc.__traceback__),
        )
    except Exception:  # pragma: no cover - a broken log filter: counted all the same
        pass


class _Watch:
    """Logs a handler call still not finished :data:`SLOW_CALL_SECONDS` after it began.

    One timer on the audit loop per call (no thread, no polling), cancelled when the
    call ends. A call that blocks the loop itself (an ``async def`` method calling
    ``time.sleep``) keeps the timer from firing: it is logged when it ends instead.
    """

    __slots__ = (
        "began",
        "fired",
        "handler",
        "method",
        "request_id",
        "running_since",
        "sync",
        "threshold",
        "timer",
    )

    def __init__(self, handler: EventHandler[Any, Any], method: str, request_id: str) -> None:
        self.handler = handler
        self.method = method
        self.request_id = request_id
        self.sync = False  # set by _call for a plain def method
        self.began = time.monotonic()
        self.running_since: float | None = None  # when a worker thread took it (sync)
        self.fired = False
        self.timer: asyncio.TimerHandle | None = None
        self.threshold = math.inf

    def start(self, threshold: float) -> None:
        self.threshold = threshold
        self.timer = asyncio.get_running_loop().call_later(threshold, self._fire)

    def run(self, func: Any, *args: Any) -> Any:
        """On a worker thread: note when the call began to run, then run it."""
        self.running_since = time.monotonic()
        return func(*args)

    def _fire(self) -> None:
        self.fired = True
        SLOW_CALLS.inc()
        now = time.monotonic()
        if self.sync and self.running_since is None:
            state = (
                f"has waited {now - self.began:.3g}s for a worker thread: all "
                f"{audit_loop.sync_workers} are busy with other plain def handler calls "
                "(audit.set_worker_threads() sets how many there are)"
            )
        else:
            state = f"has been running for {now - self.began:.3g}s"
        self._log(state)

    def stop(self) -> None:
        timer = self.timer
        if timer is None:
            return
        timer.cancel()
        if self.fired:
            return
        took = time.monotonic() - self.began
        if took < self.threshold:
            return
        # Due, yet the timer never ran: the audit loop could not run it meanwhile.
        SLOW_CALLS.inc()
        blocked = took - self.threshold > BLOCKED_MARGIN_SECONDS
        self._log(
            f"took {took:.3g}s"
            + (
                ", and the audit loop was blocked meanwhile (an async def handler calling "
                "time.sleep or blocking I/O, this one or another, stalls every async "
                "handler: use await asyncio.sleep(), asyncio.to_thread(), or a plain def "
                "method)"
                if blocked
                else ""
            ),
        )

    def _log(self, state: str) -> None:
        name = type(self.handler).__name__
        held = telemetry.log_turn(("audit", name, self.method, "slow"))
        if held is None:
            return
        try:
            logger.warning(
                "audit handler %s.%s of request %s %s (logged past SLOW_CALL_SECONDS, "
                "%.3gs; this handler's later calls of the request wait for it)%s",
                name,
                self.method,
                self.request_id,
                state,
                self.threshold,
                f" ({held} more slow calls of it in the last interval)" if held else "",
            )
        except Exception:  # pragma: no cover - a broken log filter: counted all the same
            pass


async def _call(method: Any, args: tuple[Any, ...], watch: _Watch | None) -> Any:
    if inspect.iscoroutinefunction(method):
        return await method(*args)
    if watch is None:
        result = await audit_loop.run_sync(method, *args)
    else:
        watch.sync = True
        result = await audit_loop.run_sync(watch.run, method, *args)
    if inspect.isawaitable(result):
        return await result
    return result


class RequestRun:
    """The state of one request: handlers, their contexts, and the calls still to run."""

    def __init__(self, handlers: Sequence[EventHandler[Any, Any]], start: RequestStart) -> None:
        self.seq = next(_sequence)
        self.start = start
        self.handlers = tuple(handlers)
        #: True when too many requests were waiting for their handlers: not audited.
        self.dropped = False
        self.errors: list[HandlerError] = []
        #: Handler errors not kept in ``errors`` (beyond :data:`MAX_KEPT_ERRORS`).
        self.errors_omitted = 0
        #: Handler calls not made: a handler :data:`MAX_QUEUED_CALLS` behind, or the
        #: audit loop not taking the request's calls (see :meth:`begin_event`).
        self.calls_dropped = 0
        #: True once every handler call ran; False at once if the audit loop's thread
        #: ended first (it says so in the log).
        self.done: concurrent.futures.Future[bool] = concurrent.futures.Future()
        self.ended = False
        #: The spans mapped to this request and still open (see the collector).
        self.span_ids: set[str] = set()
        #: The span this request was made of (by an adapter), if any.
        self.request_span: str | None = None
        self._lock = threading.Lock()
        self._keys = itertools.count()
        self._open: dict[object, list[tuple[int, Event]]] = {}
        # Event starts posted to the audit loop, and taken by it (counted there): the
        # difference waits in the loop's posted calls. Events posted to no handler, as
        # too many were waiting: their ends are not posted either.
        self._starts_posted = 0
        self._starts_taken = 0
        self._unposted: set[int] = set()
        # Loop-side state (touched only on the audit loop's thread).
        count = len(self.handlers)
        self._request_ctx: list[Any] = [None] * count
        self._event_ctx: list[dict[int, Any]] = [{} for _ in range(count)]
        self._queues: list[deque[tuple[Any, ...]]] = [deque() for _ in range(count)]
        self._draining = [False] * count
        # Per handler index, the events whose event_start it was not given: their
        # event_end is not given either. Empty but for a handler that far behind.
        self._skipped: dict[int, set[int]] = {}
        self._remaining = count
        #: Per handler index, the events it was not handed (see ``RequestEnd``).
        self._events_dropped = [0] * count
        self._worker: Worker | None = None
        #: ``done`` settled: a plain flag, read on every event (Future.done() takes a lock).
        self._over = count == 0
        if count and not _in_flight.admit(self):  # before its loop can lose it (and settle it)
            self.dropped = True
            self.handlers = ()
            count = self._remaining = 0
            self._over = True
            _report_dropped(start)
        if count:
            try:
                # The library's own start-up (the audit loop's threads, in a process's
                # first request) is not the request's: its clocks start once it is done.
                self._worker = audit_loop.worker(serve=self)
            except BaseException:
                _in_flight.discard(self)
                raise
        self.start = dataclasses.replace(start, started_at=_now())
        self._started_at = time.perf_counter()
        REQUESTS.inc()
        if count == 0:
            self.done.set_result(not self.dropped)
        else:
            self._post(("request_start",))

    # -- application side (any thread) ---------------------------------------------

    def begin_event(self, key: object, event: Event) -> bool:
        """Start ``event``; a later :meth:`end_event` with the same ``key`` ends it.

        Handed to no handler when :data:`MAX_POSTED_EVENTS` starts of this request are
        waiting for the audit loop to take them (it is blocked): they would pile up there.
        """
        with self._lock:
            if self.ended:
                return False
            number = next(self._keys)
            self._open.setdefault(key, []).append((number, event))
            posted = self._over or self._starts_posted - self._starts_taken < MAX_POSTED_EVENTS
            if posted:
                self._starts_posted += 1
            else:
                self._unposted.add(number)
        EVENTS.inc()
        if posted:
            self._post(("event_start", number, event))
        else:
            self._not_posted(1, starts=True)
        return True

    def end_event(self, key: object, event: Event | None = None) -> bool:
        """End the newest open event under ``key`` (``None``: the one it started with)."""
        with self._lock:
            stack = self._open.get(key)
            if self.ended or not stack:
                return False
            number, started = stack.pop()
            if not stack:
                del self._open[key]
            unposted = number in self._unposted
            self._unposted.discard(number)
        if unposted:
            self._not_posted(1, starts=False)  # its start was not: nor is its end
        else:
            self._post(("event_end", number, started if event is None else event))
        return True

    def _count_dropped(self, calls: int, starts: bool, index: int | None = None) -> int:
        """Count ``calls`` calls not made (event starts, or their ends) of handler
        ``index``, or of every handler; returns the request's calls dropped so far.

        Both kinds of drop count here: the audit loop not taking a request's calls
        (:meth:`_not_posted`, on the application's side) and one handler's queue full
        (:meth:`_drop_call`, on the loop's). Each logs its own warning: what is behind,
        and what to look at, differ."""
        handlers = range(len(self.handlers)) if index is None else (index,)
        dropped = calls * len(handlers)
        with self._lock:
            self.calls_dropped += dropped
            if starts:
                for each in handlers:
                    self._events_dropped[each] += calls
            total = self.calls_dropped
        CALLS_DROPPED.add(dropped)
        return total

    def _not_posted(self, calls: int, starts: bool) -> None:
        """``calls`` calls of every handler not posted (event starts, or their ends)."""
        total = self._count_dropped(calls, starts)
        if not starts:  # an end follows its start, which was logged
            return
        held = telemetry.log_turn(("audit", "loop", "not taking calls"))
        if held is None:
            return
        try:
            logger.warning(
                "the audit loop has not taken the last %d event starts of request %s "
                "(runner.MAX_POSTED_EVENTS; is an async def handler blocking it?): the "
                "request's newest events are handed to no handler until it does; its "
                "request_end still is (%d calls dropped so far in this request, counted in "
                "audit.calls_dropped)%s",
                MAX_POSTED_EVENTS,
                self.start.request_id,
                total,
                f" ({held} more such drops in the last interval)" if held else "",
            )
        except Exception:  # pragma: no cover - a broken log filter: counted all the same
            pass

    def has_open(self, key: object) -> bool:
        with self._lock:
            return bool(self._open.get(key))

    def finish(
        self, result: Any = None, error: BaseException | None = None, abandoned: bool = False
    ) -> RequestEnd:
        """End the request: close its open events, then ``request_end`` for every handler.

        ``abandoned``: a stream whose caller stopped reading it (no error, no result).
        """
        with self._lock:
            if self.ended:
                raise RuntimeError("this request has ended already")
            self.ended = True
            left = [item for stack in self._open.values() for item in stack]
            self._open.clear()
            unposted = self._unposted
            self._unposted = set()
        if unposted:
            left = [item for item in left if item[0] not in unposted]
            self._not_posted(len(unposted), starts=False)
        _in_flight.ended(self)  # before request_end is posted: it cannot settle before
        # Measured here, on the application's side: handlers may run much later.
        end = RequestEnd(
            result=result,
            error=error,
            request_id=self.start.request_id,
            duration_s=time.perf_counter() - self._started_at,
            abandoned=abandoned,
        )
        for number, started in sorted(left, key=lambda item: item[0]):
            self._post(("event_end", number, _unfinished(started, end.ended_at)))
        self._post(("request_end", end))
        return end

    def _post(self, call: tuple[Any, ...]) -> None:
        worker = self._worker
        if worker is not None and not self._over:
            audit_loop.post(worker, self._enqueue, call)  # False: its loop is gone, we know

    def wait(self, timeout: float) -> bool:
        """Block until every handler call of this request ran, at most ``timeout`` seconds.

        ``timeout=0`` does not wait (nor count as a timeout): it tells whether they ran.
        """
        if self.done.done():
            return self.done.result()
        if timeout <= 0:  # "do not wait": the exit flush still waits for what is left
            return False
        if audit_loop.in_loop_thread():
            return False  # a handler started a request: waiting here would deadlock
        try:
            # Beyond TIMEOUT_MAX (inf, say) the lock's wait raises OverflowError: no limit.
            return self.done.result(timeout=timeout if timeout < threading.TIMEOUT_MAX else None)
        except concurrent.futures.TimeoutError:
            self._timed_out(timeout)
            return False

    async def await_done(self, timeout: float) -> bool:
        """Like :meth:`wait` without blocking the caller's event loop."""
        if self.done.done():
            return self.done.result()
        if timeout <= 0:
            return False
        if audit_loop.in_loop_thread():
            return False
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[None] = loop.create_future()

        def wake(_: object) -> None:
            # Runs on the audit loop; the caller's loop may be gone by then.
            try:
                loop.call_soon_threadsafe(_resolve, finished)
            except RuntimeError:
                pass

        self.done.add_done_callback(wake)
        try:
            await asyncio.wait_for(finished, timeout)
            return self.done.result()
        except asyncio.TimeoutError:
            self._timed_out(timeout)
            return False

    def _timed_out(self, timeout: float) -> None:
        TIMEOUTS.inc()
        logger.warning(
            "audit handlers of request %s did not finish within %.3gs; the application goes "
            "on and they keep running in the background (raise timeout= to wait longer)",
            self.start.request_id,
            timeout,
        )

    def _settle(self, completed: bool) -> None:
        self._over = True
        _in_flight.discard(self)
        try:
            self.done.set_result(completed)
        except concurrent.futures.InvalidStateError:  # settled already
            pass

    def worker_lost(self, error: BaseException | None) -> None:
        """The audit loop's thread ended before this request's calls all ran (it logged so)."""
        self._settle(False)

    # -- audit loop side -----------------------------------------------------------

    def _enqueue(self, call: tuple[Any, ...]) -> None:
        if self._over:  # lost with its loop: no new call starts on a loop being disposed
            return
        kind = call[0]
        starting = kind == "event_start"
        if starting:
            self._starts_taken += 1  # read by begin_event, on the application's side
        skipped = self._skipped if kind == "event_end" else None
        for index, queue in enumerate(self._queues):
            if starting:
                if len(queue) >= MAX_QUEUED_CALLS:
                    # The newest call goes: those queued are older, and a handler that
                    # far behind would only fall further back keeping them all.
                    self._skipped.setdefault(index, set()).add(call[1])
                    self._drop_call(index, starting)
                    continue
            elif skipped:
                numbers = skipped.get(index)
                if numbers is not None and call[1] in numbers:
                    numbers.discard(call[1])
                    if not numbers:
                        del skipped[index]
                    self._drop_call(index, starting)  # its start was dropped: not given alone
                    continue
            queue.append(call)
            if not self._draining[index]:
                self._draining[index] = True
                self._start_drain(index)

    def _drop_call(self, index: int, start: bool) -> None:
        """One call of handler ``index`` not queued: the handler is too far behind."""
        total = self._count_dropped(1, start, index)
        name = type(self.handlers[index]).__name__
        held = telemetry.log_turn(("audit", name, "queue full"))
        if held is None:
            return
        try:
            logger.warning(
                "audit handler %s has %d calls of request %s waiting for it "
                "(runner.MAX_QUEUED_CALLS): the request's newest events are not handed to it "
                "until it catches up; its request_end still is (%d calls dropped so far in "
                "this request, counted in audit.calls_dropped)%s",
                name,
                len(self._queues[index]),
                self.start.request_id,
                total,
                f" ({held} more such drops of it in the last interval)" if held else "",
            )
        except Exception:  # pragma: no cover - a broken log filter: counted all the same
            pass

    def _start_drain(self, index: int) -> None:
        task = asyncio.get_running_loop().create_task(
            self._drain(index),
            name=f"audit handler {type(self.handlers[index]).__name__} "
            f"of request {self.start.request_id}",
        )
        _tasks.add(task)  # keep a reference until it finishes
        task.add_done_callback(lambda done: self._drained(index, done))

    async def _drain(self, index: int) -> None:
        queue = self._queues[index]
        while queue and not self._over:  # done early: lost with its loop
            await self._invoke(index, queue.popleft())

    def _drained(self, index: int, task: asyncio.Task[None]) -> None:
        # Only here does a handler's queue stop being drained: a call queued after the
        # task's last look at the queue, or left by a task cut short, is run by a new one.
        _tasks.discard(task)
        error = asyncio.CancelledError() if task.cancelled() else task.exception()
        if self._over:  # finished, or lost with its loop (that was logged)
            self._draining[index] = False
            return
        if error is not None and not isinstance(error, GeneratorExit):  # that one: reported
            report_loop_error(error, "stopped running an audit handler's calls")
        if self._queues[index]:
            self._start_drain(index)
        else:
            self._draining[index] = False

    async def _invoke(self, index: int, call: tuple[Any, ...]) -> None:
        handler = self.handlers[index]
        kind = call[0]
        args: tuple[Any, ...]
        if kind == "request_start":
            args = (self.start,)
        elif kind == "event_start":
            args = (call[2], self._request_ctx[index])
        elif kind == "event_end":
            args = (call[2], self._request_ctx[index], self._event_ctx[index].pop(call[1], None))
        else:
            args = (self._told_of_drops(index, call[1]), self._request_ctx[index])
        result: Any = None
        closing: GeneratorExit | None = None
        watch: _Watch | None = None
        threshold = SLOW_CALL_SECONDS
        if 0 < threshold < math.inf:
            watch = _Watch(handler, kind, self.start.request_id)
            watch.start(threshold)
        try:
            result = await _call(getattr(handler, kind), args, watch)
        except BaseException as exc:
            if self._over:  # lost with its loop (logged then): its calls stop here
                raise
            # Whatever the handler raised, SystemExit and KeyboardInterrupt included, is
            # its failure: on this thread they could only kill the audit loop, not stop
            # the application (a real Ctrl-C goes to the main thread, never here).
            request_id = self.start.request_id
            if len(self.errors) < MAX_KEPT_ERRORS:
                self.errors.append(HandlerError(handler, kind, exc, request_id))
            else:
                self.errors_omitted += 1
            _report(handler, kind, request_id, exc)
            if isinstance(exc, GeneratorExit):  # this coroutine may be being closed
                closing = exc
        finally:
            if watch is not None:
                watch.stop()
        if kind == "request_start":
            self._request_ctx[index] = result
        elif kind == "event_start":
            self._event_ctx[index][call[1]] = result
        elif kind == "request_end":
            self._request_ctx[index] = None
            self._event_ctx[index].clear()
            self._remaining -= 1
            if self._remaining == 0:
                self._settle(True)
                if self._worker is not None:
                    audit_loop.release(self._worker, self)
        if closing is not None:
            raise closing

    def _told_of_drops(self, index: int, end: RequestEnd) -> RequestEnd:
        """``end`` for handler ``index``, with the events it was not handed: all are
        counted by now (their starts were taken before this request_end)."""
        missed = self._events_dropped[index]
        return dataclasses.replace(end, events_dropped=missed) if missed else end


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _unfinished(event: Event, ended_at: datetime) -> Event:
    """The end of an event the request's end cut short: it ended then."""
    changes: dict[str, Any] = {"timestamp": ended_at}
    if any(f.name == "error" for f in dataclasses.fields(event)):
        changes["error"] = UNFINISHED
    return dataclasses.replace(event, **changes)


class _InFlight:
    """The requests whose handler calls have not all run, for the exit flush."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: set[RequestRun] = set()
        #: The runs of ``_runs`` that have ended (their calls are all the audit's to run).
        self._ended: set[RequestRun] = set()
        self._hooked = False
        self.spent = 0.0  # seconds the exit flush has waited so far
        self.interrupted = False  # Ctrl-C while it waited: it waits no more

    def admit(self, run: RequestRun) -> bool:
        """Add ``run``, unless :data:`MAX_PENDING_REQUESTS` ended requests wait already."""
        with self._lock:
            if len(self._ended) >= MAX_PENDING_REQUESTS:
                return False
            self._runs.add(run)
            if self._hooked:
                return True
            self._hooked = True
        _hook_exit()
        return True

    def ended(self, run: RequestRun) -> None:
        with self._lock:
            if run in self._runs:
                self._ended.add(run)

    def discard(self, run: RequestRun) -> None:
        with self._lock:
            self._runs.discard(run)
            self._ended.discard(run)

    def runs(self) -> list[RequestRun]:
        with self._lock:
            return sorted(self._runs, key=lambda run: run.seq)

    def reset_after_fork(self) -> None:
        # The parent's requests are not this process's to wait for; hooks stay registered.
        inherited = self._runs
        self._lock = threading.Lock()
        self._runs = set()
        self._ended = set()
        self.spent = 0.0
        self.interrupted = False
        # A request open at fork() goes on in the child (its block is still to be
        # left there), but its handler calls run on the parent's audit loop, which the
        # child does not have: it ends at once there, as not completed, instead of
        # waiting out its timeout for calls that never come.
        for run in inherited:
            if not run._over:
                LOST_IN_FORK.inc()
            run._settle(False)


_in_flight = _InFlight()

#: When a dropped request was last logged (``time.monotonic()``).
_dropped_logged_at = [float("-inf")]


def _report_dropped(start: RequestStart) -> None:
    REQUESTS_DROPPED.inc()
    now = time.monotonic()
    if now - _dropped_logged_at[0] < 10.0:
        return
    _dropped_logged_at[0] = now
    logger.warning(
        "audit handlers are behind: the calls of %d ended requests are waiting "
        "(runner.MAX_PENDING_REQUESTS); request %s is not audited "
        "(%d requests dropped so far, counted in audit.requests_dropped)",
        MAX_PENDING_REQUESTS,
        start.request_id,
        REQUESTS_DROPPED.value,
    )


def _hook_exit() -> None:
    """Register the exit flush (at the first request with handlers)."""
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(_flush_before_threads_stop)
        except RuntimeError:  # the interpreter is exiting already: atexit alone
            pass
    atexit.register(_flush_at_exit)


def _flush_before_threads_stop() -> None:
    """First part of the exit flush: wait for the requests that have ended.

    Runs before ``concurrent.futures`` stops every ``ThreadPoolExecutor`` and before
    non-daemon threads are joined (those may still be serving requests: not waited for).
    """
    _wait_at_exit(again=False)


def _flush_at_exit() -> None:
    """Last part of the exit flush: wait for what non-daemon threads ended, then report."""
    try:
        run_exit_hooks()  # the LLM streams still open end (see instrumentation._exit)
    except KeyboardInterrupt:  # Ctrl-C there: wait no more, report
        _in_flight.interrupted = True
    _wait_at_exit(again=True)
    _report_at_exit()


def _wait_at_exit(again: bool) -> None:
    """Wait for ended requests, within what is left of :data:`EXIT_FLUSH_SECONDS`.

    ``again``: look again when those have finished, for requests ended meanwhile.
    """
    if _in_flight.interrupted:
        return
    run_deferred()  # requests ended meanwhile by ends put off (see instrumentation._spans)
    began = time.monotonic()
    deadline = began + max(0.0, EXIT_FLUSH_SECONDS - _in_flight.spent)
    try:
        while True:
            waiting = [run.done for run in _in_flight.runs() if run.ended and not run._over]
            left = deadline - time.monotonic()
            if not waiting or left <= 0:
                return
            concurrent.futures.wait(waiting, timeout=left)
            if not again:
                return
    except KeyboardInterrupt:  # Ctrl-C again while exiting: wait no more, report
        _in_flight.interrupted = True
    finally:
        _in_flight.spent += time.monotonic() - began


def _report_at_exit() -> None:
    """Log and count the requests the exit leaves with handler calls not run."""
    runs = [run for run in _in_flight.runs() if not run._over]
    behind = [run for run in runs if run.ended]
    open_ = [run for run in runs if not run.ended]
    if not runs:
        return
    EXIT_UNFINISHED.add(len(runs))
    try:
        if behind:
            logger.error(
                "audit: the interpreter exits with %d request(s) whose handler calls had not "
                "all run after the exit waited %.3gs for them (at most EXIT_FLUSH_SECONDS, "
                "%.3gs%s); their remaining calls are lost (counted in "
                "audit.exit_unfinished): %s",
                len(behind),
                _in_flight.spent,
                EXIT_FLUSH_SECONDS,
                ", cut short by Ctrl-C" if _in_flight.interrupted else "",
                _describe(behind),
            )
        if open_:
            logger.error(
                "audit: the interpreter exits with %d request(s) not ended (their code was "
                "still running in a daemon thread, or never left the request); their "
                "handlers get no request_end (counted in audit.exit_unfinished): %s",
                len(open_),
                _describe(open_),
            )
    except Exception:  # pragma: no cover - a broken log handler: counted all the same
        pass


def _describe(runs: Sequence[RequestRun], most: int = 10) -> str:
    named = ", ".join(
        f"{run.start.request_id} ({', '.join(type(h).__name__ for h in run.handlers)})"
        for run in runs[:most]
    )
    return named if len(runs) <= most else f"{named} and {len(runs) - most} more"


if hasattr(os, "register_at_fork"):  # pragma: no branch
    os.register_at_fork(after_in_child=_in_flight.reset_after_fork)

__all__ = [
    "EXIT_FLUSH_SECONDS",
    "MAX_KEPT_ERRORS",
    "MAX_PENDING_REQUESTS",
    "MAX_POSTED_EVENTS",
    "MAX_QUEUED_CALLS",
    "SLOW_CALL_SECONDS",
    "HandlerError",
]
