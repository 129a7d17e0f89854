"""instrument_openai() against a real loopback server speaking the OpenAI protocol."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
import wrapt
from openai.resources.chat.completions import AsyncCompletions, Completions
from openai.resources.embeddings import Embeddings

from instrumentation import BaseEventHandler, SpanDropEvent, get_dispatcher, telemetry
from instrumentation.events.base import BaseEvent
from instrumentation.llms import (
    ContentBlock,
    EmbeddingEndEvent,
    EmbeddingStartEvent,
    LLMChatEndEvent,
    LLMChatInProgressEvent,
    LLMChatStartEvent,
    TokenUsage,
    ToolCall,
    configure_redaction,
    count_tokens,
    default_price_table,
)
from instrumentation.llms._call import LLMCall
from instrumentation.llms.openai import (
    CHAT_SPAN,
    EMBEDDING_SPAN,
    AsyncTracedStream,
    TracedStream,
    instrument_openai,
    is_instrumented,
    uninstrument_openai,
)
from instrumentation.testing import Capture, isolated

from .openai_server import PROMPT_TOKENS_PER_MESSAGE, OpenAIServer, alternative, words

HELLO = [{"role": "user", "content": "hello there friend"}]
ANSWER = "Echo: hello there friend"


@pytest.fixture(scope="module")
def server() -> Iterator[OpenAIServer]:
    srv = OpenAIServer().start()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _instrumented(server: OpenAIServer) -> Iterator[None]:
    server.answer = None
    server.message = None
    server.cached_tokens = 0
    server.tool_calls = None
    server.deltas = None
    server.finish_reason = None
    server.embedding_usage = True
    server.reply_model = None
    server.fail_first = []
    server.delay_s = 0.0
    server.stream_error_after = None
    server.requests.clear()
    instrument_openai()
    yield
    uninstrument_openai()


@pytest.fixture
def client(server: OpenAIServer) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0)
    yield c
    c.close()


@pytest.fixture
async def aclient(server: OpenAIServer) -> Any:
    c = openai.AsyncOpenAI(base_url=server.base_url, api_key="test", max_retries=0)
    yield c
    await c.close()


def test_chat_completion_emits_events_with_usage_and_cost(
    cap: Capture, client: openai.OpenAI, server: OpenAIServer
) -> None:
    """A plain create() returns the client's own object and emits start/end with usage."""
    server.cached_tokens = 2
    completion = client.chat.completions.create(model="gpt-4o", messages=HELLO, temperature=0.2)
    assert isinstance(completion, openai.types.chat.ChatCompletion)
    assert completion.choices[0].message.content == ANSWER
    [start] = cap.events_of(LLMChatStartEvent)
    [end] = cap.events_of(LLMChatEndEvent)
    assert start.messages[0].content == "hello there friend"
    assert start.additional_kwargs == {"temperature": 0.2}
    assert start.provider == end.provider == "openai" and end.model == "gpt-4o"
    assert end.usage is not None and not end.usage.estimated
    assert end.usage.prompt_tokens == PROMPT_TOKENS_PER_MESSAGE
    assert end.usage.completion_tokens == len(words(ANSWER))
    assert end.usage.cached_tokens == 2 and end.usage.reasoning_tokens == 0
    assert end.finish_reason == "stop"
    assert end.cost_usd == pytest.approx((2 * 2.5 + 2 * 1.25 + 4 * 10.0) / 1e6)
    assert end.response is not None and end.response.message.content == ANSWER
    [span] = cap.spans
    assert span.name == CHAT_SPAN and start.span_id == end.span_id == span.id_


def test_stream_with_usage_in_the_final_chunk(
    cap: Capture, client: openai.OpenAI, server: OpenAIServer
) -> None:
    """stream=True: one in-progress per chunk with choices; usage from the final chunk."""
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert isinstance(stream, openai.Stream)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    progress = cap.events_of(LLMChatInProgressEvent)
    assert len(progress) == len([c for c in chunks if c.choices])
    assert "".join(p.response.delta or "" for p in progress) == ANSWER
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.usage is not None and not end.usage.estimated
    assert end.usage.completion_tokens == len(words(ANSWER))
    assert end.finish_reason == "stop"
    assert end.time_to_first_token_ms is not None and end.latency_ms is not None
    assert end.response is not None and end.response.message.content == ANSWER
    assert end.cost_usd is not None


def test_stream_without_usage_is_estimated_and_the_request_is_unchanged(
    cap: Capture, client: openai.OpenAI, server: OpenAIServer
) -> None:
    """Without include_usage nothing is added to the request; usage is an estimate."""
    with client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True) as stream:
        for _ in stream:
            pass
    assert "stream_options" not in server.requests[-1]["body"]
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.usage is not None and end.usage.estimated
    assert end.usage.prompt_tokens == 3


def test_abandoned_stream_ends_its_span_with_what_was_seen(
    cap: Capture, client: openai.OpenAI, server: OpenAIServer
) -> None:
    """Breaking out and closing, or forgetting the stream, ends the span (not a drop)."""
    server.answer = "one two three four five six"
    stream = client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    forgotten = client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    next(forgotten)
    del forgotten
    gc.collect()
    first, second = cap.events_of(LLMChatEndEvent)
    assert first.finish_reason == second.finish_reason == "abandoned"
    assert first.response is not None and first.response.message.content == "one two"
    assert first.usage is not None and first.usage.completion_tokens == 2
    assert first.usage.estimated
    assert not cap.events_of(SpanDropEvent)


@pytest.mark.parametrize(
    "status, error", [(429, openai.RateLimitError), (500, openai.InternalServerError)]
)
def test_http_errors_drop_the_span(
    cap: Capture, client: openai.OpenAI, status: int, error: type[Exception]
) -> None:
    """A 429/500 raises the client's own error; the span is dropped, no end event."""
    with pytest.raises(error):
        client.chat.completions.create(model=f"error-{status}", messages=HELLO)
    with pytest.raises(error):
        client.chat.completions.create(model=f"error-{status}", messages=HELLO, stream=True)
    assert len(cap.events_of(LLMChatStartEvent)) == 2
    assert not cap.events_of(LLMChatEndEvent)
    drops = cap.events_of(SpanDropEvent)
    assert len(drops) == 2 and all(str(status) in d.err_str for d in drops)


