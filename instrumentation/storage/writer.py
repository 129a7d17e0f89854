"""The batch writer: a bounded queue and one background thread that writes batches.

The application's thread only appends to a ``deque`` (and, once per batch, sets an
``Event``): no I/O, no serialisation, no lock on the way in. The writer thread turns
entries into rows, and writes a batch when ``batch_size`` entries wait or ``debounce``
seconds have passed since the first of them arrived, whichever comes first, in one
transaction with ``executemany``. Its own database calls run under
``suppress_instrumentation()``, so an instrumented database client never traces the
writer.

Nothing is lost silently:

- a full queue blocks the caller for up to ``block_timeout`` seconds
  (``on_full="block"``; then no more until the writer makes room) or refuses the
  newest entry at once (``"drop_newest"``); every refused entry is counted
  (``writer.dropped``, counter ``storage.dropped``) and logged (at most every 10
  seconds), except a trace's root span (``put(entry, root=True)``): up to 1,000 of those are set
  aside and written once there is room, because a trace without its root is not
  listed and the rest of it would be stored unseen;
- a failing database is retried with exponential backoff for ``retry_for`` seconds,
  keeping the batch; then the rows go to a local spool file (see
  :mod:`instrumentation.storage.spool`) and are replayed, before newer rows, once the
  database answers again, a bounded chunk at a time. Inserts skip rows already
  stored, so a replay never duplicates. The rows waiting there take at most
  ``max_spool_bytes`` (1 GiB; ``None``: no bound), the file itself at most an eighth
  more (it is compacted): what does not fit is lost, counted (``rows_lost``, counter
  ``storage.spool_full_rows``) and logged;
- a writer thread that stops by an error (a bug, or a store raising what no ``except
  Exception`` catches) counts what it held and what was queued as lost, and every
  entry put afterwards as dropped, and logs both (see ``_died``).

``flush(timeout)`` is true only when everything queued before the call is in the
database (not merely in the spool); ``shutdown(timeout)`` writes what is queued and
stops, and is safe to call twice. Every live writer is shut down at interpreter exit
(``atexit``), and after ``os.fork`` the child starts a writer thread of its own with
an empty queue (what the parent had queued is the parent's to write).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal

from instrumentation import telemetry
from instrumentation._spans import prepare_exit_flush
from instrumentation._text import describe_error
from instrumentation.context import suppress_instrumentation
from instrumentation.storage import checks
from instrumentation.storage.base import Row, Store
from instrumentation.storage.spool import DEFAULT_MAX_BYTES as DEFAULT_MAX_SPOOL_BYTES
from instrumentation.storage.spool import MAX_BYTES_BOUND, Spool, SpoolChunk, checked_directory

logger = logging.getLogger("instrumentation.storage")

OnFull = Literal["block", "drop_newest"]
RowsOf = Callable[[list[Any]], tuple[list[Row], list[Row]]]

_DROPPED = telemetry.counter("storage.dropped")
_ROWS_WRITTEN = telemetry.counter("storage.rows_written")
_BATCHES = telemetry.counter("storage.batches_written")
_WRITE_ERRORS = telemetry.counter("storage.write_errors")
_REPLAYED = telemetry.counter("storage.replayed_rows")
_LOST = telemetry.counter("storage.lost_rows")
_REJECTED = telemetry.counter("storage.rejected_rows")
_UNWRITABLE = telemetry.counter("storage.unwritable_entries")
_SPOOL_FULL = telemetry.counter("storage.spool_full_rows")

_LOG_EVERY = 10.0
#: Root spans a full queue refused, kept aside to be written when there is room: a
#: trace whose root row is missing is not listed, so its other rows would be unseen.
_SET_ASIDE_LIMIT = 1_000

#: How long a write waits for a database lock held elsewhere, at least, whatever is
#: left of ``retry_for`` (0 included): writers of several processes take turns.
_LOCK_WAIT_AT_LEAST = 1.0
#: The same once shutdown has begun, so that a short shutdown timeout still spools.
_LOCK_WAIT_WHEN_CLOSING = 0.1


class _Marker:
    """Put in the queue by flush/shutdown: resolved once everything before it is written."""

    __slots__ = ("done", "lost_before", "ok", "stop")

    def __init__(self, stop: bool = False) -> None:
        self.done = threading.Event()
        self.ok = False
        self.stop = stop
        self.lost_before = 0


class BatchWriter:
    """Writes entries to ``store`` in batches on its own thread (see the module docstring).

    ``rows_of(entries)`` turns a list of entries into ``(span rows, event rows)``; it
    runs on the writer thread. ``put()`` is thread-safe and never raises. With
    ``close_store=True`` the writer closes ``store`` when it stops (on its own thread,
    after its last write: at ``shutdown()``, or at interpreter exit).
    """

    def __init__(
        self,
        store: Store,
        rows_of: RowsOf,
        *,
        batch_size: int = 500,
        debounce: float = 0.5,
        max_queue: int = 100_000,
        on_full: OnFull = "block",
        block_timeout: float = 1.0,
        retry_for: float = 5.0,
        retry_backoff: float = 0.05,
        max_backoff: float = 2.0,
        replay_interval: float = 1.0,
        spool_dir: str | os.PathLike[str] | None = None,
        max_spool_bytes: int | None = DEFAULT_MAX_SPOOL_BYTES,
        exit_timeout: float = 10.0,
        close_store: bool = False,
    ) -> None:
        if not isinstance(store, Store):
            raise TypeError(
                f"BatchWriter needs a Store (SQLiteStore(path) or PostgresStore(dsn)), "
                f"got {type(store).__name__}"
            )
        if store.read_only:
            raise ValueError(
                f"{store!r} was opened with read_only=True; a writer needs a store that "
                "writes (read_only=False)"
            )
        if not callable(rows_of):
            raise TypeError(
                "rows_of is a function of a list of entries, returning (span rows, event "
                f"rows); got {rows_of!r}"
            )
        if on_full not in ("block", "drop_newest"):
            raise ValueError(f"on_full is 'block' or 'drop_newest', got {on_full!r}")
        self.store = store
        self._rows_of = rows_of
        self.batch_size = checks.count("batch_size", batch_size)
        self.max_queue = checks.count("max_queue", max_queue)
        self.on_full: OnFull = on_full
        # Checked for NaN and the infinities too: ``retry_for=nan`` made every write
        # fail, and ``block_timeout=inf`` every put() that waited overflow the clock.
        seconds = checks.seconds
        self.debounce = seconds("debounce", debounce, positive=True)
        self.block_timeout = seconds("block_timeout", block_timeout)
        self.retry_for = seconds("retry_for", retry_for)
        self.retry_backoff = seconds("retry_backoff", retry_backoff, positive=True)
        self.max_backoff = seconds("max_backoff", max_backoff, positive=True)
        self.replay_interval = seconds("replay_interval", replay_interval, positive=True)
        self.exit_timeout = seconds("exit_timeout", exit_timeout, positive=True)
        #: Close ``store`` when the writer stops (after its last write): the writer owns it.
        self.close_store = checks.flag("close_store", close_store)
        # The folder is checked (and made) now, not when an outage first needs it.
        folder = checked_directory(spool_dir) if spool_dir is not None else None
        #: The most bytes of rows waiting in the spool file (``None``: no bound); rows
        #: beyond are lost, logged and counted (``storage.spool_full_rows``).
        self.max_spool_bytes = (
            None
            if max_spool_bytes is None
            else checks.count("max_spool_bytes", max_spool_bytes, most=MAX_BYTES_BOUND)
        )
        self.spool = Spool(
            store.spool_key, folder, on_lost=self._count_lost, max_bytes=self.max_spool_bytes
        )
        #: Entries refused because the queue was full, the writer shut down or its
        #: thread stopped by an error.
        self.dropped = 0
        self.rows_written = 0
        #: Rows neither written nor spooled (refused by the database, or the spool failed),
        #: and entries no row could be made of.
        self.rows_lost = 0
        self._queue: deque[Any] = deque()
        self._set_aside: deque[Any] = deque()
        self._limit = max_queue  # 0 once shut down: every put() then takes the slow path
        #: Why the writer thread ended by an error (``None`` while it runs): see _died().
        self.failure: str | None = None
        #: Run once when shutdown begins, before entries are refused (see before_stop).
        self._before_stop: list[weakref.WeakMethod[Callable[[], object]]] = []
        self._init_runtime()
        _writers.add(self)
        _flush_when_this_multiprocessing_child_ends()
        self._start()

    def _init_runtime(self) -> None:
        self._queue.clear()
        self._set_aside.clear()
        self._wake = threading.Event()
        self._idle = True
        self._space = threading.Condition(threading.Lock())
        self._space_waiters = 0
        #: A put() waited block_timeout for room in vain, and none was made since.
        self._waited_in_vain = False
        self._state_lock = threading.Lock()
        self._markers_pending = 0
        self._abort = threading.Event()
        self._closed = False
        self._stopped = threading.Event()
        self._next_replay = 0.0
        self._last_error = ""
        self._last_drop_log = 0.0
        self._drops_since_log = 0
        self._last_spool_full_log = -_LOG_EVERY
        self._spool_full_since_log = 0
        #: The spool folder refused the last batch (this process may not use it).
        self._spool_refused = False
        self._stop_marker: _Marker | None = None
        self._thread: threading.Thread | None = None
        #: Entries of the batch being written (0 while replaying the spool, or idle).
        self._holding = 0

    def _start(self) -> None:
        thread = threading.Thread(
            target=self._run, name="instrumentation-storage-writer", daemon=True
        )
        self._thread = thread
        thread.start()

    def __repr__(self) -> str:
        return (
            f"<BatchWriter {self.store!r} queued={len(self._queue)} "
            f"written={self.rows_written} dropped={self.dropped}>"
        )

    # -- the application's side ----------------------------------------------------------

    def put(self, entry: Any, root: bool = False) -> bool:
        """Queue ``entry``; ``False`` if it was refused (counted and logged). A trace's
        root span (``root``) that a full queue refuses is set aside instead."""
        queue = self._queue
        if len(queue) >= self._limit:
            return self._put_when_full(entry, root)
        queue.append(entry)
        if self._idle or len(queue) == self.batch_size:
            self._idle = False
            self._wake.set()
        return True

    def _put_when_full(self, entry: Any, root: bool = False) -> bool:
        placed = [False]  # set as soon as the entry is in the queue or set aside
        try:
            if self._place_when_full(entry, root, placed):
                return True
        except BaseException:
            # Ctrl-C, or SIGTERM's SystemExit (flush_on_sigterm), mostly while it waited
            # for room: the entry was neither queued nor counted, and would be lost
            # unseen. It is queued (over the limit), for the exit flush to write.
            if not placed[0]:
                self._queue.append(entry)
                self._wake.set()
            raise
        self._count_drop()
        return False

    def _place_when_full(self, entry: Any, root: bool, placed: list[bool]) -> bool:
        if self.failure is not None:
            return False  # no thread is left to write it: dropped, counted by the caller
        # After one wait that ran out, the writer is stuck (a database locked for long):
        # waiting again for each entry would hold the application up once per span and
        # event. Until the queue has room again, entries are dropped at once.
        if (
            not self._closed
            and self.on_full == "block"
            and self.block_timeout > 0
            and not self._waited_in_vain
        ):
            deadline = time.monotonic() + self.block_timeout
            queue = self._queue
            self._wake.set()
            with self._space:
                self._space_waiters += 1
                try:
                    while len(queue) >= self._limit and not self._closed:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._space.wait(remaining)
                    if len(queue) < self._limit and not self._closed:
                        queue.append(entry)
                        placed[0] = True
                        self._wake.set()
                        return True
                    self._waited_in_vain = True
                finally:
                    self._space_waiters -= 1
        if root and not self._closed and len(self._set_aside) < _SET_ASIDE_LIMIT:
            self._set_aside.append(entry)
            placed[0] = True
            self._wake.set()
            return True
        return False  # dropped: counted by the caller

    def _count_drop(self) -> None:
        with self._state_lock:
            self.dropped += 1
            self._drops_since_log += 1
            now = time.monotonic()
            if now - self._last_drop_log < _LOG_EVERY:
                _DROPPED.inc()
                return
            self._last_drop_log = now
            count, self._drops_since_log = self._drops_since_log, 0
        _DROPPED.inc()
        if self.failure is not None:
            reason = f"the writer thread stopped by an error ({self.failure})"
        elif self._closed:
            reason = "the writer is shut down"
        else:
            reason = f"the queue is full ({self.max_queue} entries; on_full={self.on_full!r})"
        logger.warning(
            "instrumentation.storage dropped %d entr%s because %s; %d dropped in all",
            count,
            "y" if count == 1 else "ies",
            reason,
            self.dropped,
        )

    @property
    def closed(self) -> bool:
        """Whether :meth:`shutdown` has begun: entries put from then on are refused."""
        return self._closed

    @property
    def queued(self) -> int:
        """Entries waiting to be written (approximate while others put)."""
        return len(self._queue) + len(self._set_aside)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until everything queued before the call is in the database.

        ``False`` when ``timeout`` seconds (0 to a day; ``None``: no limit) pass first,
        when rows are in the spool because the database cannot be reached, when rows
        that were waiting were lost (refused by the database, the spool could not be
        written, or no row could be made of an entry: see ``rows_lost``), or at once
        when the writer thread has stopped by an error (see ``failure``).
        """
        timeout = checks.timeout(timeout)
        if self.failure is not None:
            self._lose_queued()
            return False
        if self._closed:
            self._stopped.wait(timeout)
            return self._stopped_with_all_stored()
        marker = _Marker()
        self._put_marker(marker)
        return marker.done.wait(timeout) and marker.ok

    def _put_marker(self, marker: _Marker) -> None:
        marker.lost_before = self.rows_lost
        with self._state_lock:
            self._markers_pending += 1
        self._queue.append(marker)
        self._idle = False
        self._wake.set()

    def before_stop(self, method: Callable[[], object]) -> None:
        """Have bound ``method`` called once when shutdown begins (at exit too), while
        entries are still taken: a handler puts what it holds in memory, the spans
        still open. Held weakly: a handler collected meanwhile is skipped."""
        self._before_stop.append(weakref.WeakMethod(method))

    def _run_before_stop(self) -> None:
        callbacks, self._before_stop = self._before_stop, []
        for ref in callbacks:
            method = ref()
            if method is None:
                continue
            try:
                method()
            except Exception:
                logger.exception(
                    "instrumentation.storage: %r failed before the writer for %r stopped",
                    method,
                    self.store,
                )

    def shutdown(self, timeout: float | None = 10.0) -> bool:
        """Write what is queued, stop the thread; ``True`` if all of it reached the database.

        Entries put afterwards are refused (and counted). If the database still fails
        when most of ``timeout`` (seconds, 0 to a day; ``None``: no limit) has passed,
        the rest goes to the spool file. Safe to call twice and from several threads.
        """
        timeout = checks.timeout(timeout)
        first = self._begin_shutdown()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            if timeout is None:
                thread.join()
            else:
                thread.join(timeout * 0.8)
                if thread.is_alive():
                    self._abort.set()  # stop retrying: spool the rest
                    thread.join(timeout * 0.2)
                if thread.is_alive():
                    self._warn_still_writing(f"within {timeout:.1f} s")
        return self._end_shutdown(first)

    def _begin_shutdown(self) -> bool:
        """Refuse entries from now on, and queue the stop marker; True on the first call."""
        if not self._closed:
            self._run_before_stop()
        with self._state_lock:
            first = not self._closed
            self._closed = True
            self._limit = 0
        if first:
            with self._space:
                self._space.notify_all()
            if self.failure is None:
                self._stop_marker = _Marker(stop=True)
                self._put_marker(self._stop_marker)
        return first

    def _end_shutdown(self, first: bool) -> bool:
        """What shutdown does once it has waited (for as long as it would)."""
        _writers.discard(self)
        if self.failure is not None:
            self._lose_queued()
        if first:
            self._log_unlogged_drops()
            self._log_unlogged_spool_full()
        return self._stopped_with_all_stored()

    def _stop_at_once(self) -> None:
        """Begin shutting down, and have the thread stop retrying and spool what it has
        (the exit's wait was cut short by Ctrl-C)."""
        self._begin_shutdown()
        self._abort.set()

    def _warn_still_writing(self, when: str) -> None:
        stop = self._stop_marker
        if stop is not None and stop.done.is_set():
            logger.info(
                "instrumentation.storage: the writer for %r is still closing the store "
                "(for SQLite, copying the write-ahead log into the file): it did not "
                "stop %s; every row it had is stored",
                self.store,
                when,
            )
            return
        queued = sum(1 for entry in list(self._queue) if type(entry) is not _Marker)
        queued += len(self._set_aside)
        holding = self._holding
        if not queued and not holding:
            # Only a replay of rows already in the spool file: they stay there.
            logger.warning(
                "instrumentation.storage: the writer for %r did not stop %s (a replay "
                "of the spool file %s still waits for the database); nothing is lost: "
                "the rows stay in that file, for the next process that records to this "
                "database",
                self.store,
                when,
                self.spool.path,
            )
            return
        # Still inside one write: what it holds and what is queued are neither stored
        # nor spooled yet, and at exit they never will be.
        logger.warning(
            "instrumentation.storage: the writer for %r did not stop %s (a write "
            "still waits for the database); %d queued entries and the %d being written "
            "are not stored or spooled yet, and are lost if the process exits now",
            self.store,
            when,
            queued,
            holding,
        )

    def _stopped_with_all_stored(self) -> bool:
        stop = self._stop_marker
        # Done with its stop marker, the writer has stored all it will: closing the
        # store (copying SQLite's log into the file) may still go on, and loses nothing.
        return (
            self.failure is None
            and (self._stopped.is_set() or (stop is not None and stop.done.is_set()))
            and not self._queue
            and not self._set_aside
            and not self.spool.pending
            and (stop is None or stop.ok)
        )

    def _log_unlogged_drops(self) -> None:
        # Drops are logged at most every _LOG_EVERY seconds; the last ones would
        # otherwise never reach the log.
        with self._state_lock:
            count, self._drops_since_log = self._drops_since_log, 0
        if count:
            logger.warning(
                "instrumentation.storage dropped %d more entr%s since the last warning; "
                "%d dropped in all",
                count,
                "y" if count == 1 else "ies",
                self.dropped,
            )

    # -- the writer thread --------------------------------------------------------------

    def _run(self) -> None:
        with suppress_instrumentation():
            try:
                self.spool.adopt_orphans()
            except Exception:
                logger.exception("instrumentation.storage could not look for old spool files")
            try:
                self._loop()
            except BaseException as exc:  # a bug, or a store that raised BaseException
                self._died(exc)
            finally:
                if self.close_store:
                    self._close_store()
                self._stopped.set()
                with self._space:
                    self._space.notify_all()

    def _died(self, exc: BaseException) -> None:
        """The writer thread ends by ``exc``: nothing will write what it held, what is
        queued, nor what is put from now on. The first two are counted as lost
        (``rows_lost``, ``storage.lost_rows``), the rest refused as dropped
        (``dropped``, ``storage.dropped``), all of it logged; ``flush()`` and
        ``shutdown()`` answer False at once. (The thread died without a count before,
        and every entry after it stayed queued, unseen.)"""
        with self._state_lock:
            self.failure = describe_error(exc)
            self._limit = 0  # every put() takes the slow path, which refuses it
        with self._space:
            self._space.notify_all()  # a put() waiting for room gives up
        held, self._holding = self._holding, 0
        if held:
            self._count_lost(held)
        lost = self._lose_queued(log=False)
        logger.error(
            "instrumentation.storage: the writer thread for %r stopped by an error; %d "
            "entries it was writing or had queued are lost, and entries from now on are "
            "dropped (storage.lost_rows, storage.dropped): make a new handler to record "
            "again",
            self.store,
            held + lost,
            exc_info=exc,
        )

    def _lose_queued(self, log: bool = True) -> int:
        """Once the writer thread has died: count what is queued or set aside as lost,
        and answer the flushes waiting in the queue (False). What a put() appended just
        as the thread died is found here, by the next flush() or shutdown()."""
        lost = 0
        for waiting in (self._queue, self._set_aside):
            while True:
                try:
                    item = waiting.popleft()
                except IndexError:
                    break
                if type(item) is _Marker:
                    with self._state_lock:
                        self._markers_pending -= 1
                    item.done.set()  # ok stays False
                else:
                    lost += 1
        if lost:
            self._count_lost(lost)
            if log:
                logger.error(
                    "instrumentation.storage: %d entries queued for %r are lost: the "
                    "writer thread stopped by an error (%s)",
                    lost,
                    self.store,
                    self.failure,
                )
        return lost

    def _close_store(self) -> None:
        # Closing SQLite's last connection copies its -wal file into the database.
        try:
            self.store.close()
        except Exception:
            logger.exception("instrumentation.storage could not close %r", self.store)

    def _wait_for_work(self) -> None:
        queue = self._queue
        aside = self._set_aside
        while not queue and not aside:
            self._idle = True
            self._wake.clear()
            if queue or aside:
                break
            timeout = self.replay_interval if self.spool.pending else None
            self._wake.wait(timeout)
            if (
                not queue
                and not aside
                and self.spool.pending
                and time.monotonic() >= self._next_replay
            ):
                self._replay()
        self._idle = False
        # Debounce: give the batch until ``debounce`` after its first entry to fill.
        deadline = time.monotonic() + self.debounce
        while len(queue) < self.batch_size and not self._markers_pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wake.clear()
            if len(queue) >= self.batch_size or self._markers_pending:
                break
            self._wake.wait(remaining)

    def _loop(self) -> None:
        queue = self._queue
        aside = self._set_aside
        while True:
            self._wait_for_work()
            batch: list[Any] = []
            marker: _Marker | None = None
            while queue and len(batch) < self.batch_size:
                item = queue.popleft()
                if type(item) is _Marker:
                    marker = item
                    break
                batch.append(item)
            # After the queue: a root set aside before a flush() marker was queued is
            # in the set-aside by now, and goes in the batch that marker completes.
            while aside:
                batch.append(aside.popleft())
            self._waited_in_vain = False
            if self._space_waiters:
                with self._space:
                    self._space.notify_all()
            if batch:
                self._holding = len(batch)
                try:
                    spans, events = self._rows_of(batch)
                except Exception:  # a rows_of given to BatchWriter that fails
                    self._unusable_batch(len(batch))
                    spans, events = [], []
                self._write(spans, events)
                self._holding = 0
            if marker is not None:
                with self._state_lock:
                    self._markers_pending -= 1
                if self.spool.pending and not self._abort.is_set():
                    self._replay()
                # Rows lost while this marker waited were queued before it.
                marker.ok = not self.spool.pending and self.rows_lost == marker.lost_before
                if marker.stop:
                    # Anything put between shutdown() and here was refused; write the
                    # rest that was queued before the stop marker (none: FIFO).
                    marker.done.set()
                    return
                marker.done.set()

    def _unusable_batch(self, n: int) -> None:
        """``rows_of`` raised for a batch of ``n`` entries: they are lost, counted as
        entries no row could be made of, and logged; the writer goes on."""
        _UNWRITABLE.add(n)
        self.rows_lost += n
        logger.exception(
            "instrumentation.storage: rows_of failed for a batch of %d entries; they are lost",
            n,
        )

    def _write(self, spans: list[Row], events: list[Row]) -> None:
        spans, events = self._without_refused_traces(spans, events)
        if not spans and not events:
            return
        # Keep the order: older spooled rows go first, or these join them.
        # Shutting down while the database fails, the rest goes to the spool file at
        # once (the stop marker tries one replay): a server that takes connections and
        # never answers holds each try for the whole connect timeout, and what was still
        # queued when the process exited was lost.
        if self.spool.pending and (
            self._abort.is_set()
            or self._closed
            or time.monotonic() < self._next_replay
            or not self._replay()
        ):
            self._to_spool(spans, events)
            return
        delay = self.retry_backoff
        deadline = time.monotonic() + self.retry_for
        while True:
            try:
                # A lock held elsewhere is waited for only as long as retrying may go on
                # (but a moment at least: another writer's turn is no failure).
                wait = max(deadline - time.monotonic(), self._lock_wait_at_least())
                self.store.write_within(spans, events, wait)
            except Exception as exc:
                _WRITE_ERRORS.inc()
                if self.store.is_data_error(exc):
                    self._write_row_by_row(spans, events)
                    return
                logger.warning(
                    "instrumentation.storage could not write %d rows to %r (%s: %s); %s",
                    len(spans) + len(events),
                    self.store,
                    type(exc).__name__,
                    exc,
                    "retrying" if time.monotonic() + delay <= deadline else self._after_retries(),
                )
                if time.monotonic() + delay > deadline or self._abort.wait(delay):
                    break
                delay = min(delay * 2, self.max_backoff)
                continue
            self._stored(spans, events)
            return
        self._to_spool(spans, events)
        self._next_replay = time.monotonic() + self.replay_interval

    def _without_refused_traces(
        self, spans: list[Row], events: list[Row]
    ) -> tuple[list[Row], list[Row]]:
        """The rows of a batch but those of traces the full spool refused for their
        root (see ``TraceHeads``): stored, they would head no trace. Lost, counted as
        the spool's."""
        spans, events, refused = self.spool.heads.without_refused(spans, events)
        if refused:
            self._spool_full(refused)
        return spans, events

    def _stored(self, spans: Sequence[Row], events: Sequence[Row]) -> None:
        """The database took these rows: counted, and (with a bound on the spool) told
        to what keeps the spool from refusing the root spans they have."""
        if self.max_spool_bytes is not None:
            self.spool.heads.kept(spans, events)
        self._written(len(spans) + len(events))

    def _after_retries(self) -> str:
        """What happens to a batch the database did not take in ``retry_for``."""
        if self._spool_refused:
            return (
                f"they are lost: the spool folder {self.spool.directory} refused the last "
                "rows (the error logged then says why)"
            )
        return (
            f"spooling them to {self.spool.path}, to be written when the database takes "
            "writes again (by this process, or the next one that records to it)"
        )

    def _lock_wait_at_least(self) -> float:
        # Shutting down, the wait must fit in shutdown's timeout, or rows that could
        # have gone to the spool are still in a write when the process exits.
        return _LOCK_WAIT_WHEN_CLOSING if self._closed else _LOCK_WAIT_AT_LEAST

    def _write_row_by_row(self, spans: list[Row], events: list[Row]) -> None:
        """A batch the database refused for its content: keep every row it will take.

        The batch is tried once more with what the database refuses in text (NUL
        characters on PostgreSQL, lone surrogates on both) replaced by U+FFFD, still
        in one transaction: one event holding a NUL sent every row of its batch one
        by one, and a trace was seen in parts meanwhile. Refused again, each row is
        tried on its own, as it is, then cleaned, then rejected: counted
        (``storage.rejected_rows``) and logged. If the database stops answering
        meanwhile, the rest goes to the spool.
        """
        if self._wrote_cleaned(spans, events):
            return
        pending = [(True, r) for r in spans] + [(False, r) for r in events]
        stopped_at = self._write_one_by_one(pending)
        if stopped_at is not None:
            rest = pending[stopped_at:]
            self._to_spool([r for s, r in rest if s], [r for s, r in rest if not s])
            self._next_replay = time.monotonic() + self.replay_interval

    def _wrote_cleaned(self, spans: Sequence[Row], events: Sequence[Row]) -> bool:
        """Whether the rows, refused, were written with what the database refuses in
        text replaced (if that changed any), in one transaction."""
        store = self.store
        cleaned_spans = [store.cleaned(r, True) for r in spans]
        cleaned_events = [store.cleaned(r, False) for r in events]
        if cleaned_spans == list(spans) and cleaned_events == list(events):
            return False
        try:
            store.write_within(cleaned_spans, cleaned_events, self._lock_wait_at_least())
        except Exception:  # for its content, or the database stopped: row by row tells
            return False
        self._stored(cleaned_spans, cleaned_events)
        return True

    def _write_one_by_one(self, pending: Sequence[tuple[bool, Row]]) -> int | None:
        """Write ``(is_span, row)`` one at a time, in order, rejecting the rows the
        database refuses for their content; ``None`` when done, or the index of the
        first row not written because the database stopped answering."""
        for i, (is_span, row) in enumerate(pending):
            cleaned = self.store.cleaned(row, is_span)
            error: BaseException | None = None
            for attempt in (row,) if cleaned == row else (row, cleaned):
                try:
                    self.store.write_within(
                        [attempt] if is_span else [],
                        [] if is_span else [attempt],
                        self._lock_wait_at_least(),
                    )
                except Exception as exc:
                    error = exc
                    if self.store.is_data_error(exc):
                        continue
                    self._last_error = f"{type(exc).__name__}: {exc}"
                    return i
                self._stored([attempt] if is_span else [], [] if is_span else [attempt])
                break
            else:
                self._reject(
                    1,
                    f"the database refused row {row[0]!r} of {'spans' if is_span else 'events'}"
                    f" ({type(error).__name__}: {error})",
                )
        return None

    def _reject(self, n: int, why: str) -> None:
        _REJECTED.add(n)
        self.rows_lost += n
        logger.error(
            "instrumentation.storage: %s; %s dropped", why, "it is" if n == 1 else "they are"
        )

    def _written(self, n: int) -> None:
        self.rows_written += n
        _ROWS_WRITTEN.add(n)
        _BATCHES.inc()
        if self._spool_full_since_log:  # the database takes writes again
            self._log_unlogged_spool_full()

    def _to_spool(self, spans: list[Row], events: list[Row]) -> None:
        try:
            refused = self.spool.append(spans, events)
        except Exception as exc:
            self._spool_refused = isinstance(exc, PermissionError)
            self._count_lost(len(spans) + len(events))
            # A folder this process may not use (see Spool._make_folder) says why in its
            # message; a traceback adds nothing there.
            logger.error(
                "instrumentation.storage lost %d rows: the database failed and the spool "
                "file %s could not be written%s",
                len(spans) + len(events),
                self.spool.path,
                f": {exc}" if isinstance(exc, PermissionError) else "",
                exc_info=not isinstance(exc, PermissionError),
            )
            return
        self._spool_refused = False
        if refused:
            self._spool_full(refused)

    def _spool_full(self, n: int) -> None:
        """``n`` rows did not fit in the spool file (``max_spool_bytes``), or are of a
        trace whose root span it refused: lost, counted, and logged at most every
        ``_LOG_EVERY`` seconds (a long outage refuses every batch). The warning says
        both: the latter may come once the database takes writes again."""
        _SPOOL_FULL.add(n)
        self._count_lost(n)
        with self._state_lock:
            self._spool_full_since_log += n
            now = time.monotonic()
            if now - self._last_spool_full_log < _LOG_EVERY:
                return
            self._last_spool_full_log = now
            count, self._spool_full_since_log = self._spool_full_since_log, 0
        logger.warning(
            "instrumentation.storage lost %d rows: the spool file %s held "
            "max_spool_bytes=%d bytes of rows waiting for the database (rows that came "
            "later of a trace whose root span it refused are refused too: they would be "
            "stored heading no trace); %d rows lost in all",
            count,
            self.spool.path,
            self.max_spool_bytes,
            self.rows_lost,
        )

    def _log_unlogged_spool_full(self) -> None:
        """The rows the full spool refused since its last warning, logged: once the
        database takes writes again, and at shutdown. The warnings come at most every
        ``_LOG_EVERY`` seconds, so those lost in the last stretch of an outage were
        counted but never logged (a service that ran on, a process that exited)."""
        with self._state_lock:
            count, self._spool_full_since_log = self._spool_full_since_log, 0
            if count:  # the next warning comes _LOG_EVERY seconds after this one
                self._last_spool_full_log = time.monotonic()
        if count:
            logger.warning(
                "instrumentation.storage lost %d more rows since the last warning: the "
                "spool file %s held max_spool_bytes=%d bytes of rows waiting for the "
                "database (rows that came later of a trace whose root span it refused are "
                "refused too); %d rows lost in all",
                count,
                self.spool.path,
                self.max_spool_bytes,
                self.rows_lost,
            )

    def count_unwritable(self, n: int) -> None:
        """``n`` entries no row could be made of (``rows_of`` logged them): lost, so that
        the flush or shutdown they were queued before answers False."""
        self.rows_lost += n

    def _count_lost(self, n: int) -> None:
        """``n`` rows are gone: the spool file could not be written, or rows that waited
        in it are (it was removed or replaced by something else; the spool logged it)."""
        _LOST.add(n)
        self.rows_lost += n

    def _replay(self) -> bool:
        """Write the spooled rows; ``True`` (and the spool emptied) if the database took them.

        The file is read a chunk at a time (at most ``max(batch_size, 1000)`` rows), each
        chunk written in one transaction, so memory stays bounded however long the
        outage was. When the database fails part-way, the rows it took are not read
        again on the next try; rows it refuses for their content (and lines that are
        not rows) are rejected one by one (as for a batch), so they cannot hold up the
        spool. The writers of one file take turns, a chunk at a time, so each row is
        sent (and counted) once.
        """
        step = max(self.batch_size, 1000)
        replayed = 0
        while True:
            if self._abort.is_set():  # shutdown ran out of time: the rest stays spooled
                return False
            with self.spool.replaying(self._abort) as turn:
                if not turn:
                    return False
                chunk = self.spool.next_chunk(step)
                if chunk is None:
                    break
                if chunk.malformed:
                    self._reject(
                        chunk.malformed,
                        f"{chunk.malformed} line(s) of the spool file {self.spool.path} are "
                        f"not rows of this release's tables (first: {chunk.malformed_example})",
                    )
                written_before = self.rows_written
                try:
                    done = self._replay_chunk(chunk)
                finally:
                    n = self.rows_written - written_before
                    _REPLAYED.add(n)
                    replayed += n
                self.spool.mark_replayed(chunk, done)
                if done is not None:
                    _WRITE_ERRORS.inc()
                    self._next_replay = time.monotonic() + self.replay_interval
                    logger.info(
                        "instrumentation.storage: database still failing (%s); %d rows wait in %s",
                        self._last_error,
                        self.spool.rows_pending,
                        self.spool.path,
                    )
                    return False
        if replayed:
            logger.info(
                "instrumentation.storage replayed %d spooled rows into %r", replayed, self.store
            )
        return True

    def _replay_chunk(self, chunk: SpoolChunk) -> int | None:
        """Write one chunk of the spool; ``None`` if the database took (or rejected)
        every row, else how many of its first rows (in file order) it did."""
        if not chunk.rows:
            return None
        try:
            # A replay waits for a lock held elsewhere no longer than a write does: the
            # rows are safe in the spool, and the next replay comes soon.
            self.store.write_within(chunk.spans, chunk.events, self._lock_wait_at_least())
        except Exception as exc:
            if not self.store.is_data_error(exc):
                self._last_error = f"{type(exc).__name__}: {exc}"
                return 0
            if self._wrote_cleaned(chunk.spans, chunk.events):
                return None
            return self._write_one_by_one([(s, r) for s, r, _, _ in chunk.rows])
        self._written(len(chunk.rows))
        return None

    # -- process life --------------------------------------------------------------------

    def _after_fork_in_child(self) -> None:
        was_closed = self._closed
        self.store.after_fork_in_child()
        self._init_runtime()
        self.dropped = 0
        self.rows_written = 0
        self.rows_lost = 0
        if was_closed or self.failure is not None:
            self._closed = was_closed
            self._stopped.set()  # a writer that died stays so: its entries are refused
        else:
            self._limit = self.max_queue
            self._start()


