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
import collections
import logging
import math
import os
import socket
import sys
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Mapping, Sequence, Sized
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, fields
from typing import Any, Literal, Protocol

from opentelemetry import trace as trace_api
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from instrumentation import telemetry
from instrumentation._pool import ThreadPool
from instrumentation._spans import prepare_exit_flush
from instrumentation.context import suppress_instrumentation
from instrumentation.dispatcher import Dispatcher, root_dispatcher
from instrumentation.otel.handler import OpenTelemetrySpanHandler

logger = logging.getLogger("instrumentation.otel")

PROTOCOLS = ("http/protobuf", "grpc")
TRACES_PATH = "/v1/traces"

_SPANS_EXPORTED = telemetry.counter("otel.spans_exported")
_EXPORT_FAILURES = telemetry.counter("otel.export_failures")
_SPANS_NOT_EXPORTED = telemetry.counter("otel.spans_not_exported")
_SPANS_DROPPED = telemetry.counter("otel.spans_dropped")
_SPANS_EXPORTED_LATE = telemetry.counter("otel.spans_exported_late")
#: The provider's or exporter's ``shutdown()`` raised (a vendor exporter failing to close).
_SHUTDOWN_ERRORS = telemetry.counter("otel.shutdown_errors")

#: When shutdown() has a collector still not answering this close to its deadline, it
#: stops the exporter (cutting short a retry) and waits out the rest of its time.
_CUT_SHORT_BEFORE_S = 0.1


#: What runs in the child after each ``fork()``: bound methods, held weakly, behind one
#: hook (a hook registered with ``os.register_at_fork`` can never be removed).
_fork_hooks: list[weakref.WeakMethod[Callable[[], None]]] = []


def _after_fork_in_child(method: Callable[[], None]) -> None:
    """Run ``method`` (a bound method, held weakly) in the child after each ``fork()``."""
    _fork_hooks[:] = [weak for weak in _fork_hooks if weak() is not None]
    _fork_hooks.append(weakref.WeakMethod(method))


def _run_fork_hooks() -> None:
    for weak in list(_fork_hooks):
        method = weak()
        if method is None:
            continue
        try:
            method()
        except Exception:  # pragma: no cover - one object's reset must not stop the others
            logger.exception("instrumentation.otel could not reset after fork")


if hasattr(os, "register_at_fork"):  # pragma: no branch - absent on Windows only
    os.register_at_fork(after_in_child=_run_fork_hooks)


@dataclass(frozen=True)
class SpanAccounts:
    """The exporter's accounts at one moment (:meth:`SuppressedExporter.accounts`)."""

    #: Spans handed to the batch processor (each sampled span that ended).
    handed: int
    #: Spans the collector confirmed before the accounts were settled.
    exported: int
    #: Dropped on arrival because the batch processor's queue was full.
    dropped: int
    #: In a batch whose export failed (the collector refused it, or the exporter raised).
    failed: int
    #: In a batch that shutdown's deadline failed without sending it.
    cut_off: int
    #: Neither confirmed nor failed when the accounts were settled (in flight, queued).
    unconfirmed: int
    #: Ended after shutdown began: never queued.
    refused: int
    #: Counted as not exported, then confirmed by the collector after all.
    exported_late: int

    @property
    def not_exported(self) -> int:
        """Spans counted as not exported, for any of the reasons above."""
        return _not_exported(self)


def _not_exported(accounts: SpanAccounts | SuppressedExporter) -> int:
    return (
        accounts.dropped
        + accounts.failed
        + accounts.cut_off
        + accounts.unconfirmed
        + accounts.refused
    )


#: Set to pick the HTTP exporter's session from an entry point: configure_otlp then
#: leaves the session to the SDK (and refused connections to its retries).
_CREDENTIAL_PROVIDER_VARIABLES = (
    "OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER",
    "OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER",
)


class _CollectorRefused(Exception):
    """Raised by the HTTP exporter's session, once shutting down, for a refused connection.

    Not a connection error to the exporter, so it fails the batch at once instead of
    retrying it after a backoff: nothing listens there.
    """


def _sent_to(destination: str | None) -> str:
    """The end of a warning about spans not exported: where they went, if known."""
    return "" if destination is None else f"; sent to {destination}"


def _refused_by(error: BaseException) -> str | None:
    """Who refused the connection ``error`` (requests' or urllib3's, wrapping the
    socket's) failed on: ``"the collector"``, ``"the proxy"`` (``HTTP(S)_PROXY``: nothing
    listens at the proxy's address), or None when it is no refused connection."""
    seen: set[int] = set()
    pending: list[object] = [error]
    refused = through_proxy = False
    while pending:
        current = pending.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ConnectionRefusedError):
            refused = True
            continue
        # requests' and urllib3's: connecting to the proxy failed.
        through_proxy = through_proxy or type(current).__name__ == "ProxyError"
        pending.extend((current.__cause__, current.__context__, getattr(current, "reason", None)))
        pending.extend(current.args)
    if not refused:
        return None
    return "the proxy" if through_proxy else "the collector"


