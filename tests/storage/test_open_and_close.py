"""Opening and closing stores: what record_to() owns, which addresses are taken, and
what a failed start leaves behind."""

from __future__ import annotations

import logging
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from instrumentation import get_dispatcher, storage
from instrumentation.storage import SQLiteStore, StorageHandler, open_store, record_to

from .helpers import NoteEvent, count, record_and_exit

d = get_dispatcher("tests.storage.open_close")

ROOT = Path(__file__).resolve().parents[2]


@d.span
def work(i: int) -> int:
    d.event(NoteEvent(text=str(i)))
    return i


def _read_copy_alone(db: Path, tmp_path: Path) -> int:
    """Copy only the database file (no -wal, no -shm) and count the traces in the copy."""
    copy = tmp_path / "elsewhere" / "copy.db"
    copy.parent.mkdir()
    shutil.copy(db, copy)
    with open_store(copy, read_only=True) as reader:
        return len(reader.traces(limit=1000))


# -- 1. record_to() closes what it opened -----------------------------------------------


def test_record_to_closes_the_sqlite_store_it_opened(tmp_path: Path) -> None:
    """Leaving the block closes the store: the WAL is copied into the file, which
    then holds every trace on its own (a copy of it alone is a trace database)."""
    db = tmp_path / "t.db"
    with record_to(db, dispatcher=d, debounce=0.01) as recorder:
        for i in range(20):
            work(i)
    assert recorder.store._conn is None  # type: ignore[attr-defined]
    assert not Path(str(db) + "-wal").exists()
    assert _read_copy_alone(db, tmp_path) == 20


def test_shutdown_without_a_with_block_closes_it_too(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    recorder = record_to(db, dispatcher=d, debounce=0.01)
    work(1)
    recorder.detach()
    assert recorder.shutdown(10)
    assert recorder.store._conn is None  # type: ignore[attr-defined]
    assert not Path(str(db) + "-wal").exists()


def test_a_store_passed_in_stays_open(tmp_path: Path) -> None:
    """The caller's store is the caller's to close."""
    store = SQLiteStore(tmp_path / "t.db")
    try:
        with record_to(store, dispatcher=d, debounce=0.01):
            work(1)
        assert store._conn is not None
        assert count(store, "spans") == 1
    finally:
        store.close()
    assert store._conn is None and not Path(store.path + "-wal").exists()


def test_close_store_option_of_the_handler(tmp_path: Path, spool_dir: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    handler = StorageHandler(
        store=store, close_store=True, debounce=0.01, spool_dir=str(spool_dir)
    ).attach(d)
    work(1)
    handler.detach()
    assert handler.shutdown(10)
    assert store._conn is None and not Path(store.path + "-wal").exists()


def test_interpreter_exit_closes_the_store_record_to_opened(tmp_path: Path) -> None:
    """A script that never leaves a block nor shuts down: at exit the rows are written
    and the store closed, so the database file alone holds them."""
    db = tmp_path / "exit.db"
    record_and_exit(db, 30, events=False)
    assert not Path(str(db) + "-wal").exists()
    assert _read_copy_alone(db, tmp_path) == 30


def _backends(dsn: str) -> int:
    import psycopg

    dbname = dsn.rsplit("/", 1)[1]
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_record_to_closes_the_postgres_connection_it_opened(postgres_dsn: str) -> None:
    with record_to(postgres_dsn, dispatcher=d, debounce=0.01) as recorder:
        work(1)
        assert recorder.flush(10)
        assert _backends(postgres_dsn) == 1
    assert recorder.store._conn is None  # type: ignore[attr-defined]
    assert _backends(postgres_dsn) == 0


def test_the_storage_page_closes_what_it_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/storage.md run as tests/test_docs.py runs it: afterwards no SQLite file it
    made has a -wal file, i.e. no connection to it is left open (its namespace, which
    holds every store it made, is still alive)."""
    monkeypatch.chdir(tmp_path)
    page = (ROOT / "docs" / "storage.md").read_text(encoding="utf-8")
    blocks = [
        code
        for flags, code in re.findall(r"^```python([^\n]*)\n(.*?)^```", page, re.S | re.M)
        if "no-run" not in flags
    ]
    namespace: dict[str, Any] = {"__name__": "docs_storage_closing"}
    for code in blocks:
        exec(compile(code, "storage.md", "exec"), namespace)
    made = sorted(p.name for p in tmp_path.glob("*.db"))
    assert "traces.db" in made
    left_open = sorted(p.name for p in tmp_path.glob("*.db-wal"))
    assert left_open == [], f"still open: {left_open} (namespace: {sorted(namespace)})"
    assert _read_copy_alone(tmp_path / "traces.db", tmp_path) >= 1


# -- 2. addresses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "mysql://u@h/db",
        "http://example.com/traces",
        "postgresql+psycopg://u@h/db",
        "",
        "   ",
    ],
)
def test_an_address_of_no_accepted_form_is_a_clear_value_error(
    address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for opener in (record_to, open_store, SQLiteStore):
        with pytest.raises(ValueError) as info:
            opener(address)
        text = str(info.value)
        assert repr(address) in text and "postgresql://" in text and "SQLite file path" in text
    assert list(tmp_path.iterdir()) == []


def test_a_postgres_dsn_given_to_sqlitestore_points_to_open_store() -> None:
    with pytest.raises(ValueError, match=r"PostgreSQL DSN.*open_store"):
        SQLiteStore("postgresql://u@h/db")


def test_sqlite_urls_name_sqlite_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sqlite:///relative and sqlite:////absolute, as SQLAlchemy spells them."""
    monkeypatch.chdir(tmp_path)
    with record_to("sqlite:///rel.db", dispatcher=d, debounce=0.01) as recorder:
        work(1)
    assert recorder.store.path == str(tmp_path / "rel.db")  # type: ignore[attr-defined]
    absolute = tmp_path / "sub" / "abs.db"
    absolute.parent.mkdir()
    with open_store(f"sqlite:///{absolute}") as store:
        assert store.path == str(absolute)  # type: ignore[attr-defined]
    with open_store("rel.db", read_only=True) as again, open_store("sqlite:///rel.db") as same:
        assert count(again, "spans") == 1 and same.spool_key == again.spool_key
    for memory in ("sqlite://", "sqlite:///:memory:"):
        with open_store(memory) as store:
            assert store.path == ":memory:"  # type: ignore[attr-defined]
    for bad, why in (("sqlite://host/x.db", "host"), ("sqlite:///x.db?mode=ro", "query")):
        with pytest.raises(ValueError, match=why):
            open_store(bad)


def test_a_missing_folder_or_a_folder_is_an_os_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent" / "dir" / "x.db"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing.parent))):
        SQLiteStore(missing)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        record_to(missing)
    folder = tmp_path / "adir"
    folder.mkdir()
    for read_only in (False, True):
        with pytest.raises(IsADirectoryError, match="adir' is a folder"):
            SQLiteStore(folder, read_only=read_only)
    a_file = tmp_path / "plain.txt"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match=r"plain\.txt' is not a folder"):
        SQLiteStore(a_file / "x.db")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "plain.txt"]


