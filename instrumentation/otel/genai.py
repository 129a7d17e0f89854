"""LLM events as OpenTelemetry GenAI (and, on request, OpenInference) attributes.

The LLM layer (``instrumentation.events.llm``) emits start/in-progress/end events
inside the span of each LLM call. This module says which attributes those events put
on that span:

- always, the OpenTelemetry GenAI semantic conventions: ``gen_ai.operation.name``,
  ``gen_ai.request.model``, ``gen_ai.provider.name``, request parameters
  (``gen_ai.request.temperature``, ``gen_ai.request.max_tokens``, ...),
  ``gen_ai.usage.input_tokens``/``output_tokens``, ``gen_ai.response.finish_reasons``;
  with ``capture_content``, ``gen_ai.input.messages``/``gen_ai.output.messages`` (JSON);
- with ``openinference=True``, OpenInference's attributes as well
  (``openinference.span.kind``, ``llm.model_name``, ``llm.token_count.*``,
  ``input.value``/``output.value``, ``llm.input_messages.N.message.role`` ...), which
  Phoenix and other OpenInference backends show natively.

Text is used as the events carry it: redaction is applied by the LLM layer before the
events exist. The events module is imported lazily, so this package works (and simply
maps no LLM attributes) where it is missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

from instrumentation.otel.attributes import clip, fit_json, to_attribute, to_json

START = "start"
PROGRESS = "progress"
END = "end"

#: OpenInference span kind for spans that are not LLM or embedding calls.
OPENINFERENCE_DEFAULT_KIND = "CHAIN"

#: Request parameter (in ``additional_kwargs``) -> GenAI attribute.
REQUEST_PARAMETERS: Mapping[str, str] = {
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "top_k": "gen_ai.request.top_k",
    "max_tokens": "gen_ai.request.max_tokens",
    "max_completion_tokens": "gen_ai.request.max_tokens",
    "max_output_tokens": "gen_ai.request.max_tokens",
    "frequency_penalty": "gen_ai.request.frequency_penalty",
    "presence_penalty": "gen_ai.request.presence_penalty",
    "seed": "gen_ai.request.seed",
    "n": "gen_ai.request.choice.count",
    "stop": "gen_ai.request.stop_sequences",
    "stream": "gen_ai.request.stream",
}

_llm_module: ModuleType | None = None
_llm_missing = False


def llm_events() -> ModuleType | None:
    """``instrumentation.events.llm``, or ``None`` where it does not exist."""
    global _llm_module, _llm_missing
    if _llm_module is None and not _llm_missing:
        try:
            from instrumentation.events import llm
        except ImportError:
            _llm_missing = True
        else:
            _llm_module = llm
    return _llm_module


def kind_of(event: Any) -> str | None:
    """``START``, ``PROGRESS`` or ``END`` for an LLM event, ``None`` for any other."""
    llm = llm_events()
    if llm is None:
        return None
    if isinstance(event, llm.LLM_END_EVENTS):
        return END
    if isinstance(event, llm.LLM_START_EVENTS):
        return START
    if isinstance(event, llm.LLM_IN_PROGRESS_EVENTS):
        return PROGRESS
    return None


# -- the span event's own (small) attributes ---------------------------------------------


def event_attributes(event: Any, kind: str, capture_content: bool = True) -> dict[str, Any]:
    """A short summary for the span event; the span carries the full picture."""
    out: dict[str, Any] = {"instrumentation.event_id": event.id_}
    if event.model:
        out["gen_ai.request.model" if kind == START else "gen_ai.response.model"] = event.model
    if event.provider:
        out["gen_ai.provider.name"] = event.provider
    if kind == PROGRESS:
        delta = getattr(getattr(event, "response", None), "delta", None)
        if capture_content and delta:
            out["delta"] = clip(delta)
    elif kind == END:
        _usage(event.usage, out)
        if event.finish_reason:
            out["gen_ai.response.finish_reasons"] = (event.finish_reason,)
    return out


# -- the span's attributes -------------------------------------------------------------


def span_attributes(
    event: Any, kind: str, *, openinference: bool = False, capture_content: bool = True
) -> dict[str, Any]:
    """What a start or end event adds to the span of its LLM call."""
    llm = llm_events()
    if llm is None or kind == PROGRESS:
        return {}
    out: dict[str, Any] = {}
    if kind == START:
        _genai_start(llm, event, out, capture_content)
        if openinference:
            _openinference_start(llm, event, out, capture_content)
    else:
        _genai_end(llm, event, out, capture_content)
        if openinference:
            _openinference_end(llm, event, out, capture_content)
    if openinference:
        # Messages first: should a span still run out of attributes (a lower limit
        # set by the application), the SDK drops the oldest, so they go, not the model.
        messages = {k: v for k, v in out.items() if k.startswith(_MESSAGE_PREFIXES)}
        if messages:
            return {**messages, **{k: v for k, v in out.items() if k not in messages}}
    return out


_MESSAGE_PREFIXES = ("llm.input_messages.", "llm.output_messages.")


def _operation(llm: ModuleType, event: Any) -> str | None:
    if isinstance(event, (llm.LLMChatStartEvent, llm.LLMChatEndEvent)):
        return "chat"
    if isinstance(event, (llm.LLMCompletionStartEvent, llm.LLMCompletionEndEvent)):
        return "text_completion"
    if isinstance(
        event, (llm.EmbeddingStartEvent, llm.EmbeddingEndEvent, llm.SparseEmbeddingEndEvent)
    ):
        return "embeddings"
    return None  # predict: a template step around a chat/completion call of its own


def _model_of(event: Any) -> str | None:
    if event.model:
        return str(event.model)
    model_dict = getattr(event, "model_dict", None) or {}
    found = model_dict.get("model") or model_dict.get("model_name")
    return str(found) if found else None


def _genai_start(llm: ModuleType, event: Any, out: dict[str, Any], content: bool) -> None:
    operation = _operation(llm, event)
    if operation is not None:
        out["gen_ai.operation.name"] = operation
    model = _model_of(event)
    if model:
        out["gen_ai.request.model"] = model
    if event.provider:
        out["gen_ai.provider.name"] = event.provider
    for key, value in (getattr(event, "additional_kwargs", None) or {}).items():
        attribute = REQUEST_PARAMETERS.get(key)
        if attribute is None or value is None:
            continue
        if key == "stop" and isinstance(value, str):
            value = [value]
        converted = to_attribute(value)
        if converted is not None:
            out[attribute] = converted
    if content:
        if isinstance(event, llm.LLMChatStartEvent):
            out["gen_ai.input.messages"] = _messages_json(event.messages)
        elif isinstance(event, llm.LLMCompletionStartEvent):
            out["gen_ai.input.messages"] = _messages_json(
                [{"role": "user", "parts": [{"type": "text", "content": event.prompt}]}]
            )


def _genai_end(llm: ModuleType, event: Any, out: dict[str, Any], content: bool) -> None:
    operation = _operation(llm, event)
    if operation is not None:
        out["gen_ai.operation.name"] = operation
    if event.model:
        out["gen_ai.response.model"] = event.model
    if event.provider:
        out["gen_ai.provider.name"] = event.provider
    _usage(event.usage, out)
    if event.finish_reason:
        out["gen_ai.response.finish_reasons"] = (event.finish_reason,)
    for name in ("latency_ms", "time_to_first_token_ms", "cost_usd"):
        value = getattr(event, name, None)
        if value is not None:
            out[f"instrumentation.llm.{name}"] = float(value)
    response = getattr(event, "response", None)
    response_id = _response_id(response)
    if response_id:
        out["gen_ai.response.id"] = response_id
    if isinstance(event, llm.EmbeddingEndEvent) and event.embeddings:
        out["gen_ai.embeddings.dimension.count"] = len(event.embeddings[0])
    if content and response is not None:
        if isinstance(event, llm.LLMChatEndEvent):
            out["gen_ai.output.messages"] = _messages_json(
                [response.message], finish_reason=event.finish_reason
            )
        elif isinstance(event, llm.LLMCompletionEndEvent):
            out["gen_ai.output.messages"] = _messages_json(
                [
                    {
                        "role": "assistant",
                        "parts": [{"type": "text", "content": response.text}],
                        "finish_reason": event.finish_reason or "stop",
                    }
                ]
            )


def _count(out: dict[str, Any], key: str, value: Any) -> None:
    """Set a token count that an int64 holds (OTLP's integer): the exporter drops a
    larger one with only a log line of its own, and no count that large is real."""
    if value is not None and 0 <= int(value) <= _INT64_MAX:
        out[key] = int(value)


_INT64_MAX = 2**63 - 1


def _usage(usage: Any, out: dict[str, Any]) -> None:
    if usage is None:
        return
    _count(out, "gen_ai.usage.input_tokens", usage.prompt_tokens)
    _count(out, "gen_ai.usage.output_tokens", usage.completion_tokens)
    _count(out, "gen_ai.usage.cache_read.input_tokens", usage.cached_tokens)
    _count(out, "gen_ai.usage.reasoning.output_tokens", usage.reasoning_tokens)
    if usage.estimated:
        out["instrumentation.llm.usage_estimated"] = True


def _response_id(response: Any) -> str | None:
    if response is None:
        return None
    found = (getattr(response, "additional_kwargs", None) or {}).get("id")
    raw = getattr(response, "raw", None)
    if found is None and raw is not None:
        found = raw.get("id") if isinstance(raw, Mapping) else getattr(raw, "id", None)
    return found if isinstance(found, str) and found else None


def _message_parts(message: Any) -> dict[str, Any]:
    """One ChatMessage in the GenAI conventions' message shape (role + parts)."""
    parts: list[dict[str, Any]] = []
    if message.content:
        parts.append({"type": "text", "content": message.content})
    for call in message.tool_calls:
        parts.append(
            {"type": "tool_call", "id": call.id, "name": call.name, "arguments": call.arguments}
        )
    role = getattr(message.role, "value", message.role)
    return {"role": role, "parts": parts}


def _messages_json(messages: list[Any], finish_reason: str | None = None) -> str:
    shaped: list[dict[str, Any]] = []
    for message in messages:
        item = message if isinstance(message, dict) else _message_parts(message)
        if finish_reason is not None and not isinstance(message, dict):
            item["finish_reason"] = finish_reason
        shaped.append(item)
    return fit_json(shaped)


# -- OpenInference -----------------------------------------------------------------------


#: At most this many ``llm.input_messages.*`` attributes on one span. The SDK keeps 128
#: attributes per span and drops the oldest first: a long chat, two or more attributes
#: a message, pushed out the model, the request's parameters and the span kind.
MAX_MESSAGE_ATTRIBUTES = 64
#: And at most this many for the answer (``llm.output_messages.0.*``): its tool calls.
MAX_OUTPUT_MESSAGE_ATTRIBUTES = 32


def _message_attributes(key: str, message: Any, budget: int) -> dict[str, Any]:
    """One message's attributes, its tool calls within ``budget`` attributes in all."""
    out: dict[str, Any] = {f"{key}.role": getattr(message.role, "value", message.role)}
    if message.content is not None:
        out[f"{key}.content"] = clip(message.content)
    calls = message.tool_calls
    fitting = max(0, (budget - len(out)) // 3)
    for j, call in enumerate(calls[:fitting]):
        call_key = f"{key}.tool_calls.{j}.tool_call"
        if call.id:
            out[f"{call_key}.id"] = call.id
        out[f"{call_key}.function.name"] = call.name
        out[f"{call_key}.function.arguments"] = clip(call.arguments)
    if len(calls) > fitting:
        out[f"{key}.tool_calls_omitted"] = len(calls) - fitting
    return out


def _size(message: Any) -> int:
    return 1 + (message.content is not None) + 3 * len(message.tool_calls)


def _openinference_messages(
    prefix: str, messages: list[Any], out: dict[str, Any], budget: int = MAX_MESSAGE_ATTRIBUTES
) -> None:
    """The latest messages that fit ``budget`` attributes, numbered from 0, and how
    many earlier ones were left out (``instrumentation.llm.messages_omitted``); a
    latest message too large alone keeps its first tool calls that fit."""
    kept: list[Any] = []
    used = 0
    for message in reversed(messages):
        size = _size(message)
        if used + size > budget and (kept or size <= budget):
            break
        kept.append(message)
        used += size
    for i, message in enumerate(reversed(kept)):
        out.update(_message_attributes(f"{prefix}.{i}.message", message, budget))
    if len(kept) < len(messages):
        out["instrumentation.llm.messages_omitted"] = len(messages) - len(kept)


def _openinference_start(llm: ModuleType, event: Any, out: dict[str, Any], content: bool) -> None:
    model = _model_of(event)
    if isinstance(event, llm.EmbeddingStartEvent):
        out["openinference.span.kind"] = "EMBEDDING"
        if model:
            out["embedding.model_name"] = model
        return
    is_call = isinstance(event, (llm.LLMChatStartEvent, llm.LLMCompletionStartEvent))
    out["openinference.span.kind"] = "LLM" if is_call else OPENINFERENCE_DEFAULT_KIND
    if model:
        out["llm.model_name"] = model
    if event.provider:
        out["llm.provider"] = event.provider
    params = getattr(event, "additional_kwargs", None)
    if params:
        out["llm.invocation_parameters"] = to_json(params if content else _without_content(params))
    if not content:
        return
    if isinstance(event, llm.LLMChatStartEvent):
        _openinference_messages("llm.input_messages", event.messages, out)
        out["input.value"] = to_json(
            [
                {"role": getattr(m.role, "value", m.role), "content": m.content}
                for m in event.messages
            ]
        )
        out["input.mime_type"] = "application/json"
    elif isinstance(event, llm.LLMCompletionStartEvent):
        out["llm.prompts"] = (clip(event.prompt),)
        out["input.value"] = clip(event.prompt)
        out["input.mime_type"] = "text/plain"
    elif getattr(event, "template_args", None):
        out["input.value"] = to_json(event.template_args)
        out["input.mime_type"] = "application/json"


def _without_content(params: dict[str, Any]) -> dict[str, Any]:
    """Request parameters with the text in them withheld (``capture_content=False``):
    a ``prediction``, a tool's description or a response schema is content too. The LLM
    layer's own rule (``record_content=False``) is used where that layer is installed."""
    try:
        from instrumentation.llms.redaction import Redaction
    except ImportError:  # pragma: no cover - the llms package is part of this one
        return {k: v for k, v in params.items() if v is None or isinstance(v, (bool, int, float))}
    return Redaction(record_content=False).values(params)


def _openinference_end(llm: ModuleType, event: Any, out: dict[str, Any], content: bool) -> None:
    usage = event.usage
    if usage is not None:
        _count(out, "llm.token_count.prompt", usage.prompt_tokens)
        _count(out, "llm.token_count.completion", usage.completion_tokens)
        _count(out, "llm.token_count.total", usage.total_tokens)
        _count(out, "llm.token_count.prompt_details.cache_read", usage.cached_tokens)
        _count(out, "llm.token_count.completion_details.reasoning", usage.reasoning_tokens)
    if not content:
        return
    response = getattr(event, "response", None)
    if isinstance(event, llm.LLMChatEndEvent) and response is not None:
        _openinference_messages(
            "llm.output_messages", [response.message], out, MAX_OUTPUT_MESSAGE_ATTRIBUTES
        )
        out["output.value"] = clip(response.message.content or "")
        out["output.mime_type"] = "text/plain"
    elif isinstance(event, llm.LLMCompletionEndEvent) and response is not None:
        out["output.value"] = clip(response.text)
        out["output.mime_type"] = "text/plain"
    elif isinstance(event, (llm.EmbeddingEndEvent, llm.SparseEmbeddingEndEvent)):
        for i, chunk in enumerate(event.chunks[:100]):
            out[f"embedding.embeddings.{i}.embedding.text"] = clip(chunk)
    elif isinstance(event, (llm.LLMPredictEndEvent, llm.LLMStructuredPredictEndEvent)):
        output = event.output
        if output is not None:
            is_text = isinstance(output, str)
            out["output.value"] = clip(output) if is_text else to_json(output)
            out["output.mime_type"] = "text/plain" if is_text else "application/json"


__all__: list[str] = []
