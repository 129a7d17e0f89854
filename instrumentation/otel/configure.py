"""``configure_otlp``: one call from nothing to traces in an OTLP backend.

It builds a ``TracerProvider`` (resource with ``service.name``), a
``BatchSpanProcessor`` and the OTLP exporter for the chosen protocol, attaches an
:class:`OpenTelemetrySpanHandler` to a dispatcher (the root by default) as span and
event handler, and returns an :class:`OTLPHandle` whose ``shutdown()`` flushes
everything and detaches.

Settings follow OpenTelemetry's own rules: what is passed wins; what is not passed
comes from the standard environment variables (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``OTEL_EXPORTER_OTLP_HEADERS``,
``OTEL_EXPORTER_OTLP_PROTOCOL``, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_BSP_*``), read by the SDK and exporters themselves.

The exporter runs under :func:`suppress_instrumentation`, so an instrumented HTTP
client used by the exporter never produces spans about exporting spans.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry import trace as trace_api
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from instrumentation import telemetry
from instrumentation.context import suppress_instrumentation
from instrumentation.dispatcher import Dispatcher, root_dispatcher
from instrumentation.otel.handler import OpenTelemetrySpanHandler

logger = logging.getLogger("instrumentation.otel")

PROTOCOLS = ("http/protobuf", "grpc")
TRACES_PATH = "/v1/traces"

_SPANS_EXPORTED = telemetry.counter("otel.spans_exported")
_EXPORT_FAILURES = telemetry.counter("otel.export_failures")
_SPANS_NOT_EXPORTED = telemetry.counter("otel.spans_not_exported")


class SuppressedExporter(SpanExporter):
    """Runs another exporter under ``suppress_instrumentation()`` and counts the outcome.

    It also bounds shutting down: after :meth:`give_up_at`'s deadline every batch
    still waiting fails at once and is counted, instead of each waiting out the
    exporter's retries against a collector that does not answer.
    """

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        #: Spans whose export failed or was given up (by this exporter).
        self.not_exported = 0
        self._give_up_at: float | None = None
        self._inner_shut = False
        self._lock = threading.Lock()

    def give_up_at(self, deadline: float) -> None:
        """From ``deadline`` (``time.monotonic()``) on, fail batches without sending."""
        self._give_up_at = deadline

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._give_up_at is not None and time.monotonic() >= self._give_up_at:
            self._not_exported(len(spans))
            return SpanExportResult.FAILURE
        with suppress_instrumentation():
            try:
                result = self.inner.export(spans)
            except Exception:
                logger.exception("OTLP export of %d spans failed", len(spans))
                result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            _SPANS_EXPORTED.add(len(spans))
        else:
            _EXPORT_FAILURES.inc()
            self._not_exported(len(spans))
        return result

    def _not_exported(self, n: int) -> None:
        with self._lock:
            first = self.not_exported == 0
            self.not_exported += n
        _SPANS_NOT_EXPORTED.add(n)
        if first:
            logger.warning(
                "%d spans were not exported (the collector failed or did not answer); "
                "the count is in telemetry counter otel.spans_not_exported",
                n,
            )

    def shutdown(self) -> None:
        with self._lock:  # also called to cut short an export that is retrying
            if self._inner_shut:
                return
            self._inner_shut = True
        with suppress_instrumentation():
            self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        with suppress_instrumentation():
            return bool(self.inner.force_flush(timeout_millis))


def _in_thread(target: Callable[[], Any], name: str) -> tuple[threading.Thread, list[Any]]:
    """Start ``target`` in a daemon thread; its result lands in the list.

    The SDK's flush and shutdown wait for the exporter however long it retries, so
    the caller waits on the thread, with a bound.
    """
    outcome: list[Any] = []
    worker = threading.Thread(target=lambda: outcome.append(target()), name=name, daemon=True)
    worker.start()
    return worker, outcome


def resolve_protocol(protocol: str | None) -> str:
    """The protocol given, else ``OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL``, else HTTP."""
    chosen = (
        protocol
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    if chosen not in PROTOCOLS:
        raise ValueError(
            f"protocol must be 'http/protobuf' or 'grpc' (the OTLP exporters Python has); "
            f"got {chosen!r}"
        )
    return chosen


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL for a collector's base URL (``/v1/traces`` appended once)."""
    base = endpoint.rstrip("/")
    return base if base.endswith(TRACES_PATH) else base + TRACES_PATH


