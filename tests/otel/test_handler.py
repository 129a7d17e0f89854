"""OpenTelemetrySpanHandler on the real SDK: names, nesting, ids, status, events."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from opentelemetry import trace as trace_api
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import StatusCode

from instrumentation import (
    BaseEvent,
    ContextThreadPoolExecutor,
    SimpleSpanHandler,
    get_dispatcher,
    instrument_tags,
    telemetry,
)
from instrumentation.context import register_bridge, unregister_bridge
from instrumentation.otel import OpenTelemetrySpanHandler
from instrumentation.otel.bridge import BRIDGE
from instrumentation.otel.spans import unix_nanos

from .conftest import Traced, hex_parent, hex_span, hex_trace, short


class Note(BaseEvent):
    text: str
    count: int = 0
    extra: dict[str, Any] = {}


def test_spans_keep_names_nesting_and_one_trace(traced: Traced) -> None:
    """Each decorated call is an OTel span named after it, nested as called, in one trace."""
    d = traced.dispatcher

    @d.span
    def leaf() -> int:
        return 1

    @d.span
    def middle() -> int:
        return leaf() + leaf()

    @d.span
    def top() -> int:
        return middle()

    assert top() == 2
    spans = traced.spans()
    names = sorted(s.name for s in spans)
    assert names == sorted(
        [
            "test_spans_keep_names_nesting_and_one_trace.<locals>.leaf",
            "test_spans_keep_names_nesting_and_one_trace.<locals>.leaf",
            "test_spans_keep_names_nesting_and_one_trace.<locals>.middle",
            "test_spans_keep_names_nesting_and_one_trace.<locals>.top",
        ]
    )
    by_suffix = {short(s.name): s for s in spans}
    top_span, middle_span = by_suffix["top"], by_suffix["middle"]
    assert hex_parent(top_span) is None
    assert hex_parent(middle_span) == hex_span(top_span)
    leaves = [s for s in spans if s.name.endswith("leaf")]
    assert {hex_parent(s) for s in leaves} == {hex_span(middle_span)}
    assert len({hex_trace(s) for s in spans}) == 1
    assert top_span.start_time is not None and top_span.end_time is not None
    assert top_span.start_time <= middle_span.start_time  # type: ignore[operator]
    assert middle_span.end_time <= top_span.end_time  # type: ignore[operator]
    assert all(s.status.status_code is StatusCode.UNSET for s in spans)
    assert {s.instrumentation_scope.name for s in spans} == {d.name}  # type: ignore[union-attr]


def test_ids_agree_with_traceparent_and_events(traced: Traced) -> None:
    """The OTel span has our span id and trace id: traceparent names the exported span."""
    d = traced.dispatcher
    seen: dict[str, Any] = {}

    @d.span
    def work() -> None:
        seen["ctx"] = d.capture_propagation_context()
        seen["otel"] = trace_api.get_current_span().get_span_context()
        event = Note(text="x")
        seen["event"] = event
        d.event(event)

    work()
    (span,) = traced.spans()
    _, trace_hex, span_hex, _ = seen["ctx"]["traceparent"].split("-")
    assert (hex_trace(span), hex_span(span)) == (trace_hex, span_hex)
    assert seen["ctx"]["active_span_id"].endswith(span_hex)
    assert seen["otel"].span_id == int(span_hex, 16)
    assert seen["event"].trace_id == trace_hex


def test_drop_sets_error_status_and_records_exception(traced: Traced) -> None:
    """A raising call ends its span with status ERROR and an exception event."""
    d = traced.dispatcher

    @d.span
    def fails() -> None:
        raise ValueError("no such thing")

    with pytest.raises(ValueError):
        fails()
    (span,) = traced.spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "ValueError: no such thing"
    (exc,) = [e for e in span.events if e.name == "exception"]
    assert exc.attributes is not None
    assert exc.attributes["exception.type"] == "ValueError"
    assert exc.attributes["exception.message"] == "no such thing"
    assert not any(e.name == "SpanDropEvent" for e in span.events)  # no duplicate
    # It left the span; and error.type, as the semantic conventions ask of a failure.
    assert exc.attributes["exception.escaped"] == "True"
    assert dict(span.attributes or {})["error.type"] == "ValueError"


def test_error_type_names_the_module_of_an_exception_not_builtin(traced: Traced) -> None:
    import json

    d = traced.dispatcher

    @d.span
    def fails() -> None:
        json.loads("{")

    with pytest.raises(json.JSONDecodeError):
        fails()
    (span,) = traced.spans()
    assert dict(span.attributes or {})["error.type"] == "json.decoder.JSONDecodeError"


def test_the_id_generator_answers_random_or_not_as_the_providers_own() -> None:
    """The SDK asks the tracer's generator whether trace ids are random for every span
    of the tracer, the application's too; ours said yes even around a generator that
    makes time-based (X-Ray style) ids."""
    from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator

    from instrumentation.otel.ids import PendingIdGenerator

    class TimeBased(IdGenerator):
        def generate_span_id(self) -> int:
            return 1

        def generate_trace_id(self) -> int:
            return 2

        def is_trace_id_random(self) -> bool:
            return False

    assert PendingIdGenerator(TimeBased()).is_trace_id_random() is False
    # Older SDKs have no such method (and do not ask): then the answer is no.
    asks = hasattr(RandomIdGenerator, "is_trace_id_random")
    assert PendingIdGenerator(RandomIdGenerator()).is_trace_id_random() is asks


def test_events_become_span_events_of_their_span(traced: Traced) -> None:
    """Every event is added to the span it was created in, with its fields and time."""
    d = traced.dispatcher
    made: list[Note] = []

    @d.span
    def inner() -> None:
        made.append(Note(text="inner", count=2, extra={"k": [1, 2]}))
        d.event(made[-1])

    @d.span
    def outer() -> None:
        with instrument_tags({"user": "u1"}):
            made.append(Note(text="outer"))
            d.event(made[-1])
        inner()

    outer()
    spans = {short(s.name): s for s in traced.spans()}
    (outer_event,) = spans["outer"].events
    (inner_event,) = spans["inner"].events
    assert outer_event.name == inner_event.name == "Note"
    assert outer_event.attributes is not None and inner_event.attributes is not None
    assert outer_event.attributes["text"] == "outer"
    assert outer_event.attributes["instrumentation.tag.user"] == "u1"
    assert inner_event.attributes["count"] == 2
    assert inner_event.attributes["extra"] == '{"k":[1,2]}'
    assert inner_event.attributes["instrumentation.event_id"] == made[1].id_
    assert inner_event.timestamp == unix_nanos(made[1].timestamp)


def test_event_outside_spans_is_counted_or_joins_foreign_span(traced: Traced) -> None:
    """An event with no span of ours goes to the current OTel span, else is counted."""
    d = traced.dispatcher
    d.event(Note(text="nowhere"))
    assert telemetry.counter("otel.events_without_span").value == 1
    with traced.tracer.start_as_current_span("app"):
        d.event(Note(text="in app span"))
    (app,) = traced.spans()
    assert [e.attributes["text"] for e in app.events if e.attributes] == ["in app span"]


def test_otel_span_inside_ours_is_its_child(traced: Traced) -> None:
    """tracer.start_as_current_span inside a decorated function nests under our span."""
    d = traced.dispatcher

    @d.span
    def handler_step() -> None:
        with traced.tracer.start_as_current_span("db.query"):
            leaf()

    @d.span
    def leaf() -> None:
        pass

    handler_step()
    spans = {short(s.name): s for s in traced.spans()}
    assert hex_parent(spans["db.query"]) == hex_span(spans["handler_step"])
    assert hex_parent(spans["leaf"]) == hex_span(spans["db.query"])
    assert len({hex_trace(s) for s in spans.values()}) == 1


def test_our_span_inside_otel_span_joins_its_trace(traced: Traced) -> None:
    """A span of ours started under an application OTel span is its child, same trace."""
    d = traced.dispatcher
    seen: dict[str, str] = {}

    @d.span
    def work() -> None:
        seen["traceparent"] = d.capture_propagation_context()["traceparent"]

    with traced.tracer.start_as_current_span("http.request") as request:
        work()
    spans = {short(s.name): s for s in traced.spans()}
    app_trace = format(request.get_span_context().trace_id, "032x")
    assert hex_trace(spans["work"]) == app_trace
    assert hex_parent(spans["work"]) == hex_span(spans["http.request"])
    # The flags are the OpenTelemetry span's (sampled, and random-trace-id where the SDK
    # sets it), as OpenTelemetry's own propagator sends them.
    flags = spans["work"].context.trace_flags  # type: ignore[union-attr]
    assert seen["traceparent"] == f"00-{app_trace}-{hex_span(spans['work'])}-{flags:02x}"
    assert flags.sampled


def test_interleaved_generators_parent_their_own_work(traced: Traced) -> None:
    """Each resume of a generator makes its span current again, in OTel's context too."""
    d = traced.dispatcher

    @d.span
    def produce(label: str) -> Iterator[int]:
        for i in range(2):
            with traced.tracer.start_as_current_span(f"{label}{i}"):
                pass
            yield i

    a, b = produce("a"), produce("b")
    for _ in range(2):
        next(a)
        next(b)
    assert list(a) == [] and list(b) == []
    spans = traced.spans()
    gens = [s for s in spans if s.name.endswith("produce")]
    assert len(gens) == 2
    children = {s.name: hex_parent(s) for s in spans if not s.name.endswith("produce")}
    assert children["a0"] == children["a1"] != children["b0"] == children["b1"]
    assert {children["a0"], children["b0"]} == {hex_span(g) for g in gens}
    assert all(s.status.status_code is StatusCode.UNSET for s in gens)


