"""Event classes made at run time (pydantic's ``create_model``, one per request or per
tool) are freed once the application lets go of them: a per-class cache that held them
kept every one for the life of the process (tens of kB each)."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

from pydantic import create_model

from instrumentation import BaseEvent, audit, get_dispatcher, storage
from instrumentation.audit import EventHandler

d = get_dispatcher("tests.core.run_time_classes")


def _made_at_run_time(name: str) -> type[BaseEvent]:
    made: type[BaseEvent] = create_model(name, __base__=BaseEvent, value=(int, 0))
    return made


def _freed(ref: weakref.ref[type[BaseEvent]]) -> bool:
    for _ in range(3):  # a pydantic class is in reference cycles of its own
        gc.collect()
    return ref() is None


def test_an_event_class_stored_once_is_not_kept_by_the_storage(tmp_path: Path) -> None:
    with storage.record_to(tmp_path / "t.db") as recorder:
        cls = _made_at_run_time("StoredOnce")
        d.event(cls(value=1))
        assert recorder.flush(10)
    ref = weakref.ref(cls)
    del cls
    assert _freed(ref)


class _Quiet(EventHandler[None, None]):
    def request_start(self, user_request: object) -> None:
        return None

    def event_start(self, event: object, request_context: None) -> None:
        return None

    def event_end(self, event: object, request_context: None, event_context: None) -> None:
        return None

    def request_end(self, output: object, request_context: None) -> None:
        return None


def test_an_event_class_seen_in_a_request_is_not_kept_by_the_audit() -> None:
    with audit.request(question="q", handlers=[_Quiet()]) as req:
        cls = _made_at_run_time("AuditedOnce")
        d.event(cls(value=1))
        req.result = "done"
    ref = weakref.ref(cls)
    del cls
    assert _freed(ref)
