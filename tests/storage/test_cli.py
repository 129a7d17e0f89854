"""The command line: list, show, tail and export, on SQLite and PostgreSQL."""

from __future__ import annotations

import errno
import io
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from instrumentation import get_dispatcher
from instrumentation.__main__ import main as module_main
from instrumentation.storage import (
    NotATraceDatabaseError,
    SchemaVersionError,
    SQLiteStore,
    StorageHandler,
    Store,
    database_target,
    open_store,
)
from instrumentation.storage.cli import main

from .helpers import CountingTime, FakeLLMEndEvent, NoteEvent, Usage, wait_until

d = get_dispatcher("tests.storage.cli")


@d.span
def pipeline() -> None:
    step()
    try:
        failing_step()
    except RuntimeError:
        pass


@d.span
def step() -> None:
    d.event(FakeLLMEndEvent(model="m-cli", usage=Usage(7, 3), cost_usd=0.5))


@d.span
def failing_step() -> None:
    raise RuntimeError("tool broke")


def _db_arg(store: Store) -> str:
    return store.path if isinstance(store, SQLiteStore) else store.dsn  # type: ignore[attr-defined]


def _run(*argv: str) -> str:
    out = io.StringIO()
    assert main(list(argv), out=out) == 0
    return out.getvalue()


def test_list_show_and_export(any_store: Store, make_handler: Any, tmp_path: Path) -> None:
    """list prints summaries; show prints the tree with durations, tokens and errors."""
    handler = make_handler(any_store).attach(d)
    pipeline()
    assert handler.flush(10)
    db = _db_arg(any_store)
    listed = _run("--db", db, "list")
    (line,) = listed.splitlines()
    trace_id = any_store.traces()[0].trace_id
    assert trace_id in line and "pipeline" in line and "3 spans" in line and "10 tok" in line
    shown = _run("--db", db, "show", trace_id[:10])
    lines = shown.splitlines()
    assert lines[0] == f"trace {trace_id}"
    assert lines[1].startswith("pipeline  ")
    assert lines[2].startswith("├── step  ") and "m-cli" in lines[2] and "10 tok" in lines[2]
    assert lines[2].endswith("$0.5000")
    assert lines[3].startswith("└── failing_step  ") and "✗ RuntimeError: tool broke" in lines[3]
    assert _run("--db", db, "show", "latest") == shown
    with_events = _run("--db", db, "show", "latest", "--events")
    assert "· FakeLLMEndEvent  " in with_events and "cost_usd=0.5" in with_events  # fields too
    assert "· SpanDropEvent  ✗ RuntimeError: tool broke\n" in with_events  # its error: once
    out_file = tmp_path / "out.jsonl"
    _run("--db", db, "export", "--output", str(out_file))
    (record,) = [json.loads(x) for x in out_file.read_text().splitlines()]
    assert record["trace_id"] == trace_id and len(record["spans"]) == 3
    assert record["roots"] == [any_store.traces()[0].root_span_id]
    assert any(e["total_tokens"] == 10 for s in record["spans"] for e in s["events"])
    assert _run("--db", db, "list", "--status", "error") == "(no traces)\n"


def test_show_unknown_trace_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    SQLiteStore(tmp_path / "e.db").close()
    assert main(["--db", str(tmp_path / "e.db"), "show", "abc"]) == 1
    assert "no single trace matches" in capsys.readouterr().err


def test_export_of_an_unknown_trace_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    SQLiteStore(tmp_path / "e.db").close()
    out = io.StringIO()
    assert main(["--db", str(tmp_path / "e.db"), "export", "deadbeef"], out=out) == 1
    assert out.getvalue() == ""
    assert "no single trace matches 'deadbeef'" in capsys.readouterr().err


def test_memory_database_and_output_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """':memory:' is a database that needs no file; an output file that cannot be
    written is reported as such, not blamed on the database."""
    out = io.StringIO()
    assert main(["--db", ":memory:", "list"], out=out) == 0
    assert "(no traces)" in out.getvalue()
    SQLiteStore(tmp_path / "t.db").close()
    target = tmp_path / "no-such-dir" / "out.jsonl"
    assert main(["--db", str(tmp_path / "t.db"), "export", "-o", str(target)]) == 2
    err = capsys.readouterr().err
    assert "out.jsonl" in err and "trace database" not in err


@pytest.mark.parametrize("command", [["list"], ["show", "latest"], ["export"]])
def test_a_missing_database_is_an_error_and_is_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """A mistyped path must not look like an empty store."""
    typo = tmp_path / "typo.db"
    assert main(["--db", str(typo), *command], out=io.StringIO()) == 2
    assert "no trace database at" in capsys.readouterr().err
    assert not typo.exists()


def test_the_command_line_and_open_store_pick_the_same_default_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --db: $INSTRUMENTATION_DB, then instrumentation.db, as open_store()."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("INSTRUMENTATION_DB", raising=False)
    assert database_target() == "instrumentation.db"
    assert main(["list"], out=io.StringIO()) == 2
    assert "no trace database at 'instrumentation.db'" in capsys.readouterr().err
    open_store().close()  # opened for writing: made
    assert _run("list") == "(no traces)\n"
    monkeypatch.setenv("INSTRUMENTATION_DB", str(tmp_path / "env.db"))
    assert database_target() == str(tmp_path / "env.db") == database_target(tmp_path / "env.db")
    assert main(["list"], out=io.StringIO()) == 2
    assert f"no trace database at {str(tmp_path / 'env.db')!r}" in capsys.readouterr().err
    assert not (tmp_path / "env.db").exists()
    open_store().close()
    assert (tmp_path / "env.db").exists() and _run("list") == "(no traces)\n"


