"""configure_otlp end to end: the real SDK and exporter, a real OTLP/HTTP receiver."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

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


#: The threads configure_otlp's handle and the SDK's batch processor start.
_OTEL_THREAD_NAMES = frozenset(
    {
        "OtelBatchSpanRecordProcessor",
        "instrumentation-otel-flush",
        "instrumentation-otel-shutdown",
        "instrumentation-otel-stop",
    }
)


def _otel_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name in _OTEL_THREAD_NAMES}


def _assert_stopped(threads: Iterable[threading.Thread], within: float = 10.0) -> None:
    """Every one of ``threads`` ends within ``within`` seconds: none outlives its test."""
    threads = list(threads)
    deadline = time.monotonic() + within
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0.0))
    assert [t.name for t in threads if t.is_alive()] == []


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
    before = _otel_threads()
    otlp = configure_otlp(endpoint=f"http://127.0.0.1:{port}", timeout=30)
    d = get_dispatcher("tests.otel.unreachable")

    @d.span
    def unit(i: int) -> int:
        return i

    for i in range(50):
        unit(i)
    # Each waits at most its own timeout, with room for a loaded machine; ignoring it
    # would wait for the exporter's retries, up to its 30 s. (Older exporters do not
    # retry a refused connection: their export fails at once.)
    started = time.monotonic()
    assert otlp.force_flush(500) is False
    assert time.monotonic() - started < 4
    started = time.monotonic()
    assert otlp.shutdown(timeout_millis=1_000) is False
    assert time.monotonic() - started < 4
    assert telemetry.counter("otel.spans_exported").value == 0
    assert telemetry.counter("otel.spans_not_exported").value == 50
    assert otlp.shutdown() is False  # idempotent
    _assert_stopped(_otel_threads() - before)  # stopping the exporter ended its retries


def test_the_warnings_about_spans_not_exported_name_where_they_were_sent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A mistyped port is the usual reason nothing arrives: the warnings name the
    protocol and the URL the spans went to, not only how many were lost."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    caplog.set_level(logging.WARNING, logger="instrumentation.otel")
    otlp = configure_otlp(endpoint=f"http://127.0.0.1:{port}", timeout=30)
    with get_dispatcher("tests.otel.where").span("unit"):
        pass
    assert otlp.shutdown(timeout_millis=1_000) is False
    where = f"sent to http/protobuf http://127.0.0.1:{port}/v1/traces"
    summary = [m for m in caplog.messages if m.startswith("OTLP shutdown")]
    assert len(summary) == 1 and where in summary[0], caplog.messages
    failed = [m for m in caplog.messages if "were not exported (the collector failed" in m]
    assert all(where in m for m in failed), failed


def test_the_warnings_name_the_destination_without_its_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An API key in the endpoint's query string (``https://h/otel?key=k``, as the
    docs allow) or its user and password is not written into the log lines that name
    where spans were sent, nor in the handle's repr or its destination: logs travel
    further than the key should."""
    caplog.set_level(logging.WARNING)
    otlp = configure_otlp(endpoint=f"http://user:pw@127.0.0.1:{_free_port()}/?key=s3cret")
    with get_dispatcher("tests.otel.key").span("unit"):
        pass
    assert otlp.shutdown(timeout_millis=1_000) is False
    assert otlp.destination is not None and "s3cret" not in otlp.destination
    assert "/v1/traces?key=***" in otlp.destination and "***@127.0.0.1" in otlp.destination
    summary = [m for m in caplog.messages if m.startswith("OTLP shutdown")]
    assert len(summary) == 1 and otlp.destination in summary[0], caplog.messages
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("instrumentation")]
    assert ours and not any("s3cret" in m or ":pw@" in m for m in ours), ours


