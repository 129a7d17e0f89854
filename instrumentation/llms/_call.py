"""One LLM call's events: start, one in-progress per chunk, end.

Shared by :class:`BaseLLM` and the OpenAI instrumentation so both report the same
way: redaction applied before any event exists, latency and time to first token
measured here, usage taken from the provider or estimated (and flagged so), cost from
the price table. Event objects are only built when some handler listens, and building
one never fails the call (see :func:`build`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from instrumentation import telemetry
from instrumentation._spans import stops_the_caller
from instrumentation.dispatcher import Dispatcher
from instrumentation.events.base import BaseEvent
from instrumentation.events.llm import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    ContentBlock,
    EmbeddingEndEvent,
    EmbeddingStartEvent,
    LLMChatEndEvent,
    LLMChatInProgressEvent,
    LLMChatStartEvent,
    LLMCompletionEndEvent,
    LLMCompletionInProgressEvent,
    LLMCompletionStartEvent,
    MessageRole,
    ModelCallEvent,
    TokenUsage,
    ToolCall,
)
from instrumentation.llms.pricing import PriceTable
from instrumentation.llms.redaction import Redaction
from instrumentation.llms.tokens import count_block_tokens, count_message_tokens, count_tokens

logger = logging.getLogger(__name__)
_usage_errors = telemetry.counter("llms.usage_errors")
_event_errors = telemetry.counter("llms.event_errors")

Kind = Literal["chat", "completion"]

#: ``finish_reason`` of a stream the caller stopped reading.
ABANDONED = "abandoned"


def listening(dispatcher: Dispatcher) -> bool:
    """Whether any handler would see this dispatcher's events (a cheap read)."""
    return dispatcher.is_listening


E = TypeVar("E", bound=BaseModel)


def build(cls: type[E], fields: dict[str, Any]) -> E | None:
    """``cls(**fields)``: an event made of what the provider or an LLM class gave, which
    may not fit it (a finish reason that is not a str, ``provider = 5``, a ``metadata``
    that is not a dict). The application's call goes on as it would untraced, so this
    never raises: the fields that do not fit are left out (they take their defaults,
    None or empty) or, if the event cannot be built even so, there is none. Either way
    it is logged (rate-limited) and counted in ``llms.event_errors``.
    """
    try:
        return cls(**fields)
    except ValidationError as exc:
        # Field names and messages only: the values may be text the redaction hides.
        errors = exc.errors()
        problem = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        misfits = {str(e["loc"][0]) for e in errors if e["loc"]}
    except Exception as exc:
        event_error(cls.__name__, f"{cls.__name__} could not be built ({exc!r}); it is not sent")
        return None
    reduced = {name: value for name, value in fields.items() if name not in misfits}
    made: E | None = None
    if len(reduced) < len(fields):
        try:
            made = cls(**reduced)
        except Exception:
            made = None
    left_out = ", ".join(sorted(misfits))
    outcome = f"sent without {left_out}" if made is not None else "not sent"
    event_error(left_out, f"{cls.__name__} could not be built as given ({problem}); {outcome}")
    return made


def emit(dispatcher: Dispatcher, cls: type[BaseEvent], **fields: Any) -> None:
    """Emit ``cls(**fields)``, or what :func:`build` makes of it."""
    try:  # build() itself only when this fails: one call less on every event
        event = cls(**fields)
    except Exception:
        built = build(cls, fields)
        if built is None:
            return
        event = built
    dispatcher.event(event)


def event_error(problem: str, message: str) -> None:
    """Count, and log, what kept an LLM event from being built whole: at most one line
    per kind of ``problem`` every ``telemetry.LOG_INTERVAL_SECONDS``, since an LLM class
    that gets it wrong does so on every call and chunk."""
    _event_errors.inc()
    held_back = telemetry.log_turn(("llms.event_errors", problem))
    if held_back is None:
        return
    more = f" ({held_back} more such events since the last warning)" if held_back else ""
    logger.warning("%s%s", message, more)


def reason_text(reason: Any) -> str | None:
    """``reason`` if it is a finish reason (a str) or None; anything else (``7``, a
    list) is left out of the events, logged and counted as :func:`build` does: it was
    dropped without a word, unlike every other field an event cannot hold."""
    if reason is None or isinstance(reason, str):
        return reason
    kind = type(reason).__name__
    event_error("finish_reason", f"the finish reason is not a str (it is {kind}); it is left out")
    return None