def test_generator_closed_early_is_not_an_error(traced: Traced) -> None:
    """Breaking out of a traced generator ends its span without ERROR status."""

    @traced.dispatcher.span
    def numbers() -> Iterator[int]:
        yield from range(10)

    for n in numbers():
        if n == 2:
            break
    (span,) = traced.spans()
    assert span.status.status_code is StatusCode.UNSET
    assert span.attributes is not None
    assert span.attributes["instrumentation.generator_closed"] is True


async def test_async_tasks_nest_in_both_systems(traced: Traced) -> None:
    """Concurrent coroutines each parent their own OTel spans."""
    d = traced.dispatcher

    @d.span
    async def fetch(label: str) -> str:
        await asyncio.sleep(0)
        with traced.tracer.start_as_current_span(f"io-{label}"):
            await asyncio.sleep(0.001)
        return label

    @d.span
    async def gather() -> list[str]:
        return list(await asyncio.gather(fetch("a"), fetch("b")))

    assert await gather() == ["a", "b"]
    spans = traced.spans()
    fetches = [s for s in spans if s.name.endswith("fetch")]
    top = next(s for s in spans if s.name.endswith("gather"))
    assert {hex_parent(s) for s in fetches} == {hex_span(top)}
    ios = [s for s in spans if s.name.startswith("io-")]
    assert {hex_parent(s) for s in ios} == {hex_span(s) for s in fetches}
    assert len({hex_trace(s) for s in spans}) == 1


