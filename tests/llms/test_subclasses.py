"""BaseLLM subclasses that get something wrong.

A mistake that is the subclass's to fix (a hook of the wrong kind or returning the
wrong type) is a TypeError naming the hook, the same whether or not a handler
listens. What only the events read (its provider, its metadata, its price table)
never fails the application's call: the events go out without what does not fit,
and the problem is logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from instrumentation import SpanDropEvent, telemetry
from instrumentation.llms import (
    BaseLLM,
    ChatMessage,
    ChatResponse,
    LLMChatEndEvent,
    LLMChatInProgressEvent,
    LLMChatStartEvent,
    LLMPredictEndEvent,
    LLMPredictStartEvent,
    OfflineLLM,
    PriceTable,
    TokenUsage,
    configure_redaction,
)
from instrumentation.testing import Capture, isolated


def reply(text: str = "ok") -> ChatResponse:
    return ChatResponse(message=ChatMessage(role="assistant", content=text), delta=text)


def define(**hooks: Any) -> type[BaseLLM]:
    """A BaseLLM subclass with working ``_chat`` and ``_stream_chat``, and ``hooks``."""

    def _chat(self: BaseLLM, messages: list[ChatMessage], **kwargs: Any) -> ChatResponse:
        return reply()

    def _stream_chat(
        self: BaseLLM, messages: list[ChatMessage], **kwargs: Any
    ) -> Iterator[ChatResponse]:
        yield reply()

    return type("Custom", (BaseLLM,), {"_chat": _chat, "_stream_chat": _stream_chat, **hooks})


# -- hooks of the wrong kind, refused when the class is defined ---------------------------


async def async_returning(self: Any, *args: Any, **kwargs: Any) -> Any:
    return reply()


async def async_yielding(self: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
    yield reply()


def plain_returning(self: Any, *args: Any, **kwargs: Any) -> Any:
    return reply()


def plain_yielding(self: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
    yield reply()


@pytest.mark.parametrize(
    "hook, function, must, it_is",
    [
        ("_chat", async_returning, "a plain def returning a ChatResponse", "an async def"),
        ("_chat", plain_yielding, "a plain def returning a ChatResponse", "a def with yield"),
        ("_complete", async_returning, "a plain def returning a Completion", "an async def"),
        ("_stream_chat", async_yielding, "a def that yields", "an async def with yield"),
        ("_stream_complete", async_returning, "a def that yields", "an async def"),
        ("_achat", plain_yielding, "an async def returning a ChatResponse", "a def with yield"),
        ("_acomplete", async_yielding, "an async def returning", "an async def with yield"),
        ("_astream_chat", async_returning, "an async def that yields", "an async def"),
        ("_astream_complete", plain_yielding, "an async def that yields", "a def with yield"),
    ],
)
def test_a_hook_of_the_wrong_kind_is_refused_when_the_class_is_defined(
    hook: str, function: Callable[..., Any], must: str, it_is: str
) -> None:
    """An ``async def _chat`` or a plain ``def _achat`` was accepted, then failed inside
    the tracing ('coroutine' object has no attribute 'additional_kwargs'), some only
    once a handler listened: now defining the class is a TypeError that names the hook
    and the kind it must be."""
    with pytest.raises(TypeError, match=rf"Custom\.{hook} must be {must}.*; it is {it_is}$"):
        define(**{hook: function})


def test_a_plain_def_returning_what_an_async_hook_would_still_works() -> None:
    """A plain ``def _achat`` returning a client's coroutine, and a plain ``def
    _astream_chat`` returning an async generator, worked before the hooks were checked:
    they still do."""

    async def answer() -> ChatResponse:
        return reply("awaited")

    async def chunks() -> AsyncIterator[ChatResponse]:
        yield reply("chunk")

    model = define(
        _achat=lambda self, messages, **kwargs: answer(),
        _astream_chat=lambda self, messages, **kwargs: chunks(),
    )("m")

    async def run() -> list[str]:
        said = [str((await model.achat("hi")).message.content)]
        async for chunk in await model.astream_chat("hi"):
            said.append(str(chunk.delta))
        return said

    assert asyncio.run(run()) == ["awaited", "chunk"]


def test_a_decorated_hook_is_judged_by_what_it_wraps() -> None:
    """A decorator that keeps ``__wrapped__`` (functools.wraps) around an async def
    returns a coroutine even from a plain def: it fits an async hook."""

    def logged(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs)

        return wrapper

    async def _achat(self: Any, messages: list[ChatMessage], **kwargs: Any) -> ChatResponse:
        return reply("async")

    model = define(_achat=logged(_achat))("m")
    assert asyncio.run(model.achat("hi")).message.content == "async"


def test_a_provider_that_is_not_a_str_is_refused_when_the_class_is_defined() -> None:
    """``provider = 5`` failed every traced call once a handler listened."""
    with pytest.raises(TypeError, match=r"Custom\.provider is the provider's name, a str"):
        define(provider=5)
    assert define(provider="mine")("m").provider == "mine"


# -- hooks that return the wrong type: a TypeError naming the hook --------------------------


def _returns_text(self: Any, messages: list[ChatMessage], **kwargs: Any) -> Any:
    return "plain text"


def _yields_text(self: Any, messages: list[ChatMessage], **kwargs: Any) -> Iterator[Any]:
    yield "plain text"


def _returns_none(self: Any, messages: list[ChatMessage], **kwargs: Any) -> Any:
    return None


def handler_if(listening: bool) -> contextlib.AbstractContextManager[Any]:
    """A handler at the root while in the block, if ``listening``."""
    return isolated() if listening else contextlib.nullcontext()


async def _read(stream: Any) -> list[Any]:
    return [chunk async for chunk in await stream]


CALLS: dict[str, Callable[[BaseLLM], Any]] = {
    "chat": lambda m: m.chat("hi"),
    "achat": lambda m: asyncio.run(m.achat("hi")),
    "complete": lambda m: m.complete("hi"),
    "acomplete": lambda m: asyncio.run(m.acomplete("hi")),
    "stream_chat": lambda m: list(m.stream_chat("hi")),
    "stream_complete": lambda m: list(m.stream_complete("hi")),
    "astream_chat": lambda m: asyncio.run(_read(m.astream_chat("hi"))),
    "astream_complete": lambda m: asyncio.run(_read(m.astream_complete("hi"))),
}


@pytest.mark.parametrize("listening", [False, True], ids=["no-handler", "handler"])
@pytest.mark.parametrize("method", CALLS)
def test_a_hook_returning_the_wrong_type_is_a_type_error_naming_it(
    method: str, listening: bool
) -> None:
    """``_chat`` returning a str was returned as is with no handler and an
    AttributeError from the tracing with one; every public method that reads it (the
    default complete, achat, ... too) now raises the same TypeError either way."""
    model = define(_chat=_returns_text, _stream_chat=_yields_text)("m")
    stream = method.startswith(("stream", "astream"))
    expected = (
        r"Custom\._stream_chat yielded a str; it must yield ChatResponse chunks"
        if stream
        else r"Custom\._chat returned a str; it must return a ChatResponse"
    )
    with handler_if(listening), pytest.raises(TypeError, match=expected):
        CALLS[method](model)


@pytest.mark.parametrize("listening", [False, True], ids=["no-handler", "handler"])
def test_a_stream_hook_returning_none_is_a_type_error_naming_it(listening: bool) -> None:
    """Not "'NoneType' object is not iterable" from inside the tracing."""
    model = define(_stream_chat=_returns_none)("m")
    with handler_if(listening):
        for method in ("stream_chat", "stream_complete", "astream_chat", "astream_complete"):
            with pytest.raises(TypeError, match=r"Custom\._stream_chat returned None; it must"):
                CALLS[method](model)


@pytest.mark.parametrize("listening", [False, True], ids=["no-handler", "handler"])
def test_an_async_hook_set_on_an_instance_is_checked_when_called(listening: bool) -> None:
    """What the class check cannot see (a hook set on the instance) is checked when
    called: not "object ChatResponse can't be used in 'await' expression"."""
    model = define()("m")
    model._achat = lambda messages, **kwargs: reply()  # type: ignore[method-assign, assignment]
    expected = r"Custom\._achat returned a ChatResponse; it must be an async def returning"
    with handler_if(listening), pytest.raises(TypeError, match=expected):
        asyncio.run(model.achat("hi"))


# -- what only the events read never fails the call ---------------------------------------


class BadMetadata(OfflineLLM):
    @property
    def metadata(self) -> Any:
        return ["not", "a", "dict"]


class FailingMetadata(OfflineLLM):
    @property
    def metadata(self) -> dict[str, Any]:
        raise RuntimeError("metadata is broken")


class FailingPrices(PriceTable):
    def cost(self, model: str | None, usage: TokenUsage | None) -> float | None:
        raise KeyError("no price")


def _provider_set_to_five() -> OfflineLLM:
    model = OfflineLLM()
    model.provider = 5  # type: ignore[assignment]
    return model


@pytest.mark.parametrize(
    "make, left_out, logged",
    [
        (_provider_set_to_five, "provider", "provider: Input should be a valid string"),
        (BadMetadata, "model_dict", "model_dict: Input should be a valid dictionary"),
        (FailingMetadata, "model_dict", "metadata failed (RuntimeError('metadata is broken'))"),
        (lambda: OfflineLLM(price_table=FailingPrices()), "cost_usd", "price table failed"),
    ],
    ids=["provider", "metadata", "failing-metadata", "failing-price-table"],
)
def test_what_does_not_fit_an_event_is_left_out_and_the_call_goes_on(
    cap: Capture,
    caplog: pytest.LogCaptureFixture,
    make: Callable[[], OfflineLLM],
    left_out: str,
    logged: str,
) -> None:
    """Each of these failed every traced call (a ValidationError or the table's own
    error) once a handler listened: the calls now answer as they do untraced, every
    event goes out without what does not fit, and the problem is counted and logged
    (once an interval, not once a call)."""
    model = make()
    with caplog.at_level(logging.WARNING, logger="instrumentation.llms._call"):
        assert model.chat("hi there").message.content == "Echo: hi there"
        assert [c.delta for c in model.stream_chat("hi there")] == ["Echo:", " hi", " there"]
        assert model.predict("{q}", q="hi there") == "Echo: hi there"
    assert not cap.events_of(SpanDropEvent)
    starts = cap.events_of(LLMChatStartEvent)
    ends = cap.events_of(LLMChatEndEvent)
    assert len(starts) == len(ends) == 3 and len(cap.events_of(LLMChatInProgressEvent)) == 3
    assert len(cap.events_of(LLMPredictStartEvent)) == len(cap.events_of(LLMPredictEndEvent))
    for end in ends:
        assert end.response is not None and end.response.message.content == "Echo: hi there"
        assert end.usage is not None and not end.usage.estimated
        assert end.finish_reason == "stop"
    if left_out == "provider":
        assert all(e.provider is None for e in cap.events_of(LLMChatStartEvent))
    if left_out == "model_dict":
        assert all(start.model_dict == {} for start in starts)
    if left_out == "cost_usd":
        assert all(end.cost_usd is None for end in ends)
    assert telemetry.counter("llms.event_errors").value > 0
    [record] = [r for r in caplog.records if logged in r.getMessage()]
    assert record.levelno == logging.WARNING


def _read_a_cancelled_future() -> None:
    """What a callback does that raises ``asyncio.CancelledError`` (no ``Exception``):
    no cancellation of the caller's, which comes in at an ``await`` only."""
    loop = asyncio.new_event_loop()
    try:
        future = loop.create_future()
        future.cancel()
        future.result()
    finally:
        loop.close()


