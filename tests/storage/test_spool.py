"""The spool: replayed a bounded chunk at a time, resumed where it stopped, never stuck."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from instrumentation import telemetry
from instrumentation.storage import BatchWriter, SQLiteStore
from instrumentation.storage import spool as spool_module
from instrumentation.storage.base import Row
from instrumentation.storage.serialise import RowMaker
from instrumentation.storage.spool import Spool, default_spool_dir

from .helpers import (
    ControlledSQLiteStore,
    NoteEvent,
    count,
    refused_row,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]


def _spool_events(store: SQLiteStore, spool_dir: Path, n: int, text: str = "") -> Spool:
    """``n`` event rows in this process's spool file for ``store``, as an outage leaves them."""
    spool = Spool(store.spool_key, spool_dir)
    maker = RowMaker({}, {}, 100_000)
    for start in range(0, n, 1000):
        rows = [
            maker.event_row(NoteEvent(text=f"{i} {text}"), None)
            for i in range(start, min(n, start + 1000))
        ]
        spool.append([], rows)
    return spool


class CountingStore(ControlledSQLiteStore):
    """Counts the rows of every write the database took, and fails the writes asked to."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rows_taken = 0
        self.fail_writes: set[int] = set()

    def write(self, spans: Sequence[Row], events: Sequence[Row]) -> None:
        self.fail = self.attempts + 1 in self.fail_writes
        super().write(spans, events)
        self.rows_taken += len(spans) + len(events)


def test_replay_memory_does_not_grow_with_the_spool(
    tmp_path: Path, make_handler: Any, spool_dir: Path
) -> None:
    """A long outage leaves a large spool; replaying it holds a chunk in memory, not
    the file (reading it whole peaked at twice its size), and stores each row once."""
    store = SQLiteStore(tmp_path / "t.db")
    spool = _spool_events(store, spool_dir, 12_000, text="x" * 1000)
    size = os.path.getsize(spool.path)
    assert size > 12_000_000
    tracemalloc.start()
    try:
        handler = make_handler(store, replay_interval=3600)  # adopts the file; flush replays it
        assert handler.flush(120)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < size / 2, f"replay peaked at {peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB spool"
    assert count(store, "events") == 12_000
    assert len({e.payload["text"].split()[0] for e in store.events(limit=None)}) == 12_000
    assert not spool.path.exists()
    assert telemetry.counter("storage.replayed_rows").value == 12_000


def test_a_replay_that_fails_part_way_resumes_where_it_stopped(
    tmp_path: Path, make_handler: Any, spool_dir: Path
) -> None:
    """The database fails on the third chunk: the next try does not send the first two
    again, and in the end every row is stored once."""
    store = CountingStore(tmp_path / "t.db")
    _spool_events(store, spool_dir, 5000)
    store.fail_writes = {3}
    handler = make_handler(store, batch_size=100, replay_interval=3600)  # chunks of 1000
    assert handler.flush(30) is False  # two chunks in, the third refused
    assert count(store, "events") == 2000 and store.rows_taken == 2000
    assert handler.writer.spool.pending and handler.writer.spool.rows_pending == 3000
    assert handler.flush(30) is True
    assert store.rows_taken == 5000  # nothing was sent twice
    assert count(store, "events") == 5000
    assert not handler.writer.spool.path.exists()
    assert telemetry.counter("storage.write_errors").value == 1


def test_a_row_the_database_refuses_cannot_hold_up_the_spool(
    tmp_path: Path, make_handler: Any, spool_dir: Path
) -> None:
    """A spooled row the database refuses for its content (an integer beyond 64 bits
    for SQLite) is rejected, counted and logged; the rows around it are replayed."""
    store = SQLiteStore(tmp_path / "t.db")
    maker = RowMaker({}, {}, 10_000)
    spool = Spool(store.spool_key, spool_dir)
    spool.append([], [maker.event_row(NoteEvent(text="before"), None)])
    spool.append([], [refused_row(maker)])
    spool.append([], [maker.event_row(NoteEvent(text="after"), None)])
    handler = make_handler(store, replay_interval=3600)
    assert handler.flush(10) is False  # a row waiting for it was refused
    assert sorted(e.payload.get("text", "") for e in store.events()) == ["after", "before"]
    assert telemetry.counter("storage.rejected_rows").value == 1
    assert not spool.path.exists() and not handler.writer.spool.pending
    handler.handle(NoteEvent(text="later"))
    assert handler.flush(10) is True
    assert count(store, "events") == 3


def test_a_line_cut_short_is_skipped_and_counted(
    tmp_path: Path, make_handler: Any, spool_dir: Path
) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    spool = _spool_events(store, spool_dir, 3)
    with open(spool.path, "a", encoding="utf-8") as f:
        f.write('{"t": "e", "r": ["cut')
    handler = make_handler(store, replay_interval=3600)
    assert handler.flush(10)
    assert count(store, "events") == 3
    assert telemetry.counter("storage.spool_bad_lines").value == 1


def test_the_spool_file_is_named_as_documented(tmp_path: Path, make_handler: Any) -> None:
    """``<tempdir>/instrumentation-spool-<uid>/<first 16 hex of sha256(spool_key)>-<pid>.jsonl``."""
    store = SQLiteStore(tmp_path / "t.db")
    assert store.spool_key == f"sqlite:{tmp_path / 't.db'}"
    handler = make_handler(store, spool_dir=None)
    key_hash = hashlib.sha256(store.spool_key.encode("utf-8")).hexdigest()[:16]
    assert handler.writer.spool.path == default_spool_dir() / f"{key_hash}-{os.getpid()}.jsonl"
    folder = "instrumentation-spool" + (f"-{os.getuid()}" if hasattr(os, "getuid") else "")
    assert default_spool_dir() == Path(tempfile.gettempdir()) / folder
    doc = (ROOT / "docs" / "storage.md").read_text(encoding="utf-8")
    assert "`<spool_dir>/<key hash>-<pid>.jsonl`" in doc
    assert "first 16 hex digits of the SHA-256" in doc
    assert "`<tempdir>/instrumentation-spool-<uid>`" in doc


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_the_default_spool_folder_and_files_are_the_users_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool holds prompts and replies: one folder for all users in the shared
    temporary folder, made with the umask's modes (0755 and 0644), let any user read
    them, and a folder another user made there was written into (or, not writable,
    left this user nowhere to spool). Now the folder is the user's own (0700, closed if
    found open), its files 0600; one that is a link (or another user's) is refused."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = default_spool_dir()
    assert folder == tmp_path / f"instrumentation-spool-{os.getuid()}"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)  # as an older version, or a loose umask, left it
    spool = Spool("sqlite:/x.db")
    assert spool.append([], [("e1", "x")]) == 0
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(spool.path).st_mode) == 0o600

    elsewhere = tmp_path / "someone-elses"
    elsewhere.mkdir()
    shutil.rmtree(folder)
    folder.symlink_to(elsewhere)
    with pytest.raises(PermissionError, match=r"is not a folder.*spool_dir="):
        Spool("sqlite:/x.db").append([], [("e1", "x")])
    assert list(elsewhere.iterdir()) == []
    planted = elsewhere / f"{Spool('sqlite:/x.db').prefix}-999999999.jsonl"
    planted.write_text('{"t": "e", "r": ["planted"]}\n')
    assert Spool("sqlite:/x.db").adopt_orphans() == 0
    assert planted.exists()


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_a_spool_dir_given_keeps_the_umasks_modes_for_a_group_to_share(tmp_path: Path) -> None:
    """Only the default folder is made this user's alone: a spool_dir given is the
    user's to share, e.g. a group's folder whose processes, run as different users,
    adopt each other's files after a crash. Its files (the compaction's copy too) and
    the folder, if the spool makes it, follow the umask as before: files made 0600
    there could not be read by the group's other users, who claimed them and failed."""
    old = os.umask(0o002)
    try:
        folder = tmp_path / "group-spool"
        spool = Spool("sqlite:/x.db", folder, max_bytes=200)
        assert spool.append([], [("e1", "x")]) == 0
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o775
        assert stat.S_IMODE(os.stat(spool.path).st_mode) == 0o664
        with spool.replaying():
            chunk = spool.next_chunk(10)
            assert chunk is not None
            spool.mark_replayed(chunk)
        before = os.stat(spool.path).st_ino
        assert spool.append([], [("e2", "y" * 150)]) == 0
        assert os.stat(spool.path).st_ino != before  # compacted: a copy renamed over it
        assert stat.S_IMODE(os.stat(spool.path).st_mode) == 0o664
    finally:
        os.umask(old)