def test_tail_follows_new_traces(tmp_path: Path, make_handler: Any) -> None:
    """tail prints the traces that finish after it starts, not those that finished
    before (--lookback is 0 by default), and stops after --count of them."""
    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(store).attach(d)
    pipeline()  # before tail: not shown
    assert handler.flush(10)
    (before,) = store.traces()
    tail = ["tail", "--interval", "0.05", "--count", "2", "--max-seconds", "60"]
    follower = subprocess.Popen(
        [sys.executable, "-m", "instrumentation", "--db", store.path, *tail],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        started = follower.stderr.readline() if follower.stderr else ""
        assert started.startswith("following traces that end after"), started
        for _ in range(2):
            pipeline()
        assert handler.flush(10)
        out, err = follower.communicate(timeout=60)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.communicate()
    assert follower.returncode == 0, err
    after = {t.trace_id for t in store.traces()} - {before.trace_id}
    lines = out.splitlines()
    assert before.trace_id not in out
    assert len(lines) == 2 and all("pipeline" in x for x in lines)
    assert {x.split()[2] for x in lines} == after and len(after) == 2


def test_tail_lookback_also_shows_traces_that_ended_that_long_before(tmp_path: Path) -> None:
    """A trace that ended a minute before tail started is shown with --lookback 3600,
    not with --lookback 30; one that ended years before is not shown (tail shows the
    traces oldest first: it would come first)."""
    from instrumentation.storage.serialise import RowMaker

    store = SQLiteStore(tmp_path / "t.db")
    maker = RowMaker({}, {}, 1000)
    for name, start in [("long_ago", 1.7e9), ("a_minute_ago", time.time() - 61)]:
        info = (start, 0.0, None, True, name, name.ljust(32, "0"), "app", None, None, None)
        store.write([maker.span_row((info, name + "-1", 1.0, None))], [])
    tail = ["--db", store.path, "tail", "--interval", "0.05", "--lookback"]
    out = _run(*tail, "3600", "--count", "1", "--max-seconds", "20")
    assert "a_minute_ago" in out and "long_ago" not in out
    assert _run(*tail, "30", "--max-seconds", "0.2") == ""


def test_tail_stops_after_max_seconds(tmp_path: Path) -> None:
    SQLiteStore(tmp_path / "t.db").close()
    started = time.monotonic()
    assert (
        main(
            ["--db", str(tmp_path / "t.db"), "tail", "--interval", "0.05", "--max-seconds", "0.3"],
            out=io.StringIO(),
        )
        == 0
    )
    assert time.monotonic() - started < 5


def test_python_dash_m_instrumentation(tmp_path: Path, make_handler: Any) -> None:
    """The module entry point and main() run the same CLI."""
    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(store).attach(d)
    pipeline()
    assert handler.flush(10)
    done = subprocess.run(
        [sys.executable, "-m", "instrumentation", "--db", store.path, "show", "latest"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "└── failing_step" in done.stdout
    assert module_main(["--db", store.path, "list"]) == 0


def test_bad_arguments_exit_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    SQLiteStore(tmp_path / "t.db").close()
    with pytest.raises(SystemExit):
        main(["--db", str(tmp_path / "t.db"), "list", "--since", "yesterday-ish"])
    assert "not a time" in capsys.readouterr().err
    assert main(["--db", str(tmp_path / "t.db"), "list", "--meta", "colour=red"]) == 2


def test_format_traces_reads_back_oldest_first(tmp_path: Path) -> None:
    """storage.format_traces() prints each recent trace's summary and tree (the demo's view)."""
    from instrumentation import storage

    with storage.record_to(tmp_path / "demo.db", dispatcher=d, debounce=0.01) as recorder:
        pipeline()
        step()
    text = storage.format_traces(recorder.store)
    blocks = text.split("\n\n")
    assert len(blocks) == 2
    assert "pipeline" in blocks[0].splitlines()[0] and "└── failing_step" in blocks[0]
    assert blocks[1].splitlines()[1].startswith("step  ")
    assert storage.format_traces(storage.SQLiteStore(tmp_path / "empty.db")) == "(no traces)"


def test_open_store_picks_the_backend(tmp_path: Path, postgres_dsn: str) -> None:
    """A DSN opens PostgreSQL, anything else a SQLite file."""
    from instrumentation import storage
    from instrumentation.storage.postgres import PostgresStore

    with storage.open_store(tmp_path / "x.db") as sqlite_store:
        assert isinstance(sqlite_store, SQLiteStore)
    with storage.open_store(postgres_dsn) as pg_store:
        assert isinstance(pg_store, PostgresStore)
        assert "password" not in pg_store.spool_key
    with pytest.raises(TypeError, match="connection string"):
        PostgresStore("")


def test_a_database_that_cannot_be_reached_is_an_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dsn = f"postgresql://nobody@127.0.0.1:{port}/traces?connect_timeout=1"
    assert main(["--db", dsn, "list"], out=io.StringIO()) == 2
    assert "cannot read the trace database" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("address", "shown"),
    [
        ("postgresql://app:s3cret-pw@127.0.0.1:{port}/t", "postgresql://app:***@127.0.0.1"),
        ("postgresql://app@127.0.0.1:{port}/t?password=s3cret-pw", "?password=***"),
        ("host=127.0.0.1 port={port} dbname=t password=s3cret-pw", "password=***"),
        ("host=127.0.0.1 port={port} dbname=t password='s3cret-pw x'", "password=***"),
        ("mysql://app:s3cret-pw@db/t", "mysql://app:***@db/t"),
        ("host=127.0.0.1 port={port} dbname=t sslpassword=s3cret-pw", "sslpassword=***"),
        ("postgresql://app@127.0.0.1:{port}/t?sslpassword=s3cret-pw", "?sslpassword=***"),
        ("postgresql://app:pw@127.0.0.1:{port}/t?SSLPassword=s3cret-pw", "SSLPassword=***"),
    ],
)
def test_a_password_never_reaches_the_terminal(
    capsys: pytest.CaptureFixture[str], address: str, shown: str
) -> None:
    """Errors name the database, and stderr lines end up in CI logs: without the password."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main(["--db", address.format(port=port), "list"], out=io.StringIO()) == 2
    err = capsys.readouterr().err
    assert shown in err
    assert "s3cret" not in err


def _sqlite_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("kind", ["application database", "empty file", "not sqlite"])
@pytest.mark.parametrize("command", [["list"], ["show", "latest"], ["export"], ["tail"]])
def test_reading_never_turns_another_file_into_a_trace_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, command: list[str]
) -> None:
    """An application's own SQLite file, an empty file or any other file is refused
    with exit status 2 and a reason, and left byte for byte as it was."""
    folder = tmp_path / "data"
    folder.mkdir()
    target = folder / "app.db"
    if kind == "application database":
        with sqlite3.connect(target) as conn:
            conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
            conn.execute("INSERT INTO users (name) VALUES ('alice')")
        conn.close()
    elif kind == "empty file":
        target.write_bytes(b"")
    else:
        target.write_text("name,age\nalice,42\n")
    before = _sqlite_files(folder)
    assert (
        main(
            [
                "--db",
                str(target),
                *command,
                *(["--max-seconds", "0.1"] if command == ["tail"] else []),
            ],
            out=io.StringIO(),
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "is not a trace database" in err and "nothing was changed" in err
    assert _sqlite_files(folder) == before  # no tables, no journal files, no -wal/-shm


def test_an_older_trace_schema_is_refused_not_migrated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command line does not migrate: a trace database of an older schema version
    is an error saying how to migrate it; a store opened for writing migrates it."""
    path = tmp_path / "old.db"
    SQLiteStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM schema_version")
        conn.execute("INSERT INTO schema_version (version) VALUES (0)")
    conn.close()
    assert main(["--db", str(path), "list"], out=io.StringIO()) == 2
    err = capsys.readouterr().err
    assert "older than the version this release reads" in err and "open it once for writing" in err
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(0,)]
    conn.close()
    with pytest.raises(SchemaVersionError, match="older"):
        SQLiteStore(path, read_only=True)
    SQLiteStore(path).close()  # opened for writing: migrated
    assert _run("--db", str(path), "list") == "(no traces)\n"


def test_a_read_only_store_reads_and_refuses_to_write(tmp_path: Path, make_handler: Any) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(store).attach(d)
    pipeline()
    assert handler.flush(10)
    reader = open_store(tmp_path / "t.db", read_only=True)
    assert reader.read_only and [t.name for t in reader.traces()] == ["pipeline"]
    with pytest.raises(PermissionError, match="read_only=True"):
        reader.write([], [])
    with pytest.raises(ValueError, match="read_only"):
        make_handler(reader)
    with pytest.raises(FileNotFoundError, match="never creates one"):
        SQLiteStore(tmp_path / "missing.db", read_only=True)
    (tmp_path / "empty.db").touch()
    with pytest.raises(NotATraceDatabaseError, match="no schema_version, spans, events tables"):
        SQLiteStore(tmp_path / "empty.db", read_only=True)
    assert not (tmp_path / "missing.db").exists()


def test_reading_a_postgres_database_creates_no_tables(
    postgres_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """On PostgreSQL too the command line only reads: a database without the trace
    tables is refused (status 2) and gets none; a trace database is read as usual."""
    import psycopg

    def tables() -> list[str]:
        with psycopg.connect(postgres_dsn) as conn:
            rows = conn.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = 'public' ORDER BY 1"
            ).fetchall()
        return [r[0] for r in rows]

    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE users (id INTEGER)")
    assert main(["--db", postgres_dsn, "list"], out=io.StringIO()) == 2
    assert "is not a trace database" in capsys.readouterr().err
    assert tables() == ["users"]
    from instrumentation.storage.postgres import PostgresStore

    PostgresStore(postgres_dsn).close()  # a writer's store makes the tables
    assert _run("--db", postgres_dsn, "list") == "(no traces)\n"
    reader = PostgresStore(postgres_dsn, read_only=True)
    with pytest.raises(PermissionError):
        reader.write([], [])
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        reader._query("CREATE TABLE sneaky (id INTEGER)", [])
    reader.close()
    assert tables() == ["events", "schema_version", "spans", "users"]


_CRASHING_WRITER = """
import os, sys
from instrumentation.storage import SQLiteStore
from instrumentation.storage.serialise import RowMaker
store = SQLiteStore(sys.argv[1])
maker = RowMaker({}, {}, 10_000)
info = (1.7e9, 0.0, None, True, "crashed", "c" * 32, "app", None, None, None)
store.write([maker.span_row((info, "crashed-1", 0.5, None))], [])
os._exit(0)  # no close: the row is only in the -wal file
"""


def test_reading_what_a_crashed_writer_left_changes_no_file(tmp_path: Path) -> None:
    """A writer that crashed leaves rows in the -wal file; the command line reads them
    and leaves the database and the -wal file as they were (a read-write connection
    would copy the WAL into the database and remove it on closing)."""
    path = tmp_path / "t.db"
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", _CRASHING_WRITER, str(path)], check=True, cwd=root)
    wal = tmp_path / "t.db-wal"
    before = {p: p.read_bytes() for p in (path, wal)}
    assert before[wal]  # the row is there, not yet in the database file
    assert "crashed" in _run("--db", str(path), "list")
    assert "crashed" in _run("--db", str(path), "show", "latest")
    assert {p: p.read_bytes() for p in (path, wal)} == before


def test_a_wal_database_in_a_folder_the_reader_cannot_write(tmp_path: Path) -> None:
    """Reading a WAL database needs -wal and -shm files SQLite cannot make in a folder
    the reader may not write: with no -wal there (every row is in the file) it is
    read all the same, and nothing is made."""
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "t.db"
    store = SQLiteStore(path)
    maker_info = (1.7e9, 0.0, None, True, "kept", "k" * 32, "app", None, None, None)
    from instrumentation.storage.serialise import RowMaker

    store.write([RowMaker({}, {}, 1000).span_row((maker_info, "kept-1", 0.5, None))], [])
    store.close()
    if os.geteuid() == 0:  # root writes anywhere, except where the folder is immutable
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("chattr +i is not available here")
        undo = ["chattr", "-i", str(folder)]
    else:
        os.chmod(path, 0o444)
        os.chmod(folder, 0o555)
        undo = ["chmod", "755", str(folder)]
    try:
        assert sorted(os.listdir(folder)) == ["t.db"]
        out = io.StringIO()
        assert main(["--db", str(path), "list"], out=out) == 0, out.getvalue()
        assert "kept" in out.getvalue()
        reader = SQLiteStore(path, read_only=True)
        assert [t.name for t in reader.traces()] == ["kept"]
        assert [s.name for s in reader.trace("k" * 32)] == ["kept"]
        reader.close()
        assert sorted(os.listdir(folder)) == ["t.db"]
    finally:
        subprocess.run(undo, check=True)


def test_show_latest_on_a_database_with_no_traces_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    SQLiteStore(tmp_path / "e.db").close()
    assert main(["--db", str(tmp_path / "e.db"), "show", "latest"]) == 1
    err = capsys.readouterr().err
    assert "no traces yet" in err and "matches" not in err


def test_meta_without_a_value_is_an_argument_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit status 2, like every other bad argument."""
    SQLiteStore(tmp_path / "t.db").close()
    with pytest.raises(SystemExit) as info:
        main(["--db", str(tmp_path / "t.db"), "list", "--meta", "user"])
    assert info.value.code == 2
    assert "--meta" in capsys.readouterr().err


def test_a_closed_pipe_ends_output_quietly(tmp_path: Path) -> None:
    """`show latest --json | head`: the reader went away; no traceback, no error line,
    the status a shell reports for SIGPIPE."""
    with storage_record(tmp_path / "t.db"):
        for _ in range(3):
            pipeline()
    command = [sys.executable, "-m", "instrumentation", "--db", str(tmp_path / "t.db")]
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write into the pipe now fails with EPIPE
    try:
        done = subprocess.run(
            [*command, "show", "latest", "--json"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert done.stderr == ""
    assert done.returncode == 141


class _ReaderGone(io.StringIO):
    """Standard output on Windows once a pipe's reader has gone: writes fail with
    ``OSError(EINVAL)``, not ``BrokenPipeError``."""

    def write(self, text: str) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")


@pytest.mark.parametrize("windows", [True, False])
def test_a_closed_pipe_on_windows_ends_output_quietly_too(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    windows: bool,
) -> None:
    """On Windows the same ``| more`` gives EINVAL: quiet, 141. Elsewhere EINVAL is a
    real error and is reported."""
    from instrumentation.storage import cli

    with storage_record(tmp_path / "t.db"):
        pipeline()
    errnos = (errno.EPIPE, errno.EINVAL) if windows else (errno.EPIPE,)
    monkeypatch.setattr(cli, "_READER_GONE", errnos)
    status = main(["--db", str(tmp_path / "t.db"), "show", "latest"], out=_ReaderGone())
    err = capsys.readouterr().err
    if windows:
        assert (status, err) == (141, "")
    else:
        assert status == 2
        assert "Invalid argument" in err


def storage_record(path: Path) -> Any:
    from instrumentation import storage

    return storage.record_to(path, dispatcher=d, debounce=0.01)


@pytest.mark.parametrize(
    ("address", "says"),
    [
        ("adir", "is a folder"),
        ("http://example.com/x", "http:// is not supported"),
        ("mysql://u@h/db", "mysql:// is not supported"),
        ("", "no trace database named"),
    ],
)
def test_an_address_that_is_no_database_is_one_clear_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    address: str,
    says: str,
) -> None:
    """Exit 2 with one line that names the address; --db "" is not the default."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("INSTRUMENTATION_DB", raising=False)
    (tmp_path / "adir").mkdir()
    with storage_record(tmp_path / "instrumentation.db"):
        pipeline()  # the default database exists and has a trace
    out = io.StringIO()
    assert main(["--db", address, "list"], out=out) == 2
    err = capsys.readouterr().err
    assert out.getvalue() == ""
    assert len(err.strip().splitlines()) == 1 and says in err
    assert (address or "''") in err
    if address != "adir":
        assert "postgresql://" in err


def test_the_command_line_closes_its_store(tmp_path: Path) -> None:
    """The read-only store is closed when the command ends: SQLite's -wal and -shm
    files, made to read, are gone again."""
    db = tmp_path / "t.db"
    with storage_record(db):
        pipeline()
    assert not Path(str(db) + "-wal").exists()
    assert "pipeline" in _run("--db", str(db), "show", "latest")
    assert not Path(str(db) + "-wal").exists() and not Path(str(db) + "-shm").exists()


def _write_roots(store: Store, ends: list[tuple[str, float]]) -> None:
    """One finished root span (a trace) per ``(name, end time)``, named after its index."""
    from instrumentation.storage.serialise import RowMaker

    maker = RowMaker({}, {}, 1000)
    rows = []
    for name, end in ends:
        info = (end - 0.5, 0.0, None, True, name, name.ljust(32, "0"), "app", None, None, None)
        rows.append(maker.span_row((info, f"{name}-root", 0.5, None)))
    store.write(rows, [])


class _Lines(io.StringIO):
    """Output that another thread may count the lines of meanwhile."""

    def lines(self) -> list[str]:
        return self.getvalue().splitlines()


def test_tail_keeps_up_with_thousands_of_traces_a_minute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tail read at most 1000 traces from 60 s before the last one shown: with 3000
    ending within a minute it showed the first 1000 and never got past them. It pages
    from its position now (here many traces end at the same moment, or a fraction of a
    microsecond apart), and reading the last minute again shows none twice."""
    from instrumentation.storage import cli

    monkeypatch.setattr(cli, "_RECHECK_EVERY", 0.0, raising=False)  # read it again each poll
    counting = CountingTime()
    monkeypatch.setattr(cli, "time", counting)
    store = SQLiteStore(tmp_path / "t.db")
    now = time.time()
    names = [f"t{i:04d}" for i in range(3000)]
    _write_roots(store, [(n, now - 55.123456789 + (i // 10) * 0.0183) for i, n in enumerate(names)])
    out = _Lines()
    result: list[int] = []
    args = ["--db", store.path, "tail", "--interval", "0.01", "--lookback", "120"]
    follower = threading.Thread(
        target=lambda: result.append(
            main([*args, "--count", "3001", "--max-seconds", "60"], out=out)
        )
    )
    follower.start()
    try:
        assert wait_until(lambda: len(out.lines()) >= 3000, 30), len(out.lines())
        seen_at = counting.pauses
        assert wait_until(lambda: counting.pauses >= seen_at + 3, 30)  # three more polls
        _write_roots(store, [("marker", time.time())])
    finally:
        follower.join(60)
    assert result == [0]
    lines = out.lines()
    assert len(lines) == 3001 and "marker" in lines[-1]
    shown = [line.split()[3] for line in lines[:-1]]
    assert sorted(shown) == names


def test_tail_remembers_a_bounded_number_of_traces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What tail has shown (to show nothing twice) stays within its bound, at any
    rate; it forgets the oldest first, and then no longer reads back that far."""
    from instrumentation.storage import cli

    monkeypatch.setattr(cli, "_REMEMBER", 1000)
    monkeypatch.setattr(cli, "_PAGE", 100)
    monkeypatch.setattr(cli, "_RECHECK_EVERY", 0.0)
    store = SQLiteStore(tmp_path / "t.db")
    now = time.time()
    names = [f"t{i:04d}" for i in range(3000)]
    _write_roots(store, [(n, now - 55 + i * 0.0183) for i, n in enumerate(names)])
    follower = cli._Follower(store, datetime.now(timezone.utc) - timedelta(seconds=120))
    shown = []
    most = 0
    for _ in range(3):  # the first poll shows them all, those after show none again
        for summary in follower.new_traces():
            shown.append(summary.root_span_id)
            most = max(most, follower.remembered)
    assert shown == [f"{n}-root" for n in names]
    assert most == 1000 and follower.remembered <= 1000
    # A trace that reaches the database late is shown if it ended after the oldest
    # one remembered, not before (it could be one already shown and forgotten).
    _write_roots(store, [("late", now - 55 + 2500 * 0.0183 + 0.001), ("too_late", now - 50)])
    assert [s.name for s in follower.new_traces()] == ["late"]
    assert list(follower.new_traces()) == []


def test_tail_shows_a_trace_that_reaches_the_database_late(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trace that ended up to 60 s before the last one shown, but is stored only
    after it, is still shown, once; one that ended earlier than that is not."""
    from instrumentation.storage import cli

    monkeypatch.setattr(cli, "_RECHECK_EVERY", 0.0)
    store = SQLiteStore(tmp_path / "t.db")
    now = time.time()
    follower = cli._Follower(store, datetime.now(timezone.utc) - timedelta(seconds=120))
    _write_roots(store, [("first", now - 5)])
    assert [s.name for s in follower.new_traces()] == ["first"]
    _write_roots(store, [("late", now - 50), ("too_late", now - 70), ("next", now - 1)])
    assert [s.name for s in follower.new_traces()] == ["late", "next"]
    assert list(follower.new_traces()) == []
    assert follower.remembered == 3


def test_tail_gets_past_more_traces_than_it_remembers_that_ended_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where more traces than it remembers end at the same moment, tail forgets some of
    them before it has read the others: it reads on from the last one read, so it
    neither skips the others nor shows the forgotten ones again."""
    from instrumentation.storage import cli

    monkeypatch.setattr(cli, "_REMEMBER", 100)
    monkeypatch.setattr(cli, "_PAGE", 10)
    monkeypatch.setattr(cli, "_RECHECK_EVERY", 0.0)
    store = SQLiteStore(tmp_path / "t.db")
    end = time.time() - 30.123456789
    names = [f"t{i:04d}" for i in range(1000)]
    _write_roots(store, [(n, end) for n in names])
    follower = cli._Follower(store, datetime.now(timezone.utc) - timedelta(seconds=120))
    shown = []
    for _ in range(3):
        for summary in follower.new_traces():
            shown.append(summary.name)
            assert follower.remembered <= 100
    assert shown == names
    _write_roots(store, [("then", end + 1e-7), ("later", end + 20)])
    assert [s.name for s in follower.new_traces()] == ["then", "later"]
    assert list(follower.new_traces()) == []


@pytest.mark.parametrize(
    ("command", "option", "value"),
    [
        ("tail", "--interval", "inf"),
        ("tail", "--interval", "nan"),
        ("tail", "--interval", "-1"),
        ("tail", "--interval", "0"),
        ("tail", "--max-seconds", "-2"),
        ("tail", "--count", "0"),
        ("tail", "--count", "-5"),
        ("list", "--limit", "0"),
        ("list", "--min-duration", "-1"),
        ("list", "--min-duration", "nan"),
        ("export", "--limit", "-3"),
    ],
)
def test_number_options_are_checked_and_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, option: str, value: str
) -> None:
    """A bad number is an argument error (status 2) naming the option, before any
    reading starts, not a database error or a silent default."""
    SQLiteStore(tmp_path / "t.db").close()
    with pytest.raises(SystemExit) as info:
        main(["--db", str(tmp_path / "t.db"), command, option, value])
    assert info.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err


def test_db_may_come_after_the_command(tmp_path: Path, make_handler: Any) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(store).attach(d)
    pipeline()
    assert handler.flush(10)
    handler.detach()
    db = str(tmp_path / "t.db")
    assert _run("list", "--db", db) == _run("--db", db, "list")
    assert "pipeline" in _run("show", "latest", "--db", db)


def test_a_meta_key_given_twice_with_two_values_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    SQLiteStore(tmp_path / "t.db").close()
    db = str(tmp_path / "t.db")
    assert main(["--db", db, "list", "--meta", "user=a", "--meta", "user=b"]) == 2
    assert "given twice" in capsys.readouterr().err
    assert main(["--db", db, "list", "--meta", "user=a", "--meta", "user=a"]) == 0


def test_times_without_an_offset_are_local_as_list_prints_them(
    tmp_path: Path, make_handler: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start time copied from ``list`` (local time) selects that trace in --until."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        store = SQLiteStore(tmp_path / "t.db")
        handler = make_handler(store).attach(d)
        pipeline()
        assert handler.flush(10)
        handler.detach()
        db = str(tmp_path / "t.db")
        line = _run("--db", db, "list").splitlines()[0]
        shown = datetime.strptime(line[:19], "%Y-%m-%d %H:%M:%S")
        after = (shown + timedelta(minutes=1)).isoformat()
        before = (shown - timedelta(minutes=1)).isoformat()
        assert "pipeline" in _run("--db", db, "list", "--until", after)
        assert "pipeline" not in _run("--db", db, "list", "--until", before)
        assert "pipeline" in _run("--db", db, "list", "--since", before)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_a_trace_whose_root_succeeded_is_ok_with_its_failures_counted(
    tmp_path: Path, make_handler: Any
) -> None:
    """``list`` shows a trace's outcome as --status selects it (its root's), and the
    spans that failed inside it beside that."""
    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(store).attach(d)
    pipeline()  # failing_step raises inside, pipeline catches it
    assert handler.flush(10)
    handler.detach()
    db = str(tmp_path / "t.db")
    line = _run("--db", db, "list").splitlines()[0]
    assert "ok (1 span failed inside)" in line and "✗" not in line
    assert "pipeline" in _run("--db", db, "list", "--status", "ok")
    assert "pipeline" not in _run("--db", db, "list", "--status", "error")


def test_a_generator_closed_early_is_stored_as_ok(tmp_path: Path, make_handler: Any) -> None:
    """A caller that stops reading a traced generator (``break``) did not make it
    fail: its span is stored as ok, as the OpenTelemetry export has it."""

    @d.span
    def rows() -> Any:
        yield 1
        yield 2

    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(store).attach(d)
    for _ in rows():
        break
    assert handler.flush(10)
    handler.detach()
    (summary,) = store.traces()
    assert summary.status == "ok" and summary.error is None
    assert "✗" not in _run("--db", str(tmp_path / "t.db"), "list")


def test_the_usage_line_names_the_command_that_was_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Started as the ``instrumentation`` console script, the help says so; otherwise
    it gives the ``python -m`` form."""
    for argv0, usage in (
        ("/venv/bin/instrumentation", "usage: instrumentation "),
        ("/x/instrumentation/__main__.py", "usage: python -m instrumentation "),
    ):
        monkeypatch.setattr(sys, "argv", [argv0])
        with pytest.raises(SystemExit):
            main(["--help"])
        assert capsys.readouterr().out.startswith(usage)


def test_the_help_shows_examples_and_how_traces_get_recorded(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--help`` listed the five commands and ``--db``: nothing said what a first
    command looks like, nor what makes the database it reads."""
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out
    assert "\n  python -m instrumentation --db traces.db show latest --events\n" in shown
    assert 'storage.record_to("traces.db")' in shown
    assert "Each command's --help lists its options: python -m instrumentation list --help" in shown


#: Runs the command line's entry point with the arguments given, then prints the
#: modules of the library it loaded, as JSON, on a line of its own on stderr.
_LOADED_BY = """
import contextlib, io, json, sys
from instrumentation.__main__ import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    main(sys.argv[1:])
print(json.dumps(sorted(m for m in sys.modules if m.startswith("instrumentation"))),
      file=sys.stderr)
"""


@pytest.mark.parametrize(
    "argv", [["--help"], ["list", "--help"], ["list", "--limit", "0"], ["shw", "latest"]]
)
def test_help_and_argument_errors_do_not_load_storage(argv: list[str]) -> None:
    """``--help`` took 0.6 s: the command line imported all of storage (the stores, the
    LLM events) before it read its arguments. Only a command that runs loads them."""
    done = subprocess.run(
        [sys.executable, "-c", _LOADED_BY, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    loaded = json.loads(done.stderr.splitlines()[-1])
    assert "instrumentation._cli_args" in loaded  # the arguments were read
    for heavy in ("instrumentation.storage", "instrumentation.events.llm"):
        assert heavy not in loaded, (argv, heavy)


def test_the_command_line_without_a_command_prints_the_whole_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """It said only "the following arguments are required: command", with the usage
    line: not what the commands are, nor an example."""
    for run in (main, module_main):
        with pytest.raises(SystemExit) as stopped:
            run(["--db", "x.db"])
        assert stopped.value.code == 2
        shown = capsys.readouterr()
        assert shown.out == ""
        assert "  show                one trace as a tree\n" in shown.err
        assert "examples:\n" in shown.err
        assert shown.err.endswith("error: give a command (list, show, tail, events, export)\n")


def test_an_argument_a_command_does_not_take_gets_that_commands_usage(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``show 0f69 9ca9`` printed the top-level usage, which does not say what ``show``
    takes."""
    with pytest.raises(SystemExit) as stopped:
        main(["--db", "x.db", "show", "0f69", "9ca9"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m instrumentation show [-h]")
    assert err.endswith("show: error: unrecognized arguments: 9ca9\n")


def test_a_prefix_of_several_traces_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """show/export of a prefix that several trace ids share asks for more of the id; one
    that matches none says that, and where the ids are listed."""
    store = SQLiteStore(tmp_path / "t.db")
    _write_roots(store, [("ab", time.time() - 5), ("ac", time.time() - 4)])
    store.close()
    db = str(tmp_path / "t.db")
    assert main(["--db", db, "show", "a"]) == 1
    assert "several traces start with 'a': give more of the id" in capsys.readouterr().err
    assert main(["--db", db, "export", "ff"], out=io.StringIO()) == 1
    assert "no trace matches 'ff' (see `list`" in capsys.readouterr().err
    out = io.StringIO()
    assert main(["--db", db, "show", "ab"], out=out) == 0
    assert "ab" in out.getvalue()


@pytest.mark.parametrize("value", ["-1", "0", "x"])
def test_tail_interval_says_one_thing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    """Every refused --interval gets the same rule: more than 0 (a negative one was told
    "0 or more", and then 0 was refused)."""
    SQLiteStore(tmp_path / "t.db").close()
    with pytest.raises(SystemExit):
        main(["--db", str(tmp_path / "t.db"), "tail", "--interval", value])
    assert "takes seconds (more than 0)" in capsys.readouterr().err


def test_a_time_copied_from_list_selects_that_trace_with_until_too(tmp_path: Path) -> None:
    """list prints whole seconds; --until of such a time includes that second (it was an
    exclusive bound, so the trace listed at that time was left out). A time with
    fractions stays exact."""
    store = SQLiteStore(tmp_path / "t.db")
    start = int(time.time()) - 30 + 0.25  # a quarter of a second into its second
    _write_roots(store, [("copied", start + 0.5), ("later", start + 10.5)])
    store.close()
    db = str(tmp_path / "t.db")
    listed = _run("--db", db, "list").splitlines()
    copied = next(line for line in listed if "copied" in line)
    shown_time = " ".join(copied.split()[:2])  # local time, whole seconds
    until = _run("--db", db, "list", "--until", shown_time)
    assert "copied" in until and "later" not in until
    since = _run("--db", db, "list", "--since", shown_time)
    assert "copied" in since and "later" in since
    exact = datetime.fromtimestamp(start, timezone.utc).isoformat()
    assert "copied" not in _run("--db", db, "list", "--until", exact)
    export = _run("--db", db, "export", "--until", shown_time)
    assert len(export.splitlines()) == 1


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the version pyproject.toml gives, which __version__ repeats."""
    import re

    import instrumentation

    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    found = re.search(r'^version = "([^"]+)"$', pyproject, re.MULTILINE)
    assert found is not None
    declared = found.group(1)
    assert instrumentation.__version__ == declared
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.split()[-1] == declared


# -- what a new user met first -------------------------------------------------------------


def test_a_missing_database_says_where_its_name_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It told to "set $INSTRUMENTATION_DB" when that variable had named the database."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INSTRUMENTATION_DB", "later.db")
    assert main(["list"], out=io.StringIO()) == 2
    err = capsys.readouterr().err
    assert "no trace database at 'later.db' (named by $INSTRUMENTATION_DB)" in err
    assert "set $INSTRUMENTATION_DB" not in err
    assert main(["--db", "typo.db", "show", "latest"], out=io.StringIO()) == 2
    assert "no trace database at 'typo.db' (given with --db)" in capsys.readouterr().err
    monkeypatch.delenv("INSTRUMENTATION_DB")
    assert main(["list"], out=io.StringIO()) == 2
    err = capsys.readouterr().err
    assert "'instrumentation.db' (the default; give --db or set $INSTRUMENTATION_DB)" in err


def _tail_in_a_thread(argv: list[str], out: io.StringIO) -> tuple[threading.Thread, list[int]]:
    result: list[int] = []
    follower = threading.Thread(target=lambda: result.append(main(argv, out=out)))
    follower.start()
    return follower, result


def test_tail_started_before_the_database_waits_for_it(
    tmp_path: Path, make_handler: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starting tail first, then the application, is natural: tail exited at once (2),
    "no trace database". It says once that it waits, and follows the traces from when
    it started, those that end as the database is being made included."""
    from instrumentation.storage import cli

    counting = CountingTime()
    monkeypatch.setattr(cli, "time", counting)
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setenv("INSTRUMENTATION_DB", str(tmp_path / "later.db"))
    out = io.StringIO()
    argv = ["tail", "--interval", "0.05", "--count", "1", "--max-seconds", "30"]
    follower, result = _tail_in_a_thread(argv, out)
    try:
        assert wait_until(lambda: counting.pauses >= 3, 10)  # it has looked, in vain
        assert follower.is_alive() and not (tmp_path / "later.db").exists()
        handler = make_handler(SQLiteStore(tmp_path / "later.db")).attach(d)
        pipeline()
        assert handler.flush(10)
    finally:
        follower.join(40)
    assert result == [0]
    assert "pipeline" in out.getvalue()
    assert err.getvalue().count("waiting for it to be made") == 1
    assert "at " + repr(str(tmp_path / "later.db")) + " yet (named by $INSTRUMENTATION_DB)" in (
        err.getvalue()
    )


def test_tail_takes_a_file_just_made_for_a_database_being_made(
    tmp_path: Path, make_handler: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file appears a moment before its tables: tail, waiting, reads on."""
    from instrumentation.storage import cli

    counting = CountingTime()
    monkeypatch.setattr(cli, "time", counting)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    db = tmp_path / "t.db"
    out = io.StringIO()
    argv = ["--db", str(db), "tail", "--interval", "0.05", "--count", "1", "--max-seconds", "30"]
    follower, result = _tail_in_a_thread(argv, out)
    try:
        assert wait_until(lambda: counting.pauses >= 2, 10)
        db.write_bytes(b"")  # made, no tables yet
        seen = counting.pauses
        assert wait_until(lambda: counting.pauses >= seen + 3, 10)  # read it, no tables
        assert follower.is_alive()
        handler = make_handler(SQLiteStore(db)).attach(d)
        pipeline()
        assert handler.flush(10)
    finally:
        follower.join(40)
    assert result == [0] and "pipeline" in out.getvalue()


def test_tail_gives_up_waiting_for_the_database_after_max_seconds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    typo = tmp_path / "typo.db"
    argv = ["--db", str(typo), "tail", "--interval", "0.05", "--max-seconds", "0.3"]
    started = time.monotonic()
    assert main(argv, out=io.StringIO()) == 2
    assert time.monotonic() - started < 5
    err = capsys.readouterr().err
    assert "waiting for it to be made" in err
    assert f"no trace database was made at {str(typo)!r} within --max-seconds" in err
    assert not typo.exists()


def test_every_option_says_what_it_is_and_its_default() -> None:
    """list --help and export --help showed "--limit LIMIT" and nothing else (20 and 100
    in the code); export's ids said just "default: recent"."""
    import argparse

    from instrumentation._cli_args import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in commands.choices.items():
        for action in command._actions:
            if isinstance(action, argparse._HelpAction) or action.dest == "db":
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}: no help"
            if action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in action.help, f"{name} {action.option_strings}"
    assert "(default: 20)" in commands.choices["list"].format_help()
    export_help = " ".join(commands.choices["export"].format_help().split())
    assert "(default: 100)" in export_help and "(default: the --limit most recent)" in export_help


def _write_durations(store: Store, durations: dict[str, float]) -> None:
    from instrumentation.storage.serialise import RowMaker

    maker = RowMaker({}, {}, 1000)
    start = time.time() - 60
    rows = []
    for name, seconds in durations.items():
        info = (start, 0.0, None, True, name, name.ljust(32, "0"), "app", None, None, None)
        rows.append(maker.span_row((info, f"{name}-root", seconds, None)))
    store.write(rows, [])


def test_min_duration_takes_the_units_list_prints(tmp_path: Path) -> None:
    """list prints "381 µs", "12.0 ms"; --min-duration took seconds only. Plain
    numbers stay seconds."""
    store = SQLiteStore(tmp_path / "t.db")
    _write_durations(store, {"micros": 0.000300, "millis": 0.012, "seconds": 2.5})
    store.close()
    for given, listed in [
        ("381us", ["millis", "seconds"]),
        ("381 µs", ["millis", "seconds"]),
        ("381µs", ["millis", "seconds"]),
        ("12ms", ["millis", "seconds"]),
        ("12.5ms", ["seconds"]),
        ("2s", ["seconds"]),
        ("0.0125", ["seconds"]),
        ("1.5m", []),
    ]:
        out = _run("--db", str(tmp_path / "t.db"), "list", "--min-duration", given)
        found = sorted(line.split()[3] for line in out.splitlines() if " span" in line)
        assert found == listed, given


def test_long_durations_are_listed_in_two_units_and_selected_as_listed(tmp_path: Path) -> None:
    """list printed ``7322.00 s`` and ``259200.00 s``; from a minute up it prints two
    units, and --min-duration takes a duration as list prints it."""
    store = SQLiteStore(tmp_path / "t.db")
    _write_durations(store, {"minutes": 122.0, "hours": 7322.0, "days": 259200.0})
    store.close()
    db = str(tmp_path / "t.db")
    listed = {line.split()[3]: line for line in _run("--db", db, "list").splitlines()}
    assert "  2m 02s  1 span" in listed["minutes"]
    assert "  2h 02m  1 span" in listed["hours"]
    assert "  3d 00h  1 span" in listed["days"]
    for given, selected in [
        ("2m 02s", ["days", "hours", "minutes"]),
        ("2m03s", ["days", "hours"]),
        ("2h 02m", ["days", "hours"]),
        ("2h 03m", ["days"]),
        ("3d 00h", ["days"]),
        ("3d", ["days"]),
        ("3d 01h", []),
    ]:
        out = _run("--db", db, "list", "--min-duration", given)
        found = sorted(line.split()[3] for line in out.splitlines() if " span" in line)
        assert found == selected, given


@pytest.mark.parametrize(
    "given", ["5 parsecs", "-1ms", "nan", "ms", "1e400s", "2m 02", "2m x", "3 weeks"]
)
def test_a_min_duration_that_is_none_says_what_it_takes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], given: str
) -> None:
    SQLiteStore(tmp_path / "t.db").close()
    with pytest.raises(SystemExit):
        main(["--db", str(tmp_path / "t.db"), "list", f"--min-duration={given}"])
    assert "takes seconds, or a duration with its unit (381us, 12ms" in capsys.readouterr().err


def test_show_events_shows_what_the_model_answered_first(tmp_path: Path) -> None:
    """An LLM end event's response came after its messages, usage and latency, each
    cut at 40 characters on a line of 100: the answer was never on screen. It comes
    first, as its text."""
    from instrumentation.events.llm import ChatMessage, ChatResponse, LLMChatEndEvent, TokenUsage

    answer = "Paris is the capital of France, and has been for a long time."
    store = SQLiteStore(tmp_path / "t.db")
    handler = StorageHandler(store=store, debounce=0.01).attach(d)
    with d.span("ask"):
        d.event(
            LLMChatEndEvent(
                model="m",
                provider="offline",
                messages=[ChatMessage(role="user", content="What is the capital of France? " * 5)],
                usage=TokenUsage(prompt_tokens=40, completion_tokens=14),
                latency_ms=12.5,
                response=ChatResponse(message=ChatMessage(role="assistant", content=answer)),
            )
        )
    assert handler.shutdown(10)
    shown = _run("--db", str(tmp_path / "t.db"), "show", "latest", "--events")
    (line,) = [x for x in shown.splitlines() if "LLMChatEndEvent" in x]
    assert f"LLMChatEndEvent  response={answer!r} model='m'" in line
    assert len(line.split("LLMChatEndEvent  ", 1)[1]) <= 100  # still one tidy line
    store.close()


def test_show_events_shows_a_streamed_chunk_s_new_text(tmp_path: Path) -> None:
    """A chunk's event is stored without the answer so far, its ``delta`` kept: shown
    as the rest of its response, a dict whose ``raw`` (the provider's chunk) filled the
    line. Its new text is what it answered."""
    from instrumentation.events.llm import ChatMessage, ChatResponse, LLMChatInProgressEvent

    raw = {"id": "chatcmpl-" + "x" * 30, "object": "chat.completion.chunk", "choices": []}
    store = SQLiteStore(tmp_path / "t.db")
    handler = StorageHandler(store=store, debounce=0.01).attach(d)
    with d.span("ask"):
        for so_far, delta in [("Paris", "Paris"), ("Paris is", " is")]:
            d.event(
                LLMChatInProgressEvent(
                    model="m",
                    messages=[ChatMessage(role="user", content="Where?")],
                    response=ChatResponse(
                        message=ChatMessage(role="assistant", content=so_far), delta=delta, raw=raw
                    ),
                )
            )
    assert handler.shutdown(10)
    shown = _run("--db", str(tmp_path / "t.db"), "show", "latest", "--events")
    lines = [x.split("LLMChatInProgressEvent  ", 1)[1] for x in shown.splitlines() if "InProg" in x]
    assert lines == ["delta='Paris' model='m' provider=None", "delta=' is' model='m' provider=None"]
    store.close()


def test_events_prints_the_last_ones_in_the_order_they_happened(
    any_store: Store, make_handler: Any
) -> None:
    """``events``: the last ``--limit`` matching events, oldest of them first, one line
    each with the trace id and what an LLM call's end event holds; ``--all`` streams
    every one, ``--json`` prints the stored fields."""
    handler = make_handler(any_store).attach(d)
    for i in range(5):
        d.event(NoteEvent(text=f"note {i}"))
        time.sleep(0.002)
    pipeline()
    assert handler.flush(10)
    db = _db_arg(any_store)
    notes = _run("--db", db, "events", "--type", "NoteEvent", "--limit", "3").splitlines()
    assert [line.split("text='")[1][:6] for line in notes] == ["note 2", "note 3", "note 4"]
    every = _run("--db", db, "events", "--all").splitlines()
    assert len(every) == 5 + 2  # the notes, the LLM end event and the failed step's drop
    assert every[:3] == _run("--db", db, "events", "--limit", "7").splitlines()[:3]
    (llm,) = [line for line in every if "FakeLLMEndEvent" in line]
    trace_id = any_store.traces(limit=1)[0].trace_id
    assert trace_id[:12] in llm and "m-cli" in llm and "10 tok" in llm and "$0.5000" in llm
    assert "model=" not in llm  # the column says it once
    in_trace = _run("--db", db, "events", "--trace", "latest", "--json").splitlines()
    records = [json.loads(line) for line in in_trace]
    assert [r["type"] for r in records] == ["FakeLLMEndEvent", "SpanDropEvent"]
    assert {r["trace_id"] for r in records} == {trace_id}
    assert records[0]["total_tokens"] == 10 and records[1]["error"]
    assert _run("--db", db, "events", "--type", "Nothing") == "(no events)\n"


def test_a_filter_that_found_nothing_but_nearly_matched_says_so(
    any_store: Store, make_handler: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """``list --name pipe`` and ``events --type NoteEvnt`` printed "(no traces)" and
    "(no events)" alone, where the user meant a prefix (``pipe*``) or a stored type.
    Each says so on stderr, with what was meant; other empty results stay silent."""
    handler = make_handler(any_store).attach(d)
    d.event(NoteEvent(text="a note"))
    pipeline()
    assert handler.flush(10)
    db = _db_arg(any_store)
    assert any_store.event_types() == ["FakeLLMEndEvent", "NoteEvent", "SpanDropEvent"]
    assert any_store.event_types(limit=1) in (["FakeLLMEndEvent"], ["NoteEvent"])

    def hint_for(*argv: str) -> str:
        capsys.readouterr()
        assert _run("--db", db, *argv) in ("(no traces)\n", "(no events)\n")
        return capsys.readouterr().err

    assert hint_for("list", "--name", "pipe") == (
        "hint: none is named exactly 'pipe', but names that start with it match: --name 'pipe*'\n"
    )
    assert hint_for("events", "--type", "NoteEvnt") == (
        "hint: no event has type 'NoteEvnt'; did you mean 'NoteEvent'?\n"
    )
    assert hint_for("events", "--type", "noteevent").endswith("did you mean 'NoteEvent'?\n")
    # Silent where no name starts so, the prefix is excluded by another filter, no
    # type is close, or the type is stored and another filter excluded its events.
    assert hint_for("list", "--name", "step") == ""
    assert hint_for("list", "--name", "pipe", "--status", "error") == ""
    assert hint_for("events", "--type", "Unrelated") == ""
    assert hint_for("events", "--type", "NoteEvent", "--since", "2999-01-01") == ""


def test_events_line_up_their_trace_ids(any_store: Store, make_handler: Any) -> None:
    """``events`` joined its columns with two spaces whatever the type's length, so
    the trace ids after ``LLMChatStartEvent`` and ``LLMChatInProgressEvent`` started
    at different columns; ``list`` pads its names. The types are padded to the widest
    (with ``--all`` too), and an event outside any trace pads its ``-``."""
    handler = make_handler(any_store).attach(d)
    d.event(NoteEvent(text="outside any span"))
    pipeline()
    assert handler.flush(10)
    db = _db_arg(any_store)
    for how_many in ([], ["--all"]):
        lines = _run("--db", db, "events", *how_many).splitlines()
        assert len(lines) == 3
        trace_id = any_store.traces(limit=1)[0].trace_id[:12]
        (column,) = {line.index(trace_id) for line in lines[1:]}
        assert lines[0][column - 2 : column + 15] == "  -" + " " * 13 + "t", lines


def test_a_drop_event_s_error_names_the_exception_class(tmp_path: Path) -> None:
    """A ``SpanDropEvent``'s stored error is ``str()`` of the exception: ``'k'`` for
    ``KeyError('k')``, nothing for ``ValueError()``. ``events`` and ``show --events``
    showed that alone (``✗ 'k'``, or no error at all); they name the class, as the
    span's own line does."""

    @d.span
    def lookup(key: str) -> None:
        raise KeyError(key)

    @d.span
    def check() -> None:
        raise ValueError()

    store = SQLiteStore(tmp_path / "t.db")
    handler = StorageHandler(store=store, debounce=0.01).attach(d)
    for failing in (lambda: lookup("k"), check):
        with pytest.raises((KeyError, ValueError)):
            failing()
    assert handler.shutdown(10)
    db = str(tmp_path / "t.db")
    lines = _run("--db", db, "events", "--type", "SpanDropEvent").splitlines()
    assert [line.rsplit("  ", 1)[1] for line in lines] == ["✗ KeyError: 'k'", "✗ ValueError"]
    shown = _run("--db", db, "show", "latest", "--events").splitlines()
    assert shown[-1] == "└── · SpanDropEvent  ✗ ValueError"
    store.close()


def test_events_of_an_unknown_trace_and_bad_options_fail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    SQLiteStore(tmp_path / "t.db").close()
    db = str(tmp_path / "t.db")
    assert main(["--db", db, "events", "--trace", "abc"], out=io.StringIO()) == 1
    assert "no single trace matches 'abc'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--db", db, "events", "--all", "--limit", "3"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_newest_first_reads_the_last_events(any_store: Store, make_handler: Any) -> None:
    handler = make_handler(any_store).attach(d)
    for i in range(4):
        d.event(NoteEvent(text=f"note {i}"))
        time.sleep(0.002)
    assert handler.flush(10)
    oldest_first = any_store.events(limit=None)
    assert any_store.events(limit=None, newest_first=True) == oldest_first[::-1]
    assert any_store.events(limit=2, newest_first=True) == oldest_first[:-3:-1]
    with pytest.raises(TypeError, match="newest_first is True or False"):
        any_store.events(newest_first="yes")  # type: ignore[arg-type]


def test_times_at_the_ends_of_the_calendar_are_printed_not_an_error(
    tmp_path: Path, make_handler: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event dated by hand to the year 1 has no local time west of Greenwich (nor one
    on 31 December 9999 east of it): printed in UTC, not "cannot read the database"."""
    if not hasattr(time, "tzset"):
        pytest.skip("needs time.tzset")
    store = SQLiteStore(tmp_path / "t.db")
    handler = make_handler(store).attach(d)
    for moment in (
        datetime(1, 1, 1, tzinfo=timezone.utc),
        datetime(9999, 12, 31, 23, tzinfo=timezone.utc),
    ):
        d.event(NoteEvent(text="dated by hand", timestamp=moment))
    assert handler.flush(10)
    store.close()
    for zone in ("America/New_York", "Asia/Tokyo"):
        monkeypatch.setenv("TZ", zone)
        time.tzset()
        try:
            lines = _run("--db", str(tmp_path / "t.db"), "events").splitlines()
        finally:
            monkeypatch.delenv("TZ")
            time.tzset()
        assert [line[:10] for line in lines] == ["0001-01-01", "9999-12-31"]
