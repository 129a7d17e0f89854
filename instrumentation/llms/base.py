"""``BaseLLM``: the public LLM calls, traced; subclasses only talk to their model.

A subclass implements ``_chat`` and ``_stream_chat`` (and, if it has better than the
defaults, ``_complete``, ``_stream_complete`` and the async variants ``_achat``,
``_astream_chat``, ``_acomplete``, ``_astream_complete``). The public methods
(``chat``, ``achat``, ``complete``, ``acomplete``, ``stream_chat``, ``astream_chat``,
``stream_complete``, ``astream_complete``, ``predict``, ``structured_predict``) each
open a span named ``<Class>.<method>`` on the dispatcher ``instrumentation.llms.base``
and emit the start event, one in-progress event per streamed chunk and the end event;
on an error the span is dropped and no end event is sent.

Usage and finish reason travel from a subclass in ``response.additional_kwargs``
(keys ``"usage"`` - a :class:`TokenUsage` or dict - and ``"finish_reason"``); a
streamed chunk carries them on the last chunk. Without usage the call reports an
estimate (``usage.estimated`` is True).

A hook of the wrong kind (an ``async def _chat``, a plain ``def _achat``) is a
TypeError when the subclass is defined, and a hook that returns or yields the wrong
type a TypeError naming it when called, whether or not a handler listens: the
tracing reads what the hooks give, and a mistake must not surface as an error from
inside it, nor only once someone listens.
"""

from __future__ import annotations

import abc
import functools
import inspect
import string
import time
import types
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Sequence,
)
from contextvars import ContextVar
from typing import Any, TypeVar

from pydantic import BaseModel

from instrumentation._spans import LazySignature, stops_the_caller
from instrumentation._wrap import MARK, mark_traced
from instrumentation.dispatcher import get_dispatcher
from instrumentation.events.llm import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    LLMPredictEndEvent,
    LLMPredictStartEvent,
    LLMStructuredPredictEndEvent,
    LLMStructuredPredictStartEvent,
    MessageRole,
    ModelCallEvent,
    TokenUsage,
)
from instrumentation.llms._call import (
    ABANDONED,
    Kind,
    LLMCall,
    coerce_usage,
    emit,
    event_error,
    listening,
    reason_text,
)
from instrumentation.llms._streams import (
    READY,
    AsyncEndOnClose,
    EndOnClose,
    SpannedStream,
    StreamSpan,
    astart_stream,
    start_stream,
)
from instrumentation.llms.pricing import PriceTable, default_price_table
from instrumentation.llms.redaction import Redaction, get_redaction

dispatcher = get_dispatcher(__name__)

M = TypeVar("M", bound=BaseModel)


def as_messages(messages: Sequence[ChatMessage | dict[str, Any]] | str) -> list[ChatMessage]:
    """Messages as :class:`ChatMessage` (a str is one user message; dicts are validated)."""
    if isinstance(messages, str):
        return [ChatMessage(role=MessageRole.USER, content=messages)]
    if isinstance(messages, ChatMessage) or not isinstance(messages, Sequence):
        raise TypeError(
            f"messages is a list of ChatMessage (or of dicts with role and content); "
            f"got {type(messages).__name__}"
        )
    return [m if isinstance(m, ChatMessage) else ChatMessage.model_validate(m) for m in messages]


def _check_prompt(prompt: object) -> str:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt is a str, got {type(prompt).__name__}")
    return prompt


def _check_template(template: object) -> str:
    if not isinstance(template, str):
        raise TypeError(f"template is a str with {{placeholders}}, got {type(template).__name__}")
    return template


