"""Fixtures for the OpenTelemetry bridge: a real SDK provider, in memory or over OTLP/HTTP."""

from __future__ import annotations

import itertools
import socket
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass

import pytest
from opentelemetry import trace as trace_api
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from instrumentation import Dispatcher, get_dispatcher
from instrumentation.context import unregister_bridge
from instrumentation.otel import OpenTelemetrySpanHandler
from instrumentation.otel.bridge import BRIDGE
from instrumentation.otel.receiver import OTLPReceiver

_names = itertools.count()


@dataclass
class Traced:
    """A dispatcher whose spans go through an OpenTelemetrySpanHandler into memory."""

    dispatcher: Dispatcher
    handler: OpenTelemetrySpanHandler
    provider: TracerProvider
    exporter: InMemorySpanExporter

    @property
    def tracer(self) -> trace_api.Tracer:
        """An application tracer on the same provider (for "foreign" spans)."""
        return self.provider.get_tracer("app")

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def by_name(self) -> dict[str, ReadableSpan]:
        return {s.name: s for s in self.spans()}


def make_traced(**options: object) -> Generator[Traced, None, None]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    handler = OpenTelemetrySpanHandler(tracer_provider=provider, **options)
    dispatcher = get_dispatcher(f"tests.otel.d{next(_names)}")
    dispatcher.add_span_handler(handler)
    dispatcher.add_event_handler(handler)
    try:
        yield Traced(dispatcher, handler, provider, exporter)
    finally:
        dispatcher.remove_span_handler(handler)
        dispatcher.remove_event_handler(handler)
        handler.close()
        provider.shutdown()


@pytest.fixture
def traced() -> Iterator[Traced]:
    yield from make_traced()


@pytest.fixture
def traced_oi() -> Iterator[Traced]:
    yield from make_traced(openinference=True)


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as rx:
        yield rx


class SilentCollector:
    """A TCP server on loopback that accepts connections and never answers (until
    :meth:`answer`): an exporter talking to it hangs instead of being refused."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)  # so that the accepting thread sees close()
        self._closed = threading.Event()
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        #: Set once a connection is held: an export is in flight, waiting for an answer.
        self.connected = threading.Event()
        self._accepting = threading.Thread(target=self._accept, name="silent-collector")
        self._accepting.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            with self._lock:
                if self._closed.is_set():
                    conn.close()
                    return
                self._held.append(conn)
            self.connected.set()

    def answer(self) -> None:
        """Answer every request held so far with 200 OK, late."""
        with self._lock:
            held = list(self._held)
        for conn in held:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    def close(self) -> None:
        """Stop listening and drop every connection: a hung export then fails."""
        with self._lock:
            self._closed.set()
            self._listener.close()  # a retry is refused, not held again
            for conn in self._held:
                conn.close()
        self._accepting.join()


@pytest.fixture
def silent_collector() -> Iterator[SilentCollector]:
    collector = SilentCollector()
    try:
        yield collector
    finally:
        collector.close()


@pytest.fixture(autouse=True)
def _otel_context_left_clean() -> Iterator[None]:
    """No test leaves an OpenTelemetry span current, or a bridge registered."""
    yield
    assert not trace_api.get_current_span().get_span_context().is_valid
    assert BRIDGE.tables() == [], "a handler was not closed"
    # Between tests no span is current anywhere, so the idle bridge can go: the rest of
    # the suite then runs without it (the next handler registers it again).
    unregister_bridge(BRIDGE)


def hex_span(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.span_id, "016x")


def hex_trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.trace_id, "032x")


def hex_parent(span: ReadableSpan) -> str | None:
    return None if span.parent is None else format(span.parent.span_id, "016x")


def short(name: str) -> str:
    """A span name without its ``test_x.<locals>.`` prefix."""
    return name.rsplit("<locals>.", 1)[-1]
