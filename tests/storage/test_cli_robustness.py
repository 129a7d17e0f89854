"""The command line and read-back on awkward input: deep and large traces, odd names,
terminals that are not UTF-8, out-of-range arguments, an output file that is the
database, readers connected while a writer closes; on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from instrumentation import get_dispatcher
from instrumentation.storage import SQLiteStore, Store, metadata
from instrumentation.storage.cli import _cost, format_trace, main, trace_record
from instrumentation.storage.models import StoredSpan
from instrumentation.storage.serialise import RowMaker
from instrumentation.tree import MAX_INDENT

from .helpers import NoteEvent

ROOT = Path(__file__).resolve().parents[2]
d = get_dispatcher("tests.storage.robust")


def _span(
    name: str,
    trace_id: str,
    span_id: str,
    *,
    parent: str | None = None,
    root: bool | None = None,
    start: float | None = None,
    duration: float = 0.5,
    error: str | None = None,
    dispatcher: str = "app",
    attributes: dict[str, Any] | None = None,
) -> tuple[Any, ...]:
    """One span row, as the writer makes it."""
    begin = time.time() - 30 if start is None else start
    is_root = parent is None if root is None else root
    info = (begin, 0.0, parent, is_root, name, trace_id, dispatcher, None, attributes, None)
    return RowMaker({}, {}, 1_000_000).span_row((info, span_id, duration, error))


def _note(text: str) -> Any:
    from .helpers import NoteEvent

    return NoteEvent(text=text)


def _db(store: Store) -> str:
    return store.path if isinstance(store, SQLiteStore) else store.dsn  # type: ignore[attr-defined]


def _run(*argv: str) -> str:
    out = io.StringIO()
    assert main(list(argv), out=out) == 0
    return out.getvalue()


def _cli(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The command line in a process of its own, its output read in the encoding
    ``PYTHONIOENCODING`` gives it (UTF-8 by default)."""
    return subprocess.run(
        [sys.executable, "-m", "instrumentation", *argv],
        capture_output=True,
        encoding=env.get("PYTHONIOENCODING", "utf-8"),
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONIOENCODING": "utf-8", **env},
    )


# -- 1. a writer's close copies the write-ahead log, readers or not ----------------------


def test_a_writer_closing_while_a_reader_is_connected_leaves_the_file_complete(
    tmp_path: Path,
) -> None:
    """SQLite copies -wal into the file only when the last connection closes: with
    ``tail`` (a read-only connection) still open, the writer's rows stayed in -wal,
    and the file alone (copied, mailed) had none. The writer's close copies them."""
    db = tmp_path / "t.db"
    writer = SQLiteStore(db)
    writer.write([_span("kept", "a" * 32, "kept-1")], [])
    reader = SQLiteStore(db, read_only=True)  # -wal is there: opened mode=ro
    assert [t.name for t in reader.traces()] == ["kept"]
    writer.close()
    mailed = tmp_path / "mailed"
    mailed.mkdir()
    shutil.copy(db, mailed / "t.db")  # the file alone, without -wal
    with SQLiteStore(mailed / "t.db", read_only=True) as copy:
        assert [t.name for t in copy.traces()] == ["kept"]
    assert [t.name for t in reader.traces()] == ["kept"]  # the reader reads on
    reader.close()


