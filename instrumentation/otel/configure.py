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
_SPANS_EXPORTED_LATE = telemetry.counter("otel.spans_exported_late")

#: When shutdown() has a collector still not answering this close to its deadline, it
#: stops the exporter (cutting short a retry) and waits out the rest of its time.
_CUT_SHORT_BEFORE_S = 0.1


class SuppressedExporter(SpanExporter):
    """Runs another exporter under ``suppress_instrumentation()`` and keeps the accounts.

    Every span the batch processor accepts is counted as handed over
    (:meth:`span_handed`), and every batch's outcome as exported or not exported.
    :meth:`settle` closes the accounts when shutting down: whatever was handed over
    and is neither exported nor counted yet (a batch still in flight, the
    processor's queue, spans the processor dropped) is counted as not exported at
    that moment. An outcome arriving after that changes nothing already counted; a
    batch that still reaches the collector is counted in ``otel.spans_exported_late``.

    It also bounds shutting down: after :meth:`give_up_at`'s deadline every batch
    still waiting fails at once, instead of each waiting out the exporter's retries
    against a collector that does not answer.
    """

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        #: Spans the batch processor accepted for export (see :meth:`span_handed`).
        self.handed = 0
        #: Spans the collector confirmed before the accounts were settled.
        self.exported = 0
        #: Spans whose export failed, was given up, or was not confirmed at settling.
        self.not_exported = 0
        #: Spans already counted as not exported that reached the collector afterwards.
        self.exported_late = 0
        self._give_up_at: float | None = None
        self._settled = False
        self._warned = False
        self._warned_after_settling = False
        self._inner_shut = False
        self._lock = threading.Lock()

    def give_up_at(self, deadline: float) -> None:
        """From ``deadline`` (``time.monotonic()``) on, fail batches without sending."""
        self._give_up_at = deadline

    def span_handed(self) -> bool:
        """Count one span handed to the batch processor.

        False once the accounts are settled: the span is then counted as not
        exported at once, and the caller must not queue it.
        """
        with self._lock:
            self.handed += 1
            if not self._settled:
                return True
            self.not_exported += 1
            _SPANS_NOT_EXPORTED.inc()
            warn = not self._warned_after_settling
            self._warned_after_settling = True
        if warn:
            logger.warning(
                "a span ended after the OTLP exporter was shut down is not exported; "
                "such spans are counted in telemetry counter otel.spans_not_exported"
            )
        return False

    def settle(self) -> int:
        """Close the accounts; returns how many spans this counted as not exported.

        Every span handed over and neither confirmed exported nor counted yet is
        counted now in ``otel.spans_not_exported``. Idempotent.
        """
        with self._lock:
            if self._settled:
                return 0
            self._settled = True
            lost = max(self.handed - self.exported - self.not_exported, 0)
            self.not_exported += lost
            _SPANS_NOT_EXPORTED.add(lost)
        return lost

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._give_up_at is not None and time.monotonic() >= self._give_up_at:
            self._record(len(spans), exported=False)
            return SpanExportResult.FAILURE
        with suppress_instrumentation():
            try:
                result = self.inner.export(spans)
            except Exception:
                logger.exception("OTLP export of %d spans failed", len(spans))
                result = SpanExportResult.FAILURE
        self._record(len(spans), exported=result is SpanExportResult.SUCCESS)
        return result

    def _record(self, n: int, *, exported: bool) -> None:
        # The counters move under the lock too: once settle() has returned, they
        # already hold every outcome recorded before it.
        with self._lock:
            late = self._settled
            if late:  # these spans were counted as not exported when settling
                if exported:
                    self.exported_late += n
                    _SPANS_EXPORTED_LATE.add(n)
            elif exported:
                self.exported += n
                _SPANS_EXPORTED.add(n)
            else:
                self.not_exported += n
                _SPANS_NOT_EXPORTED.add(n)
                _EXPORT_FAILURES.inc()
            first = not late and not exported and not self._warned
            if first:
                self._warned = True
        if late:
            if exported:
                logger.info(
                    "%d spans reached the collector after shutdown had counted them as "
                    "not exported; counted in telemetry counter otel.spans_exported_late",
                    n,
                )
            else:
                logger.debug("an abandoned export of %d spans failed (already counted)", n)
            return
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


