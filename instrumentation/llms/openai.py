"""Instrument the ``openai`` client with no change to the application's code.

``instrument_openai()`` patches, with ``wrapt``, the ``create`` methods of the
installed package's ``Completions``/``AsyncCompletions`` (chat) and
``Embeddings``/``AsyncEmbeddings`` classes, so every client - made before or after -
emits the LLM events of :mod:`instrumentation.events.llm` in a span named
``OpenAI.chat.completions.create`` / ``OpenAI.embeddings.create`` of the dispatcher
``instrumentation.llms.openai``. Both functions are idempotent and thread-safe;
``uninstrument_openai()`` puts the original methods back, unless another library has
wrapped them since: then its wrapper stays and ours passes calls straight through
(each of our wrappers checks, at call time, whether it is on). The objects behind
``with_raw_response``/``with_streaming_response`` that openai caches per client hold
the method they first saw: on a client that used them before ``instrument_openai()``
they stay untraced. Their calls record the reply when its body has been read
(``with_raw_response``, not streamed: parsed as ``parse()`` does); otherwise the call
ends when the headers arrive, with no response, usage or cost, rather than a guess.

Streams (``stream=True``) come back as the client's own ``Stream``/``AsyncStream``,
wrapped: each chunk emits an in-progress event; usage is taken from the final chunk
when the request asked for it (``stream_options={"include_usage": True}``; the
request is never changed behind the application's back) and estimated otherwise.
The events describe the first choice (index 0), its text, its tool calls (a legacy
``function_call`` and custom tool calls among them) and its refusal. A stream closed
early (``close()``, ``aclose()``) ends its span with the tokens seen so far. openai's
``chat.completions.stream()`` helper calls ``create``, so it is traced too.

The instrumentation never changes what the client returns or raises: if a request
cannot be described (e.g. an odd message), the call runs untraced and the problem is
logged (at most once every 10 s for each kind) and counted
(``llms.openai.describe_errors``); what a reply holds that an event
cannot (a finish reason that is not a str, from a compatible server) is left out of
the event, logged and counted (``llms.event_errors``).
"""

from __future__ import annotations

import array
import base64
import json
import logging
import sys
import threading
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Callable,
    Generator,
    Iterable,
    Mapping,
    Sequence,
)
from typing import TYPE_CHECKING, Any, TypeGuard

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
    reason_text,
)
from instrumentation.llms._streams import (
    READY,
    AsyncEndOnClose,
    AsyncSpannedStream,
    EndOnClose,
    SpannedStream,
    StreamSpan,
    astart_stream,
    start_stream,
)
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

if TYPE_CHECKING:
    _Proxy = wrapt.ObjectProxy[Any]
else:  # wrapt 1.x's ObjectProxy cannot be subscripted
    _Proxy = wrapt.ObjectProxy


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
        ToolCall(id=_get(call, "id"), name=name, arguments=arguments)
        for call in (_get(message, "tool_calls") or ())
        for name, arguments in (_tool_call_body(call),)
    ]
    function_call = _get(message, "function_call")
    if function_call is not None:  # legacy function calling (``functions=``): no id
        calls.insert(
            0,
            ToolCall(
                name=_get(function_call, "name") or "",
                arguments=_arguments_text(_get(function_call, "arguments")),
            ),
        )
    refusal = _get(message, "refusal")
    if isinstance(refusal, str) and refusal:  # kept as a refusal part of a request has it
        blocks.append(_refusal_block(refusal))
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


def _tool_call_body(call: Any) -> tuple[str, str]:
    """A tool call's name and arguments: a function call's, or a custom tool call's
    (``type: "custom"``, ``custom: {name, input}``), whose free-form input stands for
    the arguments."""
    function = _get(call, "function")
    if function is None:
        custom = _get(call, "custom")
        if custom is not None:
            return _get(custom, "name") or "", _arguments_text(_get(custom, "input"))
    return _get(function, "name") or "", _arguments_text(_get(function, "arguments"))