class _Refusals:
    """Whether the collector of the OTLP exporter :func:`configure_otlp` builds refuses
    connections: nothing listens there.

    While running, nothing changes: a refused connection is retried after the
    exporter's backoff, as the SDK does. Once :attr:`final` (shutting down), a refused
    connection fails its batch at once: one attempt, no backoff, for a collector known
    not to be there.

    The HTTP exporter sends with :meth:`session`, which sees each refusal (and raises
    :class:`_CollectorRefused` once final). The gRPC exporter tells nobody why an
    export is retrying: for it, ``probe`` tries a connection to the collector's address
    when asked (:meth:`refused`), and :meth:`checks_first` says a batch is not sent
    while shutting down if that connection is refused.
    """

    def __init__(self, probe: Callable[[], bool] | None = None) -> None:
        #: The collector refused the last connection, and no request is under way.
        self.last_refused = False
        #: Shutting down: a refused connection is not retried.
        self.final = False
        self._probe = probe

    @property
    def checks_first(self) -> bool:
        """Shutting down, a batch is sent only if :meth:`refused` says no (gRPC)."""
        return self.final and self._probe is not None

    def refused(self) -> bool:
        """The collector refuses connections: it refused the last one (HTTP), or one
        tried now (gRPC)."""
        return self._probe() if self._probe is not None else self.last_refused

    def session(self) -> Any:
        """A ``requests.Session`` that tells refusals apart, for the HTTP exporter."""
        import requests

        session = requests.Session()
        request = session.request

        def watched_request(*args: Any, **kwargs: Any) -> Any:
            self.last_refused = False
            try:
                return request(*args, **kwargs)
            except Exception as exc:
                refused_by = _refused_by(exc)
                if refused_by is None:
                    raise
                self.last_refused = True
                if self.final:
                    raise _CollectorRefused(
                        f"{refused_by} refused the connection (nothing listens there): "
                        "not retried while shutting down"
                    ) from exc
                raise

        session.request = watched_request  # type: ignore[method-assign]  # session.post too
        return session


#: How long a connection to a gRPC collector is given to be refused or made: one that
#: does not answer (a black hole) is not known to be absent.
_PROBE_TIMEOUT_S = 0.25

#: gRPC sends through the proxy these name (the probe would try the wrong address).
_PROXY_VARIABLES = ("grpc_proxy", "https_proxy", "http_proxy")


def _grpc_address(endpoint: str | None) -> tuple[str, int] | None:
    """The host and port the gRPC exporter connects to for ``endpoint`` (or the
    environment's, or its default), as the SDK reads them; None when a probe could not
    tell (a proxy, a unix socket, gRPC's own target names, no port)."""
    target = (
        endpoint
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        or "http://localhost:4317"
    )
    if target.lower().startswith(_GRPC_NAME_SCHEMES):
        return None
    netloc = urllib.parse.urlsplit(target).netloc if "://" in target else target
    try:
        parts = urllib.parse.urlsplit("//" + netloc)
        port = parts.port
    except ValueError:
        return None
    if parts.hostname is None or port is None or _through_proxy(parts.hostname):
        return None
    return parts.hostname, port


def _through_proxy(host: str) -> bool:
    """Whether gRPC connects to ``host`` through a proxy (set, and ``no_grpc_proxy`` or
    ``no_proxy`` not naming the host): the probe would try the proxy's address."""
    if not any(_variable(name) for name in _PROXY_VARIABLES):
        return False
    host = host.lower()
    for name in ("no_grpc_proxy", "no_proxy"):
        for entry in _variable(name).lower().split(","):
            entry = entry.strip().lstrip(".")  # ".internal" and "internal" both match below
            if entry == "*" or (entry and (host == entry or host.endswith("." + entry))):
                return False
    return True


def _variable(name: str) -> str:
    """An environment variable by its lower-case name, or its upper-case one."""
    return os.environ.get(name) or os.environ.get(name.upper()) or ""


def _refusals_for(protocol: str, endpoint: str | None) -> _Refusals | None:
    """How the exporter configure_otlp builds tells a collector that is not there; None
    where it cannot (a session of the user's choosing, a gRPC target behind a proxy)."""
    if protocol == "grpc":
        address = _grpc_address(endpoint)
        return None if address is None else _Refusals(probe=lambda: _refused_now(*address))
    if any(os.environ.get(name) for name in _CREDENTIAL_PROVIDER_VARIABLES):
        return None
    return _Refusals()


def _refused_now(host: str, port: int) -> bool:
    """Whether a connection to ``host:port`` is refused now: nothing listens there. A
    connection made, or not answered in a moment, or a name not found, is not that."""
    try:
        with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