def test_threads_with_copied_context_keep_parents(traced: Traced) -> None:
    """Work submitted to ContextThreadPoolExecutor nests under the submitting span."""
    d = traced.dispatcher

    @d.span
    def job(i: int) -> int:
        with traced.tracer.start_as_current_span(f"job-io-{i}"):
            return i

    @d.span
    def fan_out() -> list[int]:
        with ContextThreadPoolExecutor(max_workers=2) as pool:
            return list(pool.map(job, range(3)))

    assert fan_out() == [0, 1, 2]
    spans = traced.spans()
    top = next(s for s in spans if s.name.endswith("fan_out"))
    jobs = [s for s in spans if s.name.endswith(".job")]
    assert len(jobs) == 3 and {hex_parent(s) for s in jobs} == {hex_span(top)}
    ios = [s for s in spans if s.name.startswith("job-io-")]
    assert {hex_parent(s) for s in ios} == {hex_span(s) for s in jobs}


def test_restored_remote_parent_is_the_otel_parent(traced: Traced) -> None:
    """After restore_propagation_context, the OTel span continues the remote trace."""
    d = traced.dispatcher
    trace_hex, parent_hex = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"

    @d.span
    def continued() -> None:
        pass

    def in_worker() -> None:
        d.restore_propagation_context({"traceparent": f"00-{trace_hex}-{parent_hex}-01"})
        continued()

    import contextvars

    contextvars.copy_context().run(in_worker)
    (span,) = traced.spans()
    assert hex_trace(span) == trace_hex
    assert hex_parent(span) == parent_hex
    assert span.parent is not None and span.parent.is_remote