def price(prices: PriceTable, model: str | None, usage: TokenUsage | None) -> float | None:
    """``prices.cost(model, usage)``, or None (logged and counted) when the table fails:
    a cost is only recorded."""
    try:
        return prices.cost(model, usage)
    except BaseException as exc:
        if stops_the_caller(exc):
            raise
        event_error("cost", f"the price table failed ({exc!r}); the cost is left out")
        return None


_COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens")
_MISSING: Any = object()


def _field(value: Any, name: str) -> Any:
    if isinstance(value, Mapping):
        return value.get(name, _MISSING)
    return getattr(value, name, _MISSING)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def coerce_usage(value: Any) -> TokenUsage | None:
    """A :class:`TokenUsage` from one, a dict, or a provider object with the same fields;
    None (so the caller estimates) when it reports no token count or cannot be read.

    Dicts and objects are read the same way: OpenAI's shape (``usage.model_dump()``
    too), cached and reasoning tokens nested in ``prompt_tokens_details`` and
    ``completion_tokens_details``, or :class:`TokenUsage`'s own flat fields. Usage
    comes from the provider or from a subclass's code, and is only recorded: a count
    that is not an int (None, say) is logged and the call gets an estimate, rather
    than the application's call failing or the event claiming exact zeros.
    """
    if value is None or isinstance(value, TokenUsage):
        return value
    try:
        return _read_usage(value)
    except Exception as exc:  # an object whose attributes fail to read, say
        _unreadable(f"an error ({exc!r})")
        return None


def _read_usage(value: Any) -> TokenUsage | None:
    fields: dict[str, Any] = {}
    for name in _COUNTS:
        count = _field(value, name)
        if count is _MISSING:
            continue
        if not _count(count):
            _unreadable(f"{name}={count!r}")
            return None
        fields[name] = count
    if not fields:  # no count we know (another provider's keys?): estimate instead
        if isinstance(value, Mapping) and value:
            logger.debug("usage with no known token count, estimated instead: %r", value)
        return None
    for name, details, inner in (
        ("cached_tokens", "prompt_tokens_details", "cached_tokens"),
        ("reasoning_tokens", "completion_tokens_details", "reasoning_tokens"),
    ):
        count = _field(value, name)
        if count is _MISSING or count is None:
            nested = _field(value, details)
            count = None if nested is _MISSING or nested is None else _field(nested, inner)
        if count is _MISSING or count is None:
            continue
        if not _count(count):
            _unreadable(f"{name}={count!r}")
            return None
        fields[name] = count
    if _field(value, "estimated") is True:  # a TokenUsage dumped and read back
        fields["estimated"] = True
    return TokenUsage.model_validate(fields)


def _unreadable(what: str) -> None:
    _usage_errors.inc()
    held_back = telemetry.log_turn("llms.usage_errors")
    if held_back is None:
        return  # rate-limited: a provider sending this on every call and chunk
    logger.warning(
        "usage with %s is not a token count; the call's usage is estimated%s",
        what,
        f" ({held_back} more such usages since the last warning)" if held_back else "",
    )


