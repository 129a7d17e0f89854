"""Values an application should not hand over, and does: what is stored and read back
for them, the same on SQLite and on a real PostgreSQL, and never a lost row."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import sqlite3
import warnings
from datetime import datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, computed_field

from instrumentation import BaseEvent, get_dispatcher, instrument_tags, telemetry
from instrumentation._text import MAX_TEXT_CHARS
from instrumentation.storage import SQLiteStore, Store, open_store
from instrumentation.storage import roots_of as storage_roots
from instrumentation.storage.cli import main as cli_main

from .helpers import FakeLLMEndEvent, NoteEvent, Usage

d = get_dispatcher("tests.storage.hostile")


class BrokenStr:
    def __str__(self) -> str:
        raise RuntimeError("no str")

    def __repr__(self) -> str:
        return "BrokenStr()"


class BrokenZone(tzinfo):
    def utcoffset(self, dt: datetime | None) -> timedelta:
        raise RuntimeError("no offset")

    def dst(self, dt: datetime | None) -> timedelta:
        raise RuntimeError("no dst")

    def tzname(self, dt: datetime | None) -> str:
        return "broken"


class Part(BaseModel):
    count: int = 0


def test_a_field_holding_another_type_is_stored_as_it_is_where_warnings_are_errors(
    any_store: Store, make_handler: Any
) -> None:
    """Pydantic validates a field when the model is made, not when it is assigned (nor
    does it check an OpenAI-compatible server's reply of another shape): serialising
    such a value warns. That warning came from the writer thread onto the application's
    stderr, and where warnings are errors (``-W error``, pytest's ``filterwarnings =
    error``) the value was stored as an ``__unserialisable__`` marker."""
    handler = make_handler(any_store).attach(d)
    event = NoteEvent(value=Part())
    event.text = 12  # type: ignore[assignment]
    event.value.count = "twelve"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # what the writer thread sees too
        d.event(event)
        assert handler.flush(10)
    (stored,) = any_store.events()
    assert stored.payload["text"] == 12
    assert stored.payload["value"] == {"count": "twelve"}


def test_non_finite_floats_are_null_and_the_rows_kept(any_store: Store, make_handler: Any) -> None:
    """NaN and the infinities in tags and span attributes, nested too, used to make
    PostgreSQL refuse the span's row (and a root's refusal hid its whole trace); they
    are stored as null on both databases, as pydantic writes them in events."""
    handler = make_handler(any_store).attach(d)

    @d.span(attributes={"temperature": math.nan, "deep": {"x": [1.0, -math.inf]}})
    def root() -> None:
        with instrument_tags({"score": math.inf}):
            child()

    @d.span
    def child() -> None:
        d.event(NoteEvent(text="n", value=math.nan))

    root()
    assert handler.flush(10)
    [summary] = any_store.traces(metadata=None, name=root.__qualname__)
    assert summary.span_count == 2
    spans = any_store.trace(summary.trace_id)
    by_name = {s.name: s for s in spans}
    assert by_name[root.__qualname__].attributes == {
        "temperature": None,
        "deep": {"x": [1.0, None]},
    }
    assert by_name[child.__qualname__].tags == {"score": None}
    [event] = by_name[child.__qualname__].events
    assert event.payload["value"] is None


def test_values_whose_conversion_raises_become_markers(any_store: Store, make_handler: Any) -> None:
    """A metadata tag whose str() raises, a datetime whose time zone raises: the row is
    kept, with markers, where it used to be lost as an unwritable entry."""
    handler = make_handler(any_store).attach(d)
    unwritable_before = telemetry.counter("storage.unwritable_entries").value
    odd_time = datetime(2026, 1, 1, tzinfo=BrokenZone())

    @d.span(attributes={"when": odd_time})
    def request() -> None:
        d.event(NoteEvent(text="t", value={"when": odd_time}))

    with instrument_tags({"user": BrokenStr(), "when": odd_time}):
        request()
    assert handler.flush(10)
    assert telemetry.counter("storage.unwritable_entries").value == unwritable_before
    [summary] = any_store.traces(name=request.__qualname__)
    [span] = any_store.trace(summary.trace_id)
    assert span.metadata["user"] == "BrokenStr()"
    assert span.attributes["when"]["__unserialisable__"] == "datetime"
    assert span.tags["when"]["__unserialisable__"] == "datetime"
    assert len(span.events) == 1


def test_token_counts_and_costs_out_of_range_leave_their_columns_empty(
    any_store: Store, make_handler: Any
) -> None:
    """Two counts just under 2**63 summed past SQLite's integers, two costs of 1e308
    past PostgreSQL's floats: traces() failed, and `list` and `export` with it. Such
    values leave their columns empty (counted); the payload keeps them."""
    handler = make_handler(any_store).attach(d)
    out_of_range = telemetry.counter("storage.out_of_range_columns").value

    @d.span
    def calls() -> None:
        for _ in range(2):
            d.event(FakeLLMEndEvent(model="m", usage=Usage(2**62, 2**62 - 1), cost_usd=1e308))
        d.event(FakeLLMEndEvent(model="m", usage=Usage(3, 4), cost_usd=math.nan))
        d.event(FakeLLMEndEvent(model="m", usage=Usage(10, 5), cost_usd=0.5))

    calls()
    assert handler.flush(10)
    [summary] = any_store.traces(name=calls.__qualname__)
    assert (summary.prompt_tokens, summary.completion_tokens) == (13, 9)
    assert summary.cost_usd == 0.5
    assert telemetry.counter("storage.out_of_range_columns").value == out_of_range + 9
    [span] = any_store.trace(summary.trace_id)
    # The payload keeps it (PostgreSQL's jsonb gives a whole float back as an int).
    assert float(span.events[0].payload["cost_usd"]) == 1e308


def test_an_entry_no_row_can_be_made_of_makes_flush_false(
    any_store: Store, make_handler: Any
) -> None:
    """Counted and logged as before, and now also what flush() answers."""

    class Nameless(BaseEvent):
        @classmethod
        def class_name(cls) -> str:
            raise RuntimeError("no name")

    handler = make_handler(any_store).attach(d)
    d.event(NoteEvent(text="fine"))
    assert handler.flush(10)
    d.event(Nameless())
    assert handler.flush(10) is False
    assert handler.writer.rows_lost == 1
    d.event(NoteEvent(text="fine again"))
    assert handler.flush(10)  # a later flush is about what came after


def test_reading_a_value_nested_deeper_than_the_parser_goes(
    tmp_path: Path, make_handler: Any
) -> None:
    """Written by a process with a higher recursion limit: read back as unreadable,
    where trace() and the command line used to fail."""
    db = tmp_path / "deep.db"
    with SQLiteStore(db) as store:
        handler = make_handler(store).attach(d)
        with d.span("deep"):
            pass
        assert handler.flush(10)
        with sqlite3.connect(db) as raw:
            raw.execute("UPDATE spans SET attributes = ?", ("[" * 100_000 + "]" * 100_000,))
        [summary] = store.traces()
        [span] = store.trace(summary.trace_id)
        assert set(span.attributes) == {"__unreadable__"}


def test_times_outside_what_a_datetime_holds_are_refused(any_store: Store) -> None:
    for bad in (math.nan, math.inf, 1e20, -1e20):
        with pytest.raises(ValueError, match="years 1 to 9999"):
            any_store.traces(since=bad)
    with pytest.raises(ValueError, match="until"):
        any_store.traces(until=math.nan)


def test_a_start_read_back_bounds_since_and_until_exactly(
    any_store: Store, make_handler: Any
) -> None:
    """SQLite keeps times past the microsecond: a trace's start given back as `since`
    left the trace out, and as `until` kept it in (paging by start repeated traces)."""
    handler = make_handler(any_store).attach(d)

    @d.span
    def tick() -> None:
        pass

    for _ in range(60):
        tick()
    assert handler.flush(10)
    summaries = any_store.traces(limit=100, name=tick.__qualname__)
    assert len(summaries) == 60
    for s in summaries:
        since = any_store.traces(limit=100, name=tick.__qualname__, since=s.start)
        until = any_store.traces(limit=100, name=tick.__qualname__, until=s.start)
        assert s.root_span_id in {t.root_span_id for t in since}
        assert s.root_span_id not in {t.root_span_id for t in until}
        ended = any_store.traces(limit=100, name=tick.__qualname__, ended_after=s.end)
        assert s.root_span_id not in {t.root_span_id for t in ended}


def test_a_name_with_a_nul_is_found_on_both_databases(any_store: Store, make_handler: Any) -> None:
    """PostgreSQL stores NUL as U+FFFD; a filter with the NUL raised DataError there."""
    handler = make_handler(any_store).attach(d)
    with d.span("a\x00b"):
        pass
    with instrument_tags({"user": "u\x00v"}), d.span("c"):
        pass
    assert handler.flush(10)
    assert len(any_store.traces(name="a\x00b")) == 1
    assert len(any_store.traces(metadata={"user": "u\x00v"})) == 1
    assert any_store.traces(name="a\x00*")[0].name in ("a\x00b", "a\ufffdb")


def test_a_filter_with_a_lone_surrogate_is_matched_as_stored(
    any_store: Store, make_handler: Any
) -> None:
    """Text decoded with surrogateescape (a file name, a command line argument) holds
    lone surrogates: both databases store U+FFFD for them, and PostgreSQL matched a
    filter that way; SQLite raised UnicodeEncodeError (a name, a trace id prefix)."""
    handler = make_handler(any_store).attach(d)
    with d.span("file \udcff.txt"):
        pass
    assert handler.flush(10)
    (found,) = any_store.traces(name="file \udcff.txt")
    assert found.name == "file \ufffd.txt"
    assert len(any_store.traces(name="file \udcff*")) == 1
    assert any_store.trace_ids_starting_with("\udcff") == []
    assert any_store.events(trace_id="\udcff", type="\udcff") == []


def test_export_of_an_old_database_with_nan_is_strict_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A database written by an earlier release holds NaN: `show --json` and `export`
    print null, which jq and JSON.parse take."""
    from instrumentation.storage import StorageHandler

    db = tmp_path / "old.db"
    handler = StorageHandler(store=SQLiteStore(db), debounce=0.01, close_store=True).attach(d)
    with d.span("old"):
        pass
    handler.detach()
    assert handler.shutdown(10)
    with sqlite3.connect(db) as raw:
        raw.execute("""UPDATE spans SET attributes = '{"x": NaN, "y": [Infinity]}'""")
    for args in (["show", "latest", "--json"], ["export"]):
        assert cli_main(["--db", str(db), *args]) == 0
        text = capsys.readouterr().out
        assert "NaN" not in text and "Infinity" not in text
        record = json.loads(text.splitlines()[0], parse_constant=_refuse)
        [span] = record["spans"]
        assert span["attributes"] == {"x": None, "y": [None]}
    with open_store(db, read_only=True) as reader:
        assert math.isnan(reader.trace(reader.traces()[0].trace_id)[0].attributes["x"])


