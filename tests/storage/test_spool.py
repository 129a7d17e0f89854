"""The spool: replayed a bounded chunk at a time, resumed where it stopped, never stuck."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from instrumentation import telemetry
from instrumentation.storage import SQLiteStore
from instrumentation.storage.base import Row
from instrumentation.storage.serialise import RowMaker
from instrumentation.storage.spool import Spool, default_spool_dir

from .helpers import ControlledSQLiteStore, FakeLLMEndEvent, NoteEvent, Usage, count, wait_until

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
    bad = FakeLLMEndEvent(model="huge", usage=Usage(2**70, 1))
    spool.append([], [maker.event_row(NoteEvent(text="before"), None)])
    spool.append([], [maker.event_row(bad, None)])
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
    """``<tempdir>/instrumentation-spool/<first 16 hex of sha256(spool_key)>-<pid>.jsonl``."""
    store = SQLiteStore(tmp_path / "t.db")
    assert store.spool_key == f"sqlite:{tmp_path / 't.db'}"
    handler = make_handler(store, spool_dir=None)
    key_hash = hashlib.sha256(store.spool_key.encode("utf-8")).hexdigest()[:16]
    assert handler.writer.spool.path == default_spool_dir() / f"{key_hash}-{os.getpid()}.jsonl"
    assert default_spool_dir() == Path(tempfile.gettempdir()) / "instrumentation-spool"
    doc = (ROOT / "docs" / "storage.md").read_text(encoding="utf-8")
    assert "`<spool_dir>/<key hash>-<pid>.jsonl`" in doc
    assert "first 16 hex digits of the SHA-256" in doc and "instrumentation-spool" in doc


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