async def test_async_chat_and_stream(cap: Capture, aclient: openai.AsyncOpenAI) -> None:
    """AsyncOpenAI: create() and stream=True are traced the same way."""
    completion = await aclient.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert completion.choices[0].message.content == ANSWER
    stream = await aclient.chat.completions.create(
        model="gpt-4o", messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    assert isinstance(stream, openai.AsyncStream)
    text = ""
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    assert text == ANSWER
    ends = cap.events_of(LLMChatEndEvent)
    assert len(ends) == 2
    assert all(e.usage is not None and not e.usage.estimated for e in ends)
    assert [s.name for s in cap.spans] == [CHAT_SPAN, CHAT_SPAN]


async def test_async_stream_closed_early(cap: Capture, aclient: openai.AsyncOpenAI) -> None:
    """An async stream closed half way ends its span with the tokens read."""
    stream = await aclient.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    await stream.__anext__()
    await stream.__anext__()
    await stream.close()
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.finish_reason == "abandoned" and end.usage is not None
    # Read: the role chunk (no text), then "Echo:" -- the word "Echo" and the mark ":",
    # 2 tokens by the word/punctuation rule.
    assert end.usage.completion_tokens == 2


async def test_async_error_drops_span(cap: Capture, aclient: openai.AsyncOpenAI) -> None:
    """Async 429: the client's error, a dropped span."""
    with pytest.raises(openai.RateLimitError):
        await aclient.chat.completions.create(model="error-429", messages=HELLO)
    assert len(cap.events_of(SpanDropEvent)) == 1 and not cap.events_of(LLMChatEndEvent)


def test_embeddings(cap: Capture, client: openai.OpenAI) -> None:
    """embeddings.create emits start/end with the texts, vectors, usage and cost."""
    response = client.embeddings.create(model="text-embedding-3-small", input=["a b", "c"])
    assert response.data[0].embedding == [3.0, 0.0, 0.5]
    [start] = cap.events_of(EmbeddingStartEvent)
    [end] = cap.events_of(EmbeddingEndEvent)
    assert start.model == "text-embedding-3-small"
    assert end.chunks == ["a b", "c"]
    assert end.embeddings == [[3.0, 0.0, 0.5], [1.0, 1.0, 0.5]]
    assert end.usage is not None and end.usage.prompt_tokens == 3 and not end.usage.estimated
    assert end.cost_usd == pytest.approx(3 * 0.02 / 1e6)
    assert [s.name for s in cap.spans] == [EMBEDDING_SPAN]


async def test_async_embeddings(cap: Capture, aclient: openai.AsyncOpenAI) -> None:
    """AsyncEmbeddings.create is traced too."""
    await aclient.embeddings.create(model="text-embedding-3-small", input="hello world")
    [end] = cap.events_of(EmbeddingEndEvent)
    assert end.chunks == ["hello world"] and end.usage is not None


def test_instrument_is_idempotent_and_uninstrument_restores(
    cap: Capture, client: openai.OpenAI
) -> None:
    """Twice on is once on (one span per call); off puts the very same functions back."""
    uninstrument_openai()
    originals = [Completions.__dict__["create"], AsyncCompletions.__dict__["create"]]
    originals.append(Embeddings.__dict__["create"])
    instrument_openai()
    instrument_openai()
    assert is_instrumented()
    client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert len(cap.events_of(LLMChatStartEvent)) == 1
    uninstrument_openai()
    uninstrument_openai()
    assert not is_instrumented()
    assert [Completions.__dict__["create"], AsyncCompletions.__dict__["create"]] == originals[:2]
    assert Embeddings.__dict__["create"] is originals[2]
    client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert len(cap.events_of(LLMChatStartEvent)) == 1


def test_a_client_made_before_instrumenting_is_traced(cap: Capture, server: OpenAIServer) -> None:
    """No code change: a client created earlier is traced once instrumentation is on."""
    uninstrument_openai()
    early = openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0)
    instrument_openai()
    early.chat.completions.create(model="gpt-4o", messages=HELLO)
    early.close()
    assert len(cap.events_of(LLMChatEndEvent)) == 1


def test_a_handler_raising_on_chunks_does_not_break_the_stream(
    cap: Capture, client: openai.OpenAI
) -> None:
    """A handler failing on every chunk is counted; the application gets the whole stream."""

    class Broken(BaseEventHandler):
        def handle(self, event: BaseEvent, **kwargs: Any) -> None:
            if isinstance(event, LLMChatInProgressEvent):
                raise RuntimeError("handler bug")

    get_dispatcher().add_event_handler(Broken())
    stream = client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == ANSWER
    assert telemetry.HANDLER_ERRORS.value == len(cap.events_of(LLMChatInProgressEvent))
    assert len(cap.events_of(LLMChatEndEvent)) == 1


def test_redaction_applies_to_openai_calls(cap: Capture, client: openai.OpenAI) -> None:
    """With record_content off, no event holds the text nor the raw response."""
    configure_redaction(record_content=False)
    client.chat.completions.create(model="gpt-4o", messages=HELLO)
    list(client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True))
    client.embeddings.create(model="text-embedding-3-small", input="hello there friend")
    dumped = " ".join(str(e.model_dump()) for e in cap.events)
    assert "hello" not in dumped
    assert len(cap.events_of(LLMChatEndEvent)) == 2


def test_untraceable_request_runs_untraced(cap: Capture, client: openai.OpenAI) -> None:
    """A message the events cannot describe still goes to the server; it is counted."""
    odd: Any = [{"role": "critic", "content": "hello there friend"}]
    completion = client.chat.completions.create(model="gpt-4o", messages=odd)
    assert completion.choices[0].message.content == "Echo: "  # the server saw no user
    assert not cap.events_of(LLMChatStartEvent)
    assert telemetry.counter("llms.openai.describe_errors").value == 1


def test_untraceable_requests_are_logged_once_per_interval(
    cap: Capture, client: openai.OpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    """An application that sends such a request sends it in every call: one warning
    per interval says so (with how many more), and every call is counted."""
    odd: Any = [{"role": "critic", "content": "hello there friend"}]
    with caplog.at_level(logging.WARNING, logger="instrumentation.llms"):
        for _ in range(3):
            client.chat.completions.create(model="gpt-4o", messages=odd)
    lines = [r.getMessage() for r in caplog.records if "could not be described" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("an OpenAI chat request could not be described, so it is not")
    assert telemetry.counter("llms.openai.describe_errors").value == 3


@pytest.mark.parametrize(
    "message",
    [
        {"content": "no role given"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c2", "function": {"name": 5, "arguments": "{}"}}],
        },
    ],
    ids=["no-role", "object-arguments", "undescribable"],
)
def test_an_oddly_shaped_reply_is_returned_and_the_call_still_ends(
    cap: Capture, client: openai.OpenAI, server: OpenAIServer, message: dict[str, Any]
) -> None:
    """The patch never turns a reply the client accepts into an error."""
    server.message = message
    try:
        completion = client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "q"}]
        )
    finally:
        server.message = None
    assert completion.choices[0].message.content == message["content"]
    (end,) = cap.events_of(LLMChatEndEvent)
    assert end.usage is not None and end.usage.total_tokens > 0
    if message.get("content"):
        assert end.response is not None and end.response.message.role == "assistant"
    calls = message.get("tool_calls") or []
    if calls and calls[0]["function"]["name"] == "f":
        assert end.response is not None
        assert json.loads(end.response.message.tool_calls[0].arguments) == {"x": 1}
    if calls and calls[0]["function"]["name"] == 5:
        assert end.response is None
        assert telemetry.counter("llms.openai.describe_errors").value == 1
    [span] = cap.spans
    assert span.name == CHAT_SPAN and end.span_id == span.id_ and span.end_time is not None


@pytest.mark.parametrize("reason", [5, {"why": "done"}], ids=["int", "object"])
def test_a_finish_reason_that_is_not_a_str_is_left_out_and_the_reply_returned(
    cap: Capture,
    client: openai.OpenAI,
    server: OpenAIServer,
    caplog: pytest.LogCaptureFixture,
    reason: object,
) -> None:
    """A compatible server's finish reason that is not a str made create() raise a
    ValidationError after the request had succeeded (the end event could not hold it):
    the application gets its reply, the end event goes out without the reason, and
    that is logged and counted."""
    server.finish_reason = reason  # type: ignore[assignment]
    with caplog.at_level("WARNING", logger="instrumentation.llms._call"):
        completion = client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert completion.choices[0].message.content == ANSWER
    assert completion.choices[0].finish_reason == reason  # the client's object, untouched
    assert not cap.events_of(SpanDropEvent)
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.finish_reason is None
    assert end.response is not None and end.response.message.content == ANSWER
    assert end.usage is not None and not end.usage.estimated and end.cost_usd is not None
    assert telemetry.counter("llms.event_errors").value == 1
    [record] = caplog.records
    assert "LLMChatEndEvent" in record.getMessage()
    assert "sent without finish_reason" in record.getMessage()


