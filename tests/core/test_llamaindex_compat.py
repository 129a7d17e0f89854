"""Handlers written exactly as in the LlamaIndex instrumentation guide work unchanged;
DispatcherSpanMixin.
"""

from __future__ import annotations

import inspect
from abc import abstractmethod
from typing import Any, Optional

import pytest
from pydantic import Field

import instrumentation as instrument
from instrumentation.event_handlers.base import BaseEventHandler
from instrumentation.events.base import BaseEvent
from instrumentation.events.llm import LLMChatEndEvent, LLMChatInProgressEvent, LLMChatStartEvent
from instrumentation.span.base import BaseSpan
from instrumentation.span_handlers import BaseSpanHandler, NullSpanHandler, SimpleSpanHandler

from ._support import Recorder, fresh

# --- verbatim from the guide (imports adapted) ---------------------------------


class ExampleEventHandler(BaseEventHandler):
    events: list[BaseEvent] = []

    @classmethod
    def class_name(cls) -> str:
        """Class name."""
        return "ExampleEventHandler"

    def handle(self, event: BaseEvent) -> None:  # type: ignore[override]
        """Logic for handling event."""
        print("-----------------------")
        # all events have these attributes
        print(event.id_)
        print(event.timestamp)
        print(event.span_id)

        # event specific attributes
        if isinstance(event, LLMChatStartEvent):
            # initial
            print(event.messages)
            print(event.additional_kwargs)
            print(event.model_dict)
        elif isinstance(event, LLMChatInProgressEvent):
            # streaming
            print(event.response.delta)
        elif isinstance(event, LLMChatEndEvent):
            # final response
            print(event.response)

        self.events.append(event)
        print("-----------------------")


class MyCustomSpan(BaseSpan):
    custom_field_1: Any = Field(...)
    custom_field_2: Any = Field(...)


class MyCustomSpanHandler(BaseSpanHandler[MyCustomSpan]):
    @classmethod
    def class_name(cls) -> str:
        """Class name."""
        return "MyCustomSpanHandler"

    def new_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Optional[Any] = None,
        parent_span_id: Optional[str] = None,
        tags: Optional[dict[str, Any]] = None,
        **kwargs: Any,
    ) -> Optional[MyCustomSpan]:
        """Create a span."""
        # logic for creating a new MyCustomSpan
        pass

    def prepare_to_exit_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Optional[Any] = None,
        result: Optional[Any] = None,
        **kwargs: Any,
    ) -> Any:
        """Logic for preparing to exit a span."""
        pass

    def prepare_to_drop_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Optional[Any] = None,
        err: Optional[BaseException] = None,
        **kwargs: Any,
    ) -> Any:
        """Logic for preparing to drop a span."""
        pass


# --- the same handler filled in, with and without **kwargs -------------------------


class WithKwargs(BaseSpanHandler[MyCustomSpan]):
    seen_kwargs: list[dict[str, Any]] = []

    def new_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Optional[Any] = None,
        parent_span_id: Optional[str] = None,
        tags: Optional[dict[str, Any]] = None,
        **kwargs: Any,
    ) -> Optional[MyCustomSpan]:
        self.seen_kwargs.append(kwargs)
        return MyCustomSpan(
            id_=id_,
            parent_id=parent_span_id,
            tags=tags or {},
            custom_field_1=dict(bound_args.arguments),
            custom_field_2=None,
        )

    def prepare_to_exit_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Optional[Any] = None,
        result: Optional[Any] = None,
        **kwargs: Any,
    ) -> Any:
        span = self.open_spans[id_]
        span.custom_field_2 = result
        self.completed_spans.append(span)
        return span

    def prepare_to_drop_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Optional[Any] = None,
        err: Optional[BaseException] = None,
        **kwargs: Any,
    ) -> Any:
        span = self.open_spans[id_]
        span.custom_field_2 = repr(err)
        self.dropped_spans.append(span)
        return span