def test_a_metadata_filter_of_none_is_refused(any_store: Store) -> None:
    """It matched nothing, silently (the columns hold text, NULL when not set)."""
    with pytest.raises(TypeError, match="not None"):
        any_store.traces(metadata={"user": None})  # type: ignore[dict-item]


def _refuse(constant: str) -> Any:
    raise AssertionError(f"not strict JSON: {constant}")


def test_utc_is_what_comes_back(any_store: Store, make_handler: Any) -> None:
    handler = make_handler(any_store).attach(d)
    with d.span("utc"):
        pass
    assert handler.flush(10)
    [summary] = any_store.traces(name="utc")
    assert summary.start.tzinfo is not None and summary.start.utcoffset() == timedelta(0)
    assert summary.start.astimezone(timezone.utc) == summary.start


def test_very_long_names_are_stored_linked_and_found(any_store: Store, make_handler: Any) -> None:
    """Names, ids and event types are index keys, and PostgreSQL refuses an index entry
    past about 2,700 bytes: the row used to go to the spool, be refused at every replay,
    and hold every later row behind it. Long ones are stored shortened the same way
    every time, so the trace is still found by its name and its spans still link."""

    class Shouting(BaseEvent):
        @classmethod
        def class_name(cls) -> str:
            return "Event" + "E" * 5_000

    handler = make_handler(any_store).attach(d)
    long_name = "step " + os.urandom(10_000).hex()  # not compressible
    with d.span(long_name), d.span("inner"):
        d.event(Shouting())
    assert handler.flush(10)
    [summary] = any_store.traces(name=long_name)
    assert summary.span_count == 2 and len(summary.name or "") <= 512
    spans = any_store.trace(summary.trace_id)
    [root] = storage_roots(spans)
    [inner] = root.children
    [event] = inner.events
    assert len(event.type) <= 512 and any_store.events(type=Shouting.class_name())
    with d.span("after"):
        pass
    assert handler.flush(10) and any_store.traces(name="after")  # nothing held behind


