"""The dispatcher tree: placement in any creation order, propagation, thread safety, bad input."""

from __future__ import annotations

import inspect
import threading
from typing import Any

import pytest

from instrumentation import BaseEvent, SimpleSpanHandler, get_dispatcher, root_dispatcher
from instrumentation import dispatcher as dispatcher_module
from instrumentation.event_handlers import BaseEventHandler

from ._support import EventList, fresh


def test_out_of_order_creation_reaches_each_ancestor_once() -> None:
    """Creating a.b.c, then a, then a.b: a.b.c's events reach a.b's, a's and root's handlers once
    each.
    """
    a = fresh("a")
    abc = get_dispatcher(f"{a}.b.c")
    da = get_dispatcher(a)
    dab = get_dispatcher(f"{a}.b")
    assert abc.parent is dab and dab.parent is da and da.parent is root_dispatcher
    seen = {name: EventList() for name in ("abc", "ab", "a", "root")}
    abc.add_event_handler(seen["abc"])
    dab.add_event_handler(seen["ab"])
    da.add_event_handler(seen["a"])
    root_dispatcher.add_event_handler(seen["root"])
    event = BaseEvent()
    abc.event(event)
    for handler in seen.values():
        assert handler.events == [event]
    dab.event(BaseEvent())
    assert [len(h.events) for h in seen.values()] == [1, 2, 2, 2]


def test_siblings_sharing_a_prefix_are_not_ancestors() -> None:
    """'ab' is not the parent of 'a.x', and 'a' created late is not the parent of 'ab.x'."""
    a = fresh("p")
    abx = get_dispatcher(f"{a}b.x")
    ax = get_dispatcher(f"{a}.x")
    da = get_dispatcher(a)
    assert ax.parent is da
    assert abx.parent is root_dispatcher


@pytest.mark.parametrize("prefix", ["r", "ro"])
def test_prefix_of_root_name_gets_its_children(prefix: str) -> None:
    """A dispatcher named 'r' or 'ro' (a prefix of 'root') becomes the parent of its children made
    earlier.
    """
    child = get_dispatcher(f"{prefix}.{fresh()}")
    parent = get_dispatcher(prefix)
    assert child.parent is parent
    assert parent.parent is root_dispatcher
    ev = EventList()
    parent.add_event_handler(ev)
    child.event(BaseEvent())
    assert len(ev.events) == 1


def test_propagate_false_stops_the_walk() -> None:
    """With propagate off on a.b, events from a.b.c reach a.b's handlers but not a's or root's."""
    a = fresh("a")
    da, dab, dabc = get_dispatcher(a), get_dispatcher(f"{a}.b"), get_dispatcher(f"{a}.b.c")
    h_a, h_ab, h_root = EventList(), EventList(), EventList()
    da.add_event_handler(h_a)
    dab.add_event_handler(h_ab)
    root_dispatcher.add_event_handler(h_root)
    dab.propagate = False
    dabc.event(BaseEvent())
    assert (len(h_ab.events), len(h_a.events), len(h_root.events)) == (1, 0, 0)
    dab.propagate = True
    dabc.event(BaseEvent())
    assert (len(h_ab.events), len(h_a.events), len(h_root.events)) == (2, 1, 1)


def test_handler_added_after_decoration_is_seen_and_removed_one_is_not() -> None:
    """The cached handler chain is rebuilt when handlers change, for decorated functions too."""
    d = get_dispatcher(fresh())
    calls = EventList()

    @d.span
    def work() -> int:
        d.event(BaseEvent())
        return 1

    work()
    handler = SimpleSpanHandler()
    root_dispatcher.add_span_handler(handler)
    root_dispatcher.add_event_handler(calls)
    work()
    assert len(handler.completed_spans) == 1 and len(calls.events) == 1
    root_dispatcher.remove_span_handler(handler)
    root_dispatcher.remove_event_handler(calls)
    work()
    assert len(handler.completed_spans) == 1 and len(calls.events) == 1


