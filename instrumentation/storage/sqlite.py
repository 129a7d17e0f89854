"""The embedded default: a SQLite file (standard library ``sqlite3``, WAL mode).

WAL lets readers (``python -m instrumentation tail`` in another terminal) read while
the writer writes; ``synchronous=NORMAL`` keeps a committed batch safe from an
application crash (not from a power cut), which is what tracing needs, at a fraction
of the cost of a full sync per batch.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from instrumentation import telemetry
from instrumentation._text import without_lone_surrogates
from instrumentation.storage import checks
from instrumentation.storage.addresses import redacted
from instrumentation.storage.base import Row, SQLStore
from instrumentation.storage.schema import (
    SCHEMA_VERSION,
    SQLITE,
    TABLES,
    NotATraceDatabaseError,
    check_readable,
    check_version,
    steps_after,
)

#: What a trace database address may be, for error messages.
ACCEPTED_ADDRESSES = (
    "a SQLite file path (or a sqlite:///path URL) or a PostgreSQL DSN "
    "(postgresql://user@host/db, postgres://..., or 'host=... dbname=...')"
)

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")

logger = logging.getLogger("instrumentation.storage")
#: How long a writer's ``close()`` waits for other connections (a reader in the middle
#: of a query, another process's write) to copy the write-ahead log into the file.
CHECKPOINT_WAIT = 1.0
_FILE_REPLACED = telemetry.counter("storage.database_file_replaced")


def _file_id(path: str) -> tuple[int, int] | None:
    """The (device, inode) of the file at ``path``; None if there is none."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def sqlite_path(address: str) -> str:
    """The file path a SQLite address names (``":memory:"`` for an in-memory database).

    A plain path is itself. A SQLAlchemy-style URL is taken as well: ``sqlite:///x.db``
    is ``x.db`` (relative), ``sqlite:////tmp/x.db`` is ``/tmp/x.db``, and ``sqlite://``
    or ``sqlite:///:memory:`` is ``":memory:"``; the rest of the URL is the path as
    written (no host, no ``?`` query parameters, no ``%`` decoding). Anything else
    with a ``scheme://`` (``mysql://``, ``http://``...) and an empty address are a
    ``ValueError`` naming the accepted forms.
    """
    shown = redacted(address)
    if not address.strip():
        raise ValueError(f"no trace database named ({address!r}); give {ACCEPTED_ADDRESSES}")
    match = _URL.match(address)
    if match is None:
        return address
    scheme = match.group(1).lower()
    if scheme in ("postgres", "postgresql"):
        raise ValueError(
            f"{shown!r} is a PostgreSQL DSN, not a SQLite path: open it with "
            "storage.open_store() or storage.PostgresStore()"
        )
    if scheme != "sqlite":
        hint = ""
        if scheme.startswith(("sqlite+", "postgres+", "postgresql+")):
            hint = f" (without the driver: {scheme.split('+')[0]}://...)"
        raise ValueError(
            f"{shown!r} is not a trace database address: {scheme}:// is not supported; "
            f"give {ACCEPTED_ADDRESSES}{hint}"
        )
    rest = address[match.end() :]
    if rest == "":
        return ":memory:"
    if not rest.startswith("/"):
        raise ValueError(
            f"{shown!r} names a host; a SQLite URL has none: sqlite:///relative.db or "
            "sqlite:////absolute/path.db"
        )
    if "?" in rest:
        raise ValueError(
            f"{shown!r} has query parameters, which a trace database address does not "
            "take; give the path alone (sqlite:///path or the path itself)"
        )
    path = rest[1:]
    if path in ("", ":memory:"):
        return ":memory:"
    return path


def _check_place(path: str, read_only: bool) -> None:
    """Refuse, with a clear ``OSError``, a path SQLite could only fail on with a bare
    "unable to open database file" or "disk I/O error": a folder, or (to create the
    file) a parent folder that does not exist."""
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"{path!r} is a folder, not a SQLite trace database; give a file path in it"
        )
    if read_only:
        return  # a missing file: FileNotFoundError when connecting
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        what = NotADirectoryError if os.path.exists(parent) else FileNotFoundError
        raise what(
            f"cannot create the SQLite trace database {path!r}: {parent!r} "
            + ("is not a folder" if what is NotADirectoryError else "does not exist")
            + " (create the folder first)"
        )


def _case_sensitive_like(conn: sqlite3.Connection) -> None:
    """Make ``LIKE`` tell upper from lower case, as PostgreSQL's does and as ``=``
    does: the ``name`` and ``dispatcher`` filters of ``traces()`` (``LIKE`` with a
    wildcard, ``=`` without) then select the same rows on both stores, with or
    without a ``*``. (SQLite's ``LIKE`` ignores the case of ASCII letters otherwise.)"""
    conn.execute("PRAGMA case_sensitive_like = ON")


