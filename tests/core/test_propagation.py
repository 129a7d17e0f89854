"""capture_propagation_context()/restore_propagation_context() carry a trace through JSON and
across processes.
"""

from __future__ import annotations

import contextvars
import json
import re
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from instrumentation import Dispatcher, current_span, get_dispatcher, instrument_tags, telemetry
from instrumentation.context import (
    current_tags,
    format_traceparent,
    parse_traceparent,
    span_hex_of,
)
from instrumentation.testing import isolated

from ._support import Recorder, fresh


@pytest.fixture
def d() -> Dispatcher:
    return get_dispatcher(fresh())


@pytest.fixture
def rec(d: Dispatcher) -> Recorder:
    r = Recorder()
    d.add_span_handler(r)
    return r


def test_round_trip_through_json(d: Dispatcher, rec: Recorder) -> None:
    """A captured context survives json dumps/loads and, restored in an empty context, parents new
    spans with the tags.
    """
    captured: dict[str, Any] = {}

    @d.span
    def producer() -> None:
        with instrument_tags({"tenant": "acme"}):
            captured.update(json.loads(json.dumps(d.capture_propagation_context())))

    @d.span
    def consumer() -> None:
        return None

    producer()
    p = rec.one(producer.__qualname__)
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", captured["traceparent"])
    assert captured["traceparent"] == format_traceparent(p.trace_id or "", span_hex_of(p.id_))
    assert captured["instrument_tags"] == {"tenant": "acme"}

    def elsewhere() -> None:
        assert current_span() is None
        d.restore_propagation_context(captured)
        consumer()

    contextvars.Context().run(elsewhere)
    c = rec.one(consumer.__qualname__)
    assert c.parent_id == p.id_ and c.trace_id == p.trace_id and c.tags == {"tenant": "acme"}


def test_capture_outside_any_span_says_so_and_restoring_it_clears(
    d: Dispatcher, rec: Recorder
) -> None:
    """A context captured outside any span, without tags, says so; restoring it where a
    span and tags are current (a queue consumer that restored the previous message's
    context, say) leaves neither current. An empty dict changes nothing, as in LlamaIndex.
    """
    ctx = d.capture_propagation_context()
    # traceparent is there too, as None: the docs' ctx["traceparent"] never a KeyError.
    assert ctx == {"traceparent": None, "active_span_id": None, "instrument_tags": {}}
    json.dumps(ctx)

    def consumer() -> None:
        with instrument_tags({"tenant": "acme"}), d.span("previous message"):
            d.restore_propagation_context({})
            assert current_span() is not None and current_tags() == {"tenant": "acme"}
            d.restore_propagation_context(ctx)
            assert current_span() is None and current_tags() == {}

    contextvars.Context().run(consumer)


def test_traceparent_from_another_system(d: Dispatcher, rec: Recorder) -> None:
    """A bare W3C traceparent (no span id of ours) still continues the trace with its span id as
    parent.
    """
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

    @d.span
    def handler() -> None:
        return None

    def run() -> None:
        d.restore_propagation_context({"traceparent": tp})
        handler()

    contextvars.Context().run(run)
    r = rec.one(handler.__qualname__)
    assert r.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736" and r.parent_id == "00f067aa0ba902b7"