def test_a_server_limit_a_row_passes_is_about_the_row(postgres_dsn: str) -> None:
    """SQLSTATE class 54 (an index entry too large, say) rejects the row, counted and
    logged, instead of keeping it in the spool to be refused at every replay."""
    import psycopg.errors

    from instrumentation.storage.postgres import PostgresStore

    with PostgresStore(postgres_dsn) as store:
        assert store.is_data_error(psycopg.errors.ProgramLimitExceeded("index row too big"))
        assert not store.is_data_error(psycopg.errors.UndefinedTable("no such table"))


def test_nan_inside_a_model_or_a_set_is_null_and_the_model_kept(
    any_store: Store, make_handler: Any
) -> None:
    class Score(BaseModel):
        value: float
        label: str

    handler = make_handler(any_store).attach(d)

    @d.span(attributes={"score": Score(value=math.nan, label="x"), "seen": {math.inf}})
    def scored() -> None:
        pass

    scored()
    assert handler.flush(10)
    [summary] = any_store.traces(name=scored.__qualname__)
    [span] = any_store.trace(summary.trace_id)
    assert span.attributes == {"score": {"value": None, "label": "x"}, "seen": [None]}


def test_a_very_long_metadata_value_is_stored_short_and_found(
    any_store: Store, make_handler: Any
) -> None:
    """A megabyte user tag was stored whole in its column (the payload's copy was cut)."""
    handler = make_handler(any_store).attach(d)
    long_user = "u" * 1_000_000
    with instrument_tags({"user": long_user}), d.span("tagged"):
        pass
    assert handler.flush(10)
    [summary] = any_store.traces(metadata={"user": long_user})
    assert summary.name == "tagged" and len(summary.metadata["user"]) <= 512


