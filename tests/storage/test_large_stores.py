"""What keeps reading a store that has been filled for weeks quick: the indexes of
schema version 2 (and the migration of a version 1 store to it, in place), query
plans that use them, and ``export`` reading trace ids a page at a time."""

from __future__ import annotations

import io
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from instrumentation import get_dispatcher
from instrumentation.storage import SQLiteStore, Store, base
from instrumentation.storage.cli import main
from instrumentation.storage.schema import (
    EVENT_COLUMNS,
    SCHEMA_VERSION,
    SPAN_COLUMNS,
    SQLITE,
    insert_sql,
    migrations,
)

from .helpers import FakeLLMEndEvent, NoteEvent, Usage, app_role_dsn

d = get_dispatcher("tests.storage.large")


@d.span
def leaf(i: int) -> int:
    d.event(NoteEvent(text=f"leaf {i}"))
    return i


@d.span
def handle_request(i: int) -> None:
    leaf(i)
    d.event(FakeLLMEndEvent(model="m", usage=Usage(3, 2), cost_usd=0.001))
    if i % 3 == 0:
        raise ValueError("failed")


def _record(store: Store, make_handler: Any, n: int = 6) -> None:
    handler = make_handler(store).attach(d)
    for i in range(n):
        try:
            handle_request(i)
        except ValueError:
            pass
    assert handler.flush(10)
    handler.detach()


def _span_row(trace_id: str, span_id: str, start: float, name: str = "root") -> tuple[Any, ...]:
    values: dict[str, Any] = dict.fromkeys(SPAN_COLUMNS)
    values.update(
        id=span_id,
        trace_id=trace_id,
        is_root=1,
        name=name,
        dispatcher="app",
        start_time=start,
        end_time=start + 0.5,
        duration=0.5,
        status="ok",
    )
    return tuple(values[c] for c in SPAN_COLUMNS)


