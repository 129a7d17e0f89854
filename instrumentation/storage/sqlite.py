"""The embedded default: a SQLite file (standard library ``sqlite3``, WAL mode).

WAL lets readers (``python -m instrumentation tail`` in another terminal) read while
the writer writes; ``synchronous=NORMAL`` keeps a committed batch safe from an
application crash (not from a power cut), which is what tracing needs, at a fraction
of the cost of a full sync per batch.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from instrumentation.storage.base import Row, SQLStore
from instrumentation.storage.schema import (
    SCHEMA_VERSION,
    SQLITE,
    TABLES,
    NotATraceDatabaseError,
    check_readable,
    check_version,
    migrations,
)


class SQLiteStore(SQLStore):
    """Traces in a SQLite file (created with its schema if missing).

    ``path`` may be ``":memory:"`` for a store that lives as long as the object.
    Thread-safe; several processes may write one file (SQLite serialises them; each
    waits up to ``busy_timeout`` seconds for the lock).

    ``read_only=True`` only reads: the file must exist (else ``FileNotFoundError``)
    and be a trace database of this schema version (else
    :class:`NotATraceDatabaseError` or :class:`SchemaVersionError`), and nothing in it
    is created, migrated or written (``":memory:"`` is the exception: a fresh, empty
    trace database).
    """

    dialect = SQLITE

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 10.0,
        read_only: bool = False,
    ) -> None:
        super().__init__()
        self.read_only = bool(read_only)
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(
                f"SQLiteStore takes a file path (str or pathlib.Path), got {type(path).__name__}"
            )
        self.path = str(path) if str(path) == ":memory:" else str(Path(path).resolve())
        if not isinstance(busy_timeout, (int, float)) or isinstance(busy_timeout, bool):
            raise TypeError(f"busy_timeout is seconds (a number), got {busy_timeout!r}")
        if not 0 <= busy_timeout <= 86_400:
            raise ValueError(f"busy_timeout is 0 to 86400 seconds, got {busy_timeout!r}")
        self.busy_timeout = float(busy_timeout)
        self._conn: sqlite3.Connection | None = None
        # A file locked by another process must not hold up the application's start.
        self._lock_wait = min(self.busy_timeout, 0.5)
        self._connect_at_start()
        self._lock_wait = self.busy_timeout

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r}{', read_only=True' if self.read_only else ''})"

    @property
    def spool_key(self) -> str:
        return f"sqlite:{self.path}"

    def _unreachable(self, exc: BaseException) -> bool:
        # Another process holds the lock: busy, not broken. A path that cannot be
        # opened is a mistake, and is raised.
        return isinstance(exc, sqlite3.OperationalError) and (
            "locked" in str(exc) or "busy" in str(exc)
        )

    def _connection(self) -> sqlite3.Connection:
        conn = self._conn
        if conn is None:
            if self.read_only and self.path != ":memory:":
                conn = self._connect_read_only()
            else:
                conn = self._connect_and_migrate()
            self._conn = conn
        return conn

    def _connect_and_migrate(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=self._lock_wait,
            check_same_thread=False,
            isolation_level=None,
        )
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._migrate(conn)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect_read_only(self) -> sqlite3.Connection:
        # mode=rw: never create the file (a read-only file is still opened, read-only);
        # no journal_mode change, no migration; query_only refuses any write.
        if not os.path.exists(self.path):
            raise FileNotFoundError(
                f"no trace database at {self.path!r}: the file does not exist "
                "(a read_only store never creates one)"
            )
        conn = sqlite3.connect(
            f"file:{quote(self.path)}?mode=rw",
            uri=True,
            timeout=self._lock_wait,
            check_same_thread=False,
            isolation_level=None,
        )
        try:
            conn.execute("PRAGMA query_only = ON")
            try:
                found_tables = {
                    row[0]
                    for row in conn.execute(
                        "SELECT name FROM sqlite_master WHERE type = 'table'"
                    ).fetchall()
                    if row[0] in TABLES
                }
            except sqlite3.DatabaseError as exc:
                if isinstance(exc, sqlite3.OperationalError):
                    raise  # locked, busy, unreadable: not about what the file is
                raise NotATraceDatabaseError(
                    f"{self.path!r} is not a trace database: {exc} (nothing was changed)"
                ) from exc
            version = None
            if "schema_version" in found_tables:
                row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
                version = row[0] if row else None
            check_readable(repr(self.path), found_tables, version)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
            found = row[0] if row else None
            check_version(found)
            for version, statements in sorted(migrations(SQLITE).items()):
                if found is not None and version <= found:
                    continue
                for statement in statements:
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def schema_version(self) -> int:
        rows = self._query("SELECT MAX(version) FROM schema_version", [])
        return int(rows[0][0]) if rows and rows[0][0] is not None else SCHEMA_VERSION

    def write(self, spans: Sequence[Row], events: Sequence[Row]) -> None:
        self._refuse_if_read_only()
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN")
            try:
                if spans:
                    conn.executemany(self._insert_spans, spans)
                if events:
                    conn.executemany(self._insert_events, events)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _query(self, sql: str, params: Sequence[Any]) -> list[Row]:
        with self._lock:
            return list(self._connection().execute(sql, tuple(params)).fetchall())

    def is_data_error(self, exc: BaseException) -> bool:
        return super().is_data_error(exc) or isinstance(
            exc, (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError)
        )


__all__ = ["SQLiteStore"]
