"""LLM events as GenAI semantic-convention and OpenInference attributes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from instrumentation import root_dispatcher
from instrumentation.events.llm import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    EmbeddingEndEvent,
    EmbeddingStartEvent,
    LLMChatEndEvent,
    LLMChatInProgressEvent,
    LLMChatStartEvent,
    LLMCompletionEndEvent,
    LLMCompletionStartEvent,
    MessageRole,
    TokenUsage,
    ToolCall,
)
from instrumentation.otel import genai

from .conftest import Traced, hex_span, make_traced, short

MESSAGES = [
    ChatMessage(role=MessageRole.SYSTEM, content="Be brief."),
    ChatMessage(role=MessageRole.USER, content="Capital of France?"),
]
ANSWER = ChatMessage(
    role=MessageRole.ASSISTANT,
    content="Paris.",
    tool_calls=[ToolCall(id="call_1", name="lookup", arguments='{"q":"France"}')],
)


def _chat(traced: Traced, stream: bool = False) -> None:
    d = traced.dispatcher

    @d.span
    def chat() -> None:
        d.event(
            LLMChatStartEvent(
                messages=MESSAGES,
                additional_kwargs={"temperature": 0.2, "max_tokens": 64, "stop": "END"},
                model_dict={"model": "gpt-test"},
                model="gpt-test",
                provider="openai",
            )
        )
        if stream:
            for delta in ("Par", "is."):
                d.event(
                    LLMChatInProgressEvent(
                        messages=MESSAGES,
                        response=ChatResponse(message=ANSWER, delta=delta),
                        model="gpt-test",
                    )
                )
        d.event(
            LLMChatEndEvent(
                messages=MESSAGES,
                response=ChatResponse(message=ANSWER, raw={"id": "chatcmpl-1"}),
                model="gpt-test-2024",
                provider="openai",
                usage=TokenUsage(prompt_tokens=12, completion_tokens=3, cached_tokens=4),
                finish_reason="stop",
                latency_ms=12.5,
                cost_usd=0.001,
            )
        )

    chat()


def test_chat_span_gets_genai_attributes(traced: Traced) -> None:
    """Start and end events put the GenAI conventions' attributes on the call's span."""
    _chat(traced)
    (span,) = traced.spans()
    a: dict[str, Any] = dict(span.attributes or {})
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "gpt-test"
    assert a["gen_ai.response.model"] == "gpt-test-2024"
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.temperature"] == 0.2
    assert a["gen_ai.request.max_tokens"] == 64
    assert a["gen_ai.request.stop_sequences"] == ("END",)
    assert a["gen_ai.usage.input_tokens"] == 12
    assert a["gen_ai.usage.output_tokens"] == 3
    assert a["gen_ai.usage.cache_read.input_tokens"] == 4
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert a["gen_ai.response.id"] == "chatcmpl-1"
    assert a["instrumentation.llm.latency_ms"] == 12.5
    inputs = json.loads(a["gen_ai.input.messages"])
    assert inputs[1] == {
        "role": "user",
        "parts": [{"type": "text", "content": "Capital of France?"}],
    }
    (output,) = json.loads(a["gen_ai.output.messages"])
    assert output["role"] == "assistant" and output["finish_reason"] == "stop"
    assert output["parts"][1] == {
        "type": "tool_call",
        "id": "call_1",
        "name": "lookup",
        "arguments": '{"q":"France"}',
    }
    assert not any(k.startswith(("llm.", "openinference.", "input.")) for k in a)
    assert [e.name for e in span.events] == ["LLMChatStartEvent", "LLMChatEndEvent"]
    end = dict(span.events[1].attributes or {})
    assert end["gen_ai.usage.output_tokens"] == 3


def test_stream_chunks_are_span_events_with_their_delta(traced: Traced) -> None:
    """In-progress events become span events carrying just the chunk."""
    _chat(traced, stream=True)
    (span,) = traced.spans()
    chunks = [e for e in span.events if e.name == "LLMChatInProgressEvent"]
    assert [dict(e.attributes or {})["delta"] for e in chunks] == ["Par", "is."]


def test_openinference_attributes_behind_the_switch(traced_oi: Traced) -> None:
    """openinference=True adds OpenInference's attributes; other spans are CHAIN."""
    d = traced_oi.dispatcher

    @d.span
    def pipeline() -> None:
        _chat(traced_oi)

    pipeline()
    spans = {short(s.name): s for s in traced_oi.spans()}
    assert dict(spans["pipeline"].attributes or {})["openinference.span.kind"] == "CHAIN"
    a: dict[str, Any] = dict(spans["chat"].attributes or {})
    assert a["openinference.span.kind"] == "LLM"
    assert a["llm.model_name"] == "gpt-test"
    assert a["llm.provider"] == "openai"
    assert json.loads(a["llm.invocation_parameters"])["temperature"] == 0.2
    assert a["llm.input_messages.0.message.role"] == "system"
    assert a["llm.input_messages.1.message.content"] == "Capital of France?"
    assert a["llm.output_messages.0.message.role"] == "assistant"
    assert a["llm.output_messages.0.message.content"] == "Paris."
    assert a["llm.output_messages.0.message.tool_calls.0.tool_call.function.name"] == "lookup"
    assert (a["llm.token_count.prompt"], a["llm.token_count.completion"]) == (12, 3)
    assert a["llm.token_count.total"] == 15
    assert json.loads(a["input.value"])[1]["content"] == "Capital of France?"
    assert a["input.mime_type"] == "application/json"
    assert a["output.value"] == "Paris."
    assert a["gen_ai.operation.name"] == "chat"  # GenAI stays on


