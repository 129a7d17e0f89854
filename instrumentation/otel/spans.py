"""The OpenTelemetry spans of our open spans: the hot path of the bridge.

A plain ``__slots__`` class rather than the pydantic handler itself, because pydantic
routes every private-attribute read through ``__getattr__`` (about a microsecond
each); :class:`~instrumentation.otel.handler.OpenTelemetrySpanHandler` hands the
dispatcher this object's bound methods as its positional fast path.

Ids: the OpenTelemetry span made for one of our spans has *our* span id (the 16 hex
digits that end ``id_``) and, for a root, our trace id, through the
:class:`PendingIdGenerator` installed on our tracer; a child takes its parent's trace
id as usual. So ``capture_propagation_context()["traceparent"]``, our events'
``trace_id`` and what the backend shows agree.
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace as trace_api
from opentelemetry.trace import Status, StatusCode

from instrumentation import telemetry
from instrumentation._text import cut, safe_str
from instrumentation._text import without_lone_surrogates as clean
from instrumentation.context import span_hex_of
from instrumentation.events.span import SpanDropEvent
from instrumentation.otel import genai
from instrumentation.otel.attributes import (
    MAX_VALUE_CHARS,
    clean_attributes,
    event_attributes,
    tag_attributes,
    to_attribute,
)
from instrumentation.otel.bridge import received_flags_and_state
from instrumentation.otel.ids import PendingIdGenerator

#: The instrumentation scope of spans whose dispatcher is unknown (others use its name).
TRACER_NAME = "instrumentation"

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)
_SAMPLED = trace_api.TraceFlags(trace_api.TraceFlags.SAMPLED)
#: OpenTelemetry's own "suppress instrumentation" flag, set around exporters' I/O.
_OTEL_SUPPRESSED = getattr(otel_context, "_SUPPRESS_INSTRUMENTATION_KEY", None)
_get_value = otel_context.get_value
_set_span_in_context = trace_api.set_span_in_context
_get_current_span = trace_api.get_current_span
_get_current = otel_context.get_current
_HEX16 = frozenset("0123456789abcdef")

_EVENTS_WITHOUT_SPAN = telemetry.counter("otel.events_without_span")
_SPANS_ENDED_BY_CLOSE = telemetry.counter("otel.spans_ended_by_close")


def unix_nanos(moment: datetime) -> int:
    """Exact nanoseconds since the epoch (a float would lose the last digits)."""
    return ((moment - _EPOCH) // _MICROSECOND) * 1000


#: Chunk (in-progress) events kept as span events on one span. The SDK keeps 128 events
#: per span and drops the oldest: a long stream pushed out its own start event.
MAX_PROGRESS_EVENTS = 100


class OpenSpan:
    """An OpenTelemetry span of ours that has not ended, with the context that holds it."""

    __slots__ = ("context", "progress", "span")

    def __init__(self, span: trace_api.Span, context: otel_context.Context) -> None:
        self.span = span
        self.context = context
        self.progress = 0  # chunk events seen


class SpanTable:
    """Starts, ends and annotates the OpenTelemetry spans that stand for ours.

    Thread-safe: ``open`` is one dict whose single-key operations are atomic.
    """

    __slots__ = (
        "__weakref__",
        "capture_content",
        "open",
        "openinference",
        "provider",
        "tracers",
    )

    def __init__(self, provider: Any, openinference: bool, capture_content: bool) -> None:
        self.provider = provider
        self.openinference = openinference
        self.capture_content = capture_content
        self.open: dict[str, OpenSpan] = {}
        self.tracers: dict[str | None, Any] = {}

    # -- tracers ---------------------------------------------------------------------------

    def tracer_for(self, dispatcher: str | None) -> Any:
        """The tracer for one dispatcher: its name is the instrumentation scope.

        OpenTelemetry's scope says which library or module produced a span, which is
        what a dispatcher's name says too. Each tracer gets our id generator when the
        provider is the SDK's. With no provider given, the global one is used; while it
        is still the API's placeholder nothing is cached, so a provider set later is
        picked up at the next span.
        """
        scope = clean(dispatcher or TRACER_NAME)
        provider = self.provider
        explicit = provider is not None
        if provider is None:
            provider = trace_api.get_tracer_provider()
        tracer = provider.get_tracer(scope)
        generator = getattr(tracer, "id_generator", None)
        if generator is not None:
            if not isinstance(generator, PendingIdGenerator):
                # get_tracer caches per scope: handlers on one provider share tracers.
                tracer.id_generator = PendingIdGenerator(generator)
        elif not explicit:
            return tracer
        self.tracers[dispatcher] = tracer
        return tracer

    # -- spans -------------------------------------------------------------------------

    def enter(
        self,
        id_: str,
        bound_args: Any,
        instance: Any,
        parent_id: str | None,
        tags: Mapping[str, Any] | None,
        name: str | None,
        trace_id: str | None,
        dispatcher: str | None,
        attributes: Mapping[str, Any] | None,
    ) -> None:
        """Start the OpenTelemetry span for our span ``id_`` (the dispatcher's fast path).

        Nothing is started where OpenTelemetry's instrumentation is suppressed (inside
        an exporter of another provider, say): exporting must never produce spans.
        """
        if _OTEL_SUPPRESSED is not None and _get_value(_OTEL_SUPPRESSED):
            return
        tracer = self.tracers.get(dispatcher) or self.tracer_for(dispatcher)
        # The parent context keeps what else the application put in OpenTelemetry's
        # context (baggage, read by span processors' on_start: a BaggageSpanProcessor).
        if parent_id is None:
            parent = _get_current()
            if _get_current_span(parent).get_span_context().is_valid:
                parent = _set_span_in_context(trace_api.INVALID_SPAN, parent)
        else:
            opened = self.open.get(parent_id)
            if opened is None:
                parent = self.foreign_parent(parent_id, trace_id)
            elif _get_current_span() is opened.span:
                parent = None  # current: the parent's, with baggage set inside it since
            else:
                parent = opened.context
        span_attributes: dict[str, Any] | None = None
        if tags or attributes or self.openinference:
            span_attributes = {}
            if tags:
                tag_attributes(tags, span_attributes)
            if attributes:
                for key, value in attributes.items():
                    converted = to_attribute(value)
                    if converted is not None:
                        key = "instrumentation.request" if key == "request" else key
                        span_attributes[key] = converted
            if self.openinference:
                span_attributes["openinference.span.kind"] = genai.OPENINFERENCE_DEFAULT_KIND
        ids = getattr(tracer, "id_generator", None)
        if type(ids) is not PendingIdGenerator:
            span = tracer.start_span(clean(name or id_), parent, attributes=span_attributes)
        else:
            tail = id_[-16:]
            span_hex = tail if len(tail) == 16 and _HEX16.issuperset(tail) else span_hex_of(id_)
            ids.expect(
                int(span_hex, 16), int(trace_id, 16) if parent_id is None and trace_id else None
            )
            try:
                span = tracer.start_span(clean(name or id_), parent, attributes=span_attributes)
            finally:
                ids.clear()
        self.open[id_] = OpenSpan(span, _set_span_in_context(span))

    def foreign_parent(self, parent_id: str, trace_id: str | None) -> Any:
        """The context to start under when the parent is not one of our open spans.

        The current OpenTelemetry span when it is that parent (a foreign span chosen by
        the bridge); otherwise a stand-in carrying the parent's ids (a span restored
        from another process, or one whose dispatcher has no such handler).
        """
        parent_hex = int(span_hex_of(parent_id), 16)
        if _get_current_span().get_span_context().span_id == parent_hex:
            return None
        # From the current context, as a root span is: its baggage goes along.
        if trace_id is None:
            return _set_span_in_context(trace_api.INVALID_SPAN, _get_current())
        # Sampled or not as a restore here received it (restored before any handler
        # could mirror it in OpenTelemetry's context), with its trace state.
        flags, state = received_flags_and_state(trace_id, _SAMPLED)
        ids = trace_api.SpanContext(
            int(trace_id, 16), parent_hex, is_remote=True, trace_flags=flags, trace_state=state
        )
        return _set_span_in_context(trace_api.NonRecordingSpan(ids), _get_current())

    def exit(self, id_: str, bound_args: Any, instance: Any, result: Any) -> None:
        """End the span normally (the dispatcher's fast path)."""
        opened = self.open.pop(id_, None)
        if opened is not None:
            opened.span.end()

    def drop(self, id_: str, err: BaseException | None) -> None:
        """End the span after ``err``: status ERROR and the exception recorded.

        A generator closed before it was exhausted (``GeneratorExit``) is not an error:
        the span ends with ``instrumentation.generator_closed`` set.
        """
        opened = self.open.pop(id_, None)
        if opened is None:
            return
        span = opened.span
        if isinstance(err, GeneratorExit):
            span.set_attribute("instrumentation.generator_closed", True)
        elif err is not None:
            # It left the span: escaped. error.type as the semantic conventions ask.
            try:
                whole = str(err)
                printable = whole.isascii() and len(whole) <= MAX_VALUE_CHARS
            except Exception:
                whole, printable = safe_str(err), False
            message = cut(whole)
            if printable:
                span.record_exception(err, escaped=True)
            else:
                # The SDK would take str(err) as it is: a lone surrogate in it (a file
                # name decoded with surrogateescape) failed the export of its batch, a
                # str() that raises failed the span's end, and a 50 MB one (twice, in
                # the message and the stack trace) made a request no collector takes.
                span.add_event(
                    "exception",
                    {
                        "exception.type": _error_type(err),
                        "exception.message": clean(message),
                        "exception.stacktrace": clean(_stacktrace(err)),
                        "exception.escaped": "True",
                    },
                )
            span.set_attribute("error.type", _error_type(err))
            span.set_status(Status(StatusCode.ERROR, clean(f"{type(err).__name__}: {message}")))
        else:
            span.set_status(Status(StatusCode.ERROR, "span dropped"))
        span.end()

    def end_all(self, reason: str) -> int:
        """End every open span with status ERROR; returns how many."""
        ended = 0
        while self.open:
            try:
                _id, opened = self.open.popitem()
            except KeyError:
                break
            opened.span.set_status(Status(StatusCode.ERROR, reason))
            opened.span.end()
            ended += 1
        _SPANS_ENDED_BY_CLOSE.add(ended)
        return ended

    # -- events ------------------------------------------------------------------------

    def event(self, event: Any) -> None:
        """Add ``event`` to the span it was created in (or the current OpenTelemetry span)."""
        if isinstance(event, SpanDropEvent):
            return  # drop() records the exception itself
        opened = self.open.get(event.span_id) if event.span_id else None
        if opened is not None:
            span = opened.span
        else:
            span = _get_current_span()
            if not span.is_recording():
                _EVENTS_WITHOUT_SPAN.inc()
                return
        kind = genai.kind_of(event)
        if kind is None:
            attributes = event_attributes(event)
        else:
            if opened is not None and kind != genai.START:
                if kind == genai.PROGRESS:
                    opened.progress += 1
                    if opened.progress > MAX_PROGRESS_EVENTS:
                        return  # counted, and reported by the end event
                elif opened.progress > MAX_PROGRESS_EVENTS:
                    span.set_attribute(
                        "instrumentation.llm.chunk_events_omitted",
                        opened.progress - MAX_PROGRESS_EVENTS,
                    )
            attributes = clean_attributes(genai.event_attributes(event, kind, self.capture_content))
            extra = genai.span_attributes(
                event,
                kind,
                openinference=self.openinference,
                capture_content=self.capture_content,
            )
            if extra:
                span.set_attributes(clean_attributes(extra))
        span.add_event(clean(event.class_name()), attributes, unix_nanos(event.timestamp))


def _stacktrace(err: BaseException) -> str:
    """The stack trace as Python prints it, each part (a frame, an error's message)
    :func:`cut` to :data:`MAX_VALUE_CHARS`: every frame is kept, and each message is
    cut as ``exception.message`` is."""
    try:
        parts = traceback.format_exception(type(err), err, err.__traceback__)
    except Exception:
        return ""
    return "".join(cut(part, MAX_VALUE_CHARS) for part in parts)


def _error_type(err: BaseException) -> str:
    kind = type(err)
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


__all__: list[str] = []
