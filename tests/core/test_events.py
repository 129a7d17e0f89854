"""Events: ids, UTC timestamps, enclosing span and trace ids, tags, dumps, validation."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from instrumentation import (
    BaseEvent,
    SimpleSpanHandler,
    SpanDropEvent,
    get_dispatcher,
    instrument_tags,
)

from ._support import EventList, fresh


class OrderPlaced(BaseEvent):
    order_id: int
    amount: float = 0.0


class Renamed(BaseEvent):
    @classmethod
    def class_name(cls) -> str:
        return "CustomName"


def test_ids_are_unique_32_hex() -> None:
    """Each event gets its own 32-hex-digit id_."""
    ids = {BaseEvent().id_ for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_timestamp_is_aware_utc_and_naive_input_is_converted() -> None:
    """The default timestamp is aware UTC; a given aware or naive one is converted to UTC."""
    ev = BaseEvent()
    assert ev.timestamp.tzinfo is not None and ev.timestamp.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - ev.timestamp) < timedelta(seconds=5)
    plus2 = datetime(2024, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    assert BaseEvent(timestamp=plus2).timestamp == datetime(2024, 1, 1, 10, 0, tzinfo=timezone.utc)
    naive = datetime(2024, 1, 1, 12, 0)
    converted = BaseEvent(timestamp=naive).timestamp
    assert converted.utcoffset() == timedelta(0) and converted == naive.astimezone(timezone.utc)


def test_event_carries_enclosing_span_and_trace() -> None:
    """An event made inside a decorated call has that span's id and trace id; outside, None."""
    d = get_dispatcher(fresh())
    spans = SimpleSpanHandler()
    d.add_span_handler(spans)
    made: list[BaseEvent] = []

    @d.span
    def work() -> None:
        made.append(BaseEvent())

    outside = BaseEvent()
    work()
    (span,) = spans.completed_spans
    assert made[0].span_id == span.id_ and made[0].trace_id == span.trace_id
    assert re.fullmatch(r"[0-9a-f]{32}", made[0].trace_id or "")
    assert outside.span_id is None and outside.trace_id is None


def test_tags_are_merged_from_instrument_tags_with_own_tags_winning() -> None:
    """Dispatching merges active instrument_tags (nested blocks merge) without overriding the
    event's own tags.
    """
    d = get_dispatcher(fresh())
    h = EventList()
    d.add_event_handler(h)
    with instrument_tags({"user": "u1", "env": "test"}):
        with instrument_tags({"env": "inner", "req": 7}):
            d.event(BaseEvent(tags={"user": "mine"}))
        d.event(BaseEvent())
    d.event(BaseEvent())
    assert h.events[0].tags == {"user": "mine", "env": "inner", "req": 7}
    assert h.events[1].tags == {"user": "u1", "env": "test"}
    assert h.events[2].tags == {}


async def test_aevent_delivers_with_tags() -> None:
    """aevent() awaits each handler's ahandle and merges the active tags too."""
    d = get_dispatcher(fresh())
    h = EventList()
    d.add_event_handler(h)
    with instrument_tags({"k": 1}):
        await d.aevent(OrderPlaced(order_id=1))
    assert [e.tags for e in h.events] == [{"k": 1}]
    with pytest.raises(TypeError, match="BaseEvent"):
        await d.aevent("nope")  # type: ignore[arg-type]


def test_model_dump_includes_class_name() -> None:
    """model_dump() (and the pydantic-1 dict()) includes class_name, the subclass's own if it
    overrides it.
    """
    dumped = OrderPlaced(order_id=3, amount=2.5).model_dump()
    assert dumped["class_name"] == "OrderPlaced" and dumped["order_id"] == 3
    assert set(dumped) >= {"id_", "timestamp", "span_id", "trace_id", "tags", "class_name"}
    assert Renamed().model_dump()["class_name"] == "CustomName"
    assert Renamed().dict()["class_name"] == "CustomName"
    assert SpanDropEvent(err_str="x").class_name() == "SpanDropEvent"
    # include and exclude decide about class_name as about the fields.
    assert OrderPlaced(order_id=3).model_dump(include={"order_id"}) == {"order_id": 3}
    with_name = OrderPlaced(order_id=3).model_dump(include={"order_id", "class_name"})
    assert with_name == {"order_id": 3, "class_name": "OrderPlaced"}
    assert "class_name" not in OrderPlaced(order_id=3).model_dump(exclude={"class_name"})


