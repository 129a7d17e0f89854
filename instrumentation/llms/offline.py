"""``OfflineLLM``: a deterministic LLM with no network, for demos, notebooks and tests.

It answers from canned answers (the first whose key appears in the last user message,
or a list used in turn) or else echoes the last user message. Its tokens are those of
:func:`instrumentation.llms.tokens.count_tokens`, reported as real (not estimated)
usage, in the final chunk for streams, as providers do. Latency, chunk size and
delays, and failures (before the answer, or after N chunks, for the first N calls)
are configurable.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

from instrumentation.events.llm import ChatMessage, ChatResponse, MessageRole, TokenUsage
from instrumentation.llms.base import BaseLLM
from instrumentation.llms.pricing import PriceTable
from instrumentation.llms.redaction import Redaction
from instrumentation.llms.tokens import count_message_tokens, count_tokens, split_chunks


async def _async_sleep(seconds: float) -> None:
    """``asyncio.sleep``, imported at the first wait, not with the module: only an
    async call with a delay set waits."""
    import asyncio

    await asyncio.sleep(seconds)


class OfflineLLMError(RuntimeError):
    """The failure :class:`OfflineLLM` injects when asked to (``fail_with`` overrides it)."""


class OfflineLLM(BaseLLM):
    """A scripted LLM. The model's name (default ``"offline"``) may be given first, as
    to any :class:`BaseLLM`; the other arguments are keyword-only:

    * ``answers``: a mapping ``keyword -> answer`` (first keyword found, case-insensitive,
      in the last user message wins) or a sequence of answers used in turn; unmatched
      questions get ``"Echo: <question>"``;
    * ``latency_s``: seconds before the answer (before the first chunk when streaming);
      ``chunk_delay_s``: seconds between chunks (both finite: an infinite wait hangs an
      async call, and is an OverflowError in a sync one); ``words_per_chunk``: stream
      chunk size;
    * ``fail_with``: an exception (or message) raised by every call, or by the first
      ``fail_times`` calls; ``fail_after_chunks``: a stream fails after that many chunks;
    * ``report_usage=False``: no usage from the "provider", so events carry an estimate.
    """

    provider = "offline"

    def __init__(
        self,
        model: str = "offline",
        *,
        answers: Mapping[str, str] | Sequence[str] | None = None,
        latency_s: float = 0.0,
        chunk_delay_s: float = 0.0,
        words_per_chunk: int = 1,
        fail_with: BaseException | str | None = None,
        fail_times: int | None = None,
        fail_after_chunks: int | None = None,
        report_usage: bool = True,
        redaction: Redaction | None = None,
        price_table: PriceTable | None = None,
    ) -> None:
        super().__init__(model, redaction=redaction, price_table=price_table)
        if isinstance(answers, str):
            raise TypeError(
                "answers is a mapping keyword -> answer or a list of answers, not a str"
            )
        if answers is not None and not isinstance(answers, (Mapping, Sequence)):
            raise TypeError(f"answers is a mapping or a list, got {type(answers).__name__}")
        for name, value in (("latency_s", latency_s), ("chunk_delay_s", chunk_delay_s)):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"{name} is a finite number of seconds >= 0, got {value!r}")
        if (
            isinstance(words_per_chunk, bool)
            or not isinstance(words_per_chunk, int)
            or words_per_chunk < 1
        ):
            raise ValueError(f"words_per_chunk is an int >= 1, got {words_per_chunk!r}")
        for name, count in (("fail_times", fail_times), ("fail_after_chunks", fail_after_chunks)):
            if count is not None and (
                isinstance(count, bool) or not isinstance(count, int) or count < 0
            ):
                raise ValueError(f"{name} is an int >= 0 or None, got {count!r}")
        if fail_with is not None and not isinstance(fail_with, (BaseException, str)):
            raise TypeError("fail_with is an exception instance or a message str")
        if fail_after_chunks is not None and fail_with is None:
            fail_with = "injected failure in the stream"
        self.answers = answers
        self.latency_s = float(latency_s)
        self.chunk_delay_s = float(chunk_delay_s)
        self.words_per_chunk = words_per_chunk
        self.fail_with = fail_with
        self.fail_times = fail_times
        self.fail_after_chunks = fail_after_chunks
        self.report_usage = report_usage
        self._lock = threading.Lock()
        self._turn = 0
        self._calls = 0

    # -- the script -------------------------------------------------------------------

    def answer_for(self, messages: Sequence[ChatMessage]) -> str:
        """The answer to ``messages`` (advances a list of answers by one)."""
        question = next(
            (m.content or "" for m in reversed(messages) if m.role == MessageRole.USER), ""
        )
        answers = self.answers
        if isinstance(answers, Mapping):
            lowered = question.lower()
            for key, answer in answers.items():
                if key.lower() in lowered:
                    return answer
        elif answers:
            with self._lock:
                answer = answers[self._turn % len(answers)]
                self._turn += 1
            return answer
        return f"Echo: {question}"

    def _error(self) -> BaseException:
        fail = self.fail_with
        return OfflineLLMError(fail) if isinstance(fail, str) else fail  # type: ignore[return-value]

    def _should_fail(self) -> bool:
        """Whether this call fails (counts calls for ``fail_times``)."""
        with self._lock:
            self._calls += 1
            calls = self._calls
        if self.fail_with is None:
            return False
        return self.fail_times is None or calls <= self.fail_times

    def _fails_upfront(self) -> bool:
        return self._should_fail() and self.fail_after_chunks is None

    def _usage(self, messages: Sequence[ChatMessage], text: str) -> dict[str, Any]:
        if not self.report_usage:
            return {}
        prompt = count_message_tokens(messages)
        completion = count_tokens(text)
        return {
            "usage": TokenUsage(
                prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
            )
        }

    def _response(self, messages: Sequence[ChatMessage]) -> ChatResponse:
        text = self.answer_for(messages)
        extra = {"finish_reason": "stop", **self._usage(messages, text)}
        return ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=text), additional_kwargs=extra
        )

    def _chunks(self, messages: Sequence[ChatMessage]) -> tuple[str, list[str], bool]:
        failing = self._should_fail()
        if failing and self.fail_after_chunks is None:
            raise self._error()
        text = self.answer_for(messages)
        return text, split_chunks(text, self.words_per_chunk), failing

    def _chunk_response(
        self, messages: Sequence[ChatMessage], so_far: str, delta: str, last: bool, text: str
    ) -> ChatResponse:
        extra: dict[str, Any] = {}
        if last:
            extra = {"finish_reason": "stop", **self._usage(messages, text)}
        return ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=so_far),
            delta=delta,
            additional_kwargs=extra,
        )

    # -- BaseLLM ------------------------------------------------------------------------

    def _chat(self, messages: list[ChatMessage], **kwargs: Any) -> ChatResponse:
        if self.latency_s:
            time.sleep(self.latency_s)
        if self._should_fail():
            raise self._error()
        return self._response(messages)

    async def _achat(self, messages: list[ChatMessage], **kwargs: Any) -> ChatResponse:
        if self.latency_s:
            await _async_sleep(self.latency_s)
        if self._should_fail():
            raise self._error()
        return self._response(messages)

    def _stream_chat(self, messages: list[ChatMessage], **kwargs: Any) -> Iterator[ChatResponse]:
        text, chunks, failing = self._chunks(messages)
        if self.latency_s:
            time.sleep(self.latency_s)
        so_far = ""
        for i, delta in enumerate(chunks):
            if failing and i == self.fail_after_chunks:
                raise self._error()
            if i and self.chunk_delay_s:
                time.sleep(self.chunk_delay_s)
            so_far += delta
            yield self._chunk_response(messages, so_far, delta, i == len(chunks) - 1, text)
        if failing:
            raise self._error()

    async def _astream_chat(
        self, messages: list[ChatMessage], **kwargs: Any
    ) -> AsyncIterator[ChatResponse]:
        text, chunks, failing = self._chunks(messages)
        if self.latency_s:
            await _async_sleep(self.latency_s)
        so_far = ""
        for i, delta in enumerate(chunks):
            if failing and i == self.fail_after_chunks:
                raise self._error()
            if i and self.chunk_delay_s:
                await _async_sleep(self.chunk_delay_s)
            so_far += delta
            yield self._chunk_response(messages, so_far, delta, i == len(chunks) - 1, text)
        if failing:
            raise self._error()


__all__ = ["OfflineLLM", "OfflineLLMError"]