def _fill(template: str, args: dict[str, Any]) -> str:
    """``template.format(**args)``; a placeholder with no argument is a TypeError naming
    it (as a missing argument of a call is), not a bare ``KeyError: 'x'``."""
    try:
        return template.format(**args)
    except (KeyError, IndexError):
        missing = _unfilled(template, args)
        if not missing:  # raised by an argument's own lookup ({user[name]}): theirs
            raise
    named = [name for name in missing if name and not name.isdigit()]
    if not named:
        raise TypeError(
            "the template has a positional placeholder ({} or {0}); predict fills named "
            "ones only: write {name} and pass name=..."
        )
    them = "them" if len(named) > 1 else "it"
    raise TypeError(
        f"no value for the template's {', '.join('{' + name + '}' for name in named)}: "
        f"pass {them} by name, as predict(template, {', '.join(name + '=...' for name in named)})"
    )


def _unfilled(template: str, args: dict[str, Any]) -> list[str]:
    """The placeholders of ``template`` (and of its format specs: ``{x:>{width}}``) that
    ``args`` has no value for ("" for ``{}``, digits for ``{0}``, which keyword
    arguments never fill)."""
    missing: list[str] = []
    for _, field, spec, _ in string.Formatter().parse(template):
        if field is None:
            continue
        name = field.partition(".")[0].partition("[")[0]
        nested = _unfilled(spec, args) if spec else []
        for each in (name, *nested):
            if (each not in args or not each or each.isdigit()) and each not in missing:
                missing.append(each)
    return missing


def _finish_reason(extra: dict[str, Any]) -> str | None:
    return reason_text(extra.get("finish_reason"))


def _usage_and_reason(extra: dict[str, Any]) -> tuple[TokenUsage | None, str | None]:
    return coerce_usage(extra.get("usage")), _finish_reason(extra)


# -- the hooks a subclass implements, checked -----------------------------------------

#: What each hook must be: the kinds of function that fit, and what to say if it is not.
_HOOK_KINDS: dict[str, tuple[frozenset[str], str]] = {
    "_chat": (
        frozenset({"def"}),
        "a plain def returning a ChatResponse (async code goes in _achat)",
    ),
    "_complete": (
        frozenset({"def"}),
        "a plain def returning a CompletionResponse (async code goes in _acomplete)",
    ),
    "_stream_chat": (
        frozenset({"def", "def with yield"}),
        "a def that yields ChatResponse chunks (async code goes in _astream_chat)",
    ),
    "_stream_complete": (
        frozenset({"def", "def with yield"}),
        "a def that yields CompletionResponse chunks (async code goes in _astream_complete)",
    ),
    # A plain def fits the async hooks too, returning what they would (a client's
    # coroutine, an async iterator): what it returns is checked when called.
    "_achat": (
        frozenset({"async def", "def"}),
        "an async def returning a ChatResponse (or a def returning an awaitable of one)",
    ),
    "_acomplete": (
        frozenset({"async def", "def"}),
        "an async def returning a CompletionResponse (or a def returning an awaitable of one)",
    ),
    "_astream_chat": (
        frozenset({"async def with yield", "def"}),
        "an async def that yields ChatResponse chunks (or a def returning an async iterator)",
    ),
    "_astream_complete": (
        frozenset({"async def with yield", "def"}),
        "an async def that yields CompletionResponse chunks (or a def returning an async iterator)",
    ),
}


def _kind(function: Callable[..., Any]) -> str:
    if inspect.isasyncgenfunction(function):
        return "async def with yield"
    if inspect.iscoroutinefunction(function):
        return "async def"
    if inspect.isgeneratorfunction(function):
        return "def with yield"
    return "def"


def _check_hook(cls: type, name: str, function: object) -> None:
    """A TypeError if ``cls`` defines the hook ``name`` as the wrong kind of function.

    A decorated hook fits if the decorator or what it wraps (``__wrapped__``) does;
    what is not a function (a callable object) is checked when called."""
    if not inspect.isfunction(function):
        return
    fits, must = _HOOK_KINDS[name]
    try:
        inner = inspect.unwrap(function)
    except ValueError:  # a cycle of __wrapped__
        inner = function
    if _kind(function) in fits or _kind(inner) in fits:
        return
    kind = _kind(function)
    article = "an" if kind.startswith("async") else "a"
    raise TypeError(f"{cls.__name__}.{name} must be {must}; it is {article} {kind}")


