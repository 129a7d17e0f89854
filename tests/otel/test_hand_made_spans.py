"""LlamaIndex-style spans made by hand (``active_span_id.set``) with OpenTelemetry on."""

from __future__ import annotations

from instrumentation._spans import EMPTY_BOUND_ARGS
from instrumentation.context import active_span_id

from .conftest import Traced, hex_parent, hex_span


def test_a_call_inside_a_hand_made_span_is_its_child(traced: Traced) -> None:
    """``set`` makes the span current for the bridge too, so OTel agrees with us."""
    d = traced.dispatcher

    @d.span
    def inner() -> None:
        pass

    @d.span
    def outer() -> None:
        span_id = "manual-0123456789abcdef"
        parent = active_span_id.get()
        token = active_span_id.set(span_id)
        d.span_enter(id_=span_id, bound_args=EMPTY_BOUND_ARGS, parent_id=parent)
        try:
            inner()
        finally:
            d.span_exit(id_=span_id, bound_args=EMPTY_BOUND_ARGS)
            active_span_id.reset(token)
        assert active_span_id.get() == parent

    outer()
    spans = {s.name.rpartition(".")[2]: s for s in traced.spans()}
    manual = spans["manual"]
    assert hex_parent(spans["inner"]) == hex_span(manual)
    assert hex_parent(manual) == hex_span(spans["outer"])