def test_two_writers_of_one_store_share_the_spool_without_skipping_rows(
    tmp_path: Path, spool_dir: Path
) -> None:
    """Two handlers on one database in one process share its spool file: rows one
    replays are not replayed by the other, and a chunk read before the other emptied
    the file cannot move the position in the next one."""
    store = SQLiteStore(tmp_path / "t.db")
    maker = RowMaker({}, {}, 10_000)
    rows = [maker.event_row(NoteEvent(text=str(i)), None) for i in range(6)]
    a, b = Spool(store.spool_key, spool_dir), Spool(store.spool_key, spool_dir)
    a.append([], rows[:3])
    assert b.pending and b.rows_pending == 3
    first = a.next_chunk(1)
    assert first is not None and first.events == rows[:1]
    a.mark_replayed(first)
    stale = a.next_chunk(1)  # read, then the other writer replays everything
    replayed_by_b = []
    while (chunk := b.next_chunk(10)) is not None:
        replayed_by_b += chunk.events
        b.mark_replayed(chunk)
    assert replayed_by_b == rows[1:3] and not a.pending and not a.path.exists()
    a.append([], rows[3:])
    assert stale is not None
    a.mark_replayed(stale)  # about the removed file: changes nothing
    replayed_by_a = []
    while (chunk := a.next_chunk(10)) is not None:
        replayed_by_a += chunk.events
        a.mark_replayed(chunk)
    assert replayed_by_a == rows[3:]


def test_two_handlers_on_one_failing_database_store_every_row_once(
    tmp_path: Path, make_handler: Any
) -> None:
    store = ControlledSQLiteStore(tmp_path / "t.db")
    store.fail = True
    quick = {"retry_for": 0.05, "retry_backoff": 0.01, "replay_interval": 0.05, "batch_size": 50}
    handlers = [make_handler(store, **quick), make_handler(store, **quick)]
    for round_ in range(6):
        for n, handler in enumerate(handlers):
            for i in range(100):
                handler.handle(NoteEvent(text=f"{n}-{round_}-{i}"))
        store.fail = round_ % 2 == 0  # the database comes and goes
        time.sleep(0.05)
    store.fail = False
    assert wait_until(lambda: all(h.flush(1) for h in handlers), 30)
    texts = [e.payload["text"] for e in store.events(limit=None)]
    assert len(texts) == 1200 and len(set(texts)) == 1200


def _replay_all(spool: Spool) -> list[Row]:
    rows: list[Row] = []
    while (chunk := spool.next_chunk(10)) is not None:
        rows += chunk.events
        spool.mark_replayed(chunk)
    return rows


def test_a_spool_file_removed_part_way_through_a_replay_loses_no_newer_row(
    tmp_path: Path, make_handler: Any, spool_dir: Path, caplog: Any
) -> None:
    """The file is removed (a temporary-files cleaner) after part of it was replayed;
    the next rows spooled make a new, smaller file. The position in the old file must
    not be applied to it: its rows are replayed, and the rows that were lost with the
    old file are counted, logged, and make flush() False."""
    store = CountingStore(tmp_path / "t.db")
    spool = _spool_events(store, spool_dir, 3000)
    store.fail_writes = {2}  # the first chunk goes in, the second fails
    handler = make_handler(store, batch_size=100, retry_for=0, replay_interval=3600)
    assert handler.flush(30) is False
    assert count(store, "events") == 1000 and spool.replayed_bytes > 0
    os.unlink(spool.path)
    store.fail_writes = {3}  # still down: the new rows go to a new file
    for i in range(10):
        handler.handle(NoteEvent(text=f"new {i}"))
    assert handler.flush(30) is False  # 2000 rows were lost with the old file
    assert handler.flush(30) is True
    new = [e.payload["text"] for e in store.events(limit=None) if e.payload["text"][:3] == "new"]
    assert sorted(new) == [f"new {i}" for i in range(10)]
    assert handler.writer.rows_lost == 2000
    assert telemetry.counter("storage.lost_rows").value == 2000
    assert "2000 rows that were waiting in it are lost" in caplog.text
    assert not spool.path.exists()