def test_a_reader_in_the_middle_of_a_query_holds_the_close_up_a_second_at_most(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reader whose read transaction never ends cannot make the writer's close
    hang: it waits about a second, says so (INFO), and the rows are safe in -wal."""
    db = tmp_path / "t.db"
    writer = SQLiteStore(db)
    writer.write([_span("first", "a" * 32, "first-1")], [])
    holder = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
    try:
        holder.execute("BEGIN")
        assert holder.execute("SELECT COUNT(*) FROM spans").fetchone() == (1,)
        writer.write([_span("second", "b" * 32, "second-1")], [])
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="instrumentation.storage"):
            writer.close()
        assert time.monotonic() - started < 5
        assert "write-ahead log" in caplog.text and "t.db-wal" in caplog.text
    finally:
        holder.close()
    with SQLiteStore(db, read_only=True) as reader:
        assert sorted(t.name or "" for t in reader.traces()) == ["first", "second"]


def test_a_short_shutdown_that_only_waits_for_the_log_copy_reports_all_stored(
    tmp_path: Path, make_handler: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """With a reader holding a snapshot, the close's copy of the log waits about a
    second: shutdown(0.5) said False, and that rows of a spool file that does not
    exist were still waiting. Every row is stored by then: it says so, and is True."""
    db = tmp_path / "t.db"
    handler = make_handler(SQLiteStore(db), close_store=True, debounce=0.01)
    handler.handle(_note("first"))
    assert handler.flush(5)
    holder = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
    try:
        holder.execute("BEGIN")
        holder.execute("SELECT COUNT(*) FROM events").fetchone()
        handler.handle(_note("second"))
        assert handler.flush(5)
        with caplog.at_level(logging.INFO, logger="instrumentation.storage"):
            assert handler.shutdown(0.5) is True
        assert "every row it had is stored" in caplog.text
        assert "spool" not in caplog.text
    finally:
        holder.close()


# -- 2. tail and traces that span two processes -----------------------------------------


def test_tail_shows_a_trace_again_when_its_top_span_ends(any_store: Store) -> None:
    """A trace continued in another process has a root there (its parent, in this
    process, is not stored yet), which ends first and is shown; when the top span
    ends, the whole trace is listed by it and must be shown too (tail skipped it: it
    told traces apart by trace id)."""
    from instrumentation.storage import cli

    trace_id = "c" * 32
    follower = cli._Follower(any_store, datetime.now(timezone.utc) - timedelta(seconds=120))
    consumer = _span("consumer", trace_id, "consumer-1", parent="producer-1", root=True)
    any_store.write([consumer], [])
    assert [s.name for s in follower.new_traces()] == ["consumer"]
    producer = _span("producer", trace_id, "producer-1", start=time.time() - 31, duration=3)
    any_store.write([producer], [])
    shown = list(follower.new_traces())
    assert [(s.name, s.trace_id, s.span_count) for s in shown] == [("producer", trace_id, 2)]
    assert list(follower.new_traces()) == []


# -- 3 and 4. deep and large traces ---------------------------------------------------


def _chain(store: Store, depth: int) -> str:
    """A trace ``depth`` spans deep (each the only child of the one before)."""
    trace_id = "d" * 32
    start = time.time() - 60
    rows = [
        _span(
            f"level-{i}",
            trace_id,
            f"s{i}",
            parent=f"s{i - 1}" if i else None,
            start=start + i * 1e-3,
            duration=1.0,
        )
        for i in range(depth)
    ]
    store.write(rows, [])
    return trace_id


def test_a_trace_2000_spans_deep_is_shown_and_exported(tmp_path: Path) -> None:
    """show, show --events, show --json, export, tail --tree and format_traces
    failed past about 500 levels ("maximum recursion depth exceeded", blamed on the
    database): the tree and the JSON are built without recursion."""
    from instrumentation import storage

    store = SQLiteStore(tmp_path / "deep.db")
    trace_id = _chain(store, 2000)
    db = store.path
    tree = _run("--db", db, "show", "latest").splitlines()
    assert len(tree) == 2001 and tree[1] == "level-0  1.00 s"
    assert tree[-1] == " " * 4 * (MAX_INDENT - 1) + "└── [1999] level-1999  1.00 s"
    assert _run("--db", db, "show", "latest", "--events").splitlines() == tree
    record = json.loads(_run("--db", db, "show", "latest", "--json"))
    assert len(record["spans"]) == 2000 and record["roots"] == ["s0"]
    (line,) = _run("--db", db, "export").splitlines()
    assert json.loads(line) == json.loads(json.dumps(record, ensure_ascii=False))
    tail = _run("--db", db, "tail", "--lookback", "3600", "--count", "1", "--tree")
    assert tail.splitlines()[1:] == tree[1:]
    assert storage.format_traces(store).splitlines()[1:] == tree[1:]
    assert trace_id in tree[0]


def test_trace_record_copies_no_subtree() -> None:
    """trace_record made each span's dict with dataclasses.asdict, which copied the
    span's whole subtree (children, their events) to drop it again: quadratic in the
    depth (a 50,001-span trace took 10 s). Now a deep chain costs what as many
    siblings do."""

    t = datetime.now(timezone.utc)

    def spans(deep: bool, n: int = 300) -> list[StoredSpan]:
        made: list[StoredSpan] = []
        for i in range(n):
            parent = (f"s{i - 1}" if deep else "s0") if i else None
            span = StoredSpan(f"s{i}", "t", parent, f"l{i}", "d", t, t, 0.0, "ok")
            if i:
                (made[-1] if deep else made[0]).children.append(span)
            made.append(span)
        return made

    def cost(made: list[StoredSpan]) -> float:
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            trace_record("t", made)
            best = min(best, time.perf_counter() - started)
        return best

    chain, flat = spans(deep=True), spans(deep=False)
    assert trace_record("t", chain)["spans"][5] == trace_record("t", flat)["spans"][5] | {
        "parent_id": "s4"
    }
    assert cost(chain) < 5 * cost(flat) + 0.005


# -- 5. export looks ids up only when it must, by a range of the index ---------------------


def test_export_looks_up_no_id_that_traces_returned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """export resolved every id that traces() had just returned (a LIKE scan each:
    12 s for 8,000 traces); only the ids given on the command line are looked up."""
    from instrumentation.storage.base import SQLStore

    store = SQLiteStore(tmp_path / "t.db")
    store.write([_span(f"t{i}", f"{i:02x}".ljust(32, "e"), f"r{i}") for i in range(20)], [])
    looked_up: list[str] = []
    real = SQLStore.trace_ids_starting_with

    def spy(self: SQLStore, prefix: str, limit: int = 2) -> list[str]:
        looked_up.append(prefix)
        return real(self, prefix, limit)

    monkeypatch.setattr(SQLStore, "trace_ids_starting_with", spy)
    assert len(_run("--db", store.path, "export").splitlines()) == 20
    assert looked_up == []
    assert len(_run("--db", store.path, "export", "03", "latest").splitlines()) == 2
    assert looked_up == ["03"]


IDS = [
    "ab" + "0" * 30,
    "ab" + "f" * 30,
    "abf" + "1" * 29,
    "ac" + "0" * 30,
    "aB" + "0" * 30,
    "9f" + "0" * 30,
    "a0" + "0" * 30,
    "a_b" + "0" * 29,
    "a%c" + "0" * 29,
    "f" * 32,
]


@pytest.mark.parametrize(
    "prefix", ["a", "ab", "abf", "aB", "AB", "9", "9f", "a0", "f", "fff", "a_", "a%", "0", ""]
)
def test_a_prefix_matches_the_ids_that_start_with_it(any_store: Store, prefix: str) -> None:
    """Looked up as a range of the index, a prefix still matches exactly the ids that
    start with it: upper and lower case apart, ``_`` and ``%`` as themselves."""
    any_store.write([_span(f"n{i}", tid, f"r{i}") for i, tid in enumerate(IDS)], [])
    found = any_store.trace_ids_starting_with(prefix, limit=100)
    assert sorted(found) == sorted(t for t in IDS if t.startswith(prefix))
    expected = [t for t in IDS if t.startswith(prefix)]
    assert any_store.resolve_trace_id(prefix) == (expected[0] if len(expected) == 1 else None)


def test_a_prefix_is_looked_up_by_a_range_of_the_index(tmp_path: Path) -> None:
    """``LIKE 'ab%'`` read the whole trace_id index: on SQLite a prefix of hex digits
    is a range condition on it (PostgreSQL compares that range under "C", which its
    index need not be in: see the next test)."""
    store = SQLiteStore(tmp_path / "t.db")
    store.write([_span(f"n{i}", tid, f"r{i}") for i, tid in enumerate(IDS)], [])
    statements: list[str] = []
    conn = store._connection()
    conn.set_trace_callback(statements.append)
    try:
        store.trace_ids_starting_with("ab")
    finally:
        conn.set_trace_callback(None)
    (sql,) = statements
    plan = " ".join(str(row[3]) for row in conn.execute("EXPLAIN QUERY PLAN " + sql))
    assert "SEARCH spans USING COVERING INDEX spans_trace_id (trace_id>? AND trace_id<?)" in plan
    store.close()


def _icu_database(postgres_server: Any, locale: str) -> str:
    """The name of a new database whose default collation is ICU's ``locale``."""
    import uuid

    import psycopg

    name = f"t_icu_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_server.dsn(), autocommit=True) as admin:
        try:
            admin.execute(
                f'CREATE DATABASE "{name}" TEMPLATE template0 LOCALE_PROVIDER icu '
                f"ICU_LOCALE '{locale}' LOCALE 'C.UTF-8'"
            )
        except psycopg.Error as exc:  # a server built without ICU
            pytest.skip(f"no ICU collation on this server: {exc}")
    return name


def test_a_prefix_is_found_in_a_database_whose_collation_orders_digits_as_numbers(
    postgres_server: Any,
) -> None:
    """In a PostgreSQL database with a collation that compares digit runs as numbers
    ("19000" after "2"), the range missed ids: 'show 1991' said no trace matches."""
    from instrumentation.storage.postgres import PostgresStore

    name = _icu_database(postgres_server, "en-US-u-kn-true")
    ids = ["19" + "1" * 30, "1" + "9" * 31, "2" + "0" * 31, "190" + "0" * 29, "9" * 32]
    with PostgresStore(postgres_server.dsn(name)) as store:
        store.write([_span(f"n{i}", tid, f"r{i}") for i, tid in enumerate(ids)], [])
        for prefix in ("1", "19", "190", "2", "9", "1991"):
            found = store.trace_ids_starting_with(prefix, limit=10)
            assert sorted(found) == sorted(t for t in ids if t.startswith(prefix)), prefix


def test_a_prefix_is_a_range_of_an_index_in_a_database_of_another_collation(
    postgres_server: Any,
) -> None:
    """Under a collation other than "C" the range compared under "C" matched no index
    (the trace_id index is in the database's collation): every lookup read the whole
    index. A new database keeps trace ids in "C", so its index serves the range."""
    import psycopg

    from instrumentation.storage.postgres import PostgresStore

    name = _icu_database(postgres_server, "en-US")

    class Recording(PostgresStore):
        queries: list[tuple[str, list[Any]]] = []

        def _query(self, sql: str, params: Any) -> Any:
            self.queries.append((sql, list(params)))
            return super()._query(sql, params)

    with Recording(postgres_server.dsn(name)) as store:
        store.write([_span(f"n{i}", tid, f"r{i}") for i, tid in enumerate(IDS)], [])
        assert sorted(store.trace_ids_starting_with("ab", limit=10)) == sorted(IDS[:3])
        (sql, params) = store.queries[-1]
    with psycopg.connect(postgres_server.dsn(name), autocommit=True) as conn:
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(row[0] for row in conn.execute("EXPLAIN " + sql, params))
    assert "Index Cond" in plan and "trace_id" in plan.split("Index Cond", 1)[1], plan


# -- 6. terminals that are not UTF-8 ----------------------------------------------------


def _odd_names(store: Store) -> None:
    store.write(
        [
            _span("café_µ", "e" * 32, "e-root", duration=2e-5),
            _span("inner", "e" * 32, "e-inner", parent="e-root", duration=1e-5, error="Oops ✗"),
        ],
        [],
    )


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_a_terminal_that_is_not_utf8_gets_what_it_can_show(tmp_path: Path, encoding: str) -> None:
    """list, show and export failed with 'ascii' codec can't encode 'µ' (status 2):
    the drawing takes look-alikes the encoding has, anything else becomes ?, and
    export writes JSON with \\u escapes (the same JSON)."""
    store = SQLiteStore(tmp_path / "t.db")
    _odd_names(store)
    db = store.path
    env = {"PYTHONIOENCODING": encoding}
    listed = _cli("--db", db, "list", **env)
    assert listed.returncode == 0, listed.stderr
    shown = _cli("--db", db, "show", "latest", **env)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    if encoding == "ascii":
        assert "caf?_u  20 us" in listed.stdout
        assert lines[1:] == ["caf?_u  20 us", "`-- inner  10 us  x Oops x"]
    else:  # Latin-1 has é and µ, not ✗ nor the branches
        assert "café_µ  20 µs" in listed.stdout
        assert lines[1:] == ["café_µ  20 µs", "`-- inner  10 µs  x Oops x"]
    exported = _cli("--db", db, "export", **env)
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.isascii()
    utf8 = _cli("--db", db, "export", PYTHONIOENCODING="utf-8")
    assert json.loads(exported.stdout) == json.loads(utf8.stdout)
    assert "café_µ" in utf8.stdout  # UTF-8 JSON where the output takes it


def test_main_writes_to_a_stream_of_any_encoding(tmp_path: Path) -> None:
    """main(out=...) with a stream that cannot take every character works too."""
    store = SQLiteStore(tmp_path / "t.db")
    _odd_names(store)
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="ascii")
    assert main(["--db", store.path, "show", "latest", "--events"], out=out) == 0
    out.flush()
    assert raw.getvalue().decode("ascii").splitlines()[1] == "caf?_u  20 us"


