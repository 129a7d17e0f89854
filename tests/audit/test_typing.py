"""``mypy --strict`` accepts a handler annotated with its context types, and catches
one whose contexts do not match."""

from __future__ import annotations

from pathlib import Path

import instrumentation.audit.examples.typed_handler as typed_handler

from .helpers import mypy_strict

BAD = """
from __future__ import annotations

from datetime import datetime
from io import TextIOWrapper

from instrumentation.audit import Event, EventHandler, RequestEnd, RequestStart


class Wrong(EventHandler[TextIOWrapper, datetime]):
    async def request_start(self, user_request: RequestStart) -> int:
        return 1

    async def event_start(self, event: Event, request_context: TextIOWrapper) -> datetime:
        return datetime.now()

    async def event_end(
        self, event: Event | None, request_context: TextIOWrapper, event_context: str
    ) -> None:
        return None

    async def request_end(self, output: RequestEnd, request_context: TextIOWrapper) -> None:
        return None
"""


def test_mypy_strict_accepts_typed_handlers_and_rejects_wrong_contexts(tmp_path: Path) -> None:
    bad = tmp_path / "bad_handler.py"
    bad.write_text(BAD)
    good = Path(typed_handler.__file__)
    proc = mypy_strict(tmp_path / "cache", good, bad)
    out = proc.stdout
    assert "typed_handler.py" not in out, out  # no error in the annotated example
    assert 'Return type "Coroutine[Any, Any, int]" of "request_start"' in out, out
    assert 'Argument 3 of "event_end" is incompatible' in out, out


def test_typed_examples_run(tmp_path: Path) -> None:
    from instrumentation import audit

    file_handler = typed_handler.TypedFileEventHandler(tmp_path)
    sync_handler = typed_handler.SyncTypedHandler()
    with (
        audit.request(question="typed?", handlers=[file_handler, sync_handler]) as req,
        audit.event(audit.ToolCallEvent(name="t")),
    ):
        pass
    assert req.errors == []
    (path,) = list(tmp_path.iterdir())
    assert "Elapsed Time:" in path.read_text() and "Output: None" in path.read_text()
    assert sync_handler.finished[0][0] == "typed?"
