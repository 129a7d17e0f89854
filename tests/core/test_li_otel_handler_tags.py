"""LlamaIndex's own OpenTelemetry integration (llama-index-observability-otel) writes a
``_otel_traceparent`` into the ``tags`` its ``new_span`` receives, for every root span.
Outside an ``instrument_tags`` block those tags are the shared read-only empty dict: the
write raised, every root span was lost to the handler and an error was logged for each.
``new_span`` now gets an empty dict of its own there (writes stay with that one span);
an override of ``span_enter`` still gets the read-only one."""

from __future__ import annotations

import inspect
from typing import Any, Optional

import instrumentation as instrument
from instrumentation import instrument_tags, telemetry
from instrumentation.context import current_tags
from instrumentation.span import SimpleSpan
from instrumentation.span_handlers import SimpleSpanHandler

from ._support import fresh


class TraceparentWriter(SimpleSpanHandler):
    """The shape of OTelCompatibleSpanHandler.new_span: super(), then tag the root spans."""

    seen_tags: list[dict[str, Any]] = []

    def new_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Optional[Any] = None,
        parent_span_id: Optional[str] = None,
        tags: Optional[dict[str, Any]] = None,
        **kwargs: Any,
    ) -> Optional[SimpleSpan]:
        span = super().new_span(id_, bound_args, instance, parent_span_id, tags, **kwargs)
        self.seen_tags.append(dict(tags or {}))
        if parent_span_id is None and tags is not None:
            tags["_otel_traceparent"] = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
        return span


def test_new_span_may_write_into_its_tags_outside_any_block() -> None:
    handler = TraceparentWriter(seen_tags=[])
    d = instrument.get_dispatcher(fresh())
    d.add_span_handler(handler)

    @d.span
    def child() -> None:
        return None

    @d.span
    def root() -> None:
        child()

    root()
    root()
    assert telemetry.handler_errors() == {}
    assert [s.name for s in handler.completed_spans] == [
        child.__qualname__,
        root.__qualname__,
    ] * 2
    # each span's tags are its own: nothing leaks to the next span or to the context
    assert handler.seen_tags == [{}, {}, {}, {}]
    assert dict(current_tags()) == {}

    with instrument_tags({"user": "u1"}):
        root()
    assert handler.seen_tags[-2] == {"user": "u1"}
    assert telemetry.handler_errors() == {}