_writers: weakref.WeakSet[BatchWriter] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for writer in list(_writers):
        try:
            writer._after_fork_in_child()
        except Exception:  # pragma: no cover
            logger.exception("instrumentation.storage could not restart a writer after fork")
    if _writers:
        _flush_when_a_multiprocessing_child_ends()


class _AfterForkKey:
    """What multiprocessing's after-fork registry holds (weakly) for us."""


_after_fork_key = _AfterForkKey()


def _flush_when_a_multiprocessing_child_ends() -> None:
    """A child that ``multiprocessing`` forked ends with ``os._exit``: no ``atexit``, so
    what its writers hold was lost (a ``Process`` target that returned, ``Pool``
    workers closed and joined). Its own finalizers do run at its end, but it clears
    them after this hook: an after-fork function, run once it has, registers ours."""
    util = sys.modules.get("multiprocessing.util")
    if util is not None:
        util.register_after_fork(_after_fork_key, _register_exit_finalizer)


#: The process that registered ``_shutdown_all_at_exit`` with multiprocessing (once).
_finalizer_pid: int | None = None


def _register_exit_finalizer(_key: object = None) -> None:
    global _finalizer_pid
    util = sys.modules.get("multiprocessing.util")
    if util is not None and _finalizer_pid != os.getpid():
        util.Finalize(None, _shutdown_all_at_exit, exitpriority=0)
        _finalizer_pid = os.getpid()