class SuppressedExporter(SpanExporter):
    """Runs another exporter under ``suppress_instrumentation()`` and keeps the accounts.

    Every span the :class:`AccountedBatchSpanProcessor` is handed is counted
    (``handed``), and every span's outcome as exported or not exported, with the
    reason (see :class:`SpanAccounts`): dropped because the queue was full (counted
    as it is dropped), in a batch that failed, cut off by shutdown's deadline, ended
    after shutdown began. :meth:`settle` closes the accounts when shutting down:
    whatever was handed over and is neither exported nor counted yet (a batch still in
    flight, the processor's queue) is counted as not exported at that moment. An
    outcome arriving after that changes nothing already counted; a batch that still
    reaches the collector is counted in ``otel.spans_exported_late``.

    It also bounds shutting down: after :meth:`give_up_at`'s deadline every batch
    still waiting fails at once, instead of each waiting out the exporter's retries
    against a collector that does not answer. With ``refusals`` (the OTLP/HTTP exporter
    configure_otlp builds), a collector that refuses the connection is known not to be
    there: from :meth:`give_up_at` on, each batch gets one attempt, without backoff.
    ``remake`` builds another such exporter: :meth:`stop_retrying_refused` swaps it in to
    cut short the backoff of an export already retrying a refusal, without failing the
    batches after it unsent.

    In a child made by ``fork()`` the accounts start from zero: the SDK empties the
    child's copy of the queue, and the parent's batches are the parent's.
    """

    def __init__(
        self,
        inner: SpanExporter,
        destination: str | None = None,
        refusals: _Refusals | None = None,
        remake: Callable[[], SpanExporter] | None = None,
    ) -> None:
        self.inner = inner
        #: Where ``inner`` sends (protocol and URL), named in the warnings; None when
        #: the exporter was given by hand.
        self.destination = destination
        self._refusals = refusals
        self._remake = remake
        self._give_up_at: float | None = None
        self._accepting = True
        self._settled = False
        self._inner_shut = False
        self._reset_accounts()
        _after_fork_in_child(self._reset_accounts)

    def _reset_accounts(self) -> None:
        """Zero the accounts and make a new lock (also in a forked child: the parent's
        lock may have been held by a thread the child does not have)."""
        # Reentrant: a signal handler (SIGTERM -> shutdown, or ending a span) may run in
        # a thread that holds it, in the middle of on_end.
        self._lock = threading.RLock()
        self.handed = 0
        self.exported = 0
        self.dropped = 0
        self.failed = 0
        self.cut_off = 0
        self.unconfirmed = 0
        self.refused = 0
        self.exported_late = 0
        #: Exports under way in ``inner`` (possibly waiting out its backoff).
        self._exporting = 0

    def accounts(self) -> SpanAccounts:
        """A consistent snapshot of the accounts."""
        with self._lock:
            return SpanAccounts(**{a.name: getattr(self, a.name) for a in fields(SpanAccounts)})

    @property
    def not_exported(self) -> int:
        """Spans counted as not exported (see :class:`SpanAccounts`)."""
        return _not_exported(self)

    def give_up_at(self, deadline: float) -> None:
        """From ``deadline`` (``time.monotonic()``) on, fail batches without sending.

        Called when shutting down: from now on a refused connection is not retried.
        """
        self._give_up_at = deadline
        if self._refusals is not None:
            self._refusals.final = True

    def retrying_refused(self) -> bool:
        """An export is under way, the collector refused its last connection, and no
        request is under way: the export waits out the exporter's backoff before trying
        a collector that is not there again."""
        with self._lock:
            exporting = self._exporting > 0
        return exporting and self._refusals is not None and self._refusals.refused()

    def stop_if_retrying_refused(self) -> None:
        """:meth:`stop_retrying_refused` if :meth:`retrying_refused`."""
        if self.retrying_refused():
            self.stop_retrying_refused()

    def stop_retrying_refused(self) -> None:
        """Cut short the backoff of an export retrying a refused connection (shutting
        down: see :meth:`retrying_refused`).

        Stopping the exporter is what cuts a backoff short, but a stopped exporter fails
        every later batch unsent, also when the collector is back by then. So a new
        exporter (``remake``: the same settings) takes its place first: the batch cut
        short and every later one each get one attempt. Without ``remake``, the exporter
        is stopped.
        """
        replacement = None
        if self._remake is not None:
            try:
                with suppress_instrumentation():
                    replacement = self._remake()
            except Exception:  # pragma: no cover - built the same way at configure time
                logger.exception("could not make another OTLP exporter; stopping this one")
        if replacement is None:
            self.shutdown()
            return
        with self._lock:
            stale = None if self._inner_shut else self.inner
            if stale is not None:
                self.inner = replacement
        with suppress_instrumentation():
            (replacement if stale is None else stale).shutdown()

    def stop_accepting(self) -> None:
        """From now on, every span handed over is counted as not exported at once.

        Called before the batch processor shuts down: the SDK would drop later spans
        without a count.
        """
        with self._lock:
            self._accepting = False

    def _refuse(self, *, queue_full: bool) -> bool:
        """Count one span handed over and not queued; the caller holds the lock.

        True when this is the first of its kind (the caller logs a warning): the
        counter it moves is then 1, so the counters alone say what was warned about.
        """
        _SPANS_NOT_EXPORTED.inc()
        if queue_full:
            self.dropped += 1
            _SPANS_DROPPED.inc()
            return self.dropped == 1
        self.refused += 1
        return self.refused == 1

    def settle(self) -> int:
        """Close the accounts; returns how many spans this counted as not exported.

        Every span handed over and neither confirmed exported nor counted yet is
        counted now in ``otel.spans_not_exported``. Idempotent.
        """
        with self._lock:
            self._accepting = False
            if self._settled:
                return 0
            self._settled = True
            lost = max(self.handed - self.exported - self.not_exported, 0)
            self.unconfirmed += lost
            _SPANS_NOT_EXPORTED.add(lost)
        return lost

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._give_up_at is not None and time.monotonic() >= self._give_up_at:
            self._record(len(spans), SpanExportResult.FAILURE, cut_off=True)
            return SpanExportResult.FAILURE
        with self._lock:
            self._exporting += 1
        try:
            inner = self.inner
            result = self._attempt(inner, spans)
            if (
                result is not SpanExportResult.SUCCESS
                and self.inner is not inner
                and self._give_up_at is not None
                and time.monotonic() < self._give_up_at
            ):
                # stop_retrying_refused() cut this export's backoff short by stopping its
                # exporter: one attempt with the exporter now in its place.
                result = self._attempt(self.inner, spans)
        finally:
            with self._lock:
                self._exporting -= 1
        self._record(len(spans), result)
        return result

    def _attempt(self, inner: SpanExporter, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        refusals = self._refusals
        if refusals is not None and refusals.checks_first and refusals.refused():
            logger.warning(
                "OTLP export of %d spans failed: the collector refused the connection "
                "(nothing listens there): not sent while shutting down%s",
                len(spans),
                _sent_to(self.destination),
            )
            return SpanExportResult.FAILURE
        with suppress_instrumentation():
            try:
                return inner.export(spans)
            except Exception as exc:
                refused_by = _refused_by(exc)
                if refused_by is not None:  # a collector (proxy) that is down: no traceback
                    logger.warning(
                        "OTLP export of %d spans failed: %s refused the connection "
                        "(nothing listens there)%s",
                        len(spans),
                        refused_by,
                        _sent_to(self.destination),
                    )
                else:
                    logger.exception("OTLP export of %d spans failed", len(spans))
                return SpanExportResult.FAILURE

    def _record(self, n: int, result: SpanExportResult, *, cut_off: bool = False) -> None:
        exported = result is SpanExportResult.SUCCESS
        first = False
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
                _SPANS_NOT_EXPORTED.add(n)
                _EXPORT_FAILURES.inc()
                if cut_off:
                    # Spans shutdown cut off are in its own warning, logged before it
                    # returns.
                    self.cut_off += n
                else:
                    # Warned once: when the count of failed spans first leaves zero.
                    first = self.failed == 0 < n
                    self.failed += n
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
                "%d spans were not exported (the collector failed or did not answer%s); "
                "the count is in telemetry counter otel.spans_not_exported",
                n,
                _sent_to(self.destination),
            )

    def shutdown(self) -> None:
        with self._lock:  # also called to cut short an export that is retrying
            if self._inner_shut:
                return
            self._inner_shut = True
            inner = self.inner
        with suppress_instrumentation():
            inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        with suppress_instrumentation():
            return bool(self.inner.force_flush(timeout_millis))