@pytest.fixture
def traced_no_content() -> Iterator[Traced]:
    yield from make_traced(openinference=True, capture_content=False)


def test_capture_content_off_keeps_counts_not_text(traced_no_content: Traced) -> None:
    """capture_content=False leaves prompts and answers out, counts and models in."""
    _chat(traced_no_content, stream=True)
    (span,) = traced_no_content.spans()
    a: dict[str, Any] = dict(span.attributes or {})
    assert a["gen_ai.usage.input_tokens"] == 12 and a["llm.token_count.total"] == 15
    text_keys = [k for k in a if "messages" in k or k in ("input.value", "output.value")]
    assert text_keys == []
    assert all("delta" not in dict(e.attributes or {}) for e in span.events)


def test_completion_and_embedding_operations(traced_oi: Traced) -> None:
    """Completions and embeddings get their own operation names and OpenInference kinds."""
    d = traced_oi.dispatcher

    @d.span
    def complete() -> None:
        d.event(LLMCompletionStartEvent(prompt="2+2=", model="m1", additional_kwargs={"n": 1}))
        d.event(
            LLMCompletionEndEvent(
                prompt="2+2=",
                response=CompletionResponse(text="4"),
                usage=TokenUsage(prompt_tokens=3, completion_tokens=1),
            )
        )

    @d.span
    def embed() -> None:
        d.event(EmbeddingStartEvent(model_dict={"model_name": "emb-1"}))
        d.event(EmbeddingEndEvent(chunks=["a", "b"], embeddings=[[0.1, 0.2, 0.3]] * 2))

    complete()
    embed()
    spans: dict[str, dict[str, Any]] = {
        short(s.name): dict(s.attributes or {}) for s in traced_oi.spans()
    }
    c, e = spans["complete"], spans["embed"]
    assert c["gen_ai.operation.name"] == "text_completion"
    assert c["gen_ai.request.choice.count"] == 1
    assert c["openinference.span.kind"] == "LLM"
    assert (c["input.value"], c["output.value"]) == ("2+2=", "4")
    assert c["llm.prompts"] == ("2+2=",)
    assert e["gen_ai.operation.name"] == "embeddings"
    assert e["gen_ai.request.model"] == "emb-1"
    assert e["gen_ai.embeddings.dimension.count"] == 3
    assert e["openinference.span.kind"] == "EMBEDDING"
    assert e["embedding.model_name"] == "emb-1"
    assert e["embedding.embeddings.1.embedding.text"] == "b"


def test_sparse_embeddings_are_embedding_operations(traced_oi: Traced) -> None:
    """LlamaIndex's sparse embedding events make an embeddings span too."""
    from instrumentation.events.embedding import (
        SparseEmbeddingEndEvent,
        SparseEmbeddingStartEvent,
    )

    d = traced_oi.dispatcher

    @d.span
    def embed_sparse() -> None:
        d.event(SparseEmbeddingStartEvent(model_dict={"model_name": "splade"}))
        d.event(SparseEmbeddingEndEvent(chunks=["a"], embeddings=[{7: 0.5}]))

    embed_sparse()
    [span] = [s for s in traced_oi.spans() if short(s.name) == "embed_sparse"]
    a = dict(span.attributes or {})
    assert a["gen_ai.operation.name"] == "embeddings"
    assert a["gen_ai.request.model"] == "splade"
    assert a["openinference.span.kind"] == "EMBEDDING"


def test_non_llm_events_are_not_llm_events() -> None:
    """kind_of tells LLM events apart and is None for anything else."""
    assert genai.kind_of(LLMChatStartEvent(messages=[])) == genai.START
    assert genai.kind_of(EmbeddingEndEvent()) == genai.END
    assert genai.kind_of(object()) is None


