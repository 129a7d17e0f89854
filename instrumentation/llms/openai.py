"""Instrument the ``openai`` client with no change to the application's code.

``instrument_openai()`` patches, with ``wrapt``, the ``create`` methods of the
installed package's ``Completions``/``AsyncCompletions`` (chat) and
``Embeddings``/``AsyncEmbeddings`` classes, so every client - made before or after -
emits the LLM events of :mod:`instrumentation.events.llm` in a span named
``OpenAI.chat.completions.create`` / ``OpenAI.embeddings.create`` of the dispatcher
``instrumentation.llms.openai``. Both functions are idempotent and thread-safe;
``uninstrument_openai()`` puts the original methods back.

Streams (``stream=True``) come back as the client's own ``Stream``/``AsyncStream``,
wrapped: each chunk emits an in-progress event; usage is taken from the final chunk
when the request asked for it (``stream_options={"include_usage": True}``; the
request is never changed behind the application's back) and estimated otherwise.
A stream closed early ends its span with the tokens seen so far.

The instrumentation never changes what the client returns or raises: if a request
cannot be described (e.g. an odd message), the call runs untraced and the problem is
logged and counted (``llms.openai.describe_errors``).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Generator, Iterable, Mapping
from typing import Any

import wrapt

from instrumentation import telemetry
from instrumentation.dispatcher import get_dispatcher
from instrumentation.events.llm import (
    ChatMessage,
    ChatResponse,
    ContentBlock,
    MessageRole,
    TokenUsage,
    ToolCall,
)
from instrumentation.llms._call import (
    ABANDONED,
    LLMCall,
    coerce_usage,
    emit_embedding_end,
    emit_embedding_start,
    listening,
)
from instrumentation.llms._streams import READY, STOP, SpannedStream, astart_stream, start_stream
from instrumentation.llms.pricing import default_price_table
from instrumentation.llms.redaction import get_redaction

logger = logging.getLogger("instrumentation.llms")
dispatcher = get_dispatcher(__name__)

PROVIDER = "openai"
_describe_errors = telemetry.counter("llms.openai.describe_errors")
CHAT_SPAN = "OpenAI.chat.completions.create"
EMBEDDING_SPAN = "OpenAI.embeddings.create"

#: Request parameters that are not model settings, left out of ``additional_kwargs``.
_NOT_SETTINGS = frozenset(
    {"messages", "model", "stream", "extra_headers", "extra_query", "extra_body", "timeout"}
)

_PATCHES: tuple[tuple[str, str, str], ...] = (
    ("openai.resources.chat.completions", "Completions", "chat"),
    ("openai.resources.chat.completions", "AsyncCompletions", "achat"),
    ("openai.resources.embeddings", "Embeddings", "embed"),
    ("openai.resources.embeddings", "AsyncEmbeddings", "aembed"),
)

_lock = threading.Lock()
_originals: dict[tuple[str, str], Any] = {}


# -- describing requests and responses ----------------------------------------------------


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def _arguments_text(arguments: Any) -> str:
    """A tool call's arguments as JSON text (some compatible servers send an object)."""
    if arguments is None or isinstance(arguments, str):
        return arguments or ""
    try:
        return json.dumps(arguments, default=str)
    except (TypeError, ValueError):
        return str(arguments)


def to_chat_message(message: Any) -> ChatMessage:
    """An OpenAI message (dict or pydantic object) as a :class:`ChatMessage`."""
    content = _get(message, "content")
    blocks: list[ContentBlock] = []
    text: str | None
    if isinstance(content, str) or content is None:
        text = content
    else:
        for part in content:
            kind = _get(part, "type") or "text"
            if kind == "text":
                blocks.append(ContentBlock(type="text", text=_get(part, "text")))
            else:
                data = dict(part) if isinstance(part, Mapping) else {}
                blocks.append(ContentBlock(type=str(kind), data=data))
        text = None
    calls = [
        ToolCall(
            id=_get(call, "id"),
            name=_get(_get(call, "function"), "name") or "",
            arguments=_arguments_text(_get(_get(call, "function"), "arguments")),
        )
        for call in (_get(message, "tool_calls") or ())
    ]
    extra = {
        key: _get(message, key)
        for key in ("name", "tool_call_id")
        if _get(message, key) is not None
    }
    return ChatMessage(
        # Some compatible servers leave out the role of a reply.
        role=_get(message, "role") or MessageRole.ASSISTANT,
        content=text,
        blocks=blocks,
        tool_calls=calls,
        additional_kwargs=extra,
    )


