"""A span handler that keeps spans in memory and prints them as trees."""

from __future__ import annotations

import inspect
import sys
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, ClassVar

from pydantic import BaseModel, SerializerFunctionWrapHandler, field_serializer

from instrumentation._classcache import remember
from instrumentation._text import describe_error
from instrumentation.span.simple import SimpleSpan
from instrumentation.span_handlers._buffered import BufferedDeque, BufferedDict, move_buffer
from instrumentation.span_handlers.base import BaseSpanHandler
from instrumentation.tree import draw_tree, fitted_stream, format_duration

_utc = timezone.utc
_from_timestamp = datetime.fromtimestamp


def _wall_clock_of_perf_counter() -> Callable[[], float]:
    """``time.time()`` read off ``time.perf_counter()``: Windows' ``time.time()`` before
    Python 3.13 ticks every 15.6 ms, and every span shorter than that lasted 0 s. The
    difference is read once, at import: a clock set later, or drifting apart (parts
    per million), moves the spans' start times, not their durations."""
    offset = time.time() - time.perf_counter()
    perf_counter = time.perf_counter

    def clock() -> float:
        return offset + perf_counter()

    return clock


#: Seconds since the epoch, for spans' start and end times and durations.
_clock: Callable[[], float] = (
    _wall_clock_of_perf_counter()
    if sys.platform == "win32" and sys.version_info < (3, 13)
    else time.time
)
_new_span_object = object.__new__
_set = object.__setattr__
# pydantic's own slots, set through their descriptors (cheaper than setattr by name).
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__
_FIELDS = frozenset(SimpleSpan.model_fields)

#: What the fast path buffers for an open span, in this order: id_, parent_id, tags,
#: trace_id, name, dispatcher, start (``_clock()``); and for an ended one
#: ``(open record, end)``.
OpenRecord = tuple[str, "str | None", Any, "str | None", "str | None", "str | None", float]


def _span(record: OpenRecord, end: float | None) -> SimpleSpan:
    """A SimpleSpan from a record, without validation: every value is ours and typed."""
    id_, parent_id, tags, trace_id, name, dispatcher, start = record
    span = _new_span_object(SimpleSpan)
    _set(
        span,
        "__dict__",
        {
            "id_": id_,
            "parent_id": parent_id,
            "tags": dict(tags) if tags else {},
            "trace_id": trace_id,
            "name": name,
            "start_time": _from_timestamp(start, _utc),
            "end_time": None if end is None else _from_timestamp(end, _utc),
            "duration": 0.0 if end is None else end - start,
            "metadata": None,
            "dispatcher": dispatcher,
        },
    )
    _set_fields_set(span, set(_FIELDS))
    _set_extra(span, None)
    _set_private(span, None)
    return span


def _open_span(record: OpenRecord) -> SimpleSpan:
    return _span(record, None)


def _ended_span(item: tuple[OpenRecord, float] | SimpleSpan) -> SimpleSpan:
    # A span that was looked at while open is buffered as the SimpleSpan itself.
    if type(item) is tuple:
        return _span(item[0], item[1])
    return item  # type: ignore[return-value]


def _end(span: SimpleSpan, end: float) -> None:
    """Stamp the end of a span made as an object (``end`` from ``_clock()``)."""
    span.end_time = _from_timestamp(end, _utc)
    span.duration = end - span.start_time.timestamp()


_fast_found: dict[int, bool] = {}


def _uses_own_methods(cls: type) -> bool:
    """Whether ``cls`` keeps SimpleSpanHandler's span methods (so the fast path is right)."""
    try:
        return _fast_found[id(cls)]
    except KeyError:
        return remember(_fast_found, cls, _work_out_uses_own_methods(cls))


def _work_out_uses_own_methods(cls: type) -> bool:
    return all(
        getattr(cls, name) is getattr(SimpleSpanHandler, name)
        for name in (
            "new_span",
            "prepare_to_exit_span",
            "prepare_to_drop_span",
            "span_enter",
            "span_exit",
        )
    )