def _refusal_block(refusal: str) -> ContentBlock:
    """A reply's refusal as a message part, shaped as OpenAI's refusal content part, so
    that a refusal reads the same in a reply and in the history sent back."""
    return ContentBlock(type="refusal", data={"type": "refusal", "refusal": refusal})


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
        _describe_failed("chat request", exc, ", so it is not traced")
        return None


def _raw_reply(result: Any, streamed: bool, what: str = "raw response") -> tuple[Any, bool]:
    """What ``create`` returned as the reply to describe, and whether it is there.

    ``with_raw_response`` returns the HTTP response, whose body, read already when
    not streamed, is parsed here as the application's own ``parse()`` would (openai
    caches the parse, so it gets the same object). ``with_streaming_response``, and
    ``with_raw_response`` with ``stream=True``, return before the body is read: the
    reply is not available to the instrumentation, and reading it here would take it
    from the application.
    """
    if not (hasattr(result, "http_response") and hasattr(result, "parse")):
        return result, True
    if streamed or not _is_legacy_response(result):
        return None, False
    try:
        return result.parse(), True
    except Exception as exc:  # the application parses it, and sees the error, itself
        _describe_failed(what, exc)
        return None, False


def _is_legacy_response(result: Any) -> bool:
    """Whether ``result`` is what ``with_raw_response`` returns, whose ``parse()`` is a
    plain method on an already read body (the async client's too)."""
    try:
        from openai._legacy_response import LegacyAPIResponse
    except ImportError:  # pragma: no cover - another openai version: leave it unread
        return False
    return isinstance(result, LegacyAPIResponse)


def _finish_completion(call: LLMCall, completion: Any, streamed: bool = False) -> None:
    """End ``call`` with a ``ChatCompletion`` (or whatever ``create`` returned).

    A reply we cannot describe still ends the call, with its usage when that can be
    read: the client's caller gets the reply either way. A raw response whose body is
    not there (see :func:`_raw_reply`) ends the call with no usage, no cost and no
    response, rather than an estimate that would claim the model wrote nothing.
    """
    completion, available = _raw_reply(completion, streamed)
    if not available:
        call.end(None, None, None, None, estimate=False)
        return
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
        _describe_failed("chat reply", failures[0] if len(failures) == 1 else failures)
    call.end(response, usage, reason, model)


def _describe_failed(what: str, exc: object, consequence: str = "") -> None:
    """Count, and log, what the events could not describe: at most one line per kind
    (``what``) every ``telemetry.LOG_INTERVAL_SECONDS``, since an application or a
    compatible server that sends it once sends it in every call (and every chunk)."""
    _describe_errors.inc()
    held_back = telemetry.log_turn(("llms.openai.describe_errors", what))
    if held_back is None:
        return
    more = f" ({held_back} more since the last warning)" if held_back else ""
    logger.warning("an OpenAI %s could not be described%s: %r%s", what, consequence, exc, more)


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


def _primary(choices: Iterable[Any]) -> Any:
    """The choice the events describe: index 0 (a missing index counts as 0), as the
    first choice of a reply that is not streamed."""
    for choice in choices:
        index = _get(choice, "index")
        if not isinstance(index, int) or index == 0:
            return choice
    return None


def _piece(value: Any) -> str:
    """A streamed fragment as text (some compatible servers send objects)."""
    return value if isinstance(value, str) else _arguments_text(value)


