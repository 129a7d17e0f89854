"""``FileEventHandler``: one text file per request under a directory, as in the how-to.

Its methods are plain ``def``: the runner calls them on its worker threads, so the
writes never block an event loop (the application's or the audit loop). A file is
written as ``.<name>.part`` and renamed to ``<name>`` when the request ends, so a
file with its final name is complete. Should ``request_end`` fail to write or close
it (a full disk, say), what was written is kept as ``<name>.incomplete`` and the
failure, naming that file, is a handler error (logged, counted, on the request).
Names are ``<UTC time>-<request id>.log`` where the request id is 32 hex digits made
here: two requests never share a file, and nothing the user asked can steer the path
out of the directory. The directory is
checked (and made, if missing) when the handler is made, so a path it cannot write
to is an error there, not a failure logged on every request. Times written are the
application's (an LLM call's ``latency_ms``, the events' timestamps, the request's
``duration_s`` and ``ended_at``), never when this handler runs.
"""

from __future__ import annotations

import errno
import os
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from instrumentation._paths import make_writable_folder
from instrumentation._text import safe_str
from instrumentation.audit.base import EventHandler
from instrumentation.audit.events import Event, RequestEnd, RequestStart
from instrumentation.audit.handlers._format import (
    ENDED_EARLY,
    block,
    clip,
    duration_ms,
    end_lines,
    events_dropped_text,
    started_at,
    title,
)

_HEX32 = re.compile(r"[0-9a-f]{32}\Z")


@dataclass
class FileContext:
    """The request context: the open file and the paths it moves between."""

    part: Path
    final: Path
    file: IO[str]
    events: int = field(default=0)


def _writable_directory(directory: Path) -> None:
    """Make ``directory`` if it is missing; an ``OSError`` of the matching subclass
    (``OSError(errno, ...)`` picks it: ``NotADirectoryError``, ``PermissionError``...)
    saying which path and why if files cannot be written in it."""
    problem = make_writable_folder(directory)
    if problem is not None:
        code, why = problem
        raise OSError(
            code,
            f"FileEventHandler cannot write its log files in {str(directory)!r}: it {why}; "
            "pass a directory it can create or write to",
        )


def _open_part(part: Path) -> IO[str]:
    # backslashreplace: text that is not valid Unicode (a lone surrogate, say, from
    # os.fsdecode) is written escaped instead of failing the request's file.
    return open(part, "x", encoding="utf-8", errors="backslashreplace")


class FileEventHandler(EventHandler[FileContext | None, datetime | None]):
    """Writes each request to its own file in ``directory`` (created if missing).

    Raises ``OSError`` (``FileNotFoundError``, ``PermissionError``,
    ``NotADirectoryError``...) at once, naming the path, when ``directory`` cannot be
    created or written to.
    """

    def __init__(self, directory: str | os.PathLike[str] = "logs") -> None:
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory is a path (str or Path); got {type(directory).__name__}")
        self.directory = Path(directory)
        _writable_directory(self.directory)

    def path_for(self, start: RequestStart) -> Path:
        """Where the request's file goes: inside :attr:`directory`, whatever the request says."""
        rid = start.request_id if _HEX32.match(start.request_id) else uuid.uuid4().hex
        stamp = start.started_at.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        return self.directory / f"{stamp}-{rid}.log"

    def request_start(self, user_request: RequestStart) -> FileContext:
        final = self.path_for(user_request)
        part = final.with_name(f".{final.name}.part")
        try:
            handle = _open_part(part)
        except FileNotFoundError:
            # The directory went away (a clean-up job, log rotation): make it again.
            self.directory.mkdir(parents=True, exist_ok=True)
            handle = _open_part(part)
        try:
            handle.write(f"Request: {block(safe_str(user_request.request_id))}\n")
            handle.write(f"Started: {user_request.started_at.isoformat()}\n")
            handle.write(f"Collection: {block(safe_str(user_request.collection))}\n")
            handle.write(f"Question: {block(safe_str(user_request.question))}\n")
            if user_request.metadata:
                handle.write(f"Metadata: {block(clip(user_request.metadata))}\n")
            return FileContext(part=part, final=final, file=handle)
        except BaseException:
            # No context to finish it later: nothing left open, no .part left behind.
            try:
                handle.close()
            finally:
                part.unlink(missing_ok=True)
            raise

    def event_start(self, event: Event, request_context: FileContext | None) -> datetime | None:
        if request_context is not None:
            request_context.events += 1
            request_context.file.write(f"\n[{request_context.events}] {title(event)} started\n")
        return started_at(event)

    def event_end(
        self,
        event: Event | None,
        request_context: FileContext | None,
        event_context: datetime | None,
    ) -> None:
        if request_context is None:
            return
        took = duration_ms(event, event_context)
        elapsed = "?" if took is None else f"{took:.1f}"
        out = request_context.file
        out.write(f"{title(event)} ended, elapsed: {elapsed} ms\n")
        for line in end_lines(event):
            out.write(f"  {line}\n")

    def request_end(self, output: RequestEnd, request_context: FileContext | None) -> None:
        if request_context is None:
            return
        out = request_context.file
        try:
            if output.error is not None:
                error = block(clip(safe_str(output.error)))
                out.write(f"\nError: {type(output.error).__name__}: {error}\n")
            elif output.abandoned:
                out.write(f"\nOutput: none, {ENDED_EARLY}\n")
            else:
                out.write(f"\nOutput: {block(clip(output.result))}\n")
            if output.events_dropped:
                out.write(f"Missing: {events_dropped_text(output.events_dropped)}\n")
            out.write(f"Duration: {output.duration_s * 1000:.1f} ms\n")
            out.write(f"Ended: {output.ended_at.isoformat()}\n")
            out.close()  # flushes: it fails too when what was buffered cannot be written
        except Exception as exc:
            raise _set_aside(request_context, exc) from exc
        except BaseException as exc:
            _set_aside(request_context, exc)
            raise
        os.replace(request_context.part, request_context.final)


def _incomplete_path(final: Path) -> Path:
    """Where a request's file is kept when it could not be completed."""
    return final.with_name(f"{final.name}.incomplete")


def _set_aside(context: FileContext, error: BaseException) -> OSError:
    """Close the file and keep what it holds as ``<name>.incomplete``, never as ``<name>``:
    a file with its final name is complete. Returns the error to report, naming it."""
    out = context.file
    if not out.closed:
        try:
            out.close()
        except Exception:  # what it could not write is lost; the file is closed anyway
            pass
    kept = _incomplete_path(context.final)
    try:
        os.replace(context.part, kept)
    except OSError as exc:
        where = f"it stays as {str(context.part)!r} ({exc.strerror or exc})"
    else:
        where = f"what was written is kept as {str(kept)!r}"
    code = error.errno if isinstance(error, OSError) and error.errno else errno.EIO
    return OSError(code, f"the request's file could not be completed ({error!r}); {where}")


__all__ = ["FileContext", "FileEventHandler"]