_CONTAINERS = frozenset({"open_spans", "completed_spans"})


class SimpleSpanHandler(BaseSpanHandler[SimpleSpan]):
    """Keeps the last ``max_completed_spans`` spans with their timings.

    Good for development, notebooks and tests; for keeping traces, use
    ``instrumentation.storage``. It runs on every traced call, so a traced call only
    records a tuple (ids, tags, ``_clock()``); ``open_spans`` and
    ``completed_spans`` make the pydantic spans the first time they are read through
    their methods (or the handler is serialised), and hand out the same objects
    afterwards. Code that reads the dict's storage directly, such as
    ``json.dumps(handler.open_spans)``, sees only spans made already. Assigning a new
    container keeps what was buffered with the old one; ``completed_spans`` stays a
    bounded deque (the assigned deque's ``maxlen``, else ``max_completed_spans``).
    Subclasses that override ``new_span`` or the ``prepare`` methods go the ordinary
    way, a span object per call.
    """

    needs_bound_args: ClassVar[bool] = False

    def model_post_init(self, __context: Any) -> None:
        super().model_post_init(__context)
        for name in _CONTAINERS:
            value = self.__dict__[name]
            if not isinstance(value, (BufferedDict, BufferedDeque)):
                self.__dict__[name] = self._container(name, value)

    def _container(self, name: str, value: Any) -> Any:
        """``value`` as a buffered container; the fast path's buffer moves to it."""
        old = self.__dict__.get(name)
        if value is old and isinstance(value, (BufferedDict, BufferedDeque)):
            return value  # ``handler.completed_spans += ...`` assigns the same object
        new: BufferedDict[SimpleSpan] | BufferedDeque[SimpleSpan]
        if name == "open_spans":
            new = BufferedDict(value, make=_open_span)
        else:
            maxlen = getattr(value, "maxlen", None)
            new = BufferedDeque(
                value, self.max_completed_spans if maxlen is None else maxlen, make=_ended_span
            )
        if isinstance(old, (BufferedDict, BufferedDeque)):
            move_buffer(old, new)
        return new

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _CONTAINERS:
            value = self._container(name, value)
        super().__setattr__(name, value)

    @field_serializer("open_spans", "completed_spans", mode="wrap")
    def _serialize_taken_in(self, value: Any, serialize: SerializerFunctionWrapHandler) -> Any:
        if isinstance(value, (BufferedDict, BufferedDeque)):
            value.take_in()
        return serialize(value)

    def _buffers(self) -> tuple[dict[str, Any], deque[Any]] | None:
        """The buffers the fast path writes to, or None to go the ordinary way."""
        if not _uses_own_methods(type(self)):
            return None
        open_spans = self.__dict__.get("open_spans")
        completed = self.__dict__.get("completed_spans")
        if isinstance(open_spans, BufferedDict) and isinstance(completed, BufferedDeque):
            return open_spans.buffer, completed.buffer
        return None  # e.g. a subclass whose model_post_init skipped ours

    @property
    def positional_span_enter(self) -> Callable[..., None] | None:
        """The dispatcher's fast entry point, unless a subclass changed how spans are made."""
        buffers = self._buffers()
        if buffers is None:
            return None
        records = buffers[0]
        clock = _clock

        def enter(
            id_: str,
            bound_args: Any,
            instance: Any,
            parent_id: str | None,
            tags: Any,
            name: str | None,
            trace_id: str | None,
            dispatcher: str | None,
            attributes: Any,
        ) -> None:
            records[id_] = (id_, parent_id, tags, trace_id, name, dispatcher, clock())

        return enter

    @property
    def positional_span_exit(self) -> Callable[..., None] | None:
        buffers = self._buffers()
        if buffers is None:
            return None
        pop_record = buffers[0].pop
        buffer_ended = buffers[1].append
        clock = _clock

        def exit(id_: str, bound_args: Any, instance: Any, result: Any) -> None:
            record = pop_record(id_, None)
            if record is not None:
                buffer_ended((record, clock()))
                return
            # Read while open: it is a SimpleSpan in open_spans by now.
            end = clock()
            open_spans = self.open_spans
            span = open_spans.take_out(id_) if isinstance(open_spans, BufferedDict) else None
            if span is not None:
                _end(span, end)
                buffer_ended(span)

        return exit

    def _take_one(self, id_: str) -> None:
        """Make the buffered open span ``id_`` a SimpleSpan in ``open_spans``, alone."""
        open_spans = self.open_spans
        if isinstance(open_spans, BufferedDict):
            open_spans.take_one(id_)

    def span_exit(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        result: Any | None = None,
        **kwargs: Any,
    ) -> None:
        self._take_one(id_)
        super().span_exit(id_, bound_args, instance, result, **kwargs)

    def span_drop(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        err: BaseException | None = None,
        **kwargs: Any,
    ) -> bool | None:
        self._take_one(id_)
        return super().span_drop(id_, bound_args, instance, err, **kwargs)

    def new_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        parent_span_id: str | None = None,
        tags: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> SimpleSpan | None:
        return SimpleSpan(
            id_=id_,
            start_time=_from_timestamp(_clock(), _utc),
            parent_id=parent_span_id,
            tags=dict(tags) if tags else {},
            trace_id=kwargs.get("trace_id"),
            name=kwargs.get("name"),
            dispatcher=kwargs.get("dispatcher"),
        )

    def prepare_to_exit_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        result: Any | None = None,
        **kwargs: Any,
    ) -> SimpleSpan | None:
        # Taken out at once (one step, under the GIL), not read and removed later: a
        # shutdown dropping the span on another thread then finds it gone, and it is
        # never both completed and dropped.
        span = self.open_spans.pop(id_, None)
        if span is None:
            return None
        _end(span, _clock())
        self.completed_spans.append(span)
        return span

    def prepare_to_drop_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        err: BaseException | None = None,
        **kwargs: Any,
    ) -> SimpleSpan | None:
        span = self.open_spans.pop(id_, None)  # as in prepare_to_exit_span
        if span is None:
            return None
        _end(span, _clock())
        span.metadata = {"error": describe_error(err) if err is not None else None}
        self.dropped_spans.append(span)
        return span

    def spans_by_start(self) -> list[SimpleSpan]:
        """Completed, dropped and still open spans, oldest start first."""
        spans = [*self.completed_spans, *self.dropped_spans, *self.open_spans.values()]
        spans.sort(key=lambda s: s.start_time)
        return spans

    def format_trace_trees(self) -> str:
        """Every kept span as an indented tree with durations, one tree per root."""

        def label(span: SimpleSpan) -> str:
            took = format_duration(span.duration if span.end_time else None)
            text = f"{span.name or span.id_}  {took}"
            error = span.metadata.get("error") if span.metadata else None
            if error and str(error).startswith("GeneratorExit"):
                text += "  (closed early)"  # its caller stopped reading: no failure
            elif error:
                text += f"  ✗ {error}"
            return text

        # Called through the class: a subclass written for LlamaIndex may have a field
        # of the same name (LlamaIndex's OpenTelemetry handler has ``all_spans``).
        spans = SimpleSpanHandler.spans_by_start(self)
        return draw_tree(
            spans, lambda s: s.id_, lambda s: s.parent_id, label, lambda s: s.start_time
        )

    def print_trace_trees(self) -> None:
        """Print :meth:`format_trace_trees` (with ASCII look-alikes for what the output's
        encoding lacks: ``|--`` for ``├──``)."""
        text = self.format_trace_trees()
        if sys.stdout is not None:  # None under pythonw, where print() writes nothing
            fitted_stream(sys.stdout).write((text if text else "(no spans)") + "\n")


__all__ = ["SimpleSpanHandler"]
