"""Recording audit handlers whose contexts are unique objects, checked one by one."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instrumentation.audit import Event, EventHandler, LLMEvent, RequestEnd, RequestStart

_nonce = itertools.count()


@dataclass(eq=False)
class ReqCtx:
    request_id: str
    question: str
    nonce: int = field(default_factory=lambda: next(_nonce))


@dataclass(eq=False)
class EvCtx:
    request: ReqCtx
    key: str | None
    nonce: int = field(default_factory=lambda: next(_nonce))


class Recorder:
    """What a handler returned and what it was given back, per request and event."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.returned_request: dict[str, ReqCtx] = {}
        self.returned_events: list[EvCtx] = []
        self.event_ends: list[tuple[Any, Any, Event | None]] = []
        self.request_ends: list[tuple[RequestEnd, Any]] = []
        self.calls: list[str] = []

    def request_start(self, user_request: RequestStart) -> ReqCtx:
        ctx = ReqCtx(user_request.request_id, user_request.question)
        with self.lock:
            self.returned_request[user_request.request_id] = ctx
            self.calls.append("request_start")
        return ctx

    def event_start(self, event: Event, request_context: ReqCtx) -> EvCtx:
        ctx = EvCtx(request_context, getattr(event, "span_id", None))
        with self.lock:
            self.returned_events.append(ctx)
            self.calls.append("event_start")
        return ctx

    def event_end(self, event: Event | None, request_context: Any, event_context: Any) -> None:
        with self.lock:
            self.event_ends.append((request_context, event_context, event))
            self.calls.append("event_end")

    def request_end(self, output: RequestEnd, request_context: Any) -> None:
        with self.lock:
            self.request_ends.append((output, request_context))
            self.calls.append("request_end")

    def check(self, expected_requests: int, events_per_request: int) -> None:
        """Every context came back to exactly the call it belongs to."""
        assert len(self.returned_request) == expected_requests
        assert len(self.request_ends) == expected_requests
        assert len(self.event_ends) == expected_requests * events_per_request
        returned_events = {id(e) for e in self.returned_events}
        for output, ctx in self.request_ends:
            assert ctx is self.returned_request[output.request_id]
        ended: set[int] = set()
        for request_ctx, event_ctx, event in self.event_ends:
            assert isinstance(event_ctx, EvCtx)
            assert id(event_ctx) in returned_events
            assert id(event_ctx) not in ended  # each event context comes back once
            ended.add(id(event_ctx))
            assert event_ctx.request is request_ctx
            assert request_ctx is self.returned_request[request_ctx.request_id]
            if isinstance(event, LLMEvent):
                assert event.span_id == event_ctx.key
                assert request_ctx.question in str(event.prompt)
                assert event.response is not None


class SyncRecorder(EventHandler[ReqCtx, EvCtx]):
    def __init__(self) -> None:
        self.rec = Recorder()

    def request_start(self, user_request: RequestStart) -> ReqCtx:
        return self.rec.request_start(user_request)

    def event_start(self, event: Event, request_context: ReqCtx) -> EvCtx:
        return self.rec.event_start(event, request_context)

    def event_end(self, event: Event | None, request_context: ReqCtx, event_context: EvCtx) -> None:
        self.rec.event_end(event, request_context, event_context)

    def request_end(self, output: RequestEnd, request_context: ReqCtx) -> None:
        self.rec.request_end(output, request_context)


class AsyncRecorder(EventHandler[ReqCtx, EvCtx]):
    """Async methods that yield to the loop, so calls of many requests interleave."""

    def __init__(self, pause: float = 0.0) -> None:
        self.rec = Recorder()
        self.pause = pause

    async def request_start(self, user_request: RequestStart) -> ReqCtx:
        await asyncio.sleep(self.pause)
        return self.rec.request_start(user_request)

    async def event_start(self, event: Event, request_context: ReqCtx) -> EvCtx:
        await asyncio.sleep(self.pause)
        return self.rec.event_start(event, request_context)

    async def event_end(
        self, event: Event | None, request_context: ReqCtx, event_context: EvCtx
    ) -> None:
        await asyncio.sleep(self.pause)
        self.rec.event_end(event, request_context, event_context)

    async def request_end(self, output: RequestEnd, request_context: ReqCtx) -> None:
        await asyncio.sleep(self.pause)
        self.rec.request_end(output, request_context)


def mypy_strict(
    cache: Path, *files: Path, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``mypy --strict`` on ``files``, as a user's own code is checked (a fresh cache)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--follow-imports=silent",
            "--cache-dir",
            str(cache),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
    )