def test_adding_a_handler_twice_is_a_no_op() -> None:
    """The same handler object attached twice receives each event once."""
    d = get_dispatcher(fresh())
    h = EventList()
    d.add_event_handler(h)
    d.add_event_handler(h)
    d.event(BaseEvent())
    assert len(h.events) == 1


def test_concurrent_creation_gives_one_dispatcher_per_name() -> None:
    """Many threads creating the same names at once all get the same dispatcher for each name."""
    base = fresh("c")
    names = [f"{base}.x.y", f"{base}", f"{base}.x", f"{base}.x.y.z", f"{base}.w"]
    barrier = threading.Barrier(16)
    results: list[dict[str, object]] = []
    lock = threading.Lock()

    def worker(offset: int) -> None:
        barrier.wait()
        got: dict[str, object] = {}
        for i in range(len(names)):
            name = names[(i + offset) % len(names)]
            got[name] = get_dispatcher(name)
        with lock:
            results.append(got)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16
    for name in names:
        assert len({id(r[name]) for r in results}) == 1
    assert get_dispatcher(f"{base}.x.y.z").parent is get_dispatcher(f"{base}.x.y")
    assert get_dispatcher(f"{base}.x.y").parent is get_dispatcher(f"{base}.x")
    assert get_dispatcher(f"{base}.w").parent is get_dispatcher(base)