class WithoutKwargs(BaseSpanHandler[MyCustomSpan]):
    def new_span(  # type: ignore[override]
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Optional[Any] = None,
        parent_span_id: Optional[str] = None,
        tags: Optional[dict[str, Any]] = None,
    ) -> Optional[MyCustomSpan]:
        return MyCustomSpan(
            id_=id_, parent_id=parent_span_id, custom_field_1=instance, custom_field_2=None
        )

    def prepare_to_exit_span(  # type: ignore[override]
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Optional[Any] = None,
        result: Optional[Any] = None,
    ) -> Any:
        span = self.open_spans[id_]
        self.completed_spans.append(span)
        return span

    def prepare_to_drop_span(  # type: ignore[override]
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Optional[Any] = None,
        err: Optional[BaseException] = None,
    ) -> Any:
        span = self.open_spans[id_]
        self.dropped_spans.append(span)
        return span


def test_guide_event_handler_prints_and_keeps_events(capsys: pytest.CaptureFixture[str]) -> None:
    """The guide's ExampleEventHandler (handle without **kwargs) receives events and prints their
    ids.
    """
    dispatcher = instrument.get_dispatcher(fresh())
    handler = ExampleEventHandler()
    dispatcher.add_event_handler(handler)
    ev = BaseEvent()
    dispatcher.event(ev)
    assert handler.events[-1] is ev
    assert ev.id_ in capsys.readouterr().out


def test_guide_span_handler_verbatim_is_harmless() -> None:
    """The guide's MyCustomSpanHandler, whose methods return None, can be attached and keeps
    nothing.
    """
    dispatcher = instrument.get_dispatcher(fresh())
    h = MyCustomSpanHandler()
    dispatcher.add_span_handler(h)

    @dispatcher.span
    def func(x: int) -> int:
        return x

    @dispatcher.span
    def bad() -> None:
        raise ValueError

    assert func(3) == 3
    with pytest.raises(ValueError):
        bad()
    assert h.open_spans == {} and instrument.telemetry.HANDLER_ERRORS.value == 0


@pytest.mark.parametrize("cls", [WithKwargs, WithoutKwargs])
def test_custom_span_handlers_with_and_without_kwargs(
    cls: type[BaseSpanHandler[MyCustomSpan]],
) -> None:
    """new_span & co. with or without **kwargs are called with the guide's keywords; trace_id and
    name get filled in.
    """
    dispatcher = instrument.get_dispatcher(fresh())
    h = cls()
    dispatcher.add_span_handler(h)

    class Agent:
        @dispatcher.span
        def run(self, q: str) -> str:
            return self.step(q)

        @dispatcher.span
        def step(self, q: str) -> str:
            return q.upper()

        @dispatcher.span
        def fail(self) -> None:
            raise RuntimeError("no")

    agent = Agent()
    assert agent.run("hi") == "HI"
    with pytest.raises(RuntimeError):
        agent.fail()
    assert h.open_spans == {}
    by_name = {s.name: s for s in h.completed_spans}
    assert set(by_name) == {"Agent.run", "Agent.step"}
    assert by_name["Agent.step"].parent_id == by_name["Agent.run"].id_
    assert by_name["Agent.step"].trace_id == by_name["Agent.run"].trace_id is not None
    assert [s.name for s in h.dropped_spans] == ["Agent.fail"]
    if cls is WithKwargs:
        assert by_name["Agent.run"].custom_field_1 == {"q": "hi"}
        assert by_name["Agent.run"].custom_field_2 == "HI"
        kw = h.seen_kwargs[0]  # type: ignore[attr-defined]
        assert {"name", "trace_id", "dispatcher", "attributes"} <= set(kw)
    else:
        assert by_name["Agent.run"].custom_field_1 is agent
    assert instrument.telemetry.HANDLER_ERRORS.value == 0


def test_manual_span_enter_exit_drop() -> None:
    """The guide's manual dispatcher.span_enter/span_exit/span_drop reach the span handlers."""
    dispatcher = instrument.get_dispatcher(fresh())
    h = SimpleSpanHandler()
    dispatcher.add_span_handler(h)
    bound = inspect.signature(lambda x: x).bind(1)
    dispatcher.span_enter(id_="manual-1", bound_args=bound)
    dispatcher.span_exit(id_="manual-1", bound_args=bound, result=1)
    dispatcher.span_enter(id_="manual-2", bound_args=bound, parent_id="manual-1")
    dispatcher.span_drop(id_="manual-2", bound_args=bound, err=ValueError("x"))
    assert [s.id_ for s in h.completed_spans] == ["manual-1"]
    (dropped,) = h.dropped_spans
    assert dropped.parent_id == "manual-1" and "ValueError" in (dropped.metadata or {})["error"]
    assert h.completed_spans[0].name == "manual" and h.completed_spans[0].trace_id


