"""LLM and embedding events: the contract between instrumented LLMs and their consumers.

Field names follow LlamaIndex's events where those exist (``messages``,
``additional_kwargs``, ``model_dict``, ``response``, ...), so handlers written for
LlamaIndex read these unchanged. What LlamaIndex lacks, and every consumer here needs,
is on the events themselves: ``model``/``provider`` on every start and end event, and
``usage``, ``latency_ms``, ``time_to_first_token_ms``, ``finish_reason`` and
``cost_usd`` on every end event. Usage and cost belong to the model call: the end
events of ``predict`` and ``structured_predict``, which wrap a chat call with its own
end event, leave them None, so that summing over :data:`LLM_END_EVENTS` counts each
call once.

A failed call emits no end event: its span is dropped instead. Redaction happens
before these events are created, so a consumer uses the text it gets.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, StrictStr, model_validator

from instrumentation.events.base import BaseEvent

#: The role names :class:`ChatMessage` accepts in place of a :class:`MessageRole`.
RoleName = Literal["system", "user", "assistant", "tool", "function", "developer"]


class MessageRole(str, Enum):
    """Who speaks in a chat message (the OpenAI role names)."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"
    FUNCTION = "function"
    DEVELOPER = "developer"


class ContentBlock(BaseModel):
    """One part of a multi-part message: ``type`` "text" carries ``text``; others (images,
    audio, ...) keep their payload in ``data`` so nothing is lost in translation."""

    model_config = ConfigDict(extra="forbid")

    type: StrictStr = "text"
    text: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class ToolCall(BaseModel):
    """A function/tool call requested by the model; ``arguments`` is the raw JSON text."""

    id: str | None = None
    name: StrictStr
    arguments: str = ""


class ChatMessage(BaseModel):
    """One chat message. ``content`` is its text; for multi-block messages it is the text
    blocks joined with newlines (filled in from ``blocks`` when not given)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    role: MessageRole = MessageRole.USER
    content: str | None = None
    blocks: list[ContentBlock] = Field(default_factory=list)
    tool_calls: list[ToolCall] = Field(default_factory=list)
    additional_kwargs: dict[str, Any] = Field(default_factory=dict)

    if TYPE_CHECKING:
        # What type checkers see: the role may be given by name, as everyone writes it
        # (pydantic turns "user" into MessageRole.USER).
        def __init__(
            self,
            *,
            role: MessageRole | RoleName = MessageRole.USER,
            content: str | None = None,
            blocks: list[ContentBlock] = ...,
            tool_calls: list[ToolCall] = ...,
            additional_kwargs: dict[str, Any] = ...,
        ) -> None: ...

    @model_validator(mode="after")
    def _content_from_blocks(self) -> ChatMessage:
        if self.content is None and self.blocks:
            texts = [b.text for b in self.blocks if b.type == "text" and b.text is not None]
            if texts:
                self.content = "\n".join(texts)
        return self

    def __str__(self) -> str:
        return f"{self.role.value}: {self.content or ''}"


class TokenUsage(BaseModel):
    """Token counts of one call. ``estimated`` is True when we counted them ourselves
    (e.g. a stream abandoned before the provider reported usage)."""

    prompt_tokens: NonNegativeInt = 0
    completion_tokens: NonNegativeInt = 0
    total_tokens: NonNegativeInt = 0
    cached_tokens: NonNegativeInt | None = None
    reasoning_tokens: NonNegativeInt | None = None
    estimated: bool = False

    @model_validator(mode="after")
    def _fill_total(self) -> TokenUsage:
        if self.total_tokens == 0:
            self.total_tokens = self.prompt_tokens + self.completion_tokens
        return self


class ChatResponse(BaseModel):
    """A chat answer; while streaming, ``message`` holds the text so far and ``delta`` the
    newest chunk. ``raw`` is the provider's own object, when there is one."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    message: ChatMessage
    delta: str | None = None
    raw: Any = None
    additional_kwargs: dict[str, Any] = Field(default_factory=dict)

    def __str__(self) -> str:
        return str(self.message)


