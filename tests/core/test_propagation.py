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

from instrumentation import Dispatcher, current_span, get_dispatcher, instrument_tags
from instrumentation.context import (
    current_tags,
    format_traceparent,
    parse_traceparent,
    span_hex_of,
)

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
