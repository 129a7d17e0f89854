"""Small pieces shared by the storage tests."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from instrumentation import BaseEvent
from instrumentation.storage import SQLiteStore, Store
from instrumentation.storage.base import Row


class Usage:
    """Stands for TokenUsage by duck typing (the storage reads it with getattr)."""

    def __init__(self, prompt: int, completion: int) -> None:
        self.prompt_tokens = prompt
        self.completion_tokens = completion
        self.total_tokens = prompt + completion


class FakeLLMEndEvent(BaseEvent):
    """An event shaped like the LLM end events of instrumentation.events.llm."""

    model: str | None = None
    provider: str | None = None
    usage: Any = None
    cost_usd: float | None = None
    latency_ms: float | None = None


class NoteEvent(BaseEvent):
    text: str = ""
    value: Any = None


class ControlledSQLiteStore(SQLiteStore):
    """A real SQLite store whose writes can be made to fail or to wait."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fail = False
        self.gate = threading.Event()
        self.gate.set()
        self.attempts = 0
        self.on_write: Callable[[], None] | None = None

    def write(self, spans: Sequence[Row], events: Sequence[Row]) -> None:
        self.attempts += 1
        if self.on_write is not None:
            self.on_write()
        self.gate.wait(30)
        if self.fail:
            raise OSError("database unreachable (test)")
        super().write(spans, events)


@contextmanager
def locked_elsewhere(path: Path | str) -> Iterator[sqlite3.Connection]:
    """The SQLite file at ``path`` held locked (``BEGIN EXCLUSIVE``) by a connection of
    its own, as another process would hold it, until the block ends (or the
    connection given to the block rolls back sooner)."""
    locker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        yield locker
    finally:
        if locker.in_transaction:
            locker.execute("ROLLBACK")
        locker.close()


def count(store: Store, table: str) -> int:
    rows = store._query(f"SELECT COUNT(*) FROM {table}", [])  # type: ignore[attr-defined]
    return int(rows[0][0])


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


class CountingTime:
    """Stands for the ``time`` module in the command line (``monkeypatch.setattr(cli,
    "time", CountingTime())``), counting the pauses between ``tail``'s polls: once it
    has paused, it has read the database (or failed to) that many times."""

    monotonic = staticmethod(time.monotonic)

    def __init__(self) -> None:
        self.pauses = 0

    def sleep(self, seconds: float) -> None:
        self.pauses += 1
        time.sleep(seconds)


def record_and_exit(db: Path, calls: int, *, events: bool) -> None:
    """Run a script that records ``calls`` traced calls (each with an event if
    ``events``) into ``db`` with ``record_to`` and exits without flushing or shutting
    down: what reaches the database is the exit's doing."""
    event = "d.event(BaseEvent())" if events else "pass"
    script = f"""
from instrumentation import get_dispatcher, BaseEvent
from instrumentation.storage import record_to
d = get_dispatcher("exit.app")
record_to({str(db)!r}, batch_size=100000, debounce=60)
@d.span
def work(i):
    {event}
for i in range({calls}):
    work(i)
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


def refused_row(maker: Any, text: str = "huge") -> Row:
    """An event row SQLite refuses for its content: an integer beyond 64 bits in its
    prompt_tokens column (the row maker itself leaves such counts out, so it is made
    by hand, as a spool line of an older release may hold it)."""
    from instrumentation.storage.schema import EVENT_COLUMNS

    row = list(maker.event_row(NoteEvent(text=text), None))
    row[EVENT_COLUMNS.index("prompt_tokens")] = 2**70
    return tuple(row)


def app_role_dsn(postgres_dsn: str) -> str:
    """The address of a new role that may read and add rows to the trace tables, and
    create nothing (as an application's database role often is)."""
    import uuid

    import psycopg

    role = f"app_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
        admin.execute(f"REVOKE CREATE ON SCHEMA public FROM PUBLIC, {role}")
        admin.execute(f"GRANT SELECT, INSERT ON spans, events, schema_version TO {role}")
    return postgres_dsn.replace("postgres@", f"{role}@")
