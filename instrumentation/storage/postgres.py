"""A PostgreSQL store, for many processes or machines writing one place.

psycopg 3 is imported when a :class:`PostgresStore` is made (install the extra:
``pip install 'instrumentation[postgres]'``), never when the package is imported.
A lost connection is dropped and made again on the next call, so a server restart
costs the writer a retry, not a restart of the application.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from instrumentation.storage import checks
from instrumentation.storage.base import Row, SQLStore, text_for_databases
from instrumentation.storage.schema import (
    POSTGRES,
    READABLE_FROM,
    TABLES,
    IndexChange,
    check_readable,
    check_version,
    migrations,
    steps_after,
)

_MIGRATION_LOCK = 0x1A57_7ACE  # any constant: serialises concurrent migrations

#: How long (seconds) a migration of tables that were there before waits in all, over
#: the indexes it makes or drops, for the transactions it must outlast (see
#: ``PostgresStore._migrate_concurrently``); past that it is left for the next connection.
MIGRATION_WAIT = 10.0

#: What PostgreSQL (in English) answers to a wrong database, role or password, and what
#: libpq says of a connection string it cannot use: waiting will not put these right.
#: (A port out of range, ``port=-5`` or ``:99999``, was taken for a server that cannot
#: be reached yet, and its rows retried and spooled for ever.)
_MISCONFIGURED = (
    "does not exist",
    "password authentication failed",
    "no pg_hba.conf entry",
    "is not permitted to log in",
    "no password supplied",
    "for connection option",
    "invalid connection option",
    "invalid integer value",
    "invalid port number",
    "invalid sslmode value",
)

#: Connection parameters that change how a process connects, not which database it
#: writes: left out of the spool key, so that processes differing only in these (an
#: application name, a timeout, TLS options, a password) share their spool files.
#: Everything else (host, port, dbname, user, service, options...) stays in it.
_NOT_IDENTITY = frozenset(
    {
        "password",
        "passfile",
        "connect_timeout",
        "application_name",
        "fallback_application_name",
        "client_encoding",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
        "sslmode",
        "sslnegotiation",
        "sslcompression",
        "sslcert",
        "sslkey",
        "sslpassword",
        "sslcertmode",
        "sslrootcert",
        "sslcrl",
        "sslcrldir",
        "sslsni",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "requirepeer",
        "require_auth",
        "channel_binding",
        "gssencmode",
        "gsslib",
        "gssdelegation",
        "krbsrvname",
        "requiressl",
    }
)

logger = logging.getLogger("instrumentation.storage")

#: How long a connection attempt waits when neither the DSN nor PGCONNECT_TIMEOUT says.
DEFAULT_CONNECT_TIMEOUT = 5


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - the extra is installed in CI
        raise ImportError(
            "PostgresStore needs psycopg 3: pip install 'instrumentation[postgres]'"
        ) from exc
    return psycopg


def _holds_a_nul(row: Row) -> bool:
    """Whether ``row`` has text with a NUL, or with ``\\u0000`` (a NUL in JSON text)."""
    return any(type(value) is str and ("\x00" in value or "\\u0000" in value) for value in row)


def _without_jit(conn: Any) -> None:
    """Turn JIT compilation off for the session (PostgreSQL 11 and later have it).

    The store's queries are index lookups of milliseconds, but the planner costs the
    per-trace counts of ``traces()`` for every root it may read: given a filter few
    roots meet (``list --min-duration``, ``--dispatcher``, ``--meta``), it expects a
    read of every root, past ``jit_above_cost``, and each query was compiled first:
    0.6 to 0.8 s for a ``list`` of 100,000 roots whose scan takes 16 to 25 ms.
    """
    if conn.info.server_version >= 110000:
        # A server that speaks PostgreSQL's protocol without this setting (CockroachDB
        # says it is 13) reads as it did: what matters is that it connects.
        with contextlib.suppress(Exception):
            conn.execute("SET jit = off")


def _wait_until(conn: Any, deadline: float) -> None:
    """Have the session's next statement wait for a lock no later than ``deadline``
    (``time.monotonic()``): a millisecond, once it has passed (0 would be no limit)."""
    left_ms = max(1, round((deadline - time.monotonic()) * 1000))
    conn.execute(f"SET lock_timeout = {left_ms}")


def _drop_if_invalid(conn: Any, change: IndexChange, deadline: float) -> None:
    """Drop the index ``change`` makes if a concurrent build cut short left it there,
    invalid (``IF NOT EXISTS`` would take it as made), waiting until ``deadline``."""
    if change.on is None:
        return
    found = conn.execute(
        "SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", (change.name,)
    ).fetchone()
    if found and found[0]:
        _wait_until(conn, deadline)
        conn.execute(IndexChange(change.name).sql(concurrently=True))


class PostgresStore(SQLStore):
    """Traces in PostgreSQL; ``dsn`` is a libpq connection string or URL.

    The tables are created (and migrated) on first connection, tried when the store
    is made; a server that cannot be reached then is tried again on each call (the
    writer retries, spools and replays). ``connect_timeout`` (seconds; libpq waits 2
    at least) bounds how long a call waits for an unreachable server: given here it
    wins, else the DSN's ``connect_timeout``, else ``PGCONNECT_TIMEOUT``, else 5.
    Tables that exist at the schema version this release writes are used as they
    are, so a role that may only read and insert (no CREATE) can record.

    ``read_only=True`` only reads: the session is read-only, no table is created or
    migrated, and a database without the trace tables (or of another schema
    version) is refused with :class:`NotATraceDatabaseError` or
    :class:`SchemaVersionError`.
    """

    dialect = POSTGRES

    def __init__(
        self, dsn: str, *, connect_timeout: float | None = None, read_only: bool = False
    ) -> None:
        super().__init__()
        self.read_only = checks.flag("read_only", read_only)
        if not isinstance(dsn, str) or not dsn.strip():
            raise TypeError(
                "PostgresStore takes a connection string such as "
                "'postgresql://user@localhost:5432/traces' or 'host=... dbname=...'"
            )
        if connect_timeout is not None:
            checks.seconds("connect_timeout", connect_timeout, positive=True)
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self._told_not_migrated = False
        self._psycopg = _psycopg()
        self._check_ports()
        self._connect_options = self._timeout_option()
        self._connect_at_start()

    def _check_ports(self) -> None:
        """A port out of range (``port=-5``, ``:99999``) is a mistake in the address, not
        a server that cannot be reached yet. Checked here: libpq before 16 says only
        ``connection is bad: "99999"``, which reads like an outage."""
        try:
            given = self._psycopg.conninfo.conninfo_to_dict(self.dsn).get("port")
        except Exception:  # a malformed DSN: connecting says what is wrong with it
            return
        source = "the connection string"
        if given is None:
            given, source = os.environ.get("PGPORT"), "$PGPORT"
        for port in str(given or "").split(","):
            port = port.strip()
            if port and not (port.isdigit() and 1 <= int(port) <= 65535):
                raise ValueError(
                    f"invalid port number {port!r} in {source}: a port is 1 to 65535 "
                    "(PostgreSQL's default is 5432)"
                )

    def _timeout_option(self) -> dict[str, Any]:
        if self.connect_timeout is not None:
            return {"connect_timeout": max(1, round(self.connect_timeout))}
        try:
            given = "connect_timeout" in self._psycopg.conninfo.conninfo_to_dict(self.dsn)
        except Exception:  # a malformed DSN: connecting says what is wrong with it
            given = False
        if given or os.environ.get("PGCONNECT_TIMEOUT", "").strip():
            return {}
        return {"connect_timeout": DEFAULT_CONNECT_TIMEOUT}

    def __repr__(self) -> str:
        return f"PostgresStore({self.spool_key!r}{', read_only=True' if self.read_only else ''})"

    @property
    def spool_key(self) -> str:
        try:
            parts = self._psycopg.conninfo.conninfo_to_dict(self.dsn)
        except Exception:
            return "postgres:?"
        # Sorted, as releases before this one spelled it: a plain DSN keeps its key, and
        # the spool files a crashed process of an older release left are still found.
        return "postgres:" + " ".join(
            f"{k}={parts[k]}" for k in sorted(parts) if k not in _NOT_IDENTITY
        )

    def _connection(self) -> Any:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        conn = self._psycopg.connect(self.dsn, autocommit=True, **self._connect_options)
        try:
            if self.read_only:
                self._check_readable(conn)
            else:
                self._migrate(conn)
            _without_jit(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _migrate(self, conn: Any) -> None:
        # Reconnecting after a restart must not need more than the writes do: tables
        # at this release's version are used without DDL or the migration lock.
        present = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()[0]
        found = None
        if present:
            found = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
            check_version(found)
            if found is not None and found >= max(migrations(POSTGRES)):
                return
        try:
            if found is None or found < READABLE_FROM:
                self._migrate_locked(conn)
            else:
                self._migrate_concurrently(conn)
        except self._psycopg.errors.InsufficientPrivilege as exc:
            # The versions from READABLE_FROM on differ in indexes only: a role that may
            # only read and insert (see above) records into such tables as they are,
            # rather than not at all, until an administrator migrates them.
            if found is None or found < READABLE_FROM:
                raise
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self._tell_not_migrated(
                found,
                f"this role may not migrate it: {reason}",
                "open it once with storage.open_store() as its owner to migrate it",
            )

    def _migrate_locked(self, conn: Any) -> None:
        """Make the tables (and bring them to this release's version) in one
        transaction: new tables hold no rows, so their indexes are made at once."""
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            found = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
            check_version(found)
            for version, statements in steps_after(POSTGRES, found):
                for statement in statements:
                    conn.execute(str(statement))
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))

    def _migrate_concurrently(self, conn: Any) -> None:
        """Bring tables that were there before to this release's version without
        locking their writers out.

        In one transaction, as new tables are, a ``CREATE INDEX`` on tables holding
        millions of rows held every other process's inserts until it committed (and a
        ``DROP INDEX`` their reads too). Here each index is made (or dropped)
        ``CONCURRENTLY``, which cannot run in a transaction: one at a time, the
        version recorded once all of its steps are done. An index that a build cut
        short left invalid (``IF NOT EXISTS`` would take it as made) is dropped and
        made again. A concurrent build waits for the transactions that write the table
        and those holding an older snapshot, anywhere in the database: each wait is
        cut at what is left of :data:`MIGRATION_WAIT` seconds from the start (given to
        each step, and to the drop of an index a step left invalid, the waits added
        up: 20 s for one transaction that held the table), after which the migration
        is left for the next connection, and the tables are recorded into as they are
        (the versions from ``READABLE_FROM`` on differ in indexes only). So it is when
        a step is cancelled (by a ``statement_timeout`` of the connection string), or
        when another process is migrating them already.
        """
        take = conn.execute("SELECT pg_try_advisory_lock(%s)", (_MIGRATION_LOCK,)).fetchone()
        if not take[0]:
            logger.info(
                "instrumentation.storage: another process is migrating %r; recording into "
                "it as it is meanwhile",
                self,
            )
            return
        found = None
        deadline = time.monotonic() + MIGRATION_WAIT
        errors = self._psycopg.errors
        try:
            found = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
            check_version(found)
            for version, statements in steps_after(POSTGRES, found):
                for statement in statements:
                    if isinstance(statement, IndexChange):
                        self._change_index_concurrently(conn, statement, deadline)
                    else:
                        conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
        except errors.LockNotAvailable as exc:
            self._tell_not_migrated(
                found, f"it waited {MIGRATION_WAIT:g} s for other transactions ({exc})"
            )
        except errors.QueryCanceled as exc:
            self._tell_not_migrated(found, f"a step was cancelled: {exc}")
        finally:
            with contextlib.suppress(self._psycopg.Error):  # a broken connection let it go
                conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))

    def _change_index_concurrently(self, conn: Any, change: IndexChange, deadline: float) -> None:
        """Make or drop one index CONCURRENTLY, each wait cut at ``deadline``
        (``time.monotonic()``)."""
        errors = self._psycopg.errors
        cut_short = (errors.LockNotAvailable, errors.QueryCanceled)
        try:
            try:
                _drop_if_invalid(conn, change, deadline)
                _wait_until(conn, deadline)
                conn.execute(change.sql(concurrently=True))
            except cut_short:
                # A build cut short leaves its index invalid, yet updated by every
                # write: dropped if it can be in what is left of the wait (else by
                # the next try).
                with contextlib.suppress(*cut_short):
                    _drop_if_invalid(conn, change, deadline)
                raise
        finally:
            conn.execute("RESET lock_timeout")

    def _tell_not_migrated(
        self, found: int | None, why: str, remedy: str = "until a connection migrates it"
    ) -> None:
        """Log once per store that its tables are recorded into at version ``found``."""
        if self._told_not_migrated:
            return
        self._told_not_migrated = True
        logger.warning(
            "instrumentation.storage: %r has trace schema version %s and was not migrated "
            "to %s (%s); recording into it as it is (reads that its new indexes serve are "
            "slower): %s",
            self,
            found,
            max(migrations(POSTGRES)),
            why,
            remedy,
        )

    def _check_readable(self, conn: Any) -> None:
        conn.execute("SET default_transaction_read_only = on")
        found = conn.execute(
            "SELECT " + ", ".join("to_regclass(%s) IS NOT NULL" for _ in TABLES), list(TABLES)
        ).fetchone()
        tables = {name for name, present in zip(TABLES, found, strict=True) if present}
        version = None
        if "schema_version" in tables:
            version = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
        check_readable(f"PostgreSQL database {self.spool_key!r}", tables, version)

    def _unreachable(self, exc: BaseException) -> bool:
        # A connection error carries no SQLSTATE, only libpq's text. Only a server that
        # plainly says the address is wrong (no such database or role, a refused
        # password) is raised; anything else, in any language, counts as "down": the
        # application goes on, and the failure is logged and counted.
        if not isinstance(exc, self._psycopg.OperationalError):
            return False
        text = str(exc)
        return not any(words in text for words in _MISCONFIGURED)

    def _forget_broken(self, exc: BaseException) -> bool:
        """Drop the connection after a connection-level error; True if it was one the
        server had closed (``idle_session_timeout``, a restart, a killed session)."""
        conn = self._conn
        if not isinstance(exc, self._psycopg.OperationalError) or conn is None:
            return False
        lost = bool(getattr(conn, "broken", False) or conn.closed)
        try:
            conn.close()
        except Exception:
            pass
        self._conn = None
        return lost

    def _once_more_if_lost(self, call: Any) -> Any:
        # A session that sat idle may have been closed by the server meanwhile: that is
        # found out only by using it. Once, on a new connection, before it is a failure
        # (inserts skip rows already stored, so a commit that did happen is no harm).
        reused = self._conn is not None and not self._conn.closed
        try:
            return call(self._connection())
        except BaseException as exc:
            if not (self._forget_broken(exc) and reused):
                raise
        return call(self._connection())

    def _write_rows(self, conn: Any, spans: Sequence[Row], events: Sequence[Row]) -> None:
        with conn.transaction(), conn.cursor() as cur:
            if spans:
                cur.executemany(self._insert_spans, spans)
            if events:
                cur.executemany(self._insert_events, events)

    def write(self, spans: Sequence[Row], events: Sequence[Row]) -> None:
        self._refuse_if_read_only()
        # PostgreSQL refuses a NUL in text, and its escape in jsonb: such a row is
        # cleaned before it is sent, as it would be once refused. Refused, it took its
        # batch with it (written again, and psycopg logged "error ignored terminating
        # <psycopg.Pipeline ...>" for the refused executemany).
        if any(map(_holds_a_nul, spans)):
            spans = [self.cleaned(r, True) if _holds_a_nul(r) else r for r in spans]
        if any(map(_holds_a_nul, events)):
            events = [self.cleaned(r, False) if _holds_a_nul(r) else r for r in events]
        with self._lock:
            try:
                self._once_more_if_lost(lambda conn: self._write_rows(conn, spans, events))
            except BaseException as exc:
                self._forget_broken(exc)
                raise

    def _query(self, sql: str, params: Sequence[Any]) -> list[Row]:
        with self._lock:
            self._raise_if_failed_just_now(
                self._connect_options.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT)
            )
            # Stored text had NULs and lone surrogates replaced (PostgreSQL takes
            # neither): a filter value is matched the same way, not refused.
            cleaned = [text_for_databases(v) if isinstance(v, str) else v for v in params]
            try:
                rows: list[Row] = self._once_more_if_lost(
                    lambda conn: list(conn.execute(sql, cleaned).fetchall())
                )
                return rows
            except BaseException as exc:
                self._forget_broken(exc)
                raise

    def is_data_error(self, exc: BaseException) -> bool:
        # A ProgrammingError raised by psycopg itself (no SQLSTATE: a value it cannot
        # adapt, a row with the wrong number of values) is about the row; one from the
        # server (SQLSTATE class 42: no such table or column, no privilege) is about
        # the database, and the rows wait in the spool until it is put right. A limit
        # of the server's that a row passes (SQLSTATE class 54: an index entry too
        # large) is about the row too: kept in the spool, it was replayed and refused
        # for good, and every row after it waited behind it.
        psycopg = self._psycopg
        return (
            super().is_data_error(exc)
            or isinstance(exc, (psycopg.DataError, psycopg.IntegrityError))
            or str(getattr(exc, "sqlstate", None) or "").startswith("54")
            or (
                isinstance(exc, psycopg.ProgrammingError) and getattr(exc, "sqlstate", None) is None
            )
        )


__all__ = ["MIGRATION_WAIT", "PostgresStore"]
