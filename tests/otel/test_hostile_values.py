"""Values an application should not hand over, and does, through the real SDK and
exporter to a real OTLP/HTTP receiver: a bad value costs itself, never its span,
never the batch around it."""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field, PrivateAttr, field_serializer

from instrumentation import BaseEvent, get_dispatcher, instrument_tags, telemetry
from instrumentation.events.llm import ChatMessage, ChatResponse, LLMChatEndEvent, TokenUsage
from instrumentation.otel import attributes, configure_otlp
from instrumentation.otel.attributes import to_attribute
from instrumentation.otel.receiver import OTLPReceiver

from .conftest import Traced, short

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


def test_an_integer_longer_than_python_prints_says_its_size(receiver: OTLPReceiver) -> None:
    """Python prints no int of more than 4,300 digits: as a tag, span attribute or
    event field it was sent as ``<unprintable int>``, and a dict holding one as
    ``<unprintable dict>``, its other fields lost."""
    otlp = configure_otlp(endpoint=receiver.endpoint)
    d = get_dispatcher("tests.otel.huge_int")
    huge = 10**5000

    @d.span(attributes={"n": huge, "ns": [huge, 7], "nested": {"n": huge, "kept": "yes"}})
    def counted() -> None:
        d.event(Odd(value=huge))

    try:
        with instrument_tags({"n": huge}):
            counted()
    finally:
        assert otlp.shutdown()
    [span] = receiver.spans
    size = "<int of 16610 bits>"
    assert span.attributes["n"] == span.attributes["instrumentation.tag.n"] == size
    assert list(span.attributes["ns"]) == [size, "7"]
    assert json.loads(span.attributes["nested"]) == {"n": size, "kept": "yes"}
    assert [e.attributes["value"] for e in span.events] == [size]


def test_a_huge_error_message_is_sent_cut(receiver: OTLPReceiver) -> None:
    """``str()`` of the exception went whole into the status and twice into the
    exception event (its message and stack trace): megabytes in one span, which a
    collector refuses with the whole batch. The caller gets the exception untouched."""
    otlp = configure_otlp(endpoint=receiver.endpoint)
    d = get_dispatcher("tests.otel.huge_error")
    message = "x" * 1_000_000
    err = ValueError(message)

    @d.span
    def fails() -> None:
        raise err

    try:
        with pytest.raises(ValueError) as caught:
            fails()
    finally:
        assert otlp.shutdown()
    assert caught.value is err and str(err) is message
    [span] = receiver.spans
    cut = "x" * (attributes.MAX_VALUE_CHARS - 3) + "..."
    assert span.status_message == f"ValueError: {cut}"
    [exception] = [e for e in span.events if e.name == "exception"]
    assert exception.attributes["exception.message"] == cut
    stacktrace = exception.attributes["exception.stacktrace"]
    assert stacktrace.startswith("Traceback") and "in fails" in stacktrace
    assert len(stacktrace) < 2 * attributes.MAX_VALUE_CHARS


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


# -- a huge value costs the application's thread what a small one does -----------------

_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=60),
    lambda inner: (
        st.lists(inner, max_size=30)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=8) | st.integers(0, 9), inner, max_size=12)
    ),
    max_leaves=400,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_json_values, limit=st.integers(40, 600))
def test_a_value_too_large_to_fit_gives_what_serialising_it_whole_gives(
    value: Any, limit: int
) -> None:
    """fit_json leaves out of its work what cannot be in its result (a list's older
    items, a dict's later ones, past the text it keeps): the result is the same. (Here
    every list and dict counts as long, so that small values take that path too.)"""
    whole = _fit_json_serialising_everything(value, limit)
    saved = attributes._LONG
    attributes._LONG = -1
    try:
        assert attributes.fit_json(value, limit) == whole
    finally:
        attributes._LONG = saved
    assert len(whole) <= limit
    json.loads(whole)  # still JSON


def _fit_json_serialising_everything(value: Any, limit: int) -> str:
    saved = attributes._least_size
    attributes._least_size = lambda value, budget, depth=0: 0  # type: ignore[assignment]
    try:
        return attributes.fit_json(value, limit)
    finally:
        attributes._least_size = saved