class CancelledMetadata(OfflineLLM):
    @property
    def metadata(self) -> dict[str, Any]:
        _read_a_cancelled_future()
        return {}


class CancelledPrices(PriceTable):
    def cost(self, model: str | None, usage: TokenUsage | None) -> float | None:
        _read_a_cancelled_future()
        return None


def _cancelled_mask(text: str) -> str:
    _read_a_cancelled_future()
    return text


@pytest.mark.parametrize("broken", ["mask", "metadata", "price table"])
def test_a_callback_raising_cancelled_error_does_not_cancel_the_call(
    cap: Capture, broken: str
) -> None:
    """A mask, a ``metadata`` or a price table raising ``CancelledError``: no
    ``except Exception`` caught it, and the awaited call ended its task as cancelled.
    It fails as any error of theirs does (the value left out, counted)."""
    model = OfflineLLM()
    if broken == "mask":
        configure_redaction(mask=_cancelled_mask)
    elif broken == "metadata":
        model = CancelledMetadata()
    else:
        model = OfflineLLM(price_table=CancelledPrices())
    reply = asyncio.run(model.achat("hi there"))
    assert reply.message.content == "Echo: hi there"
    [start] = cap.events_of(LLMChatStartEvent)
    [end] = cap.events_of(LLMChatEndEvent)
    if broken == "mask":
        assert start.messages[0].content == "[redaction failed]"
    elif broken == "metadata":
        assert start.model_dict == {}
    else:
        assert end.cost_usd is None