def test_writers_whose_spool_dir_is_spelled_differently_share_the_file(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A relative spool_dir, the absolute one and a symbolic link to it are one file:
    one replay position (no row sent twice) and no rows lost when one writer empties
    the file while the other had replayed part of it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spool").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "spool")
    key = f"sqlite:{tmp_path / 't.db'}"
    spools = [Spool(key, "spool"), Spool(key, tmp_path / "spool"), Spool(key, tmp_path / "link")]
    maker = RowMaker({}, {}, 10_000)
    rows = [maker.event_row(NoteEvent(text=str(i)), None) for i in range(5)]
    relative, absolute, linked = spools
    relative.append([], rows[:3])
    assert absolute.rows_pending == 3 and linked.rows_pending == 3
    first = relative.next_chunk(1)
    assert first is not None
    relative.mark_replayed(first)
    assert _replay_all(linked) == rows[1:3]  # not from the start again
    assert not absolute.path.exists()
    relative.append([], rows[3:])  # a new file: replayed from its start
    assert _replay_all(absolute) == rows[3:]
    monkeypatch.chdir(tmp_path / "spool")
    assert relative.path == tmp_path / "spool" / absolute.path.name  # chdir moves nothing


def test_a_spooled_line_that_is_not_a_row_is_rejected_and_replay_goes_on(
    any_store: Any, make_handler: Any, spool_dir: Path, caplog: Any
) -> None:
    """JSON lines no database can bind (the wrong number of values, a nested value,
    a boolean) are rejected, counted once and logged; the rows around them are
    replayed, on SQLite and on PostgreSQL."""
    maker = RowMaker({}, {}, 10_000)
    spool = Spool(any_store.spool_key, spool_dir)
    good = [maker.event_row(NoteEvent(text=f"good {i}"), None) for i in range(4)]
    spool.append([], good[:2])
    spool.append([], [(1, 2, 3)])  # another release's row, say
    spool.append([], [(*good[0][:-1], {"nested": 1})])
    info = (1.0, 0.0, None, True, "s", "t" * 32, "d", None, None, None)
    span = list(maker.span_row((info, "s-1", 0.5, None)))
    span[3] = True  # is_root as a JSON boolean: PostgreSQL's integer column refuses it
    spool.append([tuple(span)], [])
    spool.append([], good[2:])
    handler = make_handler(any_store, replay_interval=3600)
    assert handler.flush(10) is False  # rows waiting for it were rejected
    assert sorted(e.payload["text"] for e in any_store.events()) == [f"good {i}" for i in range(4)]
    assert telemetry.counter("storage.rejected_rows").value == 3
    assert handler.writer.rows_lost == 3
    assert "3 values for the 20 columns of events" in caplog.text
    assert not spool.path.exists() and not handler.writer.spool.pending
    handler.handle(NoteEvent(text="later"))
    assert handler.flush(10) is True
    assert telemetry.counter("storage.rejected_rows").value == 3


class FailOnceStore(SQLiteStore):
    """A real SQLite store that "goes down" once: for the first write of one row alone
    (``fail_alone``), or for the first write of several rows (``fail_batch``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fail_alone: set[str] = set()
        self.fail_batch = False

    def write(self, spans: Sequence[Row], events: Sequence[Row]) -> None:
        rows = [*spans, *events]
        if len(rows) == 1 and rows[0][0] in self.fail_alone:
            self.fail_alone.discard(rows[0][0])
            raise OSError("database unreachable (test)")
        if len(rows) > 1 and self.fail_batch:
            self.fail_batch = False
            raise OSError("database unreachable (test)")
        super().write(spans, events)


def _dead_pids(n: int) -> list[int]:
    return [
        int(
            subprocess.run(
                [sys.executable, "-c", "import os; print(os.getpid())"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        for _ in range(n)
    ]


def _orphan(store: SQLiteStore, spool_dir: Path, rows: list[Row], name: str) -> Path:
    """A spool file of ``rows`` left in ``spool_dir`` by a process that died, as
    ``<prefix>-<name>``."""
    elsewhere = Spool(store.spool_key, spool_dir.parent / "elsewhere")
    elsewhere.append([], rows)
    spool_dir.mkdir(parents=True, exist_ok=True)
    return elsewhere.path.rename(spool_dir / f"{elsewhere.prefix}-{name}")


def test_a_chunk_read_again_after_a_failure_counts_nothing_twice(
    tmp_path: Path, make_handler: Any, spool_dir: Path
) -> None:
    """A row the database refuses, then the database fails on the next row: the chunk
    resumes after the rejected row, so it is rejected (and counted) once; a line cut
    short by a crash is counted once however often its chunk is read."""
    store = FailOnceStore(tmp_path / "t.db")
    maker = RowMaker({}, {}, 10_000)
    bad = refused_row(maker)
    good = [maker.event_row(NoteEvent(text=str(i)), None) for i in range(5)]
    orphan = _orphan(store, spool_dir, [bad, *good], f"{_dead_pids(1)[0]}.jsonl")
    with open(orphan, "a", encoding="utf-8") as f:
        f.write('{"t": "e", "r": ["cut')
    store.fail_alone = {good[0][0]}  # down just after the bad row was rejected
    handler = make_handler(store, replay_interval=3600)
    assert handler.flush(10) is False
    assert count(store, "events") == 0
    store.fail_batch = True  # and once more, for the chunk that resumes
    assert handler.flush(10) is False
    assert handler.flush(10) is True
    assert count(store, "events") == 5
    assert telemetry.counter("storage.rejected_rows").value == 1
    assert handler.writer.rows_lost == 1
    assert telemetry.counter("storage.spool_bad_lines").value == 1
    assert telemetry.counter("storage.replayed_rows").value == 5


class WatchedLock:
    """A lock that notes when a thread asked for it while another held it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.waited = False

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(blocking=False):
            return True
        self.waited = True
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()


def test_two_writers_replaying_one_file_send_each_row_once(
    tmp_path: Path, make_handler: Any, spool_dir: Path
) -> None:
    """Two handlers on one database replay the shared file a chunk at a time in turn:
    neither sends (nor counts) a chunk the other is writing."""
    store = ControlledSQLiteStore(tmp_path / "t.db")
    turn = WatchedLock()
    spool = _spool_events(store, spool_dir, 3000)  # kept: its file's state is the handlers'
    spool._state.replay_lock = turn  # type: ignore[assignment]
    handlers = [make_handler(store, batch_size=100, replay_interval=3600) for _ in range(2)]
    store.gate.clear()  # the first chunk's write waits
    results: list[bool] = []
    threads = [threading.Thread(target=lambda h=h: results.append(h.flush(30))) for h in handlers]
    for thread in threads:
        thread.start()
    # One writer is in its write; the other asks for the turn meanwhile (or, were
    # there no turns, starts a write of its own).
    assert wait_until(lambda: store.attempts >= 1 and (turn.waited or store.attempts >= 2), 30)
    store.gate.set()
    for thread in threads:
        thread.join(30)
    assert results == [True, True]
    assert count(store, "events") == 3000
    assert sum(h.writer.rows_written for h in handlers) == 3000
    assert telemetry.counter("storage.replayed_rows").value == 3000
    assert store.attempts == 3  # three chunks, each written once


def test_a_spool_claimed_by_an_adopter_that_died_is_adopted(
    tmp_path: Path, make_handler: Any, spool_dir: Path
) -> None:
    """A process that died after renaming an orphan to ``.claimed-<its pid>`` (and
    before copying it) leaves it to the next writer, not forever."""
    store = SQLiteStore(tmp_path / "t.db")
    maker = RowMaker({}, {}, 10_000)
    rows = [maker.event_row(NoteEvent(text=str(i)), None) for i in range(3)]
    spooler, adopter = _dead_pids(2)
    _orphan(store, spool_dir, rows, f"{spooler}.claimed-{adopter}")
    handler = make_handler(store, replay_interval=3600)
    assert handler.flush(10)
    assert count(store, "events") == 3
    assert list(spool_dir.iterdir()) == []
    assert handler.writer.rows_lost == 0


def test_a_line_cut_short_in_a_file_left_under_our_own_pid_swallows_no_row(
    tmp_path: Path, make_handler: Any, spool_dir: Path
) -> None:
    """A process that crashed with the pid this one has (a container's pid 1, say)
    left a file ending in a line cut short: the rows spooled next start on a line of
    their own, and the fragment is one bad line."""
    store = ControlledSQLiteStore(tmp_path / "t.db")
    left = Spool(store.spool_key, spool_dir)
    spool_dir.mkdir()
    old = RowMaker({}, {}, 10_000).event_row(NoteEvent(text="old"), None)
    with open(left.path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"t": "e", "r": list(old)}) + '\n{"t": "e", "r": ["cut')
    store.fail = True  # the old row cannot be replayed: the new one is appended
    handler = make_handler(store, retry_for=0, replay_interval=3600)
    handler.handle(NoteEvent(text="spooled"))
    assert handler.flush(10) is False
    store.fail = False
    assert handler.flush(10) is True
    assert sorted(e.payload["text"] for e in store.events()) == ["old", "spooled"]
    assert telemetry.counter("storage.spool_bad_lines").value == 1