def _sdk_queue(processor: BatchSpanProcessor) -> collections.deque[Any] | None:
    """The batch processor's bounded queue, where this SDK version keeps it."""
    for owner, name in (
        (getattr(processor, "_batch_processor", None), "_queue"),
        (processor, "queue"),
    ):
        queue = getattr(owner, name, None)
        if isinstance(queue, collections.deque) and queue.maxlen is not None:
            return queue
    return None


class AccountedBatchSpanProcessor(BatchSpanProcessor):
    """A ``BatchSpanProcessor`` that counts every span it is handed in its exporter.

    A span that finds the queue full is dropped and counted at once (``dropped``, in
    ``otel.spans_dropped`` and ``otel.spans_not_exported``): the SDK would drop the
    oldest queued span instead, counted nowhere. Spans ended once the exporter stopped
    accepting (shutdown began) are counted as not exported and dropped here too (the
    SDK would drop them with no count).
    """

    def __init__(self, exporter: SuppressedExporter, **options: Any) -> None:
        super().__init__(exporter, **options)
        self.accounts = exporter
        queue = _sdk_queue(self)
        # Spans are queued only under the accounts' lock, and the worker only takes
        # them out, so a queue found below capacity under the lock drops nothing.
        # With an SDK that keeps its queue elsewhere, drops are counted at settling.
        self._queue: Sized = queue if queue is not None else ()
        self._capacity: int = queue.maxlen if queue is not None and queue.maxlen else 1
        # The SDK's on_end would check sampling again (two properties, about a third of
        # a microsecond a span); its batch processor's emit is what it then calls.
        batch_processor = getattr(self, "_batch_processor", None)
        emit = getattr(batch_processor, "emit", None)
        self._emit: Callable[[ReadableSpan], None] = (
            emit if queue is not None and callable(emit) else super().on_end
        )

    def on_end(self, span: ReadableSpan) -> None:
        if not (span.context and span.context.trace_flags.sampled):
            return  # the SDK's batch processor ignores these too
        accounts = self.accounts
        with accounts._lock:
            accounts.handed += 1
            accepting = accounts._accepting
            if accepting and len(self._queue) < self._capacity:
                self._emit(span)
                return
            first = accounts._refuse(queue_full=accepting)
        if not first:
            return
        if accepting:
            logger.warning(
                "the batch span processor's queue is full (%d spans): spans are dropped "
                "and counted in telemetry counters otel.spans_dropped and "
                "otel.spans_not_exported (OTEL_BSP_MAX_QUEUE_SIZE sets the size)",
                self._capacity,
            )
        else:
            logger.warning(
                "a span ended after the OTLP exporter began shutting down is not exported; "
                "such spans are counted in telemetry counter otel.spans_not_exported"
            )


#: CPython 3.12.0-3.12.2 refuse to start a thread once the interpreter is exiting,
#: ``atexit`` hooks included (python/cpython#113964): there a handle starts, when it is
#: made, the threads its exit hook needs (:func:`_standby_threads`).
_NO_THREADS_AT_EXIT = (3, 12) <= sys.version_info[:3] < (3, 12, 3)


class _Running(Protocol):
    """A job running in another thread: a ``threading.Thread``, or a :class:`_Queued`."""

    def join(self, timeout: float | None = None) -> None: ...

    def is_alive(self) -> bool: ...


#: A job started by _in_thread, and the list its result lands in.
_Job = tuple[_Running, list[Any]]


