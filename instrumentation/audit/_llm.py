"""Turns the LLM layer's start/end events into :class:`LLMEvent`.

The LLM contract (``instrumentation.events.llm``) is matched by class name along the
event's MRO rather than imported, so this module works whether or not the LLM layer
is installed, and subclasses of the contract's events are recognised too. Only chat
and completion calls are audited: predict/structured-predict call chat underneath
(auditing both would count the call twice), and embeddings are not LLM calls here.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from instrumentation._classcache import remember
from instrumentation.audit.events import LLMEvent

_STARTS = {"LLMChatStartEvent": "chat", "LLMCompletionStartEvent": "completion"}
_ENDS = {"LLMChatEndEvent": "chat", "LLMCompletionEndEvent": "completion"}
#: By ``id(cls)``, forgotten with the class (see :mod:`instrumentation._classcache`):
#: an event class made at run time (pydantic's ``create_model``, one per request) is
#: not kept alive by having been seen once.
_kinds: dict[int, tuple[str, str] | None] = {}


def classify(event: object) -> tuple[str, str] | None:
    """``("start"|"end", "chat"|"completion")`` for an LLM event, else ``None``."""
    cls = type(event)
    try:
        return _kinds[id(cls)]
    except KeyError:
        return remember(_kinds, cls, _work_out_kind(cls))


def _work_out_kind(cls: type) -> tuple[str, str] | None:
    for base in cls.__mro__:
        if base.__name__ in _STARTS:
            return ("start", _STARTS[base.__name__])
        if base.__name__ in _ENDS:
            return ("end", _ENDS[base.__name__])
    return None


def _role(message: Any) -> str:
    role = getattr(message, "role", None)
    return str(getattr(role, "value", role))


def _prompt(event: Any, llm_type: str) -> str | tuple[dict[str, Any], ...]:
    if llm_type == "completion":
        return str(getattr(event, "prompt", ""))
    messages = getattr(event, "messages", None) or ()
    return tuple({"role": _role(m), "content": getattr(m, "content", None)} for m in messages)


def _timestamp(event: Any) -> datetime:
    """When the LLM layer says its event happened (on the application's thread)."""
    stamp = getattr(event, "timestamp", None)
    if isinstance(stamp, datetime) and stamp.tzinfo is not None:
        return stamp
    return datetime.now(timezone.utc)  # we are on the application's thread here too


def start_event(event: Any, llm_type: str) -> LLMEvent:
    return LLMEvent(
        prompt=_prompt(event, llm_type),
        type=llm_type,
        timestamp=_timestamp(event),
        model=getattr(event, "model", None),
        provider=getattr(event, "provider", None),
        span_id=getattr(event, "span_id", None),
    )


def end_event(event: Any, llm_type: str) -> LLMEvent:
    response = getattr(event, "response", None)
    text: str | None = None
    if response is not None:
        if llm_type == "completion":
            text = getattr(response, "text", None)
        else:
            message = getattr(response, "message", None)
            text = getattr(message, "content", None)
    usage = getattr(event, "usage", None)
    return LLMEvent(
        prompt=_prompt(event, llm_type),
        type=llm_type,
        timestamp=_timestamp(event),
        response=text,
        completion_tokens=getattr(usage, "completion_tokens", None),
        prompt_tokens=getattr(usage, "prompt_tokens", None),
        total_tokens=getattr(usage, "total_tokens", None),
        model=getattr(event, "model", None),
        provider=getattr(event, "provider", None),
        latency_ms=getattr(event, "latency_ms", None),
        cost_usd=getattr(event, "cost_usd", None),
        span_id=getattr(event, "span_id", None),
        finish_reason=getattr(event, "finish_reason", None),
        tokens_estimated=getattr(usage, "estimated", False) is True,
    )


__all__ = ["classify", "end_event", "start_event"]
