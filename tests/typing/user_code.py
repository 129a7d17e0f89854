"""What a user's type checker sees: checked by ``make typecheck`` (``mypy --strict``
with ``tests/typing/mypy.ini``, without the pydantic plugin, as pyright users and
many mypy users run it). Never imported by pytest.

``assert_type`` fails the check when the library's annotations drift to ``Any`` or
to another type; each ``# type: ignore[code]`` marks user code that must stay an
error (``warn_unused_ignores`` fails the check when it is accepted).
"""

from __future__ import annotations

import inspect
import io
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from typing import Any

from typing_extensions import assert_type

import instrumentation as instrument
from instrumentation import ContextThreadPoolExecutor, audit, storage
from instrumentation.event_handlers import BaseEventHandler
from instrumentation.events import BaseEvent
from instrumentation.llms import LLM_END_EVENTS, ChatMessage, MessageRole, TokenUsage
from instrumentation.otel import configure_otlp
from instrumentation.span import SimpleSpan
from instrumentation.span_handlers import SimpleSpanHandler
from instrumentation.testing import Capture, capture_events, capture_spans

d = instrument.get_dispatcher(__name__)


# -- @dispatcher.span keeps the signature --------------------------------------------


@d.span
def add(x: int, y: int = 1) -> int:
    return x + y


@d.span
async def aadd(x: int) -> int:
    return x


@d.span
def numbers(n: int) -> Iterator[int]:
    yield from range(n)


@d.span
async def anumbers(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


class Service:
    @d.span
    def method(self, x: int) -> str:
        return str(x)


def plain(x: int) -> int:
    return x


assert_type(add(1), int)


async def use_aadd() -> None:
    assert_type(await aadd(1), int)


assert_type(numbers(3), Iterator[int])
assert_type(anumbers(3), AsyncIterator[int])
assert_type(Service().method(1), str)
assert_type(d.span(plain, name="custom")(1), int)
d.span(plain, name="custom")("x")  # type: ignore[arg-type]
add("one")  # type: ignore[arg-type]


# -- spans read back are spans, not Any ----------------------------------------------

handler = SimpleSpanHandler()
assert_type(handler.completed_spans[-1], SimpleSpan)
assert_type(handler.completed_spans[-2:], list[SimpleSpan])
misspelt = handler.completed_spans[-1].nmae  # type: ignore[attr-defined]
handler.completed_spans[0] = "not a span"  # type: ignore[call-overload]
with capture_spans() as spans:
    pass
assert_type(spans[0], SimpleSpan)
assert_type(spans[:1], list[SimpleSpan])


class CacheMiss(BaseEvent):
    key: str


def check_capture(capture: Capture) -> None:
    assert_type(capture.events_of(CacheMiss), list[CacheMiss])
    assert_type(capture.events_of((CacheMiss,)), list[CacheMiss])
    assert_type(capture.events.of(CacheMiss)[0].key, str)
    with capture_events() as events:
        pass
    assert_type(events.of(CacheMiss), list[CacheMiss])


class MySpans(SimpleSpanHandler):
    """Overriding with BaseSpanHandler's documented signature is accepted."""

    def new_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        parent_span_id: str | None = None,
        tags: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> SimpleSpan | None:
        return super().new_span(id_, bound_args, instance, parent_span_id, tags, **kwargs)


# -- LLM events ----------------------------------------------------------------------

message = ChatMessage(role="user", content="Best pasta?")
assert_type(message.role, MessageRole)
ChatMessage(role="usr")  # type: ignore[arg-type]


class LLMPrinter(BaseEventHandler):
    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        if isinstance(event, LLM_END_EVENTS):
            assert_type(event.model, str | None)
            assert_type(event.usage, TokenUsage | None)
            assert_type(event.cost_usd, float | None)


# -- storage, threads, OpenTelemetry, audit ------------------------------------------

storage.StorageHandler(store=storage.SQLiteStore(":memory:"))
storage.record_to(":memory:", batch_size=10)
storage.record_to(":memory:", batch_sise=10)  # type: ignore[call-arg]
storage.record_to(":memory:", batch_size="many")  # type: ignore[arg-type]
no_such_store = storage.SQLiteStor  # type: ignore[attr-defined]
assert_type(storage.PostgresStore, type[storage.PostgresStore])

with ContextThreadPoolExecutor() as pool:
    assert_type(pool.submit(plain, 1), Future[int])
    pool.submit(plain, "x")  # type: ignore[arg-type]
    pool.submit(plain)  # type: ignore[call-arg]

configure_otlp(protocol="http/json")  # type: ignore[arg-type]

handlers: list[audit.AnyEventHandler] = [
    audit.FileEventHandler("audit-logs"),
    audit.CLIEventHandler(io.StringIO()),
    audit.LoggingEventHandler(),
]
audit.request(question="q", handlers=handlers)
