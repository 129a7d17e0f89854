"""Parent links and one trace id per call tree: nesting, asyncio, threads, pools, blocks."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from instrumentation import (
    ContextThreadPoolExecutor,
    Dispatcher,
    Thread,
    current_span,
    get_dispatcher,
    instrument_tags,
)

from ._support import Recorder, fresh


@pytest.fixture
def d() -> Dispatcher:
    return get_dispatcher(fresh())


@pytest.fixture
def rec(d: Dispatcher) -> Recorder:
    r = Recorder()
    d.add_span_handler(r)
    return r


def test_nested_calls_share_trace_and_link_parents(d: Dispatcher, rec: Recorder) -> None:
    """a -> b -> c gives parent links a<-b<-c and one trace id; a second top-level call starts a
    new trace.
    """

    @d.span
    def c() -> None:
        return None

    @d.span
    def b() -> None:
        c()

    @d.span
    def a() -> None:
        b()
        c()

    a()
    ra, rb = rec.one(a.__qualname__), rec.one(b.__qualname__)
    rcs = rec.named(c.__qualname__)
    assert ra.parent_id is None and rb.parent_id == ra.id_
    assert sorted(x.parent_id or "" for x in rcs) == sorted([ra.id_, rb.id_])
    assert len({r.trace_id for r in rec.records.values()}) == 1
    a()
    assert len({r.trace_id for r in rec.records.values()}) == 2
    assert current_span() is None


def test_spans_across_dispatchers_link(d: Dispatcher, rec: Recorder) -> None:
    """A span of one dispatcher is the parent of a span of another (handlers on root see both)."""
    from instrumentation import root_dispatcher

    other = get_dispatcher(fresh())
    r = Recorder()
    root_dispatcher.add_span_handler(r)

    @other.span
    def inner() -> None:
        return None

    @d.span
    def outer() -> None:
        inner()

    outer()
    assert r.one(inner.__qualname__).parent_id == r.one(outer.__qualname__).id_
    assert r.one(inner.__qualname__).dispatcher == other.name


async def test_gather_and_create_task(d: Dispatcher, rec: Recorder) -> None:
    """Coroutines run with asyncio.gather and create_task are children of the span that started
    them.
    """

    @d.span
    async def leaf(i: int) -> int:
        await asyncio.sleep(0.001 * (3 - i))
        return i

    @d.span
    async def root() -> list[int]:
        got = list(await asyncio.gather(leaf(0), leaf(1), leaf(2)))
        task = asyncio.create_task(leaf(3))
        got.append(await task)
        return got

    assert await root() == [0, 1, 2, 3]
    r = rec.one(root.__qualname__)
    leaves = rec.named(leaf.__qualname__)
    assert len(leaves) == 4 and all(x.parent_id == r.id_ for x in leaves)
    assert {x.trace_id for x in leaves} == {r.trace_id}


async def test_concurrent_roots_get_separate_traces(d: Dispatcher, rec: Recorder) -> None:
    """Two top-level coroutines gathered from outside any span are separate traces with their own
    children.
    """

    @d.span
    async def child() -> None:
        await asyncio.sleep(0)

    @d.span
    async def top() -> None:
        await asyncio.sleep(0)
        await child()

    await asyncio.gather(top(), top())
    tops = rec.named(top.__qualname__)
    assert len({t.trace_id for t in tops}) == 2
    for t in tops:
        kids = [c for c in rec.named(child.__qualname__) if c.parent_id == t.id_]
        assert len(kids) == 1 and kids[0].trace_id == t.trace_id


def test_instrumentation_thread_keeps_parent(d: Dispatcher, rec: Recorder) -> None:
    """instrumentation.Thread copies the context: spans in it are children of the span that started
    it, with its tags.
    """

    @d.span
    def work() -> None:
        return None

    @d.span
    def main() -> None:
        with instrument_tags({"who": "main"}):
            t = Thread(target=work)
            t.start()
            t.join()
        plain = threading.Thread(target=work)
        plain.start()
        plain.join()

    main()
    m = rec.one(main.__qualname__)
    works = rec.named(work.__qualname__)
    (in_thread,) = [w for w in works if w.parent_id == m.id_]
    assert in_thread.trace_id == m.trace_id and in_thread.tags == {"who": "main"}
    (orphan,) = [w for w in works if w.parent_id is None]  # a plain thread starts empty
    assert orphan.trace_id != m.trace_id


def test_context_thread_pool_executor(d: Dispatcher, rec: Recorder) -> None:
    """Tasks submitted to ContextThreadPoolExecutor are children of the submitting span, also via
    map().
    """

    @d.span
    def job(i: int) -> int:
        return i * i

    @d.span
    def main() -> list[int]:
        with ContextThreadPoolExecutor(max_workers=3) as pool:
            futures = [pool.submit(job, i) for i in range(4)]
            mapped = list(pool.map(job, range(4, 6)))
        return [f.result() for f in futures] + mapped

    assert main() == [0, 1, 4, 9, 16, 25]
    m = rec.one(main.__qualname__)
    jobs = rec.named(job.__qualname__)
    assert len(jobs) == 6 and all(j.parent_id == m.id_ and j.trace_id == m.trace_id for j in jobs)


def test_plain_executor_loses_parent(d: Dispatcher, rec: Recorder) -> None:
    """For contrast: a plain ThreadPoolExecutor starts spans without a parent (why
    ContextThreadPoolExecutor exists).
    """

    @d.span
    def job() -> None:
        return None

    @d.span
    def main() -> None:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(job).result()

    main()
    assert rec.one(job.__qualname__).parent_id is None


async def test_to_thread_keeps_parent(d: Dispatcher, rec: Recorder) -> None:
    """asyncio.to_thread copies the context, so the thread's span is a child."""

    @d.span
    def blocking() -> int:
        return 1

    @d.span
    async def main() -> int:
        return await asyncio.to_thread(blocking)

    await main()
    assert rec.one(blocking.__qualname__).parent_id == rec.one(main.__qualname__).id_