def test_a_restored_trace_continues_in_otel_spans_and_ours_inside_them(traced: Traced) -> None:
    """The worker pattern: restore, open an OpenTelemetry span for the job, call traced
    code. The job span continues the restored trace (it used to start a new one), and
    our span inside it is its child (it went straight under the remote parent)."""
    d = traced.dispatcher
    trace_hex, parent_hex = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"

    @d.span
    def work() -> None:
        pass

    def in_worker() -> None:
        d.restore_propagation_context({"traceparent": f"00-{trace_hex}-{parent_hex}-01"})
        with traced.tracer.start_as_current_span("process-job"):
            work()
        work()  # after the job span: under the remote parent again

    import contextvars

    contextvars.Context().run(in_worker)
    spans = traced.spans()
    job = next(s for s in spans if s.name == "process-job")
    inside, after = (s for s in spans if s.name.endswith(".work"))
    assert {hex_trace(s) for s in spans} == {trace_hex}
    assert hex_parent(job) == parent_hex
    assert hex_parent(inside) == hex_span(job)
    assert hex_parent(after) == parent_hex


def test_restoring_no_span_keeps_the_apps_otel_span_and_undoes_an_earlier_restore(
    traced: Traced,
) -> None:
    """A context captured outside any span restored inside the app's own OpenTelemetry
    span (an HTTP server span, a Celery task span) leaves that span the parent; after an
    earlier restore of a remote parent, it puts back what was current before it."""
    d = traced.dispatcher
    trace_hex, parent_hex = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"

    @d.span
    def work() -> None:
        pass

    def in_worker() -> None:
        with traced.tracer.start_as_current_span("server") as server:
            d.restore_propagation_context({"traceparent": None})
            work()  # under the server span
            d.restore_propagation_context({"traceparent": f"00-{trace_hex}-{parent_hex}-01"})
            work()  # under the remote parent
            d.restore_propagation_context({"traceparent": None})
            work()  # under the server span again
            assert trace_api.get_current_span() is server

    import contextvars

    contextvars.Context().run(in_worker)
    spans = traced.spans()
    server = next(s for s in spans if s.name == "server")
    first, second, third = sorted(
        (s for s in spans if s.name.endswith(".work")),
        key=lambda s: s.start_time or 0,
    )
    assert hex_parent(first) == hex_span(server) and hex_trace(first) == hex_trace(server)
    assert hex_parent(second) == parent_hex and hex_trace(second) == trace_hex
    assert hex_parent(third) == hex_span(server) and hex_trace(third) == hex_trace(server)


def test_restoring_no_span_leaves_an_app_span_started_after_the_restore(traced: Traced) -> None:
    """A worker: each request is the app's own OpenTelemetry span, and messages are
    restored inside it. Restoring no span in request 2 keeps request 2 current: not the
    remote parent restored in it (nor request 1, current at the first restore), and not
    nothing when the app's span was started on top of an earlier restore."""
    d = traced.dispatcher
    tracer = traced.tracer
    remote = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    other = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    no_span = {"traceparent": None}

    @d.span
    def work() -> None:
        pass

    def worker() -> None:
        with tracer.start_as_current_span("request1"):
            d.restore_propagation_context(remote)
        with tracer.start_as_current_span("request2") as request2:
            d.restore_propagation_context(other)
            d.restore_propagation_context(no_span)
            assert trace_api.get_current_span() is request2
            work()
        d.restore_propagation_context(remote)
        with tracer.start_as_current_span("request3") as request3:
            d.restore_propagation_context(no_span)
            assert trace_api.get_current_span() is request3
            work()

    import contextvars

    contextvars.Context().run(worker)
    spans = traced.by_name()
    first, second = sorted(
        (s for s in traced.spans() if s.name.endswith(".work")),
        key=lambda s: s.start_time or 0,
    )
    assert hex_parent(first) == hex_span(spans["request2"])
    assert hex_parent(second) == hex_span(spans["request3"])


