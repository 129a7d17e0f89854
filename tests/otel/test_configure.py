"""configure_otlp end to end: the real SDK and exporter, a real OTLP/HTTP receiver."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Sequence

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from instrumentation import BaseEvent, get_dispatcher, root_dispatcher, telemetry
from instrumentation.context import is_suppressed
from instrumentation.otel import configure_otlp
from instrumentation.otel.configure import traces_url
from instrumentation.otel.receiver import OTLPReceiver

from .conftest import SilentCollector, short


class Step(BaseEvent):
    label: str


def test_spans_reach_the_collector_with_names_parents_attributes(receiver: OTLPReceiver) -> None:
    """Nested calls, an event and an error arrive decoded, with the right structure."""
    otlp = configure_otlp(endpoint=receiver.endpoint, service_name="checkout")
    d = get_dispatcher("tests.otel.shop")

    @d.span
    def pay(amount: int) -> int:
        d.event(Step(label="charged"))
        if amount < 0:
            raise ValueError("negative amount")
        return amount

    @d.span(attributes={"http.route": "/checkout"}, request=True)
    def checkout() -> int:
        total = pay(5)
        try:
            pay(-1)
        except ValueError:
            pass
        return total

    try:
        assert checkout() == 5
    finally:
        otlp.shutdown()
    spans = receiver.spans  # no waiting: shutdown flushed everything
    assert sorted(short(s.name) for s in spans) == ["checkout", "pay", "pay"]
    top = next(s for s in spans if short(s.name) == "checkout")
    pays = [s for s in spans if s is not top]
    assert top.parent_span_id is None
    assert {s.parent_span_id for s in pays} == {top.span_id}
    assert {s.trace_id for s in spans} == {top.trace_id}
    assert top.attributes["http.route"] == "/checkout"
    assert top.attributes["instrumentation.request"] is True
    assert top.resource["service.name"] == "checkout"
    assert {s.scope for s in spans} == {"tests.otel.shop"}
    failed = [s for s in pays if s.is_error]
    assert len(failed) == 1 and failed[0].status_message == "ValueError: negative amount"
    assert [e.name for e in failed[0].events] == ["Step", "exception"]
    assert all(e.attributes["label"] == "charged" for s in pays for e in s.events[:1])
    assert root_dispatcher.span_handlers == [] and root_dispatcher.event_handlers == []


def test_shutdown_flushes_everything_and_is_idempotent(receiver: OTLPReceiver) -> None:
    """Hundreds of spans still queued in the batch processor all arrive on shutdown."""
    with configure_otlp(endpoint=receiver.endpoint) as otlp:
        d = get_dispatcher("tests.otel.bulk")

        @d.span
        def unit(i: int) -> int:
            return i

        for i in range(600):
            unit(i)
    assert otlp.closed
    assert len(receiver.spans) == 600
    assert otlp.shutdown() is True  # a second time: nothing happens, same answer
    unit(1)  # detached: nothing more is exported
    assert len(receiver.spans) == 600
    assert telemetry.counter("otel.spans_exported").value == 600


def test_a_collector_that_does_not_answer_bounds_flush_and_shutdown() -> None:
    """Flush and shutdown wait at most their timeouts, say False, and count every span
    that did not go out; the exporter's own timeout (30 s here) is not what bounds them."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    otlp = configure_otlp(endpoint=f"http://127.0.0.1:{port}", timeout=30)
    d = get_dispatcher("tests.otel.unreachable")

    @d.span
    def unit(i: int) -> int:
        return i

    for i in range(50):
        unit(i)
    started = time.monotonic()
    assert otlp.force_flush(500) is False
    assert time.monotonic() - started < 5
    started = time.monotonic()
    assert otlp.shutdown(timeout_millis=1_000) is False
    assert time.monotonic() - started < 1.5
    assert telemetry.counter("otel.spans_exported").value == 0
    assert telemetry.counter("otel.spans_not_exported").value == 50
    assert otlp.shutdown() is False  # idempotent


def test_flushes_that_time_out_keep_at_most_one_thread_waiting() -> None:
    """Each flush that times out used to leave a thread behind until its export ended."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    otlp = configure_otlp(endpoint=f"http://127.0.0.1:{port}", timeout=30)
    try:
        for i in range(4):
            with get_dispatcher("tests.otel.flushes").span(f"unit{i}"):
                pass
            assert otlp.force_flush(200) is False
        flushing = [t for t in threading.enumerate() if t.name == "instrumentation-otel-flush"]
        assert len(flushing) == 1
    finally:
        assert otlp.shutdown(timeout_millis=500) is False


def test_a_shutdown_racing_another_gets_the_same_answer() -> None:
    """The second caller waits for the first, instead of answering True at once, but
    no longer than its own timeout."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    otlp = configure_otlp(endpoint=f"http://127.0.0.1:{port}", timeout=30)
    with get_dispatcher("tests.otel.race").span("unit"):
        pass
    answers: list[bool] = []
    first = threading.Thread(target=lambda: answers.append(otlp.shutdown(timeout_millis=800)))
    first.start()
    time.sleep(0.1)
    started = time.monotonic()
    assert otlp.shutdown(timeout_millis=100) is False  # the first is not done yet
    assert time.monotonic() - started < 0.45
    second = otlp.shutdown(timeout_millis=5_000)
    first.join()
    assert answers == [False] and second is False