@pytest.fixture
def traced_root() -> Iterator[Traced]:
    """The handler on the root dispatcher, where the LLM layer's spans arrive."""
    gen = make_traced(openinference=True)
    traced = next(gen)
    root_dispatcher.add_span_handler(traced.handler)
    root_dispatcher.add_event_handler(traced.handler)
    try:
        yield traced
    finally:
        root_dispatcher.remove_span_handler(traced.handler)
        root_dispatcher.remove_event_handler(traced.handler)
        gen.close()


def hex_int(span: Any) -> int:
    return int(hex_span(span), 16)


def test_offline_llm_calls_end_to_end(traced_root: Traced) -> None:
    """The real LLM layer's chat and stream produce GenAI spans under the caller's span."""
    from instrumentation.llms import OfflineLLM

    llm = OfflineLLM(answers={"france": "Paris is the capital."})
    d = traced_root.dispatcher

    @d.span
    def ask() -> str:
        answer = llm.chat("Capital of France?", temperature=0.1)
        text = "".join(chunk.delta or "" for chunk in llm.stream_chat("And France again?"))
        return (answer.message.content or "") + "|" + text

    assert ask() == "Paris is the capital.|Paris is the capital."
    spans = traced_root.spans()
    ask_span = next(s for s in spans if short(s.name) == "ask")
    llm_spans = [s for s in spans if s is not ask_span and s.attributes]
    llm_spans = [s for s in llm_spans if "gen_ai.operation.name" in (s.attributes or {})]
    assert len(llm_spans) == 2
    for span in llm_spans:
        a: dict[str, Any] = dict(span.attributes or {})
        assert span.parent is not None and span.parent.span_id == hex_int(ask_span)
        assert a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.provider.name"] == "offline"
        assert a["gen_ai.usage.output_tokens"] > 0
        assert a["openinference.span.kind"] == "LLM"
        assert a["output.value"] == "Paris is the capital."
    assert any(dict(s.attributes or {}).get("gen_ai.request.temperature") == 0.1 for s in llm_spans)


def _long_chat(traced: Traced, messages: list[ChatMessage], chunks: int = 0, **kwargs: Any) -> None:
    d = traced.dispatcher

    @d.span
    def chat() -> None:
        d.event(
            LLMChatStartEvent(
                messages=messages,
                additional_kwargs={"temperature": 0.2, **kwargs},
                model="gpt-test",
                provider="openai",
            )
        )
        for i in range(chunks):
            d.event(
                LLMChatInProgressEvent(
                    messages=messages, response=ChatResponse(message=ANSWER, delta=f"{i} ")
                )
            )
        d.event(
            LLMChatEndEvent(
                messages=messages,
                response=ChatResponse(message=ANSWER),
                model="gpt-test",
                usage=TokenUsage(prompt_tokens=900, completion_tokens=3),
            )
        )

    chat()


def test_a_long_chat_keeps_the_model_and_kind_within_the_attribute_limit(
    traced_oi: Traced, caplog: pytest.LogCaptureFixture
) -> None:
    """Two or more OpenInference attributes a message: with 81 messages the SDK's 128
    attributes ran out and it dropped the oldest - the model, the request's parameters,
    the span kind - logging a warning for each. The latest messages are kept, within
    MAX_MESSAGE_ATTRIBUTES, numbered from 0, and the rest counted."""
    history = [
        ChatMessage(role=MessageRole.USER if i % 2 else MessageRole.ASSISTANT, content=f"m{i}")
        for i in range(81)
    ]
    with caplog.at_level("WARNING"):
        _long_chat(traced_oi, history)
    (span,) = traced_oi.spans()
    a: dict[str, Any] = dict(span.attributes or {})
    assert a["openinference.span.kind"] == "LLM" and a["llm.model_name"] == "gpt-test"
    assert a["gen_ai.request.model"] == "gpt-test" and a["gen_ai.request.temperature"] == 0.2
    per_message = [k for k in a if k.startswith("llm.input_messages.")]
    assert len(per_message) <= genai.MAX_MESSAGE_ATTRIBUTES
    kept = len(per_message) // 2
    assert a["instrumentation.llm.messages_omitted"] == 81 - kept
    assert a[f"llm.input_messages.{kept - 1}.message.content"] == "m80"
    assert a["llm.input_messages.0.message.content"] == f"m{81 - kept}"
    assert len(a) < 128 and span.dropped_attributes == 0
    assert "dict is full" not in caplog.text


