"""OTLPReceiver on the IPv6 loopback: it binds there and gives a valid URL."""

from __future__ import annotations

import socket
import urllib.parse

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from instrumentation.otel.receiver import OTLPReceiver


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")


@needs_ipv6
def test_ipv6_loopback_receiver_starts_and_receives_spans() -> None:
    with OTLPReceiver(host="::1") as rx:
        url = urllib.parse.urlsplit(rx.endpoint)
        assert rx.endpoint.startswith("http://[::1]:")
        assert url.hostname == "::1" and url.port is not None and url.port > 0
        provider = TracerProvider()
        provider.add_span_processor(
            SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{rx.endpoint}/v1/traces"))
        )
        try:
            with provider.get_tracer("tests.otel.ipv6").start_as_current_span("over-ipv6"):
                pass
        finally:
            provider.shutdown()
        (span,) = rx.wait_for(1)
        assert span.name == "over-ipv6"
        assert span.scope == "tests.otel.ipv6"


def test_ipv4_endpoint_is_unchanged() -> None:
    with OTLPReceiver() as rx:
        host = urllib.parse.urlsplit(rx.endpoint).hostname
        assert host == "127.0.0.1"
        assert "[" not in rx.endpoint


def test_clear_forgets_each_requests_headers_and_path_too() -> None:
    """A receiver cleared between rounds kept every request's headers and path."""
    with OTLPReceiver() as rx:
        provider = TracerProvider()
        exporter = OTLPSpanExporter(endpoint=f"{rx.endpoint}/v1/traces")
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        try:
            tracer = provider.get_tracer("tests.otel.clear")
            with tracer.start_as_current_span("first"):
                pass
            rx.wait_for(1)
            assert len(rx.request_headers) == len(rx.request_paths) == 1
            rx.clear()
            assert rx.spans == [] and rx.request_headers == [] and rx.request_paths == []
            with tracer.start_as_current_span("second"):
                pass
            (span,) = rx.wait_for(1)
        finally:
            provider.shutdown()
        assert span.name == "second" and rx.request_paths == ["/v1/traces"]
