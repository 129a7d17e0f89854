"""A local JSON-lines file that keeps rows the database would not take.

When a batch still fails after the writer's retries, its rows are appended here and
the writer moves on; they are written to the database (idempotently) once it answers
again. Each process has its own file (shared by its writers for that store),
``<spool_dir>/<prefix>-<pid>.jsonl``, where
``<prefix>`` is the first 16 hex digits of the SHA-256 of the store's
:attr:`~instrumentation.storage.base.Store.spool_key` (``sqlite:<absolute path>`` or
``postgres:<the connection parameters that say which database>``); ``Spool.path`` names the
file. A writer starting up adopts the files of dead processes for the same store
(and those an adopting process left half-adopted, ``<prefix>-<pid>.claimed-<its
pid>``, when it died too), so rows spooled just before a crash are replayed by the
next run.

Lines are ``{"t": "s" | "e", "r": [row values]}``. Replay reads the file a bounded
chunk at a time (:meth:`Spool.next_chunk`), so memory does not grow with the length
of an outage, and remembers (in memory) how far the database has taken it, down to
the line, so a replay that fails half-way resumes there instead of reading the file
again from the start; after a crash, the adopting writer replays the file from its
start, and the rows already stored are skipped. The writers of one file in one process
replay it one chunk at a time (:meth:`Spool.replaying`), so no row is sent twice.

The position is only trusted for the file it was taken on: if the file was removed or
replaced by something else (a temporary-files cleaner, an operator), which is told by
its device and inode and by its size against what this process last wrote, replay
starts again from the start of the file that is there now, and the rows that were
waiting in the old one are logged and counted as lost. Writers whose ``spool_dir``
is spelled differently (relative or absolute, through a symbolic link) share what is
known of the file: it is keyed by its real path.

The rows waiting in the file (not yet replayed) take at most ``max_bytes`` bytes
(1 GiB by default; ``None``: no bound): a database down for days must not fill the
disk. What would take the file past it is not written; :meth:`Spool.append` returns
how many rows that was, for the writer to log and count as lost. The oldest rows are
kept: of one batch, its spans (in the order they ended, so a trace's root after the
spans below it) before its events; a trace whose root is cut off (and none of whose
other roots in the batch fits) is refused whole, as far as the batch holds it (its
spans would be stored heading no trace, unseen). Across batches (see
:class:`TraceHeads`), a root span that may head rows kept already (stored, or spooled
from an earlier batch) is kept, past ``max_bytes`` if need be, and the rows that come
later of a trace refused for its root are refused too. Files adopted from dead
processes are copied whole: they were on the disk already.

Rows replayed stay in the file (the position moves past them) until it is removed,
once all are replayed. A database that comes and goes, each replay stopping part-way
while newer rows are appended, would grow the file for as long as it never empties:
before an append would take the file past ``max_bytes``, it is compacted if the rows
replayed in it are an eighth of the rest at least (the rest copied to
``<prefix>-<pid>.compacting``, synced, renamed over the file), so the file stays
within ``max_bytes`` and an eighth of it, and compaction copies at most eight bytes
for each it removes. A process killed while compacting leaves either its file as it
was (the rows it had replayed are replayed again by the writer that adopts it, and
skipped as stored) or the compacted file; that writer removes the copy left behind.
A compaction that failed (a full disk: it is not tried without room for the copy) is
logged, and not tried again before another eighth of what waits is replayed.

A line cut short by a crash (in an adopted file, or one left under this process's own
pid by a process that crashed) is ended before anything is appended after it, skipped
on replay and counted once (``storage.spool_bad_lines``); a line that is JSON but not
a row (the wrong number of values, a nested value) is a rejected row (counted once by
the writer, as a row the database refused).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import math
import os
import shutil
import stat
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any, BinaryIO

from instrumentation import telemetry
from instrumentation._paths import make_writable_folder
from instrumentation.storage.base import Row
from instrumentation.storage.schema import EVENT_COLUMNS, SPAN_COLUMNS

logger = logging.getLogger("instrumentation.storage")

_SPOOLED = telemetry.counter("storage.spooled_rows")
_BAD_LINES = telemetry.counter("storage.spool_bad_lines")

#: A replay chunk stops at the first line that takes it past this many bytes.
CHUNK_BYTES = 4 * 1024 * 1024
#: How many bytes of rows not yet replayed a spool file holds at most, by default.
DEFAULT_MAX_BYTES = 1 << 30
#: The largest bound taken: a pebibyte (more is a slip, bits for bytes or a timestamp).
MAX_BYTES_BOUND = 1 << 50
_COPY_BLOCK = 1024 * 1024
#: The file is compacted once the rows replayed in it are an eighth of the rest (and it
#: would pass the bound): so it stays within ``max_bytes`` and an eighth of it.
_DEAD_SHARE = 8
#: The suffix of the copy a compaction makes before renaming it over the file.
_COMPACTING = ".compacting"
_N_SPAN_COLUMNS = len(SPAN_COLUMNS)
_N_EVENT_COLUMNS = len(EVENT_COLUMNS)
_SPAN_TRACE = SPAN_COLUMNS.index("trace_id")
_SPAN_IS_ROOT = SPAN_COLUMNS.index("is_root")
_SPAN_START = SPAN_COLUMNS.index("start_time")
_SPAN_END = SPAN_COLUMNS.index("end_time")
_EVENT_TRACE = EVENT_COLUMNS.index("trace_id")
_EVENT_TIME = EVENT_COLUMNS.index("time")
#: How much later than the latest row kept a root span may have started and still head
#: it: the times of a process's rows come from one clock, read at moments a row maker
#: may shift by up to 50 ms (see ``RowMaker.rows``).
_CLOCK_SLACK = 1.0
#: How many traces refused for their root :class:`TraceHeads` remembers, at least (and
#: twice as many at most).
_REFUSED_REMEMBERED = 10_000
_SCALARS = (str, int, float)


def default_spool_dir() -> Path:
    """A folder of this user's own in the temporary folder (``instrumentation-spool-<uid>``
    where there are uids): the spool holds prompts and replies, which another user must
    not read, and the files another user might put there must not be adopted as rows.
    One folder shared by all users, made by the first, also left the others nowhere to
    write."""
    getuid = getattr(os, "getuid", None)
    name = "instrumentation-spool" if getuid is None else f"instrumentation-spool-{getuid()}"
    return Path(tempfile.gettempdir()) / name


def _not_private(folder: Path) -> str | None:
    """Why the default spool folder is not this user's alone (None: it is). One made
    open to others (by an older version, or a loose umask) is closed first."""
    getuid = getattr(os, "getuid", None)
    if getuid is None:  # Windows: the temporary folder is the user's own already
        return None
    try:
        st = os.lstat(folder)
    except OSError as exc:
        return f"cannot be looked at ({exc})"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder (a link, say)"
    if st.st_uid != getuid():
        return f"belongs to another user (uid {st.st_uid})"
    if st.st_mode & 0o077:
        try:
            os.chmod(folder, 0o700)
        except OSError as exc:
            return f"is open to other users and could not be closed ({exc})"
    return None


def checked_directory(value: str | os.PathLike[str]) -> Path:
    """The spool folder ``value`` names, absolute, made if it is missing.

    Checked when the writer is made, not when a database outage first needs it: a
    file (``/etc/passwd``), a place no folder can be made (``/proc/x``), an empty path
    (the working directory) or one with a NUL character were taken, and found out
    only once rows had nowhere to go (a NUL even killed the writer thread). Refused
    with a ``TypeError`` (not a path) or ``ValueError`` saying what is wrong.
    """
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"spool_dir is a folder's path (str or pathlib.Path), got {value!r}")
    text = os.fspath(value)
    if not isinstance(text, str):
        raise TypeError(f"spool_dir is a folder's path as str, got {text!r}")
    use = f"give a folder this process can write, or None for {default_spool_dir()}"
    if not text.strip():
        raise ValueError(f"spool_dir is empty; {use}")
    path = Path(text).absolute()
    problem = make_writable_folder(path)
    if problem is not None:
        raise ValueError(f"spool_dir {text!r} {problem[1]}; {use}")
    return path


def _pid_alive_posix(pid: int) -> bool:
    """Whether process ``pid`` runs: its spool file is not an orphan to adopt. When
    that cannot be told, it is taken to run (its rows wait, they are not taken)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, as another user
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """Whether process ``pid`` has exited and waits for its parent to reap it (Linux:
    state ``Z`` or ``X`` in ``/proc/<pid>/stat``). ``os.kill(pid, 0)`` succeeds on
    such a process: the file of a worker killed by ``kill -9`` was not adopted for as
    long as its parent had not waited for it (a supervisor starting the replacement
    first, a container's pid 1 that reaps nothing). ``False`` where that cannot be
    read (no ``/proc``)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    # "pid (comm) state ...": comm may hold spaces and parentheses, the state follows
    # the last ')'. A process whose main thread ended (pthread_exit) while its other
    # threads run shows "Z" too: alive while more than one thread is counted.
    end = stat.rfind(b")")
    if end < 0:
        return False
    fields = stat[end + 2 :].split()
    if not fields or fields[0] not in (b"Z", b"X"):
        return False
    try:
        return int(fields[17]) <= 1  # num_threads
    except (IndexError, ValueError):
        return True


#: OpenProcess's right to read a process's exit code, and its error for no such process.
_PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
_ERROR_INVALID_PARAMETER = 87


def _pid_alive_windows(pid: int, winapi: Any = None) -> bool:
    """:func:`_pid_alive_posix` for Windows, where ``os.kill(pid, 0)`` is no such
    check: signal 0 is CTRL_C_EVENT there, sent to the process's console group."""
    api = winapi if winapi is not None else importlib.import_module("_winapi")
    try:
        handle = api.OpenProcess(_PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
    except OSError as exc:
        # No such process; access denied means it runs, as another user.
        return getattr(exc, "winerror", None) != _ERROR_INVALID_PARAMETER
    try:
        return bool(api.GetExitCodeProcess(handle) == api.STILL_ACTIVE)
    except OSError:
        return True
    finally:
        api.CloseHandle(handle)


_pid_alive = _pid_alive_windows if os.name == "nt" else _pid_alive_posix


def _lines_of(src: BinaryIO, copy_to: BinaryIO | None = None) -> int:
    """The lines of ``src`` from where it is, read a block at a time (a last line cut
    short by a crash counts too); copied to ``copy_to`` as read, that last line ended
    there, so that it cannot swallow the next one."""
    lines = 0
    last = b"\n"
    while block := src.read(_COPY_BLOCK):
        if copy_to is not None:
            copy_to.write(block)
        lines += block.count(b"\n")
        last = block[-1:]
    if last != b"\n":
        lines += 1
        if copy_to is not None:
            copy_to.write(b"\n")
    return lines


def _open_appending(path: Path, mode: int) -> BinaryIO:
    """``path`` open for reading and appending, made with ``mode`` (less the umask) if
    it is new."""
    flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, mode)
    try:
        return open(fd, "a+b")
    except BaseException:
        os.close(fd)
        raise