class _GrowsItsDict:
    """Adds to the dict it is in when printed: another thread changing a dict in the
    moment the writer reads it, made certain."""

    def __init__(self, owner: dict[Any, Any]) -> None:
        self.owner = owner

    def __repr__(self) -> str:
        self.owner[len(self.owner)] = "added"
        return "_GrowsItsDict()"


def test_a_dict_changed_while_it_is_written_costs_only_its_event(
    any_store: Store, make_handler: Any
) -> None:
    """pydantic-core panics on a dict that changes while it reads it, and its
    PanicException is no Exception: it stopped the writer thread for good (every
    later row dropped). The event is stored, with a marker, and the writer goes on."""
    handler = make_handler(any_store).attach(d)
    shared: dict[Any, Any] = {}
    shared["odd"] = _GrowsItsDict(shared)
    with d.span("changing"):
        d.event(NoteEvent(text="changing", value=shared))
    assert handler.flush(10)
    with d.span("after"):
        d.event(NoteEvent(text="after"))
    assert handler.flush(10)
    assert handler.writer.rows_lost == 0 and handler.dropped == 0
    [summary] = any_store.traces(name="changing")
    [span] = any_store.trace(summary.trace_id)
    [event] = span.events
    assert event.payload["text"] == "changing"
    assert any_store.trace(any_store.traces(name="after")[0].trace_id)[0].events


def test_iterators_in_events_and_attributes_are_not_read_out(
    any_store: Store, make_handler: Any, tmp_path: Path
) -> None:
    """pydantic writes an iterator as JSON by reading it out: the writer thread took a
    generator's items from the application, and read an open file to its end. Each is
    stored as a marker, and left as it was."""

    class Holder(BaseModel):
        items: Any = None

    handler = make_handler(any_store).attach(d)
    notes = tmp_path / "notes.txt"
    notes.write_text("first line\nsecond line\n")
    numbers = (i for i in range(3))
    letters = iter("abc")
    with notes.open() as file, d.span("streams", attributes={"holder": Holder(items=letters)}):
        d.event(NoteEvent(text="gen", value=numbers))
        d.event(NoteEvent(text="file", value={"file": file}))
        assert handler.flush(10)
        assert file.tell() == 0
    assert handler.flush(10)
    assert list(numbers) == [0, 1, 2] and list(letters) == ["a", "b", "c"]
    [summary] = any_store.traces(name="streams")
    [span] = any_store.trace(summary.trace_id)
    assert "__unserialisable__" in span.attributes["holder"]["items"]
    values = {e.payload["text"]: e.payload["value"] for e in span.events}
    assert "generator" in values["gen"]["repr"]
    assert "notes.txt" in values["file"]["file"]["repr"]


