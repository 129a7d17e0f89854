"""LLM calls, observed: events, an instrumented LLM base class, an offline LLM,
the price table, redaction, and (in :mod:`instrumentation.llms.openai`, extra
``[openai]``) instrumentation of the ``openai`` client with no code change.
"""

from __future__ import annotations

from instrumentation.events.llm import (
    LLM_END_EVENTS,
    LLM_IN_PROGRESS_EVENTS,
    LLM_START_EVENTS,
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    ContentBlock,
    EmbeddingEndEvent,
    EmbeddingStartEvent,
    LLMChatEndEvent,
    LLMChatInProgressEvent,
    LLMChatStartEvent,
    LLMCompletionEndEvent,
    LLMCompletionInProgressEvent,
    LLMCompletionStartEvent,
    LLMPredictEndEvent,
    LLMPredictStartEvent,
    LLMStructuredPredictEndEvent,
    LLMStructuredPredictInProgressEvent,
    LLMStructuredPredictStartEvent,
    MessageRole,
    TokenUsage,
    ToolCall,
)
from instrumentation.llms.base import BaseLLM
from instrumentation.llms.offline import OfflineLLM, OfflineLLMError
from instrumentation.llms.pricing import (
    DEFAULT_PRICES,
    ModelPrice,
    PriceTable,
    cost_usd,
    default_price_table,
    set_model_price,
)
from instrumentation.llms.redaction import (
    Redaction,
    configure_redaction,
    get_redaction,
    reset_redaction,
)
from instrumentation.llms.tokens import count_tokens

__all__ = [
    "DEFAULT_PRICES",
    "LLM_END_EVENTS",
    "LLM_IN_PROGRESS_EVENTS",
    "LLM_START_EVENTS",
    "BaseLLM",
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
    "ModelPrice",
    "OfflineLLM",
    "OfflineLLMError",
    "PriceTable",
    "Redaction",
    "TokenUsage",
    "ToolCall",
    "configure_redaction",
    "cost_usd",
    "count_tokens",
    "default_price_table",
    "get_redaction",
    "reset_redaction",
    "set_model_price",
]
