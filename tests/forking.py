"""Run a piece of a test in a forked child: for what must hold in a child process."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

CHILD_OK = 0


def in_child(body: Callable[[], Any]) -> Any:
    """Run ``body`` in a forked child and return what it returned (through JSON).

    The child has 20 s; an assertion or error in it fails the test here.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        status = 1
        try:
            import signal

            signal.alarm(20)
            os.close(read_fd)
            os.write(write_fd, json.dumps(body()).encode())
            status = CHILD_OK
        finally:
            os._exit(status)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == CHILD_OK
    return json.loads(b"".join(chunks))