class CompletionResponse(BaseModel):
    """A completion answer; ``text`` so far and ``delta`` the newest chunk when streaming."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    text: str
    delta: str | None = None
    raw: Any = None
    additional_kwargs: dict[str, Any] = Field(default_factory=dict)

    def __str__(self) -> str:
        return self.text


class ModelCallEvent(BaseEvent):
    """Which model served the call: the base of every LLM and embedding event, so that
    ``isinstance(event, ModelCallEvent)`` (or one of the ``LLM_*_EVENTS`` tuples) tells
    a type checker that ``model`` and ``provider`` are there."""

    # ``model_dict`` is LlamaIndex's field name; pydantic before 2.10 warns of any
    # field named ``model_...`` unless told that no namespace is protected.
    model_config = ConfigDict(protected_namespaces=())

    model: StrictStr | None = None
    provider: StrictStr | None = None


class ModelCallEndEvent(ModelCallEvent):
    """What every end event reports about the finished call (the base of every LLM and
    embedding end event). ``usage`` and ``cost_usd`` are None when unknown, and on the
    predict-level end events, whose chat call reports them."""

    usage: TokenUsage | None = None
    latency_ms: float | None = Field(default=None, ge=0)
    time_to_first_token_ms: float | None = Field(default=None, ge=0)
    finish_reason: str | None = None
    cost_usd: float | None = Field(default=None, ge=0)


# ---------------------------------------------------------------- chat


class LLMChatStartEvent(ModelCallEvent):
    """A chat call begins; request parameters (temperature, ...) are in additional_kwargs."""

    messages: list[ChatMessage]
    additional_kwargs: dict[str, Any] = Field(default_factory=dict)
    model_dict: dict[str, Any] = Field(default_factory=dict)


class LLMChatInProgressEvent(ModelCallEvent):
    """One streamed chunk of a chat answer (``response.delta``)."""

    messages: list[ChatMessage]
    response: ChatResponse


class LLMChatEndEvent(ModelCallEndEvent):
    """A chat call finished (``response`` None if a stream ended with nothing)."""

    messages: list[ChatMessage]
    response: ChatResponse | None = None


# ---------------------------------------------------------------- completion


class LLMCompletionStartEvent(ModelCallEvent):
    """A completion call begins."""

    prompt: str
    additional_kwargs: dict[str, Any] = Field(default_factory=dict)
    model_dict: dict[str, Any] = Field(default_factory=dict)


class LLMCompletionInProgressEvent(ModelCallEvent):
    """One streamed chunk of a completion (``response.delta``)."""

    prompt: str
    response: CompletionResponse


class LLMCompletionEndEvent(ModelCallEndEvent):
    """A completion call finished."""

    prompt: str
    response: CompletionResponse | None = None


# ---------------------------------------------------------------- predict


class LLMPredictStartEvent(ModelCallEvent):
    """A prompt template is about to be formatted and sent."""

    template: Any = None
    template_args: dict[str, Any] | None = None


class LLMPredictEndEvent(ModelCallEndEvent):
    """The predicted text; usage and cost are on the chat call's end event inside."""

    output: Any = None


class LLMStructuredPredictStartEvent(ModelCallEvent):
    """A structured prediction (answer parsed into ``output_cls``) begins."""

    output_cls: Any = None
    template: Any = None
    template_args: dict[str, Any] | None = None


class LLMStructuredPredictInProgressEvent(ModelCallEvent):
    """A streamed structured prediction: ``output`` is the object parsed so far."""

    output: Any = None


class LLMStructuredPredictEndEvent(ModelCallEndEvent):
    """The parsed structured output; usage and cost are on the chat call's end event."""

    output: Any = None


# ---------------------------------------------------------------- embedding


class EmbeddingStartEvent(ModelCallEvent):
    """An embedding call begins."""

    model_dict: dict[str, Any] = Field(default_factory=dict)


class EmbeddingEndEvent(ModelCallEndEvent):
    """An embedding call finished: the texts embedded and their vectors. An input given
    as token ids has no text: ``chunks`` then leaves it out, its vector is kept."""

    chunks: list[str] = Field(default_factory=list)
    embeddings: list[list[float]] = Field(default_factory=list)


class SparseEmbeddingStartEvent(EmbeddingStartEvent):
    """A sparse embedding call begins. A kind of :class:`EmbeddingStartEvent`, as in
    LlamaIndex, so handlers that dispatch on the class treat it as one."""


class SparseEmbeddingEndEvent(ModelCallEndEvent):
    """A sparse embedding call finished: each text's vector as token id -> weight."""

    chunks: list[str] = Field(default_factory=list)
    embeddings: list[dict[int, float]] = Field(default_factory=list)


LLM_START_EVENTS: tuple[type[ModelCallEvent], ...] = (
    LLMChatStartEvent,
    LLMCompletionStartEvent,
    LLMPredictStartEvent,
    LLMStructuredPredictStartEvent,
    EmbeddingStartEvent,
)
LLM_IN_PROGRESS_EVENTS: tuple[type[ModelCallEvent], ...] = (
    LLMChatInProgressEvent,
    LLMCompletionInProgressEvent,
    LLMStructuredPredictInProgressEvent,
)
LLM_END_EVENTS: tuple[type[ModelCallEndEvent], ...] = (
    LLMChatEndEvent,
    LLMCompletionEndEvent,
    LLMPredictEndEvent,
    LLMStructuredPredictEndEvent,
    EmbeddingEndEvent,
    SparseEmbeddingEndEvent,
)

__all__ = [
    "LLM_END_EVENTS",
    "LLM_IN_PROGRESS_EVENTS",
    "LLM_START_EVENTS",
    "ChatMessage",
    "ChatResponse",
    "CompletionResponse",
    "ContentBlock",
    "EmbeddingEndEvent",
    "EmbeddingStartEvent",
    "LLMChatEndEvent",
    "LLMChatInProgressEvent",
    "LLMChatStartEvent",
    "LLMCompletionEndEvent",
    "LLMCompletionInProgressEvent",
    "LLMCompletionStartEvent",
    "LLMPredictEndEvent",
    "LLMPredictStartEvent",
    "LLMStructuredPredictEndEvent",
    "LLMStructuredPredictInProgressEvent",
    "LLMStructuredPredictStartEvent",
    "MessageRole",
    "ModelCallEndEvent",
    "ModelCallEvent",
    "RoleName",
    "SparseEmbeddingEndEvent",
    "SparseEmbeddingStartEvent",
    "TokenUsage",
    "ToolCall",
]