class AccountedBatchSpanProcessor(BatchSpanProcessor):
    """A ``BatchSpanProcessor`` that counts every span it is handed in its exporter.

    Spans ended after the accounts are settled are counted as not exported and
    dropped here (the SDK would drop them too, with no count).
    """

    def __init__(self, exporter: SuppressedExporter) -> None:
        super().__init__(exporter)
        self.accounts = exporter

    def on_end(self, span: ReadableSpan) -> None:
        if not (span.context and span.context.trace_flags.sampled):
            return  # the SDK's batch processor ignores these too
        if self.accounts.span_handed():
            super().on_end(span)


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

        Returns within about ``timeout_millis``. Spans not confirmed exported by then
        (in flight, or still queued) are given up: before returning they are counted
        in ``otel.spans_not_exported`` and a warning is logged. True when every span
        handed to the SDK was exported. Idempotent; a call made while another is
        shutting down waits for that one (at most its own ``timeout_millis``) and gives
        its answer, or False if it is not done. Also run at interpreter exit.
        """
        with self._lock:
            first = not self._closed
            self._closed = True
            if first:
                self._shutting_down_in = threading.get_ident()
        if not first:  # another call is shutting down, or did: its answer is ours
            if self._shutting_down_in == threading.get_ident():
                return self._shut_down.is_set() and self._clean_shutdown  # re-entered
            self._shut_down.wait(max(timeout_millis, 0) / 1000)
            return self._shut_down.is_set() and self._clean_shutdown
        try:
            return self._shutdown(timeout_millis)
        finally:
            self._shut_down.set()  # also when interrupted: later calls must not wait

    def _shutdown(self, timeout_millis: int) -> bool:
        budget = max(timeout_millis, 0) / 1000
        deadline = time.monotonic() + budget
        # No batch starts this close to the deadline: it could not finish in time.
        cut_short_at = deadline - min(_CUT_SHORT_BEFORE_S, budget / 10)
        atexit.unregister(self._at_exit)
        failed_before = self.exporter.not_exported
        self.dispatcher.remove_span_handler(self.handler)
        self.dispatcher.remove_event_handler(self.handler)
        self.handler.close()
        self.exporter.give_up_at(cut_short_at)
        worker, _ = _in_thread(self.tracer_provider.shutdown, "instrumentation-otel-shutdown")
        worker.join(max(cut_short_at - time.monotonic(), 0.0))
        if worker.is_alive():
            # An export is still retrying, or waiting on a collector that does not
            # answer: stopping the exporter cuts a retry short (in a thread: stopping
            # may block too), and the rest of the budget lets the worker finish.
            _in_thread(self.exporter.shutdown, "instrumentation-otel-stop")
            worker.join(max(deadline - time.monotonic(), 0.0))
        # What is not confirmed now is counted as not exported, before returning: the
        # process may exit next. A late outcome of an abandoned export counts nothing.
        given_up = self.exporter.settle()
        lost = self.exporter.not_exported - failed_before
        self._clean_shutdown = lost == 0
        if given_up:
            logger.warning(
                "OTLP shutdown gave up after %d ms: %d spans not exported (%d not "
                "confirmed in time, %d failed); the count is in telemetry counter "
                "otel.spans_not_exported",
                timeout_millis,
                lost,
                given_up,
                lost - given_up,
            )
        elif lost:
            logger.warning(
                "OTLP shutdown: %d spans were not exported; the count is in telemetry "
                "counter otel.spans_not_exported",
                lost,
            )
        elif worker.is_alive():
            logger.info("every span was exported, but the OTLP exporter is still stopping")
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
    provider.add_span_processor(AccountedBatchSpanProcessor(wrapped))
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
    "AccountedBatchSpanProcessor",
    "OTLPHandle",
    "SuppressedExporter",
    "configure_otlp",
    "make_exporter",
    "resolve_protocol",
    "traces_url",
]
