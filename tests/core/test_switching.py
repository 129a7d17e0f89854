"""Code written for LlamaIndex's instrumentation runs with its imports changed.

Each test is a pattern found in LlamaIndex's own code or its users', that used to
fail or lose spans here.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

import instrumentation as instrument
from instrumentation import get_dispatcher, root_dispatcher, telemetry
from instrumentation.event_handlers import BaseEventHandler
from instrumentation.events import BaseEvent
from instrumentation.span import SimpleSpan
from instrumentation.span_handlers import BaseSpanHandler, SimpleSpanHandler


class Counting(BaseEventHandler):
    seen: int = 0

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        self.seen += 1


def test_handler_lists_can_be_changed_in_place() -> None:
    """``root.span_handlers.append(h)`` / ``.remove(h)``, as LlamaIndex's tests do."""
    d = get_dispatcher("switching.lists")
    counting = Counting()
    root_dispatcher.event_handlers.append(counting)
    d.event(BaseEvent())
    assert counting.seen == 1 and root_dispatcher.event_handlers == [counting]
    root_dispatcher.event_handlers.remove(counting)
    d.event(BaseEvent())
    assert counting.seen == 1 and root_dispatcher.event_handlers == []

    spans = SimpleSpanHandler()
    d.span_handlers += [spans]
    with d.span("block"):
        pass
    assert [s.name for s in spans.completed_spans] == ["block"]
    d.span_handlers.clear()
    with d.span("unseen"):
        pass
    assert len(spans.completed_spans) == 1


def test_a_handler_list_applies_changes_to_the_current_handlers() -> None:
    """A list read before another change does not undo that change."""
    d = get_dispatcher("switching.stale")
    first, second = Counting(), Counting()
    held = d.event_handlers
    d.add_event_handler(first)
    held.append(second)
    assert d.event_handlers == [first, second] and held == [first, second]
    d.event(BaseEvent())
    assert (first.seen, second.seen) == (1, 1)


def test_a_handler_list_refuses_what_is_not_a_handler() -> None:
    d = get_dispatcher("switching.refuse")
    with pytest.raises(TypeError, match="BaseSpanHandler"):
        d.span_handlers.append(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="BaseEventHandler"):
        d.event_handlers.insert(0, SimpleSpanHandler())  # type: ignore[arg-type]
    assert d.span_handlers == [] and d.event_handlers == []


def test_a_subclass_of_simple_span_handler_receives_the_arguments() -> None:
    """SimpleSpanHandler skips binding arguments it never reads; a subclass may read them."""
    seen: list[dict[str, Any]] = []

    class WithArgs(SimpleSpanHandler):
        def new_span(
            self,
            id_: str,
            bound_args: inspect.BoundArguments,
            instance: Any | None = None,
            parent_span_id: str | None = None,
            tags: dict[str, Any] | None = None,
            **kwargs: Any,
        ) -> SimpleSpan:
            seen.append(dict(bound_args.arguments))
            return super().new_span(id_, bound_args, instance, parent_span_id, tags, **kwargs)

    root_dispatcher.add_span_handler(WithArgs())
    d = get_dispatcher("switching.args")

    @d.span
    def add(a: int, b: int = 2) -> int:
        return a + b

    add(1, b=5)
    assert seen == [{"a": 1, "b": 5}]


def test_a_span_enter_override_without_kwargs_still_sees_every_span() -> None:
    """The dispatcher's extra keywords (name, trace_id, ...) go only where they are taken."""
    entered: list[str] = []

    class GuideOnly(SimpleSpanHandler):
        def span_enter(  # type: ignore[override]
            self,
            id_: str,
            bound_args: inspect.BoundArguments,
            instance: Any | None = None,
            parent_id: str | None = None,
            tags: dict[str, Any] | None = None,
        ) -> None:
            entered.append(id_)
            super().span_enter(id_, bound_args, instance, parent_id, tags)

    handler = GuideOnly()
    root_dispatcher.add_span_handler(handler)
    d = get_dispatcher("switching.enter")

    @d.span
    def work() -> None:
        pass

    work()
    no_args = inspect.signature(lambda: None).bind()
    d.span_enter("manual-1", bound_args=no_args)
    d.span_exit("manual-1", bound_args=no_args)
    assert len(entered) == 2 and telemetry.HANDLER_ERRORS.value == 0
    assert sorted(s.name or "" for s in handler.completed_spans) == sorted(
        ["manual", work.__qualname__]
    )


