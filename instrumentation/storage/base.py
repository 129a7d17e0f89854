"""The store interface, and the read-back queries every SQL store shares.

A store does three things: migrate its schema, write a batch of rows in one
transaction (idempotently: rows already stored are skipped, so a batch can be
replayed after an error without duplicates), and answer the read-back queries.
Subclasses supply a connection and a :class:`~instrumentation.storage.schema.Dialect`;
the SQL here is written once for both.

Stores are thread-safe: one connection, used under a lock. The writer thread and
readers share it; SQLite in WAL mode and PostgreSQL both let other processes read
while one writes.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import os
import re
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

from instrumentation import telemetry
from instrumentation._text import without_lone_surrogates
from instrumentation.storage import checks
from instrumentation.storage.models import (
    METADATA_KEYS,
    StoredEvent,
    StoredSpan,
    TraceSummary,
    to_datetime,
)
from instrumentation.storage.schema import (
    EVENT_COLUMNS,
    JSON_COLUMNS,
    META_COLUMNS,
    SPAN_COLUMNS,
    SQLITE,
    Dialect,
    insert_sql,
)

Row = tuple[Any, ...]
_S = TypeVar("_S", bound="Store")
_R = TypeVar("_R")

_STATUSES = ("ok", "error")


def _epoch(value: datetime | float | int | None, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(
                f"{what} must be timezone-aware (e.g. datetime.now(timezone.utc)); got {value!r}"
            )
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not _FIRST_EPOCH <= value <= _LAST_EPOCH:  # NaN included
            raise ValueError(
                f"{what} is seconds since the epoch within the years 1 to 9999, got {value!r}"
            )
        return float(value)
    raise TypeError(f"{what} is a datetime or seconds since the epoch, got {type(value).__name__}")


#: The epoch seconds a datetime can hold (the years 1 to 9999, UTC).
_FIRST_EPOCH = -62135596800
_LAST_EPOCH = 253402300799


def text_for_databases(text: str) -> str:
    """``text`` with what a database refuses in text replaced by U+FFFD: NUL characters
    (PostgreSQL) and lone surrogates (both)."""
    return without_lone_surrogates(text.replace("\x00", "\ufffd"))


def cleaned_for_databases(row: Sequence[Any], json_at: Collection[int] = ()) -> tuple[Any, ...]:
    """``row`` with :func:`text_for_databases` applied to its text, and in the JSON text
    at positions ``json_at`` the NULs it spells ``\\u0000`` (PostgreSQL's ``jsonb`` takes
    none) replaced too: the escape alone, not a backslash the text holds followed by
    ``u0000`` (JSON ``\\\\u0000``), which is kept as it was."""
    return tuple(
        text_for_databases(_NUL_ESCAPE.sub(_FFFD_ESCAPE, v) if i in json_at else v)
        if isinstance(v, str)
        else v
        for i, v in enumerate(row)
    )


#: Where the JSON text is in a row of ``spans`` and of ``events``.
SPAN_JSON_AT = frozenset(i for i, column in enumerate(SPAN_COLUMNS) if column in JSON_COLUMNS)
EVENT_JSON_AT = frozenset(i for i, column in enumerate(EVENT_COLUMNS) if column in JSON_COLUMNS)

#: ``\\u0000`` where it is an escape: after an even number of backslashes (escaped
#: backslashes, kept by the replacement).
_NUL_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")
_FFFD_ESCAPE = r"\1\\ufffd"


#: The longest id, name or type stored as it is: these are index keys, and
#: PostgreSQL refuses an index entry past about 2,700 bytes (the row with it).
MAX_KEY_CHARS = 512


def index_key(text: str) -> str:
    """``text`` as stored in an indexed column: itself, or when longer than
    :data:`MAX_KEY_CHARS` its start and a digest of the whole, the same every time
    (so a long span id still links its children, and a long name is still found)."""
    if len(text) <= MAX_KEY_CHARS:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{text[: MAX_KEY_CHARS - 17]}…{digest}"


def _json(text: Any) -> Any:
    if text is None:
        return {}
    if isinstance(text, (dict, list)):
        return text
    try:
        return json.loads(text)
    except ValueError:  # an integer of more digits than Python converts (4,300)
        try:
            return json.loads(text, parse_int=_int_or_digits)
        except (TypeError, ValueError, RecursionError):
            return {"__unreadable__": str(text)}
    except (TypeError, RecursionError):  # nested deeper than the parser goes
        return {"__unreadable__": str(text)}


def _int_or_digits(digits: str) -> int | str:
    """A JSON integer as an ``int``, or as its digits when longer than Python converts
    (``sys.get_int_max_str_digits()``): pydantic writes such an int whole, and reading
    it back failed the whole value, every other field with it."""
    try:
        return int(digits)
    except ValueError:
        return digits


def _metadata(values: Sequence[Any]) -> dict[str, str]:
    keys = list(METADATA_KEYS)
    return {keys[i]: v for i, v in enumerate(values) if v is not None}


class Store(ABC):
    """Where traces are kept: :class:`SQLiteStore` or :class:`PostgresStore`."""

    #: Opened only to read (``read_only=True``): creates, migrates and writes nothing.
    read_only: bool = False

    @abstractmethod
    def write(self, spans: Sequence[Row], events: Sequence[Row]) -> None:
        """Store rows (in ``SPAN_COLUMNS``/``EVENT_COLUMNS`` order) in one transaction.

        Rows whose id is stored already are skipped. Raises on a database error, after
        rolling back: nothing of the batch is stored then.
        """

    def write_within(self, spans: Sequence[Row], events: Sequence[Row], seconds: float) -> None:
        """:meth:`write`, waiting at most about ``seconds`` for a database that another
        process holds locked, so that the writer's retries end when ``retry_for`` says
        (a store with no such wait just writes)."""
        self.write(spans, events)

    @abstractmethod
    def traces(
        self,
        limit: int = 20,
        *,
        since: datetime | float | None = None,
        until: datetime | float | None = None,
        name: str | None = None,
        status: str | None = None,
        min_duration: float | None = None,
        dispatcher: str | None = None,
        metadata: Mapping[str, str] | None = None,
        ended_after: datetime | float | tuple[datetime | float, str] | None = None,
    ) -> list[TraceSummary]:
        """Recent traces, newest first (by their root span's start).

        With ``ended_after``, the traces whose root span ended after it instead, oldest
        end first (then by root span id). It is a time, or a position in that order:
        ``(end, root_span_id)`` of a trace listed before, to list those after it (its
        stored end time is used, so a page can start exactly where the last one
        stopped, even among traces that ended at the same moment).
        """

    def trace_ids(
        self,
        limit: int | None = None,
        *,
        since: datetime | float | None = None,
        until: datetime | float | None = None,
    ) -> Iterator[str]:
        """The trace ids of the traces :meth:`traces` lists (``limit`` of them, or all
        with ``None``), newest first, read a page at a time: memory stays bounded
        however many there are (what ``export`` reads)."""
        for summary in self.traces(
            limit=MAX_LIMIT if limit is None else limit, since=since, until=until
        ):
            yield summary.trace_id

    def iter_traces(
        self,
        limit: int | None = None,
        *,
        since: datetime | float | None = None,
        until: datetime | float | None = None,
        name: str | None = None,
        status: str | None = None,
        min_duration: float | None = None,
        dispatcher: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Iterator[TraceSummary]:
        """The traces :meth:`traces` lists (``limit`` of them, or all with ``None``), in
        its order (newest first), read a page at a time: memory stays bounded however
        many there are (what ``list --all`` reads)."""
        yield from self.traces(
            limit=MAX_LIMIT if limit is None else limit,
            since=since,
            until=until,
            name=name,
            status=status,
            min_duration=min_duration,
            dispatcher=dispatcher,
            metadata=metadata,
        )

    @abstractmethod
    def trace(self, trace_id: str) -> list[StoredSpan]:
        """Every stored span of one trace, by start time, with ``events`` and ``children``."""

    @abstractmethod
    def events(
        self,
        *,
        trace_id: str | None = None,
        type: str | None = None,
        since: datetime | float | None = None,
        until: datetime | float | None = None,
        limit: int | None = 1000,
        newest_first: bool = False,
    ) -> list[StoredEvent]:
        """Stored events, oldest first (``newest_first``: newest first), optionally of
        one trace and/or one type, at or after ``since`` and before ``until``; events
        of the same moment by id.

        At most ``limit`` of them (the oldest, or the newest): 1000 by default, every
        one with ``limit=None`` (held in memory at once: :meth:`iter_events` reads them
        a page at a time).
        """

    def iter_events(
        self,
        *,
        trace_id: str | None = None,
        type: str | None = None,
        since: datetime | float | None = None,
        until: datetime | float | None = None,
    ) -> Iterator[StoredEvent]:
        """Every event :meth:`events` would return with ``limit=None``, in its order,
        read a page at a time: memory stays bounded however many there are."""
        yield from self.events(trace_id=trace_id, type=type, since=since, until=until, limit=None)

    @abstractmethod
    def resolve_trace_id(self, prefix: str) -> str | None:
        """The trace id starting with ``prefix`` (``"latest"``: the newest), if exactly one."""

    def trace_ids_starting_with(self, prefix: str, limit: int = 2) -> list[str]:
        """Up to ``limit`` trace ids that start with ``prefix``: tells an ambiguous
        prefix from one that matches nothing."""
        found = self.resolve_trace_id(prefix) if prefix != "latest" else None
        return [found] if found is not None else []

    def event_types(self, limit: int = 1000) -> list[str]:
        """The types of the stored events, each once, sorted; at most ``limit`` of them
        (what ``events --type`` tells a near miss from). This reads every event: the
        SQL stores read the type index instead."""
        _check_limit(limit)
        return sorted({event.type for event in self.iter_events()})[:limit]

    @property
    @abstractmethod
    def spool_key(self) -> str:
        """A stable name for this database, without secrets (names the spool file)."""

    def after_fork_in_child(self) -> None:
        """Forget the parent's connection without closing it (it is the parent's)."""
        return None

    def cleaned(self, row: Row, is_span: bool) -> Row:
        """``row`` with what this database refuses in text replaced by U+FFFD (see
        :func:`cleaned_for_databases`): what is tried once it refused a row for its content."""
        return cleaned_for_databases(row, SPAN_JSON_AT if is_span else EVENT_JSON_AT)

    def is_data_error(self, exc: BaseException) -> bool:
        """Whether ``exc`` is about the rows themselves (retrying the same rows won't help)."""
        return isinstance(exc, (OverflowError, UnicodeError))

    def close(self) -> None:
        """Close the connection; a later call reconnects.

        For SQLite, a store that writes copies the write-ahead log (``-wal``) into the
        file as it closes (a checkpoint, waiting a second at most for readers), so the
        file alone then holds every row, even while a reader (``tail``) stays open.
        """
        return None

    def __enter__(self: _S) -> _S:
        """``with SQLiteStore(path) as store:`` closes the store when the block ends."""
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: Connections inherited across ``os.fork``, kept alive so the child never closes them.
_inherited_connections: list[Any] = []

#: Every store, so that ``fork()`` waits for their statements in progress.
_stores: weakref.WeakSet[SQLStore] = weakref.WeakSet()
#: The stores whose lock each forking thread holds, from before fork() to after it, by
#: the thread's ident: with one list for all, a second fork at the same time released
#: (from its own thread, which raised) the locks the first one held, or left them held.
_held_at_fork: dict[int, list[SQLStore]] = {}
#: How long fork() waits in all for statements stores are running (a write may be
#: waiting for another process's lock): past that, it forks without waiting more.
FORK_WAIT = 2.0
#: What each store gets at least, once ``FORK_WAIT`` is used up.
FORK_WAIT_EACH = 0.1


def _before_fork() -> None:
    # A fork in the middle of a transaction leaves SQLite's lock state in the child
    # as it was in the parent: the child's own connection then found the file locked
    # for good. Holding each store's lock, fork() happens between statements.
    deadline = time.monotonic() + FORK_WAIT
    held = _held_at_fork.setdefault(threading.get_ident(), [])
    for store in list(_stores):
        # Each store gets a moment at least, for a statement that is nearly done.
        wait = max(deadline - time.monotonic(), FORK_WAIT_EACH)
        if store._lock.acquire(timeout=wait):
            held.append(store)


def _after_fork_in_parent() -> None:
    held = _held_at_fork.pop(threading.get_ident(), [])
    while held:
        held.pop()._lock.release()


def _after_fork_in_child_of_stores() -> None:
    _held_at_fork.clear()
    for store in list(_stores):
        store.after_fork_in_child()  # a fresh lock, and the parent's connection let be


if hasattr(os, "register_at_fork"):  # pragma: no branch - absent on Windows only
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child_of_stores,
    )


