"""Bad arguments are refused at once, the same way by ``audit.request()`` and
``audit.attach()``, with a plain TypeError or ValueError that says what to do."""

from __future__ import annotations

import inspect
import math
from typing import Any

import pytest

from instrumentation import audit, get_dispatcher
from instrumentation.audit import Event, EventHandler, RequestEnd, RequestStart, ToolCallEvent
from instrumentation.llms import OfflineLLM

from .helpers import SyncRecorder


@pytest.mark.parametrize("timeout", ["5", True, None, -2, math.nan, [1]])
def test_attach_checks_its_timeout_as_request_does(timeout: Any) -> None:
    d = get_dispatcher("tests.audit.arguments")
    with pytest.raises((TypeError, ValueError)) as by_request:
        audit.request(question="q", handlers=[], timeout=timeout)
    with pytest.raises((TypeError, ValueError)) as by_attach:
        audit.attach(d, [SyncRecorder()], timeout=timeout)
    assert type(by_attach.value) is type(by_request.value)  # not a pydantic ValidationError
    assert str(by_attach.value) == str(by_request.value)
    # The adapter made directly refuses them too (pydantic took "5" and True as numbers).
    with pytest.raises((TypeError, ValueError), match="timeout"):
        audit.AuditAdapter(handlers=[SyncRecorder()], timeout=timeout)


class HowToStub(EventHandler[Any, Any]):
    """db-ally's how-to's first stub: ``event_end`` without ``event_context``."""

    async def request_start(self, user_request: RequestStart) -> None:
        pass

    async def event_start(self, event: Any, request_context: Any) -> None:
        pass

    async def event_end(self, event: Any, request_context: Any) -> None:  # type: ignore[override]
        pass

    async def request_end(self, output: RequestEnd, request_context: Any) -> None:
        pass


class NoneMethods(EventHandler[Any, Any]):
    request_start = event_start = event_end = request_end = None  # type: ignore[assignment]


class PlainStartTakesNothing(SyncRecorder):
    def request_start(self) -> Any:  # type: ignore[override]
        return None


class KeywordOnly(SyncRecorder):
    def request_end(self, output: RequestEnd, *, request_context: Any) -> None:  # type: ignore[override]
        pass


class Flexible(EventHandler[Any, Any]):
    """Any signature the runner can call is fine: extra defaults, *args."""

    def request_start(self, user_request: RequestStart, extra: int = 0) -> None:
        pass

    async def event_start(self, *args: Any) -> None:
        pass

    def event_end(self, event: Any, *rest: Any, **more: Any) -> None:
        pass

    async def request_end(self, output: RequestEnd, request_context: Any = None) -> None:
        pass


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        (
            HowToStub(),
            r"HowToStub\.event_end\(self, event, request_context\) cannot be called as the "
            r"audit runner calls it: define it as "
            r"event_end\(self, event, request_context, event_context\)",
        ),
        (NoneMethods(), r"NoneMethods\.request_start is NoneType, not a method"),
        (PlainStartTakesNothing(), r"request_start\(self, user_request\)"),
        (KeywordOnly(), r"request_end\(self, output, request_context\)"),
    ],
)
def test_a_handler_method_the_runner_cannot_call_is_refused_at_registration(
    handler: Any, expected: str
) -> None:
    with pytest.raises(TypeError, match=expected):
        audit.request(question="q", handlers=[handler])
    with pytest.raises(TypeError, match=expected):
        audit.attach(get_dispatcher("tests.audit.arguments.sig"), [handler])


def test_a_method_replaced_on_the_instance_is_checked_too() -> None:
    handler = SyncRecorder()
    audit.request(question="fine", handlers=[handler])

    def event_end(event: Any, request_context: Any) -> None: ...

    handler.event_end = event_end  # type: ignore[assignment, method-assign]
    with pytest.raises(TypeError, match=r"event_end"):
        audit.request(question="q", handlers=[handler])


def test_flexible_signatures_are_accepted_and_run() -> None:
    handler = Flexible()
    with audit.request(question="q", handlers=[handler]) as req:
        OfflineLLM().chat("hi")
    assert req.completed and req.errors == []


def test_a_decorated_method_is_judged_by_what_is_called() -> None:
    """inspect.signature follows __wrapped__ to the function a decorator wraps: a
    handler dispatching events by type with functools.singledispatchmethod (or a
    decorator that passes an argument of its own) was refused, though it ran before."""
    import functools

    seen: list[str] = []

    def with_clock(method: Any) -> Any:
        @functools.wraps(method)
        def call(self: Any, *args: Any) -> Any:
            return method(self, "clock", *args)

        return call

    class ByType(SyncRecorder):
        @functools.singledispatchmethod
        def event_start(self, event: Event, request_context: Any) -> Any:
            seen.append("other")

        @event_start.register(ToolCallEvent)
        def _(self, event: ToolCallEvent, request_context: Any) -> Any:
            seen.append("tool")

        @with_clock
        def event_end(  # type: ignore[override]
            self, clock: str, event: Any, request_context: Any, event_context: Any
        ) -> None:
            seen.append(clock)

    with (
        audit.request(question="q", handlers=[ByType()]) as req,
        audit.event(ToolCallEvent(name="t")),
    ):
        pass
    assert req.errors == [] and seen == ["tool", "clock"]


def test_signatures_are_read_once_per_handler_class_not_per_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Counted(SyncRecorder):
        pass

    reads: list[object] = []
    real = inspect.signature

    def counting(obj: Any, *args: Any, **kwargs: Any) -> inspect.Signature:
        reads.append(obj)
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(inspect, "signature", counting)
    with audit.request(question="first", handlers=[Counted()]):
        pass
    assert len(reads) == 4  # the four methods, once
    for _ in range(3):
        with audit.request(question="again", handlers=[Counted(), Counted()]):
            pass
    assert len(reads) == 4

    # A classmethod is a new object at each getattr(): still found again.
    class WithClassmethod(SyncRecorder):
        @classmethod
        def request_start(cls, user_request: Any) -> Any:
            return None

    reads.clear()
    for _ in range(3):
        with audit.request(question="cm", handlers=[WithClassmethod()]):
            pass
    assert len(reads) == 4

    # A class whose method is replaced afterwards is read again.
    def event_end(self: Any, event: Any, request_context: Any) -> None: ...

    monkeypatch.setattr(Counted, "event_end", event_end)
    with pytest.raises(TypeError, match="event_context"):
        audit.request(question="changed", handlers=[Counted()])