def test_prepare_methods_run_for_spans_new_span_did_not_keep() -> None:
    """As in LlamaIndex: a handler whose new_span returns None still hears of the end."""
    ends: list[str] = []

    class EndsOnly(BaseSpanHandler[SimpleSpan]):
        def new_span(self, *args: Any, **kwargs: Any) -> None:
            return None

        def prepare_to_exit_span(self, id_: str, *args: Any, **kwargs: Any) -> None:
            ends.append("exit")

        def prepare_to_drop_span(self, id_: str, *args: Any, **kwargs: Any) -> None:
            ends.append("drop")

    root_dispatcher.add_span_handler(EndsOnly())
    d = get_dispatcher("switching.ends")

    @d.span
    def fine() -> None:
        pass

    @d.span
    def broken() -> None:
        raise ValueError("no")

    fine()
    with pytest.raises(ValueError):
        broken()
    assert ends == ["exit", "drop"]


def test_llamaindex_module_paths_and_names_import() -> None:
    from instrumentation.base import BaseEvent as BaseEventAgain
    from instrumentation.base import BaseInstrumentationHandler
    from instrumentation.base.event import BaseEvent as BaseEventThere
    from instrumentation.base_handler import BaseInstrumentationHandler as CoreSpelling
    from instrumentation.dispatcher import (
        DISPATCHER_SPAN_DECORATED_ATTR,
        EventDispatcher,
        active_instrument_tags,
    )
    from instrumentation.span_handlers.base import Thread
    from instrumentation.threads import Thread as OurThread

    assert BaseEventAgain is BaseEvent is BaseEventThere and Thread is OurThread
    assert CoreSpelling is BaseInstrumentationHandler
    # The top level has what LlamaIndex's has.
    assert instrument.DISPATCHER_SPAN_DECORATED_ATTR == DISPATCHER_SPAN_DECORATED_ATTR
    assert instrument.base.BaseEvent is BaseEvent

    class Setup(BaseInstrumentationHandler):
        @classmethod
        def init(cls) -> None:
            root_dispatcher.add_event_handler(Counting())

    Setup.init()
    assert len(root_dispatcher.event_handlers) == 1
    with pytest.raises(TypeError):
        BaseInstrumentationHandler()  # type: ignore[abstract]

    d = get_dispatcher("switching.names")

    @d.span
    def traced() -> None:
        pass

    assert getattr(traced, DISPATCHER_SPAN_DECORATED_ATTR) is True
    send: EventDispatcher = d.get_dispatch_event()
    send(BaseEvent())
    assert root_dispatcher.event_handlers[0].seen == 1  # type: ignore[attr-defined]
    with instrument.instrument_tags({"k": "v"}):
        assert active_instrument_tags.get() == {"k": "v"}


def test_active_span_id_can_be_set_and_reset_for_hand_made_spans() -> None:
    """LlamaIndex code makes its own spans current with ``active_span_id.set(id_)``."""
    from instrumentation.span import active_span_id

    spans = SimpleSpanHandler()
    root_dispatcher.add_span_handler(spans)
    d = get_dispatcher("switching.manual")

    @d.span
    def inner() -> None:
        d.event(BaseEvent())

    seen: list[BaseEvent] = []

    class Keep(BaseEventHandler):
        def handle(self, event: BaseEvent, **kwargs: Any) -> None:
            seen.append(event)

    root_dispatcher.add_event_handler(Keep())
    no_args = inspect.signature(lambda: None).bind()
    with d.span("outer") as block:
        outer_id = block.id_
        token = active_span_id.set("manual-1")
        try:
            d.span_enter(id_="manual-1", bound_args=no_args, parent_id=outer_id)
            inner()
            d.span_exit(id_="manual-1", bound_args=no_args)
        finally:
            active_span_id.reset(token)
        assert active_span_id.get() == outer_id
    by_name = {s.name: s for s in spans.completed_spans}
    assert by_name[inner.__qualname__].parent_id == "manual-1"
    assert by_name["manual"].parent_id == outer_id
    assert by_name[inner.__qualname__].trace_id == by_name["outer"].trace_id
    assert seen[0].trace_id == by_name["outer"].trace_id
    with pytest.raises(TypeError, match="span id"):
        active_span_id.set(42)  # type: ignore[arg-type]