def _flush_when_this_multiprocessing_child_ends() -> None:
    """For a writer made inside a ``multiprocessing`` child: in its target or a
    ``Pool`` initializer (the child's finalizers were cleared before), or while a
    spawned or forkserver child imports the main module (they are cleared after: an
    after-fork function registers ours then)."""
    process = sys.modules.get("multiprocessing.process")
    if process is None:
        return
    if process.parent_process() is not None:
        _register_exit_finalizer()
    elif getattr(process.current_process(), "_inheriting", False):
        _flush_when_a_multiprocessing_child_ends()


#: Whether ``_shutdown_all_at_exit`` is running (a SIGTERM then waits for it).
_exiting = [False]


def _shutdown_all_at_exit() -> None:
    _exiting[0] = True
    try:
        try:
            prepare_exit_flush()  # LLM streams still open end, span ends put off go in
        except BaseException:  # a handler's Ctrl-C: the flush goes on
            logger.exception(
                "instrumentation.storage: the exit hooks or what was put off failed at exit"
            )
        writers = list(_writers)
        try:
            for writer in writers:
                try:
                    writer.shutdown(writer.exit_timeout)
                except Exception:  # pragma: no cover
                    logger.exception("instrumentation.storage could not flush a writer at exit")
        except KeyboardInterrupt:
            _cut_short_at_exit(writers)
    finally:
        _exiting[0] = False