# -- 7. export -o ---------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm", "-link"])
def test_export_refuses_to_write_over_the_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    """``--db x.db export -o x.db`` truncated the database before reading it."""
    db = tmp_path / "t.db"
    with SQLiteStore(db) as store:
        store.write([_span("precious", "a" * 32, "p-1")], [])
    before = db.read_bytes()
    target = tmp_path / ("t.db" + suffix)
    if suffix == "-link":
        target.symlink_to(db)
    assert main(["--db", str(db), "export", "-o", str(target)], out=io.StringIO()) == 2
    err = capsys.readouterr().err
    assert "is the trace database" in err and "give another file" in err
    assert db.read_bytes() == before
    assert "precious" in _run("--db", str(db), "list")


def test_a_failed_export_leaves_the_old_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """export truncated its target at the start: a failure left it empty. It writes a
    file beside it and puts it in place at the end, keeping the target's mode."""
    from instrumentation.storage.base import SQLStore

    store = SQLiteStore(tmp_path / "t.db")
    store.write([_span(f"t{i}", f"{i:032x}", f"r{i}") for i in range(3)], [])
    target = tmp_path / "out" / "traces.jsonl"
    target.parent.mkdir()
    target.write_text("the old export\n")
    target.chmod(0o640)
    real = SQLStore.trace
    calls: list[str] = []

    def failing(self: SQLStore, trace_id: str) -> list[StoredSpan]:
        calls.append(trace_id)
        if len(calls) == 2:
            raise sqlite3.OperationalError("disk I/O error (test)")
        return real(self, trace_id)

    monkeypatch.setattr(SQLStore, "trace", failing)
    assert main(["--db", store.path, "export", "-o", str(target)], out=io.StringIO()) == 2
    assert target.read_text() == "the old export\n"
    assert os.listdir(target.parent) == ["traces.jsonl"]  # nothing left behind
    monkeypatch.setattr(SQLStore, "trace", real)
    assert main(["--db", store.path, "export", "-o", str(target)], out=io.StringIO()) == 0
    assert len(target.read_text().splitlines()) == 3
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert os.listdir(target.parent) == ["traces.jsonl"]