def test_a_write_that_fails_part_way_leaves_the_spool_file_as_it_was(
    tmp_path: Path, spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows appended, or an orphan adopted, while the disk fails (fsync refused): the
    file is cut back to where it was, nothing more is counted as pending, and the
    orphan stays where a later writer adopts it."""
    store = SQLiteStore(tmp_path / "t.db")
    maker = RowMaker({}, {}, 10_000)
    rows = [maker.event_row(NoteEvent(text=str(i)), None) for i in range(3)]
    spool = Spool(store.spool_key, spool_dir)
    spool.append([], rows[:1])
    before = spool.path.read_bytes()
    orphan_text = _orphan(store, spool_dir, rows, f"{_dead_pids(1)[0]}.jsonl").read_bytes()

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        spool.append([], rows)
    assert spool.path.read_bytes() == before and spool.rows_pending == 1
    assert spool.adopt_orphans() == 0  # logged, not raised
    assert spool.path.read_bytes() == before and spool.rows_pending == 1
    (claimed,) = spool_dir.glob("*.claimed-*")
    assert claimed.read_bytes() == orphan_text
    monkeypatch.undo()
    spool.append([], rows[1:2])
    chunk = spool.next_chunk(100)
    assert chunk is not None and chunk.events == [rows[0], rows[1]]


def test_the_log_of_a_spooled_batch_says_where_and_what_happens_next(
    tmp_path: Path, make_handler: Any, spool_dir: Path, caplog: Any
) -> None:
    """Rows that could not be written are somewhere on disk: the warning names the
    file, and says they are written when the database takes writes again."""
    store = CountingStore(tmp_path / "t.db")
    store.fail_writes = {1}
    handler = make_handler(store, retry_for=0, replay_interval=3600)
    handler.handle(NoteEvent(text="waits"))
    handler.flush(30)  # spooled, then written by the flush's replay
    (message,) = [r.getMessage() for r in caplog.records if "could not write" in r.getMessage()]
    assert str(handler.writer.spool.path) in message and "takes writes again" in message


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_a_refused_default_spool_folder_is_logged_with_its_reason_not_a_traceback(
    tmp_path: Path, make_handler: Any, caplog: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows are lost, counted, and the error says why (the folder is a link) and
    what to do; the traceback of the refusal said nothing more. The warning about the
    next batch the database does not take says it is lost, not "spooling them to"."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    default_spool_dir().symlink_to(elsewhere)
    store = CountingStore(tmp_path / "t.db")
    store.fail_writes = {1, 2}
    handler = make_handler(store, retry_for=0, replay_interval=3600, spool_dir=None)
    handler.handle(NoteEvent(text="lost"))
    handler.flush(10)
    (record,) = [r for r in caplog.records if "could not be written" in r.getMessage()]
    assert "is not a folder" in record.getMessage() and "spool_dir=" in record.getMessage()
    assert not record.exc_info
    handler.handle(NoteEvent(text="lost too"))
    handler.flush(10)
    warnings = [r.getMessage() for r in caplog.records if "could not write" in r.getMessage()]
    assert "spooling them to" in warnings[0]  # not known refused yet
    assert "spooling them" not in warnings[1] and "they are lost" in warnings[1]
    assert handler.writer.rows_lost == 2
    assert list(elsewhere.iterdir()) == []


def test_a_file_that_is_not_sqlite_is_named_in_the_error(tmp_path: Path) -> None:
    """``record_to('notes.txt')`` by mistake: SQLite's own message names no file."""
    import sqlite3

    from instrumentation.storage import record_to

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n" * 100)
    with pytest.raises(sqlite3.DatabaseError, match=r"notes\.txt' is not a SQLite database"):
        record_to(notes)
    assert notes.read_text() == "my notes\n" * 100


class _FakeWinapi:
    """Windows' ``_winapi`` as ``_pid_alive_windows`` uses it (Windows cannot run here):
    OpenProcess raises as Windows does for no such process and for another user's."""

    STILL_ACTIVE = 259

    def __init__(self, processes: dict[int, int | None]) -> None:
        self.processes = processes  # pid -> exit code (STILL_ACTIVE while it runs); None: denied
        self.open_handles: set[int] = set()

    def OpenProcess(self, access: int, inherit: bool, pid: int) -> int:
        assert access == 0x1000 and inherit is False
        if pid not in self.processes:
            raise _winerror(87, "The parameter is incorrect")
        if self.processes[pid] is None:
            raise _winerror(5, "Access is denied")
        self.open_handles.add(pid)
        return pid

    def GetExitCodeProcess(self, handle: int) -> int:
        code = self.processes[handle]
        assert code is not None
        return code

    def CloseHandle(self, handle: int) -> None:
        self.open_handles.remove(handle)


def _winerror(code: int, text: str) -> OSError:
    err = OSError(22, text)
    err.winerror = code  # type: ignore[attr-defined]
    return err


def test_whether_a_spool_owner_runs_is_asked_of_windows_without_os_kill() -> None:
    """On Windows os.kill(pid, 0) sends CTRL_C_EVENT, and for a dead pid raises an
    OSError that stopped every adoption: orphaned rows were never replayed."""
    winapi = _FakeWinapi({10: 259, 11: 0, 12: None})
    assert spool_module._pid_alive_windows(10, winapi) is True  # runs
    assert spool_module._pid_alive_windows(11, winapi) is False  # exited, handle still held
    assert spool_module._pid_alive_windows(12, winapi) is True  # another user's: runs
    assert spool_module._pid_alive_windows(13, winapi) is False  # no such process
    assert winapi.open_handles == set()
    assert spool_module._pid_alive is (
        spool_module._pid_alive_windows if os.name == "nt" else spool_module._pid_alive_posix
    )
    assert spool_module._pid_alive_posix(os.getpid()) is True


def _spool_dirs_refused(tmp_path: Path) -> list[tuple[str, str]]:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases = [
        (str(a_file), "is a file, not a folder"),
        (str(a_file / "below"), "cannot be made"),
        ("", "is empty"),
        ("   ", "is empty"),
        (str(tmp_path / "a\0b"), "holds a NUL character"),
    ]
    if Path("/proc/self").is_dir():  # Linux: no folder can be made in /proc, even as root
        cases.append(("/proc/no-such-spool", "cannot be made"))
    return cases


def test_a_spool_dir_that_cannot_be_a_folder_is_refused_when_the_handler_is_made(
    tmp_path: Path,
) -> None:
    """A file, a place no folder can be made, an empty path (the working directory) or
    a NUL were taken, and found out only when an outage needed the spool; a NUL killed
    the writer thread at its start, after which every span vanished uncounted."""
    from instrumentation.storage import StorageHandler

    store = SQLiteStore(tmp_path / "t.db")
    for spool_dir, why in _spool_dirs_refused(tmp_path):
        with pytest.raises(ValueError, match=f"spool_dir .*{why}.*give a folder"):
            StorageHandler(store=store, spool_dir=spool_dir)
    assert not (tmp_path / "a-file").is_dir()
    store.close()


def test_a_spool_dir_is_made_when_the_handler_is(tmp_path: Path, make_handler: Any) -> None:
    """A folder that can be made is made at once, so that the check is the real thing."""
    target = tmp_path / "not" / "yet"
    handler = make_handler(SQLiteStore(tmp_path / "t.db"), spool_dir=str(target))
    assert target.is_dir() and handler.writer.spool.directory == target


def test_the_spool_keeps_at_most_max_bytes_of_rows_waiting(tmp_path: Path, spool_dir: Path) -> None:
    """A database down for days must not fill the disk: the rows that would take what
    waits past the bound are not written, the oldest are kept, and the count of those
    not written is returned; once rows are replayed there is room again."""
    store = SQLiteStore(tmp_path / "t.db")
    maker = RowMaker({}, {}, 10_000)
    rows = [maker.event_row(NoteEvent(text=f"{i:04d}" + "x" * 200), None) for i in range(50)]
    line = len(spool_module._line("e", rows[0]))
    spool = Spool(store.spool_key, spool_dir, max_bytes=10 * line + line // 2)
    assert spool.append([], rows[:4]) == 0
    assert spool.append([], rows[4:20]) == 10  # 6 of 16 fit
    assert spool.rows_pending == 10 and spool.path.stat().st_size <= spool.max_bytes
    assert spool.append([], rows[20:21]) == 1
    chunk = spool.next_chunk(4)
    assert chunk is not None and chunk.events == rows[:4]
    spool.mark_replayed(chunk)  # 4 lines replayed: room for 4 more (the file is compacted)
    assert spool.append([], rows[30:36]) == 2
    waiting: list[Row] = []
    while (chunk := spool.next_chunk(100)) is not None:
        waiting += chunk.events
        spool.mark_replayed(chunk)
    assert waiting == rows[4:10] + rows[30:34]
    assert telemetry.counter("storage.spooled_rows").value == 14


def test_rows_beyond_max_spool_bytes_are_lost_counted_and_logged_once_a_while(
    tmp_path: Path, make_handler: Any, caplog: Any
) -> None:
    """The writer counts the rows the full spool did not take as lost (so flush says
    False), in ``storage.spool_full_rows`` too, and warns once, not for each batch."""
    store = CountingStore(tmp_path / "t.db")
    store.fail_writes = set(range(1, 1000))
    handler = make_handler(store, retry_for=0, replay_interval=3600, max_spool_bytes=4096)
    answers = []
    for batch in range(3):
        for i in range(20):
            handler.handle(NoteEvent(text=f"{batch} {i} " + "y" * 100))
        answers.append(handler.flush(0.5))
    assert answers == [False, False, False]
    spool = handler.writer.spool
    size = spool.path.stat().st_size
    assert 3000 < size <= 4096
    lost = telemetry.counter("storage.spool_full_rows").value
    assert lost == 60 - spool.rows_pending and lost > 30
    assert handler.writer.rows_lost == lost
    assert telemetry.counter("storage.lost_rows").value == lost
    warnings = [r.getMessage() for r in caplog.records if "max_spool_bytes" in r.getMessage()]
    assert len(warnings) == 1 and str(spool.path) in warnings[0]
    store.fail_writes = set()
    assert handler.flush(30) is True  # nothing lost since this flush began
    assert count(store, "events") == 60 - lost


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (2**60, ValueError),
        ("1GB", TypeError),
        (1.5, TypeError),
        (True, TypeError),
    ],
)
def test_max_spool_bytes_is_a_whole_number_of_bytes_or_none(
    tmp_path: Path, make_handler: Any, value: Any, error: type[Exception]
) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    with pytest.raises(error, match="max_spool_bytes"):
        make_handler(store, max_spool_bytes=value)
    assert make_handler(store, max_spool_bytes=None).writer.spool.max_bytes is None
    assert make_handler(store).writer.spool.max_bytes == 1 << 30


