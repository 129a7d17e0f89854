"""An application with OpenTelemetry code of its own (samplers, baggage, span processors)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import baggage
from opentelemetry import context as otel_context
from opentelemetry import trace as trace_api
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from instrumentation import SimpleSpanHandler, get_dispatcher
from instrumentation.otel import OpenTelemetrySpanHandler

from .conftest import Traced, make_traced, short


@pytest.fixture
def never_sampled() -> Iterator[Traced]:
    """A provider whose sampler keeps no new trace (as 10% would, for 90% of them)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.0)))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    handler = OpenTelemetrySpanHandler(tracer_provider=provider)
    dispatcher = get_dispatcher("tests.otel.app.never_sampled")
    dispatcher.add_span_handler(handler)
    try:
        yield Traced(dispatcher, handler, provider, exporter)
    finally:
        dispatcher.remove_span_handler(handler)
        handler.close()
        provider.shutdown()


def test_span_of_a_dispatcher_without_the_handler_keeps_the_trace_unsampled(
    never_sampled: Traced,
) -> None:
    """A span of ours on a dispatcher the OpenTelemetry handler is not on (another handler
    is) made the application's spans inside it sampled, in a trace its root had not
    sampled: the parent-based sampler exported them and our handled spans below, as
    children of spans no backend has, and the traceparent sent onward said 01."""
    t = never_sampled
    other = get_dispatcher("tests.otel.app.other")
    other.add_span_handler(SimpleSpanHandler())

    @t.dispatcher.span
    def handled() -> str:
        return str(t.dispatcher.capture_propagation_context()["traceparent"])

    @other.span
    def elsewhere() -> str:
        with t.tracer.start_as_current_span("app.inside"):
            pass
        return handled()

    try:
        with t.tracer.start_as_current_span("request") as request:
            assert not request.get_span_context().trace_flags.sampled
            traceparent = elsewhere()
    finally:
        other.shutdown()
    assert [s.name for s in t.spans()] == []
    assert not int(traceparent[-2:], 16) & 1  # not sampled (the SDK may set random-trace-id)


def test_span_of_a_dispatcher_without_the_handler_in_a_sampled_trace_stays_sampled(
    traced: Traced,
) -> None:
    other = get_dispatcher("tests.otel.app.other_sampled")
    other.add_span_handler(SimpleSpanHandler())

    @other.span
    def elsewhere() -> None:
        with traced.tracer.start_as_current_span("app.inside"):
            pass

    @other.span
    def root_elsewhere() -> None:  # no OpenTelemetry span around: sampled, as before
        with traced.tracer.start_as_current_span("app.under_root"):
            pass

    try:
        with traced.tracer.start_as_current_span("request"):
            elsewhere()
        root_elsewhere()
    finally:
        other.shutdown()
    assert sorted(s.name for s in traced.spans()) == ["app.inside", "app.under_root", "request"]


class _BaggageSpanProcessor(SpanProcessor):
    """What opentelemetry-processor-baggage does: the parent context's baggage on each span."""

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        for key, value in baggage.get_all(parent_context).items():
            span.set_attribute(key, str(value))


@pytest.fixture
def with_baggage_processor() -> Iterator[Traced]:
    for t in make_traced():
        t.provider.add_span_processor(_BaggageSpanProcessor())
        yield t


def test_span_processors_see_the_applications_baggage(with_baggage_processor: Traced) -> None:
    """Our root spans were started in an empty context, and our children in the one their
    parent started in: a span processor reading baggage in on_start (a
    BaggageSpanProcessor copying a tenant or session id onto every span) saw none on a
    root of ours, nor what was set inside its parent, where the application's own spans
    had it."""
    t = with_baggage_processor

    @t.dispatcher.span
    def child() -> None:
        pass

    @t.dispatcher.span
    def llm_call() -> None:
        with t.tracer.start_as_current_span("app.inside"):
            pass
        token = otel_context.attach(baggage.set_baggage("step", "rerank"))
        try:
            child()
        finally:
            otel_context.detach(token)

    token = otel_context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        llm_call()  # a root of ours: no OpenTelemetry span is current
    finally:
        otel_context.detach(token)
    spans = {short(s.name): dict(s.attributes or {}) for s in t.spans()}
    assert spans["llm_call"] == {"tenant": "acme"}
    assert spans["app.inside"] == {"tenant": "acme"}
    assert spans["child"] == {"tenant": "acme", "step": "rerank"}
    roots = [s for s in t.spans() if short(s.name) == "llm_call"]
    assert roots[0].parent is None


def test_a_parent_not_current_in_opentelemetry_keeps_the_applications_baggage(
    with_baggage_processor: Traced,
) -> None:
    """A span of ours whose parent is not the current OpenTelemetry span (a remote
    parent restored before any handler existed, which the bridge could not mirror)
    was started from an empty context: its span processors saw none of the baggage
    current where it started."""
    t = with_baggage_processor
    table = t.handler.table
    token = otel_context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        under_remote = table.foreign_parent("b7ad6b7169203331", "0af7651916cd43dd8448eb211c80319c")
        no_trace = table.foreign_parent("b7ad6b7169203331", None)
    finally:
        otel_context.detach(token)
    assert baggage.get_all(under_remote) == {"tenant": "acme"}
    assert baggage.get_all(no_trace) == {"tenant": "acme"}
    assert trace_api.get_current_span(under_remote).get_span_context().span_id == 0xB7AD6B7169203331
    assert not trace_api.get_current_span(no_trace).get_span_context().is_valid