def test_a_streamed_finish_reason_that_is_not_a_str_is_left_out_logged_and_counted(
    cap: Capture,
    client: openai.OpenAI,
    server: OpenAIServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In a stream it was dropped without a word (the reply's own is logged and
    counted, as above)."""
    server.finish_reason = 5  # type: ignore[assignment]
    with caplog.at_level("WARNING", logger="instrumentation.llms._call"):
        stream = client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == ANSWER
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.finish_reason is None and end.response is not None
    assert telemetry.counter("llms.event_errors").value == 1
    [record] = caplog.records
    assert "finish reason is not a str (it is int)" in record.getMessage()


def test_a_price_set_for_the_model_asked_for_prices_the_snapshot_the_reply_names(
    cap: Capture, client: openai.OpenAI, server: OpenAIServer
) -> None:
    """OpenAI answers with the dated snapshot ("o3-2025-04-16" for "o3"): a price set
    for "o3" by the application applied to neither, and the cost was None."""
    server.reply_model = "o3-2025-04-16"
    default_price_table.set("o3", 2.0, 8.0)
    try:
        client.chat.completions.create(model="o3", messages=HELLO)
    finally:
        default_price_table.reset()
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.model == "o3-2025-04-16"
    assert end.usage is not None and end.cost_usd == pytest.approx(
        (end.usage.prompt_tokens * 2.0 + end.usage.completion_tokens * 8.0) / 1e6
    )


def test_usage_that_cannot_be_read_is_warned_about_at_most_once_an_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A provider sending such usage on every call and chunk wrote a warning each time."""
    import logging

    from instrumentation.llms._call import coerce_usage

    with caplog.at_level(logging.WARNING, logger="instrumentation.llms._call"):
        for _ in range(20):
            assert coerce_usage({"prompt_tokens": None}) is None
    assert len([r for r in caplog.records if "not a token count" in r.getMessage()]) == 1
    assert telemetry.counter("llms.usage_errors").value == 20


def test_nothing_listening_costs_no_events(client: openai.OpenAI, dispatched: list[str]) -> None:
    """With no handler the call is passed straight through: no event is even built.
    With a handler, the very same calls build and dispatch their events."""
    assert not get_dispatcher("instrumentation.llms.openai").is_listening  # no handler anywhere

    def calls() -> None:
        completion = client.chat.completions.create(model="gpt-4o", messages=HELLO)
        assert completion.choices[0].message.content == ANSWER
        response = client.embeddings.create(model="text-embedding-3-small", input=["a b", "c"])
        assert response.data[0].embedding == [3.0, 0.0, 0.5]

    calls()
    stream = client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ANSWER
    assert dispatched == []
    with isolated():  # a handler at the root: now the events are built
        calls()
    assert dispatched == [
        "LLMChatStartEvent",
        "LLMChatEndEvent",
        "EmbeddingStartEvent",
        "EmbeddingEndEvent",
    ]


@pytest.mark.parametrize("stream", [False, True])
def test_raw_response_calls_pass_through(cap: Capture, client: openai.OpenAI, stream: bool) -> None:
    """with_raw_response returns the client's raw object untouched; the span still ends."""
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=HELLO, stream=stream
    )
    assert raw.http_response.status_code == 200
    assert type(raw).__name__ == "LegacyAPIResponse"
    parsed = raw.parse()
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in parsed if c.choices)
    else:
        text = parsed.choices[0].message.content
    assert text == ANSWER
    assert len(cap.events_of(LLMChatEndEvent)) == 1
    assert not cap.events_of(SpanDropEvent)


async def test_forgotten_async_stream_is_ended_by_the_event_loop(
    cap: Capture, aclient: openai.AsyncOpenAI
) -> None:
    """An async stream dropped without aclose() is finalised by the loop: span ended."""
    stream = await aclient.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    await stream.__anext__()
    del stream
    for _ in range(20):
        gc.collect()
        await asyncio.sleep(0.01)
        if cap.events_of(LLMChatEndEvent):
            break
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.finish_reason == "abandoned"


def test_a_handler_error_on_the_end_event_does_not_end_the_call_twice(
    cap: Capture, client: openai.OpenAI
) -> None:
    """With raise_handler_errors on, the handler's error surfaces, and the end event is
    sent once (it is not mistaken for a reply that could not be described)."""

    class FailsOnEnd(BaseEventHandler):
        def handle(self, event: Any, **kwargs: Any) -> None:
            if isinstance(event, LLMChatEndEvent):
                raise RuntimeError("handler bug")

    ends: list[Any] = []

    class Before(BaseEventHandler):
        def handle(self, event: Any, **kwargs: Any) -> None:
            if isinstance(event, LLMChatEndEvent):
                ends.append(event)

    get_dispatcher().add_event_handler(Before())
    get_dispatcher().add_event_handler(FailsOnEnd())
    telemetry.raise_handler_errors = True
    with pytest.raises(RuntimeError, match="handler bug"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "q"}])
    assert len(ends) == 1 and ends[0].response is not None
    assert telemetry.counter("llms.openai.describe_errors").value == 0


def test_a_reply_that_cannot_be_described_at_all_is_counted_once() -> None:
    """Unreadable usage and unreadable choices in one reply: one describe error, and the
    call still ends."""
    from instrumentation.llms import openai as patch

    ended: list[tuple[Any, ...]] = []

    class Ending:
        def end(self, *args: Any) -> None:
            ended.append(args)

    patch._finish_completion(Ending(), {"usage": {"prompt_tokens": "many"}, "choices": 5})  # type: ignore[arg-type]
    assert ended == [(None, None, None, None)]
    assert telemetry.counter("llms.openai.describe_errors").value == 1


# -- messages given as a one-pass iterable -------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_generator_of_messages_is_sent_whole(
    cap: Capture, client: openai.OpenAI, server: OpenAIServer, stream: bool
) -> None:
    """A generator is read once: the request carries every message, and so do the events."""

    def messages() -> Iterator[dict[str, str]]:
        yield {"role": "system", "content": "be brief"}
        yield {"role": "user", "content": "hello there friend"}

    result = client.chat.completions.create(model="gpt-4o", messages=messages(), stream=stream)
    if stream:
        assert "".join(c.choices[0].delta.content or "" for c in result) == ANSWER
    else:
        assert result.choices[0].message.content == ANSWER
    assert server.requests[-1]["body"]["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there friend"},
    ]
    [start] = cap.events_of(LLMChatStartEvent)
    assert [m.content for m in start.messages] == ["be brief", "hello there friend"]


async def test_an_async_call_with_a_generator_of_messages(
    cap: Capture, aclient: openai.AsyncOpenAI, server: OpenAIServer
) -> None:
    """The same for AsyncOpenAI."""
    messages = (m for m in HELLO)
    completion = await aclient.chat.completions.create(model="gpt-4o", messages=messages)
    assert completion.choices[0].message.content == ANSWER
    assert server.requests[-1]["body"]["messages"] == HELLO
    assert len(cap.events_of(LLMChatEndEvent)) == 1


# -- streams closed before reading, or collected in a reference cycle ---------------------


def _over(cap: Capture) -> bool:
    """Whether the span is over: ended, or dropped."""
    return bool(cap.events_of(LLMChatEndEvent) or cap.events_of(SpanDropEvent))