class LLMCall:
    """Records one chat or completion call; not thread-safe (one call, one caller)."""

    __slots__ = (
        "_first_token",
        "_red_messages",
        "_red_prompt",
        "_t0",
        "_text",
        "additional_kwargs",
        "dispatcher",
        "kind",
        "listening",
        "messages",
        "model",
        "model_dict",
        "prices",
        "prompt",
        "provider",
        "redaction",
        "requested_model",
    )

    def __init__(
        self,
        dispatcher: Dispatcher,
        kind: Kind,
        *,
        model: str | None,
        provider: str | None,
        redaction: Redaction,
        prices: PriceTable,
        messages: Sequence[ChatMessage] = (),
        prompt: str = "",
        additional_kwargs: dict[str, Any] | None = None,
        model_dict: dict[str, Any] | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.kind = kind
        self.model = model
        #: The model asked for: the reply names its dated snapshot, which a price set
        #: for the model's own name (set_model_price("o3")) does not cover.
        self.requested_model = model
        self.provider = provider
        self.redaction = redaction
        self.prices = prices
        self.messages = list(messages)
        self.prompt = prompt
        self.additional_kwargs = additional_kwargs or {}
        self.model_dict = model_dict or {}
        self.listening = False
        self._text = ""
        self._first_token: float | None = None
        self._t0 = 0.0
        self._red_messages: list[ChatMessage] = []
        self._red_prompt = ""

    # -- start ----------------------------------------------------------------------

    def start(self) -> None:
        """Emit the start event and start the clock."""
        self.listening = listening(self.dispatcher)
        if self.listening:
            red = self.redaction
            if self.kind == "chat":
                self._red_messages = red.messages(self.messages)
                self._send(
                    LLMChatStartEvent,
                    messages=self._red_messages,
                    additional_kwargs=red.values(self.additional_kwargs),
                    model_dict=self.model_dict,
                )
            else:
                self._red_prompt = red.text(self.prompt) or ""
                self._send(
                    LLMCompletionStartEvent,
                    prompt=self._red_prompt,
                    additional_kwargs=red.values(self.additional_kwargs),
                    model_dict=self.model_dict,
                )
        self._t0 = time.perf_counter()

    def _send(self, cls: type[ModelCallEvent], **fields: Any) -> None:
        """Emit ``cls`` with ``fields``, the model and the provider (see :func:`build`)."""
        emit(self.dispatcher, cls, model=self.model, provider=self.provider, **fields)

    # -- chunks ---------------------------------------------------------------------

    @property
    def text(self) -> str:
        """The streamed text so far."""
        return self._text

    def chunk(
        self,
        delta: str,
        raw: Any = None,
        role: MessageRole = MessageRole.ASSISTANT,
        *,
        tool_calls: Sequence[ToolCall] | None = None,
        produced: bool = False,
        blocks: Sequence[ContentBlock] | None = None,
    ) -> None:
        """Record one streamed chunk and emit its in-progress event (if anyone listens).

        ``tool_calls`` are the (chat) tool calls streamed so far and ``blocks`` the
        message's non-text parts so far (a refusal); ``produced`` says the chunk carried
        model output other than text (a tool call's name or arguments, a refusal),
        which counts for the time to first token.
        """
        if self._first_token is None and (delta or produced):
            self._first_token = time.perf_counter()
        self._text += delta
        if not self.listening:
            return
        text = self._text
        if self.kind == "chat":
            message = ChatMessage(
                role=role,
                content=text,
                tool_calls=list(tool_calls or ()),
                blocks=list(blocks or ()),
            )
            response: Any = ChatResponse(message=message, delta=delta, raw=raw)
        else:
            response = CompletionResponse(text=text, delta=delta, raw=raw)
        self._emit_progress(response)

    def _emit_progress(self, response: Any) -> None:
        red = self.redaction
        if red.active:
            response = self._redact_response(response)
        if self.kind == "chat":
            self._send(LLMChatInProgressEvent, messages=self._red_messages, response=response)
        else:
            self._send(LLMCompletionInProgressEvent, prompt=self._red_prompt, response=response)

    def _redact_response(self, response: Any) -> Any:
        red = self.redaction
        if isinstance(response, ChatResponse):
            return ChatResponse(
                message=red.message(response.message),
                delta=red.text(response.delta),
                additional_kwargs=red.values(response.additional_kwargs),
            )
        assert isinstance(response, CompletionResponse)
        return CompletionResponse(
            text=red.text(response.text) or "",
            delta=red.text(response.delta),
            additional_kwargs=red.values(response.additional_kwargs),
        )

    # -- end ------------------------------------------------------------------------

    def _cost(self, usage: TokenUsage | None) -> float | None:
        cost = price(self.prices, self.model, usage)
        if cost is None and self.requested_model and self.requested_model != self.model:
            cost = price(self.prices, self.requested_model, usage)
        return cost

    def estimate_usage(
        self,
        completion_text: str | None = None,
        tool_calls: Sequence[ToolCall] = (),
        blocks: Sequence[ContentBlock] = (),
    ) -> TokenUsage:
        """Usage counted by :mod:`instrumentation.llms.tokens`, flagged as estimated: the
        completion is ``completion_text`` (default: the streamed text), the arguments
        of the ``tool_calls`` the model made and the refusals among ``blocks``, since
        the model produced them all."""
        prompt = (
            count_message_tokens(self.messages)
            if self.kind == "chat"
            else count_tokens(self.prompt)
        )
        text = self.text if completion_text is None else completion_text
        completion = (
            count_tokens(text)
            + sum(count_tokens(c.arguments) for c in tool_calls)
            + count_block_tokens(blocks)
        )
        return TokenUsage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            estimated=True,
        )

    def end(
        self,
        response: ChatResponse | CompletionResponse | None,
        usage: TokenUsage | None = None,
        finish_reason: str | None = None,
        model: str | None = None,
        *,
        estimate: bool = True,
    ) -> TokenUsage | None:
        """Emit the end event; returns the usage reported (estimated when none is given).

        ``estimate=False`` when the reply was not seen (a raw response whose body the
        application reads later): an estimate would claim the model wrote nothing, so
        the usage and cost are None instead.
        """
        now = time.perf_counter()
        if model:
            self.model = model
        if usage is None and estimate:
            if isinstance(response, ChatResponse):
                message = response.message
                usage = self.estimate_usage(
                    message.content or "", message.tool_calls, message.blocks
                )
            elif isinstance(response, CompletionResponse):
                usage = self.estimate_usage(response.text)
            else:
                usage = self.estimate_usage()
        if not self.listening:
            return usage
        latency_ms = (now - self._t0) * 1000.0
        ttft_ms = None if self._first_token is None else (self._first_token - self._t0) * 1000.0
        if response is not None and self.redaction.active:
            response = self._redact_response(response)
        common: dict[str, Any] = {
            "usage": usage,
            "latency_ms": latency_ms,
            "time_to_first_token_ms": ttft_ms,
            "finish_reason": finish_reason,
            "cost_usd": self._cost(usage),
        }
        if self.kind == "chat":
            self._send(LLMChatEndEvent, messages=self._red_messages, response=response, **common)
        else:
            self._send(LLMCompletionEndEvent, prompt=self._red_prompt, response=response, **common)
        return usage

    def end_stream(
        self,
        usage: TokenUsage | None = None,
        finish_reason: str | None = None,
        raw: Any = None,
        model: str | None = None,
        tool_calls: Sequence[ToolCall] = (),
        blocks: Sequence[ContentBlock] = (),
    ) -> TokenUsage | None:
        """End a stream with the text (and, for a chat, the tool calls and non-text
        parts) it produced (``finish_reason`` "abandoned" if cut). A chat stream that
        made tool calls or refused and sent no text has content None, as the same reply
        not streamed."""
        text = self.text
        response: ChatResponse | CompletionResponse
        if self.kind == "chat":
            content = None if (tool_calls or blocks) and not text else text
            message = ChatMessage(
                role=MessageRole.ASSISTANT,
                content=content,
                tool_calls=list(tool_calls),
                blocks=list(blocks),
            )
            response = ChatResponse(message=message, raw=raw)
        else:
            response = CompletionResponse(text=text, raw=raw)
        return self.end(response, usage, finish_reason, model)


