"""Handlers ported from db-ally as its users wrote them.

db-ally's own handlers (CLI, LangSmith, OpenTelemetry) read ``RequestStart.collection_name``,
and db-ally calls ``event_end`` and ``request_end`` with ``request_context=`` and
``event_context=`` by keyword, so a handler whose parameters are in another order
works there. Here the runner passes them by position: such a handler would get its
contexts swapped, silently when they have the same type.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import pytest

from instrumentation import audit, get_dispatcher
from instrumentation.audit import Event, EventHandler, RequestEnd, RequestStart, ToolCallEvent
from instrumentation.llms import OfflineLLM

Span = dict[str, Any]


class NamesItsRun(EventHandler[str, None]):
    """db-ally's LangSmith and OpenTelemetry handlers name the run after the collection."""

    def __init__(self) -> None:
        self.names: list[str] = []

    async def request_start(self, user_request: RequestStart) -> str:
        return f"{user_request.collection_name} by tester"

    async def event_start(self, event: Event, request_context: str) -> None:
        pass

    async def event_end(
        self, event: Event | None, request_context: str, event_context: None
    ) -> None:
        pass

    async def request_end(self, output: RequestEnd, request_context: str) -> None:
        self.names.append(request_context)


def test_request_start_has_db_allys_collection_name() -> None:
    handler = NamesItsRun()
    with audit.request(question="Who?", collection="recruitment", handlers=[handler]) as req:
        req.result = "nobody"
    assert req.errors == []
    assert handler.names == ["recruitment by tester"]
    start = RequestStart(question="q", collection="c")
    assert start.collection_name == "c"
    assert "collection_name" not in dataclasses.asdict(start)  # an alias, not a field


class EndsByKeyword(EventHandler[Span, Span]):
    """Parameters in the order db-ally's call site writes them: right there, swapped here."""

    async def request_start(self, user_request: RequestStart) -> Span:
        return {"kind": "request", "ended": False}

    async def event_start(self, event: Event, request_context: Span) -> Span:
        return {"kind": "event", "ended": False}

    async def event_end(  # type: ignore[override]
        self, event: Event | None, event_context: Span, request_context: Span
    ) -> None:
        event_context["ended"] = True

    async def request_end(self, output: RequestEnd, request_context: Span) -> None:
        request_context["ended"] = True


class RequestEndContextFirst(EventHandler[Any, Any]):
    def request_start(self, user_request: RequestStart) -> None:
        pass

    def event_start(self, event: Event, request_context: Any) -> None:
        pass

    def event_end(self, event: Event | None, request_context: Any, event_context: Any) -> None:
        pass

    def request_end(self, request_context: Any, output: RequestEnd) -> None:  # type: ignore[override]
        pass


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        (
            EndsByKeyword(),
            r"EndsByKeyword\.event_end\(self, event, event_context, request_context\) names its "
            r"parameters in another order .*event_context would get the request_context.*"
            r"define it as event_end\(self, event, request_context, event_context\)",
        ),
        (
            RequestEndContextFirst(),
            r"request_context would get the output.*request_end\(self, output, request_context\)",
        ),
    ],
)
def test_context_parameters_in_another_order_are_refused(handler: Any, expected: str) -> None:
    with pytest.raises(TypeError, match=expected):
        audit.request(question="q", handlers=[handler])
    with pytest.raises(TypeError, match=expected):
        audit.attach(get_dispatcher("tests.audit.dbally_port"), [handler])


class OldDbAlly(EventHandler[Any, Any]):
    """db-ally 0.1's base class: contexts optional, with defaults; other names are fine."""

    def __init__(self) -> None:
        self.ended: list[Any] = []

    async def request_start(self, user_request: RequestStart) -> dict[str, int]:
        return {"events": 0}

    async def event_start(self, event: Event, request_context: dict[str, int] | None = None) -> str:
        assert request_context is not None
        request_context["events"] += 1
        return "event ctx"

    async def event_end(
        self, event: Event | None, request_context: Any = None, event_context: Any = None
    ) -> None:
        self.ended.append(event_context)

    async def request_end(self, output: RequestEnd, ctx: Any = None) -> None:
        self.ended.append(ctx)


def test_db_allys_optional_contexts_and_other_names_still_run() -> None:
    handler = OldDbAlly()
    with audit.request(question="q", handlers=[handler]) as req:
        OfflineLLM().chat("hi")
    assert req.errors == []
    assert handler.ended == ["event ctx", {"events": 1}]


def _passing_through(method: Any) -> Any:
    """A decorator as logging and retrying ones are written: it takes whatever comes
    (``*args, **kwargs``) and passes it on as it came."""

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        return method(*args, **kwargs)

    return call


class DecoratedEndsByKeyword(EndsByKeyword):
    event_end = _passing_through(EndsByKeyword.event_end)  # type: ignore[assignment]


class DecoratedRequestEndContextFirst(RequestEndContextFirst):
    request_end = _passing_through(RequestEndContextFirst.request_end)  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        (DecoratedEndsByKeyword(), r"event_context would get the request_context"),
        (DecoratedRequestEndContextFirst(), r"request_context would get the output"),
    ],
)
def test_a_decorator_passing_the_arguments_through_hides_no_other_order(
    handler: Any, expected: str
) -> None:
    """A ``*args`` wrapper says nothing of the order: the function it wraps gets the
    arguments by position. It was taken for a decorator adding an argument of its own,
    and the handler was accepted, its two contexts swapped at every event_end."""
    with pytest.raises(TypeError, match=expected):
        audit.request(question="q", handlers=[handler])
    with pytest.raises(TypeError, match=expected):
        audit.attach(get_dispatcher("tests.audit.dbally_port"), [handler])


class ReordersByName(EndsByKeyword):
    """A decorator whose own parameters are in the runner's order, passing them on by
    name: the function it wraps gets each where it belongs."""

    def __init__(self) -> None:
        self.got: list[tuple[object, object]] = []

    def _event_end(self, event: Event | None, event_context: Span, request_context: Span) -> None:
        self.got.append((event_context["kind"], request_context["kind"]))

    @functools.wraps(_event_end)
    def event_end(  # type: ignore[override]
        self, event: Event | None, request_context: Span, event_context: Span
    ) -> None:
        self._event_end(event, event_context=event_context, request_context=request_context)


def test_a_decorator_that_names_the_arguments_itself_is_judged_by_its_own_names() -> None:
    handler = ReordersByName()
    with (
        audit.request(question="q", handlers=[handler]) as req,
        audit.event(ToolCallEvent(name="t")),
    ):
        pass
    assert req.completed and req.errors == []
    assert handler.got == [("event", "request")]