def test_dispatchers_made_the_llamaindex_way_join_the_tree() -> None:
    """``Dispatcher(name=..., parent_name=..., manager=...)`` as LlamaIndex's get_dispatcher
    does; a parent the dotted name does not give is an error, not silently ignored."""
    from instrumentation import root_manager

    parent = get_dispatcher("switching.made")
    counting = Counting()
    parent.add_event_handler(counting)
    made = instrument.Dispatcher(
        name="switching.made.child",
        parent_name="switching.made",
        manager=root_manager,
        root_name="root",
    )
    assert get_dispatcher("switching.made.child") is made and made.parent is parent
    assert made.root_name == "root" and made.current_span_ids == {}
    made.event(BaseEvent())
    assert counting.seen == 1
    with pytest.raises(ValueError, match="already has"):
        instrument.Dispatcher(name="switching.made.child", manager=root_manager)
    with pytest.raises(ValueError, match="dotted name"):
        instrument.Dispatcher(
            name="switching.other", parent_name="switching.made", manager=root_manager
        )
    with pytest.raises(ValueError, match="root"):
        instrument.Dispatcher(name="switching.x", root_name="top")
    with pytest.raises(TypeError, match="Manager"):
        instrument.Dispatcher(name="switching.y", manager="root")  # type: ignore[arg-type]


def test_dispatcher_takes_llamaindex_positional_arguments_in_its_order() -> None:
    """LlamaIndex's order is (name, event_handlers, span_handlers, parent_name, manager,
    root_name, propagate): a fourth positional argument was taken as ``propagate``, so
    ``Dispatcher(name, [], [], "parent")`` silently ignored the parent's name."""
    from instrumentation import root_manager

    parent = get_dispatcher("switching.positional")
    counting = Counting()
    made = instrument.Dispatcher(
        "switching.positional.child", [counting], [], "switching.positional", root_manager
    )
    assert made.parent is parent and made.propagate is True
    alone = instrument.Dispatcher("switching.positional.alone", [], [], "", None, "root", False)
    assert alone.propagate is False and alone.manager is None
    with pytest.raises(ValueError, match="dotted name"):
        instrument.Dispatcher("switching.other2", [], [], "switching.positional", root_manager)
    with pytest.raises(TypeError, match="propagate is True or False"):
        instrument.Dispatcher("switching.z", propagate="no")  # type: ignore[arg-type]
    # propagate where it was fourth before: the message says the order changed.
    with pytest.raises(TypeError, match=r"4th argument is parent_name .* propagate=False"):
        instrument.Dispatcher("switching.z", [], [], False)  # type: ignore[arg-type]


def test_kept_spans_read_like_lists() -> None:
    """LlamaIndex keeps spans in lists: tests compare them to lists and slice them."""
    import copy

    for handler in (SimpleSpanHandler(), SimpleSpanHandler(max_completed_spans=3)):
        assert handler.completed_spans == [] and handler.dropped_spans == []
        assert (handler.completed_spans != []) is False
        root_dispatcher.span_handlers[:] = [handler]
        d = get_dispatcher("switching.kept")
        for name in ("a", "b", "c", "d"):
            with d.span(name):
                pass
        names = [s.name for s in handler.completed_spans]
        assert [s.name for s in handler.completed_spans[-2:]] == names[-2:] == ["c", "d"]
        assert handler.completed_spans == list(handler.completed_spans)
        assert copy.copy(handler.completed_spans) == list(handler.completed_spans)
        assert handler.completed_spans[0].name == names[0]


def test_handler_list_changes_act_on_the_handlers_themselves() -> None:
    """Handlers compare equal by their fields: remove() and ``in`` must not confuse two."""
    d = get_dispatcher("switching.identity")
    first, second = SimpleSpanHandler(), SimpleSpanHandler()
    assert first == second  # pydantic equality
    d.span_handlers.extend([first, second])
    assert second in d.span_handlers and d.span_handlers.index(second) == 1
    d.span_handlers.remove(second)
    assert d.span_handlers == [first] and d.span_handlers[0] is first
    with pytest.raises(ValueError):
        d.span_handlers.remove(second)


def test_a_stale_handler_list_refuses_changes_by_position() -> None:
    d = get_dispatcher("switching.positions")
    a, b = Counting(), Counting()
    d.event_handlers.extend([a, b])
    held = d.event_handlers
    d.remove_event_handler(a)
    with pytest.raises(RuntimeError, match=r"read dispatcher\.event_handlers again"):
        del held[0]
    assert d.event_handlers[0] is b
    fresh_list = d.event_handlers
    del fresh_list[0]
    assert d.event_handlers == []


