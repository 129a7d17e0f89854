"""Spans that cover a stream from the request to its last chunk, or to its abandonment.

A stream's body (the generator that makes the request and reads the chunks) is
driven by the object handed to the caller, which makes the stream's span current
each time the body runs, and only then, as ``@dispatcher.span`` does for a traced
generator. For an LLM stream, the caller stopping half way is not a failure: the
span should end and report the tokens seen so far. So the body, closed, ends the
call as abandoned and then the span (:class:`EndOnClose`).

Closing the body is all it takes, whoever does it: the caller (``close()``,
``with``), the garbage collector when the stream object is dropped (the body goes
with it), or, for an async stream, the event loop (its async-generator finaliser,
or its shutdown at the end of ``asyncio.run()``). Whoever closes it, the end event
is emitted inside the stream's span. A caller that stops the stream from another
thread or task, while the body waits for a chunk, cannot close it there: the body is
told to stop (and its source interrupted, if it can be), and ends the call when it
next runs. Nothing else is needed: no registry keeps a
stream alive, no finaliser has to run before another, and the caller's object is
not itself an async generator that the event loop would close on its own.

But a loop closes an async body only while it runs: one closed without
``shutdown_asyncgens()`` (``loop.close()`` after ``run_until_complete``) frees the
body unclosed. Then the body's frame lets go of its :class:`AsyncEndOnClose`, whose
``__del__`` ends the call, as abandoned.

Streams start eagerly: the body is advanced once at creation, so the request (and a
request error, which drops the span) happens inside the span, as with LlamaIndex.

A stream still open when the interpreter exits (kept by the application, neither read
to its end nor closed) was closed by the garbage collector after the exit flushes, and
its end event went to a store or exporter already shut down. The streams are known
weakly (:data:`_open_streams`, :data:`_open_async_bodies`), and those still open end as
abandoned before those flushes (see :mod:`instrumentation._exit`).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import AsyncGenerator, Callable, Generator, Iterator
from types import TracebackType
from typing import Any, Generic, TypeVar

from instrumentation import _aio, telemetry
from instrumentation._exit import before_exit_flush
from instrumentation._spans import (
    EMPTY_BOUND_ARGS,
    LazyBoundArguments,
    LazySignature,
    fail,
    finish,
    in_collection,
    later,
    start,
)
from instrumentation.context import (
    SpanContext,
    _active_span,
    _suppressed,
    activate,
    current_span,
    deactivate,
    suspend,
)
from instrumentation.dispatcher import Dispatcher

logger = logging.getLogger("instrumentation.llms")

T = TypeVar("T")


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: Yielded first by a stream body, once the request is made.
READY: Any = _Marker("READY")


def _count_close_error(exc: BaseException) -> None:
    telemetry.counter("llms.stream_close_errors").inc()
    logger.warning("closing an LLM stream failed: %r", exc)


class StreamSpan:
    """The span of one stream: opened under the current span when made, current while
    the body runs, ended once (by the body's end, error or close).

    It also carries what the caller's side and the body say to each other: whether
    the caller asked to stop while another thread or task was waiting for a chunk
    (``stop_requested``), how the body's source can be interrupted then
    (``interrupt``, set by the body), and whether a close comes from the caller
    (``by_caller``) rather than from the garbage collector or the event loop.

    Given a ``signature``, span handlers receive the call's arguments (``args`` and
    ``kwargs``, bound lazily) and ``instance``, as for ``@dispatcher.span``.
    """

    __slots__ = (
        "_bound",
        "_chain",
        "_current",
        "_instance",
        "_resumed",
        "by_caller",
        "context",
        "interrupt",
        "over",
        "reading",
        "stop_requested",
    )

    def __init__(
        self,
        dispatcher: Dispatcher,
        name: str,
        instance: Any = None,
        signature: LazySignature | None = None,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> None:
        chain = dispatcher._hot
        self.over = False
        #: An async read is under way (see ``AsyncEndOnClose.__aexit__``).
        self.reading = False
        self.stop_requested = False
        self.by_caller = False
        self.interrupt: Callable[[], Any] | None = None
        self._resumed: Any = None
        self._instance = instance
        self._bound: Any = EMPTY_BOUND_ARGS
        if chain is None or _suppressed.get():
            self._chain = None
            self.context: SpanContext | None = None
        else:
            self._chain = chain
            if signature is not None and chain.needs_bound_args:
                self._bound = LazyBoundArguments(signature, args, kwargs or {})
            self.context = start(chain, name, instance, self._bound, None)
        self._current = self.context

    def enter(self) -> Any:
        """Make the span current for one step of the body; :meth:`leave` undoes it."""
        current = self._current
        if current is None or self.over:
            return None
        try:
            return activate(current, self._resumed)
        except BaseException as err:  # a bridge's stop, nothing left current: see activate
            self.fail(err)
            raise

    def leave(self, handle: Any) -> None:
        if handle is None:
            return
        # What the body left current (a block it is inside) is current again next time.
        self._current = _active_span.get() or self.context
        self._resumed = suspend(handle)

    def finish(self) -> None:
        if self.over:
            return
        self.over = True
        if self._chain is not None and self.context is not None:
            finish(self._chain, self.context, self._bound, self._instance, None)
        self._let_go()

    def fail(self, err: BaseException) -> None:
        if self.over:
            return
        self.over = True
        if self._chain is not None and self.context is not None:
            fail(self._chain, self.context, self._bound, self._instance, err)
        self._let_go()

    def _let_go(self) -> None:
        """The handlers have seen the span end: a stream its caller keeps after that
        keeps the call's arguments (the messages, a long prompt) alive no more, as an
        untraced one does not."""
        self._bound = EMPTY_BOUND_ARGS
        self._instance = None

    def ended_by(self, err: BaseException) -> None:
        """The body raised ``err``: the span is dropped, unless the caller had asked to
        stop (interrupting the read is what raised it)."""
        if self.stop_requested:
            self.finish()
        else:
            self.fail(err)

    def end_call(self, end: Callable[[], object]) -> None:
        """Run ``end()`` (which emits the end event) with the span current: it is not
        when the garbage collector or the event loop closes the body on its own. If it
        fails, the span is dropped."""
        span = self.context
        handle = None if span is None or current_span() is span else activate(span)
        try:
            end()
        except BaseException as err:
            if isinstance(err, Exception):
                _count_close_error(err)
            self.fail(err)
            if not isinstance(err, Exception):
                raise
        finally:
            if handle is not None:
                deactivate(handle)


def _abandoning(span: StreamSpan, typ: type[BaseException] | None) -> bool:
    """Whether a body leaving its reading with ``typ`` ends the call as abandoned: it
    was closed, or its read failed because the caller stopped it from elsewhere."""
    if typ is None:
        return False
    return issubclass(typ, GeneratorExit) or span.stop_requested


class EndOnClose:
    """``with EndOnClose(span, end, close):`` around a stream body's reading: closed
    there, the body emits its end event (``end()``, as abandoned) inside the stream's
    span, closes its source (``close()``) and the span ends. The call is over once its
    end event is out: a source that fails to close is counted, not a failed span."""

    __slots__ = ("close", "end", "span")

    def __init__(
        self, span: StreamSpan, end: Callable[[], object], close: Callable[[], Any]
    ) -> None:
        self.span = span
        self.end = end
        self.close = close

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if not _abandoning(self.span, typ):
            return
        # Closed by the garbage collector, which may have stopped a handler holding
        # its lock on this thread: the end event waits for the collection to be over
        # (see instrumentation._spans.later), as the span's own end would.
        context = self.span.context
        if in_collection() and later("span_exit", context.id_ if context else "", self.abandon):
            return
        self.abandon()

    def abandon(self) -> None:
        """End the call as abandoned: its end event, then its source closed, then its span."""
        span = self.span
        try:
            span.end_call(self.end)
        finally:
            try:
                self.close()
            except Exception as err:
                _count_close_error(err)
            finally:
                span.finish()  # nothing more if the end event failed: the span was dropped


class AsyncEndOnClose(EndOnClose):
    """:class:`EndOnClose` for an async body: ``close()`` returns an awaitable. The end
    event goes out first, before anything else can run.

    A reader's task cancelled while it waits for a chunk (a client that went away, to
    an ASGI server) ends the call too: what the model produced so far was produced,
    and billed. Its end event goes out, as abandoned, and the span ends with the
    cancellation, which goes on. A cancellation that comes with no read (the loop's
    shutdown cancelling its close of a dropped stream) ends the span as that close
    would have: the stream was left early. Either way the span ends: it stayed open
    for good when ``asyncio.run()`` returned at once.

    A loop closed without ``shutdown_asyncgens()`` closes no body, and discards the
    closes it had scheduled: the body is freed with no ``finally`` of it run. Only the
    body's frame holds this object, so its ``__del__`` is then the one thing of the
    stream's that runs: it ends the call, as abandoned, as ``@dispatcher.span`` ends an
    async generator freed so (``instrumentation._wrap._EndWhenDiscarded``). The source
    is left unclosed, as it would be untraced: closing it takes a loop.
    """

    __slots__ = ("__weakref__", "left")

    def __init__(
        self, span: StreamSpan, end: Callable[[], object], close: Callable[[], Any]
    ) -> None:
        super().__init__(span, end, close)
        #: Whether the body left its reading (``__aexit__`` ran), or ``__del__`` or the
        #: exit ended the call for it: whichever comes first ends the call, and only it.
        self.left = False

    def __del__(self) -> None:
        if self.left:
            return
        self.left = True
        span = self.span
        if span.over:  # a read that failed ended it
            return
        # In a collection, maybe inside a handler's lock: put off, as EndOnClose does.
        # A collection may also run this before the loop brings the body back to close
        # it (a body in a reference cycle): that close then finds the call ended.
        context = span.context
        if in_collection() and later("span_exit", context.id_ if context else "", self._freed):
            return
        self._freed()

    def end_at_exit(self) -> None:
        """The interpreter exits with the body open, in a loop that will not close it
        (never closed, or closed without ``shutdown_asyncgens()``): the call ends as
        ``__del__`` ends it. One whose read is under way (in a loop still running in a
        daemon thread) is left to that reader; one such a loop reads again later stops
        at its next chunk, as after ``aclose()`` from another task (reading on, it ended
        the call a second time)."""
        span = self.span
        if self.left or span.over or span.reading:
            return
        self.left = True
        span.stop_requested = True
        self._freed()

    def _freed(self) -> None:
        span = self.span
        try:
            span.end_call(self.end)
        finally:
            span.finish()  # nothing more if the end event failed: the span was dropped

    async def __aenter__(self) -> None:
        _open_async_bodies.add(self)

    async def __aexit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        ended, self.left = self.left, True
        if typ is None:
            return
        span = self.span
        if ended:  # by __del__, before the loop brought the body back to close it
            try:
                await self.close()
            except Exception as err:
                _count_close_error(err)
            return
        cancelled = _aio.is_cancellation_class(typ)
        if not cancelled and not _abandoning(span, typ):
            return
        try:
            if not span.over:
                span.end_call(self.end)
        finally:
            try:
                await self.close()
            except Exception as err:
                _count_close_error(err)
            finally:
                # Nothing more if the end event failed: the span was dropped. A
                # cancellation a read brought (the reader's task, cancelled while it
                # waited for a chunk) drops it; one that came with no read (the loop's
                # shutdown cancelling its close of a dropped stream) ends it as left
                # early, as a ``break`` leaves it.
                if cancelled and span.reading:
                    span.ended_by(exc if exc is not None else typ())
                else:
                    span.finish()


class SpannedStream(Iterator[T], Generic[T]):
    """The caller's side of a sync stream: iterate it; ``close()`` (or dropping it) ends
    the span with what was seen so far.

    ``close()`` from another thread while one waits for a chunk stops the stream there:
    the source is interrupted if the body can (an HTTP response is closed), and the
    reader gets what that raises, or, if nothing can be interrupted, the end of the
    stream in place of the next chunk.
    """

    __slots__ = ("__weakref__", "_body", "_owner", "_span", "_state")

    def __init__(self, body: Generator[Any, Any, Any], span: StreamSpan) -> None:
        self._body = body
        self._span = span
        # Guards _owner, by_caller and stop_requested, and is held only to read or set
        # them, never while the body (or a handler) runs: nothing ever waits for a body.
        self._state = threading.Lock()
        self._owner: int | None = None  # the thread in the body (reading or closing it)

    def __iter__(self) -> SpannedStream[T]:
        return self

    @property
    def closed(self) -> bool:
        """Closed, or being closed, by its caller (its span is over, or about to be)."""
        return self._span.by_caller

    def __next__(self) -> T:
        span = self._span
        with self._state:
            if span.by_caller:  # closed, or being closed (here or in another thread)
                raise StopIteration
            if self._owner is not None:  # in the body already (a handler, another thread)
                raise ValueError("generator already executing")
            self._owner = threading.get_ident()
        try:
            handle = span.enter()
            try:
                item: T = next(self._body)
            except StopIteration:
                span.finish()
                raise
            except BaseException as err:
                span.ended_by(err)
                raise
            finally:
                span.leave(handle)
        finally:
            with self._state:
                self._owner = None
                stop = span.stop_requested
        if stop:  # asked while this chunk was on its way
            self.close()
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop here: the span ends and the end event reports the tokens seen so far."""
        span = self._span
        with self._state:
            if span.by_caller:  # closed, or being closed
                return
            reading = self._owner is not None
            if reading:  # a reader waits for a chunk: it stops at its next
                span.stop_requested = True
            else:
                span.by_caller = True
                self._owner = threading.get_ident()
        if reading:
            interrupt = span.interrupt
            if interrupt is not None:
                try:
                    interrupt()
                except Exception as exc:
                    _count_close_error(exc)
            return
        try:
            handle = span.enter()
            try:
                self._body.close()
            except BaseException as exc:  # only what EndOnClose let through
                span.fail(exc)
                raise
            finally:
                span.leave(handle)
            span.finish()  # already ended by the body, unless it never started reading
        finally:
            with self._state:
                self._owner = None

    def __enter__(self) -> SpannedStream[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_stream(span: StreamSpan, body: Generator[Any, Any, Any]) -> SpannedStream[Any] | None:
    """Run ``body`` (which yields :data:`READY` first) in ``span``.

    None when the body returned at once (it found nothing to stream): its span is over.
    """
    stream: SpannedStream[Any] = SpannedStream(body, span)
    try:
        first = next(stream)
    except StopIteration:
        return None
    if first is not READY:  # pragma: no cover - a programming error in this package
        raise RuntimeError("a stream body must yield READY first")
    _open_streams.add(stream)
    return stream


class AsyncSpannedStream(AsyncGenerator[T, None], Generic[T]):
    """The caller's side of an async stream, an async generator: iterate it;
    ``aclose()`` (or dropping it) ends the span with what was seen so far.

    Values sent with ``asend`` are ignored (the stream yields the next chunk);
    ``athrow`` raises the exception in the span's body, which drops the span.
    """

    __slots__ = ("__weakref__", "_body", "_span")

    def __init__(self, body: AsyncGenerator[Any, Any], span: StreamSpan) -> None:
        self._body = body
        self._span = span

    def __aiter__(self) -> AsyncSpannedStream[T]:
        return self

    @property
    def closed(self) -> bool:
        """Closed, or being closed, by its caller (its span is over, or about to be)."""
        return self._span.by_caller

    async def _step(self, thrown: BaseException | None) -> T:
        span = self._span
        if span.by_caller:  # closed, or being closed, by the caller (in another task)
            if thrown is not None:
                raise thrown
            raise StopAsyncIteration
        if getattr(self._body, "ag_running", False):  # another task reads it: as Python says
            verb = "anext" if thrown is None else "athrow"
            raise RuntimeError(f"{verb}(): asynchronous generator is already running")
        handle = span.enter()
        span.reading = True
        try:
            if thrown is None:
                item: T = await self._body.__anext__()
            else:
                item = await self._body.athrow(thrown)
        except StopAsyncIteration:
            span.finish()
            raise
        except GeneratorExit:
            # The reader's coroutine closed where it waited (its task destroyed with a
            # loop closed under it): the stream was left, as after a ``break``, not
            # failed. Its body ends the call as abandoned when it is closed or freed
            # (AsyncEndOnClose), whichever of the two the collector comes to first.
            raise
        except BaseException as err:
            span.ended_by(err)
            raise
        finally:
            span.reading = False
            span.leave(handle)
        if span.stop_requested:  # asked while this chunk was on its way
            await self.aclose()
            raise StopAsyncIteration
        return item

    async def __anext__(self) -> T:
        return await self._step(None)

    async def asend(self, value: None) -> T:
        return await self._step(None)

    async def athrow(self, typ: Any, val: Any = None, tb: TracebackType | None = None) -> T:
        exc = val if isinstance(val, BaseException) else typ
        if not isinstance(exc, BaseException):
            exc = typ() if val is None else typ(val)
        if tb is not None:
            exc = exc.with_traceback(tb)
        if isinstance(exc, GeneratorExit):
            await self.aclose()
            raise exc
        return await self._step(exc)

    async def aclose(self) -> None:
        """Stop here: the span ends and the end event reports the tokens seen so far.

        From another task while one waits for a chunk: as :meth:`SpannedStream.close`
        from another thread."""
        span = self._span
        if getattr(self._body, "ag_running", False):
            span.stop_requested = True
            interrupt = span.interrupt
            if interrupt is not None:
                try:
                    await interrupt()
                except Exception as exc:
                    _count_close_error(exc)
            return
        span.by_caller = True
        handle = span.enter()
        try:
            await self._body.aclose()
        except BaseException as exc:  # only what AsyncEndOnClose let through
            span.fail(exc)
            raise
        finally:
            span.leave(handle)
        span.finish()  # already ended by the body, unless it never started reading


async def astart_stream(
    span: StreamSpan, body: AsyncGenerator[Any, Any]
) -> AsyncSpannedStream[Any] | None:
    """Async :func:`start_stream`: the returned async generator, when ``aclose()``-d or
    collected before its end, ends the span with what was seen so far."""
    stream: AsyncSpannedStream[Any] = AsyncSpannedStream(body, span)
    try:
        first = await stream.__anext__()
    except StopAsyncIteration:
        return None
    if first is not READY:  # pragma: no cover
        raise RuntimeError("a stream body must yield READY first")
    return stream


#: The sync streams handed out, and the async bodies reading, whose calls the exit
#: ends if still open: weakly, since dropping a stream ends its call.
_open_streams: weakref.WeakSet[SpannedStream[Any]] = weakref.WeakSet()
_open_async_bodies: weakref.WeakSet[AsyncEndOnClose] = weakref.WeakSet()


def _end_open_streams_at_exit() -> None:
    """The streams still open end as abandoned, their end event reporting what was
    received: a sync one closed as its caller would close it (its source too), an
    async one as when its body is freed (see :meth:`AsyncEndOnClose.end_at_exit`).
    Those that ended already are passed over."""
    for stream in list(_open_streams):
        _end_at_exit(stream.close)
    for body in list(_open_async_bodies):
        _end_at_exit(body.end_at_exit)


def _end_at_exit(end: Callable[[], None]) -> None:
    try:
        end()
    except Exception as err:
        _count_close_error(err)


def _forget_the_parents_streams() -> None:
    """A forked child's copies of its parent's streams are the parent's to end."""
    _open_streams.clear()
    _open_async_bodies.clear()


before_exit_flush(_end_open_streams_at_exit)
if hasattr(os, "register_at_fork"):  # pragma: no branch
    os.register_at_fork(after_in_child=_forget_the_parents_streams)


__all__ = [
    "READY",
    "AsyncEndOnClose",
    "AsyncSpannedStream",
    "EndOnClose",
    "SpannedStream",
    "StreamSpan",
    "astart_stream",
    "start_stream",
]