def _hook_error(llm: BaseLLM, hook: str, value: object, did: str, must: str) -> TypeError:
    """The TypeError of a hook that gave ``value``, which does not fit."""
    if inspect.iscoroutine(value):
        value.close()  # never to be awaited: no "never awaited" warning on top of this
    got = "None" if value is None else f"a {type(value).__name__}"
    return TypeError(f"{type(llm).__name__}.{hook} {did} {got}; it must {must}")


R = TypeVar("R")


def _returned(llm: BaseLLM, hook: str, expected: type[R], value: object) -> R:
    """``value``, what ``hook`` returned, if it is an ``expected``."""
    if isinstance(value, expected):
        return value
    raise _hook_error(llm, hook, value, "returned", f"return a {expected.__name__}")


def _awaitable(llm: BaseLLM, hook: str, expected: type, value: object) -> Awaitable[object]:
    """``value``, what the async ``hook`` returned, if it can be awaited."""
    if inspect.isawaitable(value):
        return value
    raise _hook_error(
        llm, hook, value, "returned", f"be an async def returning a {expected.__name__}"
    )


def _iterator(llm: BaseLLM, hook: str, expected: type, value: object) -> Iterator[Any]:
    """An iterator over ``value``, what the stream ``hook`` returned."""
    if isinstance(value, Iterable):
        return iter(value)
    raise _hook_error(
        llm,
        hook,
        value,
        "returned",
        f"yield {expected.__name__} chunks (or return an iterator of them)",
    )


def _async_iterable(llm: BaseLLM, hook: str, expected: type, value: object) -> AsyncIterable[Any]:
    """``value``, what the async stream ``hook`` returned, if ``async for`` can read it."""
    if isinstance(value, AsyncIterable):
        return value
    raise _hook_error(
        llm, hook, value, "returned", f"be an async def that yields {expected.__name__} chunks"
    )


def _yielded(llm: BaseLLM, hook: str, expected: type[R], chunk: object) -> R:
    """``chunk``, one the stream ``hook`` yielded, if it is an ``expected``."""
    if isinstance(chunk, expected):
        return chunk
    raise _hook_error(llm, hook, chunk, "yielded", f"yield {expected.__name__} chunks")


#: Inside structured_predict: the finish reason each model's predict() reported (by
#: ``id`` of the model), for structured_predict's end event.
_predict_reports: ContextVar[dict[int, str | None] | None] = ContextVar(
    "instrumentation_predict_reports", default=None
)


F = TypeVar("F", bound=Callable[..., Any])


def _marked_like(call: Callable[..., Any], traced: F) -> F:
    # Marked as traced, as ``@dispatcher.span`` marks what it wraps: decorating again
    # is a no-op, and DispatcherSpanMixin treats overrides as it did.
    mark_traced(call, getattr(traced, MARK))
    return call  # type: ignore[return-value]


def _call_span(method: F) -> F:
    """Trace an LLM call as LlamaIndex does: span handlers get its arguments and result.

    With redaction on for the call's LLM, they get neither (the span is a block), since
    the arguments hold the prompt and the result the answer: redaction covers span
    handlers as well as events.
    """
    traced = dispatcher.span(method)

    @functools.wraps(method)
    def call(self: BaseLLM, *args: Any, **kwargs: Any) -> Any:
        if self._redaction().active:
            with dispatcher.span(f"{type(self).__name__}.{method.__name__}"):
                return method(self, *args, **kwargs)
        return traced(self, *args, **kwargs)

    return _marked_like(call, traced)