def test_json_attributes_of_a_long_chat_stay_json(traced_oi: Traced) -> None:
    """gen_ai.input.messages and input.value were cut at 8192 characters after being
    serialised: no longer JSON, so backends showed them as a raw string. Now the
    contents are cut (then the oldest messages left out) until the JSON fits."""
    history = [
        ChatMessage(role=MessageRole.USER, content=f"{i}: " + 'a "quoted"\nline ' * 40)
        for i in range(60)
    ]
    _long_chat(traced_oi, history)
    (span,) = traced_oi.spans()
    a: dict[str, Any] = dict(span.attributes or {})
    for key in ("gen_ai.input.messages", "input.value"):
        assert len(a[key]) <= 8192
        parsed = json.loads(a[key])
        assert isinstance(parsed, list) and parsed
    genai_messages = json.loads(a["gen_ai.input.messages"])
    assert genai_messages[-1]["parts"][0]["content"].startswith("59: ")


def test_capture_content_off_withholds_text_in_the_invocation_parameters(
    traced_no_content: Traced,
) -> None:
    """llm.invocation_parameters carried a predicted output and tool descriptions as
    they were: content, which capture_content=False keeps off the span."""
    _long_chat(
        traced_no_content,
        MESSAGES,
        prediction={"type": "content", "content": "SECRET-PREDICTION"},
        tools=[{"type": "function", "function": {"name": "f", "description": "SECRET-TOOL"}}],
        max_tokens=64,
    )
    (span,) = traced_no_content.spans()
    a: dict[str, Any] = dict(span.attributes or {})
    params = json.loads(a["llm.invocation_parameters"])
    assert "SECRET" not in a["llm.invocation_parameters"]
    assert params["temperature"] == 0.2 and params["max_tokens"] == 64
    assert params["prediction"]["type"] == "content"


def test_a_long_stream_keeps_its_start_and_end_events(traced: Traced) -> None:
    """The SDK keeps 128 events a span and drops the oldest: 300 chunks pushed out the
    start event. The first MAX_PROGRESS_EVENTS chunks are kept and the rest counted."""
    from instrumentation.otel.spans import MAX_PROGRESS_EVENTS

    _long_chat(traced, MESSAGES, chunks=300)
    (span,) = traced.spans()
    names = [e.name for e in span.events]
    assert names[0] == "LLMChatStartEvent" and names[-1] == "LLMChatEndEvent"
    assert names.count("LLMChatInProgressEvent") == MAX_PROGRESS_EVENTS
    omitted = dict(span.attributes or {})["instrumentation.llm.chunk_events_omitted"]
    assert omitted == 300 - MAX_PROGRESS_EVENTS


def test_a_long_chat_keeps_its_latest_messages_readable_in_the_json(traced_oi: Traced) -> None:
    """With many long messages every string was cut to 32 characters (the question
    asked last too) before any message was left out: the latest are kept readable."""
    question = "FINAL QUESTION: please explain how the parts fit together, in detail"
    history = [
        ChatMessage(role=MessageRole.USER, content=f"m{i} " + "x" * 500) for i in range(200)
    ] + [ChatMessage(role=MessageRole.USER, content=question)]
    _long_chat(traced_oi, history)
    (span,) = traced_oi.spans()
    messages = json.loads(dict(span.attributes or {})["gen_ai.input.messages"])
    assert messages[-1]["parts"][0]["content"] == question
    assert 5 < len(messages) < 201
    assert all(len(m["parts"][0]["content"]) >= 256 for m in messages[:-1])


def test_a_message_with_many_tool_calls_keeps_the_model_and_kind(traced_oi: Traced) -> None:
    """One message of 45 tool calls (on the way in and on the way out) took more than
    the SDK's 128 attributes by itself, and the kind and model were dropped."""
    calls = [ToolCall(id=f"c{j}", name="lookup", arguments="{}") for j in range(45)]
    busy = ChatMessage(role=MessageRole.ASSISTANT, content=None, tool_calls=calls)
    d = traced_oi.dispatcher

    @d.span
    def chat() -> None:
        d.event(LLMChatStartEvent(messages=[busy], model="gpt-test", provider="openai"))
        d.event(
            LLMChatEndEvent(messages=[busy], response=ChatResponse(message=busy), model="gpt-test")
        )

    chat()
    (span,) = traced_oi.spans()
    a: dict[str, Any] = dict(span.attributes or {})
    assert span.dropped_attributes == 0
    assert a["openinference.span.kind"] == "LLM" and a["llm.model_name"] == "gpt-test"
    kept_in = sum(k.endswith(".function.name") for k in a if k.startswith("llm.input_"))
    kept_out = sum(k.endswith(".function.name") for k in a if k.startswith("llm.output_"))
    assert a["llm.input_messages.0.message.tool_calls_omitted"] == 45 - kept_in
    assert a["llm.output_messages.0.message.tool_calls_omitted"] == 45 - kept_out
    assert kept_in > 0 and kept_out > 0