#: Once Ctrl-C has cut the exit's wait short, how long the writers still get to put
#: what they hold in the spool file (the local disk: a moment).
SPOOL_AFTER_CTRL_C = 1.0


def _cut_short_at_exit(writers: list[BatchWriter]) -> None:
    """Ctrl-C while the exit waits for a database that does not answer: the user wants
    out, as with the audit's exit flush, not a traceback ("Exception ignored in atexit
    callback") and the queued rows gone without a word.

    Every writer stops retrying and spools what it has, given ``SPOOL_AFTER_CTRL_C``
    seconds for it (Ctrl-C again ends that wait too); what is still neither stored nor
    spooled then (a write stuck in the database's connect timeout) is logged.
    """
    left = [writer for writer in writers if writer in _writers]  # not shut down yet
    for writer in left:
        writer._stop_at_once()
    deadline = time.monotonic() + SPOOL_AFTER_CTRL_C
    # Waited for on the writers' own events: a Thread whose join() Ctrl-C interrupted
    # says it is no longer alive, though it runs on (Python 3.11's threading).
    try:
        for writer in left:
            writer._stopped.wait(max(deadline - time.monotonic(), 0.0))
    except KeyboardInterrupt:
        pass
    for writer in left:
        if not writer._stopped.is_set():
            writer._warn_still_writing("before Ctrl-C cut the exit short")
        writer._end_shutdown(first=True)  # logs the drops not logged yet, if any