def test_a_computed_field_that_raises_costs_only_itself(
    any_store: Store, make_handler: Any
) -> None:
    """pydantic cannot dump such an event at all: its payload was one marker whose
    repr failed too. Its fields are kept (and the excluded one left out)."""

    class Scored(BaseEvent):
        question: str = ""
        secret: str = Field("hidden", exclude=True)

        @computed_field  # type: ignore[prop-decorator]
        @property
        def score(self) -> float:
            raise RuntimeError("no score yet")

    handler = make_handler(any_store).attach(d)
    with d.span("scored"):
        d.event(Scored(question="why?"))
    assert handler.flush(10)
    [summary] = any_store.traces(name="scored")
    [event] = any_store.trace(summary.trace_id)[0].events
    assert event.payload == {"tags": {}, "question": "why?"}


def test_an_integer_longer_than_python_prints_is_read_back(
    any_store: Store, make_handler: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """pydantic writes an int of any length; reading back one of more than 4,300 digits
    failed (Python's limit), and the whole payload came back as `__unreadable__`."""
    handler = make_handler(any_store).attach(d)
    huge = 10**5000
    with d.span("huge"):
        d.event(NoteEvent(text="kept", value=[huge, 7]))
    assert handler.flush(10)
    [summary] = any_store.traces(name="huge")
    [event] = any_store.trace(summary.trace_id)[0].events
    assert event.payload["text"] == "kept"
    if "fallback" in inspect.signature(BaseModel.model_dump_json).parameters:
        assert event.payload["value"] == ["1" + "0" * 5000, 7]
    else:  # pydantic before 2.11: json.dumps refuses it, and the fallback says its size
        assert event.payload["value"] == [f"<int of {huge.bit_length()} bits>", 7]
    if isinstance(any_store, SQLiteStore):
        assert cli_main(["--db", str(any_store.path), "export"]) == 0
        [line] = capsys.readouterr().out.splitlines()
        [span] = json.loads(line)["spans"]
        assert span["events"][0]["payload"]["text"] == "kept"


def test_an_integer_longer_than_python_prints_in_attributes_and_tags_says_its_size(
    any_store: Store, make_handler: Any
) -> None:
    """``json.dumps`` refuses an int of more than 4,300 digits: the span's attribute or
    tag became a marker saying its ``repr`` failed, and a dict holding one was such a
    marker whole, its other fields lost."""
    handler = make_handler(any_store).attach(d)
    huge = 10**5000

    @d.span(attributes={"n": huge, "nested": {"n": [huge, 7], "kept": "yes"}})
    def counted() -> None:
        pass

    with instrument_tags({"n": huge, "user": "ann"}):
        counted()
    assert handler.flush(10)
    [summary] = any_store.traces(name=counted.__qualname__)
    [span] = any_store.trace(summary.trace_id)
    assert span.attributes == {
        "n": "<int of 16610 bits>",
        "nested": {"n": ["<int of 16610 bits>", 7], "kept": "yes"},
    }
    assert span.tags == {"n": "<int of 16610 bits>", "user": "ann"}


def test_a_huge_error_message_is_stored_cut(any_store: Store, make_handler: Any) -> None:
    """The span's error was ``str()`` of the exception whole: megabytes in one row,
    written again on every retry and sent to the terminal by ``show``."""
    handler = make_handler(any_store).attach(d)

    @d.span
    def fails() -> None:
        raise ValueError("x" * 1_000_000)

    with pytest.raises(ValueError):
        fails()
    assert handler.flush(10)
    [summary] = any_store.traces(name=fails.__qualname__)
    [span] = any_store.trace(summary.trace_id)
    assert span.error == "ValueError: " + "x" * (MAX_TEXT_CHARS - 3) + "..."


class _Watched:
    """An iterator that says whether anything took an item from it."""

    def __init__(self) -> None:
        self.taken = 0

    def __iter__(self) -> _Watched:
        return self

    def __next__(self) -> int:
        self.taken += 1
        if self.taken > 3:
            raise StopIteration
        return self.taken

    def __repr__(self) -> str:
        return "_Watched()"


class _Box(BaseModel):
    inside: Any = None


@dataclasses.dataclass
class _Pair:
    left: Any
    right: Any = None


_odd_values = st.recursive(
    st.none()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=8)
    | st.datetimes()
    | st.builds(_Watched),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.frozensets(st.integers(), max_size=3)
        | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=4)
        | st.builds(_Box, inside=inner)
        | st.builds(_Pair, inner, inner)
    ),
    max_leaves=30,
)


