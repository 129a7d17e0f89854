"""Masking what LLM events record, before any handler sees it.

Two controls, global (:func:`configure_redaction`) or per LLM (``redaction=``):

* ``mask``: a function applied to every prompt, message, completion, chunk, tool-call
  argument and embedded text (e.g. to hide e-mail addresses);
* ``record_content=False``: record no prompt or completion text at all (message
  contents become None, prompts and completions "", embedded texts "").

When either is on, the provider's ``raw`` response object is left out of the events
too, since it holds the same text. The application itself always gets the real answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from instrumentation import telemetry
from instrumentation.events.llm import ChatMessage

logger = logging.getLogger("instrumentation.llms")

Mask = Callable[[str], str]

_MASK_FAILED = "[redaction failed]"


class Redaction:
    """What to hide from LLM events; immutable, so it can be shared between threads."""

    __slots__ = ("active", "mask", "record_content")

    def __init__(self, mask: Mask | None = None, record_content: bool = True) -> None:
        if mask is not None and not callable(mask):
            raise TypeError(f"mask is a function str -> str, got {type(mask).__name__}")
        if not isinstance(record_content, bool):
            raise TypeError(f"record_content is True or False, got {record_content!r}")
        self.mask = mask
        self.record_content = record_content
        self.active = mask is not None or not record_content

    def text(self, value: str | None) -> str | None:
        """``value`` as events may record it (None stays None)."""
        if value is None or not self.active:
            return value
        if not self.record_content:
            return ""
        assert self.mask is not None
        try:
            masked = self.mask(value)
        except Exception as exc:  # a broken mask must not leak the text nor break the call
            telemetry.counter("llms.redaction_errors").inc()
            logger.warning("the redaction mask raised %r; the text is withheld", exc)
            return _MASK_FAILED
        if not isinstance(masked, str):
            telemetry.counter("llms.redaction_errors").inc()
            logger.warning("the redaction mask returned %s, not str", type(masked).__name__)
            return _MASK_FAILED
        return masked

    def content(self, value: str | None) -> str | None:
        """A message content: None when no content is recorded."""
        if not self.record_content:
            return None
        return self.text(value)

    def messages(self, messages: Sequence[ChatMessage]) -> list[ChatMessage]:
        """Copies of ``messages`` with their text redacted (the originals are untouched)."""
        if not self.active:
            return list(messages)
        return [self.message(m) for m in messages]

    def message(self, message: ChatMessage) -> ChatMessage:
        if not self.active:
            return message
        blocks = [
            b.model_copy(update={"text": self.text(b.text)}) if b.text is not None else b
            for b in message.blocks
        ]
        calls = [
            c.model_copy(update={"arguments": self.text(c.arguments) or ""})
            for c in message.tool_calls
        ]
        return message.model_copy(
            update={"content": self.content(message.content), "blocks": blocks, "tool_calls": calls}
        )

    def __repr__(self) -> str:
        return f"Redaction(mask={self.mask!r}, record_content={self.record_content})"


NO_REDACTION = Redaction()
_current: Redaction = NO_REDACTION


def configure_redaction(mask: Mask | None = None, record_content: bool = True) -> Redaction:
    """Set the redaction of every LLM without its own; returns the new setting."""
    global _current
    _current = Redaction(mask, record_content)
    return _current


def reset_redaction() -> None:
    """Record everything again (the default)."""
    global _current
    _current = NO_REDACTION


def get_redaction() -> Redaction:
    """The global redaction setting."""
    return _current


__all__ = [
    "NO_REDACTION",
    "Mask",
    "Redaction",
    "configure_redaction",
    "get_redaction",
    "reset_redaction",
]