def test_bad_contexts_are_refused(d: Dispatcher) -> None:
    """Restoring a non-mapping, a malformed traceparent or non-mapping tags raises
    TypeError/ValueError.
    """
    with pytest.raises(TypeError, match="capture_propagation_context"):
        d.restore_propagation_context("00-abc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="traceparent"):
        contextvars.Context().run(d.restore_propagation_context, {"traceparent": "junk"})
    with pytest.raises(ValueError, match="all-zero"):
        parse_traceparent("00-" + "0" * 32 + "-00f067aa0ba902b7-01")
    with pytest.raises(TypeError, match="mapping"):
        contextvars.Context().run(d.restore_propagation_context, {"instrument_tags": [1, 2]})
    assert parse_traceparent(format_traceparent("a" * 32, "b" * 16, sampled=False)) == (
        "a" * 32,
        "b" * 16,
        False,
    )


def test_a_refused_context_changes_nothing(d: Dispatcher, rec: Recorder) -> None:
    """A context refused for bad tags leaves the current span as it was, and the span
    handlers are not asked to restore it.
    """
    with d.span("mine") as block:
        with pytest.raises(TypeError, match="mapping"):
            d.restore_propagation_context(
                {"traceparent": f"00-{'a' * 32}-{'b' * 16}-01", "instrument_tags": ["x"]}
            )
        current = current_span()
        assert current is not None and current.id_ == block.id_


CHILD = textwrap.dedent(
    """
    import json, sys
    from instrumentation import SimpleSpanHandler, get_dispatcher

    d = get_dispatcher("child.proc")
    h = SimpleSpanHandler()
    d.add_span_handler(h)

    @d.span
    def remote_work():
        return None

    d.restore_propagation_context(json.loads(sys.stdin.read()))
    remote_work()
    (span,) = h.completed_spans
    print(json.dumps({"parent_id": span.parent_id, "trace_id": span.trace_id, "tags": span.tags}))
    """
)


def test_round_trip_across_a_subprocess(d: Dispatcher, rec: Recorder) -> None:
    """A context captured here and sent as JSON to a real child process parents its span."""
    out: dict[str, Any] = {}

    @d.span
    def parent() -> None:
        with instrument_tags({"job": 7}):
            payload = json.dumps(d.capture_propagation_context())
        done = subprocess.run(
            [sys.executable, "-c", CHILD], input=payload, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        out.update(json.loads(done.stdout))

    parent()
    p = rec.one(parent.__qualname__)
    assert out == {"parent_id": p.id_, "trace_id": p.trace_id, "tags": {"job": 7}}


# -- W3C Trace Context: versions, flags, tracestate, baggage ------------------------------

TRACE_HEX, PARENT_HEX = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACESTATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
BAGGAGE = "userId=alice,serverNode=DF%2028;shard=3, isProduction=false"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"01-{TRACE_HEX}-{PARENT_HEX}-01", (TRACE_HEX, PARENT_HEX, True)),
        (f"cc-{TRACE_HEX}-{PARENT_HEX}-00-what-the-future-holds", (TRACE_HEX, PARENT_HEX, False)),
        (f"fe-{TRACE_HEX}-{PARENT_HEX}-09-", (TRACE_HEX, PARENT_HEX, True)),
    ],
)
def test_a_higher_traceparent_version_is_read_by_its_first_four_fields(
    value: str, expected: tuple[str, str, bool]
) -> None:
    """W3C: a version above 00 is parsed as 00 is, when the flags end the string or are
    followed by '-' (its own fields, not read). It used to be refused."""
    assert parse_traceparent(value) == expected


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (f"ff-{TRACE_HEX}-{PARENT_HEX}-01", "version ff"),
        (f"01-{TRACE_HEX}-{PARENT_HEX}-01x", "not a W3C traceparent"),
        (f"01-{TRACE_HEX}-{PARENT_HEX}-1", "not a W3C traceparent"),
        (f"00-{TRACE_HEX}-{PARENT_HEX}-01-", "exactly four fields"),
        (f"00-{TRACE_HEX}-{PARENT_HEX}-01-extra", "exactly four fields"),
        (f"00-{TRACE_HEX.upper()}-{PARENT_HEX}-01", "lowercase"),
        (f"0-{TRACE_HEX}-{PARENT_HEX}-01", "not a W3C traceparent"),
        (f"01-{'0' * 32}-{PARENT_HEX}-01", "all-zero"),
        (f"01-{TRACE_HEX}-{PARENT_HEX}-01-" + "x" * 500, "longer than 512"),
    ],
)
def test_malformed_traceparents_are_still_refused(value: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_traceparent(value)


def test_a_higher_version_continues_the_trace_and_is_sent_on_as_version_00(
    d: Dispatcher, rec: Recorder
) -> None:
    sent: list[str] = []

    @d.span
    def handler() -> None:
        sent.append(d.capture_propagation_context()["traceparent"])

    def run() -> None:
        d.restore_propagation_context({"traceparent": f"01-{TRACE_HEX}-{PARENT_HEX}-01-beyond"})
        handler()

    contextvars.Context().run(run)
    r = rec.one(handler.__qualname__)
    assert r.trace_id == TRACE_HEX and r.parent_id == PARENT_HEX
    assert sent == [f"00-{TRACE_HEX}-{span_hex_of(r.id_)}-01"]


@pytest.mark.parametrize(
    ("received", "sent"),
    [("00", "00"), ("01", "01"), ("02", "02"), ("03", "03"), ("ff", "03"), ("fc", "00")],
)
def test_the_flags_received_are_sent_on(
    d: Dispatcher, rec: Recorder, received: str, sent: str
) -> None:
    """A hop without OpenTelemetry keeps the sender's sampling decision (a restored
    ``-00`` was sent on as ``-01``) and its random-trace-id bit (W3C level 2); the
    reserved bits, which W3C asks to send as zero, are not forwarded."""
    onward: list[str] = []

    @d.span
    def hop() -> None:
        onward.append(d.capture_propagation_context()["traceparent"])

    def run() -> None:
        d.restore_propagation_context({"traceparent": f"00-{TRACE_HEX}-{PARENT_HEX}-{received}"})
        hop()
        onward.append(d.capture_propagation_context()["traceparent"])  # the parent itself

    contextvars.Context().run(run)
    r = rec.one(hop.__qualname__)
    assert onward == [
        f"00-{TRACE_HEX}-{span_hex_of(r.id_)}-{sent}",
        f"00-{TRACE_HEX}-{PARENT_HEX}-{sent}",
    ]
    assert format_traceparent("a" * 32, "b" * 16, False, flags=0xFF).endswith("-02")


def test_tracestate_and_baggage_cross_a_hop_unchanged(d: Dispatcher, rec: Recorder) -> None:
    """Received with the traceparent, sent on (as JSON-able strings) by every span of the
    trace in this context, as they came: a hop without OpenTelemetry used to lose them."""
    incoming = {
        "traceparent": f"00-{TRACE_HEX}-{PARENT_HEX}-01",
        "tracestate": TRACESTATE,
        "baggage": BAGGAGE,
    }
    onward: list[dict[str, Any]] = []

    @d.span
    def hop() -> None:
        onward.append(json.loads(json.dumps(d.capture_propagation_context())))

    @d.span
    def next_hop() -> None:
        onward.append(d.capture_propagation_context())

    def first() -> None:
        d.restore_propagation_context(incoming)
        hop()

    def second() -> None:
        d.restore_propagation_context(onward[0])
        next_hop()

    contextvars.Context().run(first)
    contextvars.Context().run(second)
    for sent in onward:
        assert sent["traceparent"].startswith(f"00-{TRACE_HEX}-")
        assert sent["tracestate"] == TRACESTATE and sent["baggage"] == BAGGAGE
    assert rec.one(next_hop.__qualname__).parent_id == rec.one(hop.__qualname__).id_


def test_without_tracestate_and_baggage_nothing_changes(d: Dispatcher, rec: Recorder) -> None:
    """No such keys received, none sent (the dict is what it always was, as LlamaIndex
    has it); restoring a context without them takes back those an earlier restore
    received (a queue consumer's previous message); a new trace does not get the
    restored trace's tracestate, and baggage stays with the context."""
    seen: dict[str, dict[str, Any]] = {}

    @d.span
    def work(label: str) -> None:
        seen[label] = d.capture_propagation_context()

    def consumer() -> None:
        d.restore_propagation_context({"traceparent": f"00-{TRACE_HEX}-{PARENT_HEX}-01"})
        work("plain")
        d.restore_propagation_context(
            {
                "traceparent": f"00-{TRACE_HEX}-{PARENT_HEX}-01",
                "tracestate": TRACESTATE,
                "baggage": BAGGAGE,
            }
        )
        d.restore_propagation_context({"instrument_tags": {"a": 1}})  # keeps them
        work("full")
        d.restore_propagation_context({"traceparent": None, "baggage": BAGGAGE})
        work("new trace")
        d.restore_propagation_context({"traceparent": f"00-{TRACE_HEX}-{PARENT_HEX}-01"})
        work("next message")

    contextvars.Context().run(consumer)
    assert set(seen["plain"]) == {"traceparent", "active_span_id", "instrument_tags"}
    assert seen["full"]["tracestate"] == TRACESTATE and seen["full"]["baggage"] == BAGGAGE
    assert "tracestate" not in seen["new trace"] and seen["new trace"]["baggage"] == BAGGAGE
    assert not seen["new trace"]["traceparent"].startswith(f"00-{TRACE_HEX}")
    assert set(seen["next message"]) == {"traceparent", "active_span_id", "instrument_tags"}


def test_baggage_without_span_keys_replaces_only_the_baggage(d: Dispatcher, rec: Recorder) -> None:
    """W3C Baggage does not need a trace: a dict with ``baggage`` and no span key (the
    headers of a caller that only sets baggage) used to be ignored. Its baggage is
    restored; the span, its flags and tracestate, and the tags stay; the entries do
    not become tags."""
    seen: dict[str, dict[str, Any]] = {}

    @d.span
    def work(label: str) -> None:
        seen[label] = d.capture_propagation_context()

    def consumer() -> None:
        d.restore_propagation_context({"baggage": "tenant=acme"})
        seen["no span"] = d.capture_propagation_context()
        d.restore_propagation_context(
            {
                "traceparent": f"00-{TRACE_HEX}-{PARENT_HEX}-00",
                "tracestate": TRACESTATE,
                "instrument_tags": {"a": 1},
            }
        )
        d.restore_propagation_context({"baggage": BAGGAGE})
        work("in the trace")
        d.restore_propagation_context({"baggage": ""})
        work("cleared")

    contextvars.Context().run(consumer)
    assert seen["no span"] == {
        "traceparent": None,
        "active_span_id": None,
        "instrument_tags": {},
        "baggage": "tenant=acme",
    }
    sent = seen["in the trace"]
    assert sent["traceparent"].startswith(f"00-{TRACE_HEX}-") and sent["traceparent"].endswith(
        "-00"
    )
    assert sent["tracestate"] == TRACESTATE and sent["baggage"] == BAGGAGE
    assert sent["instrument_tags"] == {"a": 1}
    assert "baggage" not in seen["cleared"] and seen["cleared"]["tracestate"] == TRACESTATE
    assert [r.parent_id for r in rec.named(work.__qualname__)] == [PARENT_HEX, PARENT_HEX]


def test_bad_tracestate_and_baggage(d: Dispatcher, rec: Recorder) -> None:
    """A non-string is refused (TypeError saying what to pass), before anything changes.
    A malformed tracestate is dropped whole and the traceparent beside it still restored
    (W3C); malformed baggage members are left out, the others kept. Both counted."""
    for key in ("tracestate", "baggage"):
        with pytest.raises(TypeError, match=f"{key} must be a string .*header"):
            contextvars.Context().run(
                d.restore_propagation_context,
                {"traceparent": f"00-{TRACE_HEX}-{PARENT_HEX}-01", key: {"congo": "x"}},
            )
    seen: list[dict[str, Any]] = []

    @d.span
    def work() -> None:
        seen.append(d.capture_propagation_context())

    def run(tracestate: str, baggage: str) -> None:
        d.restore_propagation_context(
            {
                "traceparent": f"00-{TRACE_HEX}-{PARENT_HEX}-01",
                "tracestate": tracestate,
                "baggage": baggage,
            }
        )
        work()

    dropped = telemetry.counter("propagation.entries_dropped").value
    contextvars.Context().run(run, "congo=ok,Upper=no", 'a=1,b="quoted",c=3\r\nInjected: x')
    contextvars.Context().run(run, "a=1,a=2", "")
    contextvars.Context().run(run, ",".join(f"k{i}=v" for i in range(33)), "ümlaut=1")
    assert [s.get("tracestate") for s in seen] == [None, None, None]
    assert [s.get("baggage") for s in seen] == ["a=1", None, None]
    assert all(s["traceparent"].startswith(f"00-{TRACE_HEX}-") for s in seen)
    assert telemetry.counter("propagation.entries_dropped").value - dropped == 2 + 2 + 2 + 33 + 1


def test_the_test_kit_puts_back_what_a_restore_received(d: Dispatcher, rec: Recorder) -> None:
    def run() -> None:
        with isolated():
            d.restore_propagation_context(
                {"traceparent": f"00-{TRACE_HEX}-{PARENT_HEX}-00", "baggage": BAGGAGE}
            )
        assert d.capture_propagation_context() == {
            "traceparent": None,
            "active_span_id": None,
            "instrument_tags": {},
        }

    contextvars.Context().run(run)
