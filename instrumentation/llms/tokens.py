"""Counting tokens without a tokenizer: deterministic, and flagged as an estimate.

Used where the provider reports no usage (an abandoned stream, a server that sends
no usage chunk) and by :class:`OfflineLLM`, whose "tokens" are exactly these. A word,
a number or a punctuation mark is one token; real tokenizers differ, which is why
estimated usage carries ``estimated=True``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from instrumentation.events.llm import ChatMessage, ContentBlock

_TOKEN = re.compile(r"\w+|[^\w\s]")


def count_tokens(text: str | None) -> int:
    """The number of words and punctuation marks in ``text`` (0 for None or "")."""
    if not isinstance(text, str):
        if text is None:
            return 0
        raise TypeError(f"count_tokens takes a str (or None), got {type(text).__name__}")
    return len(_TOKEN.findall(text))


def count_block_tokens(blocks: Iterable[ContentBlock]) -> int:
    """The estimated tokens of the refusals among ``blocks``: a refusal is text the
    model wrote, kept in ``data`` (``{"type": "refusal", "refusal": ...}``). Text blocks
    are counted in the message's content, and images or files have no text to count."""
    total = 0
    for block in blocks:
        if block.type == "refusal":
            refusal = block.data.get("refusal")
            total += count_tokens(refusal) if isinstance(refusal, str) else 0
    return total


def count_message_tokens(messages: Iterable[ChatMessage]) -> int:
    """The estimated prompt tokens of ``messages``: their text, the tool-call arguments
    and the refusals."""
    total = 0
    for message in messages:
        total += count_tokens(message.content) + count_block_tokens(message.blocks)
        for call in message.tool_calls:
            total += count_tokens(call.arguments)
    return total


def split_chunks(text: str, words_per_chunk: int = 1) -> list[str]:
    """``text`` cut into stream chunks of ``words_per_chunk`` words, spaces kept,
    so that joining the chunks gives ``text`` back exactly."""
    if words_per_chunk < 1:
        raise ValueError(f"words_per_chunk must be at least 1, got {words_per_chunk}")
    pieces = re.findall(r"\s*\S+", text)
    if not pieces:
        return [text] if text else []
    trailing = text[len("".join(pieces)) :]
    chunks = [
        "".join(pieces[i : i + words_per_chunk]) for i in range(0, len(pieces), words_per_chunk)
    ]
    chunks[-1] += trailing
    return chunks


__all__ = ["count_tokens"]