def _shutdown_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "instrumentation-otel-shutdown"}


def test_shutdown_gives_up_in_its_budget_and_counts_every_span_before_returning(
    silent_collector: SilentCollector, caplog: pytest.LogCaptureFixture
) -> None:
    """A collector that accepts and never answers: shutdown returns within its timeout
    (not timeout + 1 s), and by then every span (the batch in flight and the one still
    queued) is counted and a warning is logged, not seconds later when the export times
    out. When the abandoned export fails late, nothing is counted twice."""
    otlp = configure_otlp(endpoint=silent_collector.endpoint, timeout=30)
    d = get_dispatcher("tests.otel.silent")
    for i in range(600):  # two batches: 512 in flight, 88 queued behind them
        with d.span(f"unit{i % 3}"):
            pass
    caplog.set_level(logging.WARNING, logger="instrumentation.otel")
    before = _shutdown_threads()
    started = time.monotonic()
    assert otlp.shutdown(timeout_millis=600) is False
    took = time.monotonic() - started
    not_exported = telemetry.counter("otel.spans_not_exported").value
    assert 0.5 < took < 1.0  # was timeout + 1 s
    assert not_exported == 600
    assert telemetry.counter("otel.spans_exported").value == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("gave up after 600 ms: 600 spans not exported" in m for m in warnings)
    abandoned = _shutdown_threads() - before
    assert len(abandoned) == 1  # the export still hangs
    silent_collector.close()  # now it fails
    for worker in abandoned:
        worker.join(5)
    assert not any(worker.is_alive() for worker in abandoned)
    assert telemetry.counter("otel.spans_not_exported").value == 600
    assert telemetry.counter("otel.spans_exported").value == 0
    assert otlp.exporter.not_exported == 600


def test_a_batch_arriving_after_shutdown_gave_up_is_counted_late_not_twice(
    silent_collector: SilentCollector,
) -> None:
    """Spans shutdown declared lost that reach the collector afterwards stay counted as
    not exported (that is what shutdown reported) and are counted in
    otel.spans_exported_late, never in otel.spans_exported."""
    otlp = configure_otlp(endpoint=silent_collector.endpoint, timeout=30)
    for i in range(5):
        with get_dispatcher("tests.otel.late").span(f"unit{i}"):
            pass
    before = _shutdown_threads()
    assert otlp.shutdown(timeout_millis=300) is False
    assert telemetry.counter("otel.spans_not_exported").value == 5
    abandoned = _shutdown_threads() - before
    assert len(abandoned) == 1
    silent_collector.answer()
    for worker in abandoned:
        worker.join(5)
    assert not any(worker.is_alive() for worker in abandoned)
    assert telemetry.counter("otel.spans_exported_late").value == 5
    assert telemetry.counter("otel.spans_exported").value == 0
    assert telemetry.counter("otel.spans_not_exported").value == 5


