"""Masking what LLM events record, before any handler sees it.

Two controls, global (:func:`configure_redaction`) or per LLM (``redaction=``):

* ``mask``: a function applied to every prompt, message, completion, chunk, tool-call
  argument and embedded text (e.g. to hide e-mail addresses);
* ``record_content=False``: record no prompt or completion text at all (message
  contents become None, prompts and completions "", embedded texts "").

Besides the text, messages carry non-text parts (``ContentBlock.data``: images, files,
audio, refusals, ...), and calls carry settings (``additional_kwargs``: the request's
``temperature``, ``tools``, ``prediction``, ...; a message's ``name``; a response's
``usage``). With a mask, every string in them is masked too. With
``record_content=False`` they keep their shape - dict keys, list lengths - and
``None``, booleans, numbers and :class:`TokenUsage` values, but a string is kept only
when it is a short label (letters, digits and ``_.:/-``, at most 64 characters) under
one of the keys of :data:`LABEL_KEYS` (``type``, ``detail``, ``format``,
``reasoning_effort``, ...); every other string and every other object becomes
``"[redacted]"``. So an image part keeps its type and detail but not its URL, and
``prediction={"type": "content", "content": ...}`` keeps only its type.

When either is on, the provider's ``raw`` response object is left out of the events
too, since it holds the same text. The application itself always gets the real answer.
A mask that raises, or returns no ``str``, withholds that text (``"[redaction
failed]"``); the failure is counted (``llms.redaction_errors``) and logged at most once
every ``telemetry.LOG_INTERVAL_SECONDS``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from instrumentation import telemetry
from instrumentation._spans import stops_the_caller
from instrumentation.events.llm import ChatMessage, TokenUsage

logger = logging.getLogger("instrumentation.llms")

Mask = Callable[[str], str]

_MASK_FAILED = "[redaction failed]"
#: What a withheld value becomes (``record_content=False``).
WITHHELD = "[redacted]"
#: The keys under which a short label is kept with ``record_content=False``: names of
#: options and kinds, never text the model reads or writes.
LABEL_KEYS = frozenset(
    {
        "type",
        "detail",
        "format",
        "encoding_format",
        "finish_reason",
        "modalities",
        "reasoning_effort",
        "service_tier",
        "tool_choice",
        "tool_call_id",
        "verbosity",
    }
)
_LABEL = re.compile(r"[A-Za-z0-9_.:/-]{0,64}")
_MAX_DEPTH = 32


def _mask_failed(why: str) -> None:
    """Count a text the mask failed on, and log it: at most one line every
    ``telemetry.LOG_INTERVAL_SECONDS``, since a broken mask fails on every message,
    chunk and setting of every call (a few streamed calls logged dozens of lines)."""
    telemetry.counter("llms.redaction_errors").inc()
    held_back = telemetry.log_turn("llms.redaction_errors")
    if held_back is None:
        return
    more = f" ({held_back} more failures since the last warning)" if held_back else ""
    logger.warning("the redaction mask %s; the text is withheld%s", why, more)


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
        except BaseException as exc:  # a broken mask must not leak the text nor break the call
            if stops_the_caller(exc):
                raise
            _mask_failed(f"raised {exc!r}")
            return _MASK_FAILED
        if not isinstance(masked, str):
            _mask_failed(f"returned {type(masked).__name__}, not str")
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
            b.model_copy(update={"text": self.text(b.text), "data": self.values(b.data)})
            for b in message.blocks
        ]
        calls = [
            c.model_copy(update={"arguments": self.text(c.arguments) or ""})
            for c in message.tool_calls
        ]
        return message.model_copy(
            update={
                "content": self.content(message.content),
                "blocks": blocks,
                "tool_calls": calls,
                "additional_kwargs": self.values(message.additional_kwargs),
            }
        )

    def values(self, values: dict[str, Any]) -> dict[str, Any]:
        """Settings or part data as events may record them (see the module docstring);
        ``values`` itself when nothing is redacted."""
        if not self.active or not values:
            return values
        return {key: self._value(key, value, 0) for key, value in values.items()}

    def _value(self, key: object, value: Any, depth: int) -> Any:
        if value is None or isinstance(value, (bool, int, float, TokenUsage)):
            return value
        if isinstance(value, str):
            if self.record_content:
                return self.text(value)
            return value if key in LABEL_KEYS and _LABEL.fullmatch(value) else WITHHELD
        if isinstance(value, (Mapping, list, tuple)):
            if depth >= _MAX_DEPTH:
                return WITHHELD
            if isinstance(value, Mapping):
                return {k: self._value(k, v, depth + 1) for k, v in value.items()}
            return [self._value(key, v, depth + 1) for v in value]  # labelled by its key
        return value if self.record_content else WITHHELD  # an object: no string to mask

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
    "LABEL_KEYS",
    "WITHHELD",
    "Mask",
    "Redaction",
    "configure_redaction",
    "get_redaction",
    "reset_redaction",
]