@pytest.mark.parametrize("flags", ["00", "01"])
def test_a_restored_traceparent_keeps_its_sampling_decision(traced: Traced, flags: str) -> None:
    """``-00``: the sender decided not to sample. Nothing of the trace is exported here,
    and the context sent onward says so too; ``-01`` is exported and sent on as such."""
    d = traced.dispatcher
    trace_hex, parent_hex = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    onward: list[str] = []

    @d.span
    def handle_job() -> None:
        with traced.tracer.start_as_current_span("io"):
            pass
        onward.append(d.capture_propagation_context()["traceparent"])

    def in_worker() -> None:
        d.restore_propagation_context({"traceparent": f"00-{trace_hex}-{parent_hex}-{flags}"})
        handle_job()

    import contextvars

    contextvars.Context().run(in_worker)
    assert len(traced.spans()) == (0 if flags == "00" else 2)
    (sent,) = onward
    assert sent.startswith(f"00-{trace_hex}-") and sent.endswith(f"-{flags}")


def test_a_foreign_span_open_across_a_generators_yield_stays_the_parent(traced: Traced) -> None:
    """An instrumented HTTP client's span opened inside a traced generator, still open
    after its ``yield``: what runs there after the resume is its child (it went under
    the generator's span), and it does not leak out to the consumer between items."""
    d = traced.dispatcher
    tracer = traced.tracer
    outside: list[int] = []

    @d.span
    def child() -> None:
        pass

    @d.span
    def stream() -> Iterator[int]:
        with tracer.start_as_current_span("http.request"):
            yield 1
            child()
            with tracer.start_as_current_span("parse"):
                pass
            yield 2

    for _ in stream():
        outside.append(trace_api.get_current_span().get_span_context().span_id)
    spans = {short(s.name): s for s in traced.spans()}
    http = hex_span(spans["http.request"])
    assert hex_parent(spans["child"]) == http and hex_parent(spans["parse"]) == http
    assert hex_parent(spans["http.request"]) == hex_span(spans["stream"])
    assert outside == [0, 0]  # nothing of the generator's is current in the consumer


def test_a_foreign_span_open_across_an_async_generators_yield_stays_the_parent(
    traced: Traced,
) -> None:
    d = traced.dispatcher
    tracer = traced.tracer

    @d.span
    async def child() -> None:
        pass

    @d.span
    async def stream() -> AsyncIterator[int]:
        with tracer.start_as_current_span("http.request"):
            yield 1
            await child()
            yield 2

    async def consume() -> list[int]:
        return [item async for item in stream()]

    assert asyncio.run(consume()) == [1, 2]
    spans = {short(s.name): s for s in traced.spans()}
    assert hex_parent(spans["child"]) == hex_span(spans["http.request"])


def test_span_of_unhandled_dispatcher_still_parents_foreign_spans(traced: Traced) -> None:
    """A span whose dispatcher has no OTel handler is current in OTel as a stand-in."""
    other = get_dispatcher(traced.dispatcher.name + "_other")
    from instrumentation.testing import capture_spans

    @other.span
    def unexported() -> None:
        with traced.tracer.start_as_current_span("inside"):
            exported()

    @traced.dispatcher.span
    def exported() -> None:
        pass

    with capture_spans(other) as ours:
        unexported()
    ours.refresh()
    unexported_id = next(s.id_ for s in ours if s.name and s.name.endswith("unexported"))
    spans = {short(s.name): s for s in traced.spans()}
    assert set(spans) == {"inside", "exported"}
    assert hex_parent(spans["inside"]) == unexported_id[-16:]
    assert hex_parent(spans["exported"]) == hex_span(spans["inside"])


def test_tags_and_span_attributes_become_attributes(traced: Traced) -> None:
    """Span tags and @span(attributes=..., request=True) reach the OTel span."""
    d = traced.dispatcher

    @d.span(attributes={"db.system": "sqlite", "rows": 3}, request=True)
    def query() -> None:
        pass

    with d.span("block", tags={"tenant": "t1"}):
        query()
    spans = {short(s.name): s for s in traced.spans()}
    assert spans["block"].attributes is not None and spans["query"].attributes is not None
    assert spans["block"].attributes["instrumentation.tag.tenant"] == "t1"
    assert spans["query"].attributes["db.system"] == "sqlite"
    assert spans["query"].attributes["rows"] == 3
    assert spans["query"].attributes["instrumentation.request"] is True