def _cannot_make_files(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite failed to make the ``-wal``/``-shm`` files it needs to read a
    WAL database (as another user: "attempt to write a readonly database"; as root in
    a directory that is immutable: "unable to open database file")."""
    text = str(exc)
    return "readonly database" in text or "unable to open database file" in text


class SQLiteStore(SQLStore):
    """Traces in a SQLite file (created with its schema if missing).

    ``path`` is a file path, or a ``sqlite:///path`` URL (see :func:`sqlite_path`);
    ``":memory:"`` makes a store that lives as long as the object. The file's folder
    must exist (else ``FileNotFoundError``); a folder, another URL or an empty path is
    refused (``IsADirectoryError``, ``ValueError``).
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
        self.read_only = checks.flag("read_only", read_only)
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(
                f"SQLiteStore takes a file path (str or pathlib.Path), got {type(path).__name__}"
            )
        text = sqlite_path(os.fspath(path))
        self.path = text if text == ":memory:" else str(Path(text).resolve())
        if self.path != ":memory:":
            _check_place(self.path, self.read_only)
        self.busy_timeout = checks.seconds("busy_timeout", busy_timeout)
        self._conn: sqlite3.Connection | None = None
        #: (device, inode) of the file the connection writes, to notice it being replaced.
        self._file_id: tuple[int, int] | None = None
        self._snapshot = False
        #: Whether opening this store made the file (it did not exist before).
        self.created = self.path != ":memory:" and not os.path.exists(self.path)
        # A file locked by another process must not hold up the application's start.
        self._lock_wait = min(self.busy_timeout, 0.5)
        try:
            self._connect_at_start()
        except sqlite3.OperationalError as exc:
            if type(exc) is not sqlite3.OperationalError or self.path in str(exc):
                raise
            # sqlite3 names no file ("unable to open database file"): say which.
            raise sqlite3.OperationalError(
                f"cannot open the SQLite trace database {self.path!r}: {exc}"
            ) from exc
        self._lock_wait = self.busy_timeout

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r}{', read_only=True' if self.read_only else ''})"

    @property
    def spool_key(self) -> str:
        return f"sqlite:{self.path}"

    def _unreachable(self, exc: BaseException) -> bool:
        # Another process holds the lock: busy, not broken. A path that cannot be
        # opened is a mistake, and is raised.
        return self._busy(exc)

    def _busy(self, exc: BaseException) -> bool:
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
                self._file_id = _file_id(self.path)
            self._conn = conn
        return conn

    def _check_same_file(self) -> None:
        """Before a write: if the file was removed or replaced since it was opened (a
        clean-up, a restore), the rows would go to a file no one can read. Say so and
        open the file at the path now (creating it again if it is gone)."""
        if self._conn is None or self.path == ":memory:":
            return
        now = _file_id(self.path)
        if now == self._file_id:
            return
        _FILE_REPLACED.inc()
        logger.warning(
            "instrumentation.storage: %r was %s while open; writing to the file at that "
            "path from now on (rows written before are in the old file, if it is kept)",
            self,
            "removed" if now is None else "replaced",
        )
        self._conn.close()
        self._conn = None

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
            _case_sensitive_like(conn)
            self._migrate(conn)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        except sqlite3.DatabaseError as exc:
            conn.close()
            if type(exc) is not sqlite3.DatabaseError:  # locked, read-only...: as they are
                raise
            # SQLite's own words name no file: a path given by mistake (notes.txt, the
            # application's data file) must be recognisable as the cause.
            raise sqlite3.DatabaseError(
                f"{self.path!r} is not a SQLite database ({exc}): give a new file's path, "
                "or one a trace store wrote"
            ) from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect_read_only(self) -> sqlite3.Connection:
        """A connection that reads the file and changes nothing in it.

        - No ``-wal`` file (the database was closed cleanly, or is not in WAL mode):
          ``mode=rw`` (a file that cannot be written is still opened, read-only).
          SQLite makes ``-wal`` and ``-shm`` files to read a WAL database, and removes
          them when the connection closes; there is nothing in them to copy into the
          database. (``mode=ro`` would leave them behind.)
        - A ``-wal`` file (another process is writing, or one crashed): ``mode=ro``.
          A read-write connection closing last would checkpoint the WAL into the
          database and remove it; a read-only one never writes either file.
        - A WAL database without ``-wal`` in a directory this user cannot write:
          SQLite cannot make the files it needs to read it, and neither mode opens it.
          Then it is opened ``immutable`` (no ``-wal``: every committed row is in the
          file), and, since ``immutable`` also means "nobody else writes it", again for
          every query, so rows written since are read (see :meth:`_query`).

        No journal-mode change, no migration, and ``query_only`` refuses any write.
        """
        if not os.path.exists(self.path):
            raise FileNotFoundError(
                f"no trace database at {self.path!r}: the file does not exist "
                "(a read_only store never creates one)"
            )
        self._snapshot = False
        wal = os.path.exists(self.path + "-wal")
        try:
            return self._open_checked("mode=ro" if wal else "mode=rw")
        except sqlite3.OperationalError as exc:
            if wal or os.path.exists(self.path + "-journal") or not _cannot_make_files(exc):
                raise
            conn = self._open_checked("mode=ro&immutable=1")
            self._snapshot = True
            return conn

    def _open_checked(self, query: str) -> sqlite3.Connection:
        conn = sqlite3.connect(
            f"file:{quote(self.path)}?{query}",
            uri=True,
            timeout=self._lock_wait,
            check_same_thread=False,
            isolation_level=None,
        )
        try:
            conn.execute("PRAGMA query_only = ON")
            _case_sensitive_like(conn)
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
            for version, statements in steps_after(SQLITE, found):
                for statement in statements:
                    conn.execute(str(statement))
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
            self._check_same_file()
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

    def write_within(self, spans: Sequence[Row], events: Sequence[Row], seconds: float) -> None:
        full = int(self.busy_timeout * 1000)
        wait = min(full, max(0, int(seconds * 1000)))
        if wait == full or self.read_only:
            self.write(spans, events)
            return
        with self._lock:  # re-entrant: write() takes it too
            self._check_same_file()  # here, or write() would reconnect with the full wait
            # Connecting (and migrating) waits for a lock too: a file locked since the
            # application started must not hold the writer past its retries either.
            self._lock_wait = wait / 1000
            try:
                conn = self._connection()
            finally:
                self._lock_wait = self.busy_timeout
            conn.execute(f"PRAGMA busy_timeout = {wait}")
            try:
                self.write(spans, events)
            finally:
                try:
                    conn.execute(f"PRAGMA busy_timeout = {full}")
                except sqlite3.Error:  # the connection broke: the next one starts afresh
                    pass

    def close(self) -> None:
        """Close the connection; a later call reconnects.

        A writer first copies the write-ahead log into the database file
        (``PRAGMA wal_checkpoint(TRUNCATE)``): SQLite does that by itself only when
        the last connection to the file closes, so a reader still connected (``tail``
        in another terminal, a long-lived ``read_only`` store) would otherwise leave
        rows in ``-wal`` only, and the file alone would be incomplete. A reader in the
        middle of a query holds the copy up: it is waited for :data:`CHECKPOINT_WAIT`
        seconds at most (other writers are not kept out meanwhile unless a reader
        holds pages back), and if the copy cannot finish then, that is logged (INFO):
        nothing is lost, the rows are in ``-wal`` until the next writer's close or the
        last connection's.
        """
        with self._lock:
            conn = self._conn
            if conn is not None and not self.read_only and self.path != ":memory:":
                self._checkpoint(conn)
            super().close()

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        # PASSIVE first: it copies what no reader still needs without waiting, and
        # without keeping other writers out. TRUNCATE (which does keep them out while it
        # waits) only for what a reader's snapshot held back, or to empty the log.
        try:
            conn.execute("PRAGMA busy_timeout = 0")
            row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            copied_all = bool(row) and not row[0] and row[2] >= row[1]
            wait = 0.1 if copied_all else CHECKPOINT_WAIT
            conn.execute(f"PRAGMA busy_timeout = {int(wait * 1000)}")
            row = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as exc:  # locked, or the file went away
            logger.info(
                "instrumentation.storage: closing %r, the write-ahead log could not be "
                "checked (%s); its rows are safe in %s",
                self,
                exc,
                os.path.basename(self.path) + "-wal",
            )
            return
        # (busy, frames in the log, frames copied). Busy with every frame copied: only
        # emptying the log waited for another connection, and the file is complete.
        if row and row[0] and row[2] < row[1]:
            logger.info(
                "instrumentation.storage: closing %r, another connection kept SQLite "
                "from copying the write-ahead log into the file within %.1f s (%d of %d "
                "pages copied); its rows are safe in %s and are copied by the next "
                "writer to close or the last connection to close, so the file alone may "
                "lack them until then",
                self,
                CHECKPOINT_WAIT,
                row[2],
                row[1],
                os.path.basename(self.path) + "-wal",
            )

    def _query(self, sql: str, params: Sequence[Any]) -> list[Row]:
        # Stored text had lone surrogates replaced (see cleaned()): a filter value is
        # matched the same way, as on PostgreSQL, not refused by sqlite3's encoding
        # (a trace id prefix or a name decoded with surrogateescape raised
        # UnicodeEncodeError).
        values = tuple(without_lone_surrogates(v) if isinstance(v, str) else v for v in params)
        with self._lock:
            try:
                return list(self._connection().execute(sql, values).fetchall())
            finally:
                if self._snapshot:  # immutable: opened again for the next query
                    self.close()

    def cleaned(self, row: Row, is_span: bool) -> Row:
        # SQLite takes NUL characters (in text and JSON text alike): only lone
        # surrogates, which no UTF-8 text holds, are replaced.
        return tuple(without_lone_surrogates(v) if isinstance(v, str) else v for v in row)

    def is_data_error(self, exc: BaseException) -> bool:
        # A value sqlite3 cannot bind (a dict, a list) or a row of the wrong length is
        # a ProgrammingError, raised before SQLite runs anything: about the row. The
        # other ProgrammingErrors (a closed connection...) and every OperationalError
        # ("no such table", "database is locked") are not.
        return (
            super().is_data_error(exc)
            or isinstance(exc, (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError))
            or (isinstance(exc, sqlite3.ProgrammingError) and "binding" in str(exc))
        )


__all__ = ["SQLiteStore"]