def _settings(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in kwargs.items()
        if k not in _NOT_SETTINGS and type(v).__name__ not in ("Omit", "NotGiven")
    }


def _model_dict(instance: Any, model: Any) -> dict[str, Any]:
    client = getattr(instance, "_client", None)
    base_url = getattr(client, "base_url", None)
    return {"model": model, "base_url": None if base_url is None else str(base_url)}


def _new_call(instance: Any, kwargs: Mapping[str, Any]) -> LLMCall | None:
    """The recorder of a chat request, or None when it cannot be described."""
    try:
        messages = [to_chat_message(m) for m in kwargs.get("messages") or ()]
        model = kwargs.get("model")
        return LLMCall(
            dispatcher,
            "chat",
            model=model if isinstance(model, str) else None,
            provider=PROVIDER,
            redaction=get_redaction(),
            prices=default_price_table,
            messages=messages,
            additional_kwargs=_settings(kwargs),
            model_dict=_model_dict(instance, model),
        )
    except Exception as exc:
        _describe_errors.inc()
        logger.warning(
            "an OpenAI chat request could not be described, so it is not traced: %r", exc
        )
        return None


def _finish_completion(call: LLMCall, completion: Any) -> None:
    """End ``call`` with a ``ChatCompletion`` (or whatever ``create`` returned).

    A reply we cannot describe still ends the call, with its usage when that can be
    read: the client's caller gets the reply either way.
    """
    failures: list[Exception] = []
    try:
        usage = coerce_usage(_get(completion, "usage"))
    except Exception as exc:
        failures.append(exc)
        usage = None
    try:
        response, reason, model = _describe_completion(completion)
    except Exception as exc:
        failures.append(exc)
        response = reason = model = None
    if failures:  # one reply, counted once
        _describe_failed("reply", failures[0] if len(failures) == 1 else failures)
    call.end(response, usage, reason, model)


def _describe_failed(what: str, exc: object) -> None:
    _describe_errors.inc()
    logger.warning("an OpenAI chat %s could not be described: %r", what, exc)


def _describe_completion(completion: Any) -> tuple[ChatResponse | None, str | None, str | None]:
    choices = _get(completion, "choices")
    if not choices:  # e.g. a raw-response wrapper: end without a description
        return None, None, None
    first = choices[0]
    message = to_chat_message(_get(first, "message"))
    model = _get(completion, "model")
    return (
        ChatResponse(message=message, raw=completion),
        _get(first, "finish_reason"),
        model if isinstance(model, str) else None,
    )


class _ChunkState:
    __slots__ = ("finish_reason", "model", "usage")

    def __init__(self) -> None:
        self.usage: TokenUsage | None = None
        self.finish_reason: str | None = None
        self.model: str | None = None

    def take(self, call: LLMCall, chunk: Any) -> None:
        model = _get(chunk, "model")
        if isinstance(model, str) and model:
            self.model = model
        usage = _get(chunk, "usage")
        if usage is not None:
            self.usage = coerce_usage(usage)
        choices = _get(chunk, "choices")
        if not choices:
            return
        choice = choices[0]
        reason = _get(choice, "finish_reason")
        if isinstance(reason, str):
            self.finish_reason = reason
        delta = _get(choice, "delta")
        text = _get(delta, "content")
        call.chunk(text if isinstance(text, str) else "", raw=chunk)


# -- chat -----------------------------------------------------------------------------------


