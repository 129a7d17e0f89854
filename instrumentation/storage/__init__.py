"""Durable traces: every span and event kept in SQLite or PostgreSQL, and read back.

    from instrumentation import storage

    store = storage.SQLiteStore("traces.db")
    handler = storage.StorageHandler(store=store).attach()
    ...                                  # the application runs
    handler.flush()
    for summary in store.traces(limit=5):
        print(summary.name, summary.duration, summary.total_tokens)
    handler.shutdown()
    store.close()

Or, for a script: ``with storage.record_to("traces.db"): main()``. From a shell:
``python -m instrumentation --db traces.db list|show ID|tail|events|export``.
See ``docs/storage.md``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from typing_extensions import Unpack

from instrumentation._options import unknown_option
from instrumentation.dispatcher import Dispatcher
from instrumentation.storage.base import Store
from instrumentation.storage.handler import StorageHandler, StorageOptions, metadata
from instrumentation.storage.models import StoredEvent, StoredSpan, TraceSummary, roots_of
from instrumentation.storage.schema import (
    SCHEMA_VERSION,
    NotATraceDatabaseError,
    SchemaVersionError,
)
from instrumentation.storage.serialise import TRUNCATED, UNSERIALISABLE
from instrumentation.storage.sqlite import ACCEPTED_ADDRESSES, SQLiteStore
from instrumentation.storage.writer import BatchWriter, flush_on_sigterm

logger = logging.getLogger(__name__)

#: What ``open_store()`` and the command line use when no database is named.
DEFAULT_DB = "instrumentation.db"
DB_ENV = "INSTRUMENTATION_DB"


def is_postgres_dsn(target: str) -> bool:
    """Whether ``target`` is a PostgreSQL DSN (``postgresql://...``, ``postgres://...``
    or libpq's ``host=... dbname=...``), not a SQLite path."""
    if not isinstance(target, str):
        raise TypeError(f"is_postgres_dsn() takes an address (a str), got {type(target).__name__}")
    # URL schemes are case-insensitive (RFC 3986); libpq takes PostgreSQL:// too.
    return target[:13].lower().startswith(("postgresql://", "postgres://")) or (
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

    ``sqlite:///path`` URLs (SQLAlchemy's spelling) name a SQLite path too. An empty
    address or any other URL (``mysql://``, ``http://``...) is a ``ValueError`` naming
    the accepted forms; a folder, or a file in a folder that does not exist, an
    ``OSError`` (``IsADirectoryError``, ``FileNotFoundError``). Close the store when
    done (``store.close()``, or ``with open_store(...) as store:``).
    """
    text = database_target(target)
    if not isinstance(text, str):
        raise TypeError(f"open_store() takes {ACCEPTED_ADDRESSES}; got {type(text).__name__}")
    if is_postgres_dsn(text):
        from instrumentation.storage.postgres import PostgresStore

        scheme, sep, rest = text.partition("://")
        # libpq knows its URL schemes in lower case only.
        return PostgresStore(scheme.lower() + sep + rest if sep else text, read_only=read_only)
    return SQLiteStore(text, read_only=read_only)


def record_to(
    target: str | os.PathLike[str] | Store | None = None,
    dispatcher: Dispatcher | None = None,
    **options: Unpack[StorageOptions],
) -> StorageHandler:
    """Start recording every span and event of ``dispatcher`` (default: all) into ``target``.

    ``target`` is a SQLite path, a PostgreSQL DSN or a :class:`Store`; ``options`` go
    to :class:`StorageHandler`. Use the returned handler as a context manager (on
    exit it detaches, writes what is queued and stops) or call ``.flush()``.

    A store opened here (from a path or DSN) belongs to the handler: it is closed when
    the handler shuts down (leaving the ``with`` block, ``shutdown()``, or interpreter
    exit), which for SQLite copies the write-ahead log into the file. A :class:`Store`
    given stays open, the caller's to close. An unknown option raises pydantic's
    ``ValidationError`` before anything is opened; a refused value (``batch_size=0``)
    raises too, and a SQLite file made for the handler is removed again.
    """
    if isinstance(target, Store):
        return StorageHandler(store=target, **options).attach(dispatcher)
    _check_option_names(options)
    if dispatcher is not None and not isinstance(dispatcher, Dispatcher):
        raise TypeError(f"record_to() takes a Dispatcher, got {type(dispatcher).__name__}")
    store = open_store(target)
    # Closing an in-memory database would throw its rows away: it stays open, to be
    # read through the handler's ``store``.
    in_memory = isinstance(store, SQLiteStore) and store.path == ":memory:"
    created = _created_file(store)
    options.setdefault("close_store", not in_memory)
    handler = None
    try:
        handler = StorageHandler(store=store, **options)
        return handler.attach(dispatcher)
    except BaseException:
        if handler is not None:
            handler.detach()
            handler.shutdown()
        store.close()
        if created is not None:
            _remove_database_file(created)
        raise


def _created_file(store: Store) -> str | None:
    """The SQLite file ``store`` has just created and holds nothing yet, if it is one:
    a refused option value (``batch_size=0``) must not leave an empty database behind."""
    if not isinstance(store, SQLiteStore) or store.path == ":memory:":
        return None
    return store.path if store.created else None


def _remove_database_file(path: str) -> None:
    for name in (path, path + "-wal", path + "-shm", path + "-journal"):
        try:
            os.remove(name)
        except FileNotFoundError:
            pass
        except OSError as exc:  # another process opened it meanwhile: leave it
            logger.warning("could not remove %s, created for a refused handler: %s", name, exc)


def _check_option_names(options: Mapping[str, object]) -> None:
    """Refuse an option :class:`StorageHandler` does not take, as it would (pydantic's
    ``ValidationError``), before the store is opened (and the file created)."""
    if "store" in options:
        raise TypeError("record_to() takes the store as its first argument (target), not store=")
    fields = StorageHandler.model_fields
    unknown = [name for name in options if name not in fields]
    if unknown:
        from pydantic_core import ValidationError

        errors = [unknown_option(name, options[name], fields) for name in unknown]
        raise ValidationError.from_exception_data(StorageHandler.__name__, errors)


def format_trace(
    spans: list[StoredSpan], *, events: bool = False, metadata: Mapping[str, str] | None = None
) -> str:
    """One trace read back (``store.trace(trace_id)``) as the tree ``show`` draws; with
    ``events``, each span's events under it."""
    from instrumentation.storage.cli import format_trace as _format_trace

    return _format_trace(spans, events=events, metadata=metadata)


def format_traces(store: Store, limit: int = 20, **filters: Any) -> str:
    """Recent traces read back from ``store``, oldest first, as summary lines and trees."""
    from instrumentation.storage.cli import format_traces as _format_traces

    return _format_traces(store, limit, **filters)


if TYPE_CHECKING:
    from instrumentation.storage.postgres import PostgresStore
else:
    # Only at run time, so that a type checker still flags misspelt names.
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
    "SQLiteStore",
    "SchemaVersionError",
    "StorageHandler",
    "StorageOptions",
    "Store",
    "StoredEvent",
    "StoredSpan",
    "TraceSummary",
    "flush_on_sigterm",
    "format_trace",
    "format_traces",
    "metadata",
    "open_store",
    "record_to",
    "roots_of",
]