def test_plus_equals_keeps_handlers_added_meanwhile_by_other_threads() -> None:
    import threading

    d = get_dispatcher("switching.iadd")
    added: list[Counting] = []

    def add_directly() -> None:
        for _ in range(200):
            h = Counting()
            added.append(h)
            d.add_event_handler(h)

    other = threading.Thread(target=add_directly)
    other.start()
    mine = [Counting() for _ in range(200)]
    for h in mine:
        d.event_handlers += [h]
    other.join()
    attached = d.event_handlers
    assert all(h in attached for h in added) and all(h in attached for h in mine)
    saved = d.event_handlers
    d.event_handlers.clear()
    d.event_handlers = saved  # a list read earlier still restores
    assert len(d.event_handlers) == 400


def test_a_mixin_with_span_methods_gets_the_arguments() -> None:
    seen: list[dict[str, Any]] = []

    class RecordArgs:
        def new_span(self, id_: str, bound_args: Any, *args: Any, **kwargs: Any) -> Any:
            seen.append(dict(bound_args.arguments))
            return super().new_span(id_, bound_args, *args, **kwargs)  # type: ignore[misc]

    class ViaMixin(RecordArgs, SimpleSpanHandler):
        pass

    assert ViaMixin.needs_bound_args is True
    root_dispatcher.add_span_handler(ViaMixin())

    @get_dispatcher("switching.mixin").span
    def work(x: int) -> int:
        return x

    work(42)
    assert seen == [{"x": 42}]


def test_hand_made_spans_keep_one_trace_in_either_order_and_uuid_ids_name_them() -> None:
    from instrumentation.context import span_name_of
    from instrumentation.span import active_span_id

    assert span_name_of("Workflow.run-c014c830-6790-4f2b-bdd3-0123456789ab") == "Workflow.run"
    assert span_name_of("f-0123456789abcdef") == "f"
    spans = SimpleSpanHandler()
    root_dispatcher.add_span_handler(spans)
    d = get_dispatcher("switching.order")

    @d.span
    def child() -> None:
        pass

    no_args = inspect.signature(lambda: None).bind()
    span_id = "Workflow.run-c014c830-6790-4f2b-bdd3-0123456789ab"
    d.span_enter(id_=span_id, bound_args=no_args)  # enter first, then make it current
    token = active_span_id.set(span_id)
    child()
    active_span_id.reset(token)
    d.span_exit(id_=span_id, bound_args=no_args)
    by_name = {s.name: s for s in spans.completed_spans}
    assert by_name[child.__qualname__].parent_id == span_id
    assert by_name[child.__qualname__].trace_id == by_name["Workflow.run"].trace_id


def test_llm_calls_stay_marked_as_traced() -> None:
    from instrumentation._wrap import LLAMA_MARK
    from instrumentation.llms import BaseLLM
    from instrumentation.llms.base import dispatcher as llm_dispatcher

    for name in ("chat", "achat", "complete", "acomplete", "predict", "structured_predict"):
        method = getattr(BaseLLM, name)
        assert getattr(method, LLAMA_MARK) is True
        assert llm_dispatcher.span(method) is method  # decorating again changes nothing


def test_llamaindex_parent_names_are_accepted_when_they_are_ancestors() -> None:
    from instrumentation import root_manager

    get_dispatcher("switching.pkg.sub.mod")  # leaves "switching.pkg.sub" a placeholder
    made = instrument.Dispatcher(
        name="switching.pkg.sub.other", parent_name="switching.pkg.sub", manager=root_manager
    )
    later = get_dispatcher("switching.pkg.sub")
    assert made.parent is later


def test_capture_tolerates_tags_set_by_hand_to_something_else() -> None:
    from instrumentation.dispatcher import active_instrument_tags

    token = active_instrument_tags.set(None)  # type: ignore[arg-type]
    try:
        assert (
            get_dispatcher("switching.tags").capture_propagation_context()["instrument_tags"] == {}
        )
    finally:
        active_instrument_tags.reset(token)


