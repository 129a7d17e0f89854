"""What the test kit's blocks put back at their end: what was changed during them,
but not what other blocks changed in their own context, a module's import set up, or
``keep_changes()`` kept."""

from __future__ import annotations

import asyncio
import gc
import importlib
import threading
import uuid
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from instrumentation import (
    BaseEvent,
    Dispatcher,
    SimpleSpanHandler,
    Thread,
    get_dispatcher,
    root_dispatcher,
)
from instrumentation.dispatcher import root_manager
from instrumentation.testing import capture_events, capture_spans, isolated, keep_changes

from ._support import EventList, fresh

BLOCKS: dict[str, Callable[[], AbstractContextManager[Any]]] = {
    "capture_events": capture_events,
    "capture_spans": capture_spans,
    "isolated": isolated,
}


@pytest.fixture(params=list(BLOCKS))
def block(request: pytest.FixtureRequest) -> Callable[[], AbstractContextManager[Any]]:
    return BLOCKS[request.param]


@pytest.fixture
def d() -> Dispatcher:
    return get_dispatcher(fresh())


def in_thread(work: Callable[[], None]) -> None:
    """Run ``work`` on a plain thread (an empty context: not the block's) and wait."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # pragma: no cover - reported below
            failed.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert not failed, failed


def test_what_a_plain_thread_changes_during_a_block_is_undone_with_it(
    block: Callable[[], AbstractContextManager[Any]], d: Dispatcher
) -> None:
    """A plain thread starts from an empty context, in no block's: what it changes is
    every open block's (the code under test may have started it), unless it was made
    in ``keep_changes()``."""
    before, late, kept = EventList(), EventList(), EventList()
    d.add_event_handler(before)

    def elsewhere() -> None:
        root_dispatcher.add_event_handler(late)
        d.remove_event_handler(before)
        d.propagate = False
        with keep_changes():
            d.add_event_handler(kept)

    with block():
        in_thread(elsewhere)
    assert root_dispatcher.event_handlers == []
    assert d.event_handlers == [kept, before] and d.propagate is True


def test_what_the_block_changes_is_undone(
    block: Callable[[], AbstractContextManager[Any]], d: Dispatcher
) -> None:
    """In the block's thread, in its tasks and in threads that carry its context, on a
    dispatcher made before the block or in it (not by a module's import)."""
    kept, added, spans = EventList(), EventList(), SimpleSpanHandler()
    d.add_event_handler(kept)
    with block():
        d.remove_event_handler(kept)
        d.event_handlers.append(added)
        d.span_handlers = [spans]
        d.propagate = False
        made = get_dispatcher(fresh("made"))
        made.add_event_handler(added)
        made.propagate = False

        async def in_a_task() -> None:
            root_dispatcher.add_event_handler(added)

        asyncio.run(in_a_task())
        carried = Thread(target=lambda: root_dispatcher.add_span_handler(spans))
        carried.start()
        carried.join(10)
        assert added in root_dispatcher.event_handlers
        assert spans in root_dispatcher.span_handlers
    assert d.event_handlers == [kept] and d.span_handlers == [] and d.propagate is True
    assert made.event_handlers == [] and made.propagate is True
    assert root_dispatcher.event_handlers == [] and root_dispatcher.span_handlers == []


def test_a_handler_detached_in_the_block_goes_back_where_it_was(
    block: Callable[[], AbstractContextManager[Any]], d: Dispatcher
) -> None:
    """Handlers run in list order: one put back at the end of its list ran after those
    it used to run before, in every later test. Each goes back between the same
    neighbours, whatever else was detached with it (in any order) or kept meanwhile;
    the tree's taps too."""
    a, b, c, kept = EventList(), EventList(), EventList(), EventList()
    sa, sb = SimpleSpanHandler(), SimpleSpanHandler()
    for handler in (a, b, c):
        d.add_event_handler(handler)
    d.span_handlers = [sa, sb]
    root_manager._update_taps(events_in=(a, b))
    try:
        with block():
            d.remove_event_handler(b)
            d.remove_event_handler(a)
            d.remove_span_handler(sa)
            root_manager._update_taps(events_out=(a,))
            with keep_changes():
                d.add_event_handler(kept)
        # By identity: handlers of one class with the same fields compare equal.
        assert list(map(id, d.event_handlers)) == list(map(id, [a, b, c, kept]))
        assert list(map(id, d.span_handlers)) == list(map(id, [sa, sb]))
        assert list(map(id, root_manager.tap_event_handlers)) == list(map(id, [a, b]))
        with block():
            d.event_handlers.clear()
        assert list(map(id, d.event_handlers)) == list(map(id, [a, b, c, kept]))
    finally:
        root_manager._update_taps(events_out=(a, b))


async def test_a_change_made_in_keep_changes_stays(d: Dispatcher) -> None:
    """What the docs offer for set-up done lazily in a test that must outlive it (in
    the block's tasks too); a thread from ``asyncio.to_thread`` carries the block's
    context, so its change is the block's."""
    kept, kept_in_task, undone = EventList(), EventList(), EventList()

    async def set_up() -> None:
        d.add_event_handler(kept_in_task)

    with capture_events():
        with keep_changes():
            d.add_event_handler(kept)
            await asyncio.create_task(set_up())
        await asyncio.to_thread(d.add_event_handler, undone)
        assert d.event_handlers == [kept, kept_in_task, undone]
    assert d.event_handlers == [kept, kept_in_task]


def test_keep_changes_keeps_after_a_block_nested_in_it_ends(
    block: Callable[[], AbstractContextManager[Any]], d: Dispatcher
) -> None:
    """A block that ended inside ``keep_changes()`` left the context in no block's, so
    what ``keep_changes()`` changed after it went to the blocks around it, which undid
    it."""
    kept, undone = EventList(), EventList()
    with capture_events():
        with keep_changes():
            with block():
                d.add_event_handler(undone)
            d.add_event_handler(kept)
        assert d.event_handlers == [kept]
    assert d.event_handlers == [kept]


@pytest.mark.parametrize("kind", [Thread, threading.Thread], ids=["carrying", "plain"])
def test_a_thread_outliving_its_block_changes_later_blocks_as_a_plain_one(
    kind: type[threading.Thread], d: Dispatcher
) -> None:
    """A thread started in a block with a copy of its context, still running in a later
    block: what it changes then is undone by that block, as a plain thread's change
    is. It went into the ended block's journal, which adds nothing, and a handler it
    detached stayed detached for every later test."""
    base = EventList()
    d.add_event_handler(base)
    go, done = threading.Event(), threading.Event()

    def later() -> None:
        go.wait(10)
        d.remove_event_handler(base)
        d.propagate = False
        done.set()

    with capture_events():
        thread = kind(target=later)
        thread.start()
    with capture_events():
        go.set()
        assert done.wait(10)
    thread.join(10)
    assert d.event_handlers == [base] and d.propagate is True


def test_a_handler_attached_and_detached_many_times_is_forgotten(d: Dispatcher) -> None:
    """A block that attaches and detaches handlers per request keeps nothing of them."""
    with isolated():
        from instrumentation.testing import _journals

        (journal,) = _journals.get()
        for _ in range(100):
            handler = EventList()
            d.add_event_handler(handler)
            d.remove_event_handler(handler)
        assert all(not moved for _, _, moved in journal.handlers.values())


def test_throwaway_dispatchers_changed_and_changed_back_are_not_kept() -> None:
    """Each dispatcher whose handlers changed and changed back kept an empty entry in
    the journal, and with it the dispatcher, for as long as the block lasted."""
    import gc
    import weakref

    handler = EventList()
    with isolated():
        from instrumentation.testing import _journals

        (journal,) = _journals.get()
        made = []
        for i in range(100):
            throwaway = Dispatcher(fresh(f"throwaway{i}_"))
            throwaway.add_event_handler(handler)
            throwaway.remove_event_handler(handler)
            made.append(weakref.ref(throwaway))
        del throwaway
        gc.collect()
        assert journal.handlers == {}
        assert all(ref() is None for ref in made)


def test_throwaway_dispatchers_left_changed_are_not_kept(
    block: Callable[[], AbstractContextManager[Any]],
) -> None:
    """A dispatcher made by hand per request, given handlers of its own and
    ``propagate = False``, then dropped: the block's journal held it and its handlers
    (their spans too) until the block ended, to put back what nothing used any more."""
    with block():
        from instrumentation.testing import _journals

        journals = _journals.get() or ()
        made = []
        for i in range(100):
            throwaway = Dispatcher(fresh(f"request{i}_"))
            handler = SimpleSpanHandler()
            throwaway.add_span_handler(handler)
            throwaway.add_event_handler(EventList())
            throwaway.propagate = False
            with throwaway.span("work"):
                pass
            made += [weakref.ref(throwaway), weakref.ref(handler)]
        del throwaway, handler
        gc.collect()
        assert [ref for ref in made if ref() is not None] == []
        assert journals and all(not j.handlers and not j.flags for j in journals)


def test_shutdown_in_the_block_puts_the_handlers_back_closed_in_order(d: Dispatcher) -> None:
    closed: list[str] = []

    class Closing(EventList):
        def close(self) -> None:
            closed.append(self.name)

        name: str = ""

    first, second = Closing(name="first"), Closing(name="second")
    d.add_event_handler(first)
    d.add_event_handler(second)
    with isolated() as cap:
        root_dispatcher.shutdown()
        d.event(BaseEvent())
    assert closed == ["first", "second"] and cap.events == []
    assert d.event_handlers == [first, second]
    assert root_manager.tap_event_handlers == () and root_manager.tap_span_handlers == ()


def test_a_module_imported_in_the_block_keeps_what_it_set_up(
    block: Callable[[], AbstractContextManager[Any]],
    d: Dispatcher,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A module sets up at its import, once in a process: a handler it attaches to a
    dispatcher made before (the root, by ``record_to()`` say) and a ``propagate`` it
    turns off stay, or later tests depend on which test imported it first. What the
    block itself does around the import is undone all the same."""
    name = f"imported_in_block_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(
        "from instrumentation import get_dispatcher\n"
        "from instrumentation.event_handlers import NullEventHandler\n"
        "own = NullEventHandler()\n"
        "\n"
        "def set_up():\n"
        "    get_dispatcher().add_event_handler(own)\n"
        "\n"
        f"set_up()\n"
        f"get_dispatcher({d.name!r}).propagate = False\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    mine = EventList()
    with block():
        d.add_event_handler(mine)
        module = importlib.import_module(name)
    assert root_dispatcher.event_handlers == [module.own]
    assert d.propagate is False and d.event_handlers == []


def test_blocks_in_two_threads_at_once_each_undo_their_own(d: Dispatcher) -> None:
    """The first block to end used to put the root's list back as it was when it
    started, taking off the handler the other thread's block had attached (and was
    still using)."""
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    h1, h2 = EventList(), EventList()
    seen: dict[str, Any] = {}

    def first() -> None:
        with isolated() as cap:
            root_dispatcher.add_event_handler(h1)
            first_in.set()
            second_in.wait(10)
        seen["first"] = len(cap.events)
        first_out.set()

    def second() -> None:
        first_in.wait(10)
        with isolated() as cap:
            root_dispatcher.add_event_handler(h2)
            second_in.set()
            first_out.wait(10)
            seen["root after the first"] = root_dispatcher.event_handlers
            d.event(BaseEvent())
        seen["second"] = len(cap.events)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == {"first": 0, "root after the first": [h2], "second": 1}
    assert len(h2.events) == 1 and h1.events == []
    assert root_dispatcher.event_handlers == [] and root_manager.tap_event_handlers == ()


def test_nested_blocks_each_undo_their_own(d: Dispatcher) -> None:
    outer_handler, inner_handler = EventList(), EventList()
    with capture_events() as outer, isolated():
        d.add_event_handler(outer_handler)
        with capture_spans(d), capture_events(d) as inner:
            d.add_event_handler(inner_handler)
            d.event(BaseEvent())
        assert d.event_handlers == [outer_handler]
        d.event(BaseEvent())
    assert len(outer) == 2 and len(inner) == 1
    assert len(outer_handler.events) == 2 and len(inner_handler.events) == 1
    assert d.event_handlers == [] and d.span_handlers == []
    assert root_dispatcher.event_handlers == [] and root_manager.tap_event_handlers == ()


def test_the_fixture_undoes_the_test_and_its_threads(tmp_path: Path) -> None:
    """The pytest fixture: what a test did is undone before the next test, in the
    threads it started too; what it did in ``keep_changes()`` stays."""
    import subprocess
    import sys
    import textwrap

    (tmp_path / "test_kit_fixture.py").write_text(
        textwrap.dedent(
            """
            import threading
            from instrumentation import get_dispatcher, root_dispatcher
            from instrumentation.testing import RecordingEventHandler, keep_changes

            d = get_dispatcher("kit.app")
            module_handler, lazy = RecordingEventHandler(), RecordingEventHandler()
            d.add_event_handler(module_handler)

            def test_first(instrumentation_capture):
                d.remove_event_handler(module_handler)
                d.add_event_handler(RecordingEventHandler())
                d.propagate = False
                worker = threading.Thread(
                    target=lambda: root_dispatcher.add_event_handler(RecordingEventHandler())
                )
                worker.start()
                worker.join()
                with keep_changes():
                    root_dispatcher.add_event_handler(lazy)

            def test_second(instrumentation_capture):
                assert d.event_handlers == [module_handler] and d.propagate is True
                assert root_dispatcher.event_handlers == [lazy]
            """
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_kit_fixture.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout
