"""The audit loop: one background thread with an event loop, where handler calls run.

Handler calls never run on the application's thread: application code may be sync or
async, handlers may be ``async def`` or plain ``def``, and neither should wait for the
other. ``async def`` methods run as tasks on this loop; plain ``def`` methods run on a
few worker threads, so a blocking write never stalls the loop (nor the application's).
Everything here runs with instrumentation suppressed, so handlers are never traced.

The loop must outlive any handler. The runner reports whatever a handler call raises
(``SystemExit`` and ``KeyboardInterrupt`` included); what still reaches the loop (such
an exception from a task or callback a handler started itself, or a handler stopping
the loop) is logged, counted in ``audit.loop_errors``, and the loop runs on. Should
its thread end anyway, the requests it was serving are told at once (they end with
``completed=False`` instead of waiting out their timeout) and the next request starts
a new loop, counted in ``audit.loop_restarts``.

Plain ``def`` methods run on a :class:`~instrumentation._pool.ThreadPool`, not on a
``ThreadPoolExecutor``: once the interpreter begins to exit, every
``ThreadPoolExecutor`` refuses new work ("cannot schedule new futures after
interpreter shutdown"; its ``threading`` exit hook runs before non-daemon threads are
joined and before ``atexit``), which is just when the exit flush
(:mod:`instrumentation.audit.runner`) needs the calls still in flight to run.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from instrumentation import telemetry
from instrumentation._pool import ThreadPool
from instrumentation.context import suppress_instrumentation

#: Worker threads for handler methods written as plain ``def``, unless
#: :func:`set_worker_threads` says otherwise. A plain ``def`` call holds one while it
#: runs: as many slow calls at once as there are threads delay every other one.
SYNC_WORKERS = 4
#: A pool starts all its threads: a typo (200000) would start thousands, then fail.
MAX_SYNC_WORKERS = 256

#: Seconds a dying loop's thread gives the calls it leaves to take their cancellation.
DISPOSE_SECONDS = 1.0

logger = logging.getLogger("instrumentation.audit")

LOOP_ERRORS = telemetry.counter("audit.loop_errors")
LOOP_RESTARTS = telemetry.counter("audit.loop_restarts")
CALLS_ABANDONED = telemetry.counter("audit.calls_abandoned")

_on_loop_thread = threading.local()


class Served(Protocol):
    """What a worker serves (a request's run): told when the worker's thread ends."""

    def worker_lost(self, error: BaseException | None) -> None: ...


class Worker:
    """One event loop and the thread running it, with the runs it serves."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread: threading.Thread | None = None
        self.context = contextvars.Context()  # the suppressed one, set on its thread
        self.alive = True
        self.served: set[Served] = set()
        # Calls posted from other threads, run in order by one callback on the loop:
        # the loop is woken (a write to its socket, tens of microseconds on the
        # poster's thread) only when this goes from empty to not, not once per call.
        self.posted: deque[tuple[Callable[..., object], tuple[Any, ...]]] = deque()
        self.post_lock = threading.Lock()
        self.wake_pending = False

    def running(self) -> bool:
        return self.alive and self.thread is not None and self.thread.is_alive()

    def run_posted(self) -> None:
        """On the loop: run what was posted so far, in order (see :meth:`AuditLoop.post`)."""
        with self.post_lock:
            batch, self.posted = self.posted, deque()
            self.wake_pending = False
        for func, args in batch:
            try:
                func(*args)
            except BaseException as exc:  # one call must not lose the others after it
                report_loop_error(exc, "got an exception from a posted call")


def report_loop_error(error: BaseException | None, what: str) -> None:
    """Count and log something that reached the audit loop itself."""
    LOOP_ERRORS.inc()
    if telemetry.log_turn(("audit", "loop", what)) is None:
        return
    try:
        if error is None:
            logger.error("the audit loop %s; it goes on", what)
        else:
            logger.error(
                "the audit loop %s: %r; it goes on",
                what,
                error,
                exc_info=(type(error), error, error.__traceback__),
            )
    except Exception:  # pragma: no cover - a broken log filter: counted all the same
        pass


def _dispose(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what was left on a loop whose thread is ending, then close it.

    Its requests have been told, so their pending calls stop quietly; closing makes
    late posts fail at once instead of piling up. A call that ignores its cancellation
    for :data:`DISPOSE_SECONDS` (a handler swallowing ``CancelledError``) is closed
    where it waits (its ``finally`` blocks run), counted in ``audit.calls_abandoned``
    and logged: nothing stays pending on the closed loop. Then the async generators
    handlers left suspended on the loop are closed (``loop.shutdown_asyncgens()``, so
    their ``finally`` blocks run too), within :data:`DISPOSE_SECONDS` as well.
    """
    try:
        deadline = time.monotonic() + DISPOSE_SECONDS
        tasks = _cancel_all(loop)
        while tasks:
            loop.run_until_complete(
                asyncio.wait(tasks, timeout=max(deadline - time.monotonic(), 0.0))
            )
            # Cancelled again: those still there ignored it; new ones started meanwhile.
            tasks = _cancel_all(loop)
            if time.monotonic() >= deadline:
                break
        if tasks:
            _abandon(loop, tasks)
    except BaseException:  # pragma: no cover - what is left is collected with the loop
        pass
    try:
        _close_asyncgens(loop)
    except BaseException:  # pragma: no cover - what is left is collected with the loop
        pass
    finally:
        try:
            loop.close()
        except Exception:  # pragma: no cover
            pass


def _close_asyncgens(loop: asyncio.AbstractEventLoop) -> None:
    """``loop.shutdown_asyncgens()``, at most :data:`DISPOSE_SECONDS`.

    Safe here: the loop only ever ran the runner and handler calls, whose tasks are
    ended, so every async generator it knows is a handler's, left suspended. One still
    closing after the time (its ``finally`` awaits too long) is cancelled; one that
    ignores that is closed as :func:`_abandon` does, so nothing stays pending.
    """
    closing = loop.create_task(loop.shutdown_asyncgens(), name="audit: async generators")
    loop.run_until_complete(asyncio.wait({closing}, timeout=DISPOSE_SECONDS))
    if not closing.done():
        try:
            logger.error(
                "audit: async generators left by handlers were still closing %.3gs after "
                "the audit loop's thread ended; they are cancelled",
                DISPOSE_SECONDS,
            )
        except Exception:  # pragma: no cover - logging must not stop the clean-up
            pass
        left = _cancel_all(loop)  # the closing and the aclose() calls it gathers
        loop.run_until_complete(asyncio.wait(left, timeout=DISPOSE_SECONDS))
        stuck = {task for task in left if not task.done()}
        if stuck:
            _abandon(loop, stuck)
    if closing.done() and not closing.cancelled():
        closing.exception()  # retrieved: asyncio does not log it again


def _cancel_all(loop: asyncio.AbstractEventLoop) -> set[asyncio.Task[Any]]:
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    return tasks


def _abandon(loop: asyncio.AbstractEventLoop, tasks: set[asyncio.Task[Any]]) -> None:
    """End ``tasks``, which ignored their cancellation, by closing their coroutines.

    The closing runs on the loop: a handler that catches the ``GeneratorExit`` and
    awaits again then only makes ``close()`` fail, instead of spinning outside a loop.
    """

    async def close_them() -> None:
        for task in tasks:
            CALLS_ABANDONED.inc()
            coro = task.get_coro()
            closed = True
            try:
                if coro is not None and hasattr(coro, "close"):
                    coro.close()  # GeneratorExit where it waits
            except BaseException:  # RuntimeError: it ignored GeneratorExit too
                closed = False
            task.cancel()  # wakes it: one more step, on a closed coroutine, ends it
            _log_abandoned(task, closed)

    loop.run_until_complete(close_them())
    loop.run_until_complete(asyncio.wait(tasks, timeout=DISPOSE_SECONDS))
    for task in tasks:
        if task.done():
            if not task.cancelled():
                task.exception()  # retrieved: asyncio does not log it again
        else:
            _log_abandoned(task, None)


def _log_abandoned(task: asyncio.Task[Any], closed: bool | None) -> None:
    try:
        if closed is None:
            logger.error(
                "audit: %s could not be ended; it is left on its closed loop",
                task.get_name(),
            )
        else:
            logger.error(
                "audit: %s ignored its cancellation for %.3gs after the audit loop's thread "
                "ended; %s (counted in audit.calls_abandoned)",
                task.get_name(),
                DISPOSE_SECONDS,
                "closed where it waited, its finally blocks ran"
                if closed
                else "it ignored GeneratorExit too",
            )
    except Exception:  # pragma: no cover - logging must not stop the clean-up
        pass


class AuditLoop:
    """Starts its thread at first use, and again if it ever ends; safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._worker: Worker | None = None
        self._executor: ThreadPool | None = None
        self.sync_workers = SYNC_WORKERS

    # -- the worker -------------------------------------------------------------------

    def worker(self, serve: Served | None = None) -> Worker:
        """The running worker (started, or replaced if its thread ended), serving ``serve``."""
        lost: Worker | None = None
        with self._lock:
            worker = self._worker
            if worker is not None and not worker.running():
                lost, worker, self._worker = worker, None, None
            if worker is None:
                worker = self._start()
            if serve is not None:
                worker.served.add(serve)
        if lost is not None:  # its thread ended without a word (it always says, so far)
            self._lost(lost, None, on_its_thread=False)
        return worker

    def release(self, worker: Worker, served: Served) -> None:
        """``served`` is finished: ``worker`` no longer needs to tell it anything."""
        with self._lock:
            worker.served.discard(served)

    def set_sync_workers(self, count: int) -> None:
        """Run plain ``def`` handler methods on ``count`` threads from now on.

        A pool already running is replaced: the calls it was given still run on its
        threads, which then end.
        """
        if isinstance(count, bool) or not isinstance(count, int):
            raise TypeError(f"the number of worker threads is an int; got {type(count).__name__}")
        if not 1 <= count <= MAX_SYNC_WORKERS:
            raise ValueError(
                f"the number of worker threads is from 1 to {MAX_SYNC_WORKERS} (each is "
                f"started at once; more only wait on each other); got {count}"
            )
        with self._lock:
            self.sync_workers = count
            old = self._executor
            if old is None or len(old.threads) == count:
                return
            self._executor = ThreadPool(count, "instrumentation-audit-sync")
        old.shutdown(wait=False)  # after the calls submitted to it (under the lock: all)

    def _start(self) -> Worker:
        if self._executor is None:
            self._executor = ThreadPool(self.sync_workers, "instrumentation-audit-sync")
        worker = Worker(asyncio.new_event_loop())
        ready = threading.Event()
        thread = threading.Thread(
            target=self._run, args=(worker, ready), name="instrumentation-audit", daemon=True
        )
        worker.thread = thread
        thread.start()
        ready.wait()
        self._worker = worker
        return worker

    def _run(self, worker: Worker, ready: threading.Event) -> None:
        error: BaseException | None = None
        try:
            _on_loop_thread.worker = worker
            asyncio.set_event_loop(worker.loop)
            with suppress_instrumentation():
                worker.context = contextvars.copy_context()
                ready.set()
                self._serve(worker.loop)
        except BaseException as exc:  # the loop must not end silently, whatever ended it
            error = exc
        finally:
            ready.set()
            with self._lock:
                worker.alive = False
                if self._worker is worker:
                    self._worker = None
            self._lost(worker, error, on_its_thread=True)

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop) -> None:
        while not loop.is_closed():
            try:
                loop.run_forever()
            except BaseException as exc:
                # A task or callback let SystemExit/KeyboardInterrupt through (asyncio
                # re-raises those out of run_forever): a handler's doing, on this
                # thread, so it ends nothing. The loop resumes where it was.
                report_loop_error(exc, "got an exception no handler call caught")
            else:
                if not loop.is_closed():  # nothing here stops it: a handler did
                    report_loop_error(None, "was stopped (by a handler?)")

    def _lost(self, worker: Worker, error: BaseException | None, on_its_thread: bool) -> None:
        with self._lock:
            served = list(worker.served)
            worker.served.clear()
        LOOP_RESTARTS.inc()
        try:
            logger.error(
                "the audit loop's thread ended (%r); %d request(s) lose their pending "
                "handler calls and end with completed=False; the next request starts "
                "a new loop",
                error,
                len(served),
                exc_info=None if error is None else (type(error), error, error.__traceback__),
            )
        except Exception:  # pragma: no cover - logging must not stop the clean-up
            pass
        for run in served:
            try:
                run.worker_lost(error)
            except Exception:  # pragma: no cover - one run must not stop the others
                logger.exception("audit: could not end a request its loop lost")
        if on_its_thread:
            _dispose(worker.loop)

    # -- using it ---------------------------------------------------------------------

    @property
    def _thread(self) -> threading.Thread | None:
        worker = self._worker
        return None if worker is None else worker.thread

    def in_loop_thread(self) -> bool:
        """True on an audit loop's own thread (waiting there would deadlock)."""
        return getattr(_on_loop_thread, "worker", None) is not None

    @staticmethod
    def post(worker: Worker, func: Callable[..., object], *args: Any) -> bool:
        """Run ``func(*args)`` on ``worker``'s loop, in its suppressed context; FIFO.

        The loop is woken only if nothing posted is waiting for it already (a pending
        wake-up runs everything posted until it runs). False when that loop is gone
        (its runs have been told).
        """
        with worker.post_lock:
            worker.posted.append((func, args))
            if worker.wake_pending:
                return True
            worker.wake_pending = True
        try:
            worker.loop.call_soon_threadsafe(worker.run_posted, context=worker.context)
        except RuntimeError:  # closed: its thread ended, and what was posted is lost
            with worker.post_lock:
                worker.posted.clear()
                worker.wake_pending = False
            return False
        return True

    async def run_sync(self, func: Callable[..., Any], *args: Any) -> Any:
        """Run a plain function on a worker thread (instrumentation suppressed) and await it."""
        loop = asyncio.get_running_loop()
        worker: Worker | None = getattr(_on_loop_thread, "worker", None)
        context = worker.context.copy() if worker is not None else contextvars.Context()
        with self._lock:  # not to a pool that set_sync_workers() is replacing
            future = loop.run_in_executor(self._executor, context.run, func, *args)
        return await future

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._worker = None
        self._executor = None
        _on_loop_thread.worker = None


audit_loop = AuditLoop()

if hasattr(os, "register_at_fork"):  # pragma: no branch
    os.register_at_fork(after_in_child=audit_loop.reset_after_fork)


def set_worker_threads(count: int) -> None:
    """How many threads run plain ``def`` handler methods (4 unless set; at least 1).

    Each plain ``def`` call holds a thread while it runs, so as many slow calls at once
    as there are threads delay every other request's plain ``def`` calls (never the
    application, nor ``async def`` methods). Takes effect at once, for the next calls.
    """
    audit_loop.set_sync_workers(count)


__all__ = [
    "CALLS_ABANDONED",
    "LOOP_ERRORS",
    "LOOP_RESTARTS",
    "SYNC_WORKERS",
    "AuditLoop",
    "Served",
    "Worker",
    "audit_loop",
    "report_loop_error",
    "set_worker_threads",
]
