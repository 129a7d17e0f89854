"""A forked child keeps working: the tree lock is re-created and ids differ from the parent's."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest
from forking import in_child

from instrumentation import SimpleSpanHandler, get_dispatcher, telemetry
from instrumentation import dispatcher as dispatcher_module
from instrumentation._ids import new_span_hex, new_trace_id
from instrumentation.events import BaseEvent
from instrumentation.testing import RecordingEventHandler

from ._support import fresh

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@needs_fork
@pytest.mark.timeout(60)
def test_fork_child_works_while_parent_thread_holds_the_locks() -> None:
    """Forking while another thread holds the tree and telemetry locks: the child still makes
    dispatchers, counts and traces, with ids that differ from the parent's.
    """
    name = fresh("fork")
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with dispatcher_module._lock, telemetry._registry_lock, telemetry.SPANS_STARTED._lock:
            held.set()
            release.wait(30)

    def child_work() -> dict[str, Any]:
        d = get_dispatcher(f"{name}.child")
        h = SimpleSpanHandler()
        d.add_span_handler(h)

        @d.span
        def work() -> int:
            return 1

        work()
        telemetry.counter(f"{name}.in_child").add(2)
        telemetry.SPANS_STARTED.add(1)
        telemetry.report_handler_error(h, "test", "fork", RuntimeError("x"))
        assert telemetry.handler_errors()["SimpleSpanHandler"] >= 1
        (span,) = h.completed_spans
        return {
            "hex": [new_span_hex() for _ in range(5)],
            "trace": new_trace_id(),
            "span_trace": span.trace_id,
            "parent": d.parent.name if d.parent else None,
        }

    # Fill the id pools before forking: a child that kept them would hand out the
    # same ids as the parent.
    new_span_hex()
    new_trace_id()
    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(10)
    try:
        child = in_child(child_work)
        mine = {"hex": [new_span_hex() for _ in range(5)], "trace": new_trace_id()}
    finally:
        release.set()
        holder.join()
    assert set(child["hex"]).isdisjoint(mine["hex"])
    assert child["trace"] != mine["trace"] and len(child["span_trace"]) == 32
    assert child["parent"] == "root"


@needs_fork
@pytest.mark.timeout(60)
def test_forked_child_counts_from_zero() -> None:
    """A child's counters hold only what the child counted, not the parent's figures."""
    name = fresh("forkcount")
    mine = telemetry.counter(f"{name}.count")
    mine.add(5)
    telemetry.report_handler_error(object(), "handle", "fork", RuntimeError("parent"))
    assert telemetry.handler_errors()["object"] >= 1

    def child_counts() -> dict[str, Any]:
        before = {"mine": mine.value, "errors": telemetry.handler_errors()}
        mine.inc()
        telemetry.report_handler_error(object(), "handle", "fork", RuntimeError("child"))
        return {
            "before": before,
            "after": {"mine": mine.value, "errors": telemetry.handler_errors()},
        }

    child = in_child(child_counts)
    assert child["before"] == {"mine": 0, "errors": {}}
    assert child["after"] == {"mine": 1, "errors": {"object": 1}}
    # The parent keeps its own figures.
    assert mine.value == 5


@needs_fork
@pytest.mark.timeout(60)
def test_fork_during_a_handler_change_leaves_no_chain_half_rebuilt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fork while another thread attaches a handler waits for the chains below to be
    rebuilt: the child's tree says the handler is attached, so its events reach it.
    (The fork came between the handler list and the rebuild of the chains below, and
    the child's dispatchers below kept their old chains.)"""
    name = fresh("forkchange")
    top = get_dispatcher(name)
    leaf = get_dispatcher(f"{name}.leaf")
    recorder = RecordingEventHandler()
    rebuilding = threading.Event()
    real_rebuild = dispatcher_module.Dispatcher._rebuild

    def slow_rebuild(self: Any, shared: Any = None) -> None:
        if self is leaf and not rebuilding.is_set():
            rebuilding.set()
            time.sleep(0.5)  # the fork comes here, between top's chain and leaf's
        real_rebuild(self, shared)

    monkeypatch.setattr(dispatcher_module.Dispatcher, "_rebuild", slow_rebuild)
    changer = threading.Thread(target=top.add_event_handler, args=(recorder,))
    changer.start()
    try:
        assert rebuilding.wait(10)

        def child_work() -> dict[str, Any]:
            attached = any(h is recorder for h in top._event_handlers)
            leaf.event(BaseEvent())
            return {"attached": attached, "received": len(recorder.events)}

        child = in_child(child_work)
    finally:
        changer.join()
        top.remove_event_handler(recorder)
    assert child == {"attached": True, "received": 1}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("which", ["tree", "drain"])
def test_a_fork_whose_wait_times_out_does_not_keep_another_forks_lock(which: str) -> None:
    """Two threads fork at once, the first slowly (another library's before-fork hook,
    the import lock): the second's wait for the lock the first holds for its fork
    timed out and cleared a flag both shared, and the first's fork then never let go
    of the lock (the tree's: every later handler change waited for ever; the drain's:
    no put-off end ran again)."""
    from instrumentation import _spans

    if which == "tree":
        before = dispatcher_module._take_locks_before_fork
        after = dispatcher_module._release_locks_after_fork_in_parent
        lock: Any = dispatcher_module._lock
    else:
        before, after, lock = _spans.before_fork, _spans.after_fork_in_parent, _spans._draining
    first_holds, second_done = threading.Event(), threading.Event()

    def first() -> None:
        before()
        first_holds.set()
        assert second_done.wait(10)  # its fork goes on while the second's wait times out
        after()

    def second() -> None:
        assert first_holds.wait(10)
        before()  # waits 1 s for the lock the first holds, and gives up
        second_done.set()
        after()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    free = lock.acquire(timeout=2)
    if free:
        lock.release()
    assert free
