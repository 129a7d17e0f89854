from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import pty
import re
import shutil
import signal
import threading
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, cast

import pytest

from instrumentation import audit, telemetry
from instrumentation.audit import (
    CLIEventHandler,
    FileEventHandler,
    LoggingEventHandler,
    RequestStart,
)
from instrumentation.llms import ChatMessage, OfflineLLM

from .helpers import SyncRecorder


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


def test_a_file_handler_makes_its_directory_again_when_it_went_away(tmp_path: Path) -> None:
    """A clean-up job removed the log directory between two requests."""
    logs = tmp_path / "logs"
    handler = FileEventHandler(logs)
    with audit.request(question="first", handlers=[handler]) as req:
        req.result = "one"
    shutil.rmtree(logs)
    with audit.request(question="second", handlers=[handler]) as req:
        req.result = "two"
    assert req.errors == []
    (path,) = list(logs.iterdir())
    assert "Question: second\n" in path.read_text()


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


def test_cli_handler_colour_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
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


@pytest.mark.parametrize("no_color", ["1", "0", "false", ""])
def test_cli_handler_honours_no_color_on_a_terminal(
    no_color: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NO_COLOR set to anything but "" (https://no-color.org) turns the colour off on a
    terminal; color=True, the handler's own setting, still turns it on."""
    monkeypatch.setenv("NO_COLOR", no_color)
    leader, follower = pty.openpty()
    try:
        with os.fdopen(follower, "w", closefd=False) as tty:
            for color in (None, True):
                with audit.request(question="coloured?", handlers=[CLIEventHandler(tty, color)]):
                    pass
        out = ""
        while out.count("took") < 2:  # each block may come in a read of its own
            out += os.read(leader, 8192).decode()
    finally:
        os.close(leader)
        os.close(follower)
    auto, forced = re.split(r"(?m)^(?=\S*Request )", out)[1:]
    assert ("\033[" in auto) is (no_color == "")
    assert "\033[1mRequest" in forced


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
    assert last.audit["result"] is None  # type: ignore[attr-defined]  # not the text "None"


@pytest.mark.parametrize("result", [None, 3, 2.5, True, [1, 2], {"rows": [1, 2]}])
def test_logging_handler_keeps_a_results_json_type(
    caplog: pytest.LogCaptureFixture, result: Any
) -> None:
    """A JSON log reader must tell no result from the text "None": the result went out
    as its repr(), text whatever it was."""
    handler = LoggingEventHandler("tests.audit.records")
    with (
        caplog.at_level(logging.INFO, logger="tests.audit.records"),
        audit.request(question="q", handlers=[handler]) as req,
    ):
        req.result = result
    last = [r for r in caplog.records if r.name == "tests.audit.records"][-1]
    assert json.loads(json.dumps(last.audit["result"])) == result  # type: ignore[attr-defined]


def test_logging_handler_records_with_an_integer_too_long_to_print_are_json(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Python prints no int of more than 4,300 digits: json.dumps of the record raised,
    and a JSON log formatter lost it. Such an int is a placeholder; the rest is kept."""
    handler = LoggingEventHandler("tests.audit.records")
    with (
        caplog.at_level(logging.INFO, logger="tests.audit.records"),
        audit.request(question="q", handlers=[handler], metadata={"n": 10**5000}) as req,
    ):
        req.result = {"rows": [10**5000, 2**1999, 3]}
    start, end = [r.audit for r in caplog.records if r.name == "tests.audit.records"]  # type: ignore[attr-defined]
    assert json.loads(json.dumps(start))["metadata"] == {"n": "<int of 16610 bits>"}
    assert json.loads(json.dumps(end))["result"] == {"rows": ["<int of 16610 bits>", 2**1999, 3]}


# -- times are the application's, never the handler thread's clock ----------------------

SLOW_START_S = 0.6  # the handler's request_start: its later calls all run this late
LLM_S = 0.2
TOOL_S = 0.15


def _slow_start(cls: type[Any], *args: Any) -> Any:
    class SlowStart(cls):  # type: ignore[misc, valid-type]
        def request_start(self, user_request: RequestStart) -> Any:
            time.sleep(SLOW_START_S)
            return super().request_start(user_request)

    return SlowStart(*args)


def _shown(kind: str, out: io.StringIO, logs: list[logging.LogRecord], directory: Path) -> Any:
    """(LLM call ms, tool call ms, request ms, text) as the handler wrote them."""
    if kind == "cli":
        text = out.getvalue()
        llm = re.search(r"LLM chat offline \((\d+\.\d) ms\)", text)
        tool = re.search(r"tool kettle \((\d+\.\d) ms\)", text)
        took = re.search(r"took (\d+\.\d) ms", text)
    elif kind == "file":
        (path,) = directory.iterdir()
        text = path.read_text()
        llm = re.search(r"LLM chat offline ended, elapsed: (\d+\.\d) ms", text)
        tool = re.search(r"tool kettle ended, elapsed: (\d+\.\d) ms", text)
        took = re.search(r"Duration: (\d+\.\d) ms", text)
    else:
        data = [r.audit for r in logs]  # type: ignore[attr-defined]
        by_kind = {d.get("kind", d["phase"]): d.get("duration_ms") for d in data}
        return by_kind["LLMEvent"], by_kind["ToolCallEvent"], by_kind["request_end"], ""
    assert llm is not None and tool is not None and took is not None, text
    return float(llm.group(1)), float(tool.group(1)), float(took.group(1)), text


@pytest.mark.parametrize("kind", ["cli", "file", "logging"])
def test_durations_are_measured_where_things_happened_not_when_handlers_ran(
    kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The handlers timed events on their own thread, from event_start to event_end: a
    200 ms LLM call behind a slow request_start was shown as taking a few ms (both calls
    ran back to back, 600 ms later). An LLM call shows its own latency_ms; other events
    their timestamps, taken on the application's side; the request its duration_s."""
    out = io.StringIO()
    handler = {
        "cli": lambda: _slow_start(CLIEventHandler, out),
        "file": lambda: _slow_start(FileEventHandler, tmp_path),
        "logging": lambda: _slow_start(LoggingEventHandler, "tests.audit.timing"),
    }[kind]()
    seen = SyncRecorder()  # keeps the events the handlers were given
    llm = OfflineLLM(latency_s=LLM_S)
    began = time.perf_counter()
    with (
        caplog.at_level(logging.INFO, logger="tests.audit.timing"),
        audit.request(question="tea?", handlers=[handler, seen]) as req,
    ):
        llm.chat([ChatMessage(role="user", content="tea?")])
        with audit.event(audit.ToolCallEvent(name="kettle")):
            time.sleep(TOOL_S)
        last_line = datetime.now(timezone.utc)
    waited = time.perf_counter() - began
    assert req.completed is True and req.errors == []
    assert waited >= SLOW_START_S  # the exit did wait for the slow handler
    llm_end = next(e for _, _, e in seen.rec.event_ends if isinstance(e, audit.LLMEvent))
    assert llm_end.latency_ms is not None and llm_end.latency_ms >= LLM_S * 1000

    logs = [r for r in caplog.records if r.name == "tests.audit.timing"]
    llm_ms, tool_ms, took_ms, text = _shown(kind, out, logs, tmp_path)
    assert llm_ms == pytest.approx(llm_end.latency_ms, abs=0.06)  # was a few ms
    assert TOOL_S * 1000 * 0.95 <= tool_ms < SLOW_START_S * 1000  # was about 0
    # The request's own time is the application's too: not the handler's 600 ms.
    assert (LLM_S + TOOL_S) * 1000 <= took_ms < SLOW_START_S * 1000
    assert llm_ms + tool_ms <= took_ms
    if kind == "file":  # and it ended when the application's block did
        ended = re.search(r"Ended: (\S+)", text)
        assert ended is not None
        late = datetime.fromisoformat(ended.group(1)) - last_line
        assert late.total_seconds() < 0.1  # was when request_end ran, ~0.25 s later


def test_an_llm_call_shows_its_latency_even_when_event_end_runs_late() -> None:
    """A handler busy when an LLM call ends (here: a slow event_end before the built-in
    one) showed the delay as the call's time: 'LLM chat offline (1.2 ms)' inside a
    request that 'took 0.7 ms'."""
    out = io.StringIO()

    class LateEnd(CLIEventHandler):
        def event_end(self, event: Any, request_context: Any, event_context: Any) -> None:
            time.sleep(0.2)
            super().event_end(event, request_context, event_context)

    with audit.request(question="fast", handlers=[LateEnd(out)]) as req:
        OfflineLLM().chat([ChatMessage(role="user", content="fast")])
    assert req.completed is True
    text = out.getvalue()
    llm = re.search(r"LLM chat offline \((\d+\.\d) ms\)", text)
    took = re.search(r"took (\d+\.\d) ms", text)
    assert llm is not None and took is not None, text
    assert float(llm.group(1)) <= float(took.group(1)) < 200  # was >= 200 ms


def test_events_are_stamped_on_the_application_side() -> None:
    """Start and end events carry when they happened; an event made early is stamped
    when its block begins."""
    seen = SyncRecorder()
    made = audit.ToolCallEvent(name="early")
    time.sleep(0.05)
    with audit.request(question="q", handlers=[seen]):
        entered = datetime.now(timezone.utc)
        with audit.event(made) as ev:
            time.sleep(0.05)
            ev.update(output="done")
        left = datetime.now(timezone.utc)
    (start_ctx,) = seen.rec.returned_events
    ((_, _, end),) = seen.rec.event_ends
    assert end is not None and end.output == "done"  # type: ignore[attr-defined]
    assert entered <= ev.started.timestamp <= end.timestamp <= left
    assert (end.timestamp - ev.started.timestamp).total_seconds() >= 0.05
    assert start_ctx.key is None


# -- FileEventHandler's directory and its .part files --------------------------------------


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_directory_that_cannot_be_made_is_refused_when_the_handler_is_made() -> None:
    """It was accepted, and then every request logged a FileNotFoundError traceback."""
    with pytest.raises(OSError, match=r"'/proc/nope'.*cannot be made"):
        FileEventHandler("/proc/nope")


def test_a_directory_below_a_file_or_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(NotADirectoryError, match=r"a-file.*is a file, not a folder"):
        FileEventHandler(tmp_path / "a-file")
    with pytest.raises(NotADirectoryError, match=r"a-file/logs.*cannot be made"):
        FileEventHandler(tmp_path / "a-file" / "logs")


def test_a_directory_with_a_nul_character_is_an_os_error_naming_it(tmp_path: Path) -> None:
    """It was a bare ``ValueError: embedded null byte`` from ``mkdir``, naming no path
    and not one of the ``OSError`` subclasses the handler documents."""
    with pytest.raises(OSError, match=r"a\\x00b.*holds a NUL character.*pass a directory"):
        FileEventHandler(tmp_path / "a\0b")


def test_a_missing_directory_is_made_when_the_handler_is(tmp_path: Path) -> None:
    FileEventHandler(tmp_path / "new" / "logs")
    assert (tmp_path / "new" / "logs").is_dir()  # was made at the first request only


#: Who the check below runs as when the tests run as root: "nobody" on most systems.
UNPRIVILEGED = 65534


def _made_without_root(where: Path, names: list[str]) -> list[str]:
    """What ``FileEventHandler(name)`` does for each of ``names``, in a child of this
    process that runs in ``where`` as an unprivileged user: root may write to any
    directory, whatever its mode, so only such a user sees one as not writable.

    The child resolves the names from its working directory (the parents of a pytest
    temporary directory are root's alone), and answers through a pipe.
    """
    if not hasattr(os, "fork"):
        pytest.skip("run as root, this needs fork()")
    where.chmod(0o711)  # the unprivileged user may pass through it, not list it
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # multi-threaded fork (3.12+)
        pid = os.fork()
    if pid == 0:  # the child: answer through the pipe, never return into pytest
        try:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(5)  # a hung child dies, and says nothing
            os.chdir(where)
            answers = []
            try:
                os.setgroups([])
                os.setgid(UNPRIVILEGED)
                os.setuid(UNPRIVILEGED)
            except OSError as exc:
                answers.append(f"skip: cannot leave root ({exc})")
            else:
                for name in names:
                    try:
                        FileEventHandler(name)
                        answers.append("accepted")
                    except Exception as exc:
                        answers.append(f"{type(exc).__name__}: {exc}")
            os.write(write_end, "\n".join(answers).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        answers = pipe.read().split("\n")
    os.waitpid(pid, 0)
    if answers[0].startswith("skip: "):
        pytest.skip(answers[0].removeprefix("skip: "))
    return answers


def test_a_directory_that_is_not_writable_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        if os.geteuid() == 0:
            # As root: checked as a user for whom it is not writable, and one beside it
            # that is, so the refusal is the mode's doing.
            (tmp_path / "open").mkdir(mode=0o777)
            (tmp_path / "open").chmod(0o777)  # whatever the umask
            refused, accepted = _made_without_root(tmp_path, ["locked", "open"])
            expected = r"PermissionError: .*'locked'.*cannot be written.*"
            assert re.fullmatch(expected, refused), refused
            assert accepted == "accepted"
        else:
            with pytest.raises(PermissionError, match=r"locked.*cannot be written"):
                FileEventHandler(locked)
    finally:
        locked.chmod(0o700)


def test_a_request_start_failing_partway_leaves_no_part_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The header's metadata line raised: the file was closed but its .part stayed."""
    from instrumentation.audit.handlers import file as file_module

    def failing_clip(value: Any, limit: int = 2000) -> str:
        if isinstance(value, dict):
            raise RuntimeError("no text for it")
        return str(value)

    monkeypatch.setattr(file_module, "clip", failing_clip)
    handler = FileEventHandler(tmp_path)
    with audit.request(question="q", handlers=[handler], metadata={"bad": 1}) as req:
        req.result = "ok"
    assert [(e.method, type(e.error)) for e in req.errors] == [("request_start", RuntimeError)]
    assert list(tmp_path.iterdir()) == []


class _DiskFull:
    """A request's file whose last write or close fails, as on a full disk."""

    def __init__(self, file: Any, fails_in: str) -> None:
        self.file = file
        self.fails_in = fails_in

    @property
    def closed(self) -> bool:
        return bool(self.file.closed)

    def write(self, text: str) -> int:
        if self.fails_in == "write" and text.startswith("Duration:"):
            raise OSError(28, "No space left on device")
        return int(self.file.write(text))

    def close(self) -> None:
        self.file.close()  # closed all the same, as a real file is
        if self.fails_in == "close":
            raise OSError(28, "No space left on device")


@pytest.mark.parametrize("fails_in", ["write", "close"])
def test_a_file_request_end_cannot_complete_is_kept_as_incomplete_and_reported(
    tmp_path: Path, fails_in: str, caplog: pytest.LogCaptureFixture
) -> None:
    class DiskFills(FileEventHandler):
        def request_start(self, user_request: RequestStart) -> Any:
            context = super().request_start(user_request)
            context.file = cast(IO[str], _DiskFull(context.file, fails_in))
            return context

    with (
        caplog.at_level(logging.ERROR, logger="instrumentation.audit"),
        audit.request(question="q", handlers=[DiskFills(tmp_path)]) as req,
    ):
        req.result = "the answer"
    assert req.completed is True
    ((method, error),) = [(e.method, e.error) for e in req.errors]
    assert method == "request_end" and isinstance(error, OSError)
    (kept,) = tmp_path.iterdir()  # no .part left, and no .log: that name means complete
    assert kept.name.endswith(".log.incomplete") and not kept.name.startswith(".")
    assert str(kept) in str(error) and "No space left" in str(error)
    assert "Question: q\n" in kept.read_text()
    assert telemetry.counter("audit.handler_errors").value == 1
    assert any(str(kept) in r.getMessage() for r in caplog.records)


def test_cli_handler_says_when_a_stream_was_abandoned_and_counts_estimated() -> None:
    """A stream its caller stopped reading is not shown as a finished answer: the
    block says it ended early and that its token counts are estimates. A request with
    no collection shows no empty brackets."""
    stream = io.StringIO()
    llm = OfflineLLM(answers={"pasta": "Carbonara with guanciale and pecorino, never cream."})
    with audit.request(question="Stream?", handlers=[CLIEventHandler(stream)]) as req:
        with llm.stream_chat("pasta again") as chunks:
            next(chunks)
        req.result = "done"
    with audit.request(question="Whole?", handlers=[CLIEventHandler(stream)]) as req:
        llm.chat("pasta")
        req.result = "done"
    abandoned, whole = re.split(r"(?m)^(?=Request )", stream.getvalue())[1:]
    assert re.match(r"Request \w+ Stream\?\n", abandoned)
    assert "ended early: the caller stopped reading the stream" in abandoned
    assert re.search(r"tokens: .* \(estimated\)", abandoned)
    assert "ended early" not in whole and "(estimated)" not in whole


def test_text_handlers_show_the_cost_when_it_is_known(tmp_path: Path) -> None:
    stream = io.StringIO()
    priced = OfflineLLM(model="gpt-4o-mini", answers={"pasta": "Carbonara."})
    unpriced = OfflineLLM(model="nobody-prices-this")
    handlers: list[audit.AnyEventHandler] = [CLIEventHandler(stream), FileEventHandler(tmp_path)]
    with audit.request(question="Cost?", handlers=handlers) as req:
        priced.chat("pasta")
        unpriced.chat("pasta")
    assert req.completed
    (log,) = tmp_path.glob("*.log")
    for text in (stream.getvalue(), log.read_text()):
        assert len(re.findall(r"cost: \$0\.\d{6}\n", text)) == 1, text  # the priced call only
        priced_part, unpriced_part = text.split("nobody-prices-this")[:2]
        assert "cost: $" in priced_part and "cost" not in unpriced_part


def test_logging_handler_records_are_json_with_the_chat_prompt_as_a_list(
    caplog: pytest.LogCaptureFixture,
) -> None:
    llm = OfflineLLM(answers={"tea": "green"})
    handler = LoggingEventHandler("tests.audit.records")
    messages = [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="user", content="tea?"),
    ]
    with (
        caplog.at_level(logging.INFO, logger="tests.audit.records"),
        audit.request(
            question="tea?", handlers=[handler], metadata={("team", 1): "tuple key", "n": 2}
        ),
    ):
        llm.chat(messages)
        with audit.event(audit.ToolCallEvent(name="kettle", arguments={1: "a", "1": "b"})) as ev:
            ev.update(output=["hot", {"water": True}])
    records = [r.audit for r in caplog.records if r.name == "tests.audit.records"]  # type: ignore[attr-defined]
    start_record, llm_record, tool_record = records[0], records[1], records[2]
    # Keys that are not str (a tuple, 1 beside "1") become text, and none is lost.
    assert start_record["metadata"] == {"('team', 1)": "tuple key", "n": 2}
    assert tool_record["arguments"] == {"1": "a", "'1'": "b"}
    assert llm_record["prompt"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "tea?"},
    ]
    assert tool_record["output"] == ["hot", {"water": True}]
    for record in records:
        assert json.loads(json.dumps(record)) == record  # JSON as it is, no default= needed


class _NoRepr:
    def __repr__(self) -> str:
        raise ValueError("no repr")

    __str__ = __repr__


class _UnprintableError(Exception):
    def __str__(self) -> str:
        raise ValueError("no str")


def test_values_that_cannot_be_printed_cost_only_themselves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Metadata and a result whose repr() raises, an error whose str() raises: the File
    handler wrote no file (or left it .incomplete), the CLI and logging handlers lost
    their lines. Each now shows a placeholder and writes the rest."""
    out = io.StringIO()
    handlers: list[Any] = [
        FileEventHandler(tmp_path / "logs"),
        CLIEventHandler(out, color=False),
        LoggingEventHandler(),
    ]
    with caplog.at_level(logging.INFO, logger="instrumentation.audit"):
        with audit.request(question="odd?", handlers=handlers, metadata={"user": _NoRepr()}) as req:
            req.result = _NoRepr()
        with pytest.raises(_UnprintableError), audit.request(question="fails?", handlers=handlers):
            raise _UnprintableError
    assert not req.errors
    texts = sorted(p.read_text() for p in (tmp_path / "logs").iterdir())
    assert [p.suffix for p in (tmp_path / "logs").iterdir()] == [".log", ".log"]
    placeholder = "<unprintable _NoRepr>"
    assert any("Metadata: <unprintable dict>" in t for t in texts)
    assert any(f"Output: {placeholder}" in t for t in texts)
    assert any("Error: _UnprintableError: <unprintable _UnprintableError>" in t for t in texts)
    assert f"result: {placeholder}" in out.getvalue()
    assert "error: _UnprintableError: <unprintable _UnprintableError>" in out.getvalue()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("odd?" in m for m in messages) == 1
    assert any(f"ended: {placeholder}" in m for m in messages)
    assert any("failed: _UnprintableError: <unprintable" in m for m in messages)


def test_the_cli_handler_shows_control_characters_instead_of_obeying_them() -> None:
    """A question or an answer with ANSI escapes (\\x1b[2J clears the screen) reached the
    terminal as it was; its own colours still do."""
    out = io.StringIO()
    llm = OfflineLLM(answers={"clear": "done\x1b[2J"})
    handler = CLIEventHandler(out, color=True)
    with audit.request(question="clear\x1b[2J the screen?", handlers=[handler]) as req:
        req.result = llm.chat([ChatMessage(role="user", content="clear")]).message.content
    text = out.getvalue()
    assert "\x1b[2J" not in text and text.count("\\x1b[2J") >= 2
    assert "\x1b[1m" in text  # the handler's own bold


def test_user_text_cannot_pass_for_lines_the_file_and_logging_handlers_wrote(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A question, an answer or a tool name holding line breaks (a carriage return, a
    Unicode line separator) started lines of their own in the File handler's file
    ("Output: forged") and split the logging handler's one-line message; an ANSI escape
    reached the terminal of whoever ran ``cat`` on the file."""
    forged = "tea?\nOutput: forged\rDuration: 0.0 ms\u2028Ended: never\x1b[2J"
    handlers: list[Any] = [FileEventHandler(tmp_path / "logs"), LoggingEventHandler()]
    llm = OfflineLLM(answers={"tea": "green\nError: forged"})
    with (
        caplog.at_level(logging.INFO, logger="instrumentation.audit"),
        audit.request(
            question=forged, collection="drinks\nQuestion: forged", handlers=handlers
        ) as req,
    ):
        reply = llm.chat([ChatMessage(role="user", content="tea")])
        with audit.event(audit.ToolCallEvent(name="kettle\nError: forged")) as ev:
            ev.update(output="hot")
        req.result = f"{reply.message.content}\nDuration: 1.0 ms"
    assert not req.errors
    (path,) = (tmp_path / "logs").iterdir()
    lines = path.read_text(encoding="utf-8").split("\n")
    starts = [line.split(":")[0] for line in lines if line and not line.startswith(" ")]
    # Each of the handler's own entries once; the user's text only on indented lines.
    for head in ("Output", "Duration", "Ended", "Error", "Question"):
        assert starts.count(head) == (0 if head == "Error" else 1), (head, lines)
    assert "    Output: forged" in lines and "    Error: forged" in lines
    assert not any("\r" in line or "\u2028" in line or "\x1b" in line for line in lines)
    assert any("\\x1b[2J" in line for line in lines)
    assert any(line.startswith("[2] tool kettle\\nError: forged started") for line in lines)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("instrumentation")]
    assert messages and all("\n" not in m and "\r" not in m for m in messages)
    assert any("tea?\\nOutput: forged\\rDuration" in m for m in messages)
    assert any("tool kettle\\nError: forged" in m for m in messages)
    # The structured data keeps the text as it was, for JSON formatters to encode.
    assert any(getattr(r, "audit", {}).get("question") == forged for r in caplog.records)


def test_user_text_cannot_pass_for_lines_the_cli_handler_wrote() -> None:
    """The CLI handler escaped control characters but printed line breaks as they were:
    a question could print a "result:" line, a "took" line and a whole other request
    that looked like the handler's own. Its later lines are indented now, as in the
    file handler's files; a collection or a tool name stays on its one line."""
    out = io.StringIO()
    question = "harmless?\n  result: FORGED\r  took 0.1 ms\u2028Request deadbeef [x] fake"
    with audit.request(
        question=question, collection="c\n  took 9 ms", handlers=[CLIEventHandler(out)]
    ) as req:
        with audit.event(audit.ToolCallEvent(name="kettle\n  result: FORGED")) as ev:
            ev.update(output="hot")
        req.result = "real\r\n  cost: $999"
    assert not req.errors
    lines = out.getvalue().split("\n")
    assert lines[-1] == ""
    own = [line for line in lines[:-1] if not line.startswith("   ")]
    assert [line.split()[0] for line in own] == [
        "Request",
        "tool",
        "result:",
        "took",
    ], own
    assert own[0].startswith("Request ") and "[c\\n  took 9 ms] harmless?" in own[0]
    assert "    " + "  result: FORGED" in lines and "    Request deadbeef [x] fake" in lines
    assert own[1].startswith("  tool kettle\\n  result: FORGED")
    assert own[2] == "  result: real" and "      cost: $999" in lines
    assert not any("\r" in line or "\u2028" in line for line in lines)


def test_the_cli_handler_writes_nothing_when_there_is_no_stderr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under pythonw sys.stderr is None: every request was a handler error."""
    monkeypatch.setattr("sys.stderr", None)
    with audit.request(question="q", handlers=[CLIEventHandler()]) as req:
        req.result = "a"
    assert req.errors == [] and req.completed is True


def test_built_in_handlers_say_how_many_events_their_record_lacks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler that fell behind is not handed the request's newest events; its
    request_end says how many (``RequestEnd.events_dropped``), and the built-in ones
    write it where the request's record ends: a file, a block or a log record that
    looked complete was not."""
    start = RequestStart(question="agent loop", collection="tools")
    end = audit.RequestEnd(result="done", request_id=start.request_id, events_dropped=17)
    stream = io.StringIO()
    file_handler, cli, log = (
        FileEventHandler(tmp_path),
        CLIEventHandler(stream),
        LoggingEventHandler(),
    )
    with caplog.at_level(logging.INFO, logger="instrumentation.audit.events"):
        for handler in (file_handler, cli, log):
            handler.request_end(end, handler.request_start(start))
    missing = "17 event(s) of this request not recorded: this handler fell behind"
    (written,) = tmp_path.glob("*.log")
    assert f"Missing: {missing}" in written.read_text()
    assert missing in stream.getvalue()
    (record,) = [r for r in caplog.records if getattr(r, "audit", {}).get("phase") == "request_end"]
    assert missing in record.getMessage()
    assert cast(Any, record).audit["events_dropped"] == 17
