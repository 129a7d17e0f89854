"""Span containers whose newest entries wait in a buffer as plain tuples.

:class:`~instrumentation.span_handlers.SimpleSpanHandler` runs on every traced
call, and building a pydantic span costs more than the rest of the call, while
most spans are never looked at. So the application's thread only puts a tuple in
the container's buffer (a plain ``dict`` or ``deque``, never the container
itself), and the container turns the buffered tuples into spans when anything
reads it through its own methods.

Readers serialise on the container's re-entrant lock (a garbage-collector
finalizer or a signal handler may read again on the same thread); the writer takes
it only to end a span that was read while open. A container never holds a tuple,
so a reader racing the writer sees spans, or not yet the newest ones. What reads
the ``dict`` storage directly (``json.dumps`` of ``open_spans``, say) sees only
what was taken in already; dict views are live but do not take in by themselves.
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, SupportsIndex, TypeVar, get_args, overload

from pydantic import GetCoreSchemaHandler
from pydantic_core import CoreSchema, core_schema

T = TypeVar("T")

#: deque methods that read, reorder or add: each first takes in what is buffered.
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
    "__radd__",
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
    "sort",
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
        if self.buffer:
            self.take_in()
        return method(self, *args, **kwargs)

    return call


class SpanDeque(deque[T]):
    """A bounded deque that also reads like the list LlamaIndex keeps spans in:
    it slices (``spans[-3:]`` gives a list), compares equal to a list of the same
    spans (``handler.completed_spans == []``), adds to lists, sorts, and takes an
    index in ``pop`` and slices in ``del``, so that code written against a list works."""

    __slots__ = ()

    @overload
    def __getitem__(self, index: SupportsIndex) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> list[T]: ...
    def __getitem__(self, index: SupportsIndex | slice) -> T | list[T]:
        if isinstance(index, slice):
            return list(self)[index]
        return deque.__getitem__(self, index)

    @overload
    def __setitem__(self, index: SupportsIndex, value: T) -> None: ...
    @overload
    def __setitem__(self, index: slice, value: Iterable[T]) -> None: ...
    def __setitem__(self, index: SupportsIndex | slice, value: Any) -> None:
        if isinstance(index, slice):
            items = list(deque.__iter__(self))
            items[index] = value
            self._replace(items)
        else:
            deque.__setitem__(self, index, value)

    def __delitem__(self, index: SupportsIndex | slice) -> None:
        if isinstance(index, slice):
            items = list(deque.__iter__(self))
            del items[index]
            self._replace(items)
        else:
            deque.__delitem__(self, index)

    # A list, as LlamaIndex's lists give: ``completed_spans + dropped_spans`` as a deque
    # would keep the left one's maxlen, and silently lose the oldest spans of the sum.
    def __add__(self, other: Iterable[T]) -> list[T]:  # type: ignore[override]
        if isinstance(other, (list, deque)):
            return list(self) + list(other)
        return NotImplemented

    def __radd__(self, other: list[T]) -> list[T]:
        if isinstance(other, (list, deque)):
            return list(other) + list(self)
        return NotImplemented

    def pop(self, index: int | None = None) -> T:
        if index is None:
            return deque.pop(self)
        item = deque.__getitem__(self, index)
        deque.__delitem__(self, index)
        return item

    def sort(self, *, key: Callable[[T], Any] | None = None, reverse: bool = False) -> None:
        self._replace(sorted(deque.__iter__(self), key=key, reverse=reverse))  # type: ignore[type-var,arg-type]

    def _replace(self, items: list[T]) -> None:
        deque.clear(self)
        deque.extend(self, items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, list):
            return list(self) == other
        return deque.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (list(self), self.maxlen))

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        # Validated and serialised as a deque of its items (a list in JSON), kept a SpanDeque.
        args = get_args(source)
        items = handler.generate_schema(deque[args[0]] if args else deque)  # type: ignore[valid-type]
        as_list = handler.generate_schema(list[args[0]] if args else list)  # type: ignore[valid-type]
        return core_schema.no_info_after_validator_function(
            lambda value: (
                value if isinstance(value, cls) else cls(value, getattr(value, "maxlen", None))
            ),
            items,
            # Dumped as a list of its spans, as LlamaIndex's list is (pydantic before
            # 2.12 did not serialise a deque subclass by the deque schema at all).
            serialization=core_schema.plain_serializer_function_ser_schema(
                list, return_schema=as_list
            ),
        )


class BufferedDeque(SpanDeque[T]):
    """A bounded deque of spans fed from ``buffer`` (records or spans, oldest first)."""

    __slots__ = ("buffer", "lock", "make")

    def __init__(
        self,
        iterable: Any = (),
        maxlen: int | None = None,
        *,
        make: Callable[[Any], T] | None = None,
    ) -> None:
        super().__init__(iterable, maxlen)
        self.buffer: deque[Any] = deque(maxlen=maxlen)
        self.make = make
        self.lock = threading.RLock()

    def take_in(self) -> None:
        """Make spans of what is buffered and append them, oldest first."""
        buffer, make = self.buffer, self.make
        append = deque.append
        with self.lock:
            # Only what is there now: writers may keep appending while this runs.
            for _ in range(len(buffer)):
                try:
                    item = buffer.popleft()
                except IndexError:  # taken by a re-entrant reader, or cleared
                    return
                append(self, make(item) if make is not None else item)

    def clear(self) -> None:
        with self.lock:
            self.buffer.clear()
            deque.clear(self)

    # Iterators run over a copy: ``list(container)`` asks for the length after making
    # the iterator, and taking in then would change what is being iterated.
    def __iter__(self) -> Iterator[T]:
        if self.buffer:
            self.take_in()
        return iter(list(deque.__iter__(self)))

    def __reversed__(self) -> Iterator[T]:
        if self.buffer:
            self.take_in()
        return iter(list(deque.__reversed__(self)))

    def __reduce__(self) -> tuple[Any, ...]:
        # Copies and pickles are SpanDeques without a buffer: the buffer belongs to
        # the handler's path.
        return (SpanDeque, (list(self), self.maxlen))


class BufferedDict(dict[str, T]):
    """Open spans by id, fed from ``buffer`` (records by span id)."""

    __slots__ = ("buffer", "lock", "make")

    def __init__(self, *args: Any, make: Callable[[Any], T] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.buffer: dict[str, Any] = {}
        self.make = make
        self.lock = threading.RLock()

    def take_in(self) -> None:
        """Make spans of what is buffered and add them, in the order they started."""
        buffer, make = self.buffer, self.make
        put = dict.__setitem__
        with self.lock:
            for key in list(buffer):
                # The writer may end a span meanwhile: it pops the record first.
                record = buffer.pop(key, None)
                if record is not None:
                    put(self, key, make(record) if make is not None else record)

    def take_one(self, key: str) -> None:
        """Make a span of the record ``key`` alone, if it is buffered."""
        with self.lock:
            record = self.buffer.pop(key, None)
            if record is not None:
                dict.__setitem__(self, key, self.make(record) if self.make else record)

    def take_out(self, key: str) -> T | None:
        """Remove and return the span ``key`` once no reader is taking it in (for the writer)."""
        with self.lock:
            return dict.pop(self, key, None)

    def clear(self) -> None:
        with self.lock:
            self.buffer.clear()
            dict.clear(self)

    def __iter__(self) -> Iterator[str]:
        if self.buffer:
            self.take_in()
        return iter(list(dict.__iter__(self)))

    def __reversed__(self) -> Iterator[str]:
        if self.buffer:
            self.take_in()
        return iter(list(dict.__reversed__(self)))

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (dict(self.items()),))


def move_buffer(old: BufferedDeque[Any] | BufferedDict[Any], new: Any) -> None:
    """Hand ``old``'s buffer (which the handler's fast path writes to) to ``new``.

    ``old`` takes in what is buffered first and keeps it, then gets an empty buffer of
    its own, so a reference to it kept elsewhere no longer takes spans away.
    """
    with old.lock:
        old.take_in()
        new.buffer = old.buffer
        old.buffer = deque(maxlen=old.maxlen) if isinstance(old, BufferedDeque) else {}


for _name in _DEQUE_METHODS:
    setattr(BufferedDeque, _name, _taking_in_first(getattr(SpanDeque, _name)))
for _name in _DICT_METHODS:
    setattr(BufferedDict, _name, _taking_in_first(getattr(dict, _name)))
del _name


__all__ = ["BufferedDeque", "BufferedDict", "SpanDeque", "move_buffer"]