def _sync_directory(directory: Path) -> None:
    """Sync a rename in ``directory`` to disk (where a folder can be opened: not on
    Windows, whose renames need none of this)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _trace_of(is_span: bool, row: Row) -> str | None:
    """The trace id of a span or event row (``None``: none, or not a row of its table)."""
    if len(row) != (_N_SPAN_COLUMNS if is_span else _N_EVENT_COLUMNS):
        return None
    trace = row[_SPAN_TRACE if is_span else _EVENT_TRACE]
    return trace if isinstance(trace, str) else None


def _fitting(
    items: Sequence[tuple[bool, Row]], lines: list[bytes], room: int, heads: TraceHeads
) -> tuple[list[int], set[str]]:
    """Which of ``items`` (``(is_span, row)``, made into ``lines``) to write in ``room``
    bytes, by index, and the traces refused whole.

    All of them if they fit; else the oldest: spans (in the order they ended, so a
    trace's root after the spans below it) before events, up to the first line that
    does not fit. A trace whose root is cut off that way is refused whole, as far as
    this batch holds it (its spans and events): kept, its spans would be stored
    heading no trace (a trace is listed by its root), unseen, and the room they took
    goes to the rows after the cut. Unless another root of that trace (spans under
    one remote parent, a parent this handler did not see open) fits: that one lists
    the trace, and the rows that fit are kept. Or unless rows of that trace may have
    been kept already, from an earlier batch (see :class:`TraceHeads`): then its root
    is kept, past the bound if need be.
    """
    cut, left = 0, room
    while cut < len(lines) and len(lines[cut]) <= left:
        left -= len(lines[cut])
        cut += 1
    if cut == len(lines):
        return list(range(cut)), set()

    def roots(part: Iterable[tuple[bool, Row]]) -> set[str]:
        return {
            trace
            for is_span, row in part
            if _is_root(is_span, row) and (trace := _trace_of(True, row)) is not None
        }

    headless = roots(items[cut:]) - roots(items[:cut])
    if not headless:
        return list(range(cut)), set()
    # Roots of those traces that may head rows kept from an earlier batch.
    owed = {
        i
        for i in range(cut, len(items))
        if _is_root(*items[i])
        and _trace_of(True, items[i][1]) in headless
        and heads.may_head_kept_rows(items[i][1])
    }
    refused = headless - {_trace_of(True, items[i][1]) for i in owed}
    kept: list[int] = []
    full = False
    for i, ((is_span, row), line) in enumerate(zip(items, lines, strict=True)):
        if i in owed:
            kept.append(i)
            room -= len(line)
        elif full or _trace_of(is_span, row) in refused:
            continue
        elif len(line) > room:
            full = True
        else:
            kept.append(i)
            room -= len(line)
    return kept, refused


def _is_root(is_span: bool, row: Row) -> bool:
    return is_span and len(row) == _N_SPAN_COLUMNS and bool(row[_SPAN_IS_ROOT])


class TraceHeads:
    """What keeps the spool's bound from storing a trace without its root span when
    the trace is split across batches (one writer's; used on its thread).

    Within a batch, :func:`_fitting` refuses a trace whose root span does not fit.
    Across batches that left spans heading no trace, unlisted: the spans below a root
    kept from an earlier batch (spooled, or stored before the database went away),
    its root refused by the full spool in a later one; or a trace refused for its
    root, and then a span of it that ended later (a task the root started and did not
    wait for) kept in the room a later batch found.

    So the rows kept (stored in the database or spooled), but root spans, are
    followed by their latest time (``kept_until``): a root span that started after
    it (and a second more, see :data:`_CLOCK_SLACK`) heads none of them, every row of
    its trace being later than its start; one that started before may head some, and
    is kept even past the bound. That takes the file past ``max_bytes`` by the roots
    of the traces that were running when it filled up, at most: once it is full,
    nothing else is kept, and ``kept_until`` stays. The traces refused for their root
    are remembered (the last :data:`_REFUSED_REMEMBERED` at least), and their later
    rows refused, wherever they would go, until a root span of the trace comes again
    (:meth:`without_refused`).
    """

    def __init__(self) -> None:
        #: The latest time (a span's end, an event's time) of a row kept, no later
        #: than when it was kept; -inf before any.
        self.kept_until = -math.inf
        self._refused: set[str] = set()
        self._refused_before: set[str] = set()

    def kept(self, spans: Sequence[Row], events: Sequence[Row]) -> None:
        """Rows the database or the spool file took. Root spans are left out: a root
        kept heads its trace, and counted, each root kept past the bound would have
        the roots that started before its end kept too, and so on for ever."""
        below = [r for r in spans if not _is_root(True, r)]
        latest = max(_latest(below, _SPAN_END), _latest(events, _EVENT_TIME))
        # An event dated by hand in the future must not have every root kept for ever.
        self.kept_until = max(self.kept_until, min(latest, time.time()))

    def may_head_kept_rows(self, root: Row) -> bool:
        """Whether the root span ``root`` may head rows kept already: it started before
        the latest of them (or its start is not a time: it is kept)."""
        start = root[_SPAN_START]
        if not isinstance(start, (int, float)):
            return True
        return bool(start <= self.kept_until + _CLOCK_SLACK)

    def refuse(self, traces: Iterable[str]) -> None:
        """Remember ``traces``, refused whole for their root: their later rows are refused."""
        for trace in traces:
            self._refused.add(trace)
            if len(self._refused) >= _REFUSED_REMEMBERED:
                self._refused_before, self._refused = self._refused, set()

    def without_refused(
        self, spans: list[Row], events: list[Row]
    ) -> tuple[list[Row], list[Row], int]:
        """``spans`` and ``events`` without the rows of the traces refused for their
        root, and how many rows that leaves out.

        A trace with a root span in the batch is refused no more: that root lists it,
        and heads what comes of it (another request under the same remote parent's
        trace, a span whose parent had ended). Refused for good, every later request
        of a distributed trace was lost, hours after the database came back.
        """
        if not self._refused and not self._refused_before:
            return spans, events, 0
        for row in spans:
            if _is_root(True, row) and (trace := _trace_of(True, row)) is not None:
                self._refused.discard(trace)
                self._refused_before.discard(trace)

        def known(trace: str | None) -> bool:
            return trace is not None and (trace in self._refused or trace in self._refused_before)

        kept_spans = [r for r in spans if not known(_trace_of(True, r))]
        kept_events = [r for r in events if not known(_trace_of(False, r))]
        left_out = len(spans) + len(events) - len(kept_spans) - len(kept_events)
        return kept_spans, kept_events, left_out


def _latest(rows: Sequence[Row], at: int) -> float:
    """The latest time at position ``at`` of ``rows``; -inf for none."""
    try:
        return float(max(map(itemgetter(at), rows), default=-math.inf))
    except (TypeError, ValueError, IndexError):
        # Not rows of this release's tables (a rows_of given to BatchWriter): what of
        # them is a time.
        times = [r[at] for r in rows if len(r) > at and isinstance(r[at], (int, float))]
        return float(max(times, default=-math.inf))


def _line(kind: str, row: Row) -> bytes:
    text = json.dumps({"t": kind, "r": list(row)}, ensure_ascii=False)
    try:
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:  # a lone surrogate: escaped, the database judges the row
        return json.dumps({"t": kind, "r": list(row)}).encode("ascii") + b"\n"


def malformed(is_span: bool, row: Sequence[Any]) -> str | None:
    """Why ``row`` (read back from a spool file) cannot be a row of its table, or None.

    A row is as many values as the table has columns, each ``None``, a string or a
    number: what the writer spools. Anything else (a file written by another release,
    a line edited by hand) no database would take, whatever its state.
    """
    wanted = _N_SPAN_COLUMNS if is_span else _N_EVENT_COLUMNS
    if len(row) != wanted:
        return f"{len(row)} values for the {wanted} columns of {'spans' if is_span else 'events'}"
    for i, value in enumerate(row):
        if value is not None and (type(value) is bool or not isinstance(value, _SCALARS)):
            return f"value {i} is a {type(value).__name__}"
    return None


@dataclass
class SpoolChunk:
    """Consecutive lines of the spool file, and where they are in it."""

    spans: list[Row] = field(default_factory=list)
    events: list[Row] = field(default_factory=list)
    #: The rows in file order: ``(is_span, row, offset just after its line, lines of the
    #: chunk up to and including its line)``; what :meth:`Spool.mark_replayed` needs to
    #: mark part of the chunk replayed.
    rows: list[tuple[bool, Row, int, int]] = field(default_factory=list)
    #: The byte offsets of the chunk's first line and just after its last.
    start: int = 0
    end: int = 0
    #: Lines read, bad and malformed ones included.
    lines: int = 0
    #: Lines that are JSON but not a row (see :func:`malformed`), first read now (a
    #: chunk read again after a failure does not report them again), with an example.
    malformed: int = 0
    malformed_example: str = ""
    #: Which incarnation of the file the offsets are about (see ``_FileState``).
    generation: int = 0
    #: The bytes compaction had cut from the front of the file when the chunk was read
    #: (``_FileState.cut``): the offsets are moved back by what it cut since.
    cut: int = 0


class _FileState:
    """What this process knows of one spool file, shared by every :class:`Spool` on it.

    Two writers for one store in one process (two handlers on one database) share
    the file; ``lock`` keeps an append from interleaving with a read, and the file
    from being removed while rows not yet replayed are in it; ``replay_lock`` lets one
    writer at a time replay a chunk. ``generation`` counts the times the position
    was reset, so that a chunk read before cannot move the position in the next file;
    ``cut`` counts the bytes compaction removed from the front of the file (rows
    replayed already), so that a chunk read before it still marks its rows replayed;
    after a compaction failed, ``compact_after`` is how far the rows replayed are to
    reach before it is tried again.
    ``ident`` and ``size`` are the device and inode of the file and its size as this
    process last left it (``None``: no file known); ``judged_bytes`` is how far bad and
    malformed lines have been counted already.
    """

    __slots__ = (
        "__weakref__",
        "compact_after",
        "cut",
        "generation",
        "ident",
        "judged_bytes",
        "lock",
        "replay_lock",
        "replayed_bytes",
        "rows_pending",
        "size",
    )

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.replay_lock = threading.Lock()
        self.rows_pending = 0
        self.replayed_bytes = 0
        self.generation = 0
        self.cut = 0
        self.compact_after = 0
        self.ident: tuple[int, int] | None = None
        self.size = 0
        self.judged_bytes = 0


_states_lock = threading.Lock()
# Weak: what is known of a file lives as long as a Spool of it (a process that opens
# a store per job must not keep one per job). Made again, it is read afresh, as an
# adopted file is: rows already stored are skipped.
_states: weakref.WeakValueDictionary[str, _FileState] = weakref.WeakValueDictionary()


def _state_of(path: Path) -> _FileState:
    # By real path: "spool" and "/app/spool", or a symbolic link to it, are one file.
    key = os.path.realpath(path)
    with _states_lock:
        state = _states.get(key)
        if state is None:
            state = _states[key] = _FileState()
        return state


def _after_fork_in_child() -> None:
    # A lock held by another thread at fork() stays held in the child; and the child's
    # files are named by its own pid, so nothing known here is about them.
    global _states_lock
    _states_lock = threading.Lock()
    _states.clear()


if hasattr(os, "register_at_fork"):  # pragma: no branch
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Spool:
    """The spool file of one store in this process.

    Each writer has its own ``Spool``; those of one store in one process share the
    file and what is known of it (thread-safe). ``on_lost(n)`` is called (on the
    calling thread) when ``n`` rows waiting in the file were found gone: the file was
    removed or replaced by something else. ``max_bytes`` bounds the rows waiting in
    the file (see the module's docstring); each ``Spool`` applies its own.
    """

    def __init__(
        self,
        key: str,
        directory: str | os.PathLike[str] | None = None,
        *,
        on_lost: Callable[[int], None] | None = None,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
    ) -> None:
        # Absolute now: a later chdir() must not move the file.
        self.directory = (
            Path(directory).absolute() if directory is not None else default_spool_dir()
        )
        #: The default folder is checked to be this user's alone before each use.
        self._shared_tmp = directory is None
        # The default folder and its files are this user's only (they hold prompts and
        # replies). A spool_dir given is the user's to share or not (a group's folder,
        # whose processes adopt each other's files): made with the umask's modes.
        self._folder_mode = 0o700 if self._shared_tmp else 0o777
        self._file_mode = 0o600 if self._shared_tmp else 0o666
        self.prefix = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
        self.on_lost = on_lost
        self.max_bytes = max_bytes
        #: What keeps the bound from leaving a trace without its root across batches.
        self.heads = TraceHeads()
        self._pid = -1
        self._state_cache: _FileState | None = None

    @property
    def path(self) -> Path:
        return self.directory / f"{self.prefix}-{os.getpid()}.jsonl"

    def _make_folder(self) -> None:
        """Make the folder (the default one for this user only), and refuse the default
        one, in the shared temporary folder, unless it is this user's alone (see
        :func:`default_spool_dir`): a ``PermissionError`` saying what to do."""
        self.directory.mkdir(mode=self._folder_mode, parents=True, exist_ok=True)
        if self._shared_tmp:
            problem = _not_private(self.directory)
            if problem is not None:
                raise PermissionError(
                    f"the spool folder {self.directory} {problem}: rows are not spooled "
                    "there; pass spool_dir= a folder of your own"
                )

    @property
    def _state(self) -> _FileState:
        pid = os.getpid()
        state = self._state_cache
        if state is None or pid != self._pid:  # first use, or a forked child
            state = self._state_cache = _state_of(self.path)
            self._pid = pid
        return state

    @property
    def rows_pending(self) -> int:
        """Lines in the file not yet replayed into the database."""
        return self._state.rows_pending

    @property
    def replayed_bytes(self) -> int:
        """How far into the file (in bytes) the rows are in the database already."""
        return self._state.replayed_bytes

    @property
    def pending(self) -> bool:
        return self._state.rows_pending > 0

    @contextlib.contextmanager
    def replaying(self, give_up: threading.Event | None = None) -> Iterator[bool]:
        """Hold the file's replay turn: one writer of this process at a time reads a
        chunk, writes it and marks it replayed, so no chunk is sent twice. Yields
        ``False`` (without the turn) if ``give_up`` is set while waiting."""
        lock = self._state.replay_lock
        while not lock.acquire(timeout=0.05):
            if give_up is not None and give_up.is_set():
                yield False
                return
        try:
            yield True
        finally:
            lock.release()

    def append(self, spans: Sequence[Row], events: Sequence[Row]) -> int:
        """Add rows to the file, flushed to the OS before returning (see
        :meth:`_write_at_end`); how many were not added because the rows waiting in
        the file would have taken more than ``max_bytes`` (see :func:`_fitting`)."""
        items = [(True, r) for r in spans] + [(False, r) for r in events]
        lines = [_line("s" if is_span else "e", row) for is_span, row in items]
        state = self._state
        limit = self.max_bytes
        chosen: Sequence[int] = range(len(items))
        refused: set[str] = set()

        def write(f: BinaryIO) -> int:
            nonlocal chosen, refused
            kept = lines
            if limit is not None:
                # f is at the file's end: its size; replayed_bytes is up to date
                # (_check_file ran), so this is what waits.
                room = limit - (f.tell() - state.replayed_bytes)
                chosen, refused = _fitting(items, lines, room, self.heads)
                kept = [lines[i] for i in chosen]
            if kept:
                f.write(b"".join(kept))
            return len(kept)

        with state.lock:
            written, lost = self._write_at_end(state, write, sum(map(len, lines)))
        if limit is not None:
            self.heads.refuse(refused)
            self.heads.kept(
                [items[i][1] for i in chosen if items[i][0]],
                [items[i][1] for i in chosen if not items[i][0]],
            )
        _SPOOLED.add(written)
        self._report_lost(lost)
        return len(lines) - written

    def _write_at_end(
        self, state: _FileState, write: Callable[[BinaryIO], int], adding: int
    ) -> tuple[int, int]:
        """Append to our file what ``write(f)`` writes (``state.lock`` held): the one
        way anything is added to it. ``write`` returns how many lines it wrote; they
        are pending replay once flushed and synced to disk. Returns those lines and the
        rows found lost on the way (see :meth:`_check_file`). ``adding`` is about how
        many bytes ``write`` may add: the file is compacted first if they would take
        it past ``max_bytes`` (see :meth:`_compaction_due`).

        If the write fails part-way (a full disk), the file is cut back to where it
        was, so a half-written line cannot swallow the next one; if even that fails,
        the file is counted again from its start the next time it is used.
        """
        self._make_folder()
        f = _open_appending(self.path, self._file_mode)
        try:
            lost = self._check_file(state, f)
            start = f.seek(0, os.SEEK_END)
            if self._compaction_due(state, start, adding):
                f = self._compact(state, f)
                start = f.seek(0, os.SEEK_END)
            try:
                lines = write(f)
                f.flush()
                os.fsync(f.fileno())
            except BaseException:
                try:
                    f.truncate(start)
                except OSError:
                    state.ident = None
                raise
            finally:
                with contextlib.suppress(OSError):
                    state.size = os.fstat(f.fileno()).st_size
        finally:
            f.close()
        state.rows_pending += lines
        return lines, lost

    def _compaction_due(self, state: _FileState, size: int, adding: int) -> bool:
        """Whether the file (``size`` bytes, the first ``state.replayed_bytes`` of them
        replayed already) is to be compacted before ``adding`` bytes more are written.

        With a bound: when the file would pass ``max_bytes`` and the replayed part is
        an eighth of the rest at least. So the file stays within ``max_bytes`` and an
        eighth of it (what waits stays within ``max_bytes``; beyond, what is dead is
        less than an eighth of it), and compaction copies at most eight bytes for each
        byte it removes (each of which was replayed into the database once): a flapping
        database with the spool full does not copy the whole file for each row
        replayed. Without a bound: when half the file, and ``CHUNK_BYTES`` at least,
        is dead. After a compaction failed (a full disk), not before another eighth of
        what waits was replayed (``state.compact_after``): it was tried again before
        each append, each copying what the disk took, filling it to the last byte,
        and logging it.
        """
        dead = state.replayed_bytes
        if dead <= 0 or dead < state.compact_after:
            return False
        live = size - dead
        if self.max_bytes is None:
            return dead >= live and dead >= CHUNK_BYTES
        return size + adding > self.max_bytes and dead * _DEAD_SHARE >= live

    @property
    def _compacting_path(self) -> Path:
        return self.directory / f"{self.prefix}-{os.getpid()}{_COMPACTING}"

    def _compact(self, state: _FileState, f: BinaryIO) -> BinaryIO:
        """Cut the rows replayed already from the front of our file (open as ``f``,
        ``state.lock`` held); the file, open for appending (``f`` itself if that failed).

        The rows not replayed yet are copied to ``<prefix>-<pid>.compacting``, synced to
        disk, and that file renamed over ours (atomic). A process killed meanwhile
        leaves the file whole (and the copy, removed by the writer that adopts the file,
        or by the next one with this pid): the rows it replayed already are replayed
        again, and skipped as stored, as after any crash; killed after the rename, it
        leaves the rows not replayed, once. Nothing but the owner writes a live
        process's file, and this lock is held: no row can be appended to the old file
        after the copy was taken. A chunk being replayed meanwhile (by another writer of
        this process) still marks its rows replayed (see ``_FileState.cut``).
        """
        dead = state.replayed_bytes
        live = os.fstat(f.fileno()).st_size - dead
        tmp = self._compacting_path
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:
            free = live
        if free < live:
            logger.warning(
                "instrumentation.storage could not compact the spool file %s: %d bytes free "
                "for the copy of its %d bytes of rows waiting (its %d bytes of rows replayed "
                "already stay in it)",
                self.path,
                free,
                live,
                dead,
            )
            state.compact_after = dead + max(1, live // _DEAD_SHARE)
            return f
        try:
            # Made afresh (a copy left by a process that had our pid is removed): never
            # through a link someone put in a shared folder, whose target "wb" would cut.
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
            fd = os.open(tmp, flags, self._file_mode)  # as the file it replaces
            with open(fd, "wb") as out:
                f.seek(dead)
                shutil.copyfileobj(f, out, _COPY_BLOCK)
                out.flush()
                os.fsync(out.fileno())
            f.close()  # Windows renames nothing over a file that is open
            os.replace(tmp, self.path)
        except OSError:
            logger.warning(
                "instrumentation.storage could not compact the spool file %s (its %d bytes "
                "of rows replayed already stay in it)",
                self.path,
                dead,
                exc_info=True,
            )
            state.compact_after = dead + max(1, live // _DEAD_SHARE)
            with contextlib.suppress(OSError):
                tmp.unlink()
            if f.closed:  # the rename failed: our file is as it was
                f = _open_appending(self.path, self._file_mode)
            return f
        _sync_directory(self.directory)
        state.cut += dead
        state.replayed_bytes = 0
        state.compact_after = 0
        state.judged_bytes = max(0, state.judged_bytes - dead)
        state.ident = None  # until it is open again: then it is the compacted file
        compacted = _open_appending(self.path, self._file_mode)
        st = os.fstat(compacted.fileno())
        state.ident = (st.st_dev, st.st_ino)
        state.size = st.st_size
        return compacted

    def _check_file(self, state: _FileState, f: BinaryIO) -> int:
        """Make ``state`` about the file open as ``f`` (``state.lock`` held); rows lost.

        The replay position is about the file this process last wrote: if the file
        there now is another one (removed and made again), or not the size this process
        left it, it is read again from its start, and the rows that were waiting and
        are not in it any more are lost.
        """
        st = os.fstat(f.fileno())
        ident = (st.st_dev, st.st_ino)
        if state.ident == ident and st.st_size == state.size:
            return 0
        known = state.ident is not None
        size = st.st_size
        if not known and size and f.writable():
            # Left by a process that crashed (one that had our pid): a last line cut
            # short must not swallow the next row appended.
            f.seek(size - 1)
            if f.read(1) != b"\n":
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
                f.flush()
                size += 1
        f.seek(0)
        lines = _lines_of(f) if size else 0
        lost = max(0, state.rows_pending - lines) if known else 0
        if known:
            logger.log(
                logging.WARNING if lost else logging.INFO,
                "instrumentation.storage: the spool file %s was removed, replaced or "
                "changed by something other than this process; %d rows that were waiting "
                "in it are lost; replaying the %d lines there now from the start",
                self.path,
                lost,
                lines,
            )
        self._reset(state)
        state.rows_pending = lines
        state.ident = ident
        state.size = size
        return lost

    def _report_lost(self, lost: int) -> None:
        if lost and self.on_lost is not None:
            self.on_lost(lost)

    def next_chunk(self, max_rows: int, max_bytes: int = CHUNK_BYTES) -> SpoolChunk | None:
        """The next lines not replayed yet: at most ``max_rows`` lines and about
        ``max_bytes`` bytes. ``None`` once every row is replayed: the file is then
        removed.

        Reading does not move the replay position: call :meth:`mark_replayed` once the
        chunk's rows are in the database. Hold :meth:`replaying` from this call to that
        one, or another writer may send the same rows.
        """
        state = self._state
        lost = 0
        try:
            with state.lock:
                try:
                    f = open(self.path, "rb")  # noqa: SIM115 - closed below
                except FileNotFoundError:
                    if state.rows_pending:
                        lost = state.rows_pending
                        logger.warning(
                            "instrumentation.storage: the spool file %s was removed by "
                            "something other than this process; %d rows that were waiting "
                            "in it are lost",
                            self.path,
                            lost,
                        )
                    self._reset(state)
                    return None
                with f:
                    lost = self._check_file(state, f)
                    chunk = self._read(state, f, max_rows, max_bytes)
                if chunk.lines:
                    return chunk
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                self._reset(state)
                return None
        finally:
            self._report_lost(lost)

    @staticmethod
    def _read(state: _FileState, f: BinaryIO, max_rows: int, max_bytes: int) -> SpoolChunk:
        chunk = SpoolChunk(
            start=state.replayed_bytes,
            end=state.replayed_bytes,
            generation=state.generation,
            cut=state.cut,
        )
        f.seek(state.replayed_bytes)
        offset = state.replayed_bytes
        judged = state.judged_bytes
        while chunk.lines < max_rows and offset - chunk.start < max_bytes:
            line = f.readline()
            if not line:
                break
            offset += len(line)
            chunk.lines += 1
            first_read = offset > judged
            try:
                item = json.loads(line)
                is_span = item["t"] == "s"
                row = tuple(item["r"])
            except (ValueError, KeyError, TypeError):
                if first_read:
                    _BAD_LINES.inc()
                continue
            why = malformed(is_span, row)
            if why is not None:
                if first_read:
                    chunk.malformed += 1
                    if not chunk.malformed_example:
                        chunk.malformed_example = f"{why}: {line[:200]!r}"
                continue
            (chunk.spans if is_span else chunk.events).append(row)
            chunk.rows.append((is_span, row, offset, chunk.lines))
        chunk.end = offset
        state.judged_bytes = max(judged, offset)
        return chunk

    def mark_replayed(self, chunk: SpoolChunk, rows_done: int | None = None) -> None:
        """The rows of ``chunk`` are in the database (or rejected): the next chunk
        starts after them. With ``rows_done``, only its first ``rows_done`` rows (in
        file order) are, and the next chunk starts at the one after.

        A chunk another writer has replayed meanwhile (the position moved, or the
        file was replaced) changes nothing: its rows are stored, and no later row is
        skipped. The file compacted meanwhile (by another writer's append), the
        chunk's offsets are moved back by what was cut.
        """
        state = self._state
        with state.lock:
            shift = state.cut - chunk.cut
            if chunk.generation != state.generation or chunk.start - shift != state.replayed_bytes:
                return
            if rows_done is None or rows_done >= len(chunk.rows):
                end, lines = chunk.end, chunk.lines
            elif rows_done <= 0:
                return
            else:
                _, _, end, lines = chunk.rows[rows_done - 1]
            state.replayed_bytes = end - shift
            state.rows_pending = max(0, state.rows_pending - lines)

    @staticmethod
    def _reset(state: _FileState) -> None:
        state.rows_pending = 0
        state.replayed_bytes = 0
        state.judged_bytes = 0
        state.generation += 1
        state.compact_after = 0
        state.ident = None
        state.size = 0

    def adopt_orphans(self) -> int:
        """Take over the spool files left by dead processes for this store; rows adopted.

        A file an adopting process had claimed (renamed ``.claimed-<its pid>``) when it
        died is adopted too. The copy a process killed while compacting its file left
        (``<prefix>-<pid>.compacting``) is removed: its file is whole.
        """
        adopted = 0
        if self._shared_tmp and self.directory.exists():
            problem = _not_private(self.directory)
            if problem is not None:
                logger.warning(
                    "instrumentation.storage does not adopt the spool files in %s: it %s; "
                    "pass spool_dir= a folder of your own",
                    self.directory,
                    problem,
                )
                return 0
        try:
            candidates = list(self.directory.glob(f"{self.prefix}-*.jsonl"))
            candidates += self.directory.glob(f"{self.prefix}-*.claimed-*")
            copies = list(self.directory.glob(f"{self.prefix}-*{_COMPACTING}"))
        except OSError:
            return 0
        state = self._state
        me = os.getpid()
        for copy in copies:
            pid_text = copy.stem.rpartition("-")[2]
            if pid_text.isdigit() and int(pid_text) != me and not _pid_alive(int(pid_text)):
                with contextlib.suppress(OSError):
                    copy.unlink()
        for candidate in candidates:
            if candidate.suffix == ".jsonl":
                pid_text = candidate.stem.rpartition("-")[2]
            else:
                pid_text = candidate.suffix.rpartition("-")[2]
            if not pid_text.isdigit() or int(pid_text) == me or _pid_alive(int(pid_text)):
                continue
            claimed = candidate.with_suffix(f".claimed-{me}")
            try:
                candidate.rename(claimed)  # atomic: only one adopter wins
            except OSError:
                continue
            try:
                adopted += self._append_file(claimed)
                claimed.unlink()
            except OSError:
                logger.exception("instrumentation.storage could not adopt spool %s", candidate)
        # Our own file may also exist from an earlier writer in this very process, or
        # from a dead process that had our pid (and so may its copy: ours are made and
        # renamed while this lock is held).
        lost = 0
        with state.lock:
            with contextlib.suppress(OSError):
                self._compacting_path.unlink()
            try:
                with open(self.path, "r+b") as f:
                    lost = self._check_file(state, f)
            except FileNotFoundError:
                pass
        self._report_lost(lost)
        return adopted

    def _append_file(self, source: Path) -> int:
        """Copy ``source`` to the end of our file, a block at a time; lines copied."""
        state = self._state
        with open(source, "rb") as src, state.lock:
            size = os.fstat(src.fileno()).st_size
            copied, lost = self._write_at_end(state, lambda dst: _lines_of(src, dst), size)
        self._report_lost(lost)
        return copied


__all__: list[str] = []
