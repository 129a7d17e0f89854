"""``@dispatcher.span`` on every kind of callable: functions, coroutines, methods, generators,
awaitables.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import gc
import inspect
import pickle
import sys
import types
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Generator, Iterator
from typing import Any

import pytest

from instrumentation import (
    Dispatcher,
    NullSpanHandler,
    SimpleSpanHandler,
    current_span,
    get_dispatcher,
)
from instrumentation._spans import LazyBoundArguments

from ._support import Recorder, fresh


@pytest.fixture
def d() -> Dispatcher:
    return get_dispatcher(fresh())


@pytest.fixture
def rec(d: Dispatcher) -> Recorder:
    r = Recorder()
    d.add_span_handler(r)
    return r


def test_function_span_gets_result_and_qualname(d: Dispatcher, rec: Recorder) -> None:
    """A decorated function's span is named by its qualname, exits with the result, in the
    dispatcher's name.
    """

    @d.span
    def add(a: int, b: int = 2) -> int:
        return a + b

    assert add(1, b=5) == 6
    (r,) = rec.records.values()
    assert r.name == add.__qualname__ and r.status == "exit" and r.result == 6
    assert r.dispatcher == d.name and r.parent_id is None and r.instance is None
    assert r.id_.startswith(add.__qualname__ + "-") and len(r.id_.rpartition("-")[2]) == 16


async def test_coroutine_span_covers_the_await(d: Dispatcher, rec: Recorder) -> None:
    """A decorated coroutine's span stays open across awaits and exits with the awaited result."""
    inside: list[Any] = []

    @d.span
    async def fetch(x: int) -> int:
        await asyncio.sleep(0)
        inside.append(current_span())
        return x * 2

    assert await fetch(4) == 8
    (r,) = rec.records.values()
    assert r.status == "exit" and r.result == 8 and inside[0].id_ == r.id_
    assert inspect.iscoroutinefunction(fetch)


class Base:
    def __init__(self, d: Dispatcher) -> None:
        self.tag = "base"


def make_class(d: Dispatcher) -> type:
    class Service:
        factor = 3

        @d.span
        def method(self, x: int) -> int:
            return x * self.factor

        @d.span
        @classmethod
        def cm_outer(cls, x: int) -> int:
            return x + cls.factor

        @classmethod
        @d.span
        def cm_inner(cls, x: int) -> int:
            return x - cls.factor

        @d.span
        @staticmethod
        def sm_outer(x: int) -> int:
            return -x

        @staticmethod
        @d.span
        def sm_inner(x: int) -> int:
            return x * 10

        @d.span
        async def amethod(self, x: int) -> int:
            return x

    return Service


def test_methods_both_decorator_orders(d: Dispatcher, rec: Recorder) -> None:
    """Instance, class and static methods work with @span outside or inside
    classmethod/staticmethod; self/cls excluded.
    """
    Service = make_class(d)

    class Sub(Service):  # type: ignore[misc, valid-type]
        pass

    obj = Sub()
    assert obj.method(2) == 6
    assert Sub.cm_outer(1) == 4 and obj.cm_outer(1) == 4
    assert Sub.cm_inner(5) == 2
    assert Sub.sm_outer(3) == -3 and obj.sm_outer(3) == -3
    assert Sub.sm_inner(2) == 20
    spans = list(rec.records.values())
    by = {r.name: r for r in spans}
    assert by["Sub.method"].instance is obj
    assert dict(by["Sub.method"].bound_args.arguments) == {"x": 2}
    cm = [r for r in spans if r.name == "Sub.cm_outer"]
    assert len(cm) == 2 and all(r.instance is Sub for r in cm)
    assert dict(cm[0].bound_args.arguments) == {"x": 1}
    assert by["Sub.cm_inner"].instance is Sub
    assert dict(by["Sub.cm_inner"].bound_args.arguments) == {"x": 5}
    sm = [r for r in spans if r.name and r.name.endswith("sm_outer")]
    assert len(sm) == 2 and all(r.instance is None for r in sm)
    assert dict(sm[0].bound_args.arguments) == {"x": 3}
    (smi,) = [r for r in spans if r.name and r.name.endswith("sm_inner")]
    assert smi.instance is None and dict(smi.bound_args.arguments) == {"x": 2}
    assert all(r.status == "exit" for r in spans)