def test_flushes_that_time_out_keep_at_most_one_thread_waiting() -> None:
    """Each flush that times out used to leave a thread behind until its export ended."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    before = _otel_threads()
    otlp = configure_otlp(endpoint=f"http://127.0.0.1:{port}", timeout=30)
    try:
        for i in range(4):
            with get_dispatcher("tests.otel.flushes").span(f"unit{i}"):
                pass
            assert otlp.force_flush(200) is False
        flushing = [t for t in threading.enumerate() if t.name == "instrumentation-otel-flush"]
        assert len(flushing) <= 1  # none once an export that fails at once is over
    finally:
        assert otlp.shutdown(timeout_millis=500) is False
    _assert_stopped(_otel_threads() - before)


def test_a_shutdown_racing_another_gets_the_same_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A second caller waits for the shutdown under way, instead of answering at once,
    but no longer than its own timeout; one that waits long enough gets its answer."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")  # exported at shutdown only
    exporter = Blocking()
    before = _otel_threads()
    otlp = configure_otlp(exporter=exporter, dispatcher=get_dispatcher("tests.otel.race"))
    with otlp.tracer_provider.get_tracer("app").start_as_current_span("unit"):
        pass
    answers: list[bool] = []
    first = threading.Thread(target=lambda: answers.append(otlp.shutdown(timeout_millis=10_000)))
    first.start()
    try:
        # The batch is held in the exporter: the first shutdown is under way, and cannot
        # end before it is released.
        assert exporter.entered.wait(5)
        started = time.monotonic()
        assert otlp.shutdown(timeout_millis=100) is False  # the first is not done yet
        took = time.monotonic() - started
        assert answers == [] and first.is_alive()  # it did race the first one
        # It waited, its own 0.1 s: not the first's, held up to 10 s.
        assert 0.09 <= took < 5
    finally:
        exporter.release.set()
    assert otlp.shutdown(timeout_millis=10_000) is True  # the first's answer
    first.join(5)
    assert not first.is_alive() and answers == [True]
    assert exporter.exported == 1
    _assert_stopped(_otel_threads() - before)


def _shutdown_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "instrumentation-otel-shutdown"}


def test_shutdown_gives_up_in_its_budget_and_counts_every_span_before_returning(
    silent_collector: SilentCollector, caplog: pytest.LogCaptureFixture
) -> None:
    """A collector that accepts and never answers: shutdown returns within its timeout
    (not timeout + 1 s), and by then every span (the batch in flight and the one still
    queued) is counted and a warning is logged, not seconds later when the export times
    out. When the abandoned export fails late, nothing is counted twice."""
    threads_before = _otel_threads()
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
    # Its 0.6 s, with room for a loaded machine; waiting on the export would take the
    # exporter's 30 s.
    assert 0.5 < took < 3.6
    assert not_exported == 600
    assert telemetry.counter("otel.spans_exported").value == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "600 of 600 spans handed to the exporter were not exported "
        "(600 not confirmed within the 600 ms timeout)" in m
        for m in warnings
    ), warnings
    abandoned = _shutdown_threads() - before
    assert len(abandoned) == 1  # the export still hangs
    silent_collector.close()  # now it fails
    for worker in abandoned:
        worker.join(5)
    assert not any(worker.is_alive() for worker in abandoned)
    assert telemetry.counter("otel.spans_not_exported").value == 600
    assert telemetry.counter("otel.spans_exported").value == 0
    assert otlp.exporter.not_exported == 600
    _assert_stopped(_otel_threads() - threads_before)


def test_a_batch_arriving_after_shutdown_gave_up_is_counted_late_not_twice(
    silent_collector: SilentCollector,
) -> None:
    """Spans shutdown declared lost that reach the collector afterwards stay counted as
    not exported (that is what shutdown reported) and are counted in
    otel.spans_exported_late, never in otel.spans_exported."""
    threads_before = _otel_threads()
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
    _assert_stopped(_otel_threads() - threads_before)


_REFUSE_THREADS_AT_EXIT = """
import threading
from instrumentation.otel import configure as otel_configure

otel_configure._NO_THREADS_AT_EXIT = True  # as on CPython 3.12.0-3.12.2

def refuse_threads():  # registered last, so it runs before the handle's own exit hook
    def start(self):
        raise RuntimeError("can't create new thread at interpreter shutdown")

    threading.Thread.start = start

"""


@pytest.mark.parametrize("threads_at_exit", ["started", "refused"])
def test_interpreter_exit_is_bounded_when_the_collector_does_not_answer(
    threads_at_exit: str,
) -> None:
    """Without shutdown(), exit shuts down through the handle: with a collector that
    accepts and never answers it waits exit_timeout_millis, not more, and the loss is
    in the counter and on stderr before the interpreter is gone. Also where an exiting
    interpreter refuses to start threads (CPython 3.12.0-3.12.2): the exit hook failed
    at once ("can't create new thread at interpreter shutdown"), waiting for nothing."""
    refused = threads_at_exit == "refused"
    code = (_REFUSE_THREADS_AT_EXIT if refused else "") + textwrap.dedent(
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
    if refused:
        code += "atexit.register(refuse_threads)\n"
    done = subprocess.run(
        [sys.executable, "-c", code], check=True, timeout=60, capture_output=True, text=True
    )
    lines = done.stderr.splitlines()
    report = [line for line in lines if line.startswith("exit took")]
    assert len(report) == 1, done.stderr
    took = float(report[0].split()[2])
    # Its 0.5 s, with room for a loaded machine; waiting on the export would take the
    # exporter's 30 s.
    assert 0.4 < took < 3.5, done.stderr
    assert report[0].endswith("spans_not_exported=20")
    warned = [
        i
        for i, line in enumerate(lines)
        if "20 of 20 spans" in line and "within the 500 ms timeout" in line
    ]
    assert warned and warned[0] < lines.index(report[0]), done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def test_ctrl_c_while_the_exit_waits_for_the_collector_prints_no_traceback() -> None:
    """Ctrl-C while interpreter exit waits for a collector that does not answer: the
    exit stops waiting, counts and warns as an interrupted shutdown() does, and that
    is all. atexit added "Exception ignored in atexit callback" and the
    KeyboardInterrupt's traceback."""
    code = textwrap.dedent(
        """
        import os, signal, socket, threading
        from instrumentation import get_dispatcher
        from instrumentation.otel import configure_otlp

        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
        collector = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; no answer
        port = collector.getsockname()[1]
        otlp = configure_otlp(endpoint=f"http://127.0.0.1:{port}", timeout=30)
        otlp.exit_timeout_millis = 20_000
        d = get_dispatcher("exit")
        for i in range(20):
            with d.span("unit"):
                pass
        otlp.force_flush(100)  # a batch is in flight, hanging
        timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
        timer.daemon = True
        timer.start()
        """
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], timeout=60, capture_output=True, text=True)
    assert time.monotonic() - started < 10, done.stderr  # not the 20 s it would wait
    assert "OTLP shutdown interrupted" in done.stderr and "20 of 20 spans" in done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr


