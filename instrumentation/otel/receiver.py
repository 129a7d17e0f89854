"""A small OTLP/HTTP trace receiver on loopback, for tests, docs and notebooks.

It accepts ``POST /v1/traces`` (with a query string or not) carrying a protobuf
``ExportTraceServiceRequest`` (gzip or not), decodes it with ``opentelemetry-proto``
(a dependency of the OTLP/HTTP exporter) and keeps every span as a
:class:`ReceivedSpan`. It is a real server, so a test through it exercises the real
exporter, batching and wire format. It listens on loopback only and is not meant as
a collector.

An IPv6 loopback host (``"::1"``) is served over IPv6, and its :attr:`endpoint`
brackets the address (``http://[::1]:4318``), as URLs require.
"""

from __future__ import annotations

import gzip
import ipaddress
import socket
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

TRACES_PATH = "/v1/traces"
_LOOPBACK = ("127.", "localhost", "::1")


def _is_ipv6(host: str) -> bool:
    """Whether ``host`` is an IPv6 address literal (``"::1"``), not a name or IPv4."""
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


class _IPv6HTTPServer(ThreadingHTTPServer):
    """The server for an IPv6 host: ``ThreadingHTTPServer`` binds IPv4 sockets only."""

    address_family = socket.AF_INET6


def any_value(value: Any) -> Any:
    """A Python value from an OTLP ``AnyValue``."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return tuple(any_value(v) for v in value.array_value.values)
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


def key_values(items: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in items}


@dataclass
class ReceivedEvent:
    name: str
    time_unix_nano: int
    attributes: dict[str, Any]


@dataclass
class ReceivedSpan:
    """One span as it arrived: ids in lowercase hex, ``parent_span_id`` None for a root."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str | None
    start_time_unix_nano: int
    end_time_unix_nano: int
    attributes: dict[str, Any]
    events: list[ReceivedEvent]
    status_code: int
    status_message: str
    kind: int
    scope: str
    resource: dict[str, Any] = field(default_factory=dict)

    @property
    def is_error(self) -> bool:
        return self.status_code == 2  # STATUS_CODE_ERROR


def decode(body: bytes) -> list[ReceivedSpan]:
    """Every span in one serialized ``ExportTraceServiceRequest``."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        resource = key_values(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        name=s.name,
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex() or None,
                        start_time_unix_nano=s.start_time_unix_nano,
                        end_time_unix_nano=s.end_time_unix_nano,
                        attributes=key_values(s.attributes),
                        events=[
                            ReceivedEvent(e.name, e.time_unix_nano, key_values(e.attributes))
                            for e in s.events
                        ],
                        status_code=s.status.code,
                        status_message=s.status.message,
                        kind=s.kind,
                        scope=scope_spans.scope.name,
                        resource=resource,
                    )
                )
    return spans


class OTLPReceiver:
    """``with OTLPReceiver() as rx: ... rx.endpoint ... rx.spans``.

    ``endpoint`` is the base URL to give an exporter (``/v1/traces`` is appended by
    OTLP/HTTP exporters). ``status`` is the HTTP status it answers with (set it to 503
    to see an exporter retry or fail). Thread-safe.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if not host.startswith(_LOOPBACK):
            raise ValueError(f"the test receiver listens on loopback only; got host {host!r}")
        self._host = host
        self._port = port
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.requests = 0
        self.request_headers: list[dict[str, str]] = []
        #: The path (with its query string) of each accepted request.
        self.request_paths: list[str] = []
        self.status = 200

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("the receiver is not started: use it in a with block or start()")
        host, port = self._server.server_address[:2]
        host = str(host)
        # An IPv6 address in a URL is bracketed: http://[::1]:4318.
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def clear(self) -> None:
        """Forget what arrived: the spans and each request's headers and path (a
        receiver cleared between the rounds of a long test kept every request's)."""
        with self._lock:
            self._spans.clear()
            self.request_headers.clear()
            self.request_paths.clear()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedSpan]:
        """Wait until at least ``count`` spans arrived (or ``timeout``); return all of them."""
        with self._lock:
            self._lock.wait_for(lambda: len(self._spans) >= count, timeout)
            return list(self._spans)

    def _received(self, spans: list[ReceivedSpan], headers: dict[str, str], path: str) -> None:
        with self._lock:
            self.requests += 1
            self.request_headers.append(headers)
            self.request_paths.append(path)
            self._spans.extend(spans)
            self._lock.notify_all()

    def start(self) -> OTLPReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                # A query string is allowed (some backends take a key there).
                if urllib.parse.urlsplit(self.path).path.rstrip("/") != TRACES_PATH:
                    self.send_error(404, f"only POST {TRACES_PATH} is served")
                    return
                if receiver.status != 200:
                    self.send_error(receiver.status)
                    return
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                try:
                    spans = decode(body)
                except Exception as exc:
                    self.send_error(400, f"not an ExportTraceServiceRequest: {exc}")
                    return
                receiver._received(
                    spans, {k.lower(): v for k, v in self.headers.items()}, self.path
                )
                payload = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: tests read .spans, not the access log

        server_class = _IPv6HTTPServer if _is_ipv6(self._host) else ThreadingHTTPServer
        self._server = server_class((self._host, self._port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="otlp-receiver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> OTLPReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["OTLPReceiver", "ReceivedEvent", "ReceivedSpan"]