class _ChunkState:
    """What a stream's chunks said about the first choice (see :func:`_primary`); the
    chunks of other choices (``n`` > 1) are passed on but not recorded."""

    __slots__ = ("calls", "finish_reason", "function", "model", "refusal", "usage")

    def __init__(self) -> None:
        self.usage: TokenUsage | None = None
        self.finish_reason: str | None = None
        self.model: str | None = None
        #: Tool calls by their index: [id, name, arguments], each concatenated from
        #: its fragments as openai's own stream helpers do.
        self.calls: dict[int, list[str]] = {}
        #: A legacy function call (``functions=``): [name, arguments], concatenated.
        self.function: list[str] | None = None
        #: The refusal so far, concatenated.
        self.refusal = ""

    def take(self, call: LLMCall, chunk: Any) -> None:
        choices = _get(chunk, "choices")
        try:
            text, produced = self._read(chunk, choices)
        except Exception as exc:  # the application gets the chunk whatever we make of it
            _describe_failed("chat chunk", exc)
            text, produced = "", False
        if not choices:
            return
        listening = call.listening
        calls = self.tool_calls() if listening and (self.calls or self.function) else None
        blocks = self.blocks() if listening else None
        call.chunk(text, raw=chunk, tool_calls=calls, produced=produced, blocks=blocks)

    def _read(self, chunk: Any, choices: Any) -> tuple[str, bool]:
        """The first choice's new text in ``chunk``, and whether it produced anything."""
        model = _get(chunk, "model")
        if isinstance(model, str) and model:
            self.model = model
        usage = _get(chunk, "usage")
        if usage is not None:
            self.usage = coerce_usage(usage)
        choice = _primary(choices) if choices else None
        if choice is None:
            return "", False
        reason = _get(choice, "finish_reason")
        if reason is not None:
            text = reason_text(reason)
            if text is not None:
                self.finish_reason = text
        delta = _get(choice, "delta")
        text = _get(delta, "content")
        text = text if isinstance(text, str) else ""
        produced = bool(text)
        for position, fragment in enumerate(_get(delta, "tool_calls") or ()):
            index = _get(fragment, "index")
            acc = self.calls.setdefault(index if isinstance(index, int) else position, ["", "", ""])
            function = _get(fragment, "function")
            arguments = "arguments"
            if function is None and _get(fragment, "custom") is not None:
                function, arguments = _get(fragment, "custom"), "input"  # a custom tool
            for slot, value in enumerate(
                (_get(fragment, "id"), _get(function, "name"), _get(function, arguments))
            ):
                if value is not None:
                    piece = _piece(value)
                    acc[slot] += piece
                    produced = produced or (slot > 0 and bool(piece))
        function = _get(delta, "function_call")
        if function is not None:
            if self.function is None:
                self.function = ["", ""]
            for slot, value in enumerate((_get(function, "name"), _get(function, "arguments"))):
                if value is not None:
                    piece = _piece(value)
                    self.function[slot] += piece
                    produced = produced or bool(piece)
        refusal = _get(delta, "refusal")
        if isinstance(refusal, str) and refusal:
            self.refusal += refusal
            produced = True
        return text, produced

    def tool_calls(self) -> list[ToolCall]:
        """The tool calls streamed so far, in index order (a legacy function call, which
        comes alone, first)."""
        calls = [
            ToolCall(id=call_id or None, name=name, arguments=arguments)
            for _, (call_id, name, arguments) in sorted(self.calls.items())
        ]
        if self.function is not None:
            name, arguments = self.function
            calls.insert(0, ToolCall(name=name, arguments=arguments))
        return calls

    def blocks(self) -> list[ContentBlock]:
        """The non-text parts streamed so far: the refusal, if the model refused."""
        return [_refusal_block(self.refusal)] if self.refusal else []


# -- chat -----------------------------------------------------------------------------------


def _chat_body(
    call: LLMCall, span: StreamSpan, open_stream: Callable[[], Any], holder: list[Any]
) -> Generator[Any, Any, None]:
    call.start()
    stream = open_stream()
    holder.append(stream)
    if not isinstance(stream, Iterable):  # e.g. with_raw_response: nothing to iterate here
        _finish_completion(call, stream, streamed=True)
        return
    state = _ChunkState()

    def abandon() -> None:
        _end_stream(call, state, ABANDONED)

    span.interrupt = lambda: _close_quietly(stream)  # close() from another thread
    with EndOnClose(span, abandon, span.interrupt):
        yield READY
        for chunk in stream:
            state.take(call, chunk)
            yield chunk
    _end_stream(call, state, state.finish_reason)