def _free_port() -> int:
    """A loopback port nothing listens on: a connection to it is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _answer_late(receiver: OTLPReceiver, seconds: float) -> None:
    """A healthy collector that is slow: each batch is confirmed ``seconds`` late."""
    received = receiver._received

    def late(*args: Any) -> None:
        time.sleep(seconds)
        received(*args)

    receiver._received = late  # type: ignore[method-assign]


_EXIT_WITHOUT_SHUTDOWN = """
import atexit, sys, time
from instrumentation import get_dispatcher, telemetry
from instrumentation.otel import configure_otlp

ended = []

def report():  # registered first, so it runs after the handle's own exit hook
    print(
        "exit took %.3f s, spans_exported=%d, spans_not_exported=%d"
        % (
            time.monotonic() - ended[0],
            telemetry.counter("otel.spans_exported").value,
            telemetry.counter("otel.spans_not_exported").value,
        ),
        file=sys.stderr,
        flush=True,
    )

atexit.register(report)
otlp = configure_otlp(endpoint=sys.argv[1])  # exit_timeout_millis: its 5 s default
d = get_dispatcher("cli")

@d.span
def work(i):
    return i

for i in range(5):
    work(i)
if sys.argv[2] == "flush first":
    # Refused: the export is now waiting out the exporter's backoff (about 1 s) before
    # trying again.
    print("flushed:", otlp.force_flush(300), file=sys.stderr, flush=True)
