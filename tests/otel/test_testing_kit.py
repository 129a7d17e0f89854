"""The test kit puts back OpenTelemetry's context too: a restored trace never leaks
from one test into the next."""

from __future__ import annotations

import contextvars
import subprocess
import sys
import textwrap

from opentelemetry import trace as trace_api

from instrumentation.testing import isolated

from .conftest import Traced, hex_trace

TRACE_HEX, PARENT_HEX = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
REMOTE = {"traceparent": f"00-{TRACE_HEX}-{PARENT_HEX}-01"}


def test_a_restore_inside_the_block_is_undone_in_opentelemetry_too(traced: Traced) -> None:
    d = traced.dispatcher

    @d.span
    def work() -> None:
        pass

    def a_test_run() -> None:
        with traced.tracer.start_as_current_span("fixture") as outer:
            with isolated():
                d.restore_propagation_context(REMOTE)
                assert trace_api.get_current_span() is not outer
            assert trace_api.get_current_span() is outer
        with isolated():
            d.restore_propagation_context(REMOTE)
        assert not trace_api.get_current_span().get_span_context().is_valid
        work()

    contextvars.Context().run(a_test_run)
    (after,) = (s for s in traced.spans() if s.name.endswith(".work"))
    assert hex_trace(after) != TRACE_HEX and after.parent is None


def test_a_bridge_first_used_inside_the_block_is_undone_too() -> None:
    """OpenTelemetry's handler imported and used only inside the block."""
    script = textwrap.dedent(
        f"""
        from instrumentation import get_dispatcher
        from instrumentation.testing import isolated

        d = get_dispatcher("kit")
        with isolated():
            from opentelemetry import trace as trace_api
            from opentelemetry.sdk.trace import TracerProvider
            from instrumentation.otel import OpenTelemetrySpanHandler

            handler = OpenTelemetrySpanHandler(tracer_provider=TracerProvider())
            d.add_span_handler(handler)
            d.restore_propagation_context({REMOTE!r})
            assert trace_api.get_current_span().get_span_context().is_valid
        assert not trace_api.get_current_span().get_span_context().is_valid
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