def _version_1_store(path: Path, source: Path) -> None:
    """A store as release 1 of the schema made it, holding the rows of ``source``."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for statement in migrations(SQLITE)[1]:
        conn.execute(statement)
    conn.execute("INSERT INTO schema_version (version) VALUES (1)")
    with sqlite3.connect(source) as old:
        spans = old.execute(f"SELECT {', '.join(SPAN_COLUMNS)} FROM spans").fetchall()
        events = old.execute(f"SELECT {', '.join(EVENT_COLUMNS)} FROM events").fetchall()
    old.close()
    conn.executemany(insert_sql(SQLITE, "spans", SPAN_COLUMNS), spans)
    conn.executemany(insert_sql(SQLITE, "events", EVENT_COLUMNS), events)
    conn.close()


def _indexes(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        found = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    conn.close()
    return {name for name in found if not name.startswith("sqlite_")}


def _versions(path: Path) -> list[int]:
    with sqlite3.connect(path) as conn:
        found = [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY 1")]
    conn.close()
    return found


def test_a_version_1_store_is_read_as_it_is_and_migrated_in_place(
    tmp_path: Path, make_handler: Any
) -> None:
    """Version 2 adds indexes only: the command line (read-only) reads a version 1
    store without migrating it, and the first store opened for writing migrates it
    in place, keeping every row."""
    source = tmp_path / "source.db"
    with SQLiteStore(source) as store:
        _record(store, make_handler)
        before = store.traces(limit=100)
        events_before = store.events(limit=None)
    old = tmp_path / "old.db"
    _version_1_store(old, source)
    assert {"spans_name_start", "events_span_id"} <= _indexes(old)

    out = io.StringIO()
    assert main(["--db", str(old), "list"], out=out) == 0
    assert out.getvalue().count("handle_request") == 6
    with SQLiteStore(old, read_only=True) as reader:
        assert reader.traces(limit=100) == before
    assert _versions(old) == [1]  # reading migrated nothing

    with SQLiteStore(old) as store:  # opened for writing: migrated
        assert store.traces(limit=100) == before
        assert store.events(limit=None) == events_before
        assert store.schema_version() == SCHEMA_VERSION == 2
    assert _versions(old) == [1, 2]
    indexes = _indexes(old)
    assert {"spans_roots_name", "spans_roots_status", "events_time"} <= indexes
    assert not {"spans_name_start", "events_span_id"} & indexes
    with SQLiteStore(source) as fresh_store:  # a new store has the same indexes
        assert _versions(source) == [1, 2]
    assert _indexes(source) == indexes
    del fresh_store


def test_a_store_older_than_version_1_is_still_refused_for_reading(tmp_path: Path) -> None:
    path = tmp_path / "older.db"
    SQLiteStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM schema_version")
        conn.execute("INSERT INTO schema_version (version) VALUES (0)")
    conn.close()
    with pytest.raises(Exception, match="older than the version this release reads"):
        SQLiteStore(path, read_only=True)


@pytest.fixture
def plans(tmp_path: Path, make_handler: Any) -> Iterator[tuple[Store, Callable[[], str]]]:
    """A store with a few traces, and the query plans of the queries run since the
    last call (SQLite's EXPLAIN QUERY PLAN, one line per step)."""
    store = SQLiteStore(tmp_path / "plans.db")
    _record(store, make_handler)
    seen: list[str] = []
    query = store._query

    def explaining(sql: str, params: Any) -> list[Any]:
        plan = query("EXPLAIN QUERY PLAN " + sql, params)
        seen.extend(str(row[3]) for row in plan)
        return query(sql, params)

    store._query = explaining  # type: ignore[method-assign]

    def taken() -> str:
        text = "\n".join(seen)
        seen.clear()
        return text

    try:
        yield store, taken
    finally:
        store.close()


def test_traces_by_root_name_and_status_use_the_roots_indexes(
    plans: tuple[Store, Callable[[], str]],
) -> None:
    store, taken = plans
    assert len(store.traces(name="handle_request")) == 6
    assert "USING INDEX spans_roots_name (name=?)" in taken()
    # A nested span's name is no root's: found so in the roots' index.
    assert store.traces(name="leaf") == []
    assert "USING INDEX spans_roots_name (name=?)" in taken()
    assert len(store.traces(name="handle*")) == 6
    assert "USING INDEX spans_roots_name (name>? AND name<?)" in taken()
    assert len(store.traces(status="error")) == 2
    assert "USING INDEX spans_roots_status (status=?)" in taken()


def test_events_of_one_trace_and_the_oldest_events_use_an_index(
    plans: tuple[Store, Callable[[], str]],
) -> None:
    store, taken = plans
    trace_id = store.traces(limit=1)[0].trace_id
    taken()
    assert [e.type for e in store.events(trace_id=trace_id, type="NoteEvent")] == ["NoteEvent"]
    assert "USING INDEX events_trace_id (trace_id=?)" in taken()
    assert len(store.events(limit=3)) == 3
    plan = taken()
    # Read in time order, those of one moment sorted by id as they come: the store is
    # not sorted whole to find the oldest.
    assert "SCAN events USING INDEX events_time" in plan
    assert "TEMP B-TREE FOR ORDER BY" not in plan


def test_a_prefix_of_any_characters_is_a_range_of_the_trace_id_index(
    plans: tuple[Store, Callable[[], str]],
) -> None:
    """Only hex digits took the range: a mistyped prefix read the whole index."""
    store, taken = plans
    assert store.trace_ids_starting_with("zz") == []
    assert "(trace_id>? AND trace_id<?)" in taken()
    ids = ["zz-1", "zz\U0010ffff", "z\U0010ffff\U0010ffffa", "zé", "z\ud7ff", "z\ue000x", "{"]
    store.write([_span_row(t, uuid.uuid4().hex, 1000.0 + i) for i, t in enumerate(ids)], [])
    for prefix in ["z", "zz", "z\U0010ffff", "zé", "z\ud7ff", "z\ue000", "{", "Z", "\U0010ffff"]:
        found = sorted(store.trace_ids_starting_with(prefix, limit=100))
        assert found == sorted(t for t in ids if t.startswith(prefix)), prefix
        # (nothing sorts above every string that starts with the last character)
        if prefix != "\U0010ffff":
            assert "(trace_id>? AND trace_id<?)" in taken(), prefix


def test_traces_counts_and_sums_only_the_traces_it_lists(tmp_path: Path, make_handler: Any) -> None:
    """The counts and sums of each trace were computed for every root that matched a
    wildcard name, before the sort kept ``limit`` of them: listing 1 of 60 cost as
    much as listing all 60 (2.6 s for 20 of 100,000)."""
    with SQLiteStore(tmp_path / "t.db") as store:
        _record(store, make_handler, n=60)
        conn = store._connection()
        steps = [0]

        def count() -> int:
            steps[0] += 1
            return 0

        conn.set_progress_handler(count, 1)
        store.traces(limit=60)
        every, steps[0] = steps[0], 0
        [one] = store.traces(name="handle*", limit=1)
        assert steps[0] < every / 3, (steps[0], every)
        conn.set_progress_handler(None, 1)
        assert (one.span_count, one.total_tokens) == (2, 5)


def test_trace_ids_reads_pages_and_neither_skips_nor_repeats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``export`` reads trace ids a page at a time (it held a summary of every trace
    before writing the first): roots that started at the same moment across a page's
    end are each read once, and ``limit``, ``since`` and ``until`` hold."""
    monkeypatch.setattr(base, "_ID_PAGE", 3)
    with SQLiteStore(tmp_path / "t.db") as store:
        starts = [1000.0, 1001.0, 1001.0, 1001.0, 1001.0, 1002.0, 1003.0, 1003.0, 1004.0]
        rows = [_span_row(f"t{i:02d}", f"s{i:02d}", start) for i, start in enumerate(starts)]
        store.write(rows[::2] + rows[1::2], [])  # stored in another order than by id
        every = list(store.trace_ids())
        assert sorted(every) == sorted(r[1] for r in rows)
        by_start = dict(zip((r[1] for r in rows), starts, strict=True))
        assert [by_start[t] for t in every] == sorted(starts, reverse=True)
        assert list(store.trace_ids(limit=4)) == every[:4]
        # traces() (list) picks the same among roots that started together (export).
        assert [t.trace_id for t in store.traces(limit=6)] == every[:6]
        assert list(store.trace_ids(limit=3)) == every[:3]
        assert set(store.trace_ids(since=1001.0, until=1003.0)) == {
            "t01",
            "t02",
            "t03",
            "t04",
            "t05",
        }
        with pytest.raises(ValueError, match="limit"):
            list(store.trace_ids(limit=0))


def _event_row(
    event_id: str, at: float, trace_id: str = "t1", type: str = "Note"
) -> tuple[Any, ...]:
    values: dict[str, Any] = dict.fromkeys(EVENT_COLUMNS)
    values.update(
        id=event_id, type=type, time=at, trace_id=trace_id, payload=f'{{"n": "{event_id}"}}'
    )
    return tuple(values[c] for c in EVENT_COLUMNS)


def test_iter_events_reads_pages_and_neither_skips_nor_repeats(
    any_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``events(limit=None)`` held every event of the store at once; ``iter_events``
    reads them a page at a time, in the same order, each once, even where events of one
    moment cross a page's end; ``since``/``until`` hold on both."""
    monkeypatch.setattr(base, "_EVENT_PAGE", 3)
    times = [10.0, 11.0, 11.0, 11.0, 11.0, 12.0, 13.0, 13.0, 14.0, 15.000001]
    rows = [
        _event_row(f"e{i:02d}", at, trace_id="t1" if i % 2 else "t2", type="A" if i < 6 else "B")
        for i, at in enumerate(times)
    ]
    any_store.write([], list(reversed(rows)))
    every = any_store.events(limit=None)
    assert [e.id_ for e in every] == [r[0] for r in rows]  # by time, then id
    pages: list[int] = []
    read = any_store._query  # type: ignore[attr-defined]

    def counted(sql: str, params: Any) -> Any:
        out = read(sql, params)
        pages.append(len(out))
        return out

    monkeypatch.setattr(any_store, "_query", counted)
    assert [e.id_ for e in any_store.iter_events()] == [e.id_ for e in every]
    assert max(pages) == 3 and len(pages) == 4
    for filters in (
        {"trace_id": "t1"},
        {"type": "A"},
        {"type": "B", "trace_id": "t2"},
        {"since": 11.0, "until": 13.0},
        {"since": datetime.fromtimestamp(15.000001, timezone.utc)},
        {"until": 11.0},
    ):
        listed = [e.id_ for e in any_store.events(limit=None, **filters)]
        assert listed, filters
        assert [e.id_ for e in any_store.iter_events(**filters)] == listed, filters
    assert [e.id_ for e in any_store.events(since=11.0, until=13.0)] == [
        "e01",
        "e02",
        "e03",
        "e04",
        "e05",
    ]
    assert [e.id_ for e in any_store.events(since=11.0, limit=2)] == ["e01", "e02"]
    with pytest.raises(TypeError, match="trace_id is a str"):
        any_store.iter_events(trace_id=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="since"):
        any_store.events(since=float("nan"))


def test_export_of_every_trace_holds_no_summary_of_each(
    tmp_path: Path, make_handler: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "t.db"
    with SQLiteStore(path) as store:
        _record(store, make_handler, n=7)
    monkeypatch.setattr(base, "_ID_PAGE", 2)
    asked: list[int] = []
    traces = base.SQLStore.traces

    def recorded(self: Any, limit: int = 20, **filters: Any) -> Any:
        asked.append(limit)
        return traces(self, limit, **filters)

    monkeypatch.setattr(base.SQLStore, "traces", recorded)
    out = io.StringIO()
    assert main(["--db", str(path), "export", "--limit", str(10**9)], out=out) == 0
    assert len(out.getvalue().splitlines()) == 7
    assert asked == []


def _postgres_version_1(dsn: str) -> None:
    import psycopg

    from instrumentation.storage.schema import POSTGRES

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for statement in migrations(POSTGRES)[1]:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version (version) VALUES (1)")


def test_a_version_1_postgres_database_is_read_as_it_is_and_migrated(
    postgres_dsn: str, make_handler: Any
) -> None:
    from instrumentation.storage.postgres import PostgresStore

    _postgres_version_1(postgres_dsn)
    with PostgresStore(postgres_dsn, read_only=True) as reader:
        assert reader.traces() == []
    with PostgresStore(postgres_dsn) as store:
        _record(store, make_handler)
        assert len(store.traces(name="handle*")) == 6
        assert len(store.traces(status="error")) == 2
        found = store._query("SELECT version FROM schema_version ORDER BY 1", [])
        assert [r[0] for r in found] == [1, 2]
        names = {
            r[0]
            for r in store._query(
                "SELECT indexname FROM pg_indexes WHERE tablename IN ('spans', 'events')", []
            )
        }
        assert {"spans_roots_name", "spans_roots_status", "events_time"} <= names
        assert not {"spans_name_start", "events_span_id"} & names


def _postgres_indexes(dsn: str) -> dict[str, bool]:
    """The indexes of the trace tables, and whether each is valid."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT c.relname, i.indisvalid FROM pg_index i "
            "JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE i.indrelid IN ('spans'::regclass, 'events'::regclass)"
        ).fetchall()
    return {name: valid for name, valid in rows}


def _wait_for_migration_to_wait(dsn: str) -> None:
    """Until another session waits for a lock (the migration, for the writer's
    transaction). Watched from a session of its own: a concurrent index build waits
    for every transaction that took a snapshot while it ran, to its end."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as watcher:
        for _ in range(1000):
            waiting = watcher.execute(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database()"
            ).fetchone()
            if waiting and waiting[0]:
                return
            time.sleep(0.01)
    pytest.fail("the migration never waited for the writer's transaction")


def test_reading_and_writing_go_on_while_a_postgres_database_is_migrated(
    postgres_dsn: str,
) -> None:
    """Migrating tables that hold rows in one transaction held every other process's
    inserts until it committed (0.66 s of a 0.68 s migration of 600,000 spans):
    CREATE INDEX locks writes out, DROP INDEX reads too. Each index is made
    CONCURRENTLY now; the version is recorded once all are."""
    import psycopg

    from instrumentation.storage.postgres import PostgresStore

    _postgres_version_1(postgres_dsn)
    rows = [_span_row("t1", "s1", 1000.0)], [_event_row("e1", 1000.0)]
    with psycopg.connect(postgres_dsn, autocommit=True) as holder:
        # A writer's transaction on events holds the migration up half way: the spans
        # indexes made, the events' one waiting.
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE events IN ROW EXCLUSIVE MODE")
        done: list[Any] = []
        migrating = threading.Thread(target=lambda: done.append(PostgresStore(postgres_dsn)))
        migrating.start()
        try:
            _wait_for_migration_to_wait(postgres_dsn)
            with psycopg.connect(
                postgres_dsn + "?options=-c%20lock_timeout%3D2000", autocommit=True
            ) as other:
                other.execute("SELECT COUNT(*) FROM spans").fetchone()
                other.execute("INSERT INTO events (id, type, time) VALUES ('raw', 'T', now())")
            writer = PostgresStore(postgres_dsn + "?options=-c%20lock_timeout%3D2000")
            with writer:
                writer.write(*rows)  # at version 1: another process migrates it
        finally:
            holder.execute("COMMIT")
            migrating.join(30)
    (store,) = done
    with store:
        assert store._query("SELECT MAX(version) FROM schema_version", []) == [(2,)]
        assert [s.id_ for s in store.trace("t1")] == ["s1"]
        assert len(store.events(limit=None)) == 2
    indexes = _postgres_indexes(postgres_dsn)
    assert {"spans_roots_name", "spans_roots_status", "events_time"} <= set(indexes)
    assert all(indexes.values()) and not {"spans_name_start", "events_span_id"} & set(indexes)


def test_an_index_a_cut_short_migration_left_invalid_is_made_again(postgres_dsn: str) -> None:
    """A concurrent index build stopped half way (a lock timeout, a cancel, a crash)
    leaves its index there but invalid: never read, yet written with every row.
    ``IF NOT EXISTS`` took it for made."""
    import psycopg

    from instrumentation.storage.postgres import PostgresStore

    _postgres_version_1(postgres_dsn)
    with psycopg.connect(postgres_dsn, autocommit=True) as holder:
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE spans IN ROW EXCLUSIVE MODE")
        with psycopg.connect(postgres_dsn, autocommit=True) as builder:
            builder.execute("SET lock_timeout = 200")
            with pytest.raises(psycopg.errors.LockNotAvailable):
                builder.execute(
                    "CREATE INDEX CONCURRENTLY spans_roots_name ON spans (name, start_time) "
                    "WHERE is_root = 1"
                )
        holder.execute("COMMIT")
    assert _postgres_indexes(postgres_dsn)["spans_roots_name"] is False
    with PostgresStore(postgres_dsn) as store:
        assert store._query("SELECT MAX(version) FROM schema_version", []) == [(2,)]
    assert _postgres_indexes(postgres_dsn)["spans_roots_name"] is True


def test_a_migration_held_up_too_long_is_left_for_the_next_connection(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A concurrent build waits for every transaction holding an older snapshot: one
    that does not end (anywhere in the database) would hold the store's first
    connection, in the application's thread, for as long. Past MIGRATION_WAIT the
    tables are recorded into as they are, with a warning, and migrated later."""
    import psycopg

    from instrumentation.storage import postgres
    from instrumentation.storage.postgres import PostgresStore

    monkeypatch.setattr(postgres, "MIGRATION_WAIT", 0.3)
    _postgres_version_1(postgres_dsn)
    with psycopg.connect(postgres_dsn, autocommit=True) as holder:
        holder.execute("CREATE TABLE elsewhere (x INTEGER)")
        holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT COUNT(*) FROM elsewhere")
        with PostgresStore(postgres_dsn) as store:
            store.write(*([_span_row("t1", "s1", 1000.0)], []))
            assert store._query("SELECT MAX(version) FROM schema_version", []) == [(1,)]
        holder.execute("COMMIT")
    assert "was not migrated" in caplog.text and "waited 0.3 s" in caplog.text
    assert all(_postgres_indexes(postgres_dsn).values())  # the build cut short left nothing
    with PostgresStore(postgres_dsn) as store:
        assert store._query("SELECT MAX(version) FROM schema_version", []) == [(2,)]
        assert [t.trace_id for t in store.traces()] == ["t1"]


def test_a_migration_waits_migration_wait_in_all_not_at_each_wait(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Each wait was given MIGRATION_WAIT of its own: a build held up by a writer's
    transaction waited it out, and the drop of the index that build left invalid
    waited as long again (20 s, in the application's thread, for a store made while
    another process's transaction held the table), as would each of the five steps.
    The migration waits MIGRATION_WAIT in all."""
    import psycopg

    from instrumentation.storage import postgres
    from instrumentation.storage.postgres import PostgresStore

    monkeypatch.setattr(postgres, "MIGRATION_WAIT", 2.0)
    _postgres_version_1(postgres_dsn)
    with psycopg.connect(postgres_dsn, autocommit=True) as holder:
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE spans IN ROW EXCLUSIVE MODE")
        began = time.monotonic()
        with PostgresStore(postgres_dsn) as store:
            waited = time.monotonic() - began
            store.write([_span_row("t1", "s1", 1000.0)], [])
        holder.execute("COMMIT")
    assert 2.0 <= waited < 3.0
    assert "was not migrated" in caplog.text
    with PostgresStore(postgres_dsn) as store:
        assert store._query("SELECT MAX(version) FROM schema_version", []) == [(2,)]
    assert all(_postgres_indexes(postgres_dsn).values())


def test_a_migration_cut_short_by_the_dsns_statement_timeout_records_as_it_is(
    postgres_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``statement_timeout`` in the connection string (``options=-c
    statement_timeout=...``) cancels a concurrent build that waits (or builds) longer:
    the store took that for a server that cannot be reached, every write failed (each
    new connection tried the migration again) and the rows went to the spool, with an
    invalid index left behind. Cut short so, the tables are recorded into as they are."""
    import psycopg

    from instrumentation.storage.postgres import PostgresStore

    _postgres_version_1(postgres_dsn)
    dsn = postgres_dsn + "?options=-c%20statement_timeout%3D300"
    with psycopg.connect(postgres_dsn, autocommit=True) as holder:
        holder.execute("CREATE TABLE elsewhere (x INTEGER)")
        holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT COUNT(*) FROM elsewhere")
        with PostgresStore(dsn) as store:
            store.write([_span_row("t1", "s1", 1000.0)], [])
            assert [t.trace_id for t in store.traces()] == ["t1"]
        holder.execute("COMMIT")
    assert "was not migrated" in caplog.text and "statement timeout" in caplog.text
    assert all(_postgres_indexes(postgres_dsn).values())
    with PostgresStore(dsn) as store:
        assert store._query("SELECT MAX(version) FROM schema_version", []) == [(2,)]


def test_a_role_that_may_not_migrate_records_into_version_1_tables(
    postgres_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Version 2 adds indexes only: a role that may only read and insert keeps
    recording into version 1 tables (with a warning), rather than not at all."""
    import psycopg

    from instrumentation.storage.postgres import PostgresStore
    from instrumentation.storage.serialise import RowMaker

    _postgres_version_1(postgres_dsn)
    dsn = app_role_dsn(postgres_dsn)
    with PostgresStore(dsn) as store:
        store.write([], [RowMaker({}, {}, 100).event_row(NoteEvent(text="hi"), None)])
        assert [e.payload["text"] for e in store.events()] == ["hi"]
    assert "may not migrate it" in caplog.text
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        assert admin.execute("SELECT MAX(version) FROM schema_version").fetchone() == (1,)


def test_iter_traces_reads_pages_and_neither_skips_nor_repeats(
    any_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``traces(limit=...)`` held a summary of every trace listed at once;
    ``iter_traces`` reads them a page at a time, in the same order, each once, even
    where roots that started together cross a page's end, with every filter."""
    monkeypatch.setattr(base, "_TRACE_PAGE", 3)
    starts = [1000.0, 1001.0, 1001.0, 1001.0, 1001.0, 1002.0, 1003.0, 1003.0, 1004.0, 1005.0]
    rows = []
    for i, start in enumerate(starts):
        values = dict(zip(SPAN_COLUMNS, _span_row(f"t{i:02d}", f"s{i:02d}", start), strict=True))
        values.update(
            name="ask" if i % 2 else "index",
            dispatcher="app.rag" if i % 3 else "other",
            duration=float(i),
            status="error" if i % 4 == 0 else "ok",
            user_id="alice" if i < 5 else "bob",
        )
        rows.append(tuple(values[c] for c in SPAN_COLUMNS))
    any_store.write(rows[::2] + rows[1::2], [])  # stored in another order than by id
    every = [t.trace_id for t in any_store.traces(limit=100)]
    assert len(every) == 10
    pages: list[int] = []
    read = any_store._query  # type: ignore[attr-defined]

    def counted(sql: str, params: Any) -> Any:
        out = read(sql, params)
        pages.append(len(out))
        return out

    monkeypatch.setattr(any_store, "_query", counted)
    assert [t.trace_id for t in any_store.iter_traces()] == every
    assert pages == [3, 3, 3, 1]
    assert [t.trace_id for t in any_store.iter_traces(limit=4)] == every[:4]
    summaries = list(any_store.iter_traces(limit=7))
    assert summaries == any_store.traces(limit=7)
    for filters in (
        {"since": 1001.0, "until": 1003.0},
        {"name": "ask"},
        {"name": "in*"},
        {"status": "error"},
        {"min_duration": 4.0},
        {"dispatcher": "app"},
        {"metadata": {"user": "bob"}},
    ):
        listed = [t.trace_id for t in any_store.traces(limit=100, **filters)]  # type: ignore[arg-type]
        assert listed, filters
        found = any_store.iter_traces(**filters)  # type: ignore[arg-type]
        assert [t.trace_id for t in found] == listed, filters
    with pytest.raises(ValueError, match="status"):
        any_store.iter_traces(status="failed")  # at once, not at the first next()
    with pytest.raises(ValueError, match="limit"):
        any_store.iter_traces(limit=0)


def test_list_reads_traces_a_page_at_a_time(
    tmp_path: Path, make_handler: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``list --limit`` held a summary of every trace, and its line, before printing
    the first (158 MB for 100,000 traces); ``list --all`` lists every one."""
    from instrumentation.storage import cli

    path = tmp_path / "t.db"
    with SQLiteStore(path) as store:
        _record(store, make_handler, n=7)
        expected = [t.trace_id for t in store.traces(limit=100)]
    monkeypatch.setattr(base, "_TRACE_PAGE", 2, raising=False)
    monkeypatch.setattr(cli, "_PAGE", 3)
    asked: list[int] = []
    traces = base.SQLStore.traces

    def recorded(self: Any, limit: int = 20, **filters: Any) -> Any:
        asked.append(limit)
        return traces(self, limit, **filters)

    monkeypatch.setattr(base.SQLStore, "traces", recorded)
    for how_many in (["--limit", str(10**9)], ["--all"]):
        out = io.StringIO()
        assert main(["--db", str(path), "list", *how_many], out=out) == 0
        listed = [line.split()[2] for line in out.getvalue().splitlines()]
        assert listed == expected, how_many
    out = io.StringIO()
    assert main(["--db", str(path), "list", "--limit", "4", "--status", "error"], out=out) == 0
    assert len(out.getvalue().splitlines()) == 3
    assert asked == []


def test_postgres_reads_are_never_compiled_first(postgres_dsn: str) -> None:
    """A filter that few roots meet (``list --min-duration``, ``--dispatcher``,
    ``--meta``) made PostgreSQL expect a read of every root, past ``jit_above_cost``:
    each such query was JIT-compiled first (0.6 to 0.8 s on 100,000 roots, for a scan
    of 16 to 25 ms). Here the server would compile every query."""
    import psycopg

    from instrumentation.storage.postgres import PostgresStore

    with psycopg.connect(postgres_dsn) as conn:
        if not conn.execute("SELECT pg_jit_available()").fetchone()[0]:  # type: ignore[index]
            pytest.skip("this PostgreSQL server has no JIT compiler")
    dsn = postgres_dsn + "?options=-c%20jit_above_cost%3D0"
    with PostgresStore(dsn) as store:
        store.write([_span_row(f"t{i}", f"s{i}", 1000.0 + i) for i in range(5)], [])
        plans: list[str] = []
        read = store._query

        def explained(sql: str, params: Any) -> Any:
            if sql.lstrip().startswith("SELECT"):
                plan = read(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", params)
                plans.append(str(plan[0][0]))
            return read(sql, params)

        store._query = explained  # type: ignore[method-assign]
        assert store.traces(min_duration=60) == []
        assert len(store.traces(dispatcher="app", metadata={"user": "x"})) == 0
        assert plans and not [p for p in plans if "JIT" in p]