ended.append(time.monotonic())
"""


def _exit_without_shutdown(endpoint: str, before_exit: str = "nothing") -> tuple[float, str]:
    """Run a short script tracing 5 calls, ending without shutdown(); how long its exit
    hook took, and its stderr."""
    done = subprocess.run(
        [sys.executable, "-c", _EXIT_WITHOUT_SHUTDOWN, endpoint, before_exit],
        check=True,
        timeout=60,
        capture_output=True,
        text=True,
    )
    report = [line for line in done.stderr.splitlines() if line.startswith("exit took")]
    assert len(report) == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return float(report[0].split()[2]), done.stderr


@pytest.mark.parametrize("before_exit", ["nothing", "flush first"])
def test_interpreter_exit_does_not_wait_for_a_collector_that_refuses_the_connection(
    before_exit: str,
) -> None:
    """Nothing listens at the endpoint (a wrong port, the collector not started): the
    connection is refused at once, so exit makes one attempt and gives up, instead of
    waiting out the exporter's backoff until exit_timeout_millis (5 s). Also when an
    export was already waiting out its backoff after a refusal. The spans are counted
    and warned about all the same."""
    took, stderr = _exit_without_shutdown(f"http://127.0.0.1:{_free_port()}", before_exit)
    if before_exit == "flush first":
        assert "flushed: False" in stderr
    # Well under the 5 s the exit used to wait, with room for a loaded machine.
    assert took < 2, stderr
    assert "spans_exported=0, spans_not_exported=5" in stderr
    assert "5 of 5 spans handed to the exporter were not exported (5 failed" in stderr


def test_interpreter_exit_still_waits_for_a_slow_collector_that_answers() -> None:
    """A collector that accepts the connection and answers late is not given up on: exit
    waits for it (within exit_timeout_millis) and every span arrives."""
    with OTLPReceiver() as receiver:
        _answer_late(receiver, 1.5)
        took, stderr = _exit_without_shutdown(receiver.endpoint)
        assert len(receiver.spans) == 5, stderr
    assert 1.4 < took < 4.5, stderr
    assert "spans_exported=5, spans_not_exported=0" in stderr


def test_shutdown_gives_a_refused_connection_one_attempt_not_its_whole_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """shutdown() (and a with block's end) with nothing listening: each batch is tried
    once and fails at once, counted and warned about, instead of being retried with
    backoff for the whole 10 s timeout."""
    before = _otel_threads()
    caplog.set_level(logging.WARNING, logger="instrumentation.otel")
    otlp = configure_otlp(endpoint=f"http://127.0.0.1:{_free_port()}")
    for i in range(600):  # two batches, each tried once
        with get_dispatcher("tests.otel.refused").span(f"unit{i % 3}"):
            pass
    started = time.monotonic()
    assert otlp.shutdown(timeout_millis=10_000) is False
    assert time.monotonic() - started < 3  # the exporter would retry for its 10 s
    assert telemetry.counter("otel.spans_exported").value == 0
    assert telemetry.counter("otel.spans_not_exported").value == 600
    assert any("600 of 600 spans" in m and "600 failed to export" in m for m in caplog.messages)
    _assert_stopped(_otel_threads() - before)


def test_a_collector_answering_503_is_still_retried_at_shutdown(receiver: OTLPReceiver) -> None:
    """A collector that answers "unavailable" is there: shutdown retries it after the
    exporter's backoff, within its timeout, as before; it is only a refused connection
    that is not retried."""
    otlp = configure_otlp(endpoint=receiver.endpoint)
    for i in range(5):
        with get_dispatcher("tests.otel.busy").span(f"unit{i}"):
            pass
    receiver.status = 503
    recovers = threading.Timer(0.3, lambda: setattr(receiver, "status", 200))
    recovers.start()
    try:
        assert otlp.shutdown(timeout_millis=10_000) is True
    finally:
        recovers.cancel()
    assert len(receiver.spans) == 5
    assert telemetry.counter("otel.spans_exported").value == 5


def test_a_refused_connection_is_still_retried_while_the_application_runs() -> None:
    """Only shutting down gives up on a refused connection: while running, the export
    retries (in the background) and reaches a collector that starts listening later."""
    port = _free_port()
    otlp = configure_otlp(endpoint=f"http://127.0.0.1:{port}")
    try:
        with get_dispatcher("tests.otel.late_collector").span("unit"):
            pass
        assert otlp.force_flush(300) is False  # refused: retrying after its backoff
        if otlp.exporter.accounts().failed:
            pytest.skip("this (older) OTLP exporter fails a refused connection at once")
        with OTLPReceiver(port=port) as receiver:
            assert len(receiver.wait_for(1, timeout=10)) == 1
            assert otlp.shutdown(timeout_millis=5_000) is True
    finally:
        otlp.shutdown(timeout_millis=1_000)
    assert telemetry.counter("otel.spans_not_exported").value == 0


def test_a_collector_back_when_shutdown_begins_gets_every_batch() -> None:
    """An export waits out its backoff after a refusal, and the collector is listening
    again when shutdown() begins (it was restarting, or started after the
    application): shutdown cuts the backoff short, and still sends that batch and every
    batch queued behind it, one attempt each, instead of failing them all unsent with
    the exporter it stopped to cut the backoff short."""
    port = _free_port()
    otlp = configure_otlp(endpoint=f"http://127.0.0.1:{port}")
    try:
        with get_dispatcher("tests.otel.back").span("first"):
            pass
        assert otlp.force_flush(300) is False  # refused: retrying after its backoff
        if otlp.exporter.accounts().failed:
            pytest.skip("this (older) OTLP exporter fails a refused connection at once")
        for i in range(10):  # queued behind the batch waiting out its backoff
            with get_dispatcher("tests.otel.back").span(f"later{i}"):
                pass
        with OTLPReceiver(port=port) as receiver:
            assert otlp.shutdown(timeout_millis=5_000) is True
            assert len(receiver.spans) == 11
    finally:
        otlp.shutdown(timeout_millis=1_000)
    assert telemetry.counter("otel.spans_exported").value == 11
    assert telemetry.counter("otel.spans_not_exported").value == 0


def test_a_proxy_that_refuses_the_connection_is_named_not_the_collector(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """HTTP_PROXY names a proxy nothing listens at: the refusal is the proxy's, and the
    log says so (the collector may well be up), and shutting down gives up at once as
    for a collector that refuses."""
    caplog.set_level(logging.WARNING)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{_free_port()}")
    for name in ("NO_PROXY", "no_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    otlp = configure_otlp(endpoint="http://collector.example:4318")
    with get_dispatcher("tests.otel.proxy").span("unit"):
        pass
    started = time.monotonic()
    assert otlp.shutdown(timeout_millis=10_000) is False
    assert time.monotonic() - started < 3
    assert telemetry.counter("otel.spans_not_exported").value == 1
    assert any("the proxy refused the connection" in m for m in caplog.messages), caplog.text
    assert not any("the collector refused" in m for m in caplog.messages), caplog.text


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


def test_the_endpoint_variable_follows_the_endpoint_rules(
    receiver: OTLPReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT is read as endpoint= is: /v1/traces added once,
    before the query string, and a malformed one refused, naming the variable (the SDK
    sent to .../v1/traces/v1/traces, or after the query, and took 'localhost:4318').
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, a full URL, stays the SDK's to use as it is."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint + "/v1/traces?k=v")
    otlp = configure_otlp()

    @get_dispatcher("tests.otel.env_endpoint").span
    def work() -> None:
        pass

    work()
    otlp.shutdown()
    assert len(receiver.spans) == 1 and receiver.request_paths == ["/v1/traces?k=v"]
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "localhost:4318")
    with pytest.raises(ValueError, match=r"OTEL_EXPORTER_OTLP_ENDPOINT: .* http://"):
        configure_otlp()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.endpoint + "/v1/traces")
    configure_otlp().shutdown()  # the full URL wins; the generic one is not read


def test_the_other_environment_variables_are_checked_and_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OTEL_EXPORTER_OTLP_TRACES_ENDPOINT without a scheme, and a timeout variable of 0,
    were taken, and every export then failed; a bad protocol variable was reported as
    if it were the protocol= argument."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "localhost:4318/v1/traces")
    with pytest.raises(ValueError, match=r"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: .* http://"):
        configure_otlp()
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    for variable in ("OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"):
        for value in ("0", "-1", "soon"):
            monkeypatch.setenv(variable, value)
            with pytest.raises(ValueError, match=f"{variable} is the exporter's timeout"):
                configure_otlp(endpoint="http://127.0.0.1:1")
        monkeypatch.delenv(variable)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_PROTOCOL must be"):
        configure_otlp(endpoint="http://127.0.0.1:1")
    assert root_dispatcher.span_handlers == []


def test_a_second_handle_to_the_same_collector_is_refused(receiver: OTLPReceiver) -> None:
    """Configuring twice (a notebook cell run again) sent every span twice, with the
    same span id, without a word. Another dispatcher or collector is fine, and so is
    configuring again after shutdown()."""
    first = configure_otlp(endpoint=receiver.endpoint)
    try:
        with pytest.raises(ValueError, match=r"send each span twice.*shutdown"):
            configure_otlp(endpoint=receiver.endpoint)
        with pytest.raises(ValueError, match="send each span twice"):
            configure_otlp(endpoint=receiver.endpoint + "/")  # the same collector
        elsewhere = configure_otlp(
            endpoint=receiver.endpoint, dispatcher=get_dispatcher("tests.otel.twice")
        )
        elsewhere.shutdown()
        # A key in the URL is hidden where the handle is named, but two keys (two
        # tenants of one collector) are two destinations.
        keyed = configure_otlp(endpoint=receiver.endpoint + "/t?key=one")
        other_tenant = configure_otlp(endpoint=receiver.endpoint + "/t?key=two")
        with pytest.raises(ValueError, match=r"send each span twice"):
            configure_otlp(endpoint=receiver.endpoint + "/t?key=one")
        assert keyed.destination == other_tenant.destination
        assert "one" not in (keyed.destination or "")
        keyed.shutdown()
        other_tenant.shutdown()
    finally:
        first.shutdown()
    again = configure_otlp(endpoint=receiver.endpoint)

    @get_dispatcher("tests.otel.once").span
    def work() -> None:
        pass

    work()
    assert again.shutdown() is True
    assert [short(s.name) for s in receiver.spans] == ["work"]


def test_set_global_over_an_existing_global_provider_is_refused() -> None:
    """OpenTelemetry sets its global provider once: set_global=True after the
    application set one was ignored but for a log line, and the application's spans
    went on to the other provider."""
    script = textwrap.dedent(
        """
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from instrumentation import root_dispatcher
        from instrumentation.otel import configure_otlp

        trace.set_tracer_provider(TracerProvider())
        try:
            configure_otlp(endpoint="http://127.0.0.1:1", set_global=True)
        except ValueError as exc:
            print("refused:", exc)
        assert root_dispatcher.span_handlers == []
        handle = configure_otlp(endpoint="http://127.0.0.1:1")  # without: fine
        handle.shutdown(100)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "refused: set_global=True: OpenTelemetry's global tracer provider is set" in (
        done.stdout
    )


def test_a_disabled_sdk_propagates_not_sampled() -> None:
    """With OTEL_SDK_DISABLED=true nothing is exported, but the traceparent we sent on
    said "sampled": services downstream kept children of spans no backend has."""
    script = textwrap.dedent(
        """
        import os
        os.environ["OTEL_SDK_DISABLED"] = "true"
        from instrumentation import get_dispatcher
        from instrumentation.otel import configure_otlp

        handle = configure_otlp(endpoint="http://127.0.0.1:1")
        d = get_dispatcher("app")

        @d.span
        def work():
            return d.capture_propagation_context()["traceparent"]

        print(work())
        handle.shutdown(100)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", done.stdout.strip()), done.stdout


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


def test_traces_url_puts_the_path_before_the_query_string() -> None:
    """/v1/traces was appended after the query (``?key=k/v1/traces``): the request went
    to the base path, with the path glued into the query's last value."""
    assert traces_url("http://h:4318?key=k") == "http://h:4318/v1/traces?key=k"
    assert traces_url("https://h/otel/?a=1&b=x/y") == "https://h/otel/v1/traces?a=1&b=x/y"
    assert traces_url("https://h/otel/v1/traces?a=1") == "https://h/otel/v1/traces?a=1"


def test_an_endpoint_with_a_query_string_reaches_the_collector(receiver: OTLPReceiver) -> None:
    otlp = configure_otlp(
        endpoint=receiver.endpoint + "?tenant=shop", dispatcher=get_dispatcher("tests.otel.q")
    )

    @get_dispatcher("tests.otel.q").span
    def work() -> None:
        pass

    work()
    assert otlp.shutdown() is True  # was False: the receiver answered 404
    assert len(receiver.spans) == 1
    assert receiver.request_paths == ["/v1/traces?tenant=shop"]


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
@pytest.mark.parametrize(
    "endpoint", ["", "   ", "http://", "http://:4318", "http://h:port", "http://h:", "http:// h"]
)
def test_an_empty_or_malformed_endpoint_is_a_value_error_showing_a_valid_one(
    endpoint: str, protocol: str
) -> None:
    """'' was a TypeError ("a str ... got ''") though it is a str; 'http://' and the
    like were accepted, and every export then failed."""
    example = "http://localhost:4318" if protocol == "http/protobuf" else "http://localhost:4317"
    with pytest.raises(ValueError, match=f"endpoint {re.escape(repr(endpoint))} .*{example}"):
        configure_otlp(endpoint=endpoint, protocol=protocol)
    assert root_dispatcher.span_handlers == []


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


@pytest.mark.parametrize("timeout", ["5", True, 0, -1, float("nan"), float("inf")])
def test_a_bad_exporter_timeout_is_refused_not_every_export_failing(timeout: object) -> None:
    """It was taken as is: every export then failed (counted, but only at export time)."""
    error = TypeError if isinstance(timeout, (str, bool)) else ValueError
    with pytest.raises(error, match="timeout"):
        configure_otlp(endpoint="http://127.0.0.1:1", timeout=timeout)  # type: ignore[arg-type]
    assert root_dispatcher.span_handlers == []


def test_a_bad_exporter_or_flag_is_refused_before_anything_starts() -> None:
    """The exporter's class where an instance belongs was taken: every export failed.
    capture_content=None failed only once the provider and its thread existed."""
    before = _otel_threads()
    with pytest.raises(TypeError, match=r"the class Silent itself: write Silent\(...\)"):
        configure_otlp(exporter=Silent)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="SpanExporter instance; got str"):
        configure_otlp(exporter="x")  # type: ignore[arg-type]
    for flag in ("capture_content", "openinference", "set_global"):
        with pytest.raises(TypeError, match=f"{flag} is True or False"):
            configure_otlp(exporter=Silent(), **{flag: None})  # type: ignore[arg-type]
    assert root_dispatcher.span_handlers == []
    assert _otel_threads() == before


class Silent(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class FailsToClose(Silent):
    def shutdown(self) -> None:
        raise RuntimeError("vendor exporter failed to close")


def test_an_exporter_failing_to_close_is_logged_and_counted(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its error went to threading.excepthook's stderr, not to logging or a counter."""
    d = get_dispatcher("tests.otel.fails_to_close")
    otlp = configure_otlp(exporter=FailsToClose(), dispatcher=d)

    @d.span
    def work() -> None:
        return None

    work()
    before = telemetry.snapshot().get("otel.shutdown_errors", 0)
    with caplog.at_level(logging.ERROR, logger="instrumentation"):
        assert otlp.shutdown() is True  # every span was exported all the same
    assert telemetry.snapshot()["otel.shutdown_errors"] - before == 1
    assert "vendor exporter failed to close" in caplog.text
    assert "Exception in thread" not in capsys.readouterr().err


class Ids(BaseEvent):
    big: int
    many: list[int]


def test_integers_beyond_int64_reach_the_collector_as_text(receiver: OTLPReceiver) -> None:
    """OTLP carries int64: the exporter dropped a larger value (logging an error only)."""
    otlp = configure_otlp(endpoint=receiver.endpoint, dispatcher=get_dispatcher("tests.otel.ids"))
    d = get_dispatcher("tests.otel.ids")

    @d.span(attributes={"order": 2**64, "small": -(2**63)})
    def work() -> None:
        d.event(Ids(big=-(2**63) - 1, many=[1, 2**70]))

    try:
        work()
    finally:
        assert otlp.shutdown() is True
    (span,) = receiver.spans
    assert span.attributes["order"] == str(2**64)  # was missing
    assert span.attributes["small"] == -(2**63)  # in range: still an int
    (event,) = span.events
    assert event.attributes["big"] == str(-(2**63) - 1)
    assert event.attributes["many"] == ("1", str(2**70))


def test_grpc_protocol_uses_the_grpc_exporter() -> None:
    """protocol='grpc' builds the gRPC exporter for the endpoint as given."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    otlp = configure_otlp(endpoint="http://127.0.0.1:4317", protocol="grpc")
    try:
        assert isinstance(otlp.exporter.inner, OTLPSpanExporter)
        assert otlp.protocol == "grpc"
    finally:
        otlp.shutdown()


@pytest.mark.parametrize(
    "endpoint", ["unix:///tmp/otel-collector.sock", "unix:relative.sock", "dns:///collector:4317"]
)
def test_grpc_target_names_are_taken_as_grpc_takes_them(endpoint: str) -> None:
    """gRPC's own target names are not URLs with a host, and the exporter takes them."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    otlp = configure_otlp(endpoint=endpoint, protocol="grpc")
    try:
        assert isinstance(otlp.exporter.inner, OTLPSpanExporter)
        assert otlp.handler in root_dispatcher.span_handlers
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
    assert time.monotonic() - started < 3  # not its 5 s
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
    assert inner[0][0] is False and inner[0][1] < 3  # not its 5 s


class Recording(SpanExporter):
    """Accepts every batch and remembers its size."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.batches.append(len(spans))
        return SpanExportResult.SUCCESS


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_keeps_its_own_accounts() -> None:
    """The SDK empties the child's copy of the queue, so the child must not count the
    parent's queued spans as its own (its shutdown said False, "gave up", for them);
    and a fork while a thread holds the accounts' lock must not hang the child's first
    span end."""
    exporter = Recording()
    otlp = configure_otlp(exporter=exporter, dispatcher=get_dispatcher("tests.otel.fork"))
    tracer = otlp.tracer_provider.get_tracer("app")
    for _ in range(10):  # queued: a batch goes out after 5 s or 512 spans
        with tracer.start_as_current_span("parent"):
            pass
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # multi-threaded fork (3.12+)
        with otlp.exporter._lock:  # as if another thread were ending a span right now
            pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        try:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(5)  # a hung child dies, and says nothing
            with tracer.start_as_current_span("child"):
                pass
            clean = otlp.shutdown(timeout_millis=2_000)
            a = otlp.exporter.accounts()
            os.write(write_end, f"{clean} {a.handed} {a.exported} {a.not_exported}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        with os.fdopen(read_end) as pipe:
            child = pipe.read()
        os.waitpid(pid, 0)
        assert child == "True 1 1 0"  # was: hung, or "False 11 1 10"
    finally:
        clean = otlp.shutdown(timeout_millis=2_000)
    assert clean is True
    assert exporter.batches == [10]
    assert otlp.exporter.accounts().handed == 10


def _flush_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "instrumentation-otel-flush"}


def test_concurrent_flushes_keep_at_most_one_thread_and_none_after_shutdown(
    silent_collector: SilentCollector,
) -> None:
    """Flushes called at once from many threads share one flush thread (the check was
    not under a lock: several were left waiting on a silent collector), and a flush
    after shutdown answers False at once instead of waiting out its timeout."""
    threads_before = _otel_threads()
    otlp = configure_otlp(
        endpoint=silent_collector.endpoint, timeout=30, dispatcher=get_dispatcher("tests.otel.ff")
    )
    with otlp.tracer_provider.get_tracer("app").start_as_current_span("unit"):
        pass
    before = _flush_threads()
    callers = 16
    barrier = threading.Barrier(callers)
    answers: list[bool] = []

    def flush() -> None:
        barrier.wait()
        for _ in range(2):
            answers.append(otlp.force_flush(200))

    threads = [threading.Thread(target=flush) for _ in range(callers)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        flushing = _flush_threads() - before
        assert answers == [False] * 2 * callers
        assert len(flushing) <= 1  # none where the SDK's own flush kept its timeout
    finally:
        assert otlp.shutdown(timeout_millis=300) is False
    started = time.monotonic()
    assert otlp.force_flush(10_000) is False
    # At once (with room for a loaded machine): it was 10 s, joining the stuck flush.
    assert time.monotonic() - started < 3
    assert _flush_threads() - before == flushing  # and it started no other
    silent_collector.close()  # the stuck export now fails
    _assert_stopped(_otel_threads() - threads_before)  # the flush, shutdown, batch threads


class FailsFirst(SpanExporter):
    """Refuses the first batch, accepts the others."""

    def __init__(self) -> None:
        self.calls = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.calls += 1
        return SpanExportResult.FAILURE if self.calls == 1 else SpanExportResult.SUCCESS


def test_shutdown_answers_for_every_span_handed_not_only_its_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """shutdown() is True only when every span handed over was exported: a batch that
    failed before shutdown makes it False too (it said True), and its warning says so."""
    otlp = configure_otlp(exporter=FailsFirst(), dispatcher=get_dispatcher("tests.otel.f1"))
    tracer = otlp.tracer_provider.get_tracer("app")
    for _ in range(5):
        with tracer.start_as_current_span("lost"):
            pass
    try:
        assert otlp.force_flush(2_000) is False
        for _ in range(5):
            with tracer.start_as_current_span("sent"):
                pass
        caplog.set_level(logging.WARNING, logger="instrumentation.otel")
    finally:
        clean = otlp.shutdown(timeout_millis=2_000)
    assert clean is False  # was True
    accounts = otlp.exporter.accounts()
    assert (accounts.handed, accounts.exported, accounts.failed) == (10, 5, 5)
    assert accounts.not_exported == 5 and accounts.unconfirmed == 0
    assert any(
        "5 of 10 spans handed to the exporter were not exported (5 failed to export)" in m
        for m in caplog.messages
    ), caplog.messages


def test_an_interrupted_shutdown_still_counts_and_warns(
    silent_collector: SilentCollector,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C while shutdown waits on a silent collector: the spans not confirmed are
    counted and a warning logged before the KeyboardInterrupt goes on (nothing settled
    them before, not even at exit: the exit hook was already gone)."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")  # exported at shutdown only
    threads_before = _otel_threads()
    # The exporter's own timeout bounds the export the interrupted shutdown leaves behind;
    # long enough that a Ctrl-C thread slow to wake on a loaded machine still lands
    # while shutdown waits (at 3 s the test failed now and then on a busy machine).
    otlp = configure_otlp(
        endpoint=silent_collector.endpoint, timeout=6, dispatcher=get_dispatcher("tests.otel.int")
    )
    tracer = otlp.tracer_provider.get_tracer("app")
    for _ in range(100):
        with tracer.start_as_current_span("unit"):
            pass
    caplog.set_level(logging.WARNING, logger="instrumentation.otel")
    main = threading.main_thread().ident
    assert main == threading.get_ident()
    interrupted_while_waiting: list[bool] = []

    def ctrl_c() -> None:
        # The batch reaches the collector only once shutdown() has begun (and it cannot
        # end before the exporter's 6 s): Ctrl-C then, while it waits.
        if silent_collector.connected.wait(5) and not otlp._shut_down.is_set():
            interrupted_while_waiting.append(True)
            signal.pthread_kill(main, signal.SIGINT)

    sender = threading.Thread(target=ctrl_c, name="ctrl-c")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        sender.start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            otlp.shutdown(timeout_millis=10_000)
        # At the interrupt, not after its 10 s.
        assert time.monotonic() - started < 8
    finally:
        sender.join()
        signal.signal(signal.SIGINT, previous)
        otlp.shutdown(timeout_millis=100)  # idempotent; detaches if the test failed early
    assert interrupted_while_waiting == [True]
    assert telemetry.counter("otel.spans_not_exported").value == 100  # was 0
    assert otlp.exporter.accounts().unconfirmed == 100
    assert any(
        "OTLP shutdown interrupted after" in m
        and "100 of 100 spans handed to the exporter were not exported" in m
        for m in caplog.messages
    ), caplog.messages
    assert otlp.shutdown(timeout_millis=5_000) is False  # at once
    silent_collector.close()
    # The abandoned export fails within the exporter's timeout; then every thread ends.
    _assert_stopped(_otel_threads() - threads_before)
    assert telemetry.counter("otel.spans_not_exported").value == 100  # not counted twice


class Blocking(SpanExporter):
    """Holds the first batch until released; accepts every batch."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        self.release.wait(10)
        self.exported += len(spans)
        return SpanExportResult.SUCCESS


def test_spans_dropped_by_a_full_queue_are_counted_as_dropped_not_blamed_on_the_timeout(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A span that finds the batch queue full is counted at once, as dropped; shutdown's
    warning says so, with the time it took, instead of "gave up after <timeout>" for a
    shutdown that took a few milliseconds."""
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "10")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "5")
    exporter = Blocking()
    threads_before = _otel_threads()
    otlp = configure_otlp(exporter=exporter, dispatcher=get_dispatcher("tests.otel.full"))
    tracer = otlp.tracer_provider.get_tracer("app")
    caplog.set_level(logging.WARNING, logger="instrumentation.otel")
    try:
        for _ in range(5):  # a full batch: the worker takes it and blocks in export
            with tracer.start_as_current_span("first"):
                pass
        assert exporter.entered.wait(5)
        for _ in range(20):  # 10 fit in the queue, 10 are dropped
            with tracer.start_as_current_span("more"):
                pass
        assert telemetry.counter("otel.spans_dropped").value == 10  # was 0: not counted
        assert telemetry.counter("otel.spans_not_exported").value == 10
        assert otlp.exporter.dropped == 10
        full = [m for m in caplog.messages if "queue is full (10 spans)" in m]
        assert len(full) == 1  # the first drop, once
    finally:
        exporter.release.set()
        started = time.monotonic()
        clean = otlp.shutdown(timeout_millis=5_000)
    assert clean is False
    assert time.monotonic() - started < 3  # not its 5 s (with room for a loaded machine)
    _assert_stopped(_otel_threads() - threads_before)
    assert exporter.exported == 15
    accounts = otlp.exporter.accounts()
    assert (accounts.handed, accounts.exported, accounts.not_exported) == (25, 15, 10)
    assert accounts.unconfirmed == 0
    (summary,) = [m for m in caplog.messages if m.startswith("OTLP shutdown")]
    assert "10 of 25 spans handed to the exporter were not exported" in summary
    assert "(10 dropped because the batch queue was full)" in summary
    assert "timeout" not in summary
    took_ms = int(summary.split(" after ")[1].split(" ms")[0])
    assert took_ms < 3_000


def test_a_signal_handler_ending_a_span_and_shutting_down_inside_on_end_does_not_hang() -> None:
    """A SIGTERM handler runs in the thread it interrupts, maybe inside on_end while the
    accounts' lock is held: ending a span and shutting down from there must not
    deadlock. The export then has to wait for the lock, so shutdown gives up in its
    time, and the accounts stay whole."""
    exporter = Recording()
    threads_before = _otel_threads()
    otlp = configure_otlp(exporter=exporter, dispatcher=get_dispatcher("tests.otel.sig"))
    tracer = otlp.tracer_provider.get_tracer("app")
    answers: list[bool] = []

    def interrupted_on_end() -> None:
        with otlp.exporter._lock:  # where on_end was when the signal came
            with tracer.start_as_current_span("in the handler"):
                pass
            answers.append(otlp.shutdown(timeout_millis=300))

    thread = threading.Thread(target=interrupted_on_end, daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive(), "deadlocked"
    assert answers == [False]
    accounts = otlp.exporter.accounts()
    assert (accounts.handed, accounts.not_exported, accounts.unconfirmed) == (1, 1, 1)
    # The export, free to go on once the lock is released, ends; then the batch
    # processor's thread and the shutdown's.
    _assert_stopped(_otel_threads() - threads_before)
    assert exporter.batches == [1]
    assert otlp.exporter.accounts().exported_late == 1


class AlwaysFails(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.FAILURE


def test_failures_and_spans_ended_after_shutdown_are_each_warned_about_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first failed batch and the first span ended after shutdown each get one
    warning (read off the accounts themselves); every one of them is counted."""
    otlp = configure_otlp(exporter=AlwaysFails(), dispatcher=get_dispatcher("tests.otel.once"))
    tracer = otlp.tracer_provider.get_tracer("app")
    caplog.set_level(logging.WARNING, logger="instrumentation.otel")
    for _ in range(3):
        with tracer.start_as_current_span("lost"):
            pass
        assert otlp.force_flush(2_000) is False
    assert otlp.shutdown(timeout_millis=2_000) is False
    for _ in range(2):
        with tracer.start_as_current_span("late"):
            pass
    accounts = otlp.exporter.accounts()
    assert (accounts.failed, accounts.refused) == (3, 2)
    failed = [m for m in caplog.messages if "were not exported (the collector failed" in m]
    late = [m for m in caplog.messages if "ended after the OTLP exporter began" in m]
    assert (len(failed), len(late)) == (1, 1), caplog.messages
