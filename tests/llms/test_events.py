"""The LLM event contract: field names, validation, and the isinstance tuples."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from instrumentation.events.embedding import EmbeddingEndEvent as EmbeddingEndFromModule
from instrumentation.llms import (
    LLM_END_EVENTS,
    LLM_IN_PROGRESS_EVENTS,
    LLM_START_EVENTS,
    ChatMessage,
    ChatResponse,
    ContentBlock,
    EmbeddingEndEvent,
    EmbeddingStartEvent,
    LLMChatEndEvent,
    LLMChatInProgressEvent,
    LLMChatStartEvent,
    LLMCompletionEndEvent,
    LLMCompletionStartEvent,
    LLMPredictEndEvent,
    LLMStructuredPredictEndEvent,
    LLMStructuredPredictInProgressEvent,
    LLMStructuredPredictStartEvent,
    MessageRole,
    TokenUsage,
    ToolCall,
)


def test_unknown_role_is_a_validation_error_naming_role() -> None:
    """A message with a role that is not one of MessageRole's is rejected, naming 'role'."""
    with pytest.raises(ValidationError) as info:
        ChatMessage(role="boss", content="hi")  # type: ignore[arg-type]
    assert info.value.errors()[0]["loc"] == ("role",)


@pytest.mark.parametrize("field", ["prompt_tokens", "completion_tokens", "cached_tokens"])
def test_negative_token_count_is_a_validation_error_naming_the_field(field: str) -> None:
    """Token counts are non-negative; a negative one names its field."""
    with pytest.raises(ValidationError) as info:
        TokenUsage(**{field: -1})
    assert info.value.errors()[0]["loc"] == (field,)


@pytest.mark.parametrize("event_cls", [LLMChatStartEvent, LLMChatEndEvent])
def test_non_string_model_is_a_validation_error_naming_model(event_cls: type) -> None:
    """``model`` must be a str: an int is not silently turned into one."""
    with pytest.raises(ValidationError) as info:
        event_cls(messages=[], model=4)
    assert info.value.errors()[0]["loc"] == ("model",)


def test_content_is_the_joined_text_blocks() -> None:
    """A multi-block message's content is its text blocks joined; other blocks are kept."""
    message = ChatMessage(
        role="user",
        blocks=[
            ContentBlock(text="first"),
            ContentBlock(type="image_url", data={"url": "x"}),
            ContentBlock(text="second"),
        ],
    )
    assert message.content == "first\nsecond"
    assert message.role is MessageRole.USER
    assert len(message.blocks) == 3


def test_total_tokens_is_filled_in_when_not_given() -> None:
    """total_tokens defaults to prompt + completion; estimated is False by default."""
    usage = TokenUsage(prompt_tokens=3, completion_tokens=4)
    assert usage.total_tokens == 7
    assert usage.estimated is False


def test_events_keep_llama_index_field_names() -> None:
    """The guide's field names exist, with model/provider on starts and usage etc. on ends."""
    start = LLMChatStartEvent(messages=[], additional_kwargs={"t": 1}, model_dict={}, model="m")
    assert {"messages", "additional_kwargs", "model_dict", "model", "provider"} <= set(
        start.model_dump()
    )
    end = LLMChatEndEvent(
        messages=[],
        response=ChatResponse(message=ChatMessage(role="assistant", content="x")),
        usage=TokenUsage(prompt_tokens=1),
    )
    dumped = end.model_dump()
    for name in (
        "usage",
        "latency_ms",
        "time_to_first_token_ms",
        "finish_reason",
        "cost_usd",
        "model",
        "provider",
    ):
        assert name in dumped
    assert dumped["class_name"] == "LLMChatEndEvent"
    assert LLMCompletionStartEvent(prompt="p").prompt == "p"
    assert LLMStructuredPredictStartEvent(output_cls="X", template="t").output_cls == "X"
    assert EmbeddingEndEvent(chunks=["a"], embeddings=[[0.5]]).embeddings == [[0.5]]


def test_tuples_classify_events() -> None:
    """LLM_START/IN_PROGRESS/END_EVENTS hold exactly the right classes."""
    assert LLMChatStartEvent in LLM_START_EVENTS and EmbeddingStartEvent in LLM_START_EVENTS
    assert LLMChatInProgressEvent in LLM_IN_PROGRESS_EVENTS
    # LlamaIndex's streamed structured prediction event is there under its name too.
    partial = LLMStructuredPredictInProgressEvent(output={"name": "Ada"}, model="m")
    assert isinstance(partial, LLM_IN_PROGRESS_EVENTS)
    assert not isinstance(partial, LLM_START_EVENTS + LLM_END_EVENTS)
    assert partial.model_dump()["output"] == {"name": "Ada"}
    assert LLMStructuredPredictEndEvent in LLM_END_EVENTS
    assert LLMChatEndEvent not in LLM_START_EVENTS
    for cls in (LLMChatEndEvent, LLMCompletionEndEvent, LLMPredictEndEvent, EmbeddingEndEvent):
        assert cls in LLM_END_EVENTS
    assert EmbeddingEndFromModule is EmbeddingEndEvent


def test_sparse_embedding_events_as_llamaindex_has_them() -> None:
    """LlamaIndex's sparse embedding events import from the same module: the start is
    a kind of EmbeddingStartEvent; the end keeps token id -> weight maps, validated."""
    from instrumentation.events.embedding import (
        SparseEmbeddingEndEvent,
        SparseEmbeddingStartEvent,
    )

    start = SparseEmbeddingStartEvent(model_dict={"model_name": "splade"})
    assert isinstance(start, EmbeddingStartEvent) and isinstance(start, LLM_START_EVENTS)
    assert start.class_name() == "SparseEmbeddingStartEvent"
    end = SparseEmbeddingEndEvent(chunks=["a"], embeddings=[{"7": 0.5, 3: 1}])
    assert end.embeddings == [{7: 0.5, 3: 1.0}] and isinstance(end, LLM_END_EVENTS)
    assert end.model_dump()["class_name"] == "SparseEmbeddingEndEvent"
    with pytest.raises(ValidationError) as info:
        SparseEmbeddingEndEvent(chunks=["a"], embeddings=[[0.5]])
    assert info.value.errors()[0]["loc"][0] == "embeddings"


def test_tool_call_needs_a_name() -> None:
    """A tool call without a name is rejected naming 'name'."""
    with pytest.raises(ValidationError) as info:
        ToolCall(id="1", arguments="{}")  # type: ignore[call-arg]
    assert info.value.errors()[0]["loc"] == ("name",)