def test_guide_import_paths_exist() -> None:
    """The guide's module paths and names are importable from the same places."""
    from instrumentation import DispatcherSpanMixin, get_dispatcher, instrument_tags  # noqa: F401
    from instrumentation.event_handlers import NullEventHandler  # noqa: F401
    from instrumentation.events.span import SpanDropEvent  # noqa: F401
    from instrumentation.span.simple import SimpleSpan  # noqa: F401

    assert get_dispatcher() is instrument.root_dispatcher
    assert NullSpanHandler().class_name() == "NullSpanHandler"
    from instrumentation.span import active_span_id

    d = get_dispatcher(fresh())
    d.add_span_handler(NullSpanHandler())
    seen: list[str | None] = []

    @d.span
    def f() -> None:
        seen.append(active_span_id.get())

    f()
    assert active_span_id.get() is None and seen[0] is not None and seen[0].startswith("test_")


class _Base(instrument.DispatcherSpanMixin):
    @abstractmethod
    def run(self, x: int) -> int: ...

    def plain(self) -> int:
        return 0


def test_dispatcher_span_mixin_wraps_implementations() -> None:
    """A subclass's implementation of an abstract method is traced automatically, once even if
    decorated by hand.
    """
    rec = Recorder()
    instrument.root_dispatcher.add_span_handler(rec)
    d = instrument.get_dispatcher(__name__)

    class Impl(_Base):
        def run(self, x: int) -> int:
            return x + 1

        def plain(self) -> int:
            return 1

    class ImplByHand(_Base):
        @d.span
        def run(self, x: int) -> int:
            return x * 2

    class Unfinished(_Base):
        def plain(self) -> int:
            return 2

    with pytest.raises(TypeError, match="abstract method"):
        Unfinished()  # type: ignore[abstract]
    assert Impl().run(1) == 2 and Impl().plain() == 1
    assert ImplByHand().run(2) == 4
    names = [r.name for r in rec.records.values()]
    assert names == ["Impl.run", "ImplByHand.run"]
    assert dict(next(iter(rec.records.values())).bound_args.arguments) == {"x": 1}


