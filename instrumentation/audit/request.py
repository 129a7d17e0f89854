"""``audit.request()``: one user request, by hand, for sync and async code.

::

    with audit.request(question=q, collection="recipes", handlers=[h]) as req:
        req.result = answer(q)

Entering calls every handler's ``request_start``; LLM calls inside the block become
``event_start``/``event_end``; leaving calls ``request_end`` (with the error, if the
block raised, which then propagates) and waits until every handler call of the
request has run, at most ``timeout`` seconds. ``timeout=0`` does not wait (and is no
timeout: nothing is logged or counted); the calls run in the background, and those
still running when the interpreter exits are waited for then (see ``runner``).
Leaving with ``KeyboardInterrupt``, ``SystemExit`` or a cancellation does not wait
either: the application is being stopped. Leaving with ``GeneratorExit`` (a generator
closed before its end: its caller stopped reading) is no error: ``request_end`` gets
``error=None`` and ``abandoned=True``.

The events handed to the handlers are deep copies (``audit.event()``'s start and end
alike, unless a field cannot be copied): the handlers run later, on another thread,
and see them as they were when handed over, whatever the application changes after.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from contextvars import Token
from functools import partial
from typing import Any, Generic, TypeVar

from instrumentation._spans import ending_now, put_off_in_collection
from instrumentation._text import describe_error
from instrumentation.audit.base import EventHandler
from instrumentation.audit.collector import current_run, registry
from instrumentation.audit.events import Event, RequestStart, _now
from instrumentation.audit.runner import (
    HandlerError,
    RequestRun,
    check_handlers,
    check_timeout,
    interrupting,
)
from instrumentation.context import current_span_id, is_suppressed

#: Seconds a request's exit waits for its handlers, unless ``timeout=`` says otherwise.
DEFAULT_TIMEOUT = 10.0

E = TypeVar("E", bound=Event)


class AuditRequest:
    """An active request; set :attr:`result` before the block ends.

    After the block, :attr:`completed` tells whether the handlers finished within the
    timeout (with ``timeout=0``, whether they had finished already) and :attr:`errors`
    lists the handler calls that raised (the first ``runner.MAX_KEPT_ERRORS``; see
    :attr:`errors_omitted`).
    """

    def __init__(
        self,
        question: str,
        collection: str,
        handlers: Sequence[EventHandler[Any, Any]],
        metadata: Mapping[str, Any] | None,
        timeout: float,
    ) -> None:
        self._run: RequestRun | None = None  # first: __del__ reads it, also if a check fails
        if not isinstance(question, str):
            raise TypeError(
                f"question is the user's request as a str; got {type(question).__name__}"
            )
        if not isinstance(collection, str):
            raise TypeError(
                "collection names what was asked (a str such as 'recipes'); "
                f"got {type(collection).__name__}"
            )
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(f"metadata is a dict of extra fields; got {type(metadata).__name__}")
        self.handlers = check_handlers(handlers)
        self.timeout = check_timeout(timeout)
        self.start = RequestStart(
            question=question, collection=collection, metadata=dict(metadata or {})
        )
        self.result: Any = None
        self.completed: bool | None = None
        self._token: Token[RequestRun | None] | None = None
        self._used = False
        self._left = False

    @property
    def id(self) -> str:
        return self.start.request_id

    @property
    def dropped(self) -> bool:
        """True when no handler saw this request: the calls of too many requests were
        still waiting (see ``runner.MAX_PENDING_REQUESTS``); :attr:`completed` is False."""
        return self._run is not None and self._run.dropped

    @property
    def errors(self) -> list[HandlerError]:
        """Handler calls of this request that raised (complete once they all ran: after
        the block, if :attr:`completed`)."""
        return [] if self._run is None else list(self._run.errors)

    @property
    def errors_omitted(self) -> int:
        """Handler errors left out of :attr:`errors`, which keeps the first
        ``runner.MAX_KEPT_ERRORS`` (they are logged and counted all the same)."""
        return 0 if self._run is None else self._run.errors_omitted

    @property
    def calls_dropped(self) -> int:
        """Handler calls not made: events not handed to a handler that had
        ``runner.MAX_QUEUED_CALLS`` calls of this request waiting (start and end count
        one each)."""
        return 0 if self._run is None else self._run.calls_dropped

    def _begin(self) -> None:
        if self._used:
            raise RuntimeError("an audit request is entered once; call audit.request() per request")
        self._used = True
        if is_suppressed():
            return  # inside the library's own work (or a handler): not audited
        run = RequestRun(self.handlers, self.start)
        self.start = run.start  # stamped when the request began, after any library start-up
        registry.activate(run)
        self._run = run
        self._token = current_run.set(run)

    def _end(self, exc: BaseException | None) -> RequestRun | None:
        run = self._run
        ended_when_freed = self._left
        self._left = True
        if run is None:
            return None
        if self._token is not None:
            try:
                current_run.reset(self._token)
            except ValueError:  # left in another context than it was entered in
                current_run.set(None)
            self._token = None
        if ended_when_freed:
            # The garbage collector ran __del__ first, then closed the generator this
            # block is in (the two were garbage together): the request has ended.
            self.completed = False
            return None
        if put_off_in_collection("request_end", "", partial(self._close, run, exc)):
            # A generator closed by the garbage collector, which may have stopped this
            # library on this thread holding the registry's lock: the request ends once
            # the collection is over (see instrumentation._spans.later), unwaited.
            self.completed = False
            return None
        self._close(run, exc)
        return run

    def _close(self, run: RequestRun, exc: BaseException | None) -> None:
        # A generator closed inside the block: its caller stopped reading the stream.
        abandoned = isinstance(exc, GeneratorExit)
        try:
            run.finish(
                result=None if exc is not None else self.result,
                error=None if abandoned else exc,
                abandoned=abandoned,
            )
        finally:
            registry.deactivate(run)

    def __del__(self) -> None:
        # Freed inside the block: an async generator that an event loop closed without
        # shutdown_asyncgens() freed unclosed (its finally blocks, this block's exit
        # among them, never ran). The request ends as a generator closed early does,
        # abandoned, rather than stay active for good (its run kept, every later LLM
        # call collected for nothing). current_run is left alone: this runs in whatever
        # context freed the block.
        run = self._run
        if run is None or self._left:
            return
        self._left = True
        close = partial(self._close, run, GeneratorExit())
        if not put_off_in_collection("request_end", "", close):
            close()

    def __enter__(self) -> AuditRequest:
        self._begin()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        run = self._end(exc)
        if run is not None:
            # Ctrl-C or SystemExit: the application is being stopped, not to be held up
            # by its handlers; their calls go on, and the exit flush waits for them.
            # Nor by a wait inside the garbage collector, or after the exit's flush.
            self.completed = run.wait(0 if interrupting(exc) or ending_now() else self.timeout)

    async def __aenter__(self) -> AuditRequest:
        self._begin()
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        run = self._end(exc)
        if run is not None:
            # Ctrl-C, SystemExit or the task cancelled: no wait (see __exit__).
            self.completed = await run.await_done(0 if interrupting(exc) else self.timeout)


def request(
    question: str,
    collection: str = "",
    *,
    handlers: Sequence[EventHandler[Any, Any]],
    metadata: Mapping[str, Any] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> AuditRequest:
    """A request for ``with``/``async with``; see the module docstring."""
    return AuditRequest(question, collection, handlers, metadata, timeout)


def _deep_copy(event: E) -> E:
    """A copy of ``event`` that the caller's later changes do not reach."""
    try:
        return copy.deepcopy(event)
    except Exception:  # a field that cannot be copied: the top level at least
        return copy.copy(event)


