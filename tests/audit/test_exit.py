"""What happens to audit requests when the interpreter exits, and in a process's first one.

Each test runs a small script in a fresh interpreter: a real exit (its hooks, in
CPython's order) and a real first request (the audit loop's threads not started yet).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

COMMON = """
import atexit, logging, sys, threading
from instrumentation import audit, get_dispatcher, telemetry
from instrumentation.audit import EventHandler, runner

logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="LOG %(message)s")
# Registered before any request, so it runs after the library's own exit hooks.
atexit.register(
    lambda: print("unfinished", telemetry.counter("audit.exit_unfinished").value, flush=True)
)


printing = threading.Lock()  # handlers of different requests run concurrently


class Printer(EventHandler):
    \"\"\"Plain def methods; prints when a request's last call ran.\"\"\"

    def request_start(self, user_request):
        return user_request.question

    def event_start(self, event, request_context):
        return None

    def event_end(self, event, request_context, event_context):
        pass

    def request_end(self, output, request_context):
        with printing:
            print("done", request_context, output.result, flush=True)


dispatcher = get_dispatcher("app")


@dispatcher.span(request=True)
def ask(question):
    return "answer to " + question
"""


def _run(tmp_path: Path, body: str, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    script = tmp_path / "app.py"
    script.write_text(COMMON + textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    began = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    return proc, time.monotonic() - began


FIRE_AND_FORGET = """
gate = threading.Event()


class Gated(Printer):
    def request_start(self, user_request):
        if user_request.question == "last":
            gate.wait()  # still running when the interpreter begins to exit
        return super().request_start(user_request)


audit.attach(dispatcher, [Gated()], timeout=0)
for number in range(5):
    ask(str(number))
ask("last")
# The interpreter's first exit step (threading's exit hooks, last registered first, so
# this one before the library's and before concurrent.futures' stops its executors).
threading._register_atexit(gate.set)
"""


def test_fire_and_forget_requests_in_flight_at_exit_are_finished(tmp_path: Path) -> None:
    proc, _ = _run(tmp_path, FIRE_AND_FORGET)
    assert proc.returncode == 0, proc.stderr
    done = [line for line in proc.stdout.splitlines() if line.startswith("done")]
    assert sorted(done) == sorted(
        [f"done {n} answer to {n}" for n in range(5)] + ["done last answer to last"]
    ), proc.stdout + proc.stderr
    assert "cannot schedule new futures" not in proc.stderr
    assert "LOG" not in proc.stderr, proc.stderr
    assert proc.stdout.splitlines()[-1] == "unfinished 0"


NON_DAEMON_THREAD = """
audit.attach(dispatcher, [Printer()], timeout=0)


def late():
    threading.main_thread().join()  # the main thread is done: the interpreter is exiting
    ask("late")


threading.Thread(target=late).start()
ask("early")
"""


def test_requests_a_non_daemon_thread_ends_during_exit_are_finished(tmp_path: Path) -> None:
    """Such a thread runs on after every ThreadPoolExecutor has stopped taking work."""
    proc, _ = _run(tmp_path, NON_DAEMON_THREAD)
    assert proc.returncode == 0, proc.stderr
    done = [line for line in proc.stdout.splitlines() if line.startswith("done")]
    assert sorted(done) == ["done early answer to early", "done late answer to late"], (
        proc.stdout + proc.stderr
    )
    assert "LOG" not in proc.stderr, proc.stderr
    assert proc.stdout.splitlines()[-1] == "unfinished 0"


UNFINISHABLE = """
runner.EXIT_FLUSH_SECONDS = 0.5
never = threading.Event()


class Stuck(Printer):
    def request_end(self, output, request_context):
        if request_context == "stuck":
            never.wait()
        super().request_end(output, request_context)


handler = Stuck()
audit.attach(dispatcher, [handler], timeout=0)
ask("fine")
ask("stuck")

inside = threading.Event()


def daemon():
    with audit.request(question="open", handlers=[handler]):
        inside.set()
        never.wait()


threading.Thread(target=daemon, daemon=True).start()
inside.wait()
"""


def test_what_the_exit_cannot_finish_in_its_budget_is_logged_and_counted(
    tmp_path: Path,
) -> None:
    proc, took = _run(tmp_path, UNFINISHABLE)
    assert proc.returncode == 0, proc.stderr
    assert "done fine answer to fine" in proc.stdout
    assert "done stuck" not in proc.stdout
    assert proc.stdout.splitlines()[-1] == "unfinished 2", proc.stdout + proc.stderr
    logs = [line for line in proc.stderr.splitlines() if line.startswith("LOG")]
    assert len(logs) == 2, proc.stderr
    assert "1 request(s) whose handler calls had not all run" in logs[0]
    assert "EXIT_FLUSH_SECONDS, 0.5s" in logs[0] and "(Stuck)" in logs[0]
    assert "1 request(s) not ended" in logs[1] and "(Stuck)" in logs[1]
    assert took < 30  # the stuck handler does not hold the exit beyond the budget


FIRST_REQUEST = """
import time
from instrumentation.audit import _loop

STARTUP = 0.5
started = _loop.AuditLoop._start


def slow_start(self):
    time.sleep(STARTUP)  # stands for a slow start-up of the library's threads
    return started(self)


_loop.AuditLoop._start = slow_start


class Times(Printer):
    def request_start(self, user_request):
        return user_request.started_at

    def request_end(self, output, request_context):
        wall = (output.ended_at - request_context).total_seconds()
        with printing:
            print(f"times {output.duration_s:.6f} {wall:.6f}", flush=True)


if sys.argv[1] == "request":
    with audit.request(question="first", handlers=[Times()]) as req:
        pass
    assert req.start.started_at == req._run.start.started_at
else:
    audit.attach(dispatcher, [Times()])
    ask("first")
"""


@pytest.mark.parametrize("how", ["request", "adapter"])
def test_the_first_request_does_not_count_the_library_start_up(tmp_path: Path, how: str) -> None:
    proc, _ = _run(tmp_path, FIRST_REQUEST, how)
    assert proc.returncode == 0, proc.stderr
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("times")]
    duration_s, wall_s = (float(part) for part in line.split()[1:])
    # The request's own work is nothing: well under the half second the start-up took.
    assert duration_s < 0.25, line
    assert wall_s < 0.25, line  # RequestStart.started_at too is after the start-up


def test_requests_the_last_collection_closes_at_exit_do_not_hold_it_up() -> None:
    """A request left open in a generator that only a reference cycle keeps is closed
    by the collection after the exit's flush: no loop runs its handlers any more, and
    its end waited its whole ``timeout`` for them."""
    code = textwrap.dedent(
        """
        from instrumentation import audit

        class H(audit.EventHandler):
            def request_start(self, r): return None
            def event_start(self, e, c): return None
            def event_end(self, e, c, ec): pass
            def request_end(self, o, c): pass

        def answer():
            with audit.request("q", handlers=[H()], timeout=60):
                yield "a"
                yield "b"

        g = answer()
        next(g)
        cycle = [g, None]
        cycle[1] = cycle
        del g, cycle
        print("main done", flush=True)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["main done"]
