"""instrument_openai() against a real loopback server speaking the OpenAI protocol."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai.resources.chat.completions import AsyncCompletions, Completions
from openai.resources.embeddings import Embeddings

from instrumentation import BaseEventHandler, SpanDropEvent, get_dispatcher, telemetry
from instrumentation.events.base import BaseEvent
from instrumentation.llms import (
    EmbeddingEndEvent,
    EmbeddingStartEvent,
    LLMChatEndEvent,
    LLMChatInProgressEvent,
    LLMChatStartEvent,
    configure_redaction,
)
from instrumentation.llms.openai import (
    CHAT_SPAN,
    EMBEDDING_SPAN,
    instrument_openai,
    is_instrumented,
    uninstrument_openai,
)
from instrumentation.testing import Capture, isolated

from .openai_server import PROMPT_TOKENS_PER_MESSAGE, OpenAIServer, words

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
    server.cached_tokens = 0
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
