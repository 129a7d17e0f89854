"""Folders that handlers write files in (the storage spool, the audit log files).

Both check theirs when the handler is made, not when the first file is due: a
folder found unusable then would lose what was to go in it. The check is here, once;
each caller words the refusal for its own option and raises its own kind of error.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


def make_writable_folder(path: Path) -> tuple[int, str] | None:
    """Make ``path`` (and its parents) if missing; ``None`` if files can then be made
    in it, else why not: an ``errno`` code and a reason that reads after the path
    ("... is a file, not a folder")."""
    if "\x00" in str(path):  # Path.mkdir raises a bare "embedded null byte"
        return errno.EINVAL, "holds a NUL character"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # there, and not a folder
        return errno.ENOTDIR, "is a file, not a folder"
    except OSError as exc:
        return exc.errno or errno.EIO, f"cannot be made ({exc.strerror or exc})"
    if not path.is_dir():  # pragma: no cover - mkdir raised for this already
        return errno.ENOTDIR, "is a file, not a folder"
    if not os.access(path, os.W_OK | os.X_OK):
        return errno.EACCES, "cannot be written (permission denied)"
    return None