logger = logging.getLogger("instrumentation.storage")
_CONNECT_ERRORS = telemetry.counter("storage.connect_errors")


class SQLStore(Store):
    """The queries, over an abstract connection; subclasses connect and execute."""

    dialect: Dialect

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._conn: Any = None
        #: Read-only: why connecting failed when the store was made, and when.
        self._failed_at_start: tuple[BaseException, float] | None = None
        self._insert_spans = insert_sql(self.dialect, "spans", SPAN_COLUMNS)
        self._insert_events = insert_sql(self.dialect, "events", EVENT_COLUMNS)
        _stores.add(self)

    def _connect_at_start(self) -> None:
        """Connect and migrate (or, read-only, check) now, so that a wrong path or a
        schema this release cannot use fails here; but a database that cannot be
        reached *yet* must not stop the application.

        Then the store is made all the same: the writer retries, spools and replays,
        and a reader gets the error on its first query.
        """
        try:
            with self._lock:
                self._connection()
        except Exception as exc:
            if not self._unreachable(exc):
                raise
            _CONNECT_ERRORS.inc()
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if self.read_only:
                # A reader writes nothing: its first query raises the error, which is
                # all the caller (the command line, say) needs to show.
                logger.debug(
                    "instrumentation.storage: %r cannot be reached yet (%s)", self, first_line
                )
                self._failed_at_start = (exc, time.monotonic())
                return
            if self._busy(exc):
                # Another process is writing (several starting at once, say): the
                # first write waits its turn, as every write does. Nothing is wrong.
                logger.info(
                    "instrumentation.storage: %r is busy (%s); connecting at the first write",
                    self,
                    first_line,
                )
                return
            logger.warning(
                "instrumentation.storage: %r cannot be reached yet (%s); writes are "
                "retried, then spooled and replayed when it is back; reads fail until then",
                self,
                first_line,
            )

    def _raise_if_failed_just_now(self, within: float) -> None:
        """A reader's first query, right after connecting failed: raise that failure
        rather than wait for the server a second time (the command line waited twice)."""
        failed = self._failed_at_start
        if failed is not None:
            self._failed_at_start = None
            if time.monotonic() - failed[1] < within:
                raise failed[0]

    def _refuse_if_read_only(self) -> None:
        if self.read_only:
            raise PermissionError(
                f"{self!r} was opened with read_only=True: it reads traces, it does not write"
            )

    @abstractmethod
    def _connection(self) -> Any:
        """The open connection, made (and the schema migrated) if there is none."""

    def _unreachable(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the database is down or busy (not misconfigured)."""
        return False

    def _busy(self, exc: BaseException) -> bool:
        """Whether ``exc`` means only that another process holds the database's lock."""
        return False

    def after_fork_in_child(self) -> None:
        # The parent's connection must be neither used nor closed here (closing it
        # would end the parent's session): keep it referenced and open a new one.
        self._lock = threading.RLock()
        if self._conn is not None:
            _inherited_connections.append(self._conn)
            self._conn = None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- what subclasses provide --------------------------------------------------------

    @abstractmethod
    def _query(self, sql: str, params: Sequence[Any]) -> list[Row]:
        """Run one read-only statement and return its rows."""

    # -- read back --------------------------------------------------------------------

    def traces(
        self,
        limit: int = 20,
        *,
        since: datetime | float | None = None,
        until: datetime | float | None = None,
        name: str | None = None,
        status: str | None = None,
        min_duration: float | None = None,
        dispatcher: str | None = None,
        metadata: Mapping[str, str] | None = None,
        ended_after: datetime | float | tuple[datetime | float, str] | None = None,
    ) -> list[TraceSummary]:
        _check_limit(limit)
        where, params = self._root_conditions(
            since=since,
            until=until,
            name=name,
            status=status,
            min_duration=min_duration,
            dispatcher=dispatcher,
            metadata=metadata,
            ended_after=ended_after,
        )
        # Ties by id, as trace_ids() breaks them: list and export pick the same traces.
        order = _OLDEST_END_FIRST if ended_after is not None else _NEWEST_FIRST
        return self._summaries(where, params, order, limit)

    def iter_traces(
        self,
        limit: int | None = None,
        *,
        since: datetime | float | None = None,
        until: datetime | float | None = None,
        name: str | None = None,
        status: str | None = None,
        min_duration: float | None = None,
        dispatcher: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Iterator[TraceSummary]:
        # Checked now, not at the first next(): a bad filter is the caller's mistake.
        _check_limit(limit, none_means="every trace")
        where, params = self._root_conditions(
            since=since,
            until=until,
            name=name,
            status=status,
            min_duration=min_duration,
            dispatcher=dispatcher,
            metadata=metadata,
        )
        # A page at a time: traces(limit=...) holds a summary of every trace at once
        # (123 MB for 100,000).
        return self._newest_roots_paged(
            where,
            params,
            limit,
            _TRACE_PAGE,
            lambda w, ps, size: self._summaries(w, ps, _NEWEST_FIRST, size),
            lambda summary: (summary.root_span_id, summary.start.timestamp()),
        )

    def _newest_roots_paged(
        self,
        where: list[str],
        params: list[Any],
        limit: int | None,
        page_size: int,
        read: Callable[[list[str], list[Any], int], Sequence[_R]],
        root_of: Callable[[_R], tuple[str, float]],
    ) -> Iterator[_R]:
        """What ``read(where, params, size)`` makes of the roots ``r`` that meet
        ``where``, newest first, ``limit`` in all (None: every one), read
        ``page_size`` at a time, each page after the last root read (``root_of``
        gives its id and start: see :meth:`_before_root`)."""
        left = limit
        last: _R | None = None
        while left is None or left > 0:
            page_where, page_params = list(where), list(params)
            if last is not None:
                page_where.append(self._before_root(*root_of(last), page_params))
            size = page_size if left is None else min(left, page_size)
            page = read(page_where, page_params, size)
            yield from page
            if len(page) < size:
                return
            last = page[-1]
            if left is not None:
                left -= len(page)

    def _before_root(self, root_span_id: str, start: float, params: list[Any]) -> str:
        """The condition "after the root span ``root_span_id`` (that started at
        ``start``) newest first": before it by start time, then by id. The start
        compared is the one stored for that span (a time read back may differ from it
        in the last digits: SQLite keeps more than microseconds), which could skip or
        repeat roots that started together; ``start`` stands in only if that span is
        no longer there."""
        p = self.dialect.param
        bound = (
            f"COALESCE((SELECT c.start_time FROM spans c WHERE c.id = {p}), "
            f"{self.dialect.time_param()})"
        )
        params.extend([root_span_id, start, root_span_id, start, root_span_id])
        return f"r.start_time <= {bound} AND (r.start_time < {bound} OR r.id < {p})"

    def _summaries(
        self, where: list[str], params: list[Any], order: str, limit: int
    ) -> list[TraceSummary]:
        """The summaries of the first ``limit`` roots ``r`` that meet ``where``, by ``order``."""
        d = self.dialect
        p = d.param
        # The roots are chosen (and sorted) first, and their traces' counts and sums
        # taken for those alone: computed in the same SELECT, they were computed for
        # every root that matched before the sort kept ``limit`` of them (a ``name``
        # with a wildcard, which the index cannot give in start order: 2.6 s for 20
        # traces of 100,000).
        sql = f"""
            SELECT r.trace_id, r.id, r.name, r.dispatcher, {d.time_value("r.start_time")},
                   {d.time_value("r.end_time")}, r.duration, r.status, r.error,
                   {", ".join("r." + c for c in META_COLUMNS)},
                   (SELECT COUNT(*) FROM spans s WHERE s.trace_id = r.trace_id),
                   (SELECT COUNT(*) FROM spans s WHERE s.trace_id = r.trace_id
                        AND s.status = 'error'),
                   (SELECT SUM(e.prompt_tokens) FROM events e WHERE e.trace_id = r.trace_id),
                   (SELECT SUM(e.completion_tokens) FROM events e WHERE e.trace_id = r.trace_id),
                   (SELECT SUM(e.total_tokens) FROM events e WHERE e.trace_id = r.trace_id),
                   (SELECT SUM(e.cost_usd) FROM events e WHERE e.trace_id = r.trace_id)
            FROM (
                SELECT {", ".join("r." + c for c in _SUMMARY_COLUMNS)}
                FROM spans r
                WHERE {" AND ".join(where)}
                ORDER BY {order}
                LIMIT {p}
            ) r
            ORDER BY {order}
        """
        out = []
        n_meta = len(META_COLUMNS)
        for row in self._query(sql, [*params, limit]):
            meta = row[9 : 9 + n_meta]
            counts = row[9 + n_meta :]
            out.append(
                TraceSummary(
                    trace_id=row[0],
                    root_span_id=row[1],
                    name=row[2],
                    dispatcher=row[3],
                    start=to_datetime(row[4]),  # type: ignore[arg-type]
                    end=to_datetime(row[5]),
                    duration=float(row[6]),
                    status=row[7],
                    error=row[8],
                    span_count=int(counts[0]),
                    error_count=int(counts[1]),
                    prompt_tokens=int(counts[2] or 0),
                    completion_tokens=int(counts[3] or 0),
                    total_tokens=int(counts[4] or 0),
                    cost_usd=None if counts[5] is None else float(counts[5]),
                    metadata=_metadata(meta),
                )
            )
        return out

    def _root_conditions(
        self,
        *,
        since: datetime | float | None = None,
        until: datetime | float | None = None,
        name: str | None = None,
        status: str | None = None,
        min_duration: float | None = None,
        dispatcher: str | None = None,
        metadata: Mapping[str, str] | None = None,
        ended_after: datetime | float | tuple[datetime | float, str] | None = None,
    ) -> tuple[list[str], list[Any]]:
        """The conditions on a root span ``r`` that :meth:`traces` lists, and their
        parameters (the filters checked)."""
        d = self.dialect
        p = d.param
        where = [
            "r.is_root = 1",
            "(r.parent_id IS NULL OR NOT EXISTS (SELECT 1 FROM spans q WHERE q.id = r.parent_id))",
        ]
        params: list[Any] = []
        ended_after_time: datetime | float | None = None
        if isinstance(ended_after, tuple):
            where.append(self._after_position(ended_after, params))
        else:
            ended_after_time = ended_after
        # Times compare at the microsecond, as a datetime holds them: SQLite keeps more
        # digits, so a stored time is taken as rounded to the microsecond (the start of
        # a trace read back and given as ``since`` lists that trace, as ``until`` does
        # not). PostgreSQL keeps microseconds.
        half_us = 0.5e-6 if d.timestamp == d.real else 0.0
        for value, time_column, op, what, shift in (
            (since, "start_time", ">=", "since", -half_us),
            (until, "start_time", "<", "until", -half_us),
            (ended_after_time, "end_time", ">", "ended_after", half_us),
        ):
            epoch = _epoch(value, what)
            if epoch is not None:
                where.append(f"r.{time_column} {op} {d.time_param()}")
                params.append(epoch + shift)
        if name is not None:
            if not isinstance(name, str):
                raise TypeError(f"name is a str (use * as a wildcard), got {type(name).__name__}")
            if "*" in name:
                where.append(f"r.name LIKE {p} ESCAPE '\\'")
                params.append(_like_literal(name).replace("*", "%"))
            else:
                where.append(f"r.name = {p}")
                params.append(index_key(name))
        if status is not None:
            if status not in _STATUSES:
                raise ValueError(f"status is 'ok' or 'error', got {status!r}")
            where.append(f"r.status = {p}")
            params.append(status)
        if min_duration is not None:
            where.append(f"r.duration >= {p}")
            params.append(checks.seconds("min_duration", min_duration, most=None))
        if dispatcher is not None:
            if not isinstance(dispatcher, str):
                raise TypeError(f"dispatcher is a dispatcher name, got {type(dispatcher).__name__}")
            where.append(f"(r.dispatcher = {p} OR r.dispatcher LIKE {p} ESCAPE '\\')")
            params.extend([dispatcher, _like_literal(dispatcher) + ".%"])
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(
                "metadata is a mapping of keys to the values to match, e.g. "
                f"{{'user': 'alice'}}; got {metadata!r}"
            )
        for key, wanted in (metadata or {}).items():
            column: str | None = METADATA_KEYS.get(key) or (key if key in META_COLUMNS else None)
            if column is None:
                raise ValueError(
                    f"unknown metadata key {key!r}; filter on one of {sorted(METADATA_KEYS)}"
                )
            if wanted is None:
                raise TypeError(
                    f"metadata[{key!r}] is the value to match, not None (a trace without "
                    f"{key} cannot be selected by it)"
                )
            where.append(f"r.{column} = {p}")
            params.append(index_key(str(wanted)))
        return where, params

    def trace_ids(
        self,
        limit: int | None = None,
        *,
        since: datetime | float | None = None,
        until: datetime | float | None = None,
    ) -> Iterator[str]:
        _check_limit(limit, none_means="every trace")
        # A page at a time (by start time, then id, compared with the stored start of
        # the last root read): traces(limit=...) made a summary of each trace, with
        # its counts and sums, and held them all before the first was written (12 s
        # and 136 MB for 100,000 traces).
        p = self.dialect.param
        where, params = self._root_conditions(since=since, until=until)
        rows = self._newest_roots_paged(
            where,
            params,
            limit,
            _ID_PAGE,
            lambda w, ps, size: self._query(
                f"SELECT r.trace_id, r.id, {self.dialect.time_value('r.start_time')} "
                f"FROM spans r WHERE {' AND '.join(w)} "
                f"ORDER BY {_NEWEST_FIRST} LIMIT {p}",
                [*ps, size],
            ),
            lambda row: (row[1], float(row[2])),
        )
        return (row[0] for row in rows)

    def _after_position(self, position: tuple[datetime | float, str], params: list[Any]) -> str:
        """The condition "after ``(end, root_span_id)`` by end time, then root span id".

        The end time compared is the one stored for that root span: a time read back
        and given again may differ from it in the last digits (SQLite keeps more than
        microseconds), which could skip or repeat traces that ended at almost the same
        moment. The given time stands in only if that span is no longer there.
        """
        if len(position) != 2 or not isinstance(position[1], str):
            raise TypeError(
                "ended_after is a time, or (end time, root span id) of a trace listed "
                f"before; got {position!r}"
            )
        end, root_span_id = position
        epoch = _epoch(end, "ended_after")
        p = self.dialect.param
        bound = (
            f"COALESCE((SELECT c.end_time FROM spans c WHERE c.id = {p}), "
            f"{self.dialect.time_param()})"
        )
        params.extend([root_span_id, epoch, root_span_id, epoch, root_span_id])
        return f"r.end_time >= {bound} AND (r.end_time > {bound} OR r.id > {p})"

    def _span_select(self) -> str:
        d = self.dialect
        cols = []
        for column in SPAN_COLUMNS:
            if column in ("start_time", "end_time"):
                cols.append(d.time_value(column))
            elif column in ("tags", "attributes"):
                cols.append(d.json_value(column))
            else:
                cols.append(column)
        return ", ".join(cols)

    def _event_select(self) -> str:
        d = self.dialect
        cols = []
        for column in EVENT_COLUMNS:
            if column == "time":
                cols.append(d.time_value(column))
            elif column == "payload":
                cols.append(d.json_value(column))
            else:
                cols.append(column)
        return ", ".join(cols)

    def trace(self, trace_id: str) -> list[StoredSpan]:
        if not isinstance(trace_id, str):
            raise TypeError(f"trace_id is a str of 32 hex digits, got {type(trace_id).__name__}")
        p = self.dialect.param
        trace_id = index_key(trace_id)
        span_rows = self._query(
            f"SELECT {self._span_select()} FROM spans WHERE trace_id = {p} ORDER BY start_time",
            [trace_id],
        )
        spans = [_span_from_row(row) for row in span_rows]
        by_id = {s.id_: s for s in spans}
        for event in self.events(trace_id=trace_id, limit=None):
            owner = by_id.get(event.span_id) if event.span_id is not None else None
            if owner is not None:
                owner.events.append(event)
        for span in spans:
            parent = by_id.get(span.parent_id) if span.parent_id is not None else None
            if parent is not None and parent is not span:
                parent.children.append(span)
        return spans

    def events(
        self,
        *,
        trace_id: str | None = None,
        type: str | None = None,
        since: datetime | float | None = None,
        until: datetime | float | None = None,
        limit: int | None = 1000,
        newest_first: bool = False,
    ) -> list[StoredEvent]:
        _check_limit(limit, none_means="every event")
        if not isinstance(newest_first, bool):
            raise TypeError(f"newest_first is True or False, got {newest_first!r}")
        where, params = self._event_conditions(trace_id, type, since, until)
        return self._read_events(where, params, limit, newest_first)

    def iter_events(
        self,
        *,
        trace_id: str | None = None,
        type: str | None = None,
        since: datetime | float | None = None,
        until: datetime | float | None = None,
    ) -> Iterator[StoredEvent]:
        # Checked now, not at the first next(): a bad filter is the caller's mistake.
        where, params = self._event_conditions(trace_id, type, since, until)
        return self._event_pages(where, params)

    def _event_pages(self, where: list[str], params: list[Any]) -> Iterator[StoredEvent]:
        # Each page starts after the last event read, by (time, id), compared with that
        # event's stored time: a time read back may differ from it in the last digits
        # (SQLite keeps more than microseconds), which could skip or repeat events.
        p = self.dialect.param
        last: StoredEvent | None = None
        while True:
            page_where, page_params = list(where), list(params)
            if last is not None:
                bound = (
                    f"COALESCE((SELECT c.time FROM events c WHERE c.id = {p}), "
                    f"{self.dialect.time_param()})"
                )
                page_where.append(f"time >= {bound} AND (time > {bound} OR id > {p})")
                at = last.time.timestamp()
                page_params.extend([last.id_, at, last.id_, at, last.id_])
            page = self._read_events(page_where, page_params, _EVENT_PAGE)
            yield from page
            if len(page) < _EVENT_PAGE:
                return
            last = page[-1]

    def _event_conditions(
        self,
        trace_id: str | None,
        type: str | None,
        since: datetime | float | None,
        until: datetime | float | None,
    ) -> tuple[list[str], list[Any]]:
        """The conditions on an event that :meth:`events` returns, and their parameters
        (the filters checked)."""
        for value, what in ((trace_id, "trace_id"), (type, "type")):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{what} is a str, got {builtins.type(value).__name__}")
        d = self.dialect
        p = d.param
        where: list[str] = []
        params: list[Any] = []
        if trace_id is not None:
            where.append(f"trace_id = {p}")
            params.append(index_key(trace_id))
        if type is not None:
            # Of one trace, by the trace id index: SQLite took the type index (which
            # gives the order too), and read every event of that type in the store to
            # find the trace's (0.35 s of 1,000,000). The unary + keeps it from that.
            plus = "+" if trace_id is not None and d is SQLITE else ""
            where.append(f"{plus}type = {p}")
            params.append(index_key(type))
        # Compared at the microsecond, as traces() compares its times.
        half_us = 0.5e-6 if d.timestamp == d.real else 0.0
        for moment, op, what in ((since, ">=", "since"), (until, "<", "until")):
            epoch = _epoch(moment, what)
            if epoch is not None:
                where.append(f"time {op} {d.time_param()}")
                params.append(epoch - half_us)
        return where, params

    def _read_events(
        self, where: list[str], params: list[Any], limit: int | None, newest_first: bool = False
    ) -> list[StoredEvent]:
        # Then by id: events of the same moment come in one order, page after page.
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        clause += " ORDER BY time DESC, id DESC" if newest_first else " ORDER BY time, id"
        if limit is not None:
            clause += f" LIMIT {self.dialect.param}"
            params = [*params, limit]
        rows = self._query(f"SELECT {self._event_select()} FROM events {clause}", params)
        return [_event_from_row(row) for row in rows]

    def resolve_trace_id(self, prefix: str) -> str | None:
        if prefix == "latest":
            newest = self.traces(limit=1)
            return newest[0].trace_id if newest else None
        found = self.trace_ids_starting_with(prefix)
        return found[0] if len(found) == 1 else None

    def trace_ids_starting_with(self, prefix: str, limit: int = 2) -> list[str]:
        if not isinstance(prefix, str):
            kind = type(prefix).__name__
            raise TypeError(f"prefix is a str (the start of a trace id), got {kind}")
        _check_limit(limit)
        p = self.dialect.param
        # ``LIKE 'ab%'`` reads the whole trace_id index (PostgreSQL uses an index for
        # it only under the C collation): ``export`` of 8,000 traces took 12 s. A
        # prefix is a range of the index instead, bounded above by the prefix with its
        # last character raised by one: in a bytewise order (code point order, for
        # UTF-8), a string that starts with the prefix sorts within it. That is
        # SQLite's order; PostgreSQL's depends on the database's collation (one that
        # compares digits as numbers puts "19000" after "2"), so there the range is
        # compared under "C", the collation the schema gives the column (and so its
        # index). The ``substr`` check keeps exactly the ids that start with the
        # prefix. (Only hex digits took the range: any other prefix, such as a
        # mistyped one, read the whole index, twice to say that nothing matched.)
        where = f"substr(trace_id, 1, {len(prefix)}) = {p}"
        params: list[Any] = [prefix]
        upper = _successor(prefix)
        if upper is not None:
            column = "trace_id" if self.dialect is SQLITE else 'trace_id COLLATE "C"'
            where = f"{column} >= {p} AND {column} < {p} AND {where}"
            params = [prefix, upper, prefix]
        rows = self._query(
            f"SELECT DISTINCT trace_id FROM spans WHERE {where} LIMIT {int(limit)}", params
        )
        return [row[0] for row in rows]

    def event_types(self, limit: int = 1000) -> list[str]:
        _check_limit(limit)
        # One step of the type index per type (the least type above the last one),
        # not a read of every event's type, as SELECT DISTINCT is on PostgreSQL.
        rows = self._query(
            f"""
            WITH RECURSIVE stored(type) AS (
                SELECT MIN(type) FROM events
                UNION ALL
                SELECT (SELECT MIN(e.type) FROM events e WHERE e.type > s.type)
                FROM stored s WHERE s.type IS NOT NULL
            )
            SELECT type FROM stored WHERE type IS NOT NULL LIMIT {self.dialect.param}
            """,
            [limit],
        )
        return sorted(row[0] for row in rows)  # PostgreSQL's order is its collation's


def _successor(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix`` in code point
    order (``"3f"`` -> ``"3g"``); ``None`` for an empty prefix, or one a database
    stores otherwise than as given (a NUL, a lone surrogate: see
    :func:`text_for_databases`), which is matched by the ``substr`` check alone."""
    if text_for_databases(prefix) != prefix:
        return None
    stem = prefix.rstrip(chr(0x10FFFF))
    if not stem:
        return None
    following = ord(stem[-1]) + 1
    if 0xD800 <= following <= 0xDFFF:  # no character of UTF-8 text: past them
        following = 0xE000
    return stem[:-1] + chr(following)


#: The largest limit a query takes: both databases read LIMIT as a 64-bit integer.
MAX_LIMIT = 2**63 - 1


#: How many trace ids :meth:`SQLStore.trace_ids` reads at a time.
_ID_PAGE = 500

#: How many events :meth:`SQLStore.iter_events` reads at a time.
_EVENT_PAGE = 1000

#: How many traces :meth:`SQLStore.iter_traces` reads at a time.
_TRACE_PAGE = 500

#: The orders :meth:`SQLStore.traces` lists roots ``r`` in (ties by id).
_NEWEST_FIRST = "r.start_time DESC, r.id DESC"
_OLDEST_END_FIRST = "r.end_time ASC, r.id ASC"

#: The columns of a root span that :meth:`SQLStore.traces` reads.
_SUMMARY_COLUMNS = (
    "trace_id",
    "id",
    "name",
    "dispatcher",
    "start_time",
    "end_time",
    "duration",
    "status",
    "error",
    *META_COLUMNS,
)


def _check_limit(limit: Any, none_means: str | None = None) -> None:
    if limit is None and none_means is not None:
        return
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIMIT:
        also = f" (or None for {none_means})" if none_means is not None else ""
        raise ValueError(f"limit is a positive int up to 2**63 - 1{also}, got {limit!r}")


def _like_literal(text: str) -> str:
    """``text`` for a LIKE pattern with ``ESCAPE '\\'``: its ``%`` and ``_`` match
    only themselves (``my_app`` must not match ``myXapp``)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _span_from_row(row: Row) -> StoredSpan:
    values = dict(zip(SPAN_COLUMNS, row, strict=False))
    return StoredSpan(
        id_=values["id"],
        trace_id=values["trace_id"],
        parent_id=values["parent_id"],
        name=values["name"],
        dispatcher=values["dispatcher"],
        start=to_datetime(values["start_time"]),  # type: ignore[arg-type]
        end=to_datetime(values["end_time"]),
        duration=float(values["duration"]),
        status=values["status"],
        error=values["error"],
        tags=_json(values["tags"]),
        attributes=_json(values["attributes"]),
        metadata=_metadata([values[c] for c in META_COLUMNS]),
    )


def _event_from_row(row: Row) -> StoredEvent:
    values = dict(zip(EVENT_COLUMNS, row, strict=False))
    return StoredEvent(
        id_=values["id"],
        type=values["type"],
        time=to_datetime(values["time"]),  # type: ignore[arg-type]
        span_id=values["span_id"],
        trace_id=values["trace_id"],
        payload=_json(values["payload"]),
        model=values["model"],
        provider=values["provider"],
        prompt_tokens=values["prompt_tokens"],
        completion_tokens=values["completion_tokens"],
        total_tokens=values["total_tokens"],
        cost_usd=values["cost_usd"],
        latency_ms=values["latency_ms"],
        error=values["error"],
        metadata=_metadata([values[c] for c in META_COLUMNS]),
    )


__all__ = ["Store"]