def test_a_dispatcher_is_linked_and_listening_before_another_thread_can_get_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The lock-free lookup must never hand out a dispatcher that is still being placed."""
    name = f"{fresh('half')}.mod"
    seen = EventList()
    root_dispatcher.add_event_handler(seen)
    manager = dispatcher_module.root_manager
    placing = threading.Event()
    original = manager._fix_parent

    def slow_fix_parent(made: dispatcher_module.Dispatcher) -> None:
        placing.set()
        threading.Event().wait(0.2)  # widen the window in which a half-made one could leak
        original(made)

    monkeypatch.setattr(manager, "_fix_parent", slow_fix_parent)
    maker = threading.Thread(target=get_dispatcher, args=(name,))
    maker.start()
    assert placing.wait(5)
    got = get_dispatcher(name)  # while the other thread is placing it
    parent, listening = got.parent, got.is_listening
    got.event(BaseEvent())
    maker.join()
    assert parent is root_dispatcher
    assert listening
    assert len(seen.events) == 1


def test_dispatching_takes_no_lock() -> None:
    """An event is delivered while another thread holds the tree lock."""
    d = get_dispatcher(fresh())
    h = EventList()
    d.add_event_handler(h)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with dispatcher_module._lock:
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(10)
        done = threading.Event()

        def emit() -> None:
            d.event(BaseEvent())
            done.set()

        threading.Thread(target=emit).start()
        assert done.wait(5), "event() blocked on the tree lock"
    finally:
        release.set()
        t.join()
    assert len(h.events) == 1


@pytest.mark.parametrize("bad", ["", "a..b", ".a", "a.", " a", "a. b"])
def test_bad_names_raise_value_error(bad: str) -> None:
    """Empty or malformed dotted names are refused with a ValueError showing the right form."""
    with pytest.raises(ValueError, match="dot-separated"):
        get_dispatcher(bad)


@pytest.mark.parametrize("bad", [3, None, b"a", ["a"]])
def test_non_string_names_raise_type_error(bad: object) -> None:
    """A name that is not a str is refused with a TypeError saying a str is expected."""
    with pytest.raises(TypeError, match="must be a str"):
        get_dispatcher(bad)  # type: ignore[arg-type]


def test_wrong_handler_types_raise_type_error_with_advice() -> None:
    """Adding a span handler as an event handler (and vice versa, or junk) says what to use
    instead.
    """
    d = get_dispatcher(fresh())
    with pytest.raises(TypeError, match="use add_span_handler"):
        d.add_event_handler(SimpleSpanHandler())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="use add_event_handler"):
        d.add_span_handler(EventList())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="BaseEventHandler"):
        d.add_event_handler(lambda e: None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="BaseSpanHandler"):
        d.add_span_handler(object())  # type: ignore[arg-type]
    # The class where an instance belongs: the message says what to write.
    with pytest.raises(TypeError, match=r"SimpleSpanHandler itself: write SimpleSpanHandler\(\)"):
        d.add_span_handler(SimpleSpanHandler)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"class EventList itself: write EventList\(\)"):
        d.add_event_handler(EventList)  # type: ignore[arg-type]
    # The class of the other kind: the method to use and what to pass it.
    with pytest.raises(
        TypeError, match=r"SimpleSpanHandler itself, a span handler: write add_span_handler\("
    ):
        d.add_event_handler(SimpleSpanHandler)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"an event handler: use add_event_handler\(\)"):
        d.add_span_handler(EventList())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="print, a callable: subclass BaseEventHandler"):
        d.add_event_handler(print)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="True or False"):
        d.propagate = "no"  # type: ignore[assignment]
    with pytest.raises(TypeError, match="BaseEvent"):
        d.event({"not": "an event"})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"the class BaseEvent itself: write BaseEvent\(...\)"):
        d.event(BaseEvent)  # type: ignore[arg-type]
    assert d.event_handlers == [] and d.span_handlers == []


def test_async_handler_hooks_are_refused_when_added() -> None:
    """An ``async def handle`` was called and never awaited: every event was lost, with
    nothing logged or counted. It is refused, saying where async code goes."""

    class AsyncEvents(BaseEventHandler):
        async def handle(self, event: BaseEvent, **kwargs: Any) -> None:  # type: ignore[override]
            return None

    class AsyncSpans(SimpleSpanHandler):
        async def new_span(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
            return None

    class AsyncAhandle(BaseEventHandler):  # ahandle may be async: aevent awaits it
        def handle(self, event: BaseEvent, **kwargs: Any) -> None:
            return None

        async def ahandle(self, event: BaseEvent, **kwargs: Any) -> None:
            return None

    d = get_dispatcher(fresh())
    with pytest.raises(TypeError, match=r"AsyncEvents.handle\(\) is async: .*ahandle\(\)"):
        d.add_event_handler(AsyncEvents())
    with pytest.raises(TypeError, match=r"AsyncSpans.new_span\(\) is async"):
        d.add_span_handler(AsyncSpans())
    with pytest.raises(TypeError, match="is async"):
        dispatcher_module.root_manager.tap(event_handlers=[AsyncEvents()])
    d.add_event_handler(AsyncAhandle())
    assert len(d.event_handlers) == 1 and d.span_handlers == []


def test_tree_and_manual_span_calls_refuse_wrong_types_with_advice() -> None:
    manager = dispatcher_module.root_manager
    with pytest.raises(TypeError, match=r"write get_dispatcher\('x'\)"):
        manager.add_dispatcher("x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a str"):
        manager.parent_name_for(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="takes the Dispatcher at the top"):
        dispatcher_module.Manager(None)  # type: ignore[arg-type]
    d = get_dispatcher(fresh())
    d.add_span_handler(SimpleSpanHandler())
    args = inspect.Signature().bind()
    for call in (d.span_enter, d.span_exit, d.span_drop):
        with pytest.raises(TypeError, match=r"takes the span's id as a str"):
            call(id_=None, bound_args=args)  # type: ignore[arg-type]


def test_manager_dispatchers_shows_dispatchers_only() -> None:
    """``root_manager.dispatchers`` (LlamaIndex's spelling) never hands out the stand-in
    for a missing ancestor, and cannot be changed behind the tree's back.
    """
    manager = dispatcher_module.root_manager
    top = fresh("view")
    leaf = get_dispatcher(f"{top}.mid.leaf")
    assert manager.dispatchers[f"{top}.mid.leaf"] is leaf
    assert f"{top}.mid" not in manager.dispatchers
    assert manager.dispatchers.get(top) is None
    with pytest.raises(KeyError):
        manager.dispatchers[f"{top}.mid"]
    assert all(type(d) is dispatcher_module.Dispatcher for d in manager.dispatchers.values())
    assert not [n for n in manager.dispatchers if n.startswith(f"{top}.mid") and n != leaf.name]
    assert len(manager.dispatchers) == len(list(manager.dispatchers))
    with pytest.raises(TypeError, match="add_dispatcher"):
        manager.dispatchers[top] = leaf  # type: ignore[index]
    made = get_dispatcher(top)
    assert manager.dispatchers[top] is made and leaf.parent is made


def test_manager_dispatchers_can_be_walked_while_dispatchers_are_made() -> None:
    manager = dispatcher_module.root_manager
    top = fresh("walk")
    stop = threading.Event()

    def make() -> None:
        # Bounded: the tree outlives the test, and later tests change handlers on it.
        for i in range(3000):
            if stop.is_set():
                break
            get_dispatcher(f"{top}.n{i}.x")

    maker = threading.Thread(target=make)
    maker.start()
    try:
        for _ in range(200):
            names = list(manager.dispatchers)
            assert all(manager.dispatchers[n].name == n for n in names)
    finally:
        stop.set()
        maker.join()


def test_a_dispatcher_placed_with_handlers_reaches_every_dispatcher_below_it() -> None:
    """``Dispatcher(name, span_handlers=[...], manager=root_manager)`` over a tree that
    has dispatchers two levels below it (one made after its child): all reach it."""
    from instrumentation import Dispatcher, root_manager
    from instrumentation.span_handlers import SimpleSpanHandler

    top = fresh("placed")
    get_dispatcher(f"{top}.b")
    leaf = get_dispatcher(f"{top}.b.c.d")  # hangs from .b: no placeholder at top knows it
    handler = SimpleSpanHandler()
    Dispatcher(top, span_handlers=[handler], manager=root_manager)

    @leaf.span
    def work() -> int:
        return 1

    work()
    assert [s.name for s in handler.completed_spans] == [work.__qualname__]
    quiet = get_dispatcher(f"{top}.q")
    below = get_dispatcher(f"{top}.q.r.s")
    quiet_handler = SimpleSpanHandler()
    quiet.add_span_handler(quiet_handler)
    quiet.propagate = False
    hand_made = Dispatcher(f"{top}.q.r", propagate=False, manager=root_manager)
    assert below.parent is hand_made

    @below.span
    def inner() -> int:
        return 2

    inner()
    assert not quiet_handler.completed_spans and len(handler.completed_spans) == 1


class _Note(BaseEvent):
    text: str = ""


def _emit_in_child(d: Any, results: Any) -> None:
    """Run in a process started with spawn: emit through the dispatcher it was given."""
    try:
        seen = EventList()
        root_dispatcher.add_event_handler(seen)
        d.event(_Note(text="from the child"))
        results.put((d is get_dispatcher(d.name), len(seen.events)))
    except BaseException as exc:
        results.put(repr(exc))


def test_a_dispatcher_handed_to_a_spawned_process_is_that_process_s_own() -> None:
    """Pickled slot by slot, a dispatcher given to a process started with spawn (the
    default on macOS and Windows) came back detached, its events reaching no handler;
    with a storage handler on it, it could not be pickled at all. It is pickled by
    name now, as logging.Logger is: copies are the dispatcher itself."""
    import copy
    import multiprocessing
    import pickle

    d = get_dispatcher("tests.core.spawned")
    d.add_event_handler(_Locked())  # as a storage handler does: a lock, not picklable
    assert pickle.loads(pickle.dumps(d)) is d and copy.deepcopy(d) is d
    assert pickle.loads(pickle.dumps(root_dispatcher)) is root_dispatcher
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_emit_in_child, args=(d, results))
    child.start()
    try:
        assert results.get(timeout=120) == (True, 1)
    finally:
        child.join(30)
    assert child.exitcode == 0
    detached = dispatcher_module.Dispatcher("tests.core.detached")  # not in the tree
    assert pickle.loads(pickle.dumps(detached)) is not detached


class _Locked(BaseEventHandler):
    def model_post_init(self, __context: Any) -> None:
        self.__dict__["lock"] = threading.Lock()

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        return None