def test_span_block_is_parent_and_passes_result(d: Dispatcher, rec: Recorder) -> None:
    """`with d.span("x") as blk`: blk.id_/trace_id name the span, calls inside are children,
    blk.result is the exit result.
    """

    @d.span
    def inner() -> None:
        return None

    with instrument_tags({"t": 1}), d.span("step", tags={"extra": 2}) as blk:
        assert blk.id_ is not None and current_span() is not None
        assert current_span().id_ == blk.id_  # type: ignore[union-attr]
        inner()
        blk.result = "done"
    assert blk.id_ is None and current_span() is None
    s = rec.one("step")
    assert s.id_.startswith("step-") and s.status == "exit" and s.result == "done"
    assert s.tags == {"t": 1, "extra": 2}
    i = rec.one(inner.__qualname__)
    assert i.parent_id == s.id_ and i.trace_id == s.trace_id


def test_span_block_by_keyword_and_bad_use(d: Dispatcher, rec: Recorder) -> None:
    """span(name="x") works as a block; no name, two names, reuse while open are refused with clear
    errors.
    """
    with d.span(name="kw"):
        pass
    assert rec.one("kw").status == "exit"
    with pytest.raises(TypeError, match="needs a name"), d.span():
        pass
    with pytest.raises(TypeError, match="once"):
        d.span("a", name="b")  # type: ignore[call-overload]
    blk = d.span("again")
    with blk, pytest.raises(RuntimeError, match="already open"), blk:
        pass
    with pytest.raises(TypeError, match="mapping"):
        d.span("x", tags=[1])  # type: ignore[call-overload]


def test_span_block_without_handlers_is_inert(d: Dispatcher) -> None:
    """With no handler listening, a span block runs its body and has no id."""
    with d.span("quiet") as blk:
        assert blk.id_ is None and current_span() is None


async def test_async_span_block(d: Dispatcher, rec: Recorder) -> None:
    """`async with d.span("x")` is a span around the block, parent of the awaited work."""

    @d.span
    async def inner() -> None:
        await asyncio.sleep(0)

    async with d.span("ablock") as blk:
        await inner()
        trace = blk.trace_id
    s = rec.one("ablock")
    assert s.status == "exit" and s.trace_id == trace
    assert rec.one(inner.__qualname__).parent_id == s.id_


