from __future__ import annotations

import asyncio
import io
import logging
import os
import pty
import re
import threading
from pathlib import Path
from typing import Any

import pytest

from instrumentation import audit
from instrumentation.audit import (
    CLIEventHandler,
    FileEventHandler,
    LoggingEventHandler,
    RequestStart,
)
from instrumentation.llms import ChatMessage, OfflineLLM


async def _ask(llm: OfflineLLM, question: str, handlers: list[Any]) -> audit.AuditRequest:
    async with audit.request(question=question, collection="recipes", handlers=handlers) as req:
        await asyncio.sleep(0.001)
        reply = await llm.achat([ChatMessage(role="user", content=question)])
        req.result = reply.message.content
    return req


async def test_file_handler_one_complete_file_per_request(tmp_path: Path) -> None:
    threads: list[str] = []

    class Spy(FileEventHandler):
        def request_start(self, user_request: RequestStart) -> Any:
            threads.append(threading.current_thread().name)
            return super().request_start(user_request)

    handler = Spy(tmp_path / "logs")
    llm = OfflineLLM(answers={"soup": "miso"})
    requests = await asyncio.gather(*(_ask(llm, f"soup {i}?", [handler]) for i in range(50)))
    files = sorted((tmp_path / "logs").iterdir())
    assert len(files) == 50  # one per request, even started in the same microsecond
    assert not [f for f in files if f.name.endswith(".part")]
    for req in requests:
        (path,) = [f for f in files if req.id in f.name]
        text = path.read_text()
        question = req.start.question
        assert f"Question: {question}\n" in text and "Collection: recipes" in text
        assert f"prompt: user: {question}" in text and "response: miso" in text
        assert "tokens:" in text and "Output: miso" in text
    # Written on the audit worker threads: never on the application's event loop thread.
    assert threading.current_thread().name not in threads
    assert all(name.startswith("instrumentation-audit-sync") for name in threads)


def test_file_names_cannot_escape_or_collide(tmp_path: Path) -> None:
    handler = FileEventHandler(tmp_path)
    evil = RequestStart(question="q", collection="../../etc", request_id="../../../passwd")
    path = handler.path_for(evil)
    assert path.parent == tmp_path and "passwd" not in path.name
    a, b = RequestStart("q", "c"), RequestStart("q", "c")
    b.started_at = a.started_at
    assert handler.path_for(a) != handler.path_for(b)
    with pytest.raises(TypeError, match="directory"):
        FileEventHandler(3)  # type: ignore[arg-type]


def test_file_handler_records_the_error(tmp_path: Path) -> None:
    handler = FileEventHandler(tmp_path)
    with pytest.raises(ValueError), audit.request(question="q", handlers=[handler]):
        raise ValueError("bad input")
    (path,) = list(tmp_path.iterdir())
    assert "Error: ValueError: bad input" in path.read_text()


def test_file_handler_writes_text_that_is_not_valid_unicode(tmp_path: Path) -> None:
    """A lone surrogate (os.fsdecode of a bad file name, say) is written escaped: it
    made request_start fail with its file left open, or request_end leave a .log file
    without its output and duration."""
    handler = FileEventHandler(tmp_path)
    with audit.request(question="open caf\udce9.txt", handlers=[handler]) as req:
        req.result = "read caf\udce9.txt"
    assert req.completed is True
    assert req.errors == []  # was a UnicodeEncodeError
    (path,) = list(tmp_path.iterdir())
    text = path.read_text(encoding="utf-8")
    assert "Question: open caf\\udce9.txt\n" in text
    assert "Output: read caf\\udce9.txt\n" in text
    assert "Duration: " in text


async def test_cli_handler_blocks_do_not_interleave() -> None:
    stream = io.StringIO()
    handler = CLIEventHandler(stream=stream)
    llm = OfflineLLM(latency_s=0.001)
    await asyncio.gather(*(_ask(llm, f"cli question {i}", [handler]) for i in range(40)))
    text = stream.getvalue()
    assert "\033[" not in text  # StringIO is not a terminal: no colour
    blocks = re.split(r"(?m)^(?=Request )", text)[1:]
    assert len(blocks) == 40
    for block in blocks:
        question = re.match(r"Request \w+ \[recipes\] (cli question \d+)", block)
        assert question is not None
        asked = question.group(1)
        assert block.count("LLM chat") == 1
        assert f"prompt: user: {asked}\n" in block
        assert f"result: Echo: {asked}\n" in block


def test_cli_handler_colour_on_a_terminal() -> None:
    leader, follower = pty.openpty()
    try:
        with os.fdopen(follower, "w", closefd=False) as tty:
            handler = CLIEventHandler(stream=tty)
            with audit.request(question="coloured?", handlers=[handler]) as req:
                req.result = "yes"
        out = os.read(leader, 4096).decode()
    finally:
        os.close(leader)
        os.close(follower)
    assert "\033[1mRequest" in out and "\033[32m" in out
    forced = io.StringIO()
    with audit.request(question="forced", handlers=[CLIEventHandler(forced, color=True)]):
        pass
    assert "\033[" in forced.getvalue()
    with pytest.raises(TypeError, match="color"):
        CLIEventHandler(color="yes")  # type: ignore[arg-type]


def test_logging_handler_one_structured_record_per_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    llm = OfflineLLM(answers={"tea": "green"})
    handler = LoggingEventHandler("tests.audit.records")
    with (
        caplog.at_level(logging.INFO, logger="tests.audit.records"),
        audit.request(question="tea?", collection="drinks", handlers=[handler]) as req,
    ):
        llm.chat([ChatMessage(role="user", content="tea?")])
        with audit.event(audit.ToolCallEvent(name="kettle")) as ev:
            ev.update(output="hot")
        req.result = "green"
    records = [r for r in caplog.records if r.name == "tests.audit.records"]
    phases = [r.audit["phase"] for r in records]  # type: ignore[attr-defined]
    assert phases == ["request_start", "event", "event", "request_end"]
    llm_record = records[1].audit  # type: ignore[attr-defined]
    assert llm_record["kind"] == "LLMEvent" and llm_record["response"] == "green"
    assert llm_record["total_tokens"] > 0 and llm_record["request_id"] == req.id
    assert llm_record["duration_ms"] >= 0
    assert records[2].audit["name"] == "kettle"  # type: ignore[attr-defined]
    assert records[3].audit["result"] == "green"  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="logger"):
        LoggingEventHandler(3)  # type: ignore[arg-type]


def test_logging_handler_failed_request_is_an_error_record(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler = LoggingEventHandler("tests.audit.records")
    with (
        caplog.at_level(logging.INFO, logger="tests.audit.records"),
        pytest.raises(OSError),
        audit.request(question="q", handlers=[handler]),
    ):
        raise OSError("gone")
    last = [r for r in caplog.records if r.name == "tests.audit.records"][-1]
    assert last.levelno == logging.ERROR and "OSError: gone" in last.getMessage()