class _Queued:
    """A job handed to a standby thread (:func:`_standby_threads`); alive until it has run."""

    def __init__(self, future: Future[Any], name: str) -> None:
        self.future = future
        self.name = name
        self.outcome: list[Any] = []
        future.add_done_callback(self._done)

    def _done(self, future: Future[Any]) -> None:
        error = future.exception()
        if error is None:
            self.outcome.append(future.result())
        else:  # as a thread of its own would, it reports and ends
            _SHUTDOWN_ERRORS.inc()
            logger.error("%s failed", self.name, exc_info=error)

    def join(self, timeout: float | None = None) -> None:
        futures_wait([self.future], timeout)

    def is_alive(self) -> bool:
        return not self.future.done()


def _standby_threads() -> ThreadPool:
    """Daemon threads started beforehand, running jobs when no thread can be started.

    Two: shutting down runs the SDK's shutdown and, should that hang, the exporter's
    stop at the same time. A job finding both busy waits for one (its caller's wait is
    bounded all the same). ``shutdown(wait=False)`` lets them end once their jobs are done.
    """
    return ThreadPool(2, "instrumentation-otel-standby")


def _in_thread(target: Callable[[], Any], name: str, standby: ThreadPool | None = None) -> _Job:
    """Start ``target`` in a daemon thread; its result lands in the list.

    The SDK's flush and shutdown wait for the exporter however long it retries, so
    the caller waits on the thread, with a bound. When the interpreter refuses to
    start a thread (exiting, on CPython 3.12.0-3.12.2), ``standby`` runs it.
    """
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(target())
        except Exception:
            _report_shutdown_error(name)

    worker = threading.Thread(target=run, name=name, daemon=True)
    try:
        worker.start()
    except RuntimeError:
        if standby is None:
            raise
        job = _Queued(standby.submit(target), name)
        return job, job.outcome
    return worker, outcome


def _report_shutdown_error(name: str) -> None:
    """Logged and counted, not left to ``threading.excepthook``'s stderr."""
    _SHUTDOWN_ERRORS.inc()
    logger.exception("%s failed", name)