def _acall_span(method: F) -> F:
    """:func:`_call_span` for a coroutine method."""
    traced = dispatcher.span(method)

    @functools.wraps(method)
    async def call(self: BaseLLM, *args: Any, **kwargs: Any) -> Any:
        if self._redaction().active:
            async with dispatcher.span(f"{type(self).__name__}.{method.__name__}"):
                return await method(self, *args, **kwargs)
        return await traced(self, *args, **kwargs)

    return _marked_like(call, traced)


class BaseLLM(abc.ABC):
    """An LLM whose every call is traced; see the module docstring for what to implement.

    ``model`` and ``provider`` name it in the events; ``redaction`` (default: the global
    setting at call time) masks recorded text; ``price_table`` prices its usage.
    Instances are safe to share between threads if the subclass's methods are.
    """

    provider: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse a hook of the wrong kind, or a ``provider`` that is not a name, when
        the class is defined: found at a call, either failed inside the tracing, and
        only once a handler listened."""
        super().__init_subclass__(**kwargs)
        for name, value in vars(cls).items():
            if name in _HOOK_KINDS:
                _check_hook(cls, name, value)
        provider = vars(cls).get("provider")
        if not (provider is None or isinstance(provider, str) or hasattr(provider, "__get__")):
            raise TypeError(
                f"{cls.__name__}.provider is the provider's name, a str or None; got {provider!r}"
            )

    def __init__(
        self,
        model: str,
        *,
        provider: str | None = None,
        redaction: Redaction | None = None,
        price_table: PriceTable | None = None,
    ) -> None:
        if not isinstance(model, str) or not model:
            raise TypeError(f"model is the model's name, a non-empty str; got {model!r}")
        if provider is not None and not isinstance(provider, str):
            raise TypeError(f"provider is a str or None, got {type(provider).__name__}")
        if redaction is not None and not isinstance(redaction, Redaction):
            raise TypeError("redaction is a Redaction(mask=..., record_content=...) or None")
        if price_table is not None and not isinstance(price_table, PriceTable):
            raise TypeError(
                "price_table is a PriceTable (PriceTable({model: ModelPrice(...)})) or None; "
                f"got {type(price_table).__name__}"
            )
        self.model = model
        if provider is not None:
            self.provider = provider
        self.redaction = redaction
        self.price_table = price_table if price_table is not None else default_price_table

    # -- what subclasses implement ----------------------------------------------------

    @abc.abstractmethod
    def _chat(self, messages: list[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Answer ``messages``."""

    @abc.abstractmethod
    def _stream_chat(self, messages: list[ChatMessage], **kwargs: Any) -> Iterator[ChatResponse]:
        """Answer ``messages`` chunk by chunk (each response's ``delta`` is the new text)."""

    def _complete(self, prompt: str, **kwargs: Any) -> CompletionResponse:
        messages = [ChatMessage(role=MessageRole.USER, content=prompt)]
        response = _returned(self, "_chat", ChatResponse, self._chat(messages, **kwargs))
        return CompletionResponse(
            text=response.message.content or "",
            raw=response.raw,
            additional_kwargs=response.additional_kwargs,
        )

    def _stream_complete(self, prompt: str, **kwargs: Any) -> Iterator[CompletionResponse]:
        # Each chunk's text is the completion so far, whether the chat chunks carry
        # pieces (delta) or the answer so far (message text): the application reads
        # either ``text`` or ``delta``.
        messages = [ChatMessage(role=MessageRole.USER, content=prompt)]
        so_far = ""
        source = self._stream_chat(messages, **kwargs)
        for chunk in _iterator(self, "_stream_chat", ChatResponse, source):
            chunk = _yielded(self, "_stream_chat", ChatResponse, chunk)
            delta = _new_text(chunk, so_far)
            so_far += delta
            yield CompletionResponse(
                text=so_far,
                delta=delta,
                raw=chunk.raw,
                additional_kwargs=chunk.additional_kwargs,
            )

    async def _achat(self, messages: list[ChatMessage], **kwargs: Any) -> ChatResponse:
        return _returned(self, "_chat", ChatResponse, self._chat(messages, **kwargs))

    async def _acomplete(self, prompt: str, **kwargs: Any) -> CompletionResponse:
        return _returned(self, "_complete", CompletionResponse, self._complete(prompt, **kwargs))

    async def _astream_chat(
        self, messages: list[ChatMessage], **kwargs: Any
    ) -> AsyncIterator[ChatResponse]:
        source = self._stream_chat(messages, **kwargs)
        for chunk in _iterator(self, "_stream_chat", ChatResponse, source):
            yield _yielded(self, "_stream_chat", ChatResponse, chunk)

    async def _astream_complete(
        self, prompt: str, **kwargs: Any
    ) -> AsyncIterator[CompletionResponse]:
        source = self._stream_complete(prompt, **kwargs)
        for chunk in _iterator(self, "_stream_complete", CompletionResponse, source):
            yield _yielded(self, "_stream_complete", CompletionResponse, chunk)

    # -- helpers ----------------------------------------------------------------------

    @property
    def metadata(self) -> dict[str, Any]:
        """What the start events carry as ``model_dict``."""
        return {"class_name": type(self).__name__, "model": self.model, "provider": self.provider}

    def _model_dict(self) -> dict[str, Any]:
        """:attr:`metadata`, which a subclass may override: one that fails gives {}, as
        the events are only a record (see :func:`instrumentation.llms._call.build`)."""
        try:
            return self.metadata
        except BaseException as exc:
            if stops_the_caller(exc):
                raise
            name = f"{type(self).__name__}.metadata"
            event_error(name, f"{name} failed ({exc!r}); the events' model_dict is left out")
            return {}

    def _call(
        self,
        kind: Kind,
        kwargs: dict[str, Any],
        messages: Sequence[ChatMessage] = (),
        prompt: str = "",
    ) -> LLMCall:
        return LLMCall(
            dispatcher,
            kind,
            model=self.model,
            provider=self.provider,
            redaction=self.redaction if self.redaction is not None else get_redaction(),
            prices=self.price_table,
            messages=messages,
            prompt=prompt,
            additional_kwargs=dict(kwargs),
            model_dict=self._model_dict(),
        )

    @staticmethod
    def _finish(call: LLMCall, response: ChatResponse | CompletionResponse) -> None:
        usage, reason = _usage_and_reason(response.additional_kwargs)
        call.end(response, usage, reason)

    # -- chat ---------------------------------------------------------------------------

    @_call_span
    def chat(
        self, messages: Sequence[ChatMessage | dict[str, Any]] | str, **kwargs: Any
    ) -> ChatResponse:
        """Answer ``messages`` (a list of ChatMessage, or a str as one user message)."""
        msgs = as_messages(messages)
        if not listening(dispatcher):
            return _returned(self, "_chat", ChatResponse, self._chat(msgs, **kwargs))
        call = self._call("chat", kwargs, messages=msgs)
        call.start()
        response = _returned(self, "_chat", ChatResponse, self._chat(msgs, **kwargs))
        self._finish(call, response)
        return response

    @_acall_span
    async def achat(
        self, messages: Sequence[ChatMessage | dict[str, Any]] | str, **kwargs: Any
    ) -> ChatResponse:
        """Async :meth:`chat`."""
        msgs = as_messages(messages)
        if not listening(dispatcher):
            return await self._answer("_achat", ChatResponse, self._achat(msgs, **kwargs))
        call = self._call("chat", kwargs, messages=msgs)
        call.start()
        response = await self._answer("_achat", ChatResponse, self._achat(msgs, **kwargs))
        self._finish(call, response)
        return response

    # -- completion ---------------------------------------------------------------------

    @_call_span
    def complete(self, prompt: str, **kwargs: Any) -> CompletionResponse:
        """Complete ``prompt``."""
        _check_prompt(prompt)
        if not listening(dispatcher):
            return _returned(
                self, "_complete", CompletionResponse, self._complete(prompt, **kwargs)
            )
        call = self._call("completion", kwargs, prompt=prompt)
        call.start()
        response = _returned(
            self, "_complete", CompletionResponse, self._complete(prompt, **kwargs)
        )
        self._finish(call, response)
        return response

    @_acall_span
    async def acomplete(self, prompt: str, **kwargs: Any) -> CompletionResponse:
        """Async :meth:`complete`."""
        _check_prompt(prompt)
        if not listening(dispatcher):
            return await self._answer(
                "_acomplete", CompletionResponse, self._acomplete(prompt, **kwargs)
            )
        call = self._call("completion", kwargs, prompt=prompt)
        call.start()
        response = await self._answer(
            "_acomplete", CompletionResponse, self._acomplete(prompt, **kwargs)
        )
        self._finish(call, response)
        return response

    async def _answer(self, hook: str, expected: type[R], pending: object) -> R:
        """What the async ``hook`` returned (``pending``), awaited and checked."""
        return _returned(self, hook, expected, await _awaitable(self, hook, expected, pending))

    # -- streams ------------------------------------------------------------------------

    def stream_chat(
        self, messages: Sequence[ChatMessage | dict[str, Any]] | str, **kwargs: Any
    ) -> SpannedStream[ChatResponse]:
        """Answer chunk by chunk; ``close()`` the stream (or drop it) to stop early."""
        msgs = as_messages(messages)
        call = self._call("chat", kwargs, messages=msgs)
        span = _stream_span(self, "stream_chat", (messages,), kwargs)
        hook = _Hook(self, "_stream_chat", ChatResponse)
        body = _stream_body(call, span, lambda: self._stream_chat(msgs, **kwargs), hook)
        return _started(start_stream(span, body))

    def stream_complete(self, prompt: str, **kwargs: Any) -> SpannedStream[CompletionResponse]:
        """Complete ``prompt`` chunk by chunk."""
        call = self._call("completion", kwargs, prompt=_check_prompt(prompt))
        span = _stream_span(self, "stream_complete", (prompt,), kwargs)
        hook = _Hook(self, "_stream_complete", CompletionResponse)
        body = _stream_body(call, span, lambda: self._stream_complete(prompt, **kwargs), hook)
        return _started(start_stream(span, body))

    async def astream_chat(
        self, messages: Sequence[ChatMessage | dict[str, Any]] | str, **kwargs: Any
    ) -> AsyncGenerator[ChatResponse, None]:
        """Async :meth:`stream_chat`: ``async for r in await llm.astream_chat(...)``;
        ``aclose()`` it to stop early."""
        msgs = as_messages(messages)
        call = self._call("chat", kwargs, messages=msgs)
        span = _stream_span(self, "astream_chat", (messages,), kwargs)
        hook = _Hook(self, "_astream_chat", ChatResponse)
        body = _astream_body(call, span, lambda: self._astream_chat(msgs, **kwargs), hook)
        return _started(await astart_stream(span, body))

    async def astream_complete(
        self, prompt: str, **kwargs: Any
    ) -> AsyncGenerator[CompletionResponse, None]:
        """Async :meth:`stream_complete`."""
        call = self._call("completion", kwargs, prompt=_check_prompt(prompt))
        span = _stream_span(self, "astream_complete", (prompt,), kwargs)
        hook = _Hook(self, "_astream_complete", CompletionResponse)
        body = _astream_body(call, span, lambda: self._astream_complete(prompt, **kwargs), hook)
        return _started(await astart_stream(span, body))

    # -- prompts ------------------------------------------------------------------------

    @_call_span
    def predict(self, template: str, **template_args: Any) -> str:
        """Fill ``template`` (``str.format`` style) with ``template_args`` and chat with it."""
        output, reason = self._predict(template, template_args)
        reports = _predict_reports.get()
        if reports is not None:  # inside structured_predict, which calls this
            reports[id(self)] = reason
        return output

    def _predict(self, template: str, template_args: dict[str, Any]) -> tuple[str, str | None]:
        """The answer, with the finish reason its end event reports."""
        question = _fill(_check_template(template), template_args)
        listen = listening(dispatcher)
        if listen:
            self._send(
                LLMPredictStartEvent,
                template=self._redacted(template),
                template_args=self._redacted_args(template_args),
            )
        started = time.perf_counter()
        answer = self.chat([ChatMessage(role=MessageRole.USER, content=question)])
        output = answer.message.content or ""
        if not listen:
            return output, None
        reason = _finish_reason(answer.additional_kwargs)
        self._send(
            LLMPredictEndEvent, output=self._redacted(output), **self._end_info(reason, started)
        )
        return output, reason

    def _send(self, cls: type[ModelCallEvent], **fields: Any) -> None:
        """Emit ``cls`` with ``fields``, the model and the provider; one that cannot be
        built as given never fails the call (see :func:`instrumentation.llms._call.build`)."""
        emit(dispatcher, cls, model=self.model, provider=self.provider, **fields)

    def _end_info(self, reason: str | None, started: float) -> dict[str, Any]:
        # No usage nor cost: the chat end event inside reports the model call, and a
        # handler (or a store) summing usage over every end event would count the
        # call two or three times. LlamaIndex's predict events carry none either.
        return {
            "latency_ms": (time.perf_counter() - started) * 1000.0,
            "finish_reason": reason,
        }

    @_call_span
    def structured_predict(self, output_cls: type[M], template: str, **template_args: Any) -> M:
        """Like :meth:`predict`, the answer parsed as JSON into ``output_cls``."""
        if not (isinstance(output_cls, type) and issubclass(output_cls, BaseModel)):
            raise TypeError("output_cls is a pydantic model class")
        _check_template(template)
        listen = listening(dispatcher)
        if listen:
            self._send(
                LLMStructuredPredictStartEvent,
                output_cls=output_cls.__name__,
                template=self._redacted(template),
                template_args=self._redacted_args(template_args),
            )
        started = time.perf_counter()
        reports: dict[int, str | None] = {}
        token = _predict_reports.set(reports)
        try:
            text = self.predict(template, **template_args)
        finally:
            _predict_reports.reset(token)
        # This model's own predict (an override may ask another model too, or not call
        # ours at all).
        reason = reports.get(id(self))
        output = output_cls.model_validate_json(text)
        if listen:
            recorded: Any = output if not self._redaction().active else None
            self._send(
                LLMStructuredPredictEndEvent, output=recorded, **self._end_info(reason, started)
            )
        return output

    def _redaction(self) -> Redaction:
        return self.redaction if self.redaction is not None else get_redaction()

    def _redacted(self, text: str) -> str:
        return self._redaction().text(text) or ""

    def _redacted_args(self, args: dict[str, Any]) -> dict[str, Any]:
        red = self._redaction()
        if not red.active:
            return dict(args)
        return {k: red.text(str(v)) for k, v in args.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r})"