def test_a_span_wrapper_copied_from_llamaindex_takes_its_parent_from_the_token() -> None:
    """LlamaIndex's own span wrapper, copied into users' decorators, reads the parent
    id from ``active_span_id.set(id_).old_value``: the id current before, or
    ``Token.MISSING`` at the top."""
    import uuid
    from contextvars import Token

    from instrumentation.span import active_span_id

    spans = SimpleSpanHandler()
    d = get_dispatcher("switching.copied_wrapper")
    d.add_span_handler(spans)
    no_args = inspect.signature(lambda: None).bind()

    def named_span(name: str, body: Any) -> Any:
        span_id = f"{name}-{uuid.uuid4()}"
        token = active_span_id.set(span_id)
        assert token.var is active_span_id
        parent_id = None if token.old_value is Token.MISSING else token.old_value
        d.span_enter(id_=span_id, bound_args=no_args, parent_id=parent_id)
        try:
            result = body()
        finally:
            active_span_id.reset(token)
        d.span_exit(id_=span_id, bound_args=no_args, result=result)
        return result

    errors_before = telemetry.handler_errors().get("SimpleSpanHandler", 0)
    named_span("query", lambda: named_span("retrieve", lambda: 1))
    by_name = {s.name: s for s in spans.completed_spans}
    assert set(by_name) == {"query", "retrieve"}
    assert by_name["query"].parent_id is None
    assert by_name["retrieve"].parent_id == by_name["query"].id_
    assert telemetry.handler_errors().get("SimpleSpanHandler", 0) == errors_before
    with pytest.raises(TypeError, match=r"active_span_id\.set\(\) returned"):
        active_span_id.reset("not a token")  # type: ignore[arg-type]


def test_names_importable_from_the_dispatcher_module() -> None:
    """LlamaIndex code imports these from ``...dispatcher`` as well as their homes."""
    from instrumentation import dispatcher as module
    from instrumentation.events.span import SpanDropEvent
    from instrumentation.span import active_span_id
    from instrumentation.span_handlers import NullSpanHandler

    assert module.SpanDropEvent is SpanDropEvent
    assert module.NullSpanHandler is NullSpanHandler
    assert module.active_span_id is active_span_id


def test_a_span_made_by_hand_gets_a_unique_id() -> None:
    """``SimpleSpan()`` without ``id_`` gets a fresh id (a UUID, as in LlamaIndex), not ''."""
    ids = {SimpleSpan().id_ for _ in range(3)}
    assert len(ids) == 3 and all(len(i) == 36 for i in ids)


def test_span_lists_take_list_operations() -> None:
    """``completed_spans`` is a bounded deque, but code written for LlamaIndex's list
    adds it to lists, sorts it, pops by index and deletes slices."""
    spans = SimpleSpanHandler()
    d = get_dispatcher("switching.list_ops")
    d.add_span_handler(spans)

    @d.span
    def step(n: int) -> int:
        return n

    for n in range(4):
        step(n)
    done = spans.completed_spans
    first, last = done[0], done[-1]
    assert [first] + done == [first, *done[:]]  # noqa: RUF005 - the operation under test
    assert done + [last] == [*done[:], last]  # noqa: RUF005
    done.sort(key=lambda s: s.start_time, reverse=True)
    assert done[0] is last and done[-1] is first
    assert done.pop(0) is last and len(done) == 3
    assert done.pop() is first and len(done) == 2
    step(9)  # buffered until read: each operation takes it in first
    del done[:1]
    assert len(done) == 2
    done[0:1] = []
    assert len(done) == 1 and done[0].end_time is not None
    assert done.maxlen == 10_000


def test_a_handler_that_declares_its_own_list_keeps_it() -> None:
    """A LlamaIndex handler that re-declares ``completed_spans: List[...]`` gets the list
    it declared (and serialises without pydantic's warnings); the base class's own
    fields stay bounded deques."""
    import warnings

    from pydantic import Field

    from ._support import GuideSpanHandler

    class ListKeeping(GuideSpanHandler):
        completed_spans: list[SimpleSpan] = Field(default_factory=list)  # type: ignore[assignment]

    handler = ListKeeping()
    d = get_dispatcher("switching.own_list")
    d.add_span_handler(handler)

    @d.span
    def work() -> int:
        return 1

    work()
    assert type(handler.completed_spans) is list and len(handler.completed_spans) == 1
    shared: list[SimpleSpan] = []
    handler.completed_spans = shared
    work()
    assert shared and shared[0].name == work.__qualname__
    from instrumentation.span_handlers._buffered import SpanDeque

    assert type(handler.dropped_spans) is SpanDeque
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(handler.model_dump()["completed_spans"], list)


def test_the_token_of_active_span_id_can_be_given_to_deactivate() -> None:
    """Code that mixes the two spellings (``deactivate(active_span_id.set(x))``) keeps
    working now that ``set()`` returns a token of its own."""
    from instrumentation.context import current_span, deactivate
    from instrumentation.span import active_span_id

    token = active_span_id.set("mixed-1")
    assert current_span() is not None and current_span().id_ == "mixed-1"  # type: ignore[union-attr]
    deactivate(token)  # type: ignore[arg-type]
    assert current_span() is None