class Counted:
    """A value JSON does not know: serialised through its str(), which counts."""

    calls = 0

    def __str__(self) -> str:
        Counted.calls += 1
        return "c"


@pytest.mark.parametrize(
    "shape",
    [
        lambda items: items,  # a list: its latest items are kept
        lambda items: {"payload": items},  # in a dict: the beginning of its text
        lambda items: [{"id": 1}, items],  # the latest item alone too large
        lambda items: dict(enumerate(items)),
    ],
)
def test_a_huge_value_is_not_serialised_whole(shape: Any) -> None:
    """A list of a million values, or a dict holding one, was serialised whole on the
    application's thread, and more than once (up to 0.4 s a call) for 8 KB of it."""
    Counted.calls = 0
    value = shape([Counted() for _ in range(200_000)])
    sent = to_attribute(value)
    assert isinstance(sent, str) and 0 < len(sent) <= attributes.MAX_VALUE_CHARS
    assert "c" in sent
    assert Counted.calls < 30_000  # a few times the items that fit, not 200,000


def _holding_itself(value: Any) -> list[Any]:
    itself: list[Any] = [value]
    itself.append(itself)
    return itself


@pytest.mark.parametrize(
    "shape",
    [
        lambda items: [[items]],
        lambda items: {"a": {"b": items}},
        lambda items: [{"a": [items]}],
        lambda items: {"a": [{"b": items}]},
        lambda items: _holding_itself([items]),
        lambda items: _holding_itself({"a": [items]}),
    ],
    ids=["list2", "dict2", "list3", "dict3", "itself2", "itself3"],
)
def test_a_long_list_nested_deeper_is_bounded_as_one_on_top(traced: Traced, shape: Any) -> None:
    """Two levels down or more, a list of 100,000 went through json whole, twice, for
    the 8 KB kept of it (and, in a list that holds itself, was copied 100 levels deep
    first: seconds). As a span attribute and as an event's field, through the SDK."""
    Counted.calls = 0
    value = shape([Counted() for _ in range(100_000)])
    d = traced.dispatcher
    with d.span("work", attributes={"payload": value}):
        d.event(Odd(value=value))
    [span] = traced.spans()
    [event] = span.events
    assert span.attributes is not None and event.attributes is not None
    for sent in (span.attributes["payload"], event.attributes["value"]):
        assert isinstance(sent, str) and 0 < len(sent) <= attributes.MAX_VALUE_CHARS
        text = json.loads(sent)  # the beginning of the value's JSON, cut: a JSON string
        assert isinstance(text, str) and text[0] in "[{" and '"c"' in text
    assert Counted.calls < 30_000  # a few times the items that fit, twice: not 200,000


def test_a_nested_long_value_gives_what_serialising_it_whole_gives() -> None:
    """Looking at less changed nothing of what is sent."""
    for value in ([[list(range(100_000))]], {"a": [{"b": list(range(100_000))}]}):
        whole = _fit_json_serialising_everything(value, attributes.MAX_VALUE_CHARS)
        assert attributes.fit_json(value) == whole


@pytest.mark.timeout(30)
def test_a_field_holding_another_type_is_sent_as_json_where_warnings_are_errors() -> None:
    """A field assigned what its type does not say is sent as it is, in JSON, and
    pydantic warns of nothing: where warnings are errors (``-W error``, pytest's
    ``filterwarnings = error``) its warning made the value the model's str."""
    usage = TokenUsage(prompt_tokens=1)
    usage.prompt_tokens = "one"  # type: ignore[assignment]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert json.loads(attributes.to_json(usage))["prompt_tokens"] == "one"
        assert json.loads(attributes.to_json([usage]))[0]["prompt_tokens"] == "one"


def test_a_container_holding_itself_is_sent_as_its_repr() -> None:
    """One holding itself twice was never sent: its copy without NaN went 100 levels
    deep in each of two ways (2**100 lists)."""
    small = _holding_itself(1)
    twice: list[Any] = []
    twice += [twice, twice]
    # The repr of to_json's copy of the list (its models dumped), which holds the original.
    assert to_attribute(small) == "[1, [1, [...]]]"
    assert to_attribute(twice) == "[[[...], [...]], [[...], [...]]]"


