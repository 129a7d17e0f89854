"""Spans that cover a stream from the request to its last chunk, or to its abandonment.

The core's ``@dispatcher.span`` on a generator drops the span when the generator is
closed early. For an LLM stream, the caller stopping half way is not a failure: the
span should end and report the tokens seen so far. So the body of a stream runs in a
decorated runner generator, and the object handed to the caller, when closed (or
garbage-collected) before the end, sends :data:`STOP` into it instead of closing it;
the body then emits its end event and returns, which ends the span normally.

Streams start eagerly: the runner is advanced once at creation, so the request (and a
request error, which drops the span) happens inside the span, as with LlamaIndex.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncGenerator, Callable, Generator, Iterator
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

    def __iter__(self) -> SpannedStream[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        try:
            item: T = next(self._inner)
        except BaseException:
            self._done = True
            raise
        return item

    def close(self) -> None:
        """Stop here: the span ends and the end event reports the tokens seen so far."""
        if self._done:
            return
        self._done = True
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


async def _closing(inner: AsyncGenerator[Any, Any]) -> AsyncGenerator[Any, None]:
    finished = False
    try:
        while True:
            try:
                item = await inner.__anext__()
            except StopAsyncIteration:
                finished = True
                return
            except BaseException:
                finished = True
                raise
            yield item
    finally:
        if not finished:
            try:
                await inner.asend(STOP)
            except StopAsyncIteration:
                pass
            except Exception as exc:
                telemetry.counter("llms.stream_close_errors").inc()
                logger.warning("closing an LLM stream failed: %r", exc)


async def astart_stream(
    dispatcher: Dispatcher, name: str, body: AsyncGenerator[Any, Any]
) -> AsyncGenerator[Any, None] | None:
    """Async :func:`start_stream`: the returned async generator, when ``aclose()``-d or
    collected before its end, ends the span with what was seen so far."""
    inner = _runner(dispatcher, name, True)(body)
    try:
        first = await inner.__anext__()
    except StopAsyncIteration:
        return None
    if first is not READY:  # pragma: no cover
        raise RuntimeError("a stream body must yield READY first")
    return _closing(inner)


__all__ = ["READY", "STOP", "SpannedStream", "astart_stream", "start_stream"]
