"""Spans that cover a stream from the request to its last chunk, or to its abandonment.

The core's ``@dispatcher.span`` on a generator drops the span when the generator is
closed early. For an LLM stream, the caller stopping half way is not a failure: the
span should end and report the tokens seen so far. So the body of a stream runs in a
decorated runner generator, and the object handed to the caller, when closed (or
garbage-collected) before the end, sends :data:`STOP` into it instead of closing it;
the body then emits its end event and returns, which ends the span normally.

Streams start eagerly: the runner is advanced once at creation, so the request (and a
request error, which drops the span) happens inside the span, as with LlamaIndex.

While a stream object is alive and unfinished, its runner is kept in a module registry,
so that it can never be garbage before the stream object itself: when both sit in a
reference cycle, the cyclic GC would otherwise be free to finalise the runner first
(closing it, which drops the span) before the stream object's finaliser could send
:data:`STOP`. Finishing, closing or collecting the stream object takes the runner out.
An async stream collected unfinished cannot await its runner in its finaliser: it
schedules the :data:`STOP` on the event loop it was started in, as asyncio does for
the async generators it finalises (and just lets go of it if that loop is closed).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncGenerator, Callable, Generator, Iterator
from types import TracebackType
from typing import Any, Generic, TypeVar

from instrumentation import telemetry
from instrumentation.dispatcher import Dispatcher

logger = logging.getLogger("instrumentation.llms")

T = TypeVar("T")


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: Sent into a stream body when the caller abandons the stream.
STOP: Any = _Marker("STOP")
#: Yielded first by a stream body, once the request is made.
READY: Any = _Marker("READY")

#: The runners of the streams that are alive and not finished (see the module docstring).
_live: set[Any] = set()
#: Tasks sending STOP into the runners of async streams collected unfinished.
_stopping: set[asyncio.Task[None]] = set()

_runners: dict[tuple[int, str, bool], Callable[..., Any]] = {}
_runners_lock = threading.Lock()


def _runner(dispatcher: Dispatcher, name: str, is_async: bool) -> Callable[..., Any]:
    """A generator function, decorated with ``dispatcher.span``, whose span is ``name``."""
    key = (id(dispatcher), name, is_async)
    found = _runners.get(key)
    if found is not None:
        return found
    func: Callable[..., Any]
    if is_async:

        async def func(body: AsyncGenerator[Any, Any]) -> AsyncGenerator[Any, Any]:
            to_send: Any = None
            while True:
                try:
                    item = await body.asend(to_send)
                except StopAsyncIteration:
                    return
                to_send = yield item

    else:

        def func(body: Generator[Any, Any, Any]) -> Generator[Any, Any, Any]:
            return (yield from body)

    func.__name__ = func.__qualname__ = name
    decorated = dispatcher.span(func)
    with _runners_lock:
        if len(_runners) < 4096:
            _runners[key] = decorated
    return decorated


class SpannedStream(Iterator[T], Generic[T]):
    """The caller's side of a sync stream: iterate it; ``close()`` (or dropping it) ends
    the span with what was seen so far."""

    __slots__ = ("_done", "_inner")

    def __init__(self, inner: Generator[Any, Any, Any]) -> None:
        self._inner = inner
        self._done = False
        _live.add(inner)

    def __iter__(self) -> SpannedStream[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        try:
            item: T = next(self._inner)
        except BaseException:
            self._done = True
            _live.discard(self._inner)
            raise
        return item

    def close(self) -> None:
        """Stop here: the span ends and the end event reports the tokens seen so far."""
        if self._done:
            return
        self._done = True
        _live.discard(self._inner)
        try:
            self._inner.send(STOP)
        except StopIteration:
            pass
        except Exception as exc:  # the body's own clean-up failed: the span was dropped
            telemetry.counter("llms.stream_close_errors").inc()
            logger.warning("closing an LLM stream failed: %r", exc)

    def __enter__(self) -> SpannedStream[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


def start_stream(
    dispatcher: Dispatcher, name: str, body: Generator[Any, Any, Any]
) -> SpannedStream[Any] | None:
    """Run ``body`` (which yields :data:`READY` first) in a span called ``name``.

    None when the body returned at once (it found nothing to stream): its span is over.
    """
    inner = _runner(dispatcher, name, False)(body)
    try:
        first = next(inner)
    except StopIteration:
        return None
    if first is not READY:  # pragma: no cover - a programming error in this package
        raise RuntimeError("a stream body must yield READY first")
    return SpannedStream(inner)


class AsyncSpannedStream(AsyncGenerator[T, None], Generic[T]):
    """The caller's side of an async stream, an async generator: iterate it;
    ``aclose()`` (or dropping it) ends the span with what was seen so far.

    Values sent with ``asend`` are ignored (the stream yields the next chunk);
    ``athrow`` raises the exception in the span's body, which drops the span.
    """

    __slots__ = ("_done", "_inner", "_loop")

    def __init__(
        self, inner: AsyncGenerator[Any, Any], loop: asyncio.AbstractEventLoop | None
    ) -> None:
        self._inner = inner
        self._loop = loop
        self._done = False
        _live.add(inner)

    def _finish(self) -> None:
        self._done = True
        _live.discard(self._inner)

    def __aiter__(self) -> AsyncSpannedStream[T]:
        return self

    async def __anext__(self) -> T:
        if self._done:
            raise StopAsyncIteration
        try:
            item: T = await self._inner.__anext__()
        except BaseException:
            self._finish()
            raise
        return item

    async def asend(self, value: None) -> T:
        return await self.__anext__()

    async def athrow(self, typ: Any, val: Any = None, tb: TracebackType | None = None) -> T:
        exc = val if isinstance(val, BaseException) else typ
        if not isinstance(exc, BaseException):
            exc = typ() if val is None else typ(val)
        if tb is not None:
            exc = exc.with_traceback(tb)
        if isinstance(exc, GeneratorExit):
            await self.aclose()
            raise exc
        if self._done:
            raise exc
        try:
            item: T = await self._inner.athrow(exc)
        except BaseException:
            self._finish()
            raise
        return item  # pragma: no cover - the bodies here do not catch what is thrown

    async def aclose(self) -> None:
        """Stop here: the span ends and the end event reports the tokens seen so far."""
        if self._done:
            return
        self._finish()
        await _astop(self._inner)

    def __del__(self) -> None:
        try:
            if self._done:
                return
            self._done = True
            inner, loop = self._inner, self._loop
            if loop is not None and not loop.is_closed():
                try:
                    # The pending callback holds the runner until the loop runs it.
                    loop.call_soon_threadsafe(_stop_later, inner)
                except RuntimeError:  # the loop closed meanwhile
                    pass
            _live.discard(inner)
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


async def _astop(inner: AsyncGenerator[Any, Any]) -> None:
    try:
        await inner.asend(STOP)
    except StopAsyncIteration:
        pass
    except Exception as exc:  # the body's own clean-up failed: the span was dropped
        telemetry.counter("llms.stream_close_errors").inc()
        logger.warning("closing an LLM stream failed: %r", exc)


def _stop_later(inner: AsyncGenerator[Any, Any]) -> None:
    """On the stream's event loop: STOP the runner of a stream collected unfinished."""
    task = asyncio.get_running_loop().create_task(_astop(inner))
    _stopping.add(task)
    task.add_done_callback(_stopping.discard)


async def astart_stream(
    dispatcher: Dispatcher, name: str, body: AsyncGenerator[Any, Any]
) -> AsyncSpannedStream[Any] | None:
    """Async :func:`start_stream`: the returned async generator, when ``aclose()``-d or
    collected before its end, ends the span with what was seen so far."""
    inner = _runner(dispatcher, name, True)(body)
    try:
        first = await inner.__anext__()
    except StopAsyncIteration:
        return None
    if first is not READY:  # pragma: no cover
        raise RuntimeError("a stream body must yield READY first")
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:  # another event loop (trio): a collected stream is not ended
        loop = None
    return AsyncSpannedStream(inner, loop)


__all__ = [
    "READY",
    "STOP",
    "AsyncSpannedStream",
    "SpannedStream",
    "astart_stream",
    "start_stream",
]