async def _auntil(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        gc.collect()
        await asyncio.sleep(0)  # lets the loop run what the collection scheduled


def _abandoned(cap: Capture) -> list[str | None]:
    assert not cap.events_of(SpanDropEvent)
    return [e.finish_reason for e in cap.events_of(LLMChatEndEvent)]


async def test_async_stream_closed_before_reading_ends_its_span(
    cap: Capture, aclient: openai.AsyncOpenAI
) -> None:
    """close() or an `async with` left before the first chunk closes the HTTP response
    and ends the span as abandoned (it used to stay open, then be dropped)."""
    stream = await aclient.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    await stream.close()
    assert stream.response.is_closed
    assert _abandoned(cap) == ["abandoned"]
    await stream.close()  # closing twice is closing once
    async with await aclient.chat.completions.create(
        model="gpt-4o", messages=HELLO, stream=True
    ) as second:
        pass
    assert second.response.is_closed
    assert _abandoned(cap) == ["abandoned", "abandoned"]
    [end, _] = cap.events_of(LLMChatEndEvent)
    assert end.response is not None and end.response.message.content == ""
    assert end.usage is not None and end.usage.completion_tokens == 0


def test_stream_collected_in_a_reference_cycle_is_ended_not_dropped(
    cap: Capture, manual_gc: None, client: openai.OpenAI
) -> None:
    """A half-read stream held in a cycle is ended as abandoned by the cyclic GC."""

    class Holder:
        pass

    holder = Holder()
    holder.me = holder  # type: ignore[attr-defined]
    holder.stream = client.chat.completions.create(  # type: ignore[attr-defined]
        model="gpt-4o", messages=HELLO, stream=True
    )
    next(holder.stream)  # type: ignore[attr-defined]
    next(holder.stream)  # type: ignore[attr-defined]
    del holder
    gc.collect()
    assert _abandoned(cap) == ["abandoned"]
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.response is not None and end.response.message.content == "Echo:"


async def test_async_stream_collected_in_a_reference_cycle_is_ended_not_dropped(
    cap: Capture, manual_gc: None, aclient: openai.AsyncOpenAI
) -> None:
    """Async: the collected runner's call ends (the event loop closes the runner)."""

    class Holder:
        pass

    holder = Holder()
    holder.me = holder  # type: ignore[attr-defined]
    holder.stream = await aclient.chat.completions.create(  # type: ignore[attr-defined]
        model="gpt-4o", messages=HELLO, stream=True
    )
    await holder.stream.__anext__()  # type: ignore[attr-defined]
    await holder.stream.__anext__()  # type: ignore[attr-defined]
    del holder
    await _auntil(lambda: _over(cap) and bool(cap.spans))
    assert _abandoned(cap) == ["abandoned"]


def test_the_openai_stream_helper_is_traced(
    cap: Capture, manual_gc: None, client: openai.OpenAI
) -> None:
    """chat.completions.stream() calls the patched create(): read whole, its span ends
    with the answer; left early, it ends as abandoned once the helper is collected (it
    sits in a reference cycle, so the cyclic GC frees it)."""
    if not hasattr(client.chat.completions, "stream"):
        pytest.skip("this openai release has the helper under client.beta only")
    with client.chat.completions.stream(model="gpt-4o", messages=HELLO) as whole:
        for _ in whole:
            pass
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.finish_reason == "stop" and end.response is not None
    assert end.response.message.content == ANSWER
    with client.chat.completions.stream(model="gpt-4o", messages=HELLO) as early:
        for event in early:
            if event.type == "content.delta":
                break
    del early, event
    gc.collect()
    assert _abandoned(cap) == ["stop", "abandoned"]


def test_every_stream_ends_once_and_nothing_is_kept(
    cap: Capture, manual_gc: None, client: openai.OpenAI
) -> None:
    """Read whole, closed, dropped, dropped in a cycle or failed: each stream ends once,
    and none of them outlives its caller's references."""
    kept: list[weakref.ref[Any]] = []
    for _ in range(5):
        list(client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True))
        closed = client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
        next(closed)
        closed.close()
        kept.append(weakref.ref(closed))
        del closed
        dropped = client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
        kept.append(weakref.ref(dropped))
        del dropped
        cycle: list[Any] = [
            client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
        ]
        cycle.append(cycle)
        kept.append(weakref.ref(cycle[0]))
        del cycle
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="error-429", messages=HELLO, stream=True)
    gc.collect()
    assert [ref() for ref in kept] == [None] * 15
    reasons = sorted(str(e.finish_reason) for e in cap.events_of(LLMChatEndEvent))
    assert reasons == ["abandoned"] * 15 + ["stop"] * 5
    drops = cap.events_of(SpanDropEvent)
    assert len(drops) == 5 and all("429" in d.err_str for d in drops)


async def test_a_stop_button_in_another_task_stops_the_stream_as_abandoned(
    cap: Capture, aclient: openai.AsyncOpenAI, server: OpenAIServer
) -> None:
    """close() from another task while the reader waits for a chunk closes the HTTP
    response, as it does untraced: the reader gets the client's connection error, and
    the call ends as abandoned in its own span (it used to read on to the end, and its
    end event landed in the caller's span)."""
    server.answer = "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10"
    server.chunk_delay_s = 0.05
    got: list[str] = []
    try:
        stream = await aclient.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)

        async def reader() -> None:
            # Older openai releases let their HTTP library's own error through.
            httpx = sys.modules.get("httpx")
            older = (httpx.ReadError,) if httpx is not None else ()
            with pytest.raises((openai.APIConnectionError, *older)):
                async for chunk in stream:
                    got.append(chunk.choices[0].delta.content or "")

        task = asyncio.create_task(reader())
        while len(got) < 2:
            await asyncio.sleep(0.01)
        await stream.close()
        await task
    finally:
        server.chunk_delay_s = 0.0
    assert len(got) < 6
    assert _abandoned(cap) == ["abandoned"]
    [end] = cap.events_of(LLMChatEndEvent)
    [span] = cap.spans
    assert end.span_id == span.id_ and span.end_time is not None


async def _cancel_a_reader_between_chunks(aclient: openai.AsyncOpenAI) -> list[Any]:
    """Read three chunks of a stream in a task that then awaits its own I/O (an ASGI
    ``send``), and cancel the task there: the cancellation never enters the stream.
    Returns, once the task is over, the HTTP response the stream read."""
    responses: list[Any] = []
    three = asyncio.Event()

    async def read() -> None:
        stream = await aclient.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
        responses.append(stream.response)
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                three.set()
                await asyncio.sleep(10)  # sends the chunk on, to a client gone quiet

    reader = asyncio.create_task(read())
    await three.wait()
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    return responses


def _ended_as_left_early(cap: Capture) -> None:
    """One end event, as abandoned with the two words read, and the span ended once as
    a stream left early (the cancellation came into the reader's own code, not into a
    read of the stream): nothing dropped, nothing left open."""
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.finish_reason == "abandoned"
    assert end.usage is not None and end.usage.completion_tokens == 2 and end.usage.estimated
    assert not cap.events_of(SpanDropEvent)
    [span] = cap.spans
    assert span.name == CHAT_SPAN and span.id_ == end.span_id and span.end_time is not None
    assert cap._spans.completed_spans and not cap._spans.open_spans


async def test_a_reader_cancelled_in_its_own_await_between_chunks_ends_the_call_when_let_go(
    cap: Capture, aclient: openai.AsyncOpenAI, server: OpenAIServer
) -> None:
    """The reader's task cancelled while it awaits its own I/O between chunks (an ASGI
    server whose client went away): the stream never sees the cancellation; it is left
    unfinished, as a ``break`` leaves it, and once the loop closes it the call ends as
    abandoned, the HTTP response closed, the end event sent once."""
    server.answer = "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10"
    [response] = await _cancel_a_reader_between_chunks(aclient)
    for _ in range(200):
        if response.is_closed:
            break
        gc.collect()
        await asyncio.sleep(0.01)
    assert response.is_closed
    _ended_as_left_early(cap)