def _chat_body(
    call: LLMCall, open_stream: Callable[[], Any], holder: list[Any]
) -> Generator[Any, Any, None]:
    call.start()
    stream = open_stream()
    holder.append(stream)
    if not isinstance(stream, Iterable):  # e.g. with_raw_response: nothing to iterate here
        _finish_completion(call, stream)
        return
    state = _ChunkState()
    if (yield READY) is STOP:
        _close_quietly(stream)
        call.end_stream(finish_reason=ABANDONED)
        return
    for chunk in stream:
        state.take(call, chunk)
        if (yield chunk) is STOP:
            _close_quietly(stream)
            call.end_stream(state.usage, ABANDONED, model=state.model)
            return
    call.end_stream(state.usage, state.finish_reason, model=state.model)


async def _achat_body(
    call: LLMCall, open_stream: Callable[[], Any], holder: list[Any]
) -> AsyncGenerator[Any, Any]:
    call.start()
    stream = await open_stream()
    holder.append(stream)
    if not isinstance(stream, AsyncIterable):
        _finish_completion(call, stream)
        return
    state = _ChunkState()
    if (yield READY) is STOP:
        await _aclose_quietly(stream)
        call.end_stream(finish_reason=ABANDONED)
        return
    async for chunk in stream:
        state.take(call, chunk)
        if (yield chunk) is STOP:
            await _aclose_quietly(stream)
            call.end_stream(state.usage, ABANDONED, model=state.model)
            return
    call.end_stream(state.usage, state.finish_reason, model=state.model)


def _close_quietly(stream: Any) -> None:
    try:
        stream.close()
    except Exception as exc:
        logger.debug("closing an OpenAI stream failed: %r", exc)


async def _aclose_quietly(stream: Any) -> None:
    try:
        await stream.close()
    except Exception as exc:
        logger.debug("closing an OpenAI stream failed: %r", exc)


