"""capture_propagation_context()/restore_propagation_context() and OpenTelemetry's own W3C
propagators (tracecontext and baggage) understand each other, both ways: the sampling
decision, the trace flags, tracestate and baggage."""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import baggage as otel_baggage
from opentelemetry import context as otel_context
from opentelemetry import trace as trace_api
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from instrumentation import get_dispatcher
from instrumentation.context import parse_traceparent
from instrumentation.otel import OpenTelemetrySpanHandler

from .conftest import Traced, hex_parent, hex_span, hex_trace

#: What an OpenTelemetry application propagates with (the SDK's default set).
W3C = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])

TRACE_HEX, PARENT_HEX = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
TRACESTATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"


def carrier_of(captured: dict[str, Any]) -> dict[str, str]:
    """The headers an application sends: the W3C keys of the captured dict."""
    return {k: v for k, v in captured.items() if k in ("traceparent", "tracestate", "baggage")}


@pytest.fixture
def provider() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        yield tracer_provider, exporter
    finally:
        tracer_provider.shutdown()


def test_an_unsampled_parent_restored_before_any_handler_exports_nothing(
    provider: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """A worker that restores the job's context first and makes its OpenTelemetry
    handler afterwards: the sender's ``-00`` was forgotten (the bridge could not mirror
    it) and the spans under it were exported, as sampled, and sent on with ``-01``.
    The SDK's parent-based sampler would have exported nothing."""
    tracer_provider, exporter = provider
    d = get_dispatcher("tests.otel.w3c.late_handler")
    sent: list[dict[str, Any]] = []

    @d.span
    def job() -> None:
        with tracer_provider.get_tracer("app").start_as_current_span("io"):
            pass
        sent.append(d.capture_propagation_context())

    def worker() -> None:
        d.restore_propagation_context(
            {"traceparent": f"00-{TRACE_HEX}-{PARENT_HEX}-00", "tracestate": TRACESTATE}
        )
        handler = OpenTelemetrySpanHandler(tracer_provider=tracer_provider)
        d.add_span_handler(handler)
        try:
            job()
        finally:
            d.remove_span_handler(handler)
            handler.close()

    contextvars.Context().run(worker)
    assert exporter.get_finished_spans() == ()
    (onward,) = sent
    extracted = trace_api.get_current_span(W3C.extract(carrier_of(onward))).get_span_context()
    assert f"{extracted.trace_id:032x}" == TRACE_HEX and not extracted.trace_flags.sampled
    assert extracted.trace_state.to_header() == TRACESTATE


@pytest.mark.parametrize("flags", ["00", "01", "02", "03"])
def test_restored_flags_reach_opentelemetry_and_are_sent_on_as_it_would(
    traced: Traced, flags: str
) -> None:
    """The trace flags received (sampled, random-trace-id) are those of the parent
    OpenTelemetry sees, and what we send on is what its propagator injects."""
    d = traced.dispatcher
    pairs: list[tuple[str, str]] = []

    @d.span
    def hop() -> None:
        injected: dict[str, str] = {}
        W3C.inject(injected)
        pairs.append((d.capture_propagation_context()["traceparent"], injected["traceparent"]))

    def worker() -> None:
        d.restore_propagation_context({"traceparent": f"00-{TRACE_HEX}-{PARENT_HEX}-{flags}"})
        parent = trace_api.get_current_span().get_span_context()
        assert parent.trace_flags == int(flags, 16)
        hop()

    contextvars.Context().run(worker)
    ((ours, theirs),) = pairs
    assert ours == theirs and ours.startswith(f"00-{TRACE_HEX}-")
    assert int(ours[-2:], 16) & 1 == int(flags, 16) & 1
    assert len(traced.spans()) == int(flags, 16) & 1


def test_our_own_trace_is_sent_with_the_flags_opentelemetry_gives_it(traced: Traced) -> None:
    """A trace of ours: the flags of its OpenTelemetry span (the SDK sets
    random-trace-id where it can tell), not a fixed ``01``."""
    d = traced.dispatcher
    pairs: list[tuple[str, str]] = []

    @d.span
    def root() -> None:
        injected: dict[str, str] = {}
        W3C.inject(injected)
        pairs.append((d.capture_propagation_context()["traceparent"], injected["traceparent"]))

    root()
    ((ours, theirs),) = pairs
    (span,) = traced.spans()
    assert ours == theirs
    assert ours == f"00-{hex_trace(span)}-{hex_span(span)}-{span.context.trace_flags:02x}"  # type: ignore[union-attr]


def test_opentelemetry_context_to_ours_and_back(traced: Traced) -> None:
    """An application's incoming request extracted by OpenTelemetry: a span of ours in
    it captures the tracestate and baggage OpenTelemetry holds. Restored elsewhere, the
    application reads that baggage with ``opentelemetry.baggage`` inside our spans and
    OpenTelemetry's, which carry the tracestate; injected from there by OpenTelemetry,
    the same headers go on."""
    d = traced.dispatcher
    incoming = {
        "traceparent": f"00-{TRACE_HEX}-{PARENT_HEX}-01",
        "tracestate": TRACESTATE,
        "baggage": "userId=alice,serverNode=DF%2028",
    }
    captured: list[dict[str, Any]] = []
    seen: dict[str, Any] = {}

    @d.span
    def handle_request() -> None:
        captured.append(d.capture_propagation_context())

    @d.span
    def process() -> None:
        seen["user"] = otel_baggage.get_baggage("userId")
        seen["node"] = otel_baggage.get_baggage("serverNode")
        with traced.tracer.start_as_current_span("io"):
            outgoing: dict[str, str] = {}
            W3C.inject(outgoing)
            seen["outgoing"] = outgoing

    def server() -> None:
        token = otel_context.attach(W3C.extract(incoming))
        try:
            handle_request()
        finally:
            otel_context.detach(token)

    def worker() -> None:
        d.restore_propagation_context(captured[0])
        process()

    contextvars.Context().run(server)
    (sent,) = captured
    assert sent["tracestate"] == TRACESTATE
    handled_ids = trace_api.get_current_span(W3C.extract(carrier_of(sent))).get_span_context()
    assert f"{handled_ids.trace_id:032x}" == TRACE_HEX
    assert otel_baggage.get_all(W3C.extract(carrier_of(sent))) == {
        "userId": "alice",
        "serverNode": "DF 28",
    }
    contextvars.Context().run(worker)
    assert seen["user"] == "alice" and seen["node"] == "DF 28"
    assert seen["outgoing"]["tracestate"] == TRACESTATE
    assert otel_baggage.get_all(W3C.extract(seen["outgoing"])) == {
        "userId": "alice",
        "serverNode": "DF 28",
    }
    spans = traced.by_name()
    process_span = next(s for n, s in spans.items() if n.endswith("process"))
    handled = next(s for n, s in spans.items() if n.endswith("handle_request"))
    assert hex_parent(process_span) == hex_span(handled)
    assert f"{handled_ids.span_id:016x}" == hex_span(handled)
    for span in spans.values():
        assert hex_trace(span) == TRACE_HEX
        assert span.context.trace_state.to_header() == TRACESTATE  # type: ignore[union-attr]


def test_baggage_restored_without_a_span_keeps_the_applications_span(traced: Traced) -> None:
    """A context captured outside any span, with baggage: restored inside the
    application's server span, the baggage is there and the server span stays the
    parent; restoring the next message, without baggage, takes it back."""
    d = traced.dispatcher
    seen: list[Any] = []

    @d.span
    def work() -> None:
        seen.append(otel_baggage.get_baggage("tenant"))

    def captured_outside_spans() -> dict[str, Any]:
        token = otel_context.attach(otel_baggage.set_baggage("tenant", "acme co"))
        try:
            return d.capture_propagation_context()
        finally:
            otel_context.detach(token)

    message = contextvars.Context().run(captured_outside_spans)
    assert message["traceparent"] is None and message["baggage"] == "tenant=acme+co"

    def worker() -> None:
        with traced.tracer.start_as_current_span("server") as server:
            d.restore_propagation_context(message)
            assert trace_api.get_current_span() is server
            work()
            d.restore_propagation_context({"traceparent": None})
            work()
            assert trace_api.get_current_span() is server

    contextvars.Context().run(worker)
    assert seen == ["acme co", None]
    spans = traced.by_name()
    server_span = spans["server"]
    assert {hex_parent(s) for n, s in spans.items() if n.endswith("work")} == {
        hex_span(server_span)
    }


_HEX = "0123456789abcdef"


@st.composite
def traceparents(draw: st.DrawFn) -> str:
    """A well-formed traceparent of some version, or one with one field broken."""
    version = draw(st.sampled_from(["00", "01", "7f", "cc", "fe"]))
    trace_id = draw(st.text(_HEX, min_size=32, max_size=32))
    span_id = draw(st.text(_HEX, min_size=16, max_size=16))
    flags = draw(st.text(_HEX, min_size=2, max_size=2))
    rest = "" if version == "00" else draw(st.sampled_from(["", "-", "-x", "-abc-def", "--"]))
    broken = draw(st.sampled_from([None, "version", "trace", "span", "flags", "rest"]))
    if broken == "version":
        version = draw(st.sampled_from(["ff", "0g", "0", "000", "0A", "-1"]))
    elif broken == "trace":
        trace_id = draw(
            st.sampled_from(["0" * 32, trace_id[:-1], trace_id + "a", trace_id[:-1] + "A"])
        )
    elif broken == "span":
        span_id = draw(st.sampled_from(["0" * 16, span_id[:-1], span_id + "a", span_id[:-1] + "F"]))
    elif broken == "flags":
        flags = draw(st.sampled_from(["1", "0x", "0B", "123"]))
    elif broken == "rest":
        # Under 512 characters: recent releases of OpenTelemetry refuse longer ones, as
        # we do, and older ones (the oldest this library supports) do not.
        rest = draw(st.sampled_from(["-", "x", "-x", " -x", "-" + "a" * 200]))
    return f"{version}-{trace_id}-{span_id}-{flags}{rest}"


@given(value=traceparents())
def test_traceparents_accepted_as_opentelemetry_accepts_them(value: str) -> None:
    """For values shaped like a traceparent, we refuse exactly what OpenTelemetry's
    propagator ignores, and read the same ids and sampled flag from the others."""
    theirs = trace_api.get_current_span(
        TraceContextTextMapPropagator().extract({"traceparent": value})
    ).get_span_context()
    try:
        ours = parse_traceparent(value)
    except ValueError:
        assert not theirs.is_valid, value
    else:
        assert theirs.is_valid, value
        assert ours == (
            f"{theirs.trace_id:032x}",
            f"{theirs.span_id:016x}",
            theirs.trace_flags.sampled,
        )


def test_baggage_alone_reaches_opentelemetry_and_keeps_the_restored_parent(
    traced: Traced,
) -> None:
    """Headers with ``baggage`` and no ``traceparent``: OpenTelemetry's propagator
    reads that baggage, and so do we now (it used to be ignored). Restored after a
    parent, the parent stays (its flags and tracestate too) and OpenTelemetry sees the
    new baggage there; restored with no parent, the application's span stays current."""
    d = traced.dispatcher
    seen: list[tuple[Any, str, str]] = []

    @d.span
    def work() -> None:
        parent = trace_api.get_current_span().get_span_context()
        injected: dict[str, str] = {}
        W3C.inject(injected)
        seen.append((otel_baggage.get_all(), f"{parent.trace_id:032x}", injected["tracestate"]))

    def worker() -> None:
        d.restore_propagation_context(
            {"traceparent": f"00-{TRACE_HEX}-{PARENT_HEX}-01", "tracestate": TRACESTATE}
        )
        d.restore_propagation_context({"baggage": "tenant=acme"})
        work()
        with traced.tracer.start_as_current_span("server") as server:
            d.restore_propagation_context({"traceparent": None})
            d.restore_propagation_context({"baggage": "tenant=other"})
            assert trace_api.get_current_span() is server
            assert otel_baggage.get_baggage("tenant") == "other"

    contextvars.Context().run(worker)
    assert seen == [({"tenant": "acme"}, TRACE_HEX, TRACESTATE)]
    (work_span,) = [s for n, s in traced.by_name().items() if n.endswith("work")]
    assert hex_parent(work_span) == PARENT_HEX