#: The exit status of a process that ``flush_on_sigterm`` ended (as shells report one
#: that SIGTERM killed: 128 + 15).
SIGTERM_EXIT_STATUS = 128 + signal.SIGTERM


def flush_on_sigterm() -> None:
    """Make SIGTERM (``docker stop``, Kubernetes, systemd) an orderly exit, so that
    ``atexit`` writes what every writer holds.

    Python's default for SIGTERM ends the process at once, running no ``atexit``: the
    rows still queued were lost without a word. After this call, SIGTERM raises
    ``SystemExit(143)`` in the main thread instead, as Ctrl-C raises
    ``KeyboardInterrupt``: the code it interrupts unwinds (releasing its locks), and
    the exit flushes. Nothing is written inside the signal handler itself, where a
    lock the interrupted code holds would never be released. A SIGTERM during that
    flush is ignored (the flush is bounded by ``exit_timeout``); any other raises
    ``SystemExit`` again (a second one stops the exit from waiting for non-daemon
    threads that keep running). Child processes forked afterwards keep Python's
    default, unless they call this themselves.

    Call it once, from the main thread. A SIGTERM handler the application installed
    before (or SIGTERM being ignored) is left in place: that handler decides, and an
    orderly exit it makes flushes anyway. Servers that turn SIGTERM into an orderly
    exit (uvicorn, gunicorn) need none of this.
    """
    current = signal.getsignal(signal.SIGTERM)
    if current != signal.SIG_DFL and getattr(current, "_installed_in", None) is None:
        return  # the application's own, or ignored: left in charge
    installed_in = os.getpid()

    def on_sigterm(signum: int, frame: Any) -> None:
        if os.getpid() != installed_in:
            # A child forked since (a Pool worker being terminated): SIGTERM as
            # Python has it.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if _exiting[0]:
            return  # the exit flush is running, and is bounded: let it finish
        raise SystemExit(SIGTERM_EXIT_STATUS)

    on_sigterm._installed_in = installed_in  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, on_sigterm)


if hasattr(os, "register_at_fork"):  # pragma: no branch
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_shutdown_all_at_exit)


__all__ = ["SPOOL_AFTER_CTRL_C", "BatchWriter", "flush_on_sigterm"]