@pytest.mark.parametrize("reason", [7, ["stop"]], ids=["int", "list"])
def test_a_finish_reason_that_is_not_a_str_is_left_out_logged_and_counted(
    cap: Capture, caplog: pytest.LogCaptureFixture, reason: object
) -> None:
    """A subclass's finish reason that was not a str became None without a word, while
    every other field an event cannot hold is logged and counted (as the docs say)."""

    def with_reason(text: str) -> ChatResponse:
        answer = reply(text)
        answer.additional_kwargs = {"finish_reason": reason}
        return answer

    def _chat(self: BaseLLM, messages: list[ChatMessage], **kwargs: Any) -> ChatResponse:
        return with_reason("whole")

    def _stream_chat(
        self: BaseLLM, messages: list[ChatMessage], **kwargs: Any
    ) -> Iterator[ChatResponse]:
        yield with_reason("part")

    model = define(_chat=_chat, _stream_chat=_stream_chat)("m")
    with caplog.at_level(logging.WARNING, logger="instrumentation.llms._call"):
        assert model.chat("hi").message.content == "whole"
        assert [c.delta for c in model.stream_chat("hi")] == ["part"]
    ends = cap.events_of(LLMChatEndEvent)
    assert len(ends) == 2 and all(end.finish_reason is None for end in ends)
    assert telemetry.counter("llms.event_errors").value == 2
    [record] = caplog.records  # once an interval, not once a call
    assert f"finish reason is not a str (it is {type(reason).__name__})" in record.getMessage()


