"""Redaction: applied before any handler sees an event; the application keeps the text."""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
from typing import Any

import pytest
from pydantic import BaseModel

from instrumentation import get_dispatcher, telemetry
from instrumentation.llms import (
    ChatMessage,
    ContentBlock,
    LLMChatEndEvent,
    LLMChatInProgressEvent,
    LLMChatStartEvent,
    LLMCompletionStartEvent,
    OfflineLLM,
    Redaction,
    TokenUsage,
    configure_redaction,
)
from instrumentation.span import SimpleSpan
from instrumentation.span_handlers import BaseSpanHandler
from instrumentation.testing import Capture

SECRET = "mail bob@example.com now"


def mask_emails(text: str) -> str:
    return re.sub(r"\S+@\S+", "<email>", text)


def test_mask_applies_to_prompts_chunks_and_answers(cap: Capture) -> None:
    """With a mask, no event holds the address; the caller still gets the real answer."""
    configure_redaction(mask=mask_emails)
    model = OfflineLLM()
    assert model.chat(SECRET).message.content == f"Echo: {SECRET}"
    deltas = [c.delta for c in model.stream_chat(SECRET)]
    assert "".join(d or "" for d in deltas) == f"Echo: {SECRET}"
    dumped = " ".join(str(e.model_dump()) for e in cap.events)
    assert "bob@example.com" not in dumped
    assert "<email>" in dumped
    start = cap.events_of(LLMChatStartEvent)[0]
    assert start.messages[0].content == "mail <email> now"
    end = cap.events_of(LLMChatEndEvent)[0]
    assert end.response is not None and end.response.message.content == "Echo: mail <email> now"


def test_record_content_false_records_no_text(cap: Capture) -> None:
    """record_content=False: contents None, prompts "", but usage still counted."""
    configure_redaction(record_content=False)
    model = OfflineLLM()
    model.chat(SECRET)
    list(model.stream_chat(SECRET))
    model.complete(SECRET)
    for event in cap.events_of(LLMChatStartEvent):
        assert [m.content for m in event.messages] == [None]
    for progress in cap.events_of(LLMChatInProgressEvent):
        assert progress.response.delta == "" and progress.response.message.content is None
    assert cap.events_of(LLMCompletionStartEvent)[0].prompt == ""
    for end in cap.events_of(LLMChatEndEvent):
        assert end.response is not None and end.response.message.content is None
        # The answer "Echo: mail bob@example.com now" is Echo, :, mail, bob, @, example,
        # ., com, now: 9 tokens by the word/punctuation rule, although no text is kept.
        assert end.usage is not None and end.usage.completion_tokens == 9


def test_per_llm_redaction_overrides_the_global_one(cap: Capture) -> None:
    """An LLM given its own Redaction uses it whatever the global setting."""
    configure_redaction(mask=mask_emails)
    OfflineLLM(redaction=Redaction()).chat(SECRET)
    assert cap.events_of(LLMChatStartEvent)[0].messages[0].content == SECRET


def test_a_raising_mask_withholds_the_text_and_is_counted(cap: Capture) -> None:
    """A broken mask never leaks the text nor breaks the call."""

    def broken(text: str) -> str:
        raise ValueError("bad regex")

    configure_redaction(mask=broken)
    assert OfflineLLM().chat(SECRET).message.content == f"Echo: {SECRET}"
    assert cap.events_of(LLMChatStartEvent)[0].messages[0].content == "[redaction failed]"
    assert telemetry.counter("llms.redaction_errors").value >= 1


