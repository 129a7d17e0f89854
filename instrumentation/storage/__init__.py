"""Durable traces: every span and event kept in SQLite or PostgreSQL, and read back.

    from instrumentation import storage

    handler = storage.StorageHandler(storage.SQLiteStore("traces.db")).attach()
    ...                                  # the application runs
    handler.flush()
    for summary in handler.store.traces(limit=5):
        print(summary.name, summary.duration, summary.total_tokens)

Or, for a script: ``with storage.record_to("traces.db"): main()``. From a shell:
``python -m instrumentation --db traces.db list|show ID|tail|export``.
See ``docs/storage.md``.
"""

from __future__ import annotations

import os
from typing import Any

from instrumentation.dispatcher import Dispatcher
from instrumentation.storage.base import SQLStore, Store
from instrumentation.storage.handler import StorageHandler, metadata
from instrumentation.storage.models import StoredEvent, StoredSpan, TraceSummary, roots_of
from instrumentation.storage.schema import (
    SCHEMA_VERSION,
    NotATraceDatabaseError,
    SchemaVersionError,
)
from instrumentation.storage.serialise import TRUNCATED, UNSERIALISABLE
from instrumentation.storage.sqlite import SQLiteStore
from instrumentation.storage.writer import BatchWriter

#: What ``open_store()`` and the command line use when no database is named.
DEFAULT_DB = "instrumentation.db"
DB_ENV = "INSTRUMENTATION_DB"


def is_postgres_dsn(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://")) or (
        "=" in target and ("dbname=" in target or "host=" in target)
    )


def database_target(target: str | os.PathLike[str] | None = None) -> str:
    """The database ``target`` names: itself, or, when it is ``None``,
    ``$INSTRUMENTATION_DB``, then ``instrumentation.db``.

    The one place that rule lives: :func:`open_store` and the command line use it.
    """
    if target is None:
        return os.environ.get(DB_ENV) or DEFAULT_DB
    return os.fspath(target)


def open_store(target: str | os.PathLike[str] | None = None, *, read_only: bool = False) -> Store:
    """A store for a SQLite path or a PostgreSQL DSN (default: ``$INSTRUMENTATION_DB``
    or ``instrumentation.db``, see :func:`database_target`).

    ``read_only=True`` opens an existing trace database to read it, creating and
    migrating nothing (what the command line does): a SQLite path that does not exist
    raises ``FileNotFoundError``, anything else that is not a trace database of this
    release :class:`NotATraceDatabaseError` or :class:`SchemaVersionError`.
    """
    text = database_target(target)
    if is_postgres_dsn(text):
        from instrumentation.storage.postgres import PostgresStore

        return PostgresStore(text, read_only=read_only)
    return SQLiteStore(text, read_only=read_only)


def record_to(
    target: str | os.PathLike[str] | Store | None = None,
    dispatcher: Dispatcher | None = None,
    **options: Any,
) -> StorageHandler:
    """Start recording every span and event of ``dispatcher`` (default: all) into ``target``.

    ``target`` is a SQLite path, a PostgreSQL DSN or a :class:`Store`; ``options`` go
    to :class:`StorageHandler`. Use the returned handler as a context manager (on
    exit it detaches, writes what is queued and stops) or call ``.flush()``.
    """
    store = target if isinstance(target, Store) else open_store(target)
    return StorageHandler(store=store, **options).attach(dispatcher)


def format_traces(store: Store, limit: int = 20, **filters: Any) -> str:
    """Recent traces read back from ``store``, oldest first, as summary lines and trees."""
    from instrumentation.storage.cli import format_traces as _format_traces

    return _format_traces(store, limit, **filters)


def __getattr__(name: str) -> Any:
    if name == "PostgresStore":  # imported lazily: it needs psycopg only when used
        from instrumentation.storage.postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module 'instrumentation.storage' has no attribute {name!r}")


__all__ = [
    "DEFAULT_DB",
    "SCHEMA_VERSION",
    "TRUNCATED",
    "UNSERIALISABLE",
    "BatchWriter",
    "NotATraceDatabaseError",
    "PostgresStore",
    "SQLStore",
    "SQLiteStore",
    "SchemaVersionError",
    "StorageHandler",
    "Store",
    "StoredEvent",
    "StoredSpan",
    "TraceSummary",
    "database_target",
    "format_traces",
    "is_postgres_dsn",
    "metadata",
    "open_store",
    "record_to",
    "roots_of",
]