def test_a_reader_cancelled_between_chunks_as_asyncio_run_returns_leaves_no_span_open(
    cap: Capture, server: OpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The same, with ``asyncio.run`` returning as soon as the reader is gone: the span
    stayed open for good."""
    server.answer = "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10"

    async def main() -> None:
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key="test", max_retries=0)
        await _cancel_a_reader_between_chunks(aclient)

    asyncio.run(main())
    gc.collect()
    _ended_as_left_early(cap)
    assert not [r for r in caplog.records if r.name == "asyncio"]


def test_a_stop_button_in_another_thread_stops_the_stream_as_abandoned(
    cap: Capture, client: openai.OpenAI, server: OpenAIServer
) -> None:
    server.answer = "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10"
    server.chunk_delay_s = 0.05
    got: list[str] = []
    failed: list[BaseException] = []
    try:
        stream = client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)

        def reader() -> None:
            try:
                for chunk in stream:
                    got.append(chunk.choices[0].delta.content or "")
            except Exception as exc:
                failed.append(exc)

        thread = threading.Thread(target=reader)
        thread.start()
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        stream.close()
        thread.join(10)
    finally:
        server.chunk_delay_s = 0.0
    assert len(got) < 6
    assert _abandoned(cap) == ["abandoned"]
    [end] = cap.events_of(LLMChatEndEvent)
    [span] = cap.spans
    assert end.span_id == span.id_ and span.end_time is not None


def test_a_failing_end_event_still_closes_the_response(
    cap: Capture, client: openai.OpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the abandoned call's end event cannot be made (a bug of the instrumentation's
    own: what the provider or the price table gives is left out instead, see
    test_a_failing_price_table_leaves_the_cost_out), close() still closes the HTTP
    response; the failure is counted and the span dropped with it."""

    def no_end(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("no end")

    monkeypatch.setattr(LLMCall, "end", no_end)
    before = telemetry.counter("llms.stream_close_errors").value
    stream = client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    next(stream)
    stream.close()
    assert stream.response.is_closed
    assert telemetry.counter("llms.stream_close_errors").value == before + 1
    [drop] = cap.events_of(SpanDropEvent)
    assert "no end" in drop.err_str and not cap.events_of(LLMChatEndEvent)


def test_an_async_stream_left_open_when_its_event_loop_ends_is_ended(
    cap: Capture, server: OpenAIServer
) -> None:
    """A stream still open when ``asyncio.run()`` returns is ended as abandoned by the
    loop's shutdown (it closes the async generators it ran), not dropped; collecting it
    afterwards emits nothing more."""
    kept: list[Any] = []

    async def main() -> None:
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key="test", max_retries=0)
        stream = await aclient.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
        await stream.__anext__()
        kept.append(stream)

    asyncio.run(main())
    assert _abandoned(cap) == ["abandoned"]
    kept.clear()
    gc.collect()
    assert _abandoned(cap) == ["abandoned"]
    assert len(cap.spans) == 1 and cap.spans[0].end_time is not None


# From Python 3.13 the loop's close warns of the close it had scheduled and never ran;
# a warning pytest records keeps its source, that aclose() and its generator, alive
# until the test ends.
@pytest.mark.filterwarnings("ignore:coroutine method 'aclose':RuntimeWarning")
def test_async_streams_left_in_a_loop_closed_without_shutdown_asyncgens_are_ended(
    cap: Capture, server: OpenAIServer, manual_gc: None
) -> None:
    """A loop closed without ``shutdown_asyncgens()`` (``loop.close()`` after
    ``run_until_complete``) closes no stream: one left by ``break`` and one kept past
    the loop were freed unclosed, and their spans stayed open for good, with no end
    event. Now each call ends once, as abandoned with what was read, in its span."""
    kept: list[Any] = []

    async def read_two(keep: bool) -> None:
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key="test", max_retries=0)
        stream = await aclient.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
        read = 0
        async for _ in stream:
            read += 1
            if read == 2:  # the role, then "Echo:"
                break
        if keep:
            kept.append(stream)
        await aclient.close()  # its connections: the test is about the stream

    for keep in (False, True):
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(read_two(keep))
        finally:
            loop.close()  # no shutdown_asyncgens(): the loop closes nothing
        kept.clear()
    gc.collect()
    assert _abandoned(cap) == ["abandoned", "abandoned"]
    for end in cap.events_of(LLMChatEndEvent):
        assert end.response is not None and end.response.message.content == "Echo:"
    assert len(cap.spans) == 2 and all(s.end_time is not None for s in cap.spans)
    assert {e.span_id for e in cap.events_of(LLMChatEndEvent)} == {s.id_ for s in cap.spans}
    assert not cap._spans.open_spans


# -- several choices, tool calls ------------------------------------------------------------


def test_a_stream_with_several_choices_records_the_first(
    cap: Capture, client: openai.OpenAI
) -> None:
    """n=2: the end event describes choice 0, as for the same request not streamed;
    every chunk is still an in-progress event."""
    completion = client.chat.completions.create(model="gpt-4o", messages=HELLO, n=2)
    assert completion.choices[1].message.content == alternative(1)
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=HELLO, n=2, stream=True))
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {0: ANSWER, 1: alternative(1)}
    plain, streamed = cap.events_of(LLMChatEndEvent)
    assert plain.response is not None and streamed.response is not None
    assert streamed.response.message.content == plain.response.message.content == ANSWER
    assert streamed.finish_reason == plain.finish_reason == "stop"
    assert streamed.usage is not None and streamed.usage.completion_tokens == count_tokens(ANSWER)
    progress = cap.events_of(LLMChatInProgressEvent)
    assert len(progress) == len(chunks)
    assert "".join(p.response.delta or "" for p in progress) == ANSWER
    assert progress[-1].response.message.content == ANSWER


CALLS = [
    ("call_1", "get_weather", '{"city": "Paris", "unit": "celsius"}'),
    ("call_2", "get_time", '{"zone": "Europe/Paris"}'),
]


@pytest.mark.parametrize("usage", [False, True])
def test_streamed_tool_calls_are_in_the_end_event(
    cap: Capture, client: openai.OpenAI, server: OpenAIServer, usage: bool
) -> None:
    """Tool-call fragments are put together by index, as the same reply not streamed;
    their arguments count in the estimate and the first fragment for the first token."""
    server.tool_calls = CALLS
    client.chat.completions.create(model="gpt-4o", messages=HELLO)
    options: Any = {"stream_options": {"include_usage": True}} if usage else {}
    chunks = list(
        client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True, **options)
    )
    plain, streamed = cap.events_of(LLMChatEndEvent)
    expected = [ToolCall(id=i, name=n, arguments=a) for i, n, a in CALLS]
    assert plain.response is not None and streamed.response is not None
    assert plain.response.message.tool_calls == expected
    assert streamed.response.message.tool_calls == expected
    assert streamed.response.message.content is plain.response.message.content is None
    assert streamed.finish_reason == "tool_calls"
    assert streamed.time_to_first_token_ms is not None
    assert streamed.usage is not None and streamed.usage.estimated is not usage
    if not usage:
        assert streamed.usage.completion_tokens == sum(count_tokens(a) for _, _, a in CALLS)
    progress = cap.events_of(LLMChatInProgressEvent)
    assert len(progress) == len([c for c in chunks if c.choices])
    assert progress[-1].response.message.tool_calls == expected
    assert progress[0].response.message.tool_calls == []


def test_tool_calls_are_redacted_like_any_text(
    cap: Capture, client: openai.OpenAI, server: OpenAIServer
) -> None:
    """With record_content off, streamed tool calls keep their names, not their arguments."""
    configure_redaction(record_content=False)
    server.tool_calls = CALLS
    list(client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True))
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.response is not None
    assert end.response.message.tool_calls == [
        ToolCall(id=i, name=n, arguments="") for i, n, _ in CALLS
    ]
    assert "Paris" not in " ".join(str(e.model_dump()) for e in cap.events)


# -- redaction of non-text parts and settings ------------------------------------------------


def test_record_content_false_withholds_non_text_parts_and_settings(
    cap: Capture, client: openai.OpenAI
) -> None:
    """Images, files and refusals keep their type (and image detail), not their data;
    a setting that carries text (prediction) keeps its shape, not the text."""
    configure_redaction(record_content=False)
    messages: Any = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "summarise my record"},
                {
                    "type": "file",
                    "file": {
                        "filename": "record.pdf",
                        "file_data": "data:application/pdf;base64,U0VD",
                    },
                },
                {
                    "type": "image_url",
                    "image_url": {"url": "data:image/png;base64,SU1H", "detail": "high"},
                },
            ],
        },
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot discuss Doe"}]},
        {"role": "user", "content": "ok", "name": "John_Doe"},
    ]
    client.chat.completions.create(
        model="gpt-4o",
        messages=messages,
        temperature=0.5,
        max_tokens=20,
        reasoning_effort="low",
        user="john.doe@example.com",
        stop=["Doe"],
        stream_options={"include_usage": True},
        prediction={"type": "content", "content": "Patient SSN 078-05-1120"},
    )
    [start] = cap.events_of(LLMChatStartEvent)
    first, second, third = start.messages
    assert [(b.type, b.text, b.data) for b in first.blocks] == [
        ("text", "", {}),
        (
            "file",
            None,
            {"type": "file", "file": {"filename": "[redacted]", "file_data": "[redacted]"}},
        ),
        (
            "image_url",
            None,
            {"type": "image_url", "image_url": {"url": "[redacted]", "detail": "high"}},
        ),
    ]
    assert [(b.type, b.data) for b in second.blocks] == [
        ("refusal", {"type": "refusal", "refusal": "[redacted]"})
    ]
    assert third.additional_kwargs == {"name": "[redacted]"}
    assert start.additional_kwargs == {
        "temperature": 0.5,
        "max_tokens": 20,
        "reasoning_effort": "low",
        "user": "[redacted]",
        "stop": ["[redacted]"],
        "stream_options": {"include_usage": True},
        "prediction": {"type": "content", "content": "[redacted]"},
    }
    dumped = str(start.model_dump())
    for secret in ("U0VD", "SU1H", "Doe", "078-05-1120", "record", "example.com"):
        assert secret not in dumped