def test_a_subclass_field_named_like_a_helper_keeps_trees_printing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """LlamaIndex's OpenTelemetry handler subclasses SimpleSpanHandler with a field
    ``all_spans``: it must neither shadow a method (pydantic warns then) nor break
    print_trace_trees()."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")

        class OTelLike(SimpleSpanHandler):
            all_spans: dict[str, Any] = Field(default_factory=dict)

    d = instrument.get_dispatcher(fresh())
    handler = OTelLike()
    d.add_span_handler(handler)

    @d.span
    def step() -> int:
        return 1

    step()
    handler.print_trace_trees()
    assert step.__qualname__ in capsys.readouterr().out


def test_setting_manager_as_llamaindex_code_does() -> None:
    """LlamaIndex's tests set ``dispatcher.manager = manager`` after ``add_dispatcher``:
    the same manager changes nothing; one in no tree joins it; others are refused."""
    from instrumentation.dispatcher import Dispatcher, Manager, root_manager

    parent = Dispatcher(name=fresh("compat_mgr"))
    child = Dispatcher(name=parent.name + ".child")
    manager = Manager(parent)
    manager.add_dispatcher(child)
    child.manager = manager
    parent.manager = manager
    assert child.manager is manager and child.parent is parent

    loose = Dispatcher(name=fresh("compat_loose"))
    loose.manager = root_manager
    assert root_manager.dispatchers[loose.name] is loose and loose.parent is not None
    with pytest.raises(ValueError, match="stays in it"):
        loose.manager = manager
    with pytest.raises(ValueError, match="already has a dispatcher"):
        Dispatcher(name=loose.name).manager = root_manager
    with pytest.raises(TypeError, match="manager is a Manager"):
        Dispatcher(name=fresh("compat_bad")).manager = 3  # type: ignore[assignment]


def test_span_handlers_take_llamaindex_positional_arguments() -> None:
    """LlamaIndex's ``BaseSpanHandler.__init__`` takes ``open_spans``,
    ``completed_spans``, ``dropped_spans`` and ``current_span_ids`` by position, and
    code written for it calls ``SimpleSpanHandler({}, [], [])``: pydantic's keyword-only
    constructor refused it."""
    done = instrument.SimpleSpan(id_="done")
    handler = SimpleSpanHandler({}, [done], [], {})
    assert list(handler.completed_spans) == [done] and handler.open_spans == {}
    assert SimpleSpanHandler({}, [], [], max_completed_spans=2).max_completed_spans == 2

    class Mine(BaseSpanHandler[BaseSpan]):
        def new_span(self, id_: str, bound_args: Any, **kwargs: Any) -> BaseSpan:
            return BaseSpan(id_=id_)

        def prepare_to_exit_span(self, id_: str, bound_args: Any, **kwargs: Any) -> None:
            return None

        def prepare_to_drop_span(self, id_: str, bound_args: Any, **kwargs: Any) -> None:
            return None

    assert Mine({"x": BaseSpan(id_="x")}).open_spans["x"].id_ == "x"
    with pytest.raises(TypeError, match="at most 4 positional arguments"):
        SimpleSpanHandler({}, [], [], {}, 5)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="multiple values for argument 'open_spans'"):
        SimpleSpanHandler({}, open_spans={})  # type: ignore[misc]


def test_bound_args_read_as_inspect_bound_arguments() -> None:
    """Handlers get the arguments bound lazily; printed or logged, they read as
    ``inspect.BoundArguments`` does, not ``<LazyBoundArguments ...>``."""
    d = instrument.get_dispatcher(fresh("compat_repr"))
    rec = Recorder()
    d.add_span_handler(rec)

    @d.span
    def f(a: int, b: int = 2, *rest: int, **named: str) -> None:
        return None

    def plain(a: int, b: int = 2, *rest: int, **named: str) -> None:
        return None

    f(1, 3, 4, k="v")
    with d.span("block"):
        pass
    (called,) = rec.named(f.__qualname__)
    expected = inspect.signature(plain).bind(1, 3, 4, k="v")
    assert repr(called.bound_args) == str(called.bound_args) == repr(expected)
    assert repr(expected) == "<BoundArguments (a=1, b=3, rest=(4,), named={'k': 'v'})>"
    assert repr(rec.one("block").bound_args) == "<BoundArguments ()>"
    assert called.bound_args == expected


async def test_span_names_follow_the_class_of_the_instance_called() -> None:
    """A method's span is named after the class of the object it was called on (the class
    itself, not its dotted path, for a nested one), as LlamaIndex names it; a plain
    function's after its ``__qualname__``. LlamaIndex's own tests read these names by
    patching ``Dispatcher.span_enter``; here a span handler reads them."""
    d = instrument.get_dispatcher(fresh("compat_names"))
    rec = Recorder()
    d.add_span_handler(rec)

    class Shape:
        @d.span
        def area(self) -> int:
            return 1

        @d.span
        async def later(self) -> int:
            return 2

    class Square(Shape):
        pass

    class Tile(Square):
        @d.span
        def area(self) -> int:
            return 3

    class Outer:
        class Inner:
            @d.span
            def step(self) -> int:
                return 4

    @d.span
    def loose() -> int:
        return 5

    results = [Shape().area(), Square().area(), Tile().area(), Outer.Inner().step(), loose()]
    assert results == [1, 1, 3, 4, 5]
    assert await Square().later() == 2
    names = [rec.records[id_].name for kind, id_ in rec.order if kind == "enter"]
    assert names == [
        "Shape.area",
        "Square.area",
        "Tile.area",
        "Inner.step",
        loose.__qualname__,
        "Square.later",
    ]
    for id_, record in rec.records.items():
        assert id_.rpartition("-")[0] == record.name


def test_span_takes_the_function_by_keyword_too() -> None:
    """LlamaIndex's signature is ``span(self, func)``: ``dispatcher.span(func=f)`` is a
    call its users may have written; it was refused (the function was positional only)."""
    d = instrument.get_dispatcher(fresh("compat.span_keyword"))
    handler = SimpleSpanHandler()
    d.add_span_handler(handler)
    try:

        def work(x: int) -> int:
            return x * 2

        traced = d.span(func=work)
        assert traced(21) == 42
        assert [s.name for s in handler.completed_spans] == [traced.__qualname__]
    finally:
        d.remove_span_handler(handler)
