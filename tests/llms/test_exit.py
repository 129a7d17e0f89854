"""An LLM stream still open when the interpreter exits ends as abandoned, before the
exit flushes: its end event is stored, and its span stored as ended, not dropped."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from forking import in_child

from instrumentation._exit import run_exit_hooks
from instrumentation.llms import LLMChatEndEvent, OfflineLLM
from instrumentation.otel.receiver import OTLPReceiver
from instrumentation.storage import SQLiteStore
from instrumentation.testing import Capture

from .openai_server import OpenAIServer

QUESTION = "hello there friend"

#: Each opens a stream, reads two chunks and leaves it open (kept in ``stream``). An
#: async one is read in a loop that is never closed: nothing closes its body.
OPENED = {
    "openai": f"""
client = openai.OpenAI(base_url=BASE_URL, api_key="test", max_retries=0)
stream = client.chat.completions.create(
    model="gpt-4o", messages=[{{"role": "user", "content": {QUESTION!r}}}], stream=True
)
next(stream), next(stream)
""",
    "openai async": f"""
client = openai.AsyncOpenAI(base_url=BASE_URL, api_key="test", max_retries=0)
async def opened():
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=[{{"role": "user", "content": {QUESTION!r}}}], stream=True
    )
    await stream.__anext__(), await stream.__anext__()
    return stream
loop = asyncio.new_event_loop()
stream = loop.run_until_complete(opened())
""",
    "BaseLLM": f"""
stream = OfflineLLM().stream_chat({QUESTION!r})
next(stream), next(stream)
""",
    "BaseLLM async": f"""
async def opened():
    stream = await OfflineLLM().astream_chat({QUESTION!r})
    await stream.__anext__(), await stream.__anext__()
    return stream
loop = asyncio.new_event_loop()
stream = loop.run_until_complete(opened())
""",
}


@pytest.fixture(scope="module")
def server() -> Iterator[OpenAIServer]:
    srv = OpenAIServer().start()
    yield srv
    srv.stop()


@pytest.mark.parametrize("kind", list(OPENED))
def test_a_stream_open_at_exit_ends_as_abandoned_before_the_store_flushes(
    tmp_path: Path, server: OpenAIServer, kind: str
) -> None:
    """The storage's exit flush was registered after the LLM modules were imported, so
    ``atexit`` runs it first: the stream ended only when the garbage collector closed
    it after that, its span stored as dropped and its end event lost."""
    db = tmp_path / "exit.db"
    script = f"""
import asyncio
import openai
from instrumentation.llms import OfflineLLM
from instrumentation.llms.openai import instrument_openai
from instrumentation.storage import record_to
BASE_URL = {server.base_url!r}
instrument_openai()
record_to({str(db)!r})
{OPENED[kind]}
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, done.stderr
    assert "dropped" not in done.stderr
    with SQLiteStore(db) as store:
        [end] = store.events(type="LLMChatEndEvent")
        [span] = store.trace(end.trace_id or "")
    assert end.payload["finish_reason"] == "abandoned"
    # What the two chunks brought: openai's first has the role and no text.
    received = "Echo:" if kind.startswith("openai") else "Echo: hello"
    assert end.payload["response"]["message"]["content"] == received
    assert end.span_id == span.id_ and span.status == "ok"


def test_a_stream_open_at_exit_is_exported_with_its_end(server: OpenAIServer) -> None:
    """The same for OpenTelemetry: the span was ended by the exporter's shutdown, as an
    error and with no finish reason; it is exported as the stream ended, abandoned."""
    with OTLPReceiver() as receiver:
        script = f"""
import openai
from instrumentation.llms.openai import instrument_openai
from instrumentation.otel import configure_otlp
instrument_openai()
configure_otlp(endpoint={receiver.endpoint!r})
BASE_URL = {server.base_url!r}
{OPENED["openai"]}
"""
        done = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        assert done.returncode == 0, done.stderr
        [span] = receiver.wait_for(1)
    assert not span.is_error
    assert span.attributes["gen_ai.response.finish_reasons"] == ("abandoned",)


def test_a_forked_child_leaves_its_parents_open_streams_to_the_parent(cap: Capture) -> None:
    """The child's copy of a stream its parent has open is the parent's call: the
    child's exit does not end it (a second end event, from the child)."""
    stream = OfflineLLM().stream_chat(QUESTION)
    next(stream)

    def exit_hooks_in_the_child() -> int:
        run_exit_hooks()
        return len(cap.events_of(LLMChatEndEvent))

    assert in_child(exit_hooks_in_the_child) == 0
    run_exit_hooks()  # the parent's exit ends it
    [end] = cap.events_of(LLMChatEndEvent)
    assert end.finish_reason == "abandoned"


def test_an_async_stream_ended_at_exit_stops_there_in_a_loop_still_running(
    cap: Capture,
) -> None:
    """A daemon thread's event loop runs on while the exit's hooks run: a task there
    that kept a stream, not reading it just then, read it on afterwards to its end and
    ended the call a second time (a "stop" end event after the "abandoned" one)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    exited = asyncio.Event()
    received: list[object] = []
    kept = threading.Event()

    async def reads_on_after_the_exit() -> None:
        stream = await OfflineLLM().astream_chat(QUESTION)
        received.append(await stream.__anext__())
        kept.set()
        await exited.wait()
        async for chunk in stream:
            received.append(chunk)

    try:
        reading = asyncio.run_coroutine_threadsafe(reads_on_after_the_exit(), loop)
        assert kept.wait(10), reading.exception(timeout=0)
        run_exit_hooks()
        loop.call_soon_threadsafe(exited.set)
        reading.result(timeout=10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    assert [end.finish_reason for end in cap.events_of(LLMChatEndEvent)] == ["abandoned"]
    assert len(received) == 1