def emit_embedding_start(
    dispatcher: Dispatcher, model: str | None, provider: str | None, model_dict: dict[str, Any]
) -> float:
    """Emit :class:`EmbeddingStartEvent`; returns the start time for the end event."""
    if listening(dispatcher):
        emit(dispatcher, EmbeddingStartEvent, model_dict=model_dict, model=model, provider=provider)
    return time.perf_counter()


def emit_embedding_end(
    dispatcher: Dispatcher,
    t0: float,
    *,
    model: str | None,
    provider: str | None,
    chunks: Sequence[str],
    embeddings: list[list[float]],
    usage: TokenUsage | None,
    redaction: Redaction,
    prices: PriceTable,
    estimate: bool = True,
) -> None:
    """Emit :class:`EmbeddingEndEvent` (usage estimated from the texts when not given,
    unless ``estimate`` is False: the reply was not seen, so nothing is claimed)."""
    if not listening(dispatcher):
        return
    if usage is None and estimate:
        prompt = sum(count_tokens(c) for c in chunks)
        usage = TokenUsage(prompt_tokens=prompt, total_tokens=prompt, estimated=True)
    emit(
        dispatcher,
        EmbeddingEndEvent,
        chunks=[redaction.text(c) or "" for c in chunks],
        embeddings=embeddings,
        model=model,
        provider=provider,
        usage=usage,
        latency_ms=(time.perf_counter() - t0) * 1000.0,
        cost_usd=price(prices, model, usage),
    )


__all__ = [
    "ABANDONED",
    "LLMCall",
    "build",
    "coerce_usage",
    "emit",
    "emit_embedding_end",
    "emit_embedding_start",
    "event_error",
    "listening",
    "price",
]