def _check_endpoint(endpoint: object, protocol: str) -> str | None:
    if endpoint is None:
        return None
    if not isinstance(endpoint, str) or not endpoint.strip():
        raise TypeError(
            "endpoint is the collector's base URL as a str, e.g. 'http://localhost:4318'; "
            f"got {endpoint!r}"
        )
    endpoint = endpoint.strip()
    if protocol == "http/protobuf" and not endpoint.startswith(("http://", "https://")):
        raise ValueError(
            f"an OTLP/HTTP endpoint starts with http:// or https:// "
            f"(e.g. 'http://localhost:4318'); got {endpoint!r}"
        )
    return endpoint


def _check_headers(headers: object) -> dict[str, str] | None:
    if headers is None:
        return None
    if not isinstance(headers, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise TypeError(
            "headers is a mapping of str to str, e.g. {'authorization': 'Bearer ...'}; "
            f"got {headers!r}"
        )
    return dict(headers)


def make_exporter(
    endpoint: str | None,
    protocol: str,
    headers: dict[str, str] | None,
    timeout: float | None,
) -> SpanExporter:
    """The SDK's OTLP span exporter for ``protocol``; unset values come from ``OTEL_*``."""
    kwargs: dict[str, Any] = {}
    if headers is not None:
        kwargs["headers"] = headers
    if timeout is not None:
        kwargs["timeout"] = timeout
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        if endpoint is not None:
            kwargs["endpoint"] = endpoint
            if endpoint.startswith("http://"):
                kwargs["insecure"] = True
        exporter: SpanExporter = GrpcExporter(**kwargs)
        return exporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    if endpoint is not None:
        kwargs["endpoint"] = traces_url(endpoint)
    exporter = HttpExporter(**kwargs)
    return exporter


class OTLPHandle:
    """What :func:`configure_otlp` set up; ``shutdown()`` flushes and detaches.

    Usable as a context manager. ``shutdown()`` is idempotent and thread-safe.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider,
        handler: OpenTelemetrySpanHandler,
        exporter: SuppressedExporter,
        dispatcher: Dispatcher,
        protocol: str,
    ) -> None:
        self.tracer_provider = tracer_provider
        self.handler = handler
        self.exporter = exporter
        self.dispatcher = dispatcher
        self.protocol = protocol
        self._lock = threading.Lock()
        self._closed = False
        self._clean_shutdown = False
        self._shut_down = threading.Event()
        self._shutting_down_in: int | None = None
        self._flushing: threading.Thread | None = None
        #: How long interpreter exit waits for spans to be sent, if shutdown() was not called.
        self.exit_timeout_millis = 5_000
        atexit.register(self._at_exit)

    @property
    def closed(self) -> bool:
        return self._closed

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Export every ended span now; True when all were exported in time.

        False when ``timeout_millis`` passes first (the export goes on in the
        background) or when any export failed meanwhile.
        """
        deadline = time.monotonic() + max(timeout_millis, 0) / 1000
        failed_before = self.exporter.not_exported
        earlier = self._flushing
        if earlier is not None and earlier.is_alive():
            # An earlier flush that timed out still waits on the exporter. A new one
            # would only queue behind it, so wait for it instead of adding a thread.
            earlier.join(max(deadline - time.monotonic(), 0.0))
            if earlier.is_alive():
                return False
        left_millis = max(int((deadline - time.monotonic()) * 1000), 0)
        worker, outcome = _in_thread(
            lambda: self.tracer_provider.force_flush(left_millis), "instrumentation-otel-flush"
        )
        self._flushing = worker
        worker.join(max(deadline - time.monotonic(), 0.0))
        return bool(outcome) and bool(outcome[0]) and self.exporter.not_exported == failed_before

    def shutdown(self, timeout_millis: int = 10_000) -> bool:
        """Detach the handler, end spans still open, flush everything, stop the exporter.

        Waits at most about ``timeout_millis``: spans not sent by then are given up and
        counted (``otel.spans_not_exported``). True when every span was exported.
        Idempotent; also run at interpreter exit if not called.
        """
        with self._lock:
            first = not self._closed
            self._closed = True
            if first:
                self._shutting_down_in = threading.get_ident()
        if not first:  # another call is shutting down, or did: its answer is ours
            if self._shutting_down_in == threading.get_ident():
                return self._shut_down.is_set() and self._clean_shutdown  # re-entered
            self._shut_down.wait(max(timeout_millis, 0) / 1000 + 2.0)
            return self._shut_down.is_set() and self._clean_shutdown
        try:
            return self._shutdown(timeout_millis)
        finally:
            self._shut_down.set()  # also when interrupted: later calls must not wait

    def _shutdown(self, timeout_millis: int) -> bool:
        atexit.unregister(self._at_exit)
        failed_before = self.exporter.not_exported
        self.dispatcher.remove_span_handler(self.handler)
        self.dispatcher.remove_event_handler(self.handler)
        self.handler.close()
        timeout_s = timeout_millis / 1000
        self.exporter.give_up_at(time.monotonic() + timeout_s)
        worker, _ = _in_thread(self.tracer_provider.shutdown, "instrumentation-otel-shutdown")
        worker.join(max(timeout_s, 0.0))
        if worker.is_alive():
            # An export is still retrying against a collector that does not answer:
            # stopping the exporter cuts its wait short; what is left is counted.
            self.exporter.shutdown()
            worker.join(1.0)
        self._clean_shutdown = not worker.is_alive() and self.exporter.not_exported == failed_before
        return self._clean_shutdown

    def _at_exit(self) -> None:
        self.shutdown(timeout_millis=self.exit_timeout_millis)

    def __enter__(self) -> OTLPHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<OTLPHandle {self.protocol} dispatcher={self.dispatcher.name!r} {state}>"


def configure_otlp(
    endpoint: str | None = None,
    *,
    protocol: str | None = None,
    headers: Mapping[str, str] | None = None,
    service_name: str | None = None,
    resource_attributes: Mapping[str, Any] | None = None,
    dispatcher: Dispatcher | None = None,
    openinference: bool = False,
    capture_content: bool = True,
    timeout: float | None = None,
    set_global: bool = False,
    exporter: SpanExporter | None = None,
) -> OTLPHandle:
    """Send every span and event to an OTLP collector; returns the handle to shut it down.

    - ``endpoint``: the collector's base URL, as in ``OTEL_EXPORTER_OTLP_ENDPOINT``
      (``http://localhost:4318`` for HTTP, ``http://localhost:4317`` for gRPC);
      ``/v1/traces`` is appended for HTTP. ``None``: the ``OTEL_*`` variables, else
      the OTLP default.
    - ``protocol``: ``"http/protobuf"`` (default) or ``"grpc"``.
    - ``headers``: e.g. an ``authorization`` header; ``None``: ``OTEL_EXPORTER_OTLP_HEADERS``.
    - ``service_name``: the ``service.name`` resource attribute (else ``OTEL_SERVICE_NAME``).
    - ``dispatcher``: where to attach (the root, seeing everything, by default).
    - ``openinference``: add OpenInference attributes (for Phoenix).
    - ``set_global``: also make the provider OpenTelemetry's global one, so the
      application's own OpenTelemetry spans go to the same place.
    - ``exporter``: use this exporter instead of OTLP (tests, or a vendor exporter).
    """
    chosen = resolve_protocol(protocol)
    checked_endpoint = _check_endpoint(endpoint, chosen)
    checked_headers = _check_headers(headers)
    if service_name is not None and (not isinstance(service_name, str) or not service_name):
        raise TypeError(f"service_name is a non-empty str; got {service_name!r}")
    if resource_attributes is not None and not isinstance(resource_attributes, Mapping):
        raise TypeError(
            f"resource_attributes is a mapping; got {type(resource_attributes).__name__}"
        )
    if dispatcher is not None and not isinstance(dispatcher, Dispatcher):
        raise TypeError(
            f"dispatcher is a Dispatcher (get_dispatcher(name)); got {type(dispatcher).__name__}"
        )
    target = root_dispatcher if dispatcher is None else dispatcher

    attributes: dict[str, Any] = dict(resource_attributes or {})
    if service_name is not None:
        attributes[SERVICE_NAME] = service_name
    # Our handle shuts the provider down at exit, with a bound on the wait.
    provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=False)
    inner = (
        exporter
        if exporter is not None
        else make_exporter(checked_endpoint, chosen, checked_headers, timeout)
    )
    wrapped = SuppressedExporter(inner)
    provider.add_span_processor(BatchSpanProcessor(wrapped))
    if set_global:
        trace_api.set_tracer_provider(provider)
    handler = OpenTelemetrySpanHandler(
        tracer_provider=provider, openinference=openinference, capture_content=capture_content
    )
    target.add_span_handler(handler)
    target.add_event_handler(handler)
    return OTLPHandle(provider, handler, wrapped, target, chosen)


__all__ = [
    "PROTOCOLS",
    "OTLPHandle",
    "SuppressedExporter",
    "configure_otlp",
    "make_exporter",
    "resolve_protocol",
    "traces_url",
]