def test_a_broken_mask_is_logged_once_per_interval_and_counted_every_time(
    cap: Capture, caplog: pytest.LogCaptureFixture
) -> None:
    """A mask fails on every message and chunk of every call: a few streamed calls
    logged a warning for each (dozens of lines); one line per interval says it."""

    def broken(text: str) -> str:
        raise ValueError("bad regex")

    configure_redaction(mask=broken)
    model = OfflineLLM(answers=["one two three four five six seven eight"])
    with caplog.at_level(logging.WARNING, logger="instrumentation.llms"):
        for _ in range(3):
            list(model.stream_chat(SECRET))
    lines = [r for r in caplog.records if "redaction mask" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "raised ValueError('bad regex')" in lines[0].getMessage()
    assert telemetry.counter("llms.redaction_errors").value > 20


class _Answer(BaseModel):
    text: str


class _Spy(BaseSpanHandler[SimpleSpan]):
    """A LlamaIndex-style span handler that records what it is given."""

    seen: list[tuple[str, str]] = []

    def new_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        parent_span_id: str | None = None,
        tags: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> SimpleSpan:
        self.seen.append((str(kwargs.get("name")), repr(bound_args.arguments)))
        return SimpleSpan(id_=id_)

    def prepare_to_exit_span(
        self, id_: str, bound_args: Any, instance: Any = None, result: Any = None, **kwargs: Any
    ) -> SimpleSpan | None:
        self.seen.append(("result", repr(result)))
        return self.open_spans.get(id_)

    def prepare_to_drop_span(self, id_: str, *args: Any, **kwargs: Any) -> None:
        return None


JSON_ANSWER = {"json": '{"text": "fine"}'}


def _calls(model: OfflineLLM) -> None:
    model.chat(SECRET)
    model.complete(SECRET)
    model.predict("say {x}", x=SECRET)
    model.structured_predict(_Answer, "reply in json: {x}", x=SECRET)
    for _ in model.stream_chat(SECRET):
        pass
    for _ in model.stream_complete(SECRET):
        pass

    async def both() -> None:
        await model.achat(SECRET)
        await model.acomplete(SECRET)
        async for _ in await model.astream_chat(SECRET):
            pass
        async for _ in await model.astream_complete(SECRET):
            pass

    asyncio.run(both())


def test_redaction_covers_span_handlers_too(cap: Capture) -> None:
    """A span handler reading bound_args or the result sees the text only without redaction."""
    spy = _Spy(seen=[])
    get_dispatcher().add_span_handler(spy)
    _calls(OfflineLLM(answers=JSON_ANSWER))
    names = [name for name, _ in spy.seen if name != "result"]
    assert "OfflineLLM.chat" in names and "OfflineLLM.acomplete" in names
    assert "bob@example.com" in " ".join(text for _, text in spy.seen)  # as in LlamaIndex
    # Streams too (their spans had no arguments at all).
    for method in ("stream_chat", "stream_complete", "astream_chat", "astream_complete"):
        [given] = [text for name, text in spy.seen if name == f"OfflineLLM.{method}"]
        assert "bob@example.com" in given, (method, given)

    spy.seen.clear()
    _calls(OfflineLLM(answers=JSON_ANSWER, redaction=Redaction(record_content=False)))
    assert [name for name, _ in spy.seen if name != "result"] == names
    assert "bob@example.com" not in " ".join(text for _, text in spy.seen)

    spy.seen.clear()
    configure_redaction(mask=mask_emails)
    _calls(OfflineLLM(answers=JSON_ANSWER))
    assert "bob@example.com" not in " ".join(text for _, text in spy.seen)


def test_record_content_false_withholds_the_settings_and_parts_of_any_llm(cap: Capture) -> None:
    """BaseLLM's additional_kwargs (the call's keyword arguments) and a message's
    non-text parts keep only what carries no content; the response's usage and finish
    reason are kept."""
    configure_redaction(record_content=False)
    photo = ChatMessage(
        role="user",
        blocks=[
            ContentBlock(text=SECRET),
            ContentBlock(
                type="input_audio", data={"input_audio": {"data": "UklGRg==", "format": "wav"}}
            ),
        ],
        additional_kwargs={"name": "bob"},
    )
    OfflineLLM().chat(
        [photo], temperature=0.1, note=SECRET, options={"hints": [SECRET], "n": 2, "type": "x"}
    )
    [start] = cap.events_of(LLMChatStartEvent)
    assert start.additional_kwargs == {
        "temperature": 0.1,
        "note": "[redacted]",
        "options": {"hints": ["[redacted]"], "n": 2, "type": "x"},
    }
    [message] = start.messages
    assert message.blocks[1].data == {"input_audio": {"data": "[redacted]", "format": "wav"}}
    assert message.additional_kwargs == {"name": "[redacted]"}
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.response is not None
    assert end.response.additional_kwargs["finish_reason"] == "stop"
    assert isinstance(end.response.additional_kwargs["usage"], TokenUsage)
    assert "bob" not in " ".join(str(e.model_dump()) for e in cap.events)


def test_a_mask_applies_to_the_settings_of_any_llm(cap: Capture) -> None:
    """With a mask, every string in the settings is masked; numbers are kept."""
    configure_redaction(mask=mask_emails)
    OfflineLLM().chat("hi", temperature=0.1, note=SECRET, cc=["x@y.org", 3])
    [start] = cap.events_of(LLMChatStartEvent)
    assert start.additional_kwargs == {
        "temperature": 0.1,
        "note": "mail <email> now",
        "cc": ["<email>", 3],
    }
