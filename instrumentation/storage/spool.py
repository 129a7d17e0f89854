"""A local JSON-lines file that keeps rows the database would not take.

When a batch still fails after the writer's retries, its rows are appended here and
the writer moves on; they are written to the database (idempotently) once it answers
again. Each process has its own file, ``<spool_dir>/<store hash>-<pid>.jsonl``; a
writer starting up adopts the files of dead processes for the same store, so rows
spooled just before a crash are replayed by the next run.

Lines are ``{"t": "s" | "e", "r": [row values]}``. A line cut short by a crash is
skipped on replay (and counted).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from instrumentation import telemetry
from instrumentation.storage.base import Row

logger = logging.getLogger("instrumentation.storage")


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


class Spool:
    """The spool file of one store in this process (not thread-safe: the writer owns it)."""

    def __init__(self, key: str, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_spool_dir()
        self.prefix = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
        self.rows_pending = 0

    @property
    def path(self) -> Path:
        return self.directory / f"{self.prefix}-{os.getpid()}.jsonl"

    @property
    def pending(self) -> bool:
        return self.rows_pending > 0

    def append(self, spans: Sequence[Row], events: Sequence[Row]) -> None:
        """Add rows to the file, flushed to the OS before returning."""
        self.directory.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"t": "s", "r": list(r)}, ensure_ascii=False) for r in spans]
        lines += [json.dumps({"t": "e", "r": list(r)}, ensure_ascii=False) for r in events]
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        self.rows_pending += len(lines)
        telemetry.counter("storage.spooled_rows").add(len(lines))

    def read(self) -> tuple[list[Row], list[Row]]:
        """Every row in the file, as ``(span rows, event rows)``."""
        spans: list[Row] = []
        events: list[Row] = []
        try:
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        item = json.loads(line)
                        (spans if item["t"] == "s" else events).append(tuple(item["r"]))
                    except (ValueError, KeyError, TypeError):
                        telemetry.counter("storage.spool_bad_lines").inc()
        except FileNotFoundError:
            pass
        return spans, events

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.rows_pending = 0

    def adopt_orphans(self) -> int:
        """Take over the spool files left by dead processes for this store; rows adopted."""
        adopted = 0
        try:
            candidates = list(self.directory.glob(f"{self.prefix}-*.jsonl"))
        except OSError:
            return 0
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
                text = claimed.read_text(encoding="utf-8")
                self.directory.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(text if text.endswith("\n") or not text else text + "\n")
                adopted += text.count("\n")
                claimed.unlink()
            except OSError:
                logger.exception("instrumentation.storage could not adopt spool %s", candidate)
        self.rows_pending += adopted
        # Our own file may also exist from an earlier writer in this very process.
        if not self.rows_pending and self.path.exists():
            spans, events = self.read()
            self.rows_pending = len(spans) + len(events)
        return adopted


__all__ = ["Spool", "default_spool_dir"]