async def test_async_method_has_instance(d: Dispatcher, rec: Recorder) -> None:
    """An async method's span gets the instance and its own arguments only."""
    obj = make_class(d)()
    assert await obj.amethod(9) == 9
    (r,) = rec.records.values()
    assert r.instance is obj and dict(r.bound_args.arguments) == {"x": 9}


def test_bound_method_decorated_later(d: Dispatcher, rec: Recorder) -> None:
    """Decorating an already bound method passes its instance and binds only the remaining
    arguments.
    """

    class K:
        def go(self, y: int) -> int:
            return y

    k = K()
    traced = d.span(k.go)
    assert traced(7) == 7
    (r,) = rec.records.values()
    assert r.instance is k and dict(r.bound_args.arguments) == {"y": 7}


def test_sync_generator_span_covers_iteration(d: Dispatcher, rec: Recorder) -> None:
    """A generator's span opens at the call, stays open while items are produced, and exits when
    exhausted.
    """

    @d.span
    def inner() -> int:
        return 1

    @d.span
    def gen(n: int) -> Iterator[int]:
        for i in range(n):
            inner()
            yield i
        return None

    it = gen(3)
    assert inspect.isgenerator(it)
    assert next(it) == 0
    (g,) = rec.named(gen.__qualname__)
    assert g.status == "open"
    assert current_span() is None  # not current in the consumer between items
    assert list(it) == [1, 2]
    assert g.status == "exit"
    kids = rec.named(inner.__qualname__)
    assert len(kids) == 3 and all(k.parent_id == g.id_ for k in kids)
    assert all(k.trace_id == g.trace_id for k in kids)


def test_generator_send_and_return_value(d: Dispatcher, rec: Recorder) -> None:
    """send() values reach the generator, and its return value is the span's result and
    StopIteration's value.
    """

    @d.span
    def echo() -> Any:
        total = 0
        while True:
            got = yield total
            if got is None:
                return total
            total += got

    it = echo()
    next(it)
    assert it.send(2) == 2 and it.send(3) == 5
    with pytest.raises(StopIteration) as stop:
        it.send(None)
    assert stop.value.value == 5
    (r,) = rec.records.values()
    assert r.status == "exit" and r.result == 5


def test_generator_throw_is_forwarded(d: Dispatcher, rec: Recorder) -> None:
    """throw() into a wrapped generator reaches the generator, which may handle it and continue."""

    @d.span
    def resilient() -> Generator[str, None, None]:
        try:
            yield "a"
        except ValueError:
            yield "handled"
        yield "b"

    it = resilient()
    assert next(it) == "a"
    assert it.throw(ValueError("x")) == "handled"
    assert list(it) == ["b"]
    (r,) = rec.records.values()
    assert r.status == "exit"


def test_interleaved_generators_parent_their_own_work(d: Dispatcher, rec: Recorder) -> None:
    """Two generators advanced alternately: work done inside each is that generator's child."""

    @d.span
    def step(label: str) -> str:
        return label

    @d.span
    def producer(label: str) -> Iterator[str]:
        for _ in range(3):
            yield step(label)

    @d.span
    def consumer() -> list[str]:
        a, b = producer("a"), producer("b")
        out = []
        for x, y in zip(a, b, strict=True):
            out += [x, y]
        return out

    assert consumer() == ["a", "b"] * 3
    c = rec.one(consumer.__qualname__)
    prods = rec.named(producer.__qualname__)
    assert len(prods) == 2 and all(p.parent_id == c.id_ for p in prods)
    for p in prods:
        label = p.bound_args.arguments["label"]
        steps = [s for s in rec.named(step.__qualname__) if s.parent_id == p.id_]
        assert len(steps) == 3 and all(s.bound_args.arguments["label"] == label for s in steps)
    assert len({r.trace_id for r in rec.records.values()}) == 1