def test_interpreter_exit_is_bounded_when_the_collector_does_not_answer() -> None:
    """Without shutdown(), exit shuts down through the handle: with a collector that
    accepts and never answers it waits exit_timeout_millis, not more, and the loss is
    in the counter and on stderr before the interpreter is gone."""
    code = textwrap.dedent(
        """
        import atexit, socket, sys, time
        from instrumentation import get_dispatcher, telemetry
        from instrumentation.otel import configure_otlp

        ended = []

        def report():  # registered first, so it runs after the handle's own exit hook
            print(
                "exit took %.3f s, spans_not_exported=%d"
                % (time.monotonic() - ended[0], telemetry.counter("otel.spans_not_exported").value),
                file=sys.stderr,
                flush=True,
            )

        atexit.register(report)
        collector = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; no answer
        port = collector.getsockname()[1]
        otlp = configure_otlp(endpoint=f"http://127.0.0.1:{port}", timeout=30)
        otlp.exit_timeout_millis = 500
        d = get_dispatcher("exit")
        for i in range(20):
            with d.span("unit"):
                pass
        otlp.force_flush(100)  # a batch is in flight, hanging
        ended.append(time.monotonic())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], check=True, timeout=60, capture_output=True, text=True
    )
    lines = done.stderr.splitlines()
    report = [line for line in lines if line.startswith("exit took")]
    assert len(report) == 1, done.stderr
    took = float(report[0].split()[2])
    assert 0.4 < took < 0.9, done.stderr  # was timeout + 1 s
    assert report[0].endswith("spans_not_exported=20")
    warned = [i for i, line in enumerate(lines) if "gave up after 500 ms: 20 spans" in line]
    assert warned and warned[0] < lines.index(report[0]), done.stderr


def test_otel_environment_variables_are_honoured(
    receiver: OTLPReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no arguments, OTEL_EXPORTER_OTLP_* and OTEL_SERVICE_NAME configure it."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=secret")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    otlp = configure_otlp()

    @get_dispatcher("tests.otel.env").span
    def work() -> None:
        pass

    work()
    otlp.shutdown()
    (span,) = receiver.spans
    assert span.resource["service.name"] == "from-env"
    assert receiver.request_headers[0]["x-api-key"] == "secret"


def test_headers_argument_is_sent(receiver: OTLPReceiver) -> None:
    """headers= reach the collector (e.g. an authorization header for a SaaS backend)."""
    otlp = configure_otlp(
        endpoint=receiver.endpoint + "/v1/traces/", headers={"authorization": "Basic abc"}
    )

    @get_dispatcher("tests.otel.auth").span
    def work() -> None:
        pass

    work()
    otlp.shutdown()
    assert len(receiver.spans) == 1
    assert receiver.request_headers[0]["authorization"] == "Basic abc"


def test_traces_url_appends_the_path_once() -> None:
    """The base URL gets /v1/traces; a URL that has it already is left alone."""
    assert traces_url("http://h:4318") == "http://h:4318/v1/traces"
    assert traces_url("https://h/api/public/otel/") == "https://h/api/public/otel/v1/traces"
    assert traces_url("http://h:4318/v1/traces") == "http://h:4318/v1/traces"


def test_bad_arguments_say_what_to_do() -> None:
    """Wrong protocol, endpoint or headers are refused before anything is set up."""
    with pytest.raises(ValueError, match="http/protobuf"):
        configure_otlp(endpoint="http://127.0.0.1:1", protocol="http/json")
    with pytest.raises(ValueError, match="http://"):
        configure_otlp(endpoint="127.0.0.1:4318")
    with pytest.raises(TypeError, match="base URL"):
        configure_otlp(endpoint=4318)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="mapping of str"):
        configure_otlp(endpoint="http://127.0.0.1:1", headers=[("a", "b")])  # type: ignore[arg-type]
    assert root_dispatcher.span_handlers == []


def test_grpc_protocol_uses_the_grpc_exporter() -> None:
    """protocol='grpc' builds the gRPC exporter for the endpoint as given."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    otlp = configure_otlp(endpoint="http://127.0.0.1:4317", protocol="grpc")
    try:
        assert isinstance(otlp.exporter.inner, OTLPSpanExporter)
        assert otlp.protocol == "grpc"
    finally:
        otlp.shutdown()


class TracingExporter(SpanExporter):
    """An exporter whose I/O is itself instrumented (as an instrumented HTTP client is)."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.suppressed: list[bool] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.suppressed.append(is_suppressed())
        send()
        self.batches.append(len(spans))
        return SpanExportResult.SUCCESS


@get_dispatcher("tests.otel.http_client").span
def send() -> None:
    """Stands for an instrumented HTTP client's request."""


def test_exporter_io_is_not_traced() -> None:
    """Spans made by the exporter's own I/O are suppressed: no feedback loop."""
    exporter = TracingExporter()
    with configure_otlp(exporter=exporter):

        @get_dispatcher("tests.otel.app").span
        def work() -> None:
            pass

        work()
    assert exporter.batches == [1]  # only work(), never send()
    assert exporter.suppressed == [True]


def test_openinference_switch_reaches_the_collector(receiver: OTLPReceiver) -> None:
    """configure_otlp(openinference=True) marks spans with an OpenInference kind."""
    with configure_otlp(endpoint=receiver.endpoint, openinference=True):

        @get_dispatcher("tests.otel.oi").span
        def work() -> None:
            pass

        work()
    (span,) = receiver.spans
    assert span.attributes["openinference.span.kind"] == "CHAIN"


def test_shutdown_answers_at_once_after_an_interrupted_or_reentered_shutdown(
    receiver: OTLPReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C during shutdown, or a signal handler calling shutdown again from the same
    thread, must not leave later calls waiting."""
    interrupted = configure_otlp(endpoint=receiver.endpoint)
    finish_later = interrupted._shutdown

    def ctrl_c(timeout_millis: int) -> bool:
        raise KeyboardInterrupt

    monkeypatch.setattr(interrupted, "_shutdown", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        interrupted.shutdown()
    started = time.monotonic()
    assert interrupted.shutdown(timeout_millis=5_000) is False
    assert time.monotonic() - started < 1
    finish_later(5_000)  # what the interrupted call would have done

    reentered = configure_otlp(endpoint=receiver.endpoint)
    inner: list[tuple[bool, float]] = []
    real = reentered._shutdown

    def with_signal(timeout_millis: int) -> bool:
        started = time.monotonic()
        inner.append((reentered.shutdown(timeout_millis=5_000), time.monotonic() - started))
        return real(timeout_millis)

    monkeypatch.setattr(reentered, "_shutdown", with_signal)
    assert reentered.shutdown() is True
    assert inner[0][0] is False and inner[0][1] < 1
