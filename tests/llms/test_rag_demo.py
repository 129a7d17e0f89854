"""The demo app: importable, and its printed tree shows the LLM calls with tokens."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from instrumentation import BaseEventHandler
from instrumentation.events.base import BaseEvent
from instrumentation.llms import LLMChatInProgressEvent

DEMO = Path(__file__).resolve().parents[2] / "examples" / "rag_demo.py"


def load_demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rag_demo_under_test", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_run_demo_prints_the_tree_with_tokens_and_takes_extra_handlers() -> None:
    """run_demo() answers, streams once, and labels both LLM spans with their tokens."""
    demo = load_demo()

    class Chunks(BaseEventHandler):
        count: int = 0

        def handle(self, event: BaseEvent, **kwargs: Any) -> None:
            if isinstance(event, LLMChatInProgressEvent):
                self.count += 1

    chunks = Chunks()
    out = io.StringIO()
    tree = demo.run_demo(demo.build_app(), out=out, event_handlers=[chunks])
    printed = out.getvalue()
    assert "Paris" in printed and "A (streamed): A span is" in printed
    lines = tree.splitlines()
    assert lines[0].startswith("RagApp.answer ")
    assert any("RagApp.retrieve" in line for line in lines)
    chat = [line for line in lines if "OfflineLLM.chat" in line]
    stream = [line for line in lines if "OfflineLLM.stream_chat" in line]
    assert len(chat) == len(stream) == 1
    assert "tokens]" in chat[0] and "tokens]" in stream[0]
    assert chunks.count > 1
    assert "LLM calls: 2" in printed


def test_demo_runs_as_a_script(tmp_path: Path) -> None:
    """``python examples/rag_demo.py`` (what ``make demo`` runs) records into SQLite and
    prints both traces read back from the file."""
    done = subprocess.run(
        [sys.executable, str(DEMO)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "Trace:" in done.stdout and "OfflineLLM.stream_chat" in done.stdout
    assert (tmp_path / "demo-traces.db").exists()
    read_back = done.stdout.split("Read back from demo-traces.db:", 1)[1]
    assert "RagApp.answer_streaming" in read_back and "OfflineLLM.chat" in read_back
    assert "3 spans" in read_back


def test_demo_ends_with_commands_that_run_as_printed(tmp_path: Path) -> None:
    """The commands the demo suggests last are each a line a shell runs as it is (the
    hint once read ``list | show <trace id> | tail | export``, a shell syntax error)."""
    done = subprocess.run(
        [sys.executable, str(DEMO), "--db", "my traces.db"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    hint = done.stdout.split("More, each a command to run:\n", 1)[1]
    # Each command is a whole line (no trailing comment, which zsh would read as
    # arguments), under the line that says what it does.
    commands = [line.strip() for line in hint.splitlines() if line.startswith("    ")]
    assert "#" not in "".join(commands)
    assert [c.split("'my traces.db'")[1].split()[0] for c in commands] == [
        "list",
        "show",
        "export",
        "tail",
    ]
    for command in commands[:-1]:  # tail follows until Ctrl-C
        ran = subprocess.run(
            ["bash", "-c", command],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=tmp_path,
        )
        assert ran.returncode == 0, (command, ran.stderr)
        assert ran.stdout.strip(), command
