"""The message and response models of LLM calls (defined with the events)."""

from __future__ import annotations

from instrumentation.events.llm import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    ContentBlock,
    MessageRole,
    TokenUsage,
    ToolCall,
)

__all__ = [
    "ChatMessage",
    "ChatResponse",
    "CompletionResponse",
    "ContentBlock",
    "MessageRole",
    "TokenUsage",
    "ToolCall",
]