def test_export_over_a_file_where_os_has_no_chown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows has no os.chown: export over an existing file failed there with "cannot
    read the trace database ...: module 'os' has no attribute 'chown'"."""
    store = SQLiteStore(tmp_path / "t.db")
    store.write([_span("t", f"{1:032x}", "r1")], [])
    target = tmp_path / "traces.jsonl"
    target.write_text("the old export\n")
    monkeypatch.delattr(os, "chown")
    assert main(["--db", store.path, "export", "-o", str(target)], out=io.StringIO()) == 0
    assert json.loads(target.read_text())["spans"][0]["name"] == "t"


def test_export_writes_to_a_file_that_is_no_regular_file(tmp_path: Path) -> None:
    """/dev/stdout cannot be replaced: it is written directly."""
    store = SQLiteStore(tmp_path / "t.db")
    store.write([_span("one", "a" * 32, "o-1")], [])
    done = _cli("--db", store.path, "export", "-o", "/dev/stdout")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["trace_id"] == "a" * 32


def test_an_export_that_does_not_find_every_trace_leaves_the_file_as_it_was(
    tmp_path: Path,
) -> None:
    """A trace id that matches nothing (status 1) put an empty file in place of the
    old export, though the docs say a failed export leaves it as it was."""
    store = SQLiteStore(tmp_path / "t.db")
    store.write([_span("one", "a" * 32, "o-1")], [])
    target = tmp_path / "keep.jsonl"
    target.write_text("old\n")
    argv = ["--db", store.path, "export", "aaaa", "deadbeef", "-o", str(target)]
    assert main(argv, out=io.StringIO()) == 1
    assert target.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["keep.jsonl", "t.db", "t.db-shm", "t.db-wal"]