def test_close_ends_open_spans_with_error(traced: Traced) -> None:
    """close() (as Dispatcher.shutdown calls it) ends spans still open, marked ERROR."""
    d = traced.dispatcher
    block = d.span("never-finished")
    block.__enter__()
    try:
        assert traced.handler.open_span_ids() == [block.id_]
        traced.handler.close()
        (span,) = traced.spans()
        assert span.status.status_code is StatusCode.ERROR
        assert traced.handler.open_span_ids() == []
        assert BRIDGE.tables() == []
    finally:
        block.__exit__(None, None, None)


def test_handler_is_one_object_for_both_roles() -> None:
    """The same handler object is accepted as span handler and as event handler."""
    provider = TracerProvider()
    handler = OpenTelemetrySpanHandler(provider)
    d = get_dispatcher("tests.otel.roles")
    try:
        d.add_span_handler(handler)
        d.add_event_handler(handler)
        assert d.span_handlers == [handler] and d.event_handlers == [handler]
    finally:
        d.remove_span_handler(handler)
        d.remove_event_handler(handler)
        handler.close()


def test_bad_provider_is_refused() -> None:
    """A tracer_provider that is not one gets a TypeError saying what to pass."""
    with pytest.raises(TypeError, match="TracerProvider"):
        OpenTelemetrySpanHandler(tracer_provider="http://localhost:4318")
    # The class passed where an instance belongs: every span was lost (logged, counted).
    with pytest.raises(TypeError, match=r"the class TracerProvider itself: write TracerProvider"):
        OpenTelemetrySpanHandler(tracer_provider=TracerProvider)
    assert BRIDGE.tables() == []


def test_a_bridge_that_raises_is_logged_and_counted_not_silent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A context bridge's attach, capture and detach errors were swallowed unseen."""

    class Broken:
        def parent_for(self, own: Any) -> Any:
            return own

        def attach(self, span: Any) -> object:
            raise RuntimeError("attach broke")

        def detach(self, token: object) -> None:
            raise RuntimeError("detach broke")

    d = get_dispatcher("tests.otel.broken_bridge")
    d.add_span_handler(SimpleSpanHandler())
    seen: list[int] = []

    @d.span
    def work() -> int:
        seen.append(1)
        return 2

    bridge = Broken()
    register_bridge(bridge)
    before = telemetry.HANDLER_ERRORS.value
    try:
        with caplog.at_level(logging.ERROR, logger="instrumentation"):
            assert work() == 2
    finally:
        unregister_bridge(bridge)
        d.shutdown()
    assert seen == [1]
    assert telemetry.HANDLER_ERRORS.value - before == 1  # attach; nothing to detach then
    assert "failed in attach" in caplog.text and "attach broke" in caplog.text