class AuditEvent(Generic[E]):
    """An event by hand inside the current request; :meth:`update` fields for its end."""

    def __init__(self, event: E) -> None:
        if not isinstance(event, Event) or not dataclasses.is_dataclass(event):
            raise TypeError(
                "audit.event() takes an audit event such as ToolCallEvent(name='search') "
                f"or RetrievalEvent(query='...'); got {type(event).__name__}"
            )
        #: The caller's event object: the end event is made from it at exit, so fields
        #: set on it inside the block reach the end.
        self.given = event
        #: The start event the handlers got (a stamped copy of ``given`` once entered).
        self.started = event
        self.changes: dict[str, Any] = {}
        self._runs: tuple[RequestRun, ...] = ()
        self._key = object()

    def update(self, **changes: Any) -> None:
        """Fields the end event gets (e.g. ``output=...``, ``documents=[...]``)."""
        names = {f.name for f in dataclasses.fields(self.started)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(
                f"{type(self.started).__name__} has no field(s) {unknown}; "
                f"its fields are {sorted(names)}"
            )
        self.changes.update(changes)

    def __enter__(self) -> AuditEvent[E]:
        # The request of audit.request() around it, or of a request span it runs in
        # (attach()), for every adapter that made one of that span.
        runs = registry.runs_for(current_span_id())
        if runs:
            # Its time is when the block begins (here, on the application's side), not
            # when the event object was made. The handlers get a deep copy, which does
            # not change after it is handed over (lists in it included), unless a
            # field cannot be copied.
            self.started = dataclasses.replace(_deep_copy(self.given), timestamp=_now())
            self._runs = runs
            if put_off_in_collection("event_start", "", self._send_start):
                return self  # in a generator's finally the collector runs: see _end
            self._send_start()
        return self

    def _send_start(self) -> None:
        self._runs = tuple(run for run in self._runs if run.begin_event(self._key, self.started))

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if not self._runs:
            return
        changes = dict(self.changes)
        changes.setdefault("timestamp", _now())  # when it ended, on the application's side
        if exc is not None and any(f.name == "error" for f in dataclasses.fields(self.started)):
            changes.setdefault("error", describe_error(exc))
        ended = dataclasses.replace(self.given, **changes)
        if put_off_in_collection("event_end", "", partial(self._send_end, ended)):
            return  # a generator closed by the garbage collector: see AuditRequest._end
        self._send_end(ended)

    def _send_end(self, ended: E) -> None:
        for run in self._runs:
            # A deep copy too, like the start event: the handlers run later, on another
            # thread, and must not see the caller change the lists in it after the block.
            run.end_event(self._key, _deep_copy(ended))

    async def __aenter__(self) -> AuditEvent[E]:
        return self.__enter__()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.__exit__(exc_type, exc, tb)


def event(event: E) -> AuditEvent[E]:
    """An event by hand: ``with audit.event(ToolCallEvent(name="search")) as ev:``.

    Call ``ev.update(output=...)`` inside the block for the fields of its end.
    """
    return AuditEvent(event)


__all__ = ["DEFAULT_TIMEOUT", "AuditEvent", "AuditRequest", "event", "request"]