def test_a_mask_applies_to_non_text_parts_and_settings(cap: Capture, client: openai.OpenAI) -> None:
    """With a mask, the strings of parts and settings are masked, the rest kept."""
    configure_redaction(mask=lambda text: text.replace("Doe", "<name>"))
    messages: Any = [
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot discuss Doe"}]},
        {"role": "user", "content": "and Doe?"},
    ]
    client.chat.completions.create(
        model="gpt-4o", messages=messages, prediction={"type": "content", "content": "Doe is"}
    )
    [start] = cap.events_of(LLMChatStartEvent)
    assert start.messages[0].blocks[0].data == {
        "type": "refusal",
        "refusal": "I cannot discuss <name>",
    }
    assert start.messages[1].content == "and <name>?"
    assert start.additional_kwargs == {"prediction": {"type": "content", "content": "<name> is"}}


# -- switching off and on, with_raw_response, other libraries' wrappers -------------------------


def test_uninstrument_stops_tracing_the_cached_raw_response_objects(
    cap: Capture, client: openai.OpenAI
) -> None:
    """openai caches with_raw_response per client, holding the create() it first saw:
    ours, switched off, passes calls through; on again, it traces them once."""
    raw = client.chat.completions.with_raw_response
    raw.create(model="gpt-4o", messages=HELLO).parse()
    assert len(cap.events_of(LLMChatStartEvent)) == 1
    uninstrument_openai()
    assert client.chat.completions.with_raw_response is raw  # the same cached object
    assert raw.create(model="gpt-4o", messages=HELLO).parse().choices[0].message.content == ANSWER
    client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert len(cap.events_of(LLMChatStartEvent)) == 1
    instrument_openai()
    raw.create(model="gpt-4o", messages=HELLO).parse()
    client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert len(cap.events_of(LLMChatStartEvent)) == 3


def test_uninstrument_leaves_another_librarys_later_wrapper_in_place(
    cap: Capture, client: openai.OpenAI
) -> None:
    """A wrapper installed over ours survives uninstrument_openai(), ours then passing
    calls through; instrumenting again turns ours back on, tracing each call once."""
    uninstrument_openai()
    pristine = Completions.__dict__["create"]
    seen: list[str] = []

    def other(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        seen.append("other")
        return wrapped(*args, **kwargs)

    try:
        instrument_openai()
        wrapt.wrap_function_wrapper(Completions, "create", other)
        theirs = Completions.__dict__["create"]
        uninstrument_openai()
        assert not is_instrumented()
        assert Completions.__dict__["create"] is theirs
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
        assert seen == ["other"] and not cap.events_of(LLMChatStartEvent)
        instrument_openai()
        assert is_instrumented()
        assert Completions.__dict__["create"] is theirs  # no second wrapper of ours
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
        assert seen == ["other", "other"]
        assert len(cap.events_of(LLMChatStartEvent)) == 1
    finally:
        uninstrument_openai()
        Completions.create = pristine  # what the other library's removal would do


def test_the_module_imports_with_wrapt_1() -> None:
    """wrapt 1.x's ObjectProxy cannot be subscripted (pyproject allows wrapt>=1.16)."""
    code = """
import sys, types
fake = types.ModuleType("wrapt")
class ObjectProxy:  # as wrapt 1.x's: no __class_getitem__
    def __init__(self, wrapped): self.__wrapped__ = wrapped
fake.ObjectProxy = ObjectProxy
fake.wrap_function_wrapper = lambda *args: None
sys.modules["wrapt"] = fake
import instrumentation.llms.openai as patch
assert patch.TracedStream.__mro__[1] is ObjectProxy
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# -- aclose(), raw responses, legacy function calls, refusals, embeddings ---------------------


async def test_aclose_ends_an_async_stream_as_abandoned(
    cap: Capture, aclient: openai.AsyncOpenAI
) -> None:
    """openai's AsyncStream.aclose() is an alias of close(), and what
    contextlib.aclosing calls: it ends the span as abandoned, as close() does (it used to
    close the HTTP response behind the span's back, which then was dropped)."""
    stream = await aclient.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    await stream.__anext__()
    await stream.__anext__()
    await stream.aclose()
    assert stream.response.is_closed
    assert _abandoned(cap) == ["abandoned"]
    opened = await aclient.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    async with contextlib.aclosing(opened) as second:
        async for _ in second:
            break
    assert _abandoned(cap) == ["abandoned", "abandoned"]
    [first, _] = cap.events_of(LLMChatEndEvent)
    assert first.response is not None and first.response.message.content == "Echo:"


def test_every_closing_method_of_the_clients_streams_goes_through_the_span(
    cap: Capture, client: openai.OpenAI
) -> None:
    """The proxies override each closing method openai's streams have (the sync Stream
    has close() only), so none of them reaches the client's stream directly."""
    for traced, original in (
        (TracedStream, openai.Stream),
        (AsyncTracedStream, openai.AsyncStream),
    ):
        for name in ("close", "aclose"):
            assert not hasattr(original, name) or name in traced.__dict__, (traced, name)
    with contextlib.closing(
        client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    ) as stream:
        next(stream)
    assert _abandoned(cap) == ["abandoned"]


def _text_of(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _read_on_after_close(read: list[Any], after: list[Any], error: BaseException | None) -> None:
    """What a stream read on after ``close()`` gave, untraced or traced: the chunks the
    client had buffered, then the error of reading a closed response; or, had it
    buffered the whole reply, its rest. Never a quiet end with part of the reply."""
    text = _text_of(read + after)
    if error is None:
        assert text == ANSWER
    else:
        # Older openai releases let their HTTP library's own error through.
        httpx = sys.modules.get("httpx")
        older = (httpx.ReadError,) if httpx is not None else ()
        assert isinstance(error, (openai.APIConnectionError, *older)), repr(error)
        assert ANSWER.startswith(text)


@pytest.mark.parametrize("traced", [False, True])
def test_a_stream_read_on_after_close_is_the_clients_own(
    cap: Capture, client: openai.OpenAI, traced: bool
) -> None:
    """Read after ``close()``, a traced stream ended at once (StopIteration), as if the
    reply were complete, where the client's own stream gives what it had buffered and
    then raises. It is now the client's stream then; its span ended at the close."""
    if not traced:
        uninstrument_openai()
    for _ in range(5):  # what was buffered differs from one run to the next
        stream = client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
        read = [next(stream), next(stream)]
        stream.close()
        after: list[Any] = []
        try:
            after.extend(stream)
        except Exception as exc:
            _read_on_after_close(read, after, exc)
        else:
            _read_on_after_close(read, after, None)
    if traced:
        assert _abandoned(cap) == ["abandoned"] * 5
        for end in cap.events_of(LLMChatEndEvent):  # what was read before the close
            assert end.response is not None and end.response.message.content == "Echo:"


@pytest.mark.parametrize("traced", [False, True])
async def test_an_async_stream_read_on_after_close_is_the_clients_own(
    cap: Capture, aclient: openai.AsyncOpenAI, traced: bool
) -> None:
    if not traced:
        uninstrument_openai()
    for _ in range(5):
        stream = await aclient.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
        read = [await stream.__anext__(), await stream.__anext__()]
        await stream.close()
        after: list[Any] = []
        try:
            async for chunk in stream:
                after.append(chunk)
        except Exception as exc:
            _read_on_after_close(read, after, exc)
        else:
            _read_on_after_close(read, after, None)
    if traced:
        assert _abandoned(cap) == ["abandoned"] * 5


def _usage_of(end: LLMChatEndEvent) -> tuple[int, int, bool]:
    assert end.usage is not None
    return end.usage.prompt_tokens, end.usage.completion_tokens, end.usage.estimated


async def test_a_raw_response_records_the_reply_it_parses(
    cap: Capture, client: openai.OpenAI, aclient: openai.AsyncOpenAI, server: OpenAIServer
) -> None:
    """with_raw_response (not streamed): the body is there, so the end event has the
    reply's own usage, cost, finish reason and message, parsed as the application's
    parse() does; openai caches the parse, so it gets the very same object."""
    server.cached_tokens = 1
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO)
    araw = await aclient.chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO)
    plain = client.chat.completions.create(model="gpt-4o", messages=HELLO)
    from_raw, from_araw, reference = cap.events_of(LLMChatEndEvent)
    expected = (PROMPT_TOKENS_PER_MESSAGE, len(words(ANSWER)), False)
    for end, response in ((from_raw, raw), (from_araw, araw)):
        assert _usage_of(end) == expected
        assert end.usage == reference.usage and end.usage is not None
        assert end.usage.cached_tokens == 1
        assert end.cost_usd == reference.cost_usd and end.cost_usd is not None
        assert end.finish_reason == "stop"
        assert end.response is not None and end.response.message.content == ANSWER
        assert end.response.raw is response.parse()
    assert raw.parse().choices[0].message.content == plain.choices[0].message.content


@pytest.mark.parametrize("stream", [False, True])
async def test_a_response_read_after_the_call_records_no_made_up_usage(
    cap: Capture,
    client: openai.OpenAI,
    aclient: openai.AsyncOpenAI,
    stream: bool,
) -> None:
    """with_streaming_response, and with_raw_response streamed, return before the body
    is read: the end event (sent then) has no usage, no cost, no response and no finish
    reason, rather than an estimate saying the model wrote nothing; the application
    still reads the whole reply."""
    options: Any = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}

    def text_of(parsed: Any) -> str:
        if not stream:
            return str(parsed.choices[0].message.content)
        return "".join(c.choices[0].delta.content or "" for c in parsed if c.choices)

    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o", messages=HELLO, **options
    ) as response:
        assert text_of(response.parse()) == ANSWER
    async with aclient.chat.completions.with_streaming_response.create(
        model="gpt-4o", messages=HELLO, **options
    ) as aresponse:
        parsed = await aresponse.parse()
        if stream:
            assert "".join([c.choices[0].delta.content or "" async for c in parsed if c.choices])
        else:
            assert parsed.choices[0].message.content == ANSWER
    ends = cap.events_of(LLMChatEndEvent)
    if stream:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=HELLO, **options
        )
        assert text_of(raw.parse()) == ANSWER
        ends = cap.events_of(LLMChatEndEvent)
    assert len(ends) == (3 if stream else 2)
    for end in ends:
        assert end.usage is None and end.cost_usd is None
        assert end.response is None and end.finish_reason is None
        assert end.model == "gpt-4o" and end.latency_ms is not None
    assert not cap.events_of(SpanDropEvent)


