"""OTLP over gRPC when shutting down: a collector that refuses the connection (nothing
listens there) is given up on at once, as over HTTP; one that is there gets every span.
A real gRPC trace service on loopback stands for the collector."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import pytest

from instrumentation import get_dispatcher, telemetry
from instrumentation.otel import configure_otlp

grpc = pytest.importorskip("grpc")
from opentelemetry.proto.collector.trace.v1 import (  # noqa: E402
    trace_service_pb2,
    trace_service_pb2_grpc,
)


class GrpcCollector(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    """OTLP's trace service on 127.0.0.1: keeps the names of the spans it is sent."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.names: list[str] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self._server.add_insecure_port(f"127.0.0.1:{port}")
        self._server.start()

    def Export(self, request: Any, context: Any) -> Any:
        with self._lock:
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    self.names.extend(span.name for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def stop(self) -> None:
        self._server.stop(grace=None).wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
def port() -> int:
    return _free_port()


@pytest.fixture
def collector(port: int) -> Iterator[GrpcCollector]:
    server = GrpcCollector(port)
    try:
        yield server
    finally:
        server.stop()


def _trace(n: int, name: str = "tests.otel.grpc") -> None:
    d = get_dispatcher(name)
    for i in range(n):
        with d.span(f"unit{i}"):
            pass


_EXIT = """
import sys, time
from instrumentation import get_dispatcher
from instrumentation.otel import configure_otlp

configure_otlp(endpoint=sys.argv[1], protocol="grpc")
d = get_dispatcher("cli")
for i in range(5):
    with d.span(f"unit{i}"):
        pass
"""


def test_a_short_script_exits_at_once_when_nothing_listens(port: int) -> None:
    """The exporter retried a refused connection with backoff until the handle's exit
    timeout (5 s): exit now tries nothing that is known refused. The spans are counted
    and warned about."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _EXIT, f"http://127.0.0.1:{port}"],
        check=True,
        timeout=60,
        capture_output=True,
        text=True,
    )
    took = time.monotonic() - started
    assert "5 of 5 spans handed to the exporter were not exported (5 failed" in done.stderr
    assert "refused the connection (nothing listens there)" in done.stderr
    assert "Traceback" not in done.stderr
    assert took < 4, done.stderr  # the interpreter's start included; it took over 5.5 s


def test_an_export_retrying_a_refusal_is_cut_short_by_shutdown(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """An export waiting out its backoff after a refusal when shutdown() begins: the
    backoff is not waited out, and the batches behind it are not sent either."""
    caplog.set_level(logging.WARNING, logger="instrumentation.otel")
    otlp = configure_otlp(endpoint=f"http://127.0.0.1:{port}", protocol="grpc")
    try:
        if not hasattr(otlp.exporter.inner, "_shutdown_in_progress"):
            pytest.skip("this (older) gRPC exporter's backoff cannot be cut short")
        _trace(1)
        assert otlp.force_flush(300) is False  # refused: waiting out its backoff
        _trace(10)  # queued behind it
        started = time.monotonic()
        assert otlp.shutdown(timeout_millis=10_000) is False
        assert time.monotonic() - started < 3  # it waited for the 10 s
    finally:
        otlp.shutdown(timeout_millis=1_000)
    assert telemetry.counter("otel.spans_not_exported").value == 11
    assert any("11 of 11 spans" in m for m in caplog.messages)


def test_a_collector_that_is_there_gets_every_span_at_shutdown(collector: GrpcCollector) -> None:
    otlp = configure_otlp(endpoint=f"http://127.0.0.1:{collector.port}", protocol="grpc")
    _trace(7)
    assert otlp.shutdown(timeout_millis=10_000) is True
    assert sorted(collector.names) == sorted(f"unit{i}" for i in range(7))
    assert telemetry.counter("otel.spans_exported").value == 7


def test_a_collector_back_when_shutdown_begins_gets_every_batch(port: int) -> None:
    """Refused while running (retried, as the SDK does), listening again when shutdown()
    begins: the export retrying is cut short, and it and the batches behind it are sent."""
    otlp = configure_otlp(endpoint=f"http://127.0.0.1:{port}", protocol="grpc")
    collector = None
    try:
        _trace(1)
        assert otlp.force_flush(300) is False  # refused: retrying after its backoff
        _trace(10)
        collector = GrpcCollector(port)
        assert otlp.shutdown(timeout_millis=10_000) is True
        assert len(collector.names) == 11
    finally:
        otlp.shutdown(timeout_millis=1_000)
        if collector is not None:
            collector.stop()
    assert telemetry.counter("otel.spans_not_exported").value == 0


@pytest.mark.parametrize(
    ("endpoint", "variables", "probed"),
    [
        ("http://127.0.0.1:4317", {}, ("127.0.0.1", 4317)),
        ("collector.example:4317", {}, ("collector.example", 4317)),
        ("https://[::1]:9000", {}, ("::1", 9000)),
        (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://h:1"}, ("h", 1)),
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://e:2"}, ("e", 2)),
        (None, {}, ("localhost", 4317)),
        ("unix:///tmp/otel.sock", {}, None),
        ("dns:///collector:4317", {}, None),
        ("http://127.0.0.1:4317", {"https_proxy": "http://proxy:3128"}, None),
        ("http://127.0.0.1:4317", {"GRPC_PROXY": "http://proxy:3128"}, None),
        (
            "http://127.0.0.1:4317",
            {"https_proxy": "http://proxy:3128", "no_proxy": "localhost,127.0.0.1"},
            ("127.0.0.1", 4317),
        ),
        (
            "http://collector.internal:4317",
            {"HTTPS_PROXY": "http://proxy:3128", "NO_GRPC_PROXY": ".internal"},
            ("collector.internal", 4317),
        ),
        (
            "http://collector.example:4317",
            {"https_proxy": "http://proxy:3128", "no_proxy": ".internal"},
            None,
        ),
        ("http://collector.example", {}, None),
    ],
)
def test_the_address_tried_is_the_one_the_grpc_exporter_connects_to(
    endpoint: str | None,
    variables: dict[str, str],
    probed: tuple[str, int] | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tried only where the answer means something: not through a proxy (the proxy is
    connected to), nor for gRPC's own target names, nor without a port."""
    from instrumentation.otel.configure import _grpc_address

    for name in (
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "grpc_proxy",
        "https_proxy",
        "http_proxy",
        "GRPC_PROXY",
        "HTTPS_PROXY",
        "HTTP_PROXY",
        "no_proxy",
        "NO_PROXY",
        "no_grpc_proxy",
        "NO_GRPC_PROXY",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert _grpc_address(endpoint) == probed


def test_shutdown_keeps_its_timeout_with_a_collector_that_does_not_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The connection that tells whether the collector refuses was tried on the
    caller's thread: a collector that does not answer (its connections dropped, as a
    firewall or a full queue does) held shutdown() for the probe's wait, 250 ms (per
    address of its name), whatever its timeout. Here the wait is made longer (a slow
    name lookup is as long) to be plain."""
    from instrumentation.otel import configure

    monkeypatch.setattr(configure, "_PROBE_TIMEOUT_S", 2.0)
    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(0)
    port = black_hole.getsockname()[1]
    queued = []
    for _ in range(3):  # fill its queue: later connections are dropped, never answered
        waiting = socket.socket()
        waiting.settimeout(0.3)
        try:
            waiting.connect(("127.0.0.1", port))
        except OSError:
            pass
        queued.append(waiting)
    try:
        otlp = configure_otlp(endpoint=f"http://127.0.0.1:{port}", protocol="grpc")
        _trace(1)
        assert otlp.force_flush(200) is False  # its export waits on the collector
        started = time.monotonic()
        assert otlp.shutdown(timeout_millis=200) is False
        assert time.monotonic() - started < 1.5  # it took 2.2 s
    finally:
        for thread in threading.enumerate():  # the probe, before the port closes
            if thread.name == "instrumentation-otel-stop":
                thread.join(5)
        for waiting in queued:
            waiting.close()
        black_hole.close()