async def _achat_body(
    call: LLMCall, span: StreamSpan, open_stream: Callable[[], Any], holder: list[Any]
) -> AsyncGenerator[Any, Any]:
    call.start()
    stream = await open_stream()
    holder.append(stream)
    if not isinstance(stream, AsyncIterable):
        _finish_completion(call, stream, streamed=True)
        return
    state = _ChunkState()

    def abandon() -> None:
        _end_stream(call, state, ABANDONED)

    span.interrupt = lambda: _aclose_quietly(stream)  # aclose() from another task
    async with AsyncEndOnClose(span, abandon, span.interrupt):
        yield READY
        async for chunk in stream:
            state.take(call, chunk)
            yield chunk
    _end_stream(call, state, state.finish_reason)


def _end_stream(call: LLMCall, state: _ChunkState, finish_reason: str | None) -> None:
    call.end_stream(
        state.usage,
        finish_reason,
        model=state.model,
        tool_calls=state.tool_calls(),
        blocks=state.blocks(),
    )


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


class TracedStream(_Proxy):
    """The client's ``Stream``, iterated through the span; everything else passes through.

    Read after ``close()``, it is the client's own stream, as untraced: the chunks its
    response had buffered, then the error of reading a closed response. The span
    ended at the close, with what was read until then.
    """

    def __init__(self, stream: Any, spanned: SpannedStream[Any]) -> None:
        super().__init__(stream)
        self._self_spanned = spanned

    def __iter__(self) -> TracedStream:
        return self

    def __next__(self) -> Any:
        if self._self_spanned.closed:
            return next(self.__wrapped__)
        return next(self._self_spanned)

    def close(self) -> None:
        self._self_spanned.close()

    def __enter__(self) -> TracedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncTracedStream(_Proxy):
    """The client's ``AsyncStream``, iterated through the span (after ``close()``, as
    untraced: see :class:`TracedStream`)."""

    def __init__(self, stream: Any, spanned: AsyncSpannedStream[Any]) -> None:
        super().__init__(stream)
        self._self_spanned = spanned

    def __aiter__(self) -> AsyncTracedStream:
        return self

    async def __anext__(self) -> Any:
        if self._self_spanned.closed:
            return await self.__wrapped__.__anext__()
        return await self._self_spanned.__anext__()

    async def close(self) -> None:
        await self._self_spanned.aclose()

    async def aclose(self) -> None:
        """openai's alias of :meth:`close` (what ``contextlib.aclosing`` calls): the
        proxy would otherwise hand it the client's own, which closes the HTTP response
        behind the span's back."""
        await self.close()

    async def __aenter__(self) -> AsyncTracedStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


#: The parameters of chat ``create`` that openai types as any ``Iterable``.
_ITERABLE_PARAMETERS = ("messages", "tools", "functions")


def _one_pass(value: Any) -> TypeGuard[Iterable[Any]]:
    """Whether ``value`` is an iterable that reading may use up (a generator, say)."""
    return isinstance(value, Iterable) and not isinstance(value, (Sequence, Mapping, str))


def _listed(kwargs: dict[str, Any], keys: Sequence[str] = _ITERABLE_PARAMETERS) -> dict[str, Any]:
    """``kwargs`` with each of ``keys`` (chat: ``messages``, ``tools``, ``functions``)
    read once into a list when it is a one-pass iterable (a generator, say), so that
    describing the request (or a handler serialising its start event) does not use it
    up: the client is then given that list."""
    listed: dict[str, Any] = {}
    for key in keys:
        value = kwargs.get(key)
        if _one_pass(value):
            listed[key] = list(value)
    return {**kwargs, **listed} if listed else kwargs


def _listed_input(kwargs: dict[str, Any]) -> dict[str, Any]:
    """:func:`_listed` for an embedding's ``input``, and the token-id iterables in it
    too (``Iterable[Iterable[int]]``): the client used them up, and the usage estimate
    for a reply with none, read after the call, found no ids (0 tokens)."""
    kwargs = _listed(kwargs, ("input",))
    inputs = kwargs.get("input")
    if isinstance(inputs, list) and any(_one_pass(item) for item in inputs):
        kwargs = {**kwargs, "input": [list(i) if _one_pass(i) else i for i in inputs]}
    return kwargs