def resolve_protocol(protocol: str | None) -> str:
    """The protocol given, else ``OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL``, else HTTP."""
    source = "protocol"
    chosen = protocol
    if not chosen:
        for variable in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            chosen = os.environ.get(variable)
            if chosen:
                source = variable
                break
        else:
            chosen = "http/protobuf"
    if chosen not in PROTOCOLS:
        raise ValueError(
            f"{source} must be 'http/protobuf' or 'grpc' (the OTLP exporters Python has); "
            f"got {chosen!r}"
        )
    return chosen


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL for a collector's base URL.

    ``/v1/traces`` is appended to the URL's path (once: a path ending with it is left
    alone), before its query string, which is kept: ``https://h/otel?key=k`` gives
    ``https://h/otel/v1/traces?key=k``.
    """
    parts = urllib.parse.urlsplit(endpoint)
    path = parts.path.rstrip("/")
    if not path.endswith(TRACES_PATH):
        path += TRACES_PATH
    return urllib.parse.urlunsplit(parts._replace(path=path))


_ENDPOINT_EXAMPLES = {
    "http/protobuf": "'http://localhost:4318' or 'https://collector.example.com/otel'",
    "grpc": "'http://localhost:4317' or 'https://collector.example.com:4317'",
}


#: Target names the gRPC exporter passes to its channel unparsed (gRPC's naming doc).
_GRPC_NAME_SCHEMES = ("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:", "vsock:")


def _check_endpoint(endpoint: object, protocol: str) -> str | None:
    """The endpoint, stripped; a TypeError if it is not a str, a ValueError if it is not
    a URL the exporter can use, saying what one looks like."""
    if endpoint is None:
        return None
    if not isinstance(endpoint, str):
        raise TypeError(
            "endpoint is the collector's base URL as a str, e.g. 'http://localhost:4318'; "
            f"got {type(endpoint).__name__} {endpoint!r}"
        )
    given, endpoint = endpoint, endpoint.strip()
    example = _ENDPOINT_EXAMPLES[protocol]
    if not endpoint:
        problem: str | None = f"it is empty; give the collector's base URL, e.g. {example}"
    elif protocol == "grpc" and endpoint.lower().startswith(_GRPC_NAME_SCHEMES):
        # gRPC's own target names (unix sockets, DNS and address lists) go to the
        # channel as they are: gRPC itself says what is wrong with one.
        problem = None
    elif protocol == "grpc" and "://" not in endpoint:
        # The gRPC exporter also takes host:port without a scheme.
        problem = _url_problem("http://" + endpoint, example)
    else:
        problem = _url_problem(endpoint, example)
    if problem is not None:
        raise ValueError(f"endpoint {given!r} is not a valid {protocol} OTLP endpoint: {problem}")
    return endpoint


def _endpoint_from_environment(protocol: str) -> str | None:
    """``OTEL_EXPORTER_OTLP_ENDPOINT``, checked and used as an ``endpoint`` given here
    is: the SDK would append ``/v1/traces`` after a query string, or a second time, and
    take ``localhost:4318`` without a word. None when it is not set, or when
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is: that one is a full URL, the SDK's to use
    as it is."""
    full = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "")
    if full.strip():
        # Checked, not changed: the SDK would fail every export with one it cannot use.
        try:
            _check_endpoint(full, protocol)
        except ValueError as exc:
            raise ValueError(f"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: {exc}") from None
        return None
    value = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    if not value.strip():
        return None
    try:
        return _check_endpoint(value, protocol)
    except ValueError as exc:
        raise ValueError(f"OTEL_EXPORTER_OTLP_ENDPOINT: {exc}") from None


def _shown(url: str) -> str:
    """``url`` as the warnings name it: the values of its query string and its user
    and password hidden, since an API key may be there (``https://h/otel?key=k``) and
    logs travel further than the key should."""
    try:
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        netloc = parts.netloc
    except ValueError:
        return url
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    hidden = "&".join(f"{name}=***" for name, _ in query) if query else parts.query
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=hidden))


def _url_problem(url: str, example: str) -> str | None:
    """What is wrong with ``url`` as a collector's URL, or None."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError as exc:
        return f"{exc}; a URL looks like {example}"
    if parts.scheme not in ("http", "https"):
        return f"it must start with http:// or https://, as in {example}"
    host = parts.hostname
    if not host or any(c.isspace() for c in url):
        return f"it must name a host, with no spaces; a URL looks like {example}"
    if port is None and parts.netloc.endswith(":"):
        return f"the port after ':' is missing; a URL looks like {example}"
    if parts.fragment:
        return f"a '#fragment' is not sent to a collector; a URL looks like {example}"
    return None


def _check_timeout_variables() -> None:
    """The SDK takes any number for these, and then fails every export with one <= 0."""
    for variable in ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"):
        value = os.environ.get(variable, "").strip()
        if not value:
            continue
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
        if not 0 < seconds < math.inf:
            raise ValueError(f"{variable} is the exporter's timeout, a number > 0; got {value!r}")
        return  # the traces variable, when set, is the one the SDK reads


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
    *,
    session: Any = None,
) -> SpanExporter:
    """The SDK's OTLP span exporter for ``protocol``; unset values come from ``OTEL_*``.

    ``session``: the ``requests.Session`` the HTTP exporter sends with.
    """
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
    if session is not None:
        kwargs["session"] = session
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
        destination: str | None = None,
    ) -> None:
        self.tracer_provider = tracer_provider
        self.handler = handler
        self.exporter = exporter
        self.dispatcher = dispatcher
        self.protocol = protocol
        #: Where the spans go (``None`` for an exporter given by hand), as the warnings
        #: name it: a key in the URL hidden.
        self.destination = destination
        #: The same, whole (configure_otlp's check for a second handle).
        self._sends_to: str | None = None
        self._closed = False
        self._clean_shutdown = False
        self._shutting_down_in: int | None = None
        self._new_locks()
        #: How long interpreter exit waits for spans to be sent, if shutdown() was not called.
        self.exit_timeout_millis = 5_000
        self._standby = _standby_threads() if _NO_THREADS_AT_EXIT else None
        atexit.register(self._at_exit)
        _after_fork_in_child(self._after_fork)

    def _new_locks(self) -> None:
        # Reentrant, as the accounts' lock: shutdown() may be called by a signal handler.
        self._lock = threading.RLock()
        self._shut_down = threading.Event()
        #: Guards starting a flush thread: at most one waits on the exporter.
        self._flush_lock = threading.RLock()
        self._flushing: _Job | None = None

    def _after_fork(self) -> None:
        """In a forked child: locks a parent's thread may have held are new, and a
        shutdown the parent had under way (its thread is not in the child) is over."""
        done = self._shut_down.is_set()
        self._new_locks()
        if self._closed:
            if not done:
                self.exporter.settle()  # the child's accounts: nothing handed yet
            self._shut_down.set()
        elif self._standby is not None:  # the parent's threads are not in the child
            self._standby = _standby_threads()

    @property
    def closed(self) -> bool:
        return self._closed

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Export every ended span now; True when all were exported in time.

        False when ``timeout_millis`` passes first (the export goes on in the
        background), when a span was not exported meanwhile (an export failed, or the
        queue was full), and at once after shutdown has begun (as the SDK's).
        Concurrent calls share one flush: at most one thread waits on the exporter.
        """
        if self._closed:
            return False  # nothing is flushed after shutdown
        deadline = time.monotonic() + max(timeout_millis, 0) / 1000
        failed_before = self.exporter.not_exported
        with self._flush_lock:
            current = self._flushing
            earlier = current if current is not None and current[0].is_alive() else None
            if earlier is None:
                flush = self._start_flush(deadline)
        if earlier is not None:
            # An earlier flush still waits on the exporter, and it may have begun before
            # some span this call must flush ended. A new flush would only queue behind
            # it, so wait for it, then for a flush begun after this call.
            earlier[0].join(max(deadline - time.monotonic(), 0.0))
            if earlier[0].is_alive() or time.monotonic() >= deadline:
                return False
            with self._flush_lock:
                newer = self._flushing
                # Another caller may have started one since this call looked: it serves.
                if newer is not None and newer is not earlier:
                    flush = newer
                else:
                    flush = self._start_flush(deadline)
        worker, outcome = flush
        worker.join(max(deadline - time.monotonic(), 0.0))
        return bool(outcome) and bool(outcome[0]) and self.exporter.not_exported == failed_before

    def _start_flush(self, deadline: float) -> _Job:
        """Start a flush thread (the caller holds ``_flush_lock``)."""
        left_millis = max(int((deadline - time.monotonic()) * 1000), 0)
        flush = _in_thread(
            lambda: self.tracer_provider.force_flush(left_millis),
            "instrumentation-otel-flush",
            self._standby,
        )
        self._flushing = flush
        return flush

    def shutdown(self, timeout_millis: int = 10_000) -> bool:
        """Detach the handler, end spans still open, flush everything, stop the exporter.

        Returns within about ``timeout_millis``. Spans not confirmed exported by then
        (in flight, or still queued) are given up; sooner when the collector refuses the
        connection (OTLP/HTTP): each batch then gets one attempt, without the exporter's
        backoff, as nothing listens there. True when every span handed to the
        SDK since :func:`configure_otlp` was exported; otherwise, before returning,
        every span not exported (failed earlier or now, dropped because the queue was
        full, given up) is counted in ``otel.spans_not_exported`` and a warning says
        how many, why, and how long shutdown took. Also when shutdown is interrupted
        (``KeyboardInterrupt``): the accounts are settled and the warning logged before
        the exception propagates. Idempotent; a call made while another is shutting
        down waits for that one (at most its own ``timeout_millis``) and gives its
        answer, or False if it is not done. Also run at interpreter exit.
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
        started = time.monotonic()
        budget = max(timeout_millis, 0) / 1000
        deadline = started + budget
        # No batch starts this close to the deadline: it could not finish in time.
        cut_short_at = deadline - min(_CUT_SHORT_BEFORE_S, budget / 10)
        worker: _Running | None = None
        timed_out = False
        try:
            atexit.unregister(self._at_exit)
            self.dispatcher.remove_span_handler(self.handler)
            self.dispatcher.remove_event_handler(self.handler)
            self.handler.close()
            self.exporter.give_up_at(cut_short_at)
            self.exporter.stop_accepting()
            worker, _ = _in_thread(
                self.tracer_provider.shutdown, "instrumentation-otel-shutdown", self._standby
            )
            # The collector refused the last connection: its export's backoff is not
            # waited out; the batches, that one too, get one attempt each. Found in the
            # thread too: over gRPC, by trying a connection, which a collector that does
            # not answer held here for 250 ms (per address), past a shorter timeout.
            _in_thread(
                self.exporter.stop_if_retrying_refused,
                "instrumentation-otel-stop",
                self._standby,
            )
            worker.join(max(cut_short_at - time.monotonic(), 0.0))
            if worker.is_alive():
                # An export is still retrying, or waiting on a collector that does not
                # answer: stopping the exporter cuts a retry short (in a thread: stopping
                # may block too), and the rest of the budget lets the worker finish.
                timed_out = True
                _in_thread(self.exporter.shutdown, "instrumentation-otel-stop", self._standby)
                worker.join(max(deadline - time.monotonic(), 0.0))
        except BaseException:
            # Interrupted (Ctrl-C): settle and warn all the same; the exit hook is gone.
            self._settle(started, timeout_millis, timed_out=timed_out, interrupted=True)
            raise
        finally:
            if self._standby is not None:  # no job is handed to it any more
                self._standby.shutdown(wait=False)
        clean = self._settle(started, timeout_millis, timed_out=timed_out, interrupted=False)
        if clean and worker.is_alive():
            logger.info("every span was exported, but the OTLP exporter is still stopping")
        return clean

    def _settle(
        self, started: float, timeout_millis: int, *, timed_out: bool, interrupted: bool
    ) -> bool:
        """Count what is not confirmed now as not exported (before returning: the process
        may exit next), warn when any span was not exported; True when none.

        A late outcome of an abandoned export counts nothing.
        """
        self.exporter.settle()
        accounts = self.exporter.accounts()
        self._clean_shutdown = accounts.not_exported == 0
        if self._clean_shutdown:
            return True
        took_ms = (time.monotonic() - started) * 1000
        reasons = []
        if accounts.dropped:
            reasons.append(f"{accounts.dropped} dropped because the batch queue was full")
        if accounts.failed:
            reasons.append(f"{accounts.failed} failed to export")
        given_up = accounts.cut_off + accounts.unconfirmed
        if given_up and interrupted:
            reasons.append(f"{given_up} not confirmed when shutdown was interrupted")
        elif given_up and timed_out:
            reasons.append(f"{given_up} not confirmed within the {timeout_millis} ms timeout")
        elif given_up:
            reasons.append(f"{given_up} discarded by the batch processor unexported")
        if accounts.refused:
            reasons.append(f"{accounts.refused} ended after shutdown began")
        logger.warning(
            "OTLP shutdown %s after %d ms: %d of %d spans handed to the exporter were not "
            "exported (%s)%s; the count is in telemetry counter otel.spans_not_exported",
            "interrupted" if interrupted else "ended",
            took_ms,
            accounts.not_exported,
            accounts.handed,
            ", ".join(reasons),
            _sent_to(self.destination),
        )
        return False

    def _at_exit(self) -> None:
        try:
            try:
                prepare_exit_flush()  # LLM streams still open end, span ends put off go too
            finally:  # a handler's Ctrl-C there: the spans still go
                self.shutdown(timeout_millis=self.exit_timeout_millis)
        except KeyboardInterrupt:
            # Ctrl-C while the exit waits for the collector: the user wants out, and
            # shutdown has counted and warned; atexit would add a traceback.
            pass

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
    protocol: Literal["http/protobuf", "grpc"] | None = None,
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
      ``/v1/traces`` is appended to its path for HTTP (before any query string). An
      empty or malformed one raises ``ValueError``. ``None``: the ``OTEL_*``
      variables, else the OTLP default.
    - ``protocol``: ``"http/protobuf"`` (default) or ``"grpc"``.
    - ``headers``: e.g. an ``authorization`` header; ``None``: ``OTEL_EXPORTER_OTLP_HEADERS``.
    - ``service_name``: the ``service.name`` resource attribute (else ``OTEL_SERVICE_NAME``).
    - ``dispatcher``: where to attach (the root, seeing everything, by default).
    - ``openinference``: add OpenInference attributes (for Phoenix).
    - ``set_global``: also make the provider OpenTelemetry's global one, so the
      application's own OpenTelemetry spans go to the same place.
    - ``exporter``: use this exporter instead of OTLP (tests, or a vendor exporter).
    """
    for flag, value in (
        ("capture_content", capture_content),
        ("openinference", openinference),
        ("set_global", set_global),
    ):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} is True or False; got {value!r}")
    if exporter is not None and (
        isinstance(exporter, type) or not callable(getattr(exporter, "export", None))
    ):
        got = (
            f"the class {exporter.__name__} itself: write {exporter.__name__}(...)"
            if isinstance(exporter, type)
            else type(exporter).__name__
        )
        raise TypeError(f"exporter is a SpanExporter instance; got {got}")
    chosen = resolve_protocol(protocol)
    checked_endpoint = _check_endpoint(endpoint, chosen)
    if checked_endpoint is None and exporter is None:
        checked_endpoint = _endpoint_from_environment(chosen)
    checked_headers = _check_headers(headers)
    if service_name is not None and (not isinstance(service_name, str) or not service_name):
        raise TypeError(f"service_name is a non-empty str; got {service_name!r}")
    if resource_attributes is not None and not isinstance(resource_attributes, Mapping):
        raise TypeError(
            f"resource_attributes is a mapping; got {type(resource_attributes).__name__}"
        )
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(
                f"timeout is the exporter's timeout in seconds (a number); got {timeout!r}"
            )
        if not 0 < timeout < math.inf:
            raise ValueError(f"timeout is seconds > 0 (e.g. 10); got {timeout!r}")
    elif exporter is None:
        _check_timeout_variables()
    if dispatcher is not None and not isinstance(dispatcher, Dispatcher):
        raise TypeError(
            f"dispatcher is a Dispatcher (get_dispatcher(name)); got {type(dispatcher).__name__}"
        )
    target = root_dispatcher if dispatcher is None else dispatcher
    destination = sends_to = None
    if exporter is None:
        if checked_endpoint is not None:
            where = (
                traces_url(checked_endpoint)
                if chosen == "http/protobuf"
                else checked_endpoint.rstrip("/")
            )
        else:
            where = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        destination = f"{chosen} {_shown(where) or '(the OTLP default endpoint)'}"
        # Compared whole: two keys for one URL (two tenants) are two destinations.
        sends_to = f"{chosen} {where}"
        for earlier in list(_live_handles):
            if (
                not earlier.closed
                and earlier.dispatcher is target
                and earlier._sends_to == sends_to
            ):
                raise ValueError(
                    f"configure_otlp already sends the spans of {target.name!r} to "
                    f"{destination} ({earlier!r}): a second handle would send each "
                    "span twice. Keep using that one, or call its shutdown() first"
                )
    if set_global and not isinstance(
        trace_api.get_tracer_provider(), trace_api.ProxyTracerProvider
    ):
        # OpenTelemetry sets the global provider once per process, and ignores (with
        # a log line) any later attempt: the application's own spans would go on to
        # the provider set first, not to this collector.
        raise ValueError(
            "set_global=True: OpenTelemetry's global tracer provider is set already "
            f"({type(trace_api.get_tracer_provider()).__name__}), and it can be set only "
            "once per process. Leave set_global off (our spans still nest with the "
            "application's own), or export through that provider: attach "
            "OpenTelemetrySpanHandler(tracer_provider=trace.get_tracer_provider())"
        )

    attributes: dict[str, Any] = dict(resource_attributes or {})
    if service_name is not None:
        attributes[SERVICE_NAME] = service_name
    # Our handle shuts the provider down at exit, with a bound on the wait.
    provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=False)
    refusals = None if exporter is not None else _refusals_for(chosen, checked_endpoint)

    def remake() -> SpanExporter:
        return make_exporter(
            checked_endpoint,
            chosen,
            checked_headers,
            timeout,
            session=None if refusals is None else refusals.session(),
        )

    inner = exporter if exporter is not None else remake()
    wrapped = SuppressedExporter(
        inner, destination, refusals, remake if refusals is not None else None
    )
    provider.add_span_processor(AccountedBatchSpanProcessor(wrapped))
    if set_global:
        trace_api.set_tracer_provider(provider)
    handler = OpenTelemetrySpanHandler(
        tracer_provider=provider, openinference=openinference, capture_content=capture_content
    )
    target.add_span_handler(handler)
    target.add_event_handler(handler)
    handle = OTLPHandle(provider, handler, wrapped, target, chosen, destination)
    handle._sends_to = sends_to
    _live_handles.add(handle)
    return handle


#: The handles configure_otlp made, to refuse a second one sending the same spans to the
#: same place (a notebook cell run twice, a module imported again).
_live_handles: weakref.WeakSet[OTLPHandle] = weakref.WeakSet()


__all__ = ["OTLPHandle", "SpanAccounts", "configure_otlp"]