def _new_text(chunk: ChatResponse | CompletionResponse, so_far: str) -> str:
    """A streamed chunk's new text: its ``delta``, or, from a source that sets only the
    text (``message.content`` or ``text``), what that text adds to ``so_far``, read as
    the answer so far (LlamaIndex's convention); a text that does not continue
    ``so_far`` is taken whole. Pieces that repeat the answer's start are misread:
    sources that stream pieces set ``delta``."""
    if chunk.delta is not None:
        return chunk.delta
    text = chunk.message.content if isinstance(chunk, ChatResponse) else chunk.text
    if not text:
        return ""
    return text[len(so_far) :] if text.startswith(so_far) else text


#: The signatures stream spans bind their arguments with (lazily, for handlers that ask).
_STREAM_SIGNATURES = {
    name: LazySignature(getattr(BaseLLM, name), drop_first=True)
    for name in ("stream_chat", "stream_complete", "astream_chat", "astream_complete")
}


def _stream_span(
    llm: BaseLLM, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> StreamSpan:
    """A stream's span: with the call's arguments and the LLM, as the other calls'
    spans, unless redaction is on for the call (see :func:`_call_span`)."""
    name = f"{type(llm).__name__}.{method}"
    if llm._redaction().active:
        return StreamSpan(dispatcher, name)
    return StreamSpan(dispatcher, name, llm, _STREAM_SIGNATURES[method], args, kwargs)


class _Hook:
    """A stream hook of ``llm``, whose chunks are ``expected``: what it gives is checked."""

    __slots__ = ("expected", "llm", "name")

    def __init__(
        self, llm: BaseLLM, name: str, expected: type[ChatResponse | CompletionResponse]
    ) -> None:
        self.llm = llm
        self.name = name
        self.expected = expected

    def iterator(self, returned: object) -> Iterator[Any]:
        return _iterator(self.llm, self.name, self.expected, returned)

    def async_iterable(self, returned: object) -> AsyncIterable[Any]:
        return _async_iterable(self.llm, self.name, self.expected, returned)

    def chunk(self, chunk: object) -> ChatResponse | CompletionResponse:
        return _yielded(self.llm, self.name, self.expected, chunk)


def _stream_body(
    call: LLMCall, span: StreamSpan, open_stream: Any, hook: _Hook
) -> Generator[Any, Any, None]:
    """The span-side generator of a sync stream (see :mod:`._streams`)."""
    call.start()
    source = hook.iterator(open_stream())
    usage: TokenUsage | None = None
    reason: str | None = None

    def abandon() -> None:
        call.end_stream(finish_reason=ABANDONED)

    with EndOnClose(span, abandon, lambda: _close_source(source)):
        yield READY
        for item in source:
            chunk = hook.chunk(item)
            call.chunk(_new_text(chunk, call.text), raw=chunk.raw)
            u, r = _usage_and_reason(chunk.additional_kwargs)
            usage, reason = u or usage, r or reason
            yield chunk
    call.end_stream(usage, reason)


async def _astream_body(
    call: LLMCall, span: StreamSpan, open_stream: Any, hook: _Hook
) -> AsyncGenerator[Any, Any]:
    """The span-side async generator of an async stream."""
    call.start()
    source = hook.async_iterable(open_stream())
    usage: TokenUsage | None = None
    reason: str | None = None

    def abandon() -> None:
        call.end_stream(finish_reason=ABANDONED)

    async with AsyncEndOnClose(span, abandon, lambda: _aclose_source(source, span)):
        yield READY
        async for item in source:
            chunk = hook.chunk(item)
            call.chunk(_new_text(chunk, call.text), raw=chunk.raw)
            u, r = _usage_and_reason(chunk.additional_kwargs)
            usage, reason = u or usage, r or reason
            yield chunk
    call.end_stream(usage, reason)


S = TypeVar("S")


def _started(stream: S | None) -> S:
    if stream is None:  # pragma: no cover - the bodies here always yield READY
        raise RuntimeError("the stream ended before it started")
    return stream


def _close_source(source: Any) -> None:
    close = getattr(source, "close", None)
    if close is not None:
        close()


async def _aclose_source(source: Any, span: StreamSpan) -> None:
    if isinstance(source, types.AsyncGeneratorType) and (source.ag_running or not span.by_caller):
        # The event loop is closing it, or will (when the body's frame lets go of it):
        # closing it here too would run its clean-up twice at once.
        return
    aclose = getattr(source, "aclose", None)
    if aclose is not None:
        await aclose()


__all__ = ["BaseLLM"]