class _Patch:
    """Our wrapper of one class's ``create``: what it wrapped, and whether it traces.

    Off, it passes every call straight through: it stays so wherever it is still
    called from (another library's wrapper installed over it, the ``with_raw_response``
    objects openai caches per client)."""

    __slots__ = ("on", "original", "proxy")

    def __init__(self, original: Any) -> None:
        self.on = False
        self.original = original
        self.proxy: Any = None


Wrapper = Callable[[Any, Any, tuple[Any, ...], dict[str, Any]], Any]


def _chat_wrapper(patch: _Patch) -> Wrapper:
    def chat(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args or not listening(dispatcher) or not patch.on:
            return wrapped(*args, **kwargs)
        kwargs = _listed(kwargs)
        call = _new_call(instance, kwargs)
        if call is None:
            return wrapped(**kwargs)
        if kwargs.get("stream") is True:
            holder: list[Any] = []
            span = StreamSpan(dispatcher, CHAT_SPAN)
            spanned = start_stream(span, _chat_body(call, span, lambda: wrapped(**kwargs), holder))
            return holder[0] if spanned is None else TracedStream(holder[0], spanned)
        with dispatcher.span(CHAT_SPAN):
            call.start()
            completion = wrapped(**kwargs)
            _finish_completion(call, completion)
            return completion

    return chat


def _achat_wrapper(patch: _Patch) -> Wrapper:
    async def achat(
        wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if args or not listening(dispatcher) or not patch.on:
            return await wrapped(*args, **kwargs)
        kwargs = _listed(kwargs)
        call = _new_call(instance, kwargs)
        if call is None:
            return await wrapped(**kwargs)
        if kwargs.get("stream") is True:
            holder: list[Any] = []
            span = StreamSpan(dispatcher, CHAT_SPAN)
            body = _achat_body(call, span, lambda: wrapped(**kwargs), holder)
            spanned = await astart_stream(span, body)
            return holder[0] if spanned is None else AsyncTracedStream(holder[0], spanned)
        async with dispatcher.span(CHAT_SPAN):
            call.start()
            completion = await wrapped(**kwargs)
            _finish_completion(call, completion)
            return completion

    return achat


# -- embeddings ------------------------------------------------------------------------------


def _texts(value: Any) -> list[str]:
    """The texts embedded. An input given as token ids (a list of ints, or a list of
    such lists) has no text to record: it gives none."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable):
        return [v for v in value if isinstance(v, str)]
    return []


def _token_ids(value: Any) -> int | None:
    """How many token ids an input of token ids holds (None for text input): what the
    provider counts as the prompt, so the usage estimate when none is reported."""
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        return None
    if all(isinstance(v, int) for v in value):
        return len(value)
    if all(isinstance(v, Sequence) and all(isinstance(t, int) for t in v) for v in value):
        return sum(len(v) for v in value)
    return None


def _decode_base64(encoded: str) -> list[float]:
    """A base64 embedding as floats: the API sends little-endian float32, which openai
    decodes when it chose the format itself (here, when the application asked for it)."""
    raw = base64.b64decode(encoded)
    if len(raw) % 4:
        raise ValueError(f"a base64 embedding of {len(raw)} bytes is not float32s")
    values = array.array("f", raw)
    if sys.byteorder != "little":  # pragma: no cover - big-endian machines
        values.byteswap()
    return values.tolist()


def _vectors(response: Any) -> list[list[float]]:
    out: list[list[float]] = []
    for item in _get(response, "data") or ():
        vector = _get(item, "embedding")
        if isinstance(vector, str):
            out.append(_decode_base64(vector))
        elif isinstance(vector, list):
            out.append([float(x) for x in vector])
    return out


def _embed_end(instance: Any, kwargs: Mapping[str, Any], t0: float, response: Any) -> None:
    """Emit the end event of an embedding call; what cannot be read of the reply is
    left out (logged and counted), since the application has its reply either way."""
    inputs = kwargs.get("input")
    model: Any = kwargs.get("model")
    vectors: list[list[float]] = []
    usage: TokenUsage | None = None
    reply, available = _raw_reply(response, False, "embedding raw response")
    if available:
        model = _get(reply, "model") or model
        usage = coerce_usage(_get(reply, "usage"))
        try:
            vectors = _vectors(reply)
        except Exception as exc:
            _describe_failed("embedding reply", exc)
        ids = _token_ids(inputs)
        if usage is None and ids is not None:
            usage = TokenUsage(prompt_tokens=ids, total_tokens=ids, estimated=True)
    emit_embedding_end(
        dispatcher,
        t0,
        model=model if isinstance(model, str) else None,
        provider=PROVIDER,
        chunks=_texts(inputs),
        embeddings=vectors,
        usage=usage,
        redaction=get_redaction(),
        prices=default_price_table,
        estimate=available,
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


def _embed_wrapper(patch: _Patch) -> Wrapper:
    def embed(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args or not listening(dispatcher) or not patch.on:
            return wrapped(*args, **kwargs)
        kwargs = _listed_input(kwargs)  # its texts are read after the call
        with dispatcher.span(EMBEDDING_SPAN):
            t0 = _embed_start(instance, kwargs)
            response = wrapped(*args, **kwargs)
            _embed_end(instance, kwargs, t0, response)
            return response

    return embed


def _aembed_wrapper(patch: _Patch) -> Wrapper:
    async def aembed(
        wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if args or not listening(dispatcher) or not patch.on:
            return await wrapped(*args, **kwargs)
        kwargs = _listed_input(kwargs)  # its texts are read after the call
        async with dispatcher.span(EMBEDDING_SPAN):
            t0 = _embed_start(instance, kwargs)
            response = await wrapped(*args, **kwargs)
            _embed_end(instance, kwargs, t0, response)
            return response

    return aembed


_WRAPPERS: dict[str, Callable[[_Patch], Wrapper]] = {
    "chat": _chat_wrapper,
    "achat": _achat_wrapper,
    "embed": _embed_wrapper,
    "aembed": _aembed_wrapper,
}


# -- switching it on and off -------------------------------------------------------------

#: Our wrapper of each patched class, by (module, class).
_patches: dict[tuple[str, str], _Patch] = {}


def _in_chain(method: Any, target: Any) -> bool:
    """Whether ``target`` is ``method`` or what it wraps, however deep (``__wrapped__``)."""
    for _ in range(64):
        if method is target:
            return True
        method = getattr(method, "__wrapped__", None)
        if method is None:
            return False
    return False


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
            cls = getattr(modules[module_name], class_name)
            current = cls.__dict__["create"]
            patch = _patches.get(key)
            if patch is not None:
                if patch.on:
                    continue
                if _in_chain(current, patch.proxy):  # left under another library's wrapper
                    patch.on = True
                    continue
                if current is patch.original:  # taken off cleanly: the same wrapper goes
                    cls.create = patch.proxy  # back, as cached objects hold it
                    patch.on = True
                    continue
                # Ours is no longer called from the class: it stays off, so that a chain
                # still holding it does not trace twice.
            patch = _Patch(current)
            wrapt.wrap_function_wrapper(cls, "create", _WRAPPERS[kind](patch))
            patch.proxy = cls.__dict__["create"]
            patch.on = True
            _patches[key] = patch


def uninstrument_openai() -> None:
    """Stop tracing; calling it when not instrumented does nothing.

    Where our wrapper is still the class's method, the original method is put back.
    Where another library has since wrapped it, its wrapper is left in place (removing
    ours would remove it too) and ours passes every call straight through.
    """
    import importlib

    with _lock:
        for (module_name, class_name), patch in _patches.items():
            if not patch.on:
                continue
            patch.on = False
            cls = getattr(importlib.import_module(module_name), class_name)
            if cls.__dict__.get("create") is patch.proxy:
                cls.create = patch.original


def is_instrumented() -> bool:
    """Whether :func:`instrument_openai` is in effect."""
    return any(patch.on for patch in _patches.values())


__all__ = [
    "AsyncTracedStream",
    "TracedStream",
    "instrument_openai",
    "is_instrumented",
    "uninstrument_openai",
]