def test_what_is_known_of_a_spool_file_lives_as_long_as_a_spool_of_it(
    tmp_path: Path, spool_dir: Path
) -> None:
    """A process that opens a store per job must not keep a record per job; a spool
    made again for the file reads it afresh, and its rows are all still there."""
    before = len(spool_module._states)
    store = SQLiteStore(tmp_path / "t.db")
    maker = RowMaker({}, {}, 10_000)
    rows = [maker.event_row(NoteEvent(text=str(i)), None) for i in range(3)]
    spool = Spool(store.spool_key, spool_dir)
    spool.append([], rows)
    twin = Spool(store.spool_key, spool_dir)
    assert twin.rows_pending == 3 and len(spool_module._states) == before + 1
    del spool, twin
    assert len(spool_module._states) == before
    again = Spool(store.spool_key, spool_dir)
    again.adopt_orphans()  # what a writer does first: our own file is counted afresh
    assert again.rows_pending == 3
    chunk = again.next_chunk(10)
    assert chunk is not None and chunk.events == rows


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux's /proc")
def test_the_spool_file_of_a_dead_process_not_reaped_yet_is_adopted(
    tmp_path: Path, spool_dir: Path
) -> None:
    """A worker killed (``kill -9``) whose parent has not waited for it yet is a
    zombie: ``os.kill(pid, 0)`` succeeds, and its spool file was taken for a live
    process's and left, however long the parent took to reap it."""
    store = SQLiteStore(tmp_path / "t.db")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:

        def state() -> bytes:
            stat = Path(f"/proc/{child.pid}/stat").read_bytes()
            return stat[stat.rfind(b")") + 2 :][:1]

        assert wait_until(lambda: state() == b"Z", 30)  # exited, not reaped (no wait())
        maker = RowMaker({}, {}, 10_000)
        rows = [maker.event_row(NoteEvent(text=f"orphan {i}"), None) for i in range(3)]
        spool_dir.mkdir(parents=True, exist_ok=True)
        prefix = Spool(store.spool_key, spool_dir).prefix
        (spool_dir / f"{prefix}-{child.pid}.jsonl").write_bytes(
            b"".join(spool_module._line("e", r) for r in rows)
        )
        assert spool_module._pid_alive(os.getpid()) is True
        assert spool_module._pid_alive(child.pid) is False
        assert Spool(store.spool_key, spool_dir).adopt_orphans() == 3
    finally:
        child.wait()


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux's /proc")
def test_a_process_whose_main_thread_ended_while_others_run_is_alive() -> None:
    """Its /proc stat shows ``Z`` as a dead process's does, with more than one thread:
    taken for dead, its spool file was adopted (renamed away) while it wrote to it."""
    code = (
        "import ctypes, sys, threading\n"
        "go = threading.Event()\n"
        "threading.Thread(target=lambda: (sys.stdin.readline(), go.set())).start()\n"
        "print('ready', flush=True)\n"
        "ctypes.CDLL(None).pthread_exit(None)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"

        def state() -> bytes:
            stat = Path(f"/proc/{child.pid}/stat").read_bytes()
            return stat[stat.rfind(b")") + 2 :][:1]

        assert wait_until(lambda: state() == b"Z", 30)  # its main thread is gone
        assert spool_module._pid_alive(child.pid) is True
    finally:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write("\n")
        child.stdin.close()
        child.wait(30)
        child.stdout.close()


def _event_rows(n: int, text: str = "") -> list[Row]:
    maker = RowMaker({}, {}, 10_000)
    return [maker.event_row(NoteEvent(text=f"{i:05d} {text}"), None) for i in range(n)]


def _lines(rows: Sequence[Row]) -> int:
    return sum(len(spool_module._line("e", r)) for r in rows)


def test_the_spool_file_stays_within_its_bound_while_replays_stop_part_way(
    tmp_path: Path, spool_dir: Path
) -> None:
    """Rows replayed from the front of the file while newer ones are appended at its
    end (a database that comes and goes, each replay stopping part-way) left the
    replayed rows in the file: what waited kept within max_bytes, the file grew for as
    long as the spool never emptied. It is compacted, and stays within an eighth more
    than the bound; every row is replayed once, in order."""
    store = SQLiteStore(tmp_path / "t.db")
    rows = _event_rows(600, "x" * 150)
    bound = _lines(rows[:60])
    spool = Spool(store.spool_key, spool_dir, max_bytes=bound)
    assert spool.append([], rows[:60]) == 0
    sizes = []
    replayed: list[Row] = []
    taken = rows[:60]
    for start in range(60, 600, 20):
        chunk = spool.next_chunk(15)  # the database takes one chunk, then fails again
        assert chunk is not None
        replayed += chunk.events
        spool.mark_replayed(chunk)
        refused = spool.append([], rows[start : start + 20])
        taken += rows[start : start + 20 - refused]
        sizes.append(spool.path.stat().st_size)
    assert max(sizes) <= bound + bound // 8, (bound, sizes)
    assert spool.path.stat().st_size - spool.replayed_bytes <= bound
    replayed += _replay_all(spool)
    assert replayed == taken
    assert not spool.path.exists()
    assert [p.name for p in spool_dir.iterdir()] == []


def test_the_writer_keeps_the_spool_file_within_max_spool_bytes_across_partial_replays(
    tmp_path: Path, make_handler: Any
) -> None:
    """The same through the writer: each replay takes one chunk (1,000 rows) and the
    database fails on the next, while new rows keep coming. Nothing is stored twice."""
    store = CountingStore(tmp_path / "t.db")
    bound = 512 * 1024
    store.fail_writes = set(range(1, 10**6))
    handler = make_handler(
        store, batch_size=500, retry_for=0, replay_interval=3600, max_spool_bytes=bound
    )
    n = 0

    def produce(count_: int) -> None:
        nonlocal n
        for _ in range(count_):
            handler.handle(NoteEvent(text=f"{n} " + "y" * 150))
            n += 1

    produce(3000)
    assert handler.flush(30) is False
    path = handler.writer.spool.path
    sizes = []
    for _ in range(6):
        # The next write (a chunk of the replay) goes in, the ones after fail.
        store.fail_writes = set(range(store.attempts + 2, 10**6))
        produce(1000)
        assert handler.flush(30) is False
        sizes.append(path.stat().st_size)
    assert max(sizes) <= bound + bound // 8, sizes
    store.fail_writes = set()
    assert handler.flush(60) is True
    texts = [e.payload["text"] for e in store.events(limit=None)]
    assert len(texts) == len(set(texts)) == n - handler.writer.rows_lost
    assert handler.writer.rows_lost == telemetry.counter("storage.spool_full_rows").value
    assert not path.exists()


def test_a_chunk_being_replayed_while_another_writer_compacts_the_file_is_marked_right(
    tmp_path: Path, spool_dir: Path
) -> None:
    """A chunk read before another writer of the process compacted the shared file
    still marks its rows replayed: the next chunk starts just after it (nothing sent
    twice, nothing skipped)."""
    store = SQLiteStore(tmp_path / "t.db")
    rows = _event_rows(40)
    bound = max(_lines(rows[:30]), _lines(rows[10:40]))  # lines differ by a byte or so
    a = Spool(store.spool_key, spool_dir, max_bytes=bound)
    b = Spool(store.spool_key, spool_dir, max_bytes=bound)
    assert a.append([], rows[:30]) == 0
    first = a.next_chunk(10)
    assert first is not None
    a.mark_replayed(first)
    in_flight = a.next_chunk(10)
    assert in_flight is not None and in_flight.events == rows[10:20]
    assert b.append([], rows[30:40]) == 0  # compacts: the first ten are cut
    assert a.path.stat().st_size == _lines(rows[10:40]) and a.replayed_bytes == 0
    a.mark_replayed(in_flight)
    assert a.rows_pending == 20
    assert _replay_all(a) == rows[20:40]


def test_without_a_bound_a_file_mostly_replayed_is_compacted(
    tmp_path: Path, spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``max_bytes=None`` bounds what waits by nothing, but the rows replayed already
    do not stay in the file for ever: once they are half of it (and a chunk at least)."""
    monkeypatch.setattr(spool_module, "CHUNK_BYTES", 1000)
    store = SQLiteStore(tmp_path / "t.db")
    rows = _event_rows(21)
    spool = Spool(store.spool_key, spool_dir, max_bytes=None)
    spool.append([], rows[:20])
    chunk = spool.next_chunk(15)
    assert chunk is not None
    spool.mark_replayed(chunk)
    assert spool.append([], rows[20:]) == 0
    assert spool.path.stat().st_size == _lines(rows[15:])
    assert _replay_all(spool) == rows[15:]


_KILLED_WHILE_COMPACTING = """
import json, os, shutil, signal, sys
from instrumentation.storage import SQLiteStore
from instrumentation.storage.spool import Spool

db, folder, rows_file, bound, point = sys.argv[1:]
rows = [tuple(r) for r in json.load(open(rows_file))]
store = SQLiteStore(db)
spool = Spool(store.spool_key, folder, max_bytes=int(bound))
spool.append([], rows[:60])
chunk = spool.next_chunk(20)  # the database takes a chunk, then goes away
store.write(chunk.spans, chunk.events)
spool.mark_replayed(chunk)
store.close()

def die():
    os.kill(os.getpid(), signal.SIGKILL)

real_copy, real_replace = shutil.copyfileobj, os.replace
if point == "copying":
    def copy(src, dst, length=0):
        dst.write(src.read(1000))
        dst.flush()
        die()
    shutil.copyfileobj = copy
elif point == "before the rename":
    os.replace = lambda src, dst: die()
else:
    def replace(src, dst):
        real_replace(src, dst)
        die()
    os.replace = replace
spool.append([], rows[60:])  # compacts first
sys.exit(3)
"""


@pytest.mark.parametrize("point", ["copying", "before the rename", "after the rename"])
def test_a_process_killed_while_compacting_its_spool_loses_and_duplicates_nothing(
    tmp_path: Path, make_handler: Any, spool_dir: Path, point: str
) -> None:
    """``kill -9`` at any point of a compaction: the next writer adopts the file (whole,
    or compacted), removes the copy left behind, and stores every row once."""
    db = tmp_path / "t.db"
    rows = _event_rows(80, "z" * 100)
    rows_file = tmp_path / "rows.json"
    rows_file.write_text(json.dumps(rows), encoding="utf-8")
    spool_dir.mkdir()
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            _KILLED_WHILE_COMPACTING,
            str(db),
            str(spool_dir),
            str(rows_file),
            str(_lines(rows[:60])),
            point,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == -9, child.stderr
    left = sorted(p.name.rpartition(".")[2] for p in spool_dir.iterdir())
    assert left == (["jsonl"] if point == "after the rename" else ["compacting", "jsonl"])
    [file] = spool_dir.glob("*.jsonl")
    whole = _lines(rows[:60])
    assert file.stat().st_size == (_lines(rows[20:60]) if point == "after the rename" else whole)
    store = SQLiteStore(db)
    assert count(store, "events") == 20  # the rows replayed before the kill
    handler = make_handler(store, replay_interval=3600)
    assert handler.flush(30) is True
    ids = [r[0] for r in store._query("SELECT id FROM events", [])]
    # The last twenty were never written: the process died before appending them.
    assert sorted(ids) == sorted(r[0] for r in rows[:60])
    assert list(spool_dir.iterdir()) == []
    assert handler.writer.rows_lost == 0


def test_a_cut_within_a_batch_refuses_a_trace_whose_root_is_cut_off(
    tmp_path: Path, spool_dir: Path
) -> None:
    """The bound cut a batch after a trace's first spans and before its root (spans go
    in the order they ended): those spans were spooled, and stored heading no trace,
    unseen. A trace whose root does not fit is refused whole, its events too, and the
    room goes to the rows after it."""
    store = SQLiteStore(tmp_path / "t.db")

    def span(span_id: str, trace: str, root: bool) -> Row:
        parent = None if root else f"{trace}-root"
        return (
            span_id,
            trace,
            parent,
            1 if root else 0,
            "n" * 300,
            "d",
            1.0,
            2.0,
            1.0,
            "ok",
            None,
            "{}",
            "{}",
            None,
            None,
            None,
            None,
            None,
            None,
        )

    def event(text: str, trace: str | None) -> Row:
        row = RowMaker({}, {}, 100).event_row(NoteEvent(text=text), None)
        return (*row[:4], trace, *row[5:])

    spans = [
        span("a1", "A", False),
        span("a2", "A", False),
        span("A-root", "A", True),
        span("b1", "B", False),
        span("b2", "B", False),
        span("B-root", "B", True),
    ]
    events = [event("in a", "A"), event("in b", "B"), event("outside", None)]
    kept = [*spans[:3], *events[:1], *events[2:]]
    size = sum(len(spool_module._line("s", r)) for r in spans[:3])
    size += sum(len(spool_module._line("e", r)) for r in (events[0], events[2]))
    assert size <= sum(len(spool_module._line("s", r)) for r in spans[:5])  # cut in B
    spool = Spool(store.spool_key, spool_dir, max_bytes=size)
    assert spool.append(spans, events) == 4
    chunk = spool.next_chunk(100)
    assert chunk is not None
    assert (chunk.spans, chunk.events) == (
        [r for r in kept if len(r) == len(spans[0])],
        [r for r in kept if len(r) != len(spans[0])],
    )


def test_a_cut_within_a_batch_keeps_the_oldest_rows_when_no_root_is_cut_off(
    tmp_path: Path, spool_dir: Path
) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    rows = _event_rows(10)
    spool = Spool(store.spool_key, spool_dir, max_bytes=_lines(rows[:4]) + 10)
    assert spool.append([], rows) == 6
    assert _replay_all(spool) == rows[:4]


def _filled_and_partly_replayed(store: SQLiteStore, spool_dir: Path, rows: list[Row]) -> Spool:
    """A spool file at its bound (``rows[:40]``), the first ten replayed: the next
    append is to compact it."""
    spool = Spool(store.spool_key, spool_dir, max_bytes=_lines(rows[:40]))
    assert spool.append([], rows[:40]) == 0
    chunk = spool.next_chunk(10)
    assert chunk is not None
    spool.mark_replayed(chunk)
    return spool


@pytest.mark.parametrize("failure", ["the copy fails", "no room for the copy"])
def test_a_compaction_that_failed_is_not_tried_again_before_each_append(
    tmp_path: Path,
    spool_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    failure: str,
) -> None:
    """A disk nearly full: the copy failed part-way, and was tried again before each
    append (each batch while the database is down), each time writing what the disk
    took (filling it to the last byte, for the database and every other process too)
    and logging a warning with its traceback. It is tried once, with the free space
    looked at first, and again once another eighth of what waits was replayed."""
    store = SQLiteStore(tmp_path / "t.db")
    rows = _event_rows(60, "x" * 100)
    spool = _filled_and_partly_replayed(store, spool_dir, rows)
    copies = []
    real_copy = shutil.copyfileobj

    def copy(src: Any, dst: Any, length: int = 0) -> None:
        copies.append(dst.name)
        if failure == "the copy fails":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_copy(src, dst, length)

    monkeypatch.setattr(spool_module.shutil, "copyfileobj", copy)
    if failure == "no room for the copy":
        usage = shutil.disk_usage(spool_dir)
        monkeypatch.setattr(
            spool_module.shutil, "disk_usage", lambda path: usage._replace(free=1000)
        )
    for i in range(40, 45):
        assert spool.append([], rows[i : i + 1]) == 0
    assert len(copies) == (1 if failure == "the copy fails" else 0)
    assert sum("could not compact" in r.getMessage() for r in caplog.records) == 1
    assert spool.path.stat().st_size == _lines(rows[:45])  # whole, the copy gone
    assert [p.name for p in spool_dir.iterdir()] == [spool.path.name]
    monkeypatch.undo()
    chunk = spool.next_chunk(4)  # another eighth of what waits is replayed
    assert chunk is not None and chunk.events == rows[10:14]
    spool.mark_replayed(chunk)
    assert spool.append([], rows[45:46]) == 0  # compacts
    assert spool.path.stat().st_size == _lines(rows[14:46])
    assert _replay_all(spool) == rows[14:46]


@pytest.mark.skipif(os.name == "nt", reason="symbolic links need a privilege on Windows")
def test_compacting_writes_no_file_through_a_link_left_at_the_copys_name(
    tmp_path: Path, spool_dir: Path
) -> None:
    """The spool folder may be shared (the system's temporary folder), and the copy's
    name is told by the pid: a symbolic link put there had its target cut and filled
    with the spool's rows, and renamed over the spool file, that target got every
    append after. The copy is made afresh."""
    store = SQLiteStore(tmp_path / "t.db")
    rows = _event_rows(60, "x" * 100)
    spool = _filled_and_partly_replayed(store, spool_dir, rows)
    victim = tmp_path / "precious.txt"
    victim.write_text("precious", encoding="utf-8")
    os.symlink(victim, spool_dir / f"{spool.prefix}-{os.getpid()}.compacting")
    assert spool.append([], rows[40:41]) == 0  # compacts
    assert victim.read_text(encoding="utf-8") == "precious"
    assert not spool.path.is_symlink()
    assert spool.path.stat().st_size == _lines(rows[10:41])
    assert _replay_all(spool) == rows[10:41]
    assert list(spool_dir.iterdir()) == []


def test_a_cut_within_a_batch_keeps_a_trace_one_of_whose_roots_fits(
    tmp_path: Path, spool_dir: Path
) -> None:
    """Spans under one remote parent (or under a parent this handler did not see open)
    are roots of one trace: the second of them cut off, the whole trace was refused,
    the root that fit and the spans below it too, though that root lists the trace."""
    store = SQLiteStore(tmp_path / "t.db")

    def span(span_id: str, parent: str, root: bool, name: str = "n" * 300) -> Row:
        row: list[Any] = [None] * len(spool_module.SPAN_COLUMNS)
        row[:10] = [span_id, "T", parent, 1 if root else 0, name, "d", 1.0, 2.0, 1.0, "ok"]
        row[10:13] = [None, "{}", "{}"]
        return tuple(row)

    spans = [
        span("c1", "R1", False),
        span("R1", "remote", True),
        span("c2", "R2", False),
        span("R2", "remote", True, "n" * 3000),
    ]
    size = sum(len(spool_module._line("s", r)) for r in spans[:3])
    spool = Spool(store.spool_key, spool_dir, max_bytes=size)
    assert spool.append(spans, []) == 1
    chunk = spool.next_chunk(100)
    assert chunk is not None and chunk.spans == spans[:3]


def _span_row(
    span_id: str, trace: str, *, root: bool, start: float, end: float | None = None, name: str = "n"
) -> Row:
    """A span row of ``trace``, a second long unless it ends at ``end`` (its root's id
    is ``<trace>-root``)."""
    end = start + 1.0 if end is None else end
    values: dict[str, Any] = dict.fromkeys(spool_module.SPAN_COLUMNS)
    values.update(
        id=span_id,
        trace_id=trace,
        parent_id=None if root else f"{trace}-root",
        is_root=1 if root else 0,
        name=name,
        dispatcher="d",
        start_time=start,
        end_time=end,
        duration=end - start,
        status="ok",
        tags="{}",
        attributes="{}",
    )
    return tuple(values[c] for c in spool_module.SPAN_COLUMNS)


def _note_row(event_id: str, at: float) -> Row:
    """An event row of no trace, at ``at``."""
    values: dict[str, Any] = dict.fromkeys(spool_module.EVENT_COLUMNS)
    values.update(id=event_id, type="Note", time=at, payload='{"text": "' + "f" * 200 + '"}')
    return tuple(values[c] for c in spool_module.EVENT_COLUMNS)


def _rows_as_given(entries: list[Row]) -> tuple[list[Row], list[Row]]:
    """A ``rows_of`` for entries that are rows already."""
    spans = [r for r in entries if len(r) == len(spool_module.SPAN_COLUMNS)]
    return spans, [r for r in entries if len(r) != len(spool_module.SPAN_COLUMNS)]


def _line_bytes(rows: Sequence[Row]) -> int:
    return sum(
        len(spool_module._line("s" if len(r) == len(spool_module.SPAN_COLUMNS) else "e", r))
        for r in rows
    )


class _Outage:
    """Makes ``store`` fail every write (the database is down) until ``end()``."""

    def __init__(self, store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.down = True

        def write_within(spans: Any, events: Any, seconds: float) -> None:
            if self.down:
                raise OSError("database unreachable (test)")
            type(store).write_within(store, spans, events, seconds)

        monkeypatch.setattr(store, "write_within", write_within)

    def end(self) -> None:
        self.down = False


@pytest.mark.parametrize("children", ["spooled", "stored"])
def test_a_root_the_full_spool_would_refuse_is_kept_when_its_spans_are_kept_already(
    any_store: Any, spool_dir: Path, monkeypatch: pytest.MonkeyPatch, children: str
) -> None:
    """The bound refused a trace whose root does not fit only as far as one batch held
    it: spans of the trace kept from an earlier batch (spooled, or stored before the
    outage) were then stored heading no trace, unlisted. Such a root is kept, past the
    bound if need be; the spans of a new trace are refused still."""
    now = time.time()
    kids = [_span_row(f"a{i}", "A", root=False, start=now - 3 + i / 10) for i in range(2)]
    root = _span_row("A-root", "A", root=True, start=now - 4, end=now - 0.2, name="r" * 300)
    filler = [_note_row(f"f{i}", now - 2) for i in range(3)]
    # A trace that started once the spool was full (before A's root ended): nothing
    # of it can be kept.
    later = [
        _span_row("c1", "C", root=False, start=now - 0.4),
        _span_row("C-root", "C", root=True, start=now - 0.5),
    ]
    bound = _line_bytes(kids if children == "spooled" else filler) + 10
    writer = BatchWriter(
        any_store,
        _rows_as_given,
        debounce=0.02,
        retry_for=0,
        replay_interval=3600,
        spool_dir=spool_dir,
        max_spool_bytes=bound,
    )
    outage = _Outage(any_store, monkeypatch)
    try:
        if children == "stored":
            outage.end()
        for row in kids:
            writer.put(row)
        assert writer.flush(5) is (children == "stored")
        if children == "stored":
            outage.down = True
            for row in filler:
                writer.put(row)
            assert writer.flush(5) is False
        writer.put(root, root=True)
        writer.flush(5)
        for row in later:
            writer.put(row, root=row is later[1])
        writer.flush(5)
        lost = writer.rows_lost
        outage.end()
        assert writer.flush(30) is True
    finally:
        writer.shutdown(5)
    assert [s.id_ for s in any_store.trace("A")] == ["A-root", "a0", "a1"]
    assert [t.trace_id for t in any_store.traces()] == ["A"]
    assert any_store.trace("C") == []
    assert lost == 2


def test_rows_of_a_trace_whose_root_the_full_spool_refused_are_refused_later_too(
    any_store: Any, spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trace refused whole for its root was refused only as far as that batch held
    it: a span that ended after its root (a task the root started and did not wait
    for) fit in a later batch, and was stored heading no trace."""
    now = time.time()
    filler = [_note_row(f"f{i}", now - 100) for i in range(3)]
    root = _span_row("B-root", "B", root=True, start=now - 10, name="r" * 300)
    late = _span_row("b1", "B", root=False, start=now - 9)
    room = _line_bytes([late]) + 10
    assert _line_bytes([root]) > room
    writer = BatchWriter(
        any_store,
        _rows_as_given,
        debounce=0.02,
        retry_for=0,
        replay_interval=3600,
        spool_dir=spool_dir,
        max_spool_bytes=_line_bytes(filler) + room,
    )
    outage = _Outage(any_store, monkeypatch)
    try:
        for batch in (filler, [root], [late]):
            for row in batch:
                writer.put(row, root=row is root)
            assert writer.flush(5) is False
        lost = writer.rows_lost
        outage.end()
        assert writer.flush(30) is True
    finally:
        writer.shutdown(5)
    assert any_store.trace("B") == []
    assert count(any_store, "spans") == 0 and count(any_store, "events") == 3
    assert lost == 2


def test_a_trace_refused_for_its_root_is_stored_again_once_a_root_of_it_comes(
    any_store: Any, spool_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """A trace refused for its root had every later row refused, for good: under a
    remote parent (restore_propagation_context) one trace id spans many requests, and
    each later request of it (its own root and all) was lost, hours after the database
    came back, and logged as "the database does not take writes". A span that ended
    after the refused root is refused still; a root of the trace lists it again."""
    now = time.time()
    filler = [_note_row(f"f{i}", now - 100) for i in range(3)]
    root = _span_row("T-root", "T", root=True, start=now - 10, name="r" * 300)
    straggler = _span_row("t1", "T", root=False, start=now - 9)
    # Another request of trace T, an hour later, under a parent in another process.
    parent = spool_module.SPAN_COLUMNS.index("parent_id")
    second_root = _span_row("R2", "T", root=True, start=now)
    second_root = (*second_root[:parent], "remote-parent", *second_root[parent + 1 :])
    second_kid = _span_row("k1", "T", root=False, start=now)
    second_kid = (*second_kid[:parent], "R2", *second_kid[parent + 1 :])
    writer = BatchWriter(
        any_store,
        _rows_as_given,
        debounce=0.02,
        retry_for=0,
        replay_interval=3600,
        spool_dir=spool_dir,
        max_spool_bytes=_line_bytes(filler) + _line_bytes([straggler]) + 10,
    )
    outage = _Outage(any_store, monkeypatch)
    try:
        for batch in (filler, [root]):
            for row in batch:
                writer.put(row, root=row is root)
            assert writer.flush(5) is False
        outage.end()
        assert writer.flush(30) is True
        caplog.clear()
        writer.put(straggler)
        assert writer.flush(5) is False
        assert writer.rows_lost == 2
        writer.put(second_kid)
        writer.put(second_root, root=True)
        assert writer.flush(5) is True
    finally:
        writer.shutdown(5)
    assert sorted(s.id_ for s in any_store.trace("T")) == ["R2", "k1"]
    assert [t.trace_id for t in any_store.traces()] == ["T"]
    assert "1 more rows" in caplog.text and "does not take writes" not in caplog.text