def test_embeddings_through_raw_responses(cap: Capture, client: openai.OpenAI) -> None:
    """embeddings.with_raw_response: the reply's usage and vectors (decoded as openai
    decodes them for the application); with_streaming_response: no usage made up."""
    raw = client.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["alpha beta gamma delta"]
    )
    assert raw.parse().data[0].embedding == [22.0, 0.0, 0.5]
    with client.embeddings.with_streaming_response.create(
        model="text-embedding-3-small", input=["alpha beta gamma delta"]
    ) as response:
        assert response.parse().data[0].embedding == [22.0, 0.0, 0.5]
    parsed, streamed = cap.events_of(EmbeddingEndEvent)
    assert parsed.usage == TokenUsage(prompt_tokens=4, total_tokens=4)
    assert parsed.embeddings == [[22.0, 0.0, 0.5]] and parsed.cost_usd is not None
    assert streamed.usage is None and streamed.cost_usd is None and streamed.embeddings == []
    assert streamed.chunks == ["alpha beta gamma delta"]


WEATHER_ARGS = '{"city": "Paris"}'
LEGACY_CALL = ToolCall(name="get_weather", arguments=WEATHER_ARGS)
FUNCTIONS: Any = [{"name": "get_weather", "parameters": {"type": "object"}}]


def test_a_legacy_function_call_reply_is_recorded(
    cap: Capture, client: openai.OpenAI, server: OpenAIServer
) -> None:
    """functions=: a reply's message.function_call is the recorded message's tool call,
    as a tool call would be."""
    server.message = {
        "role": "assistant",
        "content": None,
        "function_call": {"name": "get_weather", "arguments": WEATHER_ARGS},
    }
    server.finish_reason = "function_call"
    reply = client.chat.completions.create(model="gpt-4o", messages=HELLO, functions=FUNCTIONS)
    assert reply.choices[0].message.function_call is not None
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.response is not None and end.finish_reason == "function_call"
    assert end.response.message.tool_calls == [LEGACY_CALL]
    assert end.response.message.content is None


def test_a_streamed_legacy_function_call_is_recorded(
    cap: Capture, client: openai.OpenAI, server: OpenAIServer
) -> None:
    """Streamed, delta.function_call fragments are put together; the arguments count in
    the estimate and the first fragment for the time to first token."""
    server.deltas = [
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather"}},
        {"function_call": {"arguments": '{"city"'}},
        {"function_call": {"arguments": ': "Paris"}'}},
    ]
    server.finish_reason = "function_call"
    list(client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True))
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.response is not None and end.response.message.tool_calls == [LEGACY_CALL]
    assert end.response.message.content is None
    assert end.finish_reason == "function_call"
    assert end.usage is not None and end.usage.estimated
    assert end.usage.completion_tokens == count_tokens(WEATHER_ARGS)
    assert end.time_to_first_token_ms is not None
    progress = cap.events_of(LLMChatInProgressEvent)
    assert progress[0].response.message.tool_calls == [ToolCall(name="get_weather")]
    assert progress[-1].response.message.tool_calls == [LEGACY_CALL]


def test_a_legacy_function_call_in_the_history_is_recorded(
    cap: Capture, client: openai.OpenAI
) -> None:
    """An assistant message with function_call in the request shows it as a tool call,
    counted in the prompt estimate."""
    history: Any = [
        *HELLO,
        {
            "role": "assistant",
            "content": None,
            "function_call": {"name": "get_weather", "arguments": WEATHER_ARGS},
        },
        {"role": "function", "name": "get_weather", "content": "sunny"},
    ]
    list(client.chat.completions.create(model="gpt-4o", messages=history, stream=True))
    [start] = cap.events_of(LLMChatStartEvent)
    assert start.messages[1].tool_calls == [LEGACY_CALL]
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.usage is not None and end.usage.estimated
    assert end.usage.prompt_tokens == sum(
        count_tokens(t) for t in ("hello there friend", WEATHER_ARGS, "sunny")
    )


REFUSAL = "I'm sorry, I can't help with that."


def _refusal(text: str) -> ContentBlock:
    return ContentBlock(type="refusal", data={"type": "refusal", "refusal": text})


def test_a_refusal_is_recorded(cap: Capture, client: openai.OpenAI, server: OpenAIServer) -> None:
    """message.refusal is a refusal part of the recorded message (content None, as the
    reply's), shaped as a refusal part of the request history is."""
    server.message = {"role": "assistant", "content": None, "refusal": REFUSAL}
    reply = client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert reply.choices[0].message.refusal == REFUSAL
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.response is not None
    assert end.response.message.blocks == [_refusal(REFUSAL)]
    assert end.response.message.content is None


def test_a_streamed_refusal_is_recorded(
    cap: Capture, client: openai.OpenAI, server: OpenAIServer
) -> None:
    """delta.refusal fragments are put together; they count in the estimate and for the
    time to first token."""
    server.deltas = [
        {"role": "assistant", "content": None, "refusal": ""},
        {"refusal": "I'm sorry,"},
        {"refusal": " I can't help with that."},
    ]
    list(client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True))
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.response is not None
    assert end.response.message.blocks == [_refusal(REFUSAL)]
    assert end.response.message.content is None
    assert end.usage is not None and end.usage.estimated
    assert end.usage.completion_tokens == count_tokens(REFUSAL)
    assert end.time_to_first_token_ms is not None
    progress = cap.events_of(LLMChatInProgressEvent)
    assert progress[0].response.message.blocks == []
    assert progress[1].response.message.blocks == [_refusal("I'm sorry,")]


