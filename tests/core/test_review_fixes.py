"""Regressions found by a second reading of the core, one test each."""

from __future__ import annotations

import asyncio
import gc
import importlib
import uuid
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

import instrumentation as instrument
from instrumentation.span.simple import SimpleSpan
from instrumentation.span_handlers import SimpleSpanHandler
from instrumentation.testing import capture_spans

from ._support import GuideSpanHandler


def test_reused_span_block_does_not_pass_the_previous_result() -> None:
    """A span block entered a second time exits with its own result, not the last one's."""
    d = instrument.get_dispatcher("review.block")
    with capture_spans():
        results: list[Any] = []

        class Exits(SimpleSpanHandler):
            def prepare_to_exit_span(
                self,
                id_: str,
                bound_args: Any,
                instance: Any = None,
                result: Any = None,
                **kwargs: Any,
            ) -> SimpleSpan | None:
                results.append(result)
                return super().prepare_to_exit_span(id_, bound_args, instance, result, **kwargs)

        handler = Exits()
        d.add_span_handler(handler)
        block = d.span("step")
        with block:
            block.result = {"first": 1}
        with block:
            pass
    assert results == [{"first": 1}, None]


def test_restore_without_traceparent_clears_an_earlier_restore() -> None:
    """Restoring a context captured outside any span leaves no stale span or tags behind."""
    d = instrument.get_dispatcher("review.restore")
    with capture_spans() as spans:
        with instrument.instrument_tags({"job": "A"}), d.span("request-A"):
            ctx_a = d.capture_propagation_context()
        ctx_b = d.capture_propagation_context()
        assert ctx_b == {"traceparent": None, "active_span_id": None, "instrument_tags": {}}
        # LlamaIndex's own shape, with no traceparent key at all, clears as well.
        ctx_peer = {"active_span_id": None, "instrument_tags": {}}

        def worker(ctx: dict[str, object]) -> None:
            d.restore_propagation_context(ctx_a)
            d.restore_propagation_context(ctx)
            with d.span("job-B"):
                pass

        import contextvars

        contextvars.copy_context().run(worker, ctx_b)
        contextvars.copy_context().run(worker, ctx_peer)
    jobs = spans.named("job-B")
    assert len(jobs) == 2
    trace_a = spans.named("request-A")[0].trace_id
    assert all(job.parent_id is None and job.tags == {} for job in jobs)
    assert all(job.trace_id != trace_a for job in jobs)


def test_awaitable_that_is_not_a_coroutine_is_returned_unchanged() -> None:
    """An object that is awaitable and more (an async context manager) keeps its type."""
    d = instrument.get_dispatcher("review.awaitable")

    class Request:
        def __await__(self) -> Generator[Any, None, str]:
            if False:
                yield
            return "resp"

        async def __aenter__(self) -> str:
            return "resp"

        async def __aexit__(self, *exc: object) -> None:
            return None

    @d.span
    def get() -> Request:
        return Request()

    async def main() -> str:
        assert type(get()) is Request
        async with get() as resp:
            return resp

    with capture_spans() as spans:
        assert asyncio.run(main()) == "resp"
    assert len([s for s in spans if s.name and s.name.endswith(".get")]) == 2


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_returned_coroutine_never_run_does_not_leave_its_span_open() -> None:
    """A coroutine returned by a traced sync function and never started ends as dropped."""
    d = instrument.get_dispatcher("review.unstarted")
    handler = SimpleSpanHandler()
    d.add_span_handler(handler)

    async def fetch() -> int:
        await asyncio.sleep(0)
        return 1

    @d.span
    def start_fetch() -> Any:
        return fetch()

    async def main() -> None:
        task = asyncio.ensure_future(start_fetch())
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        coro = start_fetch()
        coro.close()
        gc.collect()

    asyncio.run(main())
    gc.collect()
    assert handler.open_spans == {}
    assert len(handler.dropped_spans) == 2


def test_block_open_across_a_yield_stays_the_parent_after_resuming() -> None:
    """Work after a generator resumes is the child of the block it opened, sync and async."""
    d = instrument.get_dispatcher("review.genblock")

    @d.span
    def child() -> None:
        pass

    @d.span
    def gen() -> Generator[int, None, None]:
        with d.span("inner"):
            child()
            yield 1
            child()

    @d.span
    async def agen() -> Any:
        with d.span("inner"):
            child()
            yield 1
            child()

    async def drain() -> None:
        async for _ in agen():
            pass

    for run in (lambda: list(gen()), lambda: asyncio.run(drain())):
        with capture_spans() as spans:
            run()
        by_id = {s.id_: s for s in spans}
        children = [s for s in spans if s.name and s.name.endswith(".child")]
        assert [by_id[c.parent_id].name for c in children] == ["inner", "inner"]


def test_span_ended_after_shutdown_does_not_reach_the_closed_handler() -> None:
    """A call still running at shutdown() ends without errors from its dropped handler."""
    d = instrument.get_dispatcher("review.shutdown")
    calls: list[str] = []

    class Guide(GuideSpanHandler):
        def prepare_to_exit_span(self, id_: str, *args: Any, **kwargs: Any) -> SimpleSpan:
            calls.append("exit")
            return self.open_spans[id_]

        def prepare_to_drop_span(self, id_: str, *args: Any, **kwargs: Any) -> SimpleSpan:
            calls.append("drop")
            return self.open_spans[id_]

    d.add_span_handler(Guide())

    @d.span
    def work() -> None:
        d.shutdown()

    work()
    assert calls == ["drop"]
    assert instrument.telemetry.handler_errors() == {}


def test_capture_helpers_restore_handlers_added_inside_the_block() -> None:
    """capture_events()/capture_spans() take off a handler attached in the block."""
    from instrumentation.testing import capture_events

    before = instrument.root_dispatcher.span_handlers
    with capture_spans(), capture_events():
        instrument.root_dispatcher.add_span_handler(SimpleSpanHandler())
    assert instrument.root_dispatcher.span_handlers == before


def test_capture_helpers_leave_a_dispatcher_made_inside_the_block_as_its_module_set_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module imported lazily inside a captured block sets up its dispatcher at import
    (``propagate = False``, a handler of its own): that set-up must outlive the block,
    or later tests depend on which test imported the module first."""
    from instrumentation.testing import capture_events

    name = f"lazy_module_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(
        "from instrumentation import get_dispatcher\n"
        "from instrumentation.event_handlers import NullEventHandler\n"
        "d = get_dispatcher(__name__)\n"
        "d.propagate = False\n"
        "own = NullEventHandler()\n"
        "d.add_event_handler(own)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with capture_events(), capture_spans():
        module = importlib.import_module(name)
    assert module.d.propagate is False
    assert module.d.event_handlers == [module.own]