async def test_async_generator_span_covers_iteration(d: Dispatcher, rec: Recorder) -> None:
    """An async generator's span stays open until it is exhausted, and work inside is its child."""

    @d.span
    async def inner(i: int) -> int:
        return i

    @d.span
    async def agen(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield await inner(i)

    it = agen(3)
    assert inspect.isasyncgen(it)
    assert await it.__anext__() == 0
    (g,) = rec.named(agen.__qualname__)
    assert g.status == "open"
    assert [x async for x in it] == [1, 2]
    assert g.status == "exit"
    kids = rec.named(inner.__qualname__)
    assert len(kids) == 3 and all(k.parent_id == g.id_ for k in kids)


async def test_interleaved_async_generators(d: Dispatcher, rec: Recorder) -> None:
    """Two async generators advanced alternately each parent their own work."""

    @d.span
    def step(label: str) -> str:
        return label

    @d.span
    async def producer(label: str) -> AsyncIterator[str]:
        for _ in range(2):
            await asyncio.sleep(0)
            yield step(label)

    a, b = producer("a"), producer("b")
    got = []
    for _ in range(2):
        got += [await a.__anext__(), await b.__anext__()]
    for it in (a, b):
        with pytest.raises(StopAsyncIteration):
            await it.__anext__()
    assert got == ["a", "b", "a", "b"]
    for p in rec.named(producer.__qualname__):
        steps = [s for s in rec.named(step.__qualname__) if s.parent_id == p.id_]
        assert [s.bound_args.arguments["label"] for s in steps] == [
            p.bound_args.arguments["label"]
        ] * 2
        assert p.status == "exit"


async def test_async_generator_asend_athrow(d: Dispatcher, rec: Recorder) -> None:
    """asend() and athrow() reach a wrapped async generator."""

    @d.span
    async def acc() -> AsyncGenerator[int, int | None]:
        total = 0
        while True:
            try:
                got = yield total
            except ValueError:
                got = 100
            total += got or 0

    it = acc()
    assert await it.asend(None) == 0
    assert await it.asend(5) == 5
    assert await it.athrow(ValueError()) == 105
    await it.aclose()
    (r,) = rec.records.values()
    assert r.status == "drop" and isinstance(r.err, GeneratorExit)


async def test_function_returning_a_coroutine(d: Dispatcher, rec: Recorder) -> None:
    """A plain function that returns a coroutine: the span lasts until it is awaited and work
    inside is its child.
    """

    @d.span
    async def leaf() -> int:
        return 1

    async def body() -> int:
        await asyncio.sleep(0)
        return await leaf() + 1

    @d.span
    def starter() -> Awaitable[int]:
        return body()

    aw = starter()
    (s,) = rec.named(starter.__qualname__)
    assert s.status == "open"
    assert await aw == 2
    assert s.status == "exit" and s.result == 2
    assert rec.one(leaf.__qualname__).parent_id == s.id_


async def test_a_returned_coroutine_lets_go_of_the_call_once_it_ran(d: Dispatcher) -> None:
    """A finished Task keeps its coroutine, which has let go of what it ran with: the
    span's finalizer on it (for a coroutine never awaited) kept the instance and the
    arguments for as long."""
    d.add_span_handler(NullSpanHandler())  # binds the arguments: it may read them

    class Document:
        pass

    class Client:
        @d.span
        def index(self, document: Document) -> Awaitable[int]:
            return self._index(document)

        async def _index(self, document: Document) -> int:
            await asyncio.sleep(0)
            return 1

    client, document = Client(), Document()
    task = asyncio.ensure_future(client.index(document))
    assert await task == 1
    kept = [weakref.ref(client), weakref.ref(document)]
    del client, document
    gc.collect()
    assert task.done() and [ref() for ref in kept] == [None, None]


async def test_function_returning_a_generator_based_coroutine(d: Dispatcher, rec: Recorder) -> None:
    """A ``types.coroutine`` generator is awaited like a coroutine: the span lasts until then."""

    @types.coroutine
    def old_style() -> Generator[Any, None, int]:
        yield from asyncio.sleep(0).__await__()
        return 7

    @d.span
    def starter() -> Any:
        return old_style()

    aw = starter()
    (s,) = rec.named(starter.__qualname__)
    assert s.status == "open"
    assert await aw == 7
    assert s.status == "exit" and s.result == 7


def test_a_generator_based_coroutine_result_can_still_be_driven_by_hand(
    d: Dispatcher, rec: Recorder
) -> None:
    """What a function returns stays a generator-based coroutine: a plain generator may
    ``yield from`` it, and ``send`` reaches it."""

    @types.coroutine
    def step() -> Generator[str, int, int]:
        x = yield "need-x"
        return x * 2

    @d.span
    def make_step() -> Any:
        return step()

    def trampoline() -> Generator[str, int, int]:
        return (yield from make_step())

    @d.span
    def unrelated() -> None:
        return None

    driven = trampoline()
    assert next(driven) == "need-x"
    assert current_span() is None  # suspended: the caller's context is its own
    unrelated()
    with pytest.raises(StopIteration) as stopped:
        driven.send(21)
    assert stopped.value.value == 42
    r = rec.one(make_step.__qualname__)
    assert r.status == "exit" and r.result == 42
    assert rec.one(unrelated.__qualname__).parent_id is None


def test_a_partial_of_a_generator_function_can_be_decorated(d: Dispatcher, rec: Recorder) -> None:
    def numbers(step: int) -> Iterator[int]:
        yield from range(0, 3 * step, step)

    wrapped = d.span(functools.partial(numbers, 2), name="numbers")
    assert list(wrapped()) == [0, 2, 4]
    assert rec.one("numbers").status == "exit"


async def test_a_types_coroutine_function_can_be_decorated(d: Dispatcher, rec: Recorder) -> None:
    """``@types.coroutine`` generator functions are awaited, not iterated, by the wrapper."""

    @d.span
    @types.coroutine
    def old_style() -> Generator[Any, None, int]:
        yield from asyncio.sleep(0).__await__()
        return 7

    assert await old_style() == 7
    r = rec.one(old_style.__qualname__)
    assert r.status == "exit" and r.result == 7


async def test_other_awaitables_are_returned_as_they_are(d: Dispatcher, rec: Recorder) -> None:
    """An object with ``__await__`` that is also an async context manager stays usable as one."""

    class Both:
        def __await__(self) -> Generator[Any, None, str]:
            yield from asyncio.sleep(0).__await__()
            return "awaited"

        async def __aenter__(self) -> str:
            return "entered"

        async def __aexit__(self, *exc: object) -> None:
            return None

    @d.span
    def make() -> Both:
        return Both()

    made = make()
    assert isinstance(made, Both)
    async with make() as got:
        assert got == "entered"
    assert await made == "awaited"
    assert [r.status for r in rec.named(make.__qualname__)] == ["exit", "exit"]


def test_plain_generator_returned_by_a_function_is_not_awaited(
    d: Dispatcher, rec: Recorder
) -> None:
    """A function that returns a generator object (not a coroutine) ends its span at once."""

    def numbers() -> Iterator[int]:
        yield 1

    @d.span
    def make() -> Iterator[int]:
        return numbers()

    assert list(make()) == [1]
    assert rec.one(make.__qualname__).status == "exit"


async def test_async_generator_called_with_bad_arguments_drops_its_span(
    d: Dispatcher, rec: Recorder
) -> None:
    """Bad arguments fail before the body runs; the span is dropped, not left open."""

    @d.span
    async def agen(n: int) -> AsyncIterator[int]:
        yield n

    with pytest.raises(TypeError):
        async for _ in agen(1, 2, 3):  # type: ignore[call-arg]
            pass
    r = rec.one(agen.__qualname__)
    assert r.status == "drop" and isinstance(r.err, TypeError)


# On 3.13 a warning pytest records (the loop's close, never awaited) keeps the
# generator alive until the test ends.
@pytest.mark.filterwarnings("ignore:coroutine method 'aclose':RuntimeWarning")
def test_async_generator_freed_by_a_closed_loop_ends_its_span(d: Dispatcher, rec: Recorder) -> None:
    """A loop closed without shutdown_asyncgens() never closes a generator left by
    ``break``: freed, its span ends as closed early (as under asyncio.run), once, and
    no handler keeps it open. A generator that ran to its end is not ended again."""
    simple = SimpleSpanHandler()
    d.add_span_handler(simple)

    @d.span
    async def pages(n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async def first_page() -> int:
        async for page in pages(10):
            return page
        raise AssertionError("no page")

    async def all_pages() -> list[int]:
        return [page async for page in pages(2)]

    for _ in range(3):
        loop = asyncio.new_event_loop()
        try:
            assert loop.run_until_complete(all_pages()) == [0, 1]
            assert loop.run_until_complete(first_page()) == 0
        finally:
            loop.close()  # no shutdown_asyncgens(): the loop closes nothing
    gc.collect()
    records = rec.named(pages.__qualname__)
    assert len(records) == 6
    assert sorted(r.status for r in records) == ["drop"] * 3 + ["exit"] * 3
    assert all(isinstance(r.err, GeneratorExit) for r in records if r.status == "drop")
    assert not simple.open_spans and len(simple.dropped_spans) == 3
    assert len(simple.completed_spans) == 3


def test_a_closed_loop_leaves_a_traced_generator_unclosed_as_an_undecorated_one(
    d: Dispatcher, rec: Recorder
) -> None:
    """Freed after its loop was closed without shutdown_asyncgens(), an undecorated
    async generator's finally never runs. A traced one's ran there, on no loop, and one
    that awaits in it was reported as "async generator ignored GeneratorExit"."""
    cleaned: list[str] = []
    unraisable: list[Any] = []

    async def plain() -> AsyncIterator[int]:
        try:
            yield 1
            yield 2
        finally:
            cleaned.append("plain")

    @d.span
    async def traced() -> AsyncIterator[int]:
        try:
            yield 1
            yield 2
        finally:
            cleaned.append("traced")

    @d.span
    async def traced_awaiting() -> AsyncIterator[int]:
        try:
            yield 1
            yield 2
        finally:
            await asyncio.sleep(0)
            cleaned.append("traced_awaiting")

    async def first(gen: AsyncIterator[int]) -> int:
        return await gen.__anext__()  # in the loop: its hooks see the generator start

    hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        for make in (plain, traced, traced_awaiting):
            loop = asyncio.new_event_loop()
            gen = make()
            assert loop.run_until_complete(first(gen)) == 1
            loop.close()
            del gen
            gc.collect()
    finally:
        sys.unraisablehook = hook
    assert cleaned == [] and unraisable == []
    records = rec.named(traced.__qualname__) + rec.named(traced_awaiting.__qualname__)
    assert [(r.status, type(r.err)) for r in records] == [("drop", GeneratorExit)] * 2


async def test_async_generator_freed_in_a_reference_cycle_ends_its_span_once(
    d: Dispatcher,
) -> None:
    """The collector frees the wrapper, its guard and the generator inside together, and
    the loop's finalizer brings the wrapper back to close it: the guard had ended the
    span already, and the close ended it again (as a RuntimeError: the generator inside
    was over). Now once, as closed early, and the generator's own finally ran."""
    ends: list[tuple[str, str]] = []

    class Ends(SimpleSpanHandler):  # keeps no arguments, which would keep the cycle
        def span_drop(
            self,
            id_: str,
            bound_args: Any,
            instance: Any = None,
            err: BaseException | None = None,
            **kwargs: Any,
        ) -> Any:
            ends.append(("drop", type(err).__name__))
            return super().span_drop(id_, bound_args, instance, err, **kwargs)

        def span_exit(
            self, id_: str, bound_args: Any, instance: Any = None, result: Any = None, **kwargs: Any
        ) -> Any:
            ends.append(("exit", id_))
            return super().span_exit(id_, bound_args, instance, result, **kwargs)

    d.add_span_handler(Ends())
    finals: list[str] = []

    class Holder:
        gen: Any = None

        @d.span
        async def pages(self) -> AsyncIterator[int]:
            try:
                for i in range(10):
                    yield i
            finally:
                finals.append("closed")

    holder = Holder()
    holder.gen = holder.pages()  # holder -> generator -> its frame -> holder
    assert await holder.gen.__anext__() == 0
    alive = weakref.ref(holder)
    del holder
    gc.collect()
    await asyncio.sleep(0.01)  # the loop runs the aclose() it scheduled
    gc.collect()
    assert alive() is None
    # Ended inside the collection, the span's end waits for the next end (see
    # instrumentation._spans.later).
    with d.span("next"):
        pass
    assert len(ends) == 2 and ends[0] == ("drop", "GeneratorExit")
    assert ends[1][0] == "exit" and ends[1][1].startswith("next-")
    assert finals == ["closed"]


async def test_function_returning_a_future(d: Dispatcher, rec: Recorder) -> None:
    """A plain function that returns an asyncio.Future gets it back itself; the span ends with the
    future's result.
    """
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[int]] = []

    @d.span
    def later() -> asyncio.Future[int]:
        fut: asyncio.Future[int] = loop.create_future()
        futures.append(fut)
        return fut

    @d.span
    def failing() -> asyncio.Future[int]:
        fut: asyncio.Future[int] = loop.create_future()
        fut.set_exception(ValueError("nope"))
        return fut

    fut = later()
    assert fut is futures[0]
    (r,) = rec.named(later.__qualname__)
    assert r.status == "open"
    loop.call_soon(fut.set_result, 42)
    assert await fut == 42
    await asyncio.sleep(0)
    assert r.status == "exit" and r.result == 42
    with pytest.raises(ValueError, match="nope"):
        await failing()
    await asyncio.sleep(0)
    assert rec.one(failing.__qualname__).status == "drop"


def test_idempotent_with_same_dispatcher(d: Dispatcher, rec: Recorder) -> None:
    """Decorating twice with the same dispatcher returns the same wrapper and records one span per
    call.
    """

    def f() -> int:
        return 1

    once = d.span(f)
    assert d.span(once) is once
    once()
    assert len(rec.records) == 1

    class K:
        @d.span
        @d.span
        @classmethod
        def c(cls) -> int:
            return 2

        @d.span
        @d.span
        @staticmethod
        def s() -> int:
            return 3

        @d.span
        @d.span
        def m(self) -> int:
            return 4

    assert K.c() == 2 and K.s() == 3 and K().m() == 4
    assert len(rec.records) == 4

    # A bound method or a classmethod reached through its class is traced already too.
    k = K()
    assert d.span(k.m)() == 4 and d.span(K.c)() == 2
    assert len(rec.records) == 6


def test_second_dispatcher_wraps_again_and_original_stays_unmarked(
    d: Dispatcher, rec: Recorder
) -> None:
    """A second dispatcher wraps again (two nested spans), and the original function is never
    marked.
    """
    other = get_dispatcher(fresh())
    other_rec = Recorder()
    other.add_span_handler(other_rec)

    def f() -> int:
        return 1

    first = d.span(f)
    assert not hasattr(f, "__instrumentation_dispatcher__")
    assert not hasattr(f, "__dispatcher_span_decorated__")
    second = other.span(first)
    assert second is not first
    also = other.span(f)
    assert also is not f
    second()
    also()
    assert len(other_rec.records) == 2 and len(rec.records) == 1
    outer = next(iter(other_rec.records.values()))
    (inner,) = rec.records.values()
    assert inner.parent_id == outer.id_ and inner.trace_id == outer.trace_id


def test_metadata_is_kept(d: Dispatcher) -> None:
    """__wrapped__, __name__, __qualname__, __doc__, __module__ and the signature are those of the
    original.
    """

    def original(a: int, *, b: str = "x") -> str:
        """Docstring of the original."""
        return b * a

    async def coro(x: int) -> int:
        """Coro doc."""
        return x

    def gen(n: int) -> Iterator[int]:
        """Gen doc."""
        yield n

    for func in (original, coro, gen):
        w: Any = d.span(func)
        assert w.__wrapped__ is func
        assert (w.__name__, w.__qualname__, w.__doc__, w.__module__) == (
            func.__name__,
            func.__qualname__,
            func.__doc__,
            func.__module__,
        )
        assert inspect.signature(w) == inspect.signature(func)
    assert inspect.iscoroutinefunction(d.span(coro))
    assert inspect.isgeneratorfunction(d.span(gen))


def test_bound_args_are_correct_and_lazy(
    d: Dispatcher, rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Handlers get an inspect.BoundArguments with the call's arguments; the signature is computed
    once, not per call.
    """
    calls = []
    real = inspect.signature

    def counting(*a: Any, **k: Any) -> inspect.Signature:
        calls.append(a)
        return real(*a, **k)

    @d.span
    def f(a: int, b: int = 2, *rest: int, key: str = "k", **extra: Any) -> int:
        return a

    monkeypatch.setattr(inspect, "signature", counting)
    for i in range(50):
        f(i, 3, 4, 5, key="z", other=1)
    for r in rec.records.values():
        assert isinstance(r.bound_args, inspect.BoundArguments)
    assert len(calls) == 0  # nothing bound until a handler reads the arguments
    first = next(iter(rec.records.values()))
    assert first.bound_args.arguments == {
        "a": 0,
        "b": 3,
        "rest": (4, 5),
        "key": "z",
        "extra": {"other": 1},
    }
    assert first.bound_args.args == (0, 3, 4, 5)
    assert first.bound_args.kwargs == {"key": "z", "other": 1}
    for r in rec.records.values():
        _ = r.bound_args.arguments
    assert len(calls) <= 1


@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle"])
def test_bound_args_can_be_kept_copied_or_pickled(d: Dispatcher, rec: Recorder, how: str) -> None:
    """A handler that keeps or queues the arguments copies or pickles them, as it can a
    real ``inspect.BoundArguments``: it gets one, equal to what the call bound."""
    keep = {
        "copy": copy.copy,
        "deepcopy": copy.deepcopy,
        "pickle": lambda b: pickle.loads(pickle.dumps(b)),
    }[how]

    @d.span
    def f(a: int, *rest: int, key: str = "k") -> int:
        return a

    f(1, 2, 3, key="z")
    with d.span("a block"):
        pass
    call, block = rec.records.values()
    kept = keep(call.bound_args)
    assert type(kept) is inspect.BoundArguments
    assert kept.arguments == {"a": 1, "rest": (2, 3), "key": "z"}
    assert kept.args == (1, 2, 3) and kept.kwargs == {"key": "z"}
    assert str(kept.signature) == "(a: 'int', *rest: 'int', key: 'str' = 'k') -> 'int'"
    empty = keep(block.bound_args)
    assert type(empty) is inspect.BoundArguments and empty.arguments == {}


def test_handlers_not_needing_bound_args_get_an_empty_one(d: Dispatcher) -> None:
    """When every handler sets needs_bound_args = False, no per-call binding object is made."""
    seen: list[Any] = []

    class Quiet(Recorder):
        needs_bound_args = False

        def span_enter(self, id_: str, bound_args: Any, *a: Any, **k: Any) -> None:
            seen.append(bound_args)

    d.add_span_handler(Quiet())

    @d.span
    def f(x: int) -> int:
        return x

    f(1)
    f(2)
    assert seen[0] is seen[1] and dict(seen[0].arguments) == {}


def test_unbindable_call_still_gives_bound_args(d: Dispatcher, rec: Recorder) -> None:
    """A call that does not fit the signature raises the function's own TypeError and binding
    degrades gracefully.
    """

    @d.span
    def f(a: int) -> int:
        return a

    with pytest.raises(TypeError):
        f(1, 2, 3)  # type: ignore[call-arg]
    (r,) = rec.records.values()
    assert r.status == "drop" and isinstance(r.bound_args.arguments, dict)
    assert isinstance(r.bound_args, LazyBoundArguments)


def test_span_options_name_request_attributes(d: Dispatcher, rec: Recorder) -> None:
    """@d.span(name=..., request=True, attributes=...) renames the span, passes attributes."""

    @d.span(name="custom", request=True, attributes={"k": "v"})
    def f() -> None:
        return None

    @d.span()
    def g() -> None:
        return None

    f()
    g()
    assert rec.one("custom").attributes == {"k": "v", "request": True}
    assert rec.one(g.__qualname__).attributes is None
    with pytest.raises(TypeError, match="instrument_tags"):
        d.span(tags={"a": 1})(g)
    with pytest.raises(TypeError, match="decorates functions"):
        d.span(42)  # type: ignore[call-overload]


def test_callable_objects_and_partials(d: Dispatcher, rec: Recorder) -> None:
    """Callable objects and functools.partial can be decorated and keep their results."""

    class Adder:
        def __call__(self, a: int, b: int) -> int:
            return a + b

    def add(a: int, b: int) -> int:
        return a + b

    assert d.span(Adder())(1, 2) == 3
    assert d.span(functools.partial(pow, 2))(5) == 32
    assert d.span(functools.partial(functools.partial(add, 1), 2))() == 3
    assert len(rec.records) == 3 and all(r.status == "exit" for r in rec.records.values())
    # A partial is named after the function it calls, not "partial".
    assert sorted(r.name for r in rec.records.values()) == sorted(
        ["Adder", "pow", add.__qualname__]
    )


def test_a_class_or_a_property_is_refused_with_what_to_decorate(d: Dispatcher) -> None:
    """Wrapped, a class became a function (``isinstance`` and subclassing then failed);
    a property is not callable. Each error says what to decorate instead."""

    class Thing:
        pass

    with pytest.raises(
        TypeError, match=r"not classes; got the class .*Thing: decorate its __init__"
    ):
        d.span(Thing)
    with pytest.raises(TypeError, match="under @property, on the getter"):
        d.span(property(lambda self: 1))  # type: ignore[call-overload]


def test_a_callable_objects_state_is_not_copied_onto_its_wrapper(d: Dispatcher) -> None:
    """Its attributes change as it runs: a copy on the wrapper would go stale. They are
    read through ``__wrapped__``."""

    class Counter:
        def __init__(self) -> None:
            self.calls = 0

        def __call__(self) -> int:
            self.calls += 1
            return self.calls

    counter = Counter()
    traced: Any = d.span(counter)
    traced()
    traced()
    assert "calls" not in traced.__dict__
    assert traced.__wrapped__ is counter and traced.__wrapped__.calls == 2


def test_a_decorator_around_a_traced_function_can_be_traced(d: Dispatcher, rec: Recorder) -> None:
    """``functools.wraps`` copies the traced function's attributes, its mark included,
    onto the other decorator's wrapper: that wrapper is a function of its own, and
    decorating it is a span of its own, around the traced one."""

    @d.span
    def fetch(x: int) -> int:
        return x

    def retry(fn: Any) -> Any:
        @functools.wraps(fn)
        def again(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

        return again

    cached = functools.lru_cache(fetch)
    traced_retry = d.span(retry(fetch))
    traced_cache = d.span(cached)
    assert traced_retry(1) == 1 and traced_cache(2) == 2
    assert traced_cache is not cached
    assert d.span(fetch) is fetch  # the traced function itself: still one span
    records = list(rec.records.values())
    roots = [r.id_ for r in records if r.parent_id is None]
    # Each call is an outer span (the other decorator's) around the traced function's.
    assert len(records) == 4 and len(roots) == 2
    assert sorted(r.parent_id for r in records if r.parent_id is not None) == sorted(roots)


def test_no_handler_path_calls_through(d: Dispatcher) -> None:
    """With no handler in the chain, decorated functions, generators and coroutines just run."""

    @d.span
    def f(x: int) -> int:
        return x + 1

    @d.span
    def g() -> Iterator[int]:
        yield 1
        yield 2

    @d.span
    async def c() -> int:
        return 3

    assert f(1) == 2 and list(g()) == [1, 2] and asyncio.run(c()) == 3
    assert current_span() is None


def test_simple_span_handler_records_method_spans(d: Dispatcher) -> None:
    """SimpleSpanHandler (fast path) records names, parents, trace ids and the dispatcher name."""
    h = SimpleSpanHandler()
    d.add_span_handler(h)
    Service = make_class(d)

    @d.span
    def outer() -> int:
        return int(Service().method(1))

    outer()
    spans = {s.name: s for s in h.completed_spans}
    assert spans["Service.method"].parent_id == spans[outer.__qualname__].id_
    assert spans["Service.method"].trace_id == spans[outer.__qualname__].trace_id
    assert spans["Service.method"].dispatcher == d.name


async def test_generator_methods_get_their_instance(d: Dispatcher, rec: Recorder) -> None:
    """Sync and async generator methods are named after the class and get the instance, not self."""

    class Source:
        @d.span
        def rows(self, n: int) -> Iterator[int]:
            yield from range(n)

        @d.span
        async def arows(self, n: int) -> AsyncIterator[int]:
            for i in range(n):
                yield i

    src = Source()
    assert list(src.rows(2)) == [0, 1]
    assert [x async for x in src.arows(3)] == [0, 1, 2]
    rows, arows = rec.one("Source.rows"), rec.one("Source.arows")
    assert rows.instance is src and dict(rows.bound_args.arguments) == {"n": 2}
    assert arows.instance is src and dict(arows.bound_args.arguments) == {"n": 3}
    assert rows.status == arows.status == "exit"


def test_a_span_name_that_is_not_a_string_is_refused_at_decoration(d: Dispatcher) -> None:
    def f() -> None:
        return None

    with pytest.raises(TypeError, match="span name is a str"):
        d.span(f, name=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="span name is a str"):
        d.span(name=3)(f)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make",
    [
        lambda d, f: d.span(f, name=""),
        lambda d, f: d.span(name="")(f),
        lambda d, f: d.span(""),
        lambda d, f: d.span(name=""),
    ],
)
def test_an_empty_span_name_is_refused(d: Dispatcher, make: Any) -> None:
    """An empty name would make span ids like '-05c50ccd80961a47' with no name part."""

    def f() -> None:
        return None

    with pytest.raises(ValueError, match="must not be empty"):
        make(d, f)


def test_handlers_cannot_leak_arguments_between_spans_without_any(d: Dispatcher) -> None:
    """Spans with no arguments share one empty arguments object; a handler writing into
    it must not show its edit to the next span.
    """
    seen: list[dict[str, Any]] = []

    class Annotating(Recorder):
        def span_enter(
            self, id_: str, bound_args: inspect.BoundArguments, *a: Any, **k: Any
        ) -> None:
            seen.append(dict(bound_args.arguments))
            bound_args.arguments["seen_by"] = id_
            bound_args.arguments = {"replaced": True}
            super().span_enter(id_, bound_args, *a, **k)

    d.add_span_handler(Annotating())
    with d.span("first"):
        pass
    with d.span("second"):
        pass
    assert seen == [{}, {}]