# -- 3. a failed start leaves nothing open -----------------------------------------------


def test_a_misspelt_option_opens_and_creates_nothing(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    with pytest.raises(ValidationError, match=r"batchsize\n.*did you mean 'batch_size'"):
        record_to(db, batchsize=5)
    assert not db.exists()
    with pytest.raises(TypeError, match="first argument"):
        record_to(db, store=SQLiteStore(":memory:"))
    assert not db.exists()


def test_record_to_spells_out_every_option_of_the_handler() -> None:
    """record_to()'s typed options (what a type checker checks) are the handler's own
    fields but the store: a new field must not be left out of them."""
    from instrumentation.span_handlers import BaseSpanHandler

    own = set(StorageHandler.model_fields) - set(BaseSpanHandler.model_fields) - {"store"}
    assert set(storage.StorageOptions.__annotations__) == own


def test_a_handler_that_cannot_be_made_closes_the_store(tmp_path: Path) -> None:
    """A bad value is found after the store is open: it is closed again (no -wal left
    while the error, and its traceback, are still alive)."""
    db = tmp_path / "t.db"
    with pytest.raises(ValueError, match="batch_size") as info:
        record_to(db, batch_size=0)
    assert info.value is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_refused_value_keeps_a_database_that_was_there(tmp_path: Path) -> None:
    """Only a file made for the refused handler is removed; traces already kept stay."""
    db = tmp_path / "t.db"
    with record_to(db):
        work(1)
    with pytest.raises(ValueError, match="debounce"):
        record_to(db, debounce=-1)
    assert [p.name for p in tmp_path.iterdir()] == ["t.db"]
    with open_store(db, read_only=True) as reader:
        assert [t.name for t in reader.traces()] == ["work"]


def test_a_wrong_dispatcher_opens_nothing(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    with pytest.raises(TypeError, match="Dispatcher"):
        record_to(db, dispatcher="myapp")  # type: ignore[arg-type]
    assert not db.exists() and not Path(str(db) + "-wal").exists()


# -- 4. a reader logs no writer's warning --------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_read_only_store_that_cannot_connect_warns_of_no_writes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pytest.importorskip("psycopg")
    from instrumentation.storage.postgres import PostgresStore

    dsn = f"postgresql://nobody@127.0.0.1:{_closed_port()}/traces"
    caplog.set_level(logging.DEBUG, logger="instrumentation.storage")
    with PostgresStore(dsn, read_only=True, connect_timeout=1) as reader:
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        with pytest.raises(Exception, match=r"refused|failed"):
            reader.traces()
    caplog.clear()
    with PostgresStore(dsn, connect_timeout=1):  # a writer is still told
        assert any("spooled" in r.getMessage() for r in caplog.records)


def test_the_command_line_shows_only_the_read_error() -> None:
    pytest.importorskip("psycopg")
    dsn = f"postgresql://nobody@127.0.0.1:{_closed_port()}/traces"
    done = subprocess.run(
        [sys.executable, "-m", "instrumentation", "--db", dsn, "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.startswith(f"cannot read the trace database {dsn!r}: ")
    assert "spooled" not in done.stderr and "retried" not in done.stderr


def test_storage_exports_the_accepted_forms() -> None:
    assert "postgresql://" in storage.ACCEPTED_ADDRESSES


@pytest.mark.parametrize("address", [":memory:", "sqlite://"])
def test_an_in_memory_store_record_to_opened_keeps_its_rows(address: str) -> None:
    """Closing it would throw the rows away: it stays open, read through ``rec.store``."""
    with record_to(address) as rec:
        work(1)
    assert len(rec.store.traces()) == 1
    rec.store.close()


def test_a_postgres_url_scheme_in_any_case_is_postgres(postgres_dsn: str) -> None:
    scheme, _, rest = postgres_dsn.partition("://")
    with open_store(f"{scheme.upper()}://{rest}") as store:
        assert type(store).__name__ == "PostgresStore"
        assert store.traces() is not None


# -- 4. spans still open when the writer stops ------------------------------------------


def test_a_span_open_at_shutdown_is_stored_as_dropped_with_its_trace(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Shut down inside a call: the call's span is stored as dropped (counted, logged),
    so the trace of the children it finished is listed and complete; the call ending
    afterwards adds nothing."""
    from instrumentation import telemetry

    db = tmp_path / "t.db"
    recorder = record_to(db, dispatcher=d, debounce=0.01)
    before = telemetry.SPANS_DROPPED_BY_SHUTDOWN.value

    @d.span
    def request() -> None:
        work(1)
        work(2)
        recorder.detach()
        with caplog.at_level(logging.WARNING, logger="instrumentation.storage"):
            assert recorder.shutdown(10)

    request()
    assert telemetry.SPANS_DROPPED_BY_SHUTDOWN.value == before + 1
    assert "1 span(s) still open" in caplog.text and "shut down" in caplog.text
    with open_store(db, read_only=True) as reader:
        [summary] = reader.traces(limit=10)
        assert summary.name == request.__qualname__ and summary.status == "error"
        assert summary.span_count == 3
        [root] = [s for s in reader.trace(summary.trace_id) if s.parent_id is None]
        assert root.error == "RuntimeError: the storage handler shut down while the span was open"


def test_spans_open_at_exit_are_stored_as_dropped(tmp_path: Path) -> None:
    """A daemon thread still inside a call, and a generator suspended for good, when
    the process exits: each open span is stored as dropped, so the finished children
    belong to a listed trace, and the exit says so on stderr."""
    db = tmp_path / "exit.db"
    script = f"""
import threading, time
from instrumentation import get_dispatcher
from instrumentation.storage import record_to
d = get_dispatcher("exit.open")
record_to({str(db)!r}, debounce=60)

@d.span
def step(i):
    return i

@d.span
def serve(ready):
    step(1)
    ready.set()
    time.sleep(60)

@d.span
def pages():
    step(2)
    yield 1
    yield 2

ready = threading.Event()
threading.Thread(target=serve, args=(ready,), daemon=True).start()
ready.wait()
it = pages()
next(it)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert "2 span(s) still open" in done.stderr and "process exited" in done.stderr
    with open_store(db, read_only=True) as reader:
        summaries = reader.traces(limit=10)
        assert sorted(s.name or "" for s in summaries) == ["pages", "serve"]
        for summary in summaries:
            assert summary.span_count == 2 and summary.status == "error"
            [root] = [s for s in reader.trace(summary.trace_id) if s.parent_id is None]
            assert root.error == "RuntimeError: the process exited while the span was open"


def test_a_forked_child_leaves_its_parents_open_spans_to_the_parent(tmp_path: Path) -> None:
    """A child forked inside a traced call holds that call's open span too: at its exit
    it stored the span as dropped ("the process exited"), and the parent's own row,
    written later, was then discarded as a duplicate. The child stores only its own."""
    db = tmp_path / "fork.db"
    script = f"""
import multiprocessing
from instrumentation import get_dispatcher
from instrumentation.storage import record_to

d = get_dispatcher("exit.fork")
recorder = record_to({str(db)!r}, dispatcher=d, debounce=0.01)

@d.span
def in_child():
    pass

def child():
    in_child()

@d.span
def request():
    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join()
    return process.exitcode

assert request() == 0
assert recorder.shutdown(10)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "still open" not in done.stderr
    with open_store(db, read_only=True) as reader:
        [summary] = reader.traces(limit=10)
        assert summary.name == "request" and summary.status == "ok"
        names = sorted(s.name or "" for s in reader.trace(summary.trace_id))
        assert names == ["in_child", "request"]


# -- 5. shutdown() ends the recording ------------------------------------------------------


def test_shutdown_detaches_the_handler_record_to_attached(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """shutdown() is one way the page gives to end record_to(): the handler stayed
    attached, and every later span and event was refused, counted in storage.dropped
    and logged as lost ("dropped 1 entry because the writer is shut down"), though the
    application had only stopped recording."""
    from instrumentation import root_dispatcher, telemetry

    recorder = record_to(tmp_path / "t.db", debounce=0.01)
    work(1)
    assert recorder.shutdown(10)
    assert recorder not in root_dispatcher.span_handlers
    assert recorder not in root_dispatcher.event_handlers
    with caplog.at_level(logging.WARNING, logger="instrumentation.storage"):
        for i in range(3):
            work(i)
    assert recorder.dropped == 0 and telemetry.counter("storage.dropped").value == 0
    assert "dropped" not in caplog.text


def test_record_to_run_twice_and_both_shut_down_leaves_nothing_attached(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A notebook cell with record_to() run twice: both handlers record; shut down,
    neither is left behind to count the notebook's later spans as lost."""
    from instrumentation import root_dispatcher, telemetry

    db = tmp_path / "nb.db"
    first, second = record_to(db, debounce=0.01), record_to(db, debounce=0.01)
    work(1)
    assert first.shutdown(10) and second.shutdown(10)
    assert not root_dispatcher.span_handlers and not root_dispatcher.event_handlers
    with caplog.at_level(logging.WARNING, logger="instrumentation.storage"):
        work(2)
    assert telemetry.counter("storage.dropped").value == 0 and "dropped" not in caplog.text
    with open_store(db, read_only=True) as reader:
        assert [t.name for t in reader.traces()] == ["work"]


def test_a_handler_that_is_shut_down_cannot_be_attached_again(tmp_path: Path) -> None:
    """attach() after shutdown() was taken, and every span and event then dropped."""
    store = SQLiteStore(tmp_path / "t.db")
    handler = StorageHandler(store=store)
    handler.shutdown(10)
    with pytest.raises(RuntimeError, match=r"shut down.*make a new one"):
        handler.attach(d)
    assert handler not in d.span_handlers and handler not in d.event_handlers
    store.close()


def test_a_refused_shutdown_timeout_changes_nothing(tmp_path: Path) -> None:
    """shutdown(nan) raised from inside threading, after the handler was half shut
    down; flush("x") and flush(1e300) the same. They say what a timeout is, and the
    handler goes on recording."""
    store = SQLiteStore(tmp_path / "t.db")
    handler = StorageHandler(store=store, debounce=0.01).attach(d)
    for bad, error in [(float("nan"), ValueError), (-1, ValueError), ("10", TypeError)]:
        with pytest.raises(error, match="timeout is seconds, 0 to 86400, or None"):
            handler.shutdown(bad)
    for bad, error in [("x", TypeError), (1e300, ValueError), (float("inf"), ValueError)]:
        with pytest.raises(error, match="timeout is seconds"):
            handler.flush(bad)
    assert handler in d.span_handlers
    work(1)
    assert handler.flush(None) and handler.shutdown(10)
    assert [t.name for t in store.traces()] == ["work"]
    store.close()
