"""Writing traces and reading them back, the same on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from instrumentation import get_dispatcher
from instrumentation.storage import SchemaVersionError, SQLiteStore, Store, metadata, roots_of
from instrumentation.storage.schema import SCHEMA_VERSION

from .helpers import FakeLLMEndEvent, NoteEvent, Usage, count

d = get_dispatcher("tests.storage.app")
d_db = get_dispatcher("tests.storage.app.db")


@d.span
def answer(question: str) -> str:
    docs = retrieve(question)
    return generate(question, docs)


@d_db.span
def retrieve(question: str) -> list[str]:
    d_db.event(NoteEvent(text="searched"))
    return ["a", "b"]


@d.span
def generate(question: str, docs: list[str]) -> str:
    d.event(
        FakeLLMEndEvent(
            model="m-1", provider="offline", usage=Usage(10, 5), cost_usd=0.002, latency_ms=12.5
        )
    )
    return "42"


@d.span
def broken() -> None:
    time.sleep(0.06)
    raise ValueError("no answer")


def _record(store: Store, make_handler: Any, **options: Any) -> Any:
    handler = make_handler(store, **options).attach(d)
    answer("why?")
    with pytest.raises(ValueError):
        broken()
    assert handler.flush(10)
    return handler


def test_traces_summarise_roots_with_counts_tokens_and_cost(
    any_store: Store, make_handler: Any
) -> None:
    """Each root span is a trace summary with span count, errors, tokens and cost."""
    _record(any_store, make_handler)
    found = any_store.traces(limit=10)
    assert [s.name for s in found] == ["broken", "answer"]  # newest first
    broken_s, answer_s = found
    assert answer_s.span_count == 3 and answer_s.error_count == 0 and answer_s.status == "ok"
    assert (answer_s.prompt_tokens, answer_s.completion_tokens, answer_s.total_tokens) == (
        10,
        5,
        15,
    )
    assert answer_s.cost_usd == pytest.approx(0.002)
    assert answer_s.dispatcher == "tests.storage.app"
    assert broken_s.status == "error" and broken_s.error == "ValueError: no answer"
    assert broken_s.duration >= 0.03 and broken_s.total_tokens == 0 and broken_s.cost_usd is None
    assert answer_s.start.tzinfo is not None and answer_s.end is not None
    assert answer_s.end >= answer_s.start


def test_trace_returns_a_walkable_tree_with_events(any_store: Store, make_handler: Any) -> None:
    """store.trace() gives every span with parent ids, children and its own events."""
    _record(any_store, make_handler)
    summary = any_store.traces(name="answer")[0]
    spans = any_store.trace(summary.trace_id)
    assert [s.name for s in spans] == ["answer", "retrieve", "generate"]
    (root,) = roots_of(spans)
    assert root.id_ == summary.root_span_id and root.parent_id is None
    assert [c.name for c in root.children] == ["retrieve", "generate"]
    assert [(depth, s.name) for depth, s in root.walk()] == [
        (0, "answer"),
        (1, "retrieve"),
        (1, "generate"),
    ]
    generate_span = root.children[1]
    (llm,) = generate_span.events
    assert llm.type == "FakeLLMEndEvent" and llm.model == "m-1" and llm.provider == "offline"
    assert (llm.prompt_tokens, llm.completion_tokens, llm.total_tokens) == (10, 5, 15)
    assert llm.latency_ms == 12.5 and llm.span_id == generate_span.id_
    assert llm.payload["model"] == "m-1"
    assert root.children[0].events[0].payload["text"] == "searched"
    assert root.children[0].dispatcher == "tests.storage.app.db"
    assert any_store.trace("0" * 32) == []


def test_events_dated_before_1970_or_after_3000_read_back(
    any_store: Store, make_handler: Any
) -> None:
    """Times are read back by adding to the epoch, not by datetime.fromtimestamp, which
    on Windows fails outside 1970-3000: one such event failed events(), trace() and
    the CLI there. Both give the same microsecond wherever both work."""
    from instrumentation.storage.models import to_datetime

    handler = make_handler(any_store)
    dispatcher = get_dispatcher("tests.storage.app.years")
    dispatcher.add_event_handler(handler)
    stamps = [
        datetime(1900, 1, 1, 0, 0, 0, 250_000, tzinfo=timezone.utc),
        datetime(3500, 6, 30, 12, 0, 0, 500_000, tzinfo=timezone.utc),
    ]
    for stamp in stamps:
        dispatcher.event(NoteEvent(text=f"year {stamp.year}", timestamp=stamp))
    handler.flush()
    stored = [e for e in any_store.events() if e.type == "NoteEvent"]
    assert sorted(e.time for e in stored if e.payload["text"].startswith("year")) == stamps
    for epoch in (0.0, -1.5e9, 1_700_000_000.0000005, 1e10, 2.5e11, -6.2e10, 1.25e9 + 1e-7):
        assert to_datetime(epoch) == datetime.fromtimestamp(epoch, timezone.utc), epoch


def test_filters(any_store: Store, make_handler: Any) -> None:
    """traces() filters by name, status, duration, dispatcher (with children) and time."""
    _record(any_store, make_handler)
    assert [s.name for s in any_store.traces(status="error")] == ["broken"]
    assert [s.name for s in any_store.traces(status="ok")] == ["answer"]
    # Between the two traces' durations, as measured: a loaded machine once took
    # longer than a fixed 25 ms for "answer".
    took = {s.name: s.duration for s in any_store.traces()}
    assert took["broken"] > took["answer"]
    between = (took["broken"] + took["answer"]) / 2
    assert [s.name for s in any_store.traces(min_duration=between)] == ["broken"]
    assert [s.name for s in any_store.traces(name="ans*")] == ["answer"]
    assert len(any_store.traces(dispatcher="tests.storage")) == 2
    assert any_store.traces(dispatcher="tests.storage.app.db") == []
    now = datetime.now(timezone.utc)
    assert len(any_store.traces(since=now - timedelta(minutes=1))) == 2
    assert any_store.traces(since=now + timedelta(seconds=5)) == []
    assert len(any_store.traces(until=now + timedelta(seconds=5), limit=1)) == 1
    with pytest.raises(ValueError, match="'ok' or 'error'"):
        any_store.traces(status="failed")
    with pytest.raises(ValueError, match="unknown metadata key"):
        any_store.traces(metadata={"colour": "red"})
    with pytest.raises(ValueError, match="timezone-aware"):
        any_store.traces(since=datetime(2020, 1, 1))


def test_metadata_from_handler_dispatcher_and_request(any_store: Store, make_handler: Any) -> None:
    """Handler metadata, per-dispatcher metadata and per-request metadata fill the columns."""
    handler = make_handler(
        any_store,
        metadata={"application": "rag", "environment": "test"},
        dispatcher_metadata={"tests.storage.app.db": {"environment": "db-env"}},
    ).attach(d)
    with metadata(user="alice", session="s-1", run_id="r1"):
        answer("q")
    answer("anonymous")
    assert handler.flush(10)
    alice = any_store.traces(metadata={"user": "alice"})
    assert len(alice) == 1
    assert alice[0].metadata == {
        "application": "rag",
        "environment": "test",
        "user": "alice",
        "session": "s-1",
        "run_id": "r1",
    }
    spans = any_store.trace(alice[0].trace_id)
    retrieve_span = next(s for s in spans if s.name == "retrieve")
    assert retrieve_span.metadata["environment"] == "db-env"
    assert retrieve_span.events[0].metadata["environment"] == "db-env"
    assert retrieve_span.events[0].metadata["user"] == "alice"
    assert len(any_store.traces(metadata={"application": "rag"})) == 2
    with pytest.raises(ValueError, match="unknown metadata key"), metadata(colour="red"):
        pass


def test_writes_are_idempotent(any_store: Store) -> None:
    """Writing the same span and event rows again (a replay) stores each once, as it was."""
    from instrumentation.storage.serialise import RowMaker

    maker = RowMaker({}, {}, 10_000)
    trace_id = "e" * 32
    root = (1.7e9, 0.0, None, True, "root", trace_id, "app", None, None, None)
    child = (1.7e9 + 0.1, 0.1, "root-1", False, "child", trace_id, "app", None, None, None)
    spans = [
        maker.span_row((root, "root-1", 0.5, None)),
        maker.span_row((child, "child-1", 0.3, "ValueError: no")),
    ]
    events = [
        maker.event_row(NoteEvent(text=text, span_id="child-1", trace_id=trace_id), None)
        for text in ("one", "two")
    ]

    def stored() -> tuple[list[tuple[str, str | None, str]], list[tuple[str, str, str]]]:
        span_view = [(s.id_, s.parent_id, s.status) for s in any_store.trace(trace_id)]
        event_view = sorted(
            (e.id_, e.span_id or "", e.payload["text"]) for e in any_store.events(trace_id=trace_id)
        )
        return span_view, event_view

    any_store.write(spans, events)
    first = stored()
    assert first == (
        [("root-1", None, "ok"), ("child-1", "root-1", "error")],
        sorted([(events[0][0], "child-1", "one"), (events[1][0], "child-1", "two")]),
    )
    any_store.write(spans, events)  # the same batch again
    any_store.write(spans[1:], events[:1])  # and a part of it
    assert (count(any_store, "spans"), count(any_store, "events")) == (2, 2)
    assert stored() == first
    (summary,) = any_store.traces()
    assert (summary.span_count, summary.error_count) == (2, 1)


def test_newer_schema_is_refused(tmp_path: Any) -> None:
    """A database written by a newer release is a clear error, and is left untouched."""
    path = tmp_path / "new.db"
    store = SQLiteStore(path)
    store._query("INSERT INTO schema_version (version) VALUES (?)", [SCHEMA_VERSION + 1])
    store.close()
    with pytest.raises(SchemaVersionError, match="newer than the version"):
        SQLiteStore(path)
    import sqlite3

    with sqlite3.connect(path) as conn:
        found = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
    assert found == SCHEMA_VERSION + 1


def test_newer_schema_is_refused_on_postgres(postgres_dsn: str) -> None:
    """PostgreSQL refuses a newer schema the same way."""
    import psycopg

    from instrumentation.storage.postgres import PostgresStore

    PostgresStore(postgres_dsn).close()
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(SchemaVersionError, match="upgrade instrumentation"):
        PostgresStore(postgres_dsn)


def test_reopening_migrates_nothing_twice(tmp_path: Any) -> None:
    """Opening an existing database keeps its rows and its single version row."""
    store = SQLiteStore(tmp_path / "a.db")
    store.close()
    store = SQLiteStore(tmp_path / "a.db")
    found = store._query("SELECT version FROM schema_version ORDER BY version", [])
    assert found == [(version,) for version in range(1, SCHEMA_VERSION + 1)]


d_under = get_dispatcher("tests.storage.my_app")
d_lookalike = get_dispatcher("tests.storage.myXapp.sub")


@d_under.span
def get_user() -> None:
    return None


@d_lookalike.span
def getXuser_list() -> None:
    return None


def test_filters_take_underscores_and_percents_literally(
    any_store: Store, make_handler: Any
) -> None:
    """In a name or dispatcher filter, ``_`` and ``%`` are characters, not SQL wildcards."""
    handler = make_handler(any_store).attach(d_under).attach(d_lookalike)
    get_user()
    getXuser_list()
    assert handler.flush(10)
    assert [t.name for t in any_store.traces(name="get_user*")] == ["get_user"]
    assert [t.name for t in any_store.traces(name="get_use%")] == []
    assert [t.dispatcher for t in any_store.traces(dispatcher="tests.storage.my_app")] == [
        "tests.storage.my_app"
    ]
    (trace,) = any_store.traces(name="get_user")
    assert any_store.resolve_trace_id("_" * 8) is None
    assert any_store.resolve_trace_id(trace.trace_id[:12]) == trace.trace_id


def test_bad_arguments_say_what_to_do(tmp_path: Any) -> None:
    with pytest.raises(TypeError, match="file path"):
        SQLiteStore(42)  # type: ignore[arg-type]
    store = SQLiteStore(tmp_path / "x.db")
    with pytest.raises(ValueError, match="positive int"):
        store.traces(limit=0)
    with pytest.raises(TypeError, match="32 hex"):
        store.trace(5)  # type: ignore[arg-type]
    for bad in (0, -1, "x", True):
        with pytest.raises(ValueError, match="positive int"):
            store.events(limit=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="trace_id is a str"):
        store.events(trace_id=5)  # type: ignore[arg-type]


def test_bad_reader_arguments_are_type_and_value_errors_that_say_what_to_do(
    tmp_path: Any,
) -> None:
    """They were AttributeErrors, a "not subscriptable", a raw int() error, a string
    "no" taken as True, and NaN taken as a duration."""
    from instrumentation import storage

    store = SQLiteStore(tmp_path / "x.db")
    with pytest.raises(TypeError, match=r"metadata is a mapping .*\{'user': 'alice'\}"):
        store.traces(metadata=[1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"store\.trace\(trace_id\).*got a list of int"):
        storage.format_trace([1])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"format_traces\(\) takes a store.*got NoneType"):
        storage.format_traces(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"is_postgres_dsn\(\) takes an address"):
        storage.is_postgres_dsn(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit is a positive int"):
        store.trace_ids_starting_with("ab", limit="x")  # type: ignore[arg-type]
    for flag in ("no", 1, None):
        with pytest.raises(TypeError, match="read_only is True or False"):
            SQLiteStore(tmp_path / "x.db", read_only=flag)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="read_only is True or False"):
            storage.open_store(tmp_path / "x.db", read_only=flag)  # type: ignore[arg-type]
    for duration in (float("nan"), float("inf"), -1):
        with pytest.raises(ValueError, match="min_duration is seconds, 0 or more"):
            store.traces(min_duration=duration)
    with pytest.raises(TypeError, match="min_duration is seconds"):
        store.traces(min_duration="1")  # type: ignore[arg-type]
    assert store.traces(min_duration=0) == [] and storage.format_trace([]) == ""
    store.close()


def test_a_trace_continued_elsewhere_is_listed_once(tmp_path: Any, make_handler: Any) -> None:
    """A span whose parent is remote is a root here; once the parent is stored, one trace."""
    import contextvars

    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(store).attach(d)
    carried: dict[str, Any] = {}

    def worker() -> None:  # stands for another process: a fresh context
        d.restore_propagation_context(carried)
        retrieve("remote")

    with d.span("front"):
        carried.update(d.capture_propagation_context())
        assert handler.flush(10)
        contextvars.Context().run(worker)
        assert handler.flush(10)
        (alone,) = store.traces()
        assert alone.name == "retrieve"  # the parent has not ended yet: the part is listed
    assert handler.flush(10)
    (whole,) = store.traces()
    assert whole.name == "front" and whole.span_count == 2
    (root,) = roots_of(store.trace(whole.trace_id))
    assert [c.name for c in root.children] == ["retrieve"]


def test_a_span_whose_parent_the_store_never_gets_is_listed(
    any_store: Store, make_handler: Any
) -> None:
    """Recording one dispatcher below traced code (its parent span is another
    dispatcher's, seen by some other handler), or attaching inside an open span: the
    stored span heads a trace of its own in traces(), whatever else is attached."""
    from instrumentation.span_handlers import SimpleSpanHandler

    elsewhere = SimpleSpanHandler()
    d.add_span_handler(elsewhere)  # makes answer() a real span, one the store never sees
    try:
        handler = make_handler(any_store).attach(d_db)
        answer("partial?")
        with d.span("open before"):
            late = make_handler(any_store).attach(d)
            retrieve("late")
            assert late.flush(10)
            late.detach()
    finally:
        d.remove_span_handler(elsewhere)
    assert handler.flush(10)
    listed = any_store.traces()
    assert sorted(t.name for t in listed) == ["retrieve", "retrieve"]
    by_trace = {t.trace_id: t for t in listed}
    assert len(by_trace) == 2
    for summary in listed:
        (root,) = roots_of(any_store.trace(summary.trace_id))
        assert root.name == "retrieve" and root.parent_id is not None


def test_events_returns_at_most_limit_and_none_means_all(
    any_store: Store, make_handler: Any
) -> None:
    """events() stops at its limit (1000 unless told), oldest first; limit=None is all."""
    handler = make_handler(any_store, batch_size=2000).attach(d)
    with d.span("many"):
        for i in range(1500):
            d.event(NoteEvent(text=str(i)))
    assert handler.flush(30)
    assert len(any_store.events()) == 1000
    every = any_store.events(limit=None)
    assert sorted(int(e.payload["text"]) for e in every) == list(range(1500))
    assert len(any_store.events(type="NoteEvent", limit=None)) == 1500
    assert len(any_store.events(limit=10)) == 10
    (span,) = any_store.trace(any_store.traces()[0].trace_id)
    assert len(span.events) == 1500
    with pytest.raises(ValueError, match="or None for every event"):
        any_store.events(limit=0)


d_other = get_dispatcher("tests.storage.elsewhere")


@d_other.span
def other_library_call() -> None:
    d_other.event(NoteEvent(text="from elsewhere"))


@d_db.span
def db_call_with_a_library_inside() -> None:
    d.event(NoteEvent(text="app event in a db span"))
    other_library_call()


def test_dispatcher_metadata_covers_everything_inside_its_spans(
    any_store: Store, make_handler: Any
) -> None:
    """A configured dispatcher's metadata reaches the spans and events of other
    dispatchers nested in its spans; on a clash the inner dispatcher's value wins,
    and "root" is the fallback for every dispatcher."""
    handler = make_handler(
        any_store,
        metadata={"environment": "handler"},
        dispatcher_metadata={
            "root": {"application": "everyone", "step_id": "root-step"},
            "tests.storage.app.db": {"application": "db", "run_id": "db-run"},
            "tests.storage.elsewhere": {"run_id": "lib-run"},
        },
    ).attach()
    with metadata(user="carol"):
        db_call_with_a_library_inside()
    other_library_call()  # not inside a db span
    assert handler.flush(10)
    nested = next(t for t in any_store.traces() if t.name == "db_call_with_a_library_inside")
    spans = {s.name: s for s in any_store.trace(nested.trace_id)}
    common = {"environment": "handler", "user": "carol", "step_id": "root-step"}
    db_meta = {**common, "application": "db", "run_id": "db-run"}
    assert spans["db_call_with_a_library_inside"].metadata == db_meta
    assert [e.metadata for e in spans["db_call_with_a_library_inside"].events] == [db_meta]
    inner = {**common, "application": "db", "run_id": "lib-run"}  # inner wins run_id
    assert spans["other_library_call"].metadata == inner
    assert [e.metadata for e in spans["other_library_call"].events] == [inner]
    alone = next(t for t in any_store.traces() if t.name == "other_library_call")
    (alone_span,) = any_store.trace(alone.trace_id)
    assert alone_span.metadata == {
        "environment": "handler",
        "application": "everyone",
        "run_id": "lib-run",
        "step_id": "root-step",
    }


def test_dispatcher_metadata_of_a_parent_dispatcher_applies_below_it(
    tmp_path: Any, make_handler: Any
) -> None:
    """A dispatcher's metadata merges over its ancestors' (by name), key by key."""
    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(
        store,
        dispatcher_metadata={
            "tests.storage.app": {"application": "app", "environment": "app-env"},
            "tests.storage.app.db": {"environment": "db-env"},
        },
    ).attach(d)
    retrieve("q")
    assert handler.flush(10)
    (span,) = store.trace(store.traces()[0].trace_id)
    assert span.metadata == {"application": "app", "environment": "db-env"}


def test_column_names_are_taken_as_metadata_keys(any_store: Store, make_handler: Any) -> None:
    """user_id and session_id (the columns) work as the keys user and session."""
    handler = make_handler(
        any_store,
        metadata={"session_id": "s-9"},
        dispatcher_metadata={"tests.storage.app": {"user_id": "dispatcher-user"}},
    ).attach(d)
    answer("anonymous")
    with metadata(user_id="dave", session="s-10"):
        answer("q")
    assert handler.flush(10)
    dave = any_store.traces(metadata={"user": "dave"})
    assert [t.metadata for t in dave] == [{"user": "dave", "session": "s-10"}]
    assert any_store.traces(metadata={"user_id": "dave"}) == dave
    (anonymous,) = any_store.traces(metadata={"user": "dispatcher-user"})
    assert anonymous.metadata == {"user": "dispatcher-user", "session": "s-9"}
    with pytest.raises(ValueError, match="'user' twice"), metadata(user="a", user_id="b"):
        pass
    with metadata(user="same", user_id="same"):
        pass
    with pytest.raises(ValueError, match="user_id for user"):
        make_handler(any_store, metadata={"userid": "x"})


d_unseen = get_dispatcher("tests.storage.unseen")


@d_unseen.span
def library_wrapper() -> None:
    """A span of a dispatcher the handler is not attached to (another handler sees it)."""
    generate("q", [])


def test_dispatcher_metadata_reaches_through_a_span_the_handler_does_not_see(
    tmp_path: Any, make_handler: Any
) -> None:
    """A span of a dispatcher this handler does not see (only another handler does)
    between a configured span and the handler's own spans hides nothing."""
    from instrumentation.span_handlers import SimpleSpanHandler

    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(
        store, dispatcher_metadata={"tests.storage.app.db": {"application": "db"}}
    ).attach(d)
    d_unseen.add_span_handler(SimpleSpanHandler())

    @d_db.span
    def cached() -> None:
        library_wrapper()

    cached()
    assert handler.flush(10)
    spans = {s.name: s for s in store.trace(store.traces()[0].trace_id)}
    assert "library_wrapper" not in spans
    assert spans["generate"].metadata == {"application": "db"}
    assert [e.metadata for e in spans["generate"].events] == [{"application": "db"}]


def test_dispatcher_metadata_reaches_a_span_started_after_its_parent_ended(
    tmp_path: Any, make_handler: Any
) -> None:
    """An asyncio task started in a configured span runs on after it ended: its spans
    and events still get the configured metadata."""
    import asyncio

    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(
        store, dispatcher_metadata={"tests.storage.app.db": {"application": "db"}}
    ).attach(d)

    async def later() -> None:
        await asyncio.sleep(0.01)
        generate("late", [])

    async def main() -> None:
        with d_db.span("cache"):
            task = asyncio.create_task(later())
        await task

    asyncio.run(main())
    assert handler.flush(10)
    spans = {s.name: s for s in store.trace(store.traces()[0].trace_id)}
    assert spans["generate"].parent_id == spans["cache"].id_
    assert spans["generate"].metadata == {"application": "db"}
    assert [e.metadata for e in spans["generate"].events] == [{"application": "db"}]


d_unseen_outer = get_dispatcher("tests.storage.unseen_outer")


@d_unseen_outer.span
def library_entry() -> None:
    """An unseen span around another one: ``library_wrapper`` runs inside it."""
    d.event(NoteEvent(text="in unseen spans"))
    library_wrapper()


@d_db.span
def cached_library_call() -> None:
    library_entry()


@pytest.mark.parametrize("also_attached_to_outer", [False, True])
def test_dispatcher_metadata_reaches_through_unseen_spans_in_a_row(
    tmp_path: Any, make_handler: Any, also_attached_to_outer: bool
) -> None:
    """Two spans in a row of dispatchers the handler is not attached to (only another
    handler sees them) hide nothing either: the spans and events inside them get the
    configured metadata."""
    from instrumentation.span_handlers import SimpleSpanHandler

    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(
        store, dispatcher_metadata={"tests.storage.app.db": {"application": "db"}}
    ).attach(d)
    if also_attached_to_outer:  # library_entry is seen, library_wrapper is not
        handler.attach(d_unseen_outer)
    others = [(d_unseen, SimpleSpanHandler()), (d_unseen_outer, SimpleSpanHandler())]
    for dispatcher, other in others:
        dispatcher.add_span_handler(other)
    try:
        cached_library_call()
        library_entry()  # not inside a db span: nothing configured applies
    finally:
        for dispatcher, other in others:
            dispatcher.remove_span_handler(other)
    assert handler.flush(10)
    (inside,) = store.traces(name="cached_library_call")
    spans = {s.name: s for s in store.trace(inside.trace_id)}
    assert "library_wrapper" not in spans
    assert ("library_entry" in spans) is also_attached_to_outer
    db = {"application": "db"}
    assert spans["generate"].metadata == db
    events = store.events(trace_id=inside.trace_id)
    assert sorted(e.type for e in events) == ["FakeLLMEndEvent", "NoteEvent"]
    assert [e.metadata for e in events] == [db, db]
    (outside,) = {e.trace_id for e in store.events()} - {inside.trace_id}
    assert outside is not None  # events outside every span have no trace
    assert [s.metadata for s in store.trace(outside)] == [{}] * (1 + also_attached_to_outer)
    assert [e.metadata for e in store.events(trace_id=outside)] == [{}, {}]


def test_span_parents_are_recorded_only_when_needed(tmp_path: Any, make_handler: Any) -> None:
    """The parent links (a context bridge, which every span pays for) are kept while a
    handler with dispatcher_metadata is attached below the root, and only then."""
    from instrumentation import root_dispatcher
    from instrumentation.context import bridges
    from instrumentation.storage.handler import _span_parents

    store = SQLiteStore(tmp_path / "t.db")
    meta = {"tests.storage.app.db": {"application": "db"}}
    make_handler(store).attach(d)
    make_handler(store, dispatcher_metadata=meta).attach(root_dispatcher)
    assert _span_parents not in bridges()
    with_meta = make_handler(store, dispatcher_metadata=meta).attach(d)
    also = make_handler(store, dispatcher_metadata=meta).attach(d)
    assert _span_parents in bridges()
    with_meta.shutdown()
    assert _span_parents in bridges()  # still needed by the other one
    also.detach()
    assert _span_parents not in bridges()


@d_db.span
def cached_with_a_foreign_span(tracer: Any) -> None:
    with tracer.start_as_current_span("foreign"):
        generate("q", [])


def test_dispatcher_metadata_reaches_through_a_foreign_span(
    tmp_path: Any, make_handler: Any
) -> None:
    """An OpenTelemetry span of the application's, between a configured span and the
    handler's own (the bridge makes it their parent), hides nothing."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider

    from instrumentation.otel import OpenTelemetrySpanHandler

    provider = TracerProvider()
    otel = OpenTelemetrySpanHandler(tracer_provider=provider)
    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(
        store, dispatcher_metadata={"tests.storage.app.db": {"application": "db"}}
    ).attach()
    d.add_span_handler(otel)
    try:
        cached_with_a_foreign_span(provider.get_tracer("app"))
    finally:
        d.remove_span_handler(otel)
        otel.close()
        provider.shutdown()
    assert handler.flush(10)
    spans = {s.name: s for s in store.trace(store.traces()[0].trace_id)}
    outer = spans["cached_with_a_foreign_span"]
    assert spans["generate"].parent_id not in (None, outer.id_)  # the foreign span
    assert spans["generate"].metadata == {"application": "db"}
    assert [e.metadata for e in spans["generate"].events] == [{"application": "db"}]


def test_ended_after_a_position_pages_through_traces_that_ended_together(
    any_store: Store,
) -> None:
    """ended_after=(end, root span id) of a trace lists those after it, by end time then
    root span id: pages read one after the other list every trace once, also where many
    traces ended at the same moment, or a fraction of a microsecond apart (SQLite keeps
    more digits than the datetime read back)."""
    from instrumentation.storage.serialise import RowMaker

    maker = RowMaker({}, {}, 1000)
    start = time.time() - 30.123456789
    rows = []
    for i in range(60):
        info = (start + (i // 10) * 4e-7, 0.0, None, True, "t", f"{i:032x}", "app")
        rows.append(maker.span_row(((*info, None, None, None), f"root-{i:03d}", 1.0, None)))
    any_store.write(rows, [])
    listed: list[str] = []
    position: Any = start
    while True:
        page = any_store.traces(limit=7, ended_after=position)
        listed += [t.root_span_id for t in page]
        if len(page) < 7:
            break
        position = (page[-1].end, page[-1].root_span_id)
    assert listed == [f"root-{i:03d}" for i in range(60)]
    with pytest.raises(TypeError, match="root span id"):
        any_store.traces(ended_after=(start, 3))  # type: ignore[arg-type]
