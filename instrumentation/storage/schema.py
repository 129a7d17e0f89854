"""The tables, their columns and the migrations that create them, for each SQL dialect.

Rows travel from the writer to a store (and through the spool file) as tuples in the
column order below, with times as seconds since the epoch and JSON columns as text,
so a row is JSON-able as it is and both backends take the same rows.

A store records the version it migrated to in ``schema_version``. A database whose
version is newer than :data:`SCHEMA_VERSION` was written by a newer release: the store
refuses it with :class:`SchemaVersionError` rather than writing rows it cannot read.

A store opened with ``read_only=True`` (what the command line does) creates and
migrates nothing: a database without the trace tables is refused with
:class:`NotATraceDatabaseError`, and one older than :data:`READABLE_FROM` with
:class:`SchemaVersionError` (opening it once for writing with this release migrates
it). The versions from :data:`READABLE_FROM` on differ in their indexes only: one of
them is read as it is (a query an index it lacks would serve is slower, not wrong).
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 2

#: The oldest version a ``read_only`` store reads as it is: the later ones only add or
#: replace indexes, so its tables and columns are this release's.
READABLE_FROM = 1

META_COLUMNS: tuple[str, ...] = (
    "application",
    "environment",
    "user_id",
    "session_id",
    "run_id",
    "step_id",
)

SPAN_COLUMNS: tuple[str, ...] = (
    "id",
    "trace_id",
    "parent_id",
    "is_root",
    "name",
    "dispatcher",
    "start_time",
    "end_time",
    "duration",
    "status",
    "error",
    "tags",
    "attributes",
    *META_COLUMNS,
)

EVENT_COLUMNS: tuple[str, ...] = (
    "id",
    "type",
    "time",
    "span_id",
    "trace_id",
    "payload",
    "model",
    "provider",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_usd",
    "latency_ms",
    "error",
    *META_COLUMNS,
)

TIME_COLUMNS = frozenset({"start_time", "end_time", "time"})
JSON_COLUMNS = frozenset({"tags", "attributes", "payload"})


#: The tables every trace database has.
TABLES: tuple[str, ...] = ("schema_version", "spans", "events")


class SchemaVersionError(RuntimeError):
    """The database was created by a newer release of instrumentation than this one
    (or, opened ``read_only``, by an older one: it must be migrated first)."""


class NotATraceDatabaseError(RuntimeError):
    """Opened ``read_only``, the database has no trace tables (it was never written by
    a trace store, or belongs to something else); nothing was changed."""


@dataclass(frozen=True)
class Dialect:
    """How one SQL backend spells the few things that differ."""

    name: str
    param: str  # the placeholder: "?" or "%s"
    text: str
    real: str
    integer: str
    timestamp: str
    json: str
    #: Trace ids are looked up by prefix as a range compared bytewise (see
    #: ``SQLStore.trace_ids_starting_with``). PostgreSQL's index on a column serves a
    #: range only in the column's collation, so the column is kept in "C" rather than
    #: in the database's (which may order "19000" after "2", or ignore case).
    trace_id: str

    def time_param(self) -> str:
        """A placeholder for a time given as epoch seconds."""
        return self.param if self.timestamp == self.real else f"to_timestamp({self.param})"

    def time_value(self, column: str) -> str:
        """A time column read back as epoch seconds."""
        if self.timestamp == self.real:
            return column
        return f"EXTRACT(EPOCH FROM {column})::float8"

    def json_param(self) -> str:
        return self.param if self.json == self.text else f"{self.param}::{self.json}"

    def json_value(self, column: str) -> str:
        return column if self.json == self.text else f"{column}::text"


SQLITE = Dialect("sqlite", "?", "TEXT", "REAL", "INTEGER", "REAL", "TEXT", "TEXT")
POSTGRES = Dialect(
    "postgres",
    "%s",
    "TEXT",
    "DOUBLE PRECISION",
    "BIGINT",
    "TIMESTAMPTZ",
    "JSONB",
    'TEXT COLLATE "C"',
)


def _column_type(d: Dialect, column: str) -> str:
    if column == "trace_id":
        return d.trace_id
    if column in TIME_COLUMNS:
        return d.timestamp
    if column in JSON_COLUMNS:
        return d.json
    if column in {"is_root", "prompt_tokens", "completion_tokens", "total_tokens"}:
        return d.integer
    if column in {"duration", "cost_usd", "latency_ms"}:
        return d.real
    return d.text


def _create_table(d: Dialect, table: str, columns: tuple[str, ...]) -> str:
    lines = []
    for column in columns:
        kind = _column_type(d, column)
        if column == "id":
            kind += " PRIMARY KEY"
        elif column in {"trace_id", "start_time", "duration", "status", "type", "time"} and (
            table == "spans" or column in {"type", "time"}
        ):
            kind += " NOT NULL"
        lines.append(f"    {column} {kind}")
    return f"CREATE TABLE IF NOT EXISTS {table} (\n" + ",\n".join(lines) + "\n)"


@dataclass(frozen=True)
class IndexChange:
    """A migration step that makes an index (``on``: its table, columns and condition)
    or, with ``on=None``, drops one.

    Told apart from other statements so that PostgreSQL can make it on tables that
    hold rows without locking writers out (``CONCURRENTLY``: see
    ``PostgresStore._migrate_concurrently``); ``str()`` is the plain statement.
    """

    name: str
    on: str | None = None

    def sql(self, concurrently: bool = False) -> str:
        how = " CONCURRENTLY" if concurrently else ""
        if self.on is None:
            return f"DROP INDEX{how} IF EXISTS {self.name}"
        return f"CREATE INDEX{how} IF NOT EXISTS {self.name} ON {self.on}"

    def __str__(self) -> str:
        return self.sql()


def migrations(d: Dialect) -> dict[int, list[str | IndexChange]]:
    """Version -> the statements that bring a database from ``version - 1`` to it."""
    return {
        1: [
            _create_table(d, "spans", SPAN_COLUMNS),
            _create_table(d, "events", EVENT_COLUMNS),
            # store.trace(): every span and event of one trace.
            "CREATE INDEX IF NOT EXISTS spans_trace_id ON spans (trace_id)",
            "CREATE INDEX IF NOT EXISTS events_trace_id ON events (trace_id)",
            "CREATE INDEX IF NOT EXISTS events_span_id ON events (span_id)",
            # store.traces(): recent roots first, or roots that ended since (tail).
            "CREATE INDEX IF NOT EXISTS spans_roots_start ON spans (start_time) WHERE is_root = 1",
            "CREATE INDEX IF NOT EXISTS spans_roots_end ON spans (end_time) WHERE is_root = 1",
            "CREATE INDEX IF NOT EXISTS spans_name_start ON spans (name, start_time)",
            "CREATE INDEX IF NOT EXISTS events_type_time ON events (type, time)",
        ],
        # Indexes only (a store of version 1 is still read as it is, see READABLE_FROM),
        # from a store of 1,000,000 spans in 100,000 traces:
        2: [
            # traces(name=...) looks among roots only: an index of every span's name
            # read 400,000 entries to find that a nested span's name heads no trace, and
            # took the writer's time for each span. This one has a row per root (the
            # other is dropped below).
            IndexChange("spans_roots_name", "spans (name, start_time) WHERE is_root = 1"),
            # traces(status="error"): the failed traces, however rare, without reading
            # every root newer than them.
            IndexChange("spans_roots_status", "spans (status, start_time) WHERE is_root = 1"),
            # events() without a type: the oldest events, not a sort of all of them.
            # It takes the place of the index by span id, which no query reads (the
            # events of a span are read with those of its trace), so that writing an
            # event costs what it did.
            IndexChange("events_time", "events (time)"),
            # Dropped last: a plain DROP INDEX locks its table against reading too
            # until the migration commits (PostgreSQL drops them CONCURRENTLY, as it
            # makes the indexes above, when the tables were there before).
            IndexChange("spans_name_start"),
            IndexChange("events_span_id"),
        ],
    }


def steps_after(d: Dialect, found: int | None) -> list[tuple[int, list[str | IndexChange]]]:
    """The versions after ``found`` (None: a database without tables), oldest first,
    each with the statements that bring a database to it."""
    return sorted((v, s) for v, s in migrations(d).items() if found is None or v > found)


def insert_sql(d: Dialect, table: str, columns: tuple[str, ...]) -> str:
    """An idempotent insert: replaying a row already stored does nothing."""
    values = []
    for column in columns:
        if column in TIME_COLUMNS:
            values.append(d.time_param())
        elif column in JSON_COLUMNS:
            values.append(d.json_param())
        else:
            values.append(d.param)
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(values)}) "
        "ON CONFLICT (id) DO NOTHING"
    )


def check_version(found: int | None) -> None:
    if found is not None and found > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"the trace database has schema version {found}, newer than the version this "
            f"release of instrumentation knows ({SCHEMA_VERSION}); upgrade instrumentation "
            "to read or write it (nothing was changed)"
        )


def check_readable(where: str, tables: set[str], found: int | None) -> None:
    """Refuse, for reading only, a database that is not a trace database of this schema.

    ``tables`` are those of :data:`TABLES` the database has; ``found`` the highest
    version in its ``schema_version`` table (``None`` if none).
    """
    missing = [t for t in TABLES if t not in tables]
    if missing:
        raise NotATraceDatabaseError(
            f"{where} is not a trace database: it has no {', '.join(missing)} "
            f"table{'s' if len(missing) > 1 else ''} (nothing was changed). Reading never "
            "creates or migrates tables; record traces into it first "
            "(storage.record_to() or a store opened for writing creates them)"
        )
    if found is None:
        raise NotATraceDatabaseError(
            f"{where} is not a trace database: its schema_version table is empty "
            "(nothing was changed)"
        )
    check_version(found)
    if found < READABLE_FROM:
        raise SchemaVersionError(
            f"{where} has trace schema version {found}, older than the version this "
            f"release reads ({READABLE_FROM} or later); reading never migrates (nothing was "
            "changed): open it once for writing with this release (storage.open_store("
            "...) or an application recording into it) to migrate it"
        )


__all__ = ["READABLE_FROM", "SCHEMA_VERSION", "NotATraceDatabaseError", "SchemaVersionError"]