@pytest.mark.parametrize("name", ["/dev/stdout", "-"])
def test_export_to_standard_output_by_name_keeps_what_the_shell_wrote_before(
    tmp_path: Path, name: str
) -> None:
    """``{ echo header; ... export -o /dev/stdout; echo footer; } > out`` kept only the
    export: /dev/stdout was opened again (truncating the file), or replaced by a new
    file; and ``-o -`` wrote a file named "-"."""
    store = SQLiteStore(tmp_path / "t.db")
    store.write([_span("one", "a" * 32, "o-1")], [])
    out = tmp_path / "out.txt"
    script = (
        f"echo header; {sys.executable} -m instrumentation --db {store.path} export "
        f"-o {name}; echo footer"
    )
    subprocess.run(["sh", "-c", f"{{ {script}; }} > {out}"], check=True, cwd=tmp_path)
    lines = out.read_text().splitlines()
    assert lines[0] == "header" and lines[-1] == "footer" and len(lines) == 3
    assert json.loads(lines[1])["trace_id"] == "a" * 32
    assert not (tmp_path / "-").exists()


def test_export_refuses_a_name_ending_in_a_slash(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    store.write([_span("one", "a" * 32, "o-1")], [])
    done = _cli("--db", store.path, "export", "-o", str(tmp_path / "sub") + "/")
    assert done.returncode == 2 and "does not end in /" in done.stderr
    assert not (tmp_path / "sub").exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
def test_export_writes_where_a_user_may_write_the_file_but_not_replace_it() -> None:
    """Written as another user (nobody): a writable file in a folder where that user
    may make no file, and another user's file in a sticky folder (/tmp), were written
    before, and then failed (the second leaving its temporary file behind); a file
    of that user's own that is read-only was replaced. Each now as before."""
    import tempfile

    # Outside pytest's folder, which only root may enter.
    tmp_path = Path(tempfile.mkdtemp(prefix="export-as-nobody-"))
    tmp_path.chmod(0o755)
    store = SQLiteStore(tmp_path / "t.db")
    store.write([_span("one", "a" * 32, "o-1")], [])
    store.close()
    (tmp_path / "t.db").chmod(0o644)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o755)
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    own = tmp_path / "own"
    own.mkdir()
    os.chown(own, 65534, 65534)
    for folder in (locked, sticky):
        (folder / "out.jsonl").write_text("old\n")
        (folder / "out.jsonl").chmod(0o666)
    readonly = own / "ro.jsonl"
    readonly.write_text("old\n")
    os.chown(readonly, 65534, 65534)
    readonly.chmod(0o444)
    as_nobody = (  # imported first: nobody may not read the interpreter's own files
        "import os, sys; from instrumentation.storage.cli import main; "
        "os.setgid(65534); os.setuid(65534); sys.exit(main(sys.argv[1:]))"
    )

    def export(target: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", as_nobody, "--db", store.path, "export", "-o", str(target)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    for folder in (locked, sticky):
        done = export(folder / "out.jsonl")
        assert done.returncode == 0, done.stderr
        assert json.loads((folder / "out.jsonl").read_text())["trace_id"] == "a" * 32
        assert os.listdir(folder) == ["out.jsonl"]  # no temporary file left
    done = export(readonly)
    try:
        assert done.returncode == 2 and "permission denied" in done.stderr
        assert readonly.read_text() == "old\n"
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


# -- 8. one line per trace, control characters escaped -----------------------------------

MULTILINE = "ValidationError: 2 validation errors for M\na\n  Input should be a valid integer"


def test_list_prints_one_line_per_trace_whatever_the_names_and_errors(tmp_path: Path) -> None:
    """An error of many lines took many lines of ``list``, a name with ``\\n`` or
    ``\\x1b[31m`` broke the line or coloured the terminal, a 5,000-character name
    filled the screen; columns did not line up."""
    store = SQLiteStore(tmp_path / "t.db")
    now = time.time()
    store.write(
        [
            _span("parse", "1" * 32, "p-1", error=MULTILINE, start=now - 40),
            _span("tab\tnew\nline\x1b[31mred", "2" * 32, "c-1", start=now - 30),
            _span("L" * 5000, "3" * 32, "l-1", start=now - 20, duration=1e-5),
            _span("ok", "4" * 32, "o-1", start=now - 10, duration=12.5),
        ],
        [],
    )
    lines = _run("--db", store.path, "list").splitlines()
    assert len(lines) == 4
    assert all("\x1b" not in line and "\t" not in line for line in lines)
    ok, long, control, parse = lines
    assert "tab\\tnew\\nline\\x1b[31mred" in control
    assert "ValidationError: 2 validation errors for M …" in parse and "Input" not in parse
    assert "L" * 119 + "…" in long and "L" * 120 not in long
    # Names padded to the widest (up to 48 columns), durations and counts aligned.
    assert ok.index("1 span ") == control.index("1 span ") == parse.index("1 span ")
    shown = _run("--db", store.path, "show", "1" * 8).splitlines()
    assert shown[1:] == ["parse  500.0 ms  ✗ " + MULTILINE.replace("\n", "\\n")]
    shown = _run("--db", store.path, "show", "2" * 8).splitlines()
    assert shown[1:] == ["tab\\tnew\\nline\\x1b[31mred  500.0 ms"]


# -- 9. name and dispatcher filters tell case apart, on both stores ------------------------


def test_name_and_dispatcher_filters_tell_upper_from_lower_case(any_store: Store) -> None:
    """SQLite's LIKE ignored case (so ``--name 'ROOT_*'`` matched ``root_ok`` but
    ``--name ROOT_OK`` did not), PostgreSQL's did not: both tell case apart now."""
    any_store.write(
        [
            _span("root_ok", "1" * 32, "a-1", dispatcher="myapp"),
            _span("Root_Other", "2" * 32, "b-1", dispatcher="MyApp.sub"),
        ],
        [],
    )

    def names(**filters: Any) -> list[str]:
        return sorted(t.name or "" for t in any_store.traces(**filters))

    assert names(name="ROOT_*") == [] and names(name="ROOT_OK") == []
    assert names(name="root_*") == ["root_ok"] and names(name="Root_*") == ["Root_Other"]
    assert names(name="*_o*") == ["root_ok"]
    assert names(dispatcher="MYAPP") == [] and names(dispatcher="myapp") == ["root_ok"]
    assert names(dispatcher="MyApp") == ["Root_Other"]
    db = _db(any_store)
    if isinstance(any_store, SQLiteStore):
        with SQLiteStore(db, read_only=True) as reader:  # its own connection
            assert [t.name for t in reader.traces(name="ROOT_*")] == []
    assert _run("--db", db, "list", "--name", "ROOT_*") == "(no traces)\n"
    assert "root_ok" in _run("--db", db, "list", "--name", "root_*")
    assert _run("--db", db, "list", "--dispatcher", "MYAPP") == "(no traces)\n"


# -- 10. out-of-range times and limits --------------------------------------------------


@pytest.mark.parametrize(
    ("command", "option", "value", "says"),
    [
        ("list", "--since", "99999999d", "out of range"),
        ("list", "--since", "9" * 400 + "d", "out of range"),
        ("list", "--until", "9999-12-31", "out of range"),
        ("export", "--until", "9999-12-31T23:59:59+00:00", "out of range"),
        ("list", "--limit", "99999999999999999999", "up to 9223372036854775807"),
        ("export", "--limit", str(2**63), "up to 9223372036854775807"),
        ("tail", "--count", "1" * 30, "up to 9223372036854775807"),
    ],
)
def test_out_of_range_times_and_limits_are_argument_errors(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    option: str,
    value: str,
    says: str,
) -> None:
    """They gave an OverflowError traceback, "invalid _when value", or blamed the
    database: each is one line naming the option, with status 2."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        SQLiteStore(tmp_path / "t.db").close()
        with pytest.raises(SystemExit) as info:
            main(["--db", str(tmp_path / "t.db"), command, option, value], out=io.StringIO())
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {option}" in err and says in err and "Traceback" not in err


@pytest.mark.parametrize("zone", ["UTC", "Asia/Tokyo", "America/St_Johns"])
def test_times_at_the_ends_of_the_range_still_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zone: str
) -> None:
    """``--since 0001-01-01`` was refused as out of range, in UTC too: Python's local
    time of the calendar's first days fails in the C library."""
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    store = SQLiteStore(tmp_path / "t.db")
    store.write([_span("one", "a" * 32, "o-1")], [])
    try:
        assert "one" in _run("--db", store.path, "list", "--since", "0001-01-01")
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert "one" in _run("--db", store.path, "list", "--since", "0001-01-03")
    assert "one" in _run("--db", store.path, "list", "--until", "9999-12-30", "--limit", "1")
    assert "one" in _run("--db", store.path, "list", "--limit", str(2**63 - 1))


def test_a_limit_too_large_for_the_database_is_a_value_error(any_store: Store) -> None:
    with pytest.raises(ValueError, match="2\\*\\*63 - 1"):
        any_store.traces(limit=2**63)
    with pytest.raises(ValueError, match="2\\*\\*63 - 1"):
        any_store.events(limit=2**63)


# -- 11. the rest -------------------------------------------------------------------------


def test_small_costs_show_their_significant_digits() -> None:
    assert _cost(0.000023) == "$0.000023"
    assert _cost(0.0000234) == "$0.000023"
    assert _cost(0.00042) == "$0.00042"
    assert _cost(0.001) == "$0.001"
    assert _cost(0.5) == "$0.5000"
    assert _cost(12.3456789) == "$12.3457"
    # Unknown (no price) shows nothing; known to be nothing (priced at zero) says so.
    assert _cost(None) == ""
    assert _cost(0.0) == _cost(0) == "$0"


def test_show_events_leaves_out_the_tags_the_metadata_shows(
    any_store: Store, make_handler: Any
) -> None:
    """Every event of a request carried tags={'user': ..., 'session': ...}, which took
    up the line: the metadata is shown once, above the tree."""

    @d.span
    def step() -> None:
        d.event(NoteEvent(text="hello"))

    handler = make_handler(any_store, metadata={"application": "demo"}).attach(d)
    with metadata(user="alice", session="s1"):
        step()
    assert handler.flush(10)
    handler.detach()
    lines = _run("--db", _db(any_store), "show", "latest", "--events").splitlines()
    assert lines[0].endswith("  application=demo  user=alice  session=s1")
    (event,) = [line for line in lines if "NoteEvent" in line]
    assert "tags=" not in event and "text='hello'" in event


@pytest.mark.parametrize("command", [["show", ""], ["show", "  "], ["export", ""]])
def test_an_empty_trace_id_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """``show ""`` (an unset shell variable) showed a trace or said "several traces
    start with ''": it is an argument error."""
    store = SQLiteStore(tmp_path / "t.db")
    store.write([_span("one", "a" * 32, "o-1")], [])
    with pytest.raises(SystemExit) as info:
        main(["--db", store.path, *command], out=io.StringIO())
    assert info.value.code == 2
    assert "give a trace id or a prefix of one" in capsys.readouterr().err


def test_an_upper_case_id_says_ids_are_lower_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    store.write([_span("one", "ab" * 16, "o-1")], [])
    assert main(["--db", store.path, "show", "AB"], out=io.StringIO()) == 1
    assert "trace ids are lower case (try 'ab')" in capsys.readouterr().err


def test_export_into_a_pipe_that_closes_stops_with_141_however_long_the_line(
    tmp_path: Path,
) -> None:
    """A line longer than the pipe holds was cut short without an error when the
    reader went away (Python drops the rest of a long write), and export exited 0."""
    store = SQLiteStore(tmp_path / "t.db")
    blob = {"blob": "x" * 2000}
    store.write(
        [_span("big", "b" * 32, "b-0", attributes=blob)]
        + [_span("c", "b" * 32, f"b-{i}", parent="b-0", attributes=blob) for i in range(1, 3000)],
        [],
    )
    store.close()
    for command in (["export"], ["show", "latest", "--json"]):
        reader = subprocess.Popen(
            [sys.executable, "-m", "instrumentation", "--db", store.path, *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        assert reader.stdout is not None and reader.stderr is not None
        assert len(reader.stdout.read(100)) == 100
        reader.stdout.close()
        err = reader.stderr.read().decode()
        reader.stderr.close()
        assert reader.wait(60) == 141, (command, err)
        assert err == ""


def test_format_trace_draws_branches_in_start_order_and_orphans_as_roots() -> None:
    """The drawing SimpleSpanHandler makes too (instrumentation.tree.draw_tree)."""
    t = datetime.now(timezone.utc)
    shape = {"r": None, "a": "r", "b": "r", "a1": "a", "a2": "a", "b1": "b", "x": "gone"}
    spans = [
        StoredSpan(i, "t", p, i, "d", t + timedelta(seconds=n), t, 0.0, "ok")
        for n, (i, p) in enumerate(shape.items())
    ]
    assert format_trace(spans).splitlines() == [
        "r  0 µs",
        "├── a  0 µs",
        "│   ├── a1  0 µs",
        "│   └── a2  0 µs",
        "└── b  0 µs",
        "    └── b1  0 µs",
        "x  0 µs",
    ]