def _watched_in(value: Any) -> list[_Watched]:
    if isinstance(value, _Watched):
        return [value]
    if isinstance(value, _Box):
        return _watched_in(value.inside)
    if isinstance(value, _Pair):
        return _watched_in(value.left) + _watched_in(value.right)
    if isinstance(value, dict):
        return [w for v in value.values() for w in _watched_in(v)]
    if isinstance(value, (list, tuple)):
        return [w for v in value for w in _watched_in(v)]
    return []


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_odd_values)
def test_serialising_neither_reads_nor_changes_what_it_is_given(value: Any) -> None:
    """Whatever an event, a span attribute or a tag holds, the storage's rows and the
    OpenTelemetry attributes are made without taking an item from an iterator in it or
    changing it, and what is stored is strict JSON."""
    from instrumentation.otel.attributes import event_attributes, to_attribute
    from instrumentation.storage.serialise import event_payload, to_json

    before = repr(value)
    event = NoteEvent(text="odd", value=value)
    for text in (
        event_payload(event, 2_000),
        to_json({"a": value, "b": _Box(inside=value)}, 2_000),
    ):
        json.loads(text, parse_constant=_refuse)
    to_attribute(value)
    to_attribute(_Box(inside=value))
    event_attributes(event)
    assert [w.taken for w in _watched_in(value)] == [0] * len(_watched_in(value))
    assert repr(value) == before


class _Reply(BaseModel):
    text: str = ""


class _ReplyWithParts(_Reply):
    parts: Any = None


class _Polymorphic(BaseModel):
    model_config = ConfigDict(polymorphic_serialization=True)

    text: str = ""


class _PolymorphicWithParts(_Polymorphic):
    parts: Any = None


class _ReplyEvent(BaseEvent):
    reply: SerializeAsAny[_Reply] | None = None
    polymorphic: _Polymorphic | None = None


class _StreamingEvent(BaseEvent):
    """Its computed field hands out the iterator it keeps (a live stream)."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def parts(self) -> Any:
        return self.__dict__.get("_parts")


def _streaming(parts: Any) -> _StreamingEvent:
    event = _StreamingEvent()
    event.__dict__["_parts"] = parts
    return event


def _assigned(parts: Any) -> NoteEvent:
    event = NoteEvent()
    event.text = parts  # pydantic validates a field when the model is made, not after
    return event


@pytest.mark.parametrize(
    "make",
    [
        lambda it: _ReplyEvent(reply=_ReplyWithParts(text="r", parts=it)),
        lambda it: _ReplyEvent(polymorphic=_PolymorphicWithParts(text="p", parts=it)),
        _streaming,
        _assigned,
        lambda it: NoteEvent.model_construct(text=it),
    ],
    ids=["SerializeAsAny", "polymorphic_serialization", "computed_field", "assigned", "construct"],
)
def test_an_iterator_where_the_declared_types_say_there_is_none_is_not_read_out(
    make: Any,
) -> None:
    """Fields declared closed (text, a model of text only) were skipped by the look for
    iterators, and computed fields never looked at: pydantic writes what such a field
    holds past validation, a subclass's own fields (``SerializeAsAny``,
    ``polymorphic_serialization``) and what a computed field returns, and read out the
    iterator there."""
    from instrumentation.otel.attributes import event_attributes
    from instrumentation.storage.serialise import event_payload

    watched = _Watched()
    event = make(watched)
    payload = json.loads(event_payload(event, 2_000), parse_constant=_refuse)
    event_attributes(event)
    assert watched.taken == 0
    # An older pydantic knows no polymorphic_serialization: it writes the declared
    # fields only, and the iterator is in none of them.
    subclass_fields_written = "polymorphic_serialization" in ConfigDict.__annotations__
    if subclass_fields_written or payload.get("polymorphic") is None:
        assert "_Watched()" in json.dumps(payload)