@pytest.mark.parametrize(
    "shape",
    [
        lambda text: {"prompt": text},
        lambda text: [text],
        lambda text: {"prompt": text, **{str(i): i for i in range(5_000)}},
        lambda text: [{"id": 1}, {"messages": [text, text]}],
    ],
    ids=["dict", "list", "dict-long", "nested"],
)
def test_a_long_string_in_a_value_is_not_serialised_whole(
    shape: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 10 MB string in a dict or list was serialised whole on the application's thread,
    then a dozen times more cut (50 to 150 ms per attribute), for the 8 KB kept; one
    alone costs nothing. What is sent is what it was."""
    written: list[int] = []
    dumps = attributes._dumps

    def counted(value: Any) -> str:
        text = dumps(value)
        written.append(len(text))
        return text

    monkeypatch.setattr(attributes, "_dumps", counted)
    value = shape("ab\n" * 3_000_000)
    sent = to_attribute(value)
    assert isinstance(sent, str) and len(sent) <= attributes.MAX_VALUE_CHARS
    json.loads(sent)
    assert max(written) < 20 * attributes.MAX_VALUE_CHARS
    monkeypatch.setattr(attributes, "_least_size", lambda value, budget, depth=0: 0)
    monkeypatch.setattr(attributes, "_items_left_in", lambda value, limit: 0)
    assert to_attribute(value) == sent  # the same as serialising everything


class _Holder(BaseModel):
    items: Any = None


def test_iterators_are_not_read_out(traced: Traced) -> None:
    """pydantic dumps a model's iterator in JSON mode by reading it out: a span
    attribute or an event field holding one took the application's items."""
    numbers = (i for i in range(3))
    letters = iter("abc")
    d = traced.dispatcher
    with d.span("work", attributes={"holder": _Holder(items=numbers)}):
        d.event(Odd(value=_Holder(items=letters)))
    assert list(numbers) == [0, 1, 2] and list(letters) == ["a", "b", "c"]
    [span] = traced.spans()
    assert span.attributes is not None and "generator" in str(span.attributes["holder"])
    assert span.events[0].attributes is not None
    # str_ascii_iterator from 3.11 on, str_iterator before.
    assert type(iter("abc")).__name__ in str(span.events[0].attributes["value"])


class _GrowsItsOwner(BaseModel):
    """Adds to the dict it is in when serialised: another thread changing a dict in the
    moment pydantic reads it, made certain."""

    n: int = 0
    _owner: dict[Any, Any] = PrivateAttr(default_factory=dict)

    @field_serializer("n")
    def _grow(self, n: int) -> int:
        self._owner[len(self._owner)] = "added"
        return n


def test_a_panic_of_pydantic_does_not_reach_the_application(traced: Traced) -> None:
    """pydantic-core panics on a dict changed while it reads it, and its PanicException
    is no Exception: no handler guard caught it, and it was raised in the application,
    out of ``with d.span(...)``. The span is sent, the value as text."""
    grower = _GrowsItsOwner()
    grower._owner["odd"] = grower
    d = traced.dispatcher
    with d.span("work", attributes={"value": _Holder(items=grower._owner)}):
        pass
    [span] = traced.spans()
    assert span.attributes is not None and "value" in span.attributes


def test_fields_excluded_from_dumps_are_not_exported(traced: Traced) -> None:
    """``Field(exclude=True)`` keeps a field out of every dump of the event (a client, a
    key); the span event carried it all the same."""

    class Keyed(BaseEvent):
        question: str = ""
        api_key: str = Field("sk-secret", exclude=True)

    d = traced.dispatcher
    with d.span("work"):
        d.event(Keyed(question="why?"))
    [span] = traced.spans()
    [event] = span.events
    assert event.attributes is not None
    assert event.attributes["question"] == "why?" and "api_key" not in event.attributes