def test_a_bridge_failing_in_parent_for_restore_sampled_or_propagation_is_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Those four were swallowed without a word (attach, capture and detach were not):
    a bridge that breaks there broke the trace unseen."""

    class Broken:
        def parent_for(self, own: Any) -> Any:
            raise RuntimeError("parent_for broke")

        def attach(self, span: Any) -> object:
            return None

        def detach(self, token: object) -> None:
            pass

        def restore(self, parent: Any, sampled: bool) -> None:
            raise RuntimeError("restore broke")

        def sampled(self) -> bool:
            raise RuntimeError("sampled broke")

        def propagation(self, span: Any) -> Any:
            raise RuntimeError("propagation broke")

    d = get_dispatcher("tests.otel.broken_bridge_four")
    d.add_span_handler(SimpleSpanHandler())
    bridge = Broken()
    register_bridge(bridge)
    before = telemetry.HANDLER_ERRORS.value
    try:
        with caplog.at_level(logging.ERROR, logger="instrumentation"):
            with d.span("work"):
                captured = d.capture_propagation_context()
            contextvars.Context().run(d.restore_propagation_context, captured)
    finally:
        unregister_bridge(bridge)
        d.shutdown()
    assert captured["traceparent"] is not None  # the capture went on
    assert telemetry.HANDLER_ERRORS.value - before == 4
    # The first is logged; the others within 10 s are counted (one line a handler).
    assert "failed in parent_for" in caplog.text and "parent_for broke" in caplog.text


def test_global_provider_is_used_when_none_given() -> None:
    """With no provider, the global one is used, even when it is set after the handler."""
    script = textwrap.dedent(
        """
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from instrumentation import get_dispatcher
        from instrumentation.otel import OpenTelemetrySpanHandler

        handler = OpenTelemetrySpanHandler()
        d = get_dispatcher("app")
        d.add_span_handler(handler)

        @d.span
        def work():
            return d.capture_propagation_context()["traceparent"]

        work()  # before the global provider exists: nothing to export to
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        tp = work()
        (span,) = exporter.get_finished_spans()
        assert span.name == "work", span.name
        ctx = span.get_span_context()
        assert tp == f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}", tp
        assert ctx.trace_flags.sampled, tp
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_threads_get_their_own_ids(traced: Traced) -> None:
    """Concurrent threads each get OTel spans with their own span's ids (no mix-ups)."""
    d = traced.dispatcher
    seen: list[str] = []
    lock = threading.Lock()

    @d.span
    def work() -> None:
        traceparent = d.capture_propagation_context()["traceparent"]
        with lock:
            seen.append(traceparent)

    def loop() -> None:
        for _ in range(200):
            work()

    threads = [threading.Thread(target=loop) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    exported = {
        f"00-{hex_trace(s)}-{hex_span(s)}-{s.context.trace_flags:02x}"  # type: ignore[union-attr]
        for s in traced.spans()
    }
    assert len(seen) == 800 and set(seen) == exported


def test_dispatcher_shutdown_ends_open_spans_and_detaches(traced: Traced) -> None:
    """Dispatcher.shutdown() closes the handler: open spans end as ERROR, nothing after."""
    d = traced.dispatcher
    block = d.span("open-at-shutdown")
    block.__enter__()
    try:
        d.shutdown()
    finally:
        block.__exit__(None, None, None)
    (span,) = traced.spans()
    assert span.status.status_code is StatusCode.ERROR
    assert d.span_handlers == [] and BRIDGE.tables() == []


def test_nothing_is_traced_where_otel_suppresses_instrumentation(traced: Traced) -> None:
    """Inside OpenTelemetry's own suppression (an exporter's I/O), no span is made."""
    from opentelemetry import context as otel_context

    @traced.dispatcher.span
    def send() -> None:
        traced.dispatcher.event(Note(text="in exporter"))

    key = otel_context._SUPPRESS_INSTRUMENTATION_KEY
    token = otel_context.attach(otel_context.set_value(key, True))
    try:
        send()
    finally:
        otel_context.detach(token)
    assert traced.spans() == []
    assert traced.handler.open_span_ids() == []
    send()
    assert len(traced.spans()) == 1


def test_bridge_is_registered_with_the_core_while_handlers_exist(traced: Traced) -> None:
    """Making a handler registers the one OpenTelemetry bridge with the core, once."""
    from instrumentation.context import bridges

    second = OpenTelemetrySpanHandler(tracer_provider=traced.provider)
    try:
        assert [b for b in bridges() if b is BRIDGE] == [BRIDGE]
        assert len(BRIDGE.tables()) == 2
    finally:
        second.close()
    assert len(BRIDGE.tables()) == 1


async def test_async_generator_resumes_parent_their_own_work(traced: Traced) -> None:
    """An async generator's span is current in OTel at each resume, even interleaved."""

    @traced.dispatcher.span
    async def stream(label: str) -> AsyncIterator[int]:
        for i in range(2):
            await asyncio.sleep(0)
            with traced.tracer.start_as_current_span(f"{label}{i}"):
                pass
            yield i

    a, b = stream("a"), stream("b")
    for _ in range(2):
        await a.__anext__()
        await b.__anext__()
    assert [x async for x in a] == [] and [x async for x in b] == []
    spans = traced.spans()
    gens = {hex_span(s) for s in spans if s.name.endswith("stream")}
    children = {s.name: hex_parent(s) for s in spans if not s.name.endswith("stream")}
    assert children["a0"] == children["a1"] != children["b0"] == children["b1"]
    assert {children["a0"], children["b0"]} == gens


def test_without_the_otel_extra_the_import_error_says_what_to_install() -> None:
    """It was a bare "No module named 'opentelemetry'", from deep inside the bridge."""
    script = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "try:\n"
        "    import instrumentation.otel\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'instrumentation[otel]'" in done.stdout