def test_bad_field_values_raise_validation_error() -> None:
    """Wrong or missing field values are refused by pydantic's ValidationError."""
    with pytest.raises(ValidationError):
        OrderPlaced(order_id="not a number")
    with pytest.raises(ValidationError):
        OrderPlaced()  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        BaseEvent(timestamp="yesterday-ish")
    with pytest.raises(ValidationError):
        BaseEvent(tags=["not", "a", "dict"])
    with pytest.raises(ValidationError):
        SpanDropEvent()  # type: ignore[call-arg]


async def test_aevent_runs_the_handlers_concurrently() -> None:
    """As in LlamaIndex, ``aevent`` runs each handler's ``ahandle`` in its own task: a
    handler that waits for another's work does not hold it up, and a failing one is
    reported without stopping the rest."""
    import asyncio

    from instrumentation import telemetry
    from instrumentation.event_handlers import BaseEventHandler

    ready = asyncio.Event()
    order: list[str] = []

    class Waits(BaseEventHandler):
        async def ahandle(self, event: BaseEvent, **kwargs: Any) -> None:
            await asyncio.wait_for(ready.wait(), timeout=5)
            order.append("waited")

        def handle(self, event: BaseEvent, **kwargs: Any) -> None:  # pragma: no cover
            raise AssertionError("aevent awaits ahandle")

    class Sets(BaseEventHandler):
        async def ahandle(self, event: BaseEvent, **kwargs: Any) -> None:
            await asyncio.sleep(0)
            order.append("set")
            ready.set()

        def handle(self, event: BaseEvent, **kwargs: Any) -> None:  # pragma: no cover
            raise AssertionError("aevent awaits ahandle")

    class Fails(BaseEventHandler):
        async def ahandle(self, event: BaseEvent, **kwargs: Any) -> None:
            raise RuntimeError("broken handler")

        def handle(self, event: BaseEvent, **kwargs: Any) -> None:  # pragma: no cover
            raise AssertionError("aevent awaits ahandle")

    d = get_dispatcher(fresh())
    for handler in (Waits(), Fails(), Sets()):
        d.add_event_handler(handler)
    before = telemetry.handler_errors().get("Fails", 0)
    await d.aevent(OrderPlaced(order_id=2))
    assert order == ["set", "waited"]
    assert telemetry.handler_errors().get("Fails", 0) == before + 1


def test_aevent_runs_plain_handlers_in_place_without_tasks() -> None:
    """Handlers that keep the default ``ahandle`` (it calls ``handle``) run in order
    inside ``aevent``, with no task made: the coroutine ends at its first step, under
    any event loop or none (a sync bridge stepping it by hand)."""
    d = get_dispatcher(fresh())
    first, second = EventList(), EventList()
    d.add_event_handler(first)
    d.add_event_handler(second)
    step = d.aevent(OrderPlaced(order_id=4))
    with pytest.raises(StopIteration):
        step.send(None)
    assert len(first.events) == 1 and second.events == first.events


async def test_aevent_keeps_the_order_handlers_were_attached_in() -> None:
    """A handler with an ahandle of its own attached before a plain one is still run
    first, as event() runs them."""
    import asyncio

    from instrumentation.event_handlers import BaseEventHandler

    order: list[str] = []

    class Awaiting(BaseEventHandler):
        def handle(self, event: BaseEvent, **kwargs: Any) -> None:
            order.append("awaiting")

        async def ahandle(self, event: BaseEvent, **kwargs: Any) -> None:
            order.append("awaiting")
            await asyncio.sleep(0)

    class Plain(BaseEventHandler):
        def handle(self, event: BaseEvent, **kwargs: Any) -> None:
            order.append("plain")

    d = get_dispatcher(fresh())
    d.add_event_handler(Awaiting())
    d.add_event_handler(Plain())
    d.event(OrderPlaced(order_id=5))
    await d.aevent(OrderPlaced(order_id=6))
    assert order == ["awaiting", "plain", "awaiting", "plain"]
