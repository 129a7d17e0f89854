"""Embedding events, importable from where LlamaIndex keeps them.

They are defined in :mod:`instrumentation.events.llm` beside the LLM events because
they share the model and end-of-call fields (usage, latency, cost).
"""

from __future__ import annotations

from instrumentation.events.llm import (
    EmbeddingEndEvent,
    EmbeddingStartEvent,
    SparseEmbeddingEndEvent,
    SparseEmbeddingStartEvent,
)

__all__ = [
    "EmbeddingEndEvent",
    "EmbeddingStartEvent",
    "SparseEmbeddingEndEvent",
    "SparseEmbeddingStartEvent",
]