class TracedStream(wrapt.ObjectProxy[Any]):
    """The client's ``Stream``, iterated through the span; everything else passes through."""

    def __init__(self, stream: Any, spanned: SpannedStream[Any]) -> None:
        super().__init__(stream)
        self._self_spanned = spanned

    def __iter__(self) -> TracedStream:
        return self

    def __next__(self) -> Any:
        return next(self._self_spanned)

    def close(self) -> None:
        self._self_spanned.close()

    def __enter__(self) -> TracedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncTracedStream(wrapt.ObjectProxy[Any]):
    """The client's ``AsyncStream``, iterated through the span."""

    def __init__(self, stream: Any, spanned: AsyncGenerator[Any, None]) -> None:
        super().__init__(stream)
        self._self_spanned = spanned

    def __aiter__(self) -> AsyncTracedStream:
        return self

    async def __anext__(self) -> Any:
        return await self._self_spanned.__anext__()

    async def close(self) -> None:
        await self._self_spanned.aclose()

    async def __aenter__(self) -> AsyncTracedStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _chat_wrapper(
    wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    if args or not listening(dispatcher):
        return wrapped(*args, **kwargs)
    call = _new_call(instance, kwargs)
    if call is None:
        return wrapped(*args, **kwargs)
    if kwargs.get("stream") is True:
        holder: list[Any] = []
        spanned = start_stream(
            dispatcher, CHAT_SPAN, _chat_body(call, lambda: wrapped(*args, **kwargs), holder)
        )
        return holder[0] if spanned is None else TracedStream(holder[0], spanned)
    with dispatcher.span(CHAT_SPAN):
        call.start()
        completion = wrapped(*args, **kwargs)
        _finish_completion(call, completion)
        return completion


async def _achat_wrapper(
    wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    if args or not listening(dispatcher):
        return await wrapped(*args, **kwargs)
    call = _new_call(instance, kwargs)
    if call is None:
        return await wrapped(*args, **kwargs)
    if kwargs.get("stream") is True:
        holder: list[Any] = []
        spanned = await astart_stream(
            dispatcher, CHAT_SPAN, _achat_body(call, lambda: wrapped(*args, **kwargs), holder)
        )
        return holder[0] if spanned is None else AsyncTracedStream(holder[0], spanned)
    async with dispatcher.span(CHAT_SPAN):
        call.start()
        completion = await wrapped(*args, **kwargs)
        _finish_completion(call, completion)
        return completion


# -- embeddings ------------------------------------------------------------------------------


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable):
        return [v for v in value if isinstance(v, str)]
    return []


def _vectors(response: Any) -> list[list[float]]:
    out: list[list[float]] = []
    for item in _get(response, "data") or ():
        vector = _get(item, "embedding")
        if isinstance(vector, list):
            out.append([float(x) for x in vector])
    return out


def _embed_end(instance: Any, kwargs: Mapping[str, Any], t0: float, response: Any) -> None:
    model = _get(response, "model") or kwargs.get("model")
    emit_embedding_end(
        dispatcher,
        t0,
        model=model if isinstance(model, str) else None,
        provider=PROVIDER,
        chunks=_texts(kwargs.get("input")),
        embeddings=_vectors(response),
        usage=coerce_usage(_get(response, "usage")),
        redaction=get_redaction(),
        prices=default_price_table,
    )


def _embed_start(instance: Any, kwargs: Mapping[str, Any]) -> float:
    model = kwargs.get("model")
    return emit_embedding_start(
        dispatcher,
        model if isinstance(model, str) else None,
        PROVIDER,
        {
            **_model_dict(instance, model),
            **_settings({k: v for k, v in kwargs.items() if k != "input"}),
        },
    )


def _embed_wrapper(
    wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    if args or not listening(dispatcher):
        return wrapped(*args, **kwargs)
    with dispatcher.span(EMBEDDING_SPAN):
        t0 = _embed_start(instance, kwargs)
        response = wrapped(*args, **kwargs)
        _embed_end(instance, kwargs, t0, response)
        return response


async def _aembed_wrapper(
    wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    if args or not listening(dispatcher):
        return await wrapped(*args, **kwargs)
    async with dispatcher.span(EMBEDDING_SPAN):
        t0 = _embed_start(instance, kwargs)
        response = await wrapped(*args, **kwargs)
        _embed_end(instance, kwargs, t0, response)
        return response


_WRAPPERS: dict[str, Callable[..., Any]] = {
    "chat": _chat_wrapper,
    "achat": _achat_wrapper,
    "embed": _embed_wrapper,
    "aembed": _aembed_wrapper,
}


# -- switching it on and off -------------------------------------------------------------


def instrument_openai() -> None:
    """Patch the installed ``openai`` package; calling it again does nothing.

    Raises ImportError (saying to install the ``[openai]`` extra) if it is missing.
    """
    try:
        import importlib

        modules = {name: importlib.import_module(name) for name, _, _ in _PATCHES}
    except ImportError as exc:
        raise ImportError(
            "instrument_openai() needs the openai package: pip install 'instrumentation[openai]'"
        ) from exc
    with _lock:
        for module_name, class_name, kind in _PATCHES:
            key = (module_name, class_name)
            if key in _originals:
                continue
            cls = getattr(modules[module_name], class_name)
            _originals[key] = cls.__dict__["create"]
            wrapt.wrap_function_wrapper(cls, "create", _WRAPPERS[kind])


def uninstrument_openai() -> None:
    """Put back the original methods; calling it when not instrumented does nothing."""
    import importlib

    with _lock:
        for (module_name, class_name), original in list(_originals.items()):
            cls = getattr(importlib.import_module(module_name), class_name)
            cls.create = original
            del _originals[(module_name, class_name)]


def is_instrumented() -> bool:
    """Whether :func:`instrument_openai` is in effect."""
    return bool(_originals)


__all__ = [
    "AsyncTracedStream",
    "TracedStream",
    "instrument_openai",
    "is_instrumented",
    "to_chat_message",
    "uninstrument_openai",
]