@pytest.mark.parametrize("record_content", [False, True])
def test_refusals_are_redacted(
    cap: Capture, client: openai.OpenAI, server: OpenAIServer, record_content: bool
) -> None:
    """A refusal is text the model wrote: withheld with record_content=False (its type
    kept), masked by a mask, in the end and in-progress events alike."""
    if record_content:
        configure_redaction(mask=lambda text: text.replace("sorry", "<x>"))
        kept = REFUSAL.replace("sorry", "<x>")
    else:
        configure_redaction(record_content=False)
        kept = "[redacted]"
    server.message = {"role": "assistant", "content": None, "refusal": REFUSAL}
    client.chat.completions.create(model="gpt-4o", messages=HELLO)
    server.deltas = [{"role": "assistant", "refusal": REFUSAL}]
    list(client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True))
    for end in cap.events_of(LLMChatEndEvent):
        assert end.response is not None and end.response.message.blocks == [_refusal(kept)]
    for progress in cap.events_of(LLMChatInProgressEvent):  # the refusal, then the end
        assert progress.response.message.blocks == [_refusal(kept)]
    assert "sorry" not in " ".join(str(e.model_dump()) for e in cap.events)


def test_base64_embeddings_are_decoded(cap: Capture, client: openai.OpenAI) -> None:
    """encoding_format="base64" asked by the application: it gets the text, the end event
    the vectors (little-endian float32, as openai decodes them)."""
    response = client.embeddings.create(
        model="text-embedding-3-small", input=["alpha beta", "gamma"], encoding_format="base64"
    )
    assert isinstance(response.data[0].embedding, str)
    [end] = cap.events_of(EmbeddingEndEvent)
    assert end.embeddings == [[10.0, 0.0, 0.5], [5.0, 1.0, 0.5]]


def test_token_id_embeddings_record_their_vectors_and_count_their_tokens(
    cap: Capture, client: openai.OpenAI, server: OpenAIServer
) -> None:
    """An input of token ids has no text to record (no chunks); its vectors are kept,
    and with no usage in the reply the estimate is the number of token ids."""
    server.embedding_usage = False
    client.embeddings.create(model="text-embedding-3-small", input=[[1, 2, 3], [4, 5]])
    client.embeddings.create(model="text-embedding-3-small", input=["alpha beta"])
    ids, text = cap.events_of(EmbeddingEndEvent)
    assert ids.chunks == [] and len(ids.embeddings) == 2
    assert ids.usage == TokenUsage(prompt_tokens=5, total_tokens=5, estimated=True)
    assert text.usage == TokenUsage(prompt_tokens=2, total_tokens=2, estimated=True)


CUSTOM_CALL = {
    "id": "call_sql",
    "type": "custom",
    "custom": {"name": "run_sql", "input": "SELECT 1"},
}


def test_a_custom_tool_call_is_recorded_in_a_reply_and_in_the_history(
    cap: Capture, client: openai.OpenAI, server: OpenAIServer
) -> None:
    """A custom tool call (``type: "custom"``, ``custom: {name, input}``) has no
    ``function``: its name and input were recorded as empty strings."""
    server.message = {"role": "assistant", "content": None, "tool_calls": [CUSTOM_CALL]}
    completion = client.chat.completions.create(
        model="gpt-4o", messages=HELLO, tools=[{"type": "custom", "custom": {"name": "run_sql"}}]
    )
    [end] = cap.events_of(LLMChatEndEvent)
    expected = [ToolCall(id="call_sql", name="run_sql", arguments="SELECT 1")]
    assert end.response is not None and end.response.message.tool_calls == expected
    server.message = None
    history = [
        *HELLO,
        completion.choices[0].message,
        {"role": "tool", "tool_call_id": "call_sql", "content": "1"},
    ]
    client.chat.completions.create(model="gpt-4o", messages=history)
    assert cap.events_of(LLMChatStartEvent)[-1].messages[1].tool_calls == expected


def test_a_streamed_custom_tool_call_is_recorded(
    cap: Capture, client: openai.OpenAI, server: OpenAIServer
) -> None:
    """Streamed, a custom tool call's fragments carry ``custom`` (name, then input in
    pieces) in place of ``function``."""
    server.deltas = [
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_sql",
                    "type": "custom",
                    "custom": {"name": "run_sql", "input": ""},
                }
            ]
        },
        {"tool_calls": [{"index": 0, "custom": {"input": "SELECT"}}]},
        {"tool_calls": [{"index": 0, "custom": {"input": " 1"}}]},
    ]
    server.finish_reason = "tool_calls"
    list(client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True))
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.response is not None
    assert end.response.message.tool_calls == [
        ToolCall(id="call_sql", name="run_sql", arguments="SELECT 1")
    ]


TOOL = {
    "type": "function",
    "function": {"name": "f", "parameters": {"type": "object", "properties": {}}},
}


def test_a_generator_of_tools_is_sent_whole_when_a_handler_serialises_the_start_event(
    client: openai.OpenAI, server: OpenAIServer
) -> None:
    """openai types ``tools`` (and ``functions``) as any iterable. A handler serialising
    the start event (as a JSON log or a store does) read the generator the event held,
    and the request went out with ``"tools": []``."""
    dumped: list[str] = []

    class Dumper(BaseEventHandler):
        def handle(self, event: BaseEvent, **kwargs: Any) -> None:
            if isinstance(event, LLMChatStartEvent):
                dumped.append(event.model_dump_json())

    with isolated() as cap:
        get_dispatcher().add_event_handler(Dumper())
        client.chat.completions.create(
            model="gpt-4o",
            messages=HELLO,
            tools=(t for t in [TOOL]),
            functions=(f for f in [TOOL["function"]]),
        )
        [start] = cap.events_of(LLMChatStartEvent)
    body = server.requests[-1]["body"]
    assert body["tools"] == [TOOL] and body["functions"] == [TOOL["function"]]
    assert start.additional_kwargs["tools"] == [TOOL]
    assert json.loads(dumped[0])["additional_kwargs"]["tools"] == [TOOL]


def test_a_generator_of_embedding_inputs_is_recorded(
    cap: Capture, client: openai.OpenAI, server: OpenAIServer
) -> None:
    """The texts of an embedding are read after the call: a generator, used up by the
    client by then, left the event with no chunks."""
    client.embeddings.create(model="text-embedding-3-small", input=(t for t in ["a b", "c"]))
    assert server.requests[-1]["body"]["input"] == ["a b", "c"]
    [end] = cap.events_of(EmbeddingEndEvent)
    assert end.chunks == ["a b", "c"] and len(end.embeddings) == 2


def test_token_ids_given_as_generators_are_counted(
    cap: Capture, client: openai.OpenAI, server: OpenAIServer
) -> None:
    """Token ids inside the input given as iterators (``Iterable[Iterable[int]]``) are
    read once, into lists the client sends: it used them up, and a reply with no usage
    was estimated at 0 tokens (no cost) where the same ids in lists count 5."""
    server.embedding_usage = False
    client.embeddings.create(model="text-embedding-3-small", input=[iter([1, 2, 3]), iter([4, 5])])
    client.embeddings.create(
        model="text-embedding-3-small", input=(iter(ids) for ids in ([1, 2, 3], [4, 5]))
    )
    assert [r["body"]["input"] for r in server.requests] == [[[1, 2, 3], [4, 5]]] * 2
    for end in cap.events_of(EmbeddingEndEvent):
        assert end.usage == TokenUsage(prompt_tokens=5, total_tokens=5, estimated=True)
        assert len(end.embeddings) == 2


def test_retries_are_one_call(cap: Capture, server: OpenAIServer) -> None:
    """The client's retries (429, then 500, then a reply) are one call: one span, one
    start and one end event, with the reply's usage."""
    server.fail_first = [429, 500]
    with openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=2) as retrying:
        retrying.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert len(server.requests) == 3
    assert len(cap.events_of(LLMChatStartEvent)) == 1
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.usage is not None and not end.usage.estimated
    assert [s.name for s in cap.spans] == [CHAT_SPAN]


async def test_an_error_event_in_a_stream_reaches_the_reader_and_drops_the_span(
    cap: Capture, client: openai.OpenAI, aclient: openai.AsyncOpenAI, server: OpenAIServer
) -> None:
    """An error sent in the stream is the client's own ``APIError``, raised to the
    reader (sync and async); the span is dropped and no end event is sent."""
    server.stream_error_after = 3
    with pytest.raises(openai.APIError, match="injected stream error"):
        list(client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True))
    stream = await aclient.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    with pytest.raises(openai.APIError, match="injected stream error"):
        async for _ in stream:
            pass
    assert cap.events_of(LLMChatEndEvent) == []
    assert len(cap.events_of(SpanDropEvent)) == 2
