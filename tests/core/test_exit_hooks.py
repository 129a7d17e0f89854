"""The hooks the interpreter's exit runs before the exit flushes (instrumentation._exit)."""

from __future__ import annotations

import logging
import weakref

import pytest

from instrumentation import _exit, _spans, telemetry
from instrumentation.storage import writer


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


def _ctrl_c() -> None:
    raise KeyboardInterrupt


def test_a_stop_in_an_exit_hook_still_ends_the_exits_last_drain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C in a hook (a handler given a stream's end at exit, say) left the exit's
    last drain unmarked: a span end the collector then put off, past every drain,
    waited for good instead of being made at once."""
    monkeypatch.setattr(_exit, "_hooks", [])
    monkeypatch.setattr(_spans, "_exited", False)
    monkeypatch.setattr(_spans, "_exit_began", False)
    _exit.before_exit_flush(_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        _spans._run_deferred_at_exit()
    assert _spans.ending_now()


def test_a_stop_in_an_exit_hook_leaves_the_store_making_what_was_put_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The storage's exit flush went on to its writers after a Ctrl-C in a hook, but
    without the span ends a collection had put off, which were never stored."""
    monkeypatch.setattr(_exit, "_hooks", [])
    monkeypatch.setattr(writer, "_writers", weakref.WeakSet())
    _exit.before_exit_flush(_ctrl_c)
    made: list[str] = []
    assert _spans.later("span_exit", "put-off", lambda: made.append("made"))
    with caplog.at_level(logging.ERROR, logger="instrumentation.storage"):
        writer._shutdown_all_at_exit()
    assert made == ["made"]