def test_suppress_instrumentation(d: Dispatcher, rec: Recorder) -> None:
    """Inside suppress_instrumentation() no spans start and no events are dispatched."""
    from instrumentation import BaseEvent, suppress_instrumentation

    from ._support import EventList

    ev = EventList()
    d.add_event_handler(ev)

    @d.span
    def f() -> int:
        d.event(BaseEvent())
        return 1

    with suppress_instrumentation():
        assert f() == 1
        with d.span("blk"):
            pass
    assert rec.records == {} and ev.events == []


def test_a_block_closed_where_it_was_never_current_leaves_that_context_alone(
    d: Dispatcher, rec: Recorder
) -> None:
    """A generator holding a span block, advanced in one context and closed in another
    (inside a traced call, as the collector or a caller's ``close()`` does), put back
    the block's predecessor there: the call's own span was no longer current, and what
    it started next was a root of a new trace."""
    import contextvars
    from collections.abc import Iterator

    def stream() -> Iterator[int]:
        with d.span("block"):
            yield 1

    gen = stream()
    contextvars.copy_context().run(next, gen)

    @d.span
    def after() -> None:
        return None

    @d.span
    def outer() -> None:
        gen.close()  # the block ends here, where outer is current
        assert (
            current_span() is not None
            and current_span().id_
            == rec.one(  # type: ignore[union-attr]
                outer.__qualname__
            ).id_
        )
        after()

    outer()
    assert rec.one(after.__qualname__).parent_id == rec.one(outer.__qualname__).id_
    assert rec.one("block").parent_id is None
    assert current_span() is None


async def test_a_block_left_in_a_task_that_inherited_it_is_no_longer_current_there(
    d: Dispatcher, rec: Recorder
) -> None:
    """Where the block is current (a task started inside it), leaving it there puts
    back what it replaced, as in the context that entered it."""

    @d.span
    async def after() -> None:
        return None

    seen: list[str | None] = []

    @d.span
    async def outer() -> None:
        block = d.span("block")
        block.__enter__()

        async def leave_it() -> None:
            block.__exit__(None, None, None)
            span = current_span()
            seen.append(None if span is None else span.id_)
            await after()

        await asyncio.create_task(leave_it())

    await outer()
    assert seen == [rec.one(outer.__qualname__).id_]
    assert rec.one(after.__qualname__).parent_id == rec.one(outer.__qualname__).id_


def test_a_hand_made_span_reset_where_it_was_never_current_leaves_that_context_alone(
    d: Dispatcher, rec: Recorder
) -> None:
    """``active_span_id.set()`` in one context and ``reset()`` in another: as for a
    block, the context that resets it keeps its own current span."""
    import contextvars

    from instrumentation.span import active_span_id

    holder: list[object] = []
    contextvars.copy_context().run(lambda: holder.append(active_span_id.set("by-hand-1")))

    @d.span
    def outer() -> str | None:
        active_span_id.reset(holder[0])  # type: ignore[arg-type]
        span = current_span()
        return None if span is None else span.id_

    assert outer() == rec.one(outer.__qualname__).id_


def test_a_block_closed_in_the_same_context_inside_a_later_call_leaves_it_alone(
    d: Dispatcher, rec: Recorder
) -> None:
    """Advanced inside one call and closed inside the next, on the same thread: the
    block's reset put back the first call, ended, as the current span in the second,
    and the second's child became the first's."""
    from collections.abc import Iterator

    def stream() -> Iterator[int]:
        with d.span("block"):
            yield 1

    @d.span
    def first() -> Iterator[int]:
        gen = stream()
        next(gen)
        return gen

    @d.span
    def child() -> None:
        return None

    @d.span
    def second(gen: Iterator[int]) -> None:
        gen.close()  # type: ignore[attr-defined]
        child()

    second(first())
    assert rec.one(child.__qualname__).parent_id == rec.one(second.__qualname__).id_
    assert current_span() is None
