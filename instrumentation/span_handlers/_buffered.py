"""Span containers whose newest entries wait in a buffer as plain tuples.

:class:`~instrumentation.span_handlers.SimpleSpanHandler` runs on every traced
call, and building a pydantic span costs more than the rest of the call, while
most spans are never looked at. So the application's thread only puts a tuple in
a buffer (a ``dict`` or ``deque`` of its own, never these containers), and the
containers turn the buffered tuples into spans when anything reads them.

Readers serialise on a lock; the writer never takes it on its fast path. A
container never holds a tuple, so a reader racing the writer sees spans, or not
yet the newest ones: never a half-made span.
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

#: deque methods that read or reorder: each first takes in what is buffered.
_DEQUE_METHODS = (
    "__add__",
    "__contains__",
    "__copy__",
    "__delitem__",
    "__eq__",
    "__ge__",
    "__getitem__",
    "__gt__",
    "__iadd__",
    "__imul__",
    "__le__",
    "__len__",
    "__lt__",
    "__mul__",
    "__ne__",
    "__repr__",
    "__rmul__",
    "__setitem__",
    "append",
    "appendleft",
    "copy",
    "count",
    "extend",
    "extendleft",
    "index",
    "insert",
    "pop",
    "popleft",
    "remove",
    "reverse",
    "rotate",
)

#: dict methods that read or write: each first takes in what is buffered.
_DICT_METHODS = (
    "__contains__",
    "__delitem__",
    "__eq__",
    "__getitem__",
    "__ior__",
    "__len__",
    "__ne__",
    "__or__",
    "__repr__",
    "__ror__",
    "__setitem__",
    "copy",
    "get",
    "items",
    "keys",
    "pop",
    "popitem",
    "setdefault",
    "update",
    "values",
)


def _taking_in_first(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self._buffer:
            self.take_in()
        return method(self, *args, **kwargs)

    return call


class BufferedDeque(deque[T]):
    """A bounded deque of spans fed from ``buffer`` (records or spans, oldest first)."""

    __slots__ = ("_buffer", "_lock", "_make")

    def __init__(
        self,
        iterable: Any = (),
        maxlen: int | None = None,
        *,
        buffer: deque[Any] | None = None,
        make: Callable[[Any], T] | None = None,
        lock: threading.Lock | None = None,
    ) -> None:
        super().__init__(iterable, maxlen)
        # Without a buffer (a copy, say) it is a plain deque.
        self._buffer: deque[Any] = buffer if buffer is not None else deque()
        self._make = make
        self._lock = lock or threading.Lock()

    def take_in(self) -> None:
        """Make spans of what is buffered and append them, oldest first."""
        buffer, make = self._buffer, self._make
        append = deque.append
        with self._lock:
            # Only what is there now: writers may keep appending while this runs.
            for _ in range(len(buffer)):
                try:
                    item = buffer.popleft()
                except IndexError:  # cleared meanwhile
                    return
                append(self, make(item) if make is not None else item)

    def clear(self) -> None:
        self._buffer.clear()
        deque.clear(self)

    # Iterators run over a copy: ``list(container)`` asks for the length after making
    # the iterator, and taking in then would change what is being iterated.
    def __iter__(self) -> Iterator[T]:
        if self._buffer:
            self.take_in()
        return iter(list(deque.__iter__(self)))

    def __reversed__(self) -> Iterator[T]:
        if self._buffer:
            self.take_in()
        return iter(list(deque.__reversed__(self)))

    def __reduce__(self) -> tuple[Any, ...]:
        # Copies and pickles are plain: the buffer and lock belong to the handler.
        return (deque, (list(self), self.maxlen))


class BufferedDict(dict[str, T]):
    """Open spans by id, fed from ``buffer`` (records by span id)."""

    __slots__ = ("_buffer", "_lock", "_make")

    def __init__(
        self,
        *args: Any,
        buffer: dict[str, Any] | None = None,
        make: Callable[[Any], T] | None = None,
        lock: threading.Lock | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._buffer: dict[str, Any] = buffer if buffer is not None else {}
        self._make = make
        self._lock = lock or threading.Lock()

    def take_in(self) -> None:
        """Make spans of what is buffered and add them, in the order they started."""
        buffer, make = self._buffer, self._make
        put = dict.__setitem__
        with self._lock:
            for key in list(buffer):
                # The writer may end a span meanwhile: it pops the record first.
                record = buffer.pop(key, None)
                if record is not None:
                    put(self, key, make(record) if make is not None else record)

    def take_out(self, key: str) -> T | None:
        """Remove and return the span ``key`` once it is no longer buffered (for the writer)."""
        with self._lock:
            return dict.pop(self, key, None)

    def clear(self) -> None:
        self._buffer.clear()
        dict.clear(self)

    def __iter__(self) -> Iterator[str]:
        if self._buffer:
            self.take_in()
        return iter(list(dict.__iter__(self)))

    def __reversed__(self) -> Iterator[str]:
        if self._buffer:
            self.take_in()
        return iter(list(dict.__reversed__(self)))

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (dict(self.items()),))


for _name in _DEQUE_METHODS:
    setattr(BufferedDeque, _name, _taking_in_first(getattr(deque, _name)))
for _name in _DICT_METHODS:
    setattr(BufferedDict, _name, _taking_in_first(getattr(dict, _name)))
del _name


__all__ = ["BufferedDeque", "BufferedDict"]
