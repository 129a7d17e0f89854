"""Audit handlers on a dispatcher: request spans become audited requests.

``attach(dispatcher, [FileEventHandler("logs")])`` attaches an :class:`AuditAdapter`
(a span handler) to ``dispatcher``. Every span marked as a request that reaches it,
``@dispatcher.span(request=True)`` on the dispatcher or any dispatcher below it,
becomes ``request_start``/``request_end``; LLM calls inside it, through any
dispatcher, become ``event_start``/``event_end``.

What the request is made of, from the span:

* ``question``: the call's argument named ``question``, ``query``, ``user_request``
  or ``prompt`` (the first that is a str), else its first str argument, else the
  default of one of those names that the call left out, else "".
* ``collection``: ``attributes={"collection": ...}`` on the span, else a str argument
  named ``collection`` (passed, else its default), else the adapter's
  ``collection=``, else the dispatcher's name.
* ``metadata``: the span's name, id, trace id and dispatcher, and its tags.
* ``result``: what the call returned (``None`` for a generator: what it yielded is
  not kept); ``error``: what it raised. A generator closed before its end (its caller
  stopped reading the stream) ends with ``error=None`` and ``abandoned=True``.

Several adapters seeing the same request span (two on one dispatcher, or one on a
parent and one on a child dispatcher) each make a request of it, and each gets all of
its events.

When the span ends, the adapter waits for the request's handler calls, at most
``timeout`` seconds, before the call returns: it blocks the thread that ends the span,
and in async code (a coroutine, an async generator, an ``async with`` block) it awaits
instead, so the event loop's other tasks go on meanwhile. (A plain function called
from a coroutine blocks the loop while it runs, and while it waits.) Awaited, the wait
is part of the call: a cancellation or an ``asyncio.timeout`` that comes during it is
raised, and the call's result is lost (its request ended all the same). It does not wait
when the span ended with ``KeyboardInterrupt``, ``SystemExit`` or a cancellation: the
application is stopping.

It waits once every span handler has seen the span end, in
:meth:`AuditAdapter.after_span_end` (which the core calls after the whole handler
chain), not inside its own ``span_exit``: the span handlers after it in the chain (an
OpenTelemetry handler on the root, say) would otherwise end their spans only after
the wait, and export a fast call as a span as long as the audit handlers took.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import PrivateAttr, field_validator

from instrumentation._spans import ending_now
from instrumentation.audit import runner
from instrumentation.audit.base import EventHandler
from instrumentation.audit.collector import registry
from instrumentation.audit.events import RequestStart
from instrumentation.audit.request import DEFAULT_TIMEOUT
from instrumentation.audit.runner import (
    HandlerError,
    RequestRun,
    check_handlers,
    check_timeout,
    interrupting,
)
from instrumentation.dispatcher import Dispatcher
from instrumentation.span.base import BaseSpan
from instrumentation.span_handlers.base import BaseSpanHandler

QUESTION_ARGUMENTS = ("question", "query", "user_request", "prompt")


#: The arguments whose defaults count when a call leaves them out.
_DEFAULTED = (*QUESTION_ARGUMENTS, "collection")


def _defaults(bound_args: inspect.BoundArguments) -> Mapping[str, Any]:
    """The defaults of the question and collection arguments the call left out:
    ``ask()`` of ``def ask(question="...")`` asks that default. They count only after
    what the call passed, and other defaults not at all (a ``system_prompt`` default
    is no question to record)."""
    arguments = bound_args.arguments
    try:
        parameters = bound_args.signature.parameters
    except Exception:  # a hand-made BoundArguments without a usable signature
        return {}
    return {
        name: parameters[name].default
        for name in _DEFAULTED
        if name in parameters
        and name not in arguments
        and parameters[name].default is not inspect.Parameter.empty
    }


def _question(arguments: Mapping[str, Any], defaults: Mapping[str, Any]) -> str:
    for name in QUESTION_ARGUMENTS:
        value = arguments.get(name)
        if isinstance(value, str):
            return value
    for value in arguments.values():
        if isinstance(value, str):
            return value
    for name in QUESTION_ARGUMENTS:
        value = defaults.get(name)
        if isinstance(value, str):
            return value
    return ""


def _collection(
    arguments: Mapping[str, Any],
    defaults: Mapping[str, Any],
    attributes: Mapping[str, Any],
    fixed: str | None,
    dispatcher: str,
) -> str:
    for given in (attributes.get("collection"), arguments.get("collection")):
        if isinstance(given, str):
            return given
    default = defaults.get("collection")
    if isinstance(default, str):
        return default
    return fixed if fixed is not None else dispatcher


class _Tally:
    """What an adapter's requests ran into, summed as each one's handler calls have all
    run: a request span has no object of its own to read it from, as an
    ``audit.request()`` block has (``req.errors``, ``req.calls_dropped``...)."""

    __slots__ = ("calls_dropped", "errors", "errors_omitted", "requests_dropped")

    def __init__(self) -> None:
        self.errors: list[HandlerError] = []
        self.errors_omitted = 0
        self.calls_dropped = 0
        self.requests_dropped = 0

    def add(self, run: RequestRun) -> None:
        room = max(0, runner.MAX_KEPT_ERRORS - len(self.errors))
        self.errors.extend(run.errors[:room])
        self.errors_omitted += run.errors_omitted + max(0, len(run.errors) - room)
        self.calls_dropped += run.calls_dropped
        self.requests_dropped += run.dropped


class AuditAdapter(BaseSpanHandler[BaseSpan]):
    """A span handler that runs audit handlers for each request span (see the module doc)."""

    handlers: list[Any]
    timeout: float = DEFAULT_TIMEOUT
    collection: str | None = None
    _attached: list[Dispatcher] = PrivateAttr(default_factory=list)
    _pending: set[RequestRun] = PrivateAttr(default_factory=set)
    _tally: _Tally = PrivateAttr(default_factory=_Tally)
    if TYPE_CHECKING:
        # Put straight in __dict__ by model_post_init: every span's end reads them (most
        # to find it is no request), and a pydantic private attribute is read through
        # BaseModel.__getattr__, over a microsecond each time.
        @property
        def _runs(self) -> dict[str, RequestRun]: ...
        @property
        def _guard(self) -> threading.Lock: ...
        @property
        def _deferred(self) -> dict[str, RequestRun]:
            """Ended request spans whose wait is for after_span_end, by span id."""

    @field_validator("timeout", mode="before")
    @classmethod
    def _valid_timeout(cls, value: Any) -> float:
        # Before pydantic's own coercion, which took "5" and True as numbers.
        return check_timeout(value)

    def model_post_init(self, __context: Any) -> None:
        super().model_post_init(__context)
        self.__dict__.update(_runs={}, _guard=threading.Lock(), _deferred={})
        self.handlers = list(check_handlers(self.handlers))

    def __eq__(self, other: object) -> bool:
        # Each adapter runs requests of its own: two with the same fields are not one
        # (pydantic's field-wise equality made ``[a1, a2].index(a2)`` answer 0).
        return self is other

    __hash__ = object.__hash__

    def span_enter(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        parent_id: str | None = None,
        tags: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        attributes = kwargs.get("attributes") or {}
        if not attributes.get("request"):
            return
        arguments = bound_args.arguments
        defaults = _defaults(bound_args)
        dispatcher = str(kwargs.get("dispatcher", ""))
        start = RequestStart(
            question=_question(arguments, defaults),
            collection=_collection(arguments, defaults, attributes, self.collection, dispatcher),
            metadata={
                "span_name": kwargs.get("name"),
                "span_id": id_,
                "trace_id": kwargs.get("trace_id"),
                "dispatcher": dispatcher,
                "tags": dict(tags or {}),
            },
        )
        run = RequestRun(self.handlers, start)
        with self._guard:
            self._runs[id_] = run
        registry.activate(run, span_id=id_)

    def span_exit(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        result: Any | None = None,
        **kwargs: Any,
    ) -> None:
        self._end(id_, result, None)

    def span_drop(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        err: BaseException | None = None,
        **kwargs: Any,
    ) -> None:
        self._end(id_, None, err if err is not None else RuntimeError("request span dropped"))

    def _end(self, id_: str, result: Any, error: BaseException | None) -> None:
        with self._guard:
            run = self._runs.pop(id_, None)
        if run is None:
            return
        # A generator closed before its end: its caller stopped reading the stream.
        abandoned = isinstance(error, GeneratorExit)
        try:
            run.finish(result=result, error=None if abandoned else error, abandoned=abandoned)
        finally:
            registry.deactivate(run)
        self._track(run)
        if self.timeout <= 0 or run.done.done() or interrupting(error) or ending_now():
            # Ctrl-C, SystemExit or a cancelled task: the application is being stopped,
            # not to be held up by the handlers (their calls go on; the exit waits). Nor
            # is a span ended inside the garbage collector, or after the exit's flush.
            return
        # Waited for in after_span_end, once the handlers after this one in the chain
        # have ended their spans: their clocks are not to include the wait.
        with self._guard:
            self._deferred[id_] = run
        # Should no after_span_end come for it (a span ended by hand through another
        # path), the entry goes once its calls have run.
        run.done.add_done_callback(lambda _: self._forget(id_, run))

    def after_span_end(self, id_: str) -> None:
        """Wait for the handler calls of request span ``id_``, at most ``timeout`` seconds.

        The core calls it once every span handler of the span has seen it end, on the
        thread that ended it; for other spans it does nothing.
        """
        with self._guard:
            run = self._deferred.pop(id_, None)
        if run is not None:
            run.wait(self.timeout)

    async def after_span_end_async(self, id_: str) -> None:
        """:meth:`after_span_end` for a span ended in async code: awaits the handler
        calls, at most ``timeout`` seconds, without blocking the event loop."""
        with self._guard:
            run = self._deferred.pop(id_, None)
        if run is None:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            # Not asyncio's (trio, a coroutine driven by hand): nothing to await on,
            # and after_span_end was skipped for this span: wait as it does.
            run.wait(self.timeout)
            return
        await run.await_done(self.timeout)

    def _forget(self, id_: str, run: RequestRun) -> None:
        with self._guard:
            if self._deferred.get(id_) is run:
                del self._deferred[id_]

    def _track(self, run: RequestRun) -> None:
        """``run`` has ended: :meth:`flush` waits for its handler calls until they ran."""
        with self._guard:
            self._pending.add(run)
        run.done.add_done_callback(lambda _: self._settled(run))

    def _settled(self, run: RequestRun) -> None:
        with self._guard:
            self._pending.discard(run)
            self._tally.add(run)

    def flush(self, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """Wait until the handler calls of every ended request have run (``timeout=0`` mode)."""
        deadline = time.monotonic() + check_timeout(timeout)
        with self._guard:
            runs = list(self._pending)
        return all(run.wait(max(0.0, deadline - time.monotonic())) for run in runs)

    async def aflush(self, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """:meth:`flush` for async code: waits without blocking the event loop."""
        deadline = time.monotonic() + check_timeout(timeout)
        with self._guard:
            runs = list(self._pending)
        for run in runs:
            if not await run.await_done(max(0.0, deadline - time.monotonic())):
                return False
        return True

    @property
    def active_requests(self) -> int:
        return len(self._runs)

    @property
    def errors(self) -> list[HandlerError]:
        """Handler calls that raised, in this adapter's requests whose calls have all run
        (after :meth:`flush`, all of them): the first ``runner.MAX_KEPT_ERRORS``, as a
        request keeps them. Each is logged and counted too."""
        with self._guard:
            return list(self._tally.errors)

    @property
    def errors_omitted(self) -> int:
        """Handler errors left out of :attr:`errors` (logged and counted all the same)."""
        with self._guard:
            return self._tally.errors_omitted

    @property
    def calls_dropped(self) -> int:
        """Handler calls not made in this adapter's requests: events not handed to a
        handler too far behind (``req.calls_dropped`` of ``audit.request()``)."""
        with self._guard:
            return self._tally.calls_dropped

    @property
    def requests_dropped(self) -> int:
        """Request spans no handler saw: the calls of ``runner.MAX_PENDING_REQUESTS``
        ended requests were waiting (``req.dropped`` of ``audit.request()``)."""
        with self._guard:
            return self._tally.requests_dropped

    def detach(self) -> None:
        """Remove this adapter from every dispatcher :func:`attach` put it on."""
        for dispatcher in self._attached:
            dispatcher.remove_span_handler(self)
        self._attached.clear()

    def close(self) -> None:
        """End the requests still open (``Dispatcher.shutdown``), without waiting."""
        with self._guard:
            left = list(self._runs.items())
            self._runs.clear()
        for _, run in left:
            try:
                run.finish(error=RuntimeError("instrumentation shut down during the request"))
            finally:
                registry.deactivate(run)
            self._track(run)  # flush() after shutdown waits for these too

    def new_span(self, *args: Any, **kwargs: Any) -> None:
        return None

    def prepare_to_exit_span(self, *args: Any, **kwargs: Any) -> None:
        return None

    def prepare_to_drop_span(self, *args: Any, **kwargs: Any) -> None:
        return None


def attach(
    dispatcher: Dispatcher,
    handlers: Sequence[EventHandler[Any, Any]],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    collection: str | None = None,
) -> AuditAdapter:
    """Run ``handlers`` for every request span reaching ``dispatcher``; returns the adapter."""
    if not isinstance(dispatcher, Dispatcher):
        raise TypeError(
            "attach() takes a dispatcher, e.g. get_dispatcher('myapp'); "
            f"got {type(dispatcher).__name__}"
        )
    if collection is not None and not isinstance(collection, str):
        raise TypeError(f"collection is a str or None; got {type(collection).__name__}")
    # Checked here, as audit.request() does, for the same plain TypeError/ValueError
    # (the model would coerce "5" and True, and wrap the rest in a ValidationError).
    adapter = AuditAdapter(
        handlers=list(check_handlers(handlers)),
        timeout=check_timeout(timeout),
        collection=collection,
    )
    _refuse_running_twice(dispatcher, adapter.handlers)
    dispatcher.add_span_handler(adapter)
    adapter._attached.append(dispatcher)
    return adapter


def _refuse_running_twice(dispatcher: Dispatcher, handlers: Sequence[Any]) -> None:
    """A handler that another adapter already runs for the requests this one would see
    (attached here, above, or below) would run twice per request: two files, two log
    lines for each."""
    wanted = {id(h) for h in handlers}
    manager = dispatcher.manager
    nodes = [dispatcher] if manager is None else manager._subtree(dispatcher)
    for node in nodes:
        chain = node._hot
        for other in () if chain is None else chain.spans:
            if not isinstance(other, AuditAdapter):
                continue
            for handler in other.handlers:
                if id(handler) in wanted:
                    raise ValueError(
                        f"{type(handler).__name__} already runs for requests reaching "
                        f"{node.name!r} through another audit.attach(): pass all handlers to "
                        "one attach(), or detach() the other adapter first"
                    )


__all__ = ["AuditAdapter", "attach"]
