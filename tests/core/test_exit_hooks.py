"""The hooks the interpreter's exit runs before the exit flushes (instrumentation._exit)."""

from __future__ import annotations

import logging

import pytest

from instrumentation import _exit, telemetry


def test_a_failing_exit_hook_is_logged_and_counted_and_the_others_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_exit, "_hooks", [])
    ran: list[str] = []

    def broken() -> None:
        raise RuntimeError("hook bug")

    _exit.before_exit_flush(broken)
    _exit.before_exit_flush(lambda: ran.append("after"))
    with caplog.at_level(logging.ERROR, logger="instrumentation"):
        _exit.run_exit_hooks()
        _exit.run_exit_hooks()  # each exit flush runs them: the hooks find their work done
    assert ran == ["after", "after"]
    assert telemetry.counter("exit.hook_errors").value == 2
    logged = [r.exc_info for r in caplog.records if "exit hook" in r.getMessage()]
    assert [str(info[1]) for info in logged if info] == ["hook bug", "hook bug"]
