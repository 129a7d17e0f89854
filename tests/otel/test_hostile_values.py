"""Values an application should not hand over, and does, through the real SDK and
exporter to a real OTLP/HTTP receiver: a bad value costs itself, never its span,
never the batch around it."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import pytest

from instrumentation import BaseEvent, get_dispatcher, instrument_tags, telemetry
from instrumentation.events.llm import ChatMessage, ChatResponse, LLMChatEndEvent, TokenUsage
from instrumentation.otel import configure_otlp
from instrumentation.otel.attributes import to_attribute
from instrumentation.otel.receiver import OTLPReceiver

from .conftest import short

SURROGATE = os.fsdecode(b"caf\xe9")  # undecodable bytes, as a file name gives them


class Boom:
    def __str__(self) -> str:
        raise ValueError("no str")

    __repr__ = __str__


class Odd(BaseEvent):
    value: Any = None


def test_a_lone_surrogate_costs_nothing_else(receiver: OTLPReceiver) -> None:
    """One in a span's name, a dispatcher's name, an error message or an event's class
    name failed the encoding of the whole batch: a hundred healthy spans were lost with
    it. Now it arrives as U+FFFD, with everything else."""
    otlp = configure_otlp(endpoint=receiver.endpoint)
    d = get_dispatcher("tests.otel.hostile")
    odd_scope = get_dispatcher(f"tests.otel.hostile.{SURROGATE}")

    class Named(BaseEvent):
        @classmethod
        def class_name(cls) -> str:
            return f"Named {SURROGATE}"

    @d.span
    def healthy(i: int) -> int:
        return i

    try:
        for i in range(100):
            healthy(i)
        with d.span(f"open {SURROGATE}"):
            d.event(Named())
            d.event(Odd(value={"k": SURROGATE, SURROGATE: [SURROGATE]}))
        with odd_scope.span("scoped"):
            pass
        try:
            with instrument_tags({"path": SURROGATE}), d.span("fails"):
                raise FileNotFoundError(f"no such file: {SURROGATE}")
        except FileNotFoundError:
            pass
    finally:
        assert otlp.shutdown()
    names = [short(s.name) for s in receiver.spans]
    assert names.count("healthy") == 100
    assert "open caf\ufffd" in names and "scoped" in names and "fails" in names
    by_name = {short(s.name): s for s in receiver.spans}
    opened = by_name["open caf\ufffd"]
    assert [e.name for e in opened.events] == ["Named caf\ufffd", "Odd"]
    assert json.loads(opened.events[1].attributes["value"]) == {
        "k": "caf\ufffd",
        "caf\ufffd": ["caf\ufffd"],
    }
    failed = by_name["fails"]
    assert failed.status_message == "FileNotFoundError: no such file: caf\ufffd"
    [exception] = [e for e in failed.events if e.name == "exception"]
    assert exception.attributes["exception.message"] == "no such file: caf\ufffd"
    assert failed.attributes["instrumentation.tag.path"] == "caf\ufffd"
    assert telemetry.counter("otel.spans_not_exported").value == 0


def test_values_that_cannot_be_printed_cost_only_themselves(receiver: OTLPReceiver) -> None:
    """A tag, span attribute or event field whose str() raises, or nested past the
    recursion limit, lost the whole span (or event): now a placeholder names its type."""
    otlp = configure_otlp(endpoint=receiver.endpoint)
    d = get_dispatcher("tests.otel.unprintable")
    deep: list[Any] = []
    for _ in range(5_000):
        deep = [deep]

    @d.span(attributes={"boom": Boom(), "deep": deep})
    def work() -> None:
        d.event(Odd(value=Boom()))

    class Failing(Exception):
        def __str__(self) -> str:
            raise ValueError("no str")

    try:
        with instrument_tags({"boom": Boom()}):
            work()
        try:
            with d.span("fails"):
                raise Failing
        except Failing:
            pass
    finally:
        assert otlp.shutdown()
    by_name = {short(s.name): s for s in receiver.spans}
    span = by_name["work"]
    # An object is sent as JSON (a string, for one that is no container).
    assert json.loads(span.attributes["boom"]) == "<unprintable Boom>"
    assert json.loads(span.attributes["instrumentation.tag.boom"]) == "<unprintable Boom>"
    assert isinstance(span.attributes["deep"], str)
    assert [json.loads(e.attributes["value"]) for e in span.events] == ["<unprintable Boom>"]
    failed = by_name["fails"]
    assert failed.status_message == f"Failing: <unprintable {Failing.__qualname__}>"
    [exception] = [e for e in failed.events if e.name == "exception"]
    assert exception.attributes["exception.type"].endswith("Failing")


def test_token_counts_past_int64_are_left_out_and_the_rest_sent(
    receiver: OTLPReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    """The exporter dropped such a count itself, with only an error of its own logged."""
    caplog.set_level(logging.WARNING)
    otlp = configure_otlp(endpoint=receiver.endpoint)
    d = get_dispatcher("tests.otel.tokens")
    try:
        with d.span("call"):
            d.event(
                LLMChatEndEvent(
                    messages=[],
                    response=ChatResponse(message=ChatMessage(role="assistant", content="x")),
                    usage=TokenUsage(prompt_tokens=2**70, completion_tokens=3),
                )
            )
    finally:
        assert otlp.shutdown()
    [span] = receiver.spans
    assert span.attributes["gen_ai.usage.output_tokens"] == 3
    assert "gen_ai.usage.input_tokens" not in span.attributes
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")]


def test_json_attributes_are_strict_and_huge_lists_are_bounded() -> None:
    """NaN inside a value was written as NaN (no JSON parser takes it); a list of a
    million numbers went out whole, a request collectors refuse with its batch."""
    text = to_attribute({"temperature": math.nan, "xs": [1.0, math.inf]})
    assert isinstance(text, str)
    assert json.loads(text, parse_constant=_refuse) == {"temperature": None, "xs": [1.0, None]}
    big = to_attribute([0.5] * 1_000_000)
    assert isinstance(big, str) and len(big) <= 8192 and json.loads(big)[-1] == 0.5
    long_strings = to_attribute(["x" * 9_000] * 2_000)
    assert isinstance(long_strings, str) and len(long_strings) <= 8192
    assert to_attribute([1, 2, 3]) == (1, 2, 3)  # small lists stay arrays


def _refuse(constant: str) -> Any:
    raise AssertionError(f"not strict JSON: {constant}")