def test_a_span_handler_stamping_naive_local_times_the_llamaindex_way_works(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """LlamaIndex's handlers set ``span.end_time = datetime.now()`` (naive, local) and
    subtract ``start_time``; ours is aware UTC, so every span of such a handler failed
    ("can't subtract offset-naive and offset-aware datetimes") and none was kept."""
    import time
    from datetime import datetime, timedelta, timezone
    from typing import cast

    class Ported(BaseSpanHandler[SimpleSpan]):
        def new_span(
            self,
            id_: str,
            bound_args: inspect.BoundArguments,
            instance: Any | None = None,
            parent_span_id: str | None = None,
            tags: dict[str, Any] | None = None,
            **kwargs: Any,
        ) -> SimpleSpan:
            return SimpleSpan(id_=id_, parent_id=parent_span_id, start_time=datetime.now())

        def prepare_to_exit_span(
            self,
            id_: str,
            bound_args: inspect.BoundArguments,
            instance: Any | None = None,
            result: Any | None = None,
            **kwargs: Any,
        ) -> SimpleSpan:
            span = cast(SimpleSpan, self.open_spans[id_])
            span.end_time = datetime.now()
            span.duration = (span.end_time - span.start_time).total_seconds()
            with self.lock:
                self.completed_spans += [span]
            return span

        def prepare_to_drop_span(
            self,
            id_: str,
            bound_args: inspect.BoundArguments,
            instance: Any | None = None,
            err: BaseException | None = None,
            **kwargs: Any,
        ) -> None:
            return None

    monkeypatch.setenv("TZ", "America/New_York")  # local time is not UTC
    time.tzset()
    try:
        handler = Ported()
        d = get_dispatcher("switching.naive_times")
        d.add_span_handler(handler)

        @d.span
        def work() -> int:
            return 1

        before = datetime.now(timezone.utc)
        work()
        d.remove_span_handler(handler)
        assert telemetry.handler_errors() == {}
        (span,) = handler.completed_spans
        assert span.end_time is not None
        for stamp in (span.start_time, span.end_time):
            assert stamp.utcoffset() == timedelta(0)
            assert abs(stamp - before) < timedelta(seconds=5)  # local time, converted
        assert 0 <= span.duration < 5
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_span_times_given_past_validation_are_made_utc_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``model_copy(update=...)`` and ``model_construct(...)`` skip validation: a naive
    local time given there stayed naive, and a handler ported from LlamaIndex that
    subtracted the span's other time raised. They make it UTC as the constructor does;
    other fields, and a copy without an update, are as pydantic gives them."""
    import time
    from datetime import datetime, timedelta

    monkeypatch.setenv("TZ", "America/New_York")  # local time is not UTC
    time.tzset()
    try:
        naive = datetime(2024, 1, 1, 12, 0)
        span = SimpleSpan(id_="s", start_time=naive)
        ended = span.model_copy(update={"end_time": naive + timedelta(seconds=2), "duration": 2.0})
        assert ended.end_time is not None and ended.end_time.utcoffset() == timedelta(0)
        assert ended.end_time - ended.start_time == timedelta(seconds=2)
        assert ended.duration == 2.0 and ended.id_ == "s"
        assert span.model_copy().start_time is span.start_time
        built = SimpleSpan.model_construct(start_time=naive, end_time=naive, name="n")
        assert built.start_time.utcoffset() == timedelta(0) and built.start_time == span.start_time
        assert built.end_time is not None and built.end_time - built.start_time == timedelta(0)
        assert (
            built.name == "n"
            and SimpleSpan.model_construct().start_time.utcoffset() == timedelta(0)
        )
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_a_simple_span_subclass_with_other_time_types_and_extreme_times_still_builds() -> None:
    """The UTC conversion assumed a datetime: a subclass keeping its times as floats,
    and ``datetime.min`` east of Greenwich (no UTC form), failed to build."""
    import time
    from datetime import datetime

    class EpochSpan(SimpleSpan):
        start_time: float = 0.0  # type: ignore[assignment]
        end_time: float | None = None  # type: ignore[assignment]

    span = EpochSpan(id_="x", start_time=1.5)
    span.end_time = 2.5
    assert (span.start_time, span.end_time) == (1.5, 2.5)
    import os

    old = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Tokyo"
    time.tzset()
    try:
        assert SimpleSpan(id_="y", start_time=datetime.min).start_time == datetime.min
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()
