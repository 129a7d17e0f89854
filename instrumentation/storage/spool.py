"""A local JSON-lines file that keeps rows the database would not take.

When a batch still fails after the writer's retries, its rows are appended here and
the writer moves on; they are written to the database (idempotently) once it answers
again. Each process has its own file (shared by its writers for that store),
``<spool_dir>/<prefix>-<pid>.jsonl``, where
``<prefix>`` is the first 16 hex digits of the SHA-256 of the store's
:attr:`~instrumentation.storage.base.Store.spool_key` (``sqlite:<absolute path>`` or
``postgres:<connection parameters without the password>``); ``Spool.path`` names the
file. A writer starting up adopts the files of dead processes for the same store, so
rows spooled just before a crash are replayed by the next run.

Lines are ``{"t": "s" | "e", "r": [row values]}``. Replay reads the file a bounded
chunk at a time (:meth:`Spool.next_chunk`), so memory does not grow with the length
of an outage, and remembers (in memory) how far the database has taken it, so a replay
that fails half-way resumes there instead of reading the file again from the start;
after a crash, the adopting writer replays the file from its start, and the rows
already stored are skipped. A line cut short by a crash is skipped on replay (and
counted: ``storage.spool_bad_lines``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from instrumentation import telemetry
from instrumentation.storage.base import Row

logger = logging.getLogger("instrumentation.storage")

_SPOOLED = telemetry.counter("storage.spooled_rows")
_BAD_LINES = telemetry.counter("storage.spool_bad_lines")

#: A replay chunk stops at the first line that takes it past this many bytes.
CHUNK_BYTES = 4 * 1024 * 1024
_COPY_BLOCK = 1024 * 1024


def default_spool_dir() -> Path:
    return Path(tempfile.gettempdir()) / "instrumentation-spool"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _count_lines(path: Path, start: int = 0) -> int:
    """Lines in ``path`` after byte ``start`` (a last line without its newline counts)."""
    lines = 0
    last = b"\n"
    with open(path, "rb") as f:
        f.seek(start)
        while block := f.read(_COPY_BLOCK):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


def _line(kind: str, row: Row) -> bytes:
    text = json.dumps({"t": kind, "r": list(row)}, ensure_ascii=False)
    try:
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:  # a lone surrogate: escaped, the database judges the row
        return json.dumps({"t": kind, "r": list(row)}).encode("ascii") + b"\n"


@dataclass
class SpoolChunk:
    """Consecutive rows of the spool file, and where they are in it."""

    spans: list[Row] = field(default_factory=list)
    events: list[Row] = field(default_factory=list)
    #: The byte offsets of the chunk's first line and just after its last.
    start: int = 0
    end: int = 0
    #: Lines read, bad ones included.
    lines: int = 0
    #: Which incarnation of the file the offsets are about (see ``_FileState``).
    generation: int = 0


class _FileState:
    """What this process knows of one spool file, shared by every :class:`Spool` on it.

    Two writers for one store in one process (two handlers on one database) share
    the file; its lock keeps an append from interleaving with a read, and the file
    from being removed while rows not yet replayed are in it. ``generation`` counts
    removals, so that a chunk read before one cannot move the position in the next file.
    """

    __slots__ = ("generation", "lock", "replayed_bytes", "rows_pending")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rows_pending = 0
        self.replayed_bytes = 0
        self.generation = 0


_states_lock = threading.Lock()
_states: dict[str, _FileState] = {}


def _state_of(path: Path) -> _FileState:
    with _states_lock:
        state = _states.get(str(path))
        if state is None:
            state = _states[str(path)] = _FileState()
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
    file and what is known of it (thread-safe).
    """

    def __init__(self, key: str, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_spool_dir()
        self.prefix = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
        self._pid = -1
        self._state_cache: _FileState | None = None

    @property
    def path(self) -> Path:
        return self.directory / f"{self.prefix}-{os.getpid()}.jsonl"

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

    def append(self, spans: Sequence[Row], events: Sequence[Row]) -> None:
        """Add rows to the file, flushed to the OS before returning.

        If the write fails part-way (a full disk), the file is cut back to where it
        was, so a half-written line cannot swallow the next one.
        """
        items = [("s", r) for r in spans] + [("e", r) for r in events]
        data = b"".join(_line(kind, row) for kind, row in items)
        state = self._state
        with state.lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as f:
                start = f.tell()
                try:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                except BaseException:
                    with contextlib.suppress(OSError):
                        f.truncate(start)
                    raise
            state.rows_pending += len(items)
        _SPOOLED.add(len(items))

    def next_chunk(self, max_rows: int, max_bytes: int = CHUNK_BYTES) -> SpoolChunk | None:
        """The next rows not replayed yet: at most ``max_rows`` lines and about
        ``max_bytes`` bytes. ``None`` once every row is replayed: the file is then
        removed.

        Reading does not move the replay position: call :meth:`mark_replayed` once the
        chunk's rows are in the database.
        """
        state = self._state
        with state.lock:
            try:
                f = open(self.path, "rb")  # noqa: SIM115 - closed below
            except FileNotFoundError:
                self._reset(state)
                return None
            with f:
                chunk = SpoolChunk(
                    start=state.replayed_bytes,
                    end=state.replayed_bytes,
                    generation=state.generation,
                )
                f.seek(state.replayed_bytes)
                size = 0
                while chunk.lines < max_rows and size < max_bytes:
                    line = f.readline()
                    if not line:
                        break
                    size += len(line)
                    chunk.lines += 1
                    try:
                        item = json.loads(line)
                        rows = chunk.spans if item["t"] == "s" else chunk.events
                        rows.append(tuple(item["r"]))
                    except (ValueError, KeyError, TypeError):
                        _BAD_LINES.inc()
                chunk.end += size
            if chunk.lines:
                return chunk
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._reset(state)
            return None

    def mark_replayed(self, chunk: SpoolChunk) -> None:
        """The rows of ``chunk`` are in the database: the next chunk starts after them.

        A chunk another writer has replayed meanwhile (the position moved, or the
        file was replaced) changes nothing: its rows are stored, and no later row is
        skipped.
        """
        state = self._state
        with state.lock:
            if chunk.generation == state.generation and chunk.start == state.replayed_bytes:
                state.replayed_bytes = chunk.end
                state.rows_pending = max(0, state.rows_pending - chunk.lines)

    @staticmethod
    def _reset(state: _FileState) -> None:
        state.rows_pending = 0
        state.replayed_bytes = 0
        state.generation += 1

    def forget(self) -> None:
        """After ``os.fork``, in the child: the file (named by the parent's pid) is not ours."""
        self._state_cache = None

    def adopt_orphans(self) -> int:
        """Take over the spool files left by dead processes for this store; rows adopted."""
        adopted = 0
        try:
            candidates = list(self.directory.glob(f"{self.prefix}-*.jsonl"))
        except OSError:
            return 0
        state = self._state
        for candidate in candidates:
            pid_text = candidate.stem.rpartition("-")[2]
            if not pid_text.isdigit() or int(pid_text) == os.getpid():
                continue
            if _pid_alive(int(pid_text)):
                continue
            claimed = candidate.with_suffix(f".claimed-{os.getpid()}")
            try:
                candidate.rename(claimed)  # atomic: only one adopter wins
            except OSError:
                continue
            try:
                with state.lock:
                    lines = self._append_file(claimed)
                    state.rows_pending += lines
                adopted += lines
                claimed.unlink()
            except OSError:
                logger.exception("instrumentation.storage could not adopt spool %s", candidate)
        # Our own file may also exist from an earlier writer in this very process.
        with state.lock:
            if not state.rows_pending and self.path.exists():
                state.rows_pending = _count_lines(self.path, state.replayed_bytes)
        return adopted

    def _append_file(self, source: Path) -> int:
        """Copy ``source`` to the end of our file, a block at a time; lines copied."""
        self.directory.mkdir(parents=True, exist_ok=True)
        lines = 0
        last = b"\n"
        with open(source, "rb") as src, open(self.path, "ab") as dst:
            while block := src.read(_COPY_BLOCK):
                dst.write(block)
                lines += block.count(b"\n")
                last = block[-1:]
            if last != b"\n":  # a line cut short by the crash: keep it on its own line
                dst.write(b"\n")
                lines += 1
            dst.flush()
            os.fsync(dst.fileno())
        return lines


__all__ = ["CHUNK_BYTES", "Spool", "SpoolChunk", "default_spool_dir"]