def test_a_price_table_that_is_not_one_is_refused_up_front() -> None:
    """A dict was accepted, then every traced call failed with an AttributeError."""
    with pytest.raises(TypeError, match="price_table is a PriceTable"):
        OfflineLLM(price_table={"offline": 1.0})  # type: ignore[arg-type]


# -- predict's template --------------------------------------------------------------------


@pytest.mark.parametrize(
    "template, args, message",
    [
        ("Say {x}", {}, r"no value for the template's \{x\}: pass it by name, as predict\("),
        ("{a} {b} {a}", {"b": 1}, r"no value for the template's \{a\}: pass it"),
        ("{a} {b.real}", {}, r"\{a\}, \{b\}: pass them by name, as predict\(template, a=..."),
        ("{x:>{width}}", {"x": 1}, r"no value for the template's \{width\}: pass it"),
        ("Say {}", {}, r"positional placeholder"),
        ("Say {0}", {}, r"positional placeholder"),
    ],
)
def test_a_template_placeholder_without_a_value_is_a_type_error_naming_it(
    cap: Capture, template: str, args: dict[str, Any], message: str
) -> None:
    """Was a bare ``KeyError: 'x'`` (or an IndexError), after the start event: now the
    call is refused before anything is sent."""
    with pytest.raises(TypeError, match=message):
        OfflineLLM().predict(template, **args)
    assert not cap.events_of(LLMPredictStartEvent)


def test_a_lookup_inside_a_value_keeps_its_own_error() -> None:
    """``{user[name]}`` with a user that has no name: the KeyError is the value's."""
    with pytest.raises(KeyError, match="name"):
        OfflineLLM().predict("{user[name]}", user={})
    assert OfflineLLM().predict("{user[name]}", user={"name": "Ada"}) == "Echo: Ada"
