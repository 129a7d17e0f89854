"""A span left in another context than the one it became current in: by the garbage
collector (a generator freed in a reference cycle, closed wherever the collection
runs), by the event loop (an async generator closed in a task of its own), or by the
application (a block entered in one task and left in another).

OpenTelemetry cannot reset its context variable there: its ``detach`` logged
"Failed to detach context" with a traceback, and the span stayed current in
OpenTelemetry's context where it had been made current again (a generator's resume),
so what was started next there became a child of a span that had ended."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
from collections.abc import AsyncIterator, Iterator

import pytest
from opentelemetry import trace as trace_api

from instrumentation import _spans
from instrumentation._spans import EMPTY_BOUND_ARGS
from instrumentation.context import active_span_id, current_span, span_name_of

from .conftest import Traced, hex_parent, hex_span, short


@pytest.fixture
def otel_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.DEBUG, logger="opentelemetry.context"):
        yield caplog


def _no_failed_detach(caplog: pytest.LogCaptureFixture) -> None:
    failed = [r for r in caplog.records if "Failed to detach context" in r.getMessage()]
    assert failed == []


def _current_otel_name() -> str | None:
    span = trace_api.get_current_span()
    if not span.get_span_context().is_valid:
        return None
    return short(getattr(span, "name", "?"))


def _freed_in_a_cycle_elsewhere(gen: Iterator[object]) -> None:
    """Advance ``gen`` in a copy of this context, then free it in a reference cycle,
    for the collector to close here."""
    contextvars.copy_context().run(next, gen)
    cycle: list[object] = [gen]
    cycle.append(cycle)


def _collect() -> None:
    gc.collect()
    _spans.run_deferred()  # the ends the collection put off, as the next span would


def test_a_block_in_a_generator_the_collector_closes_elsewhere_is_left_quietly(
    traced: Traced, otel_log: pytest.LogCaptureFixture
) -> None:
    """Where the collection runs, the application's span was current and stays so."""
    d = traced.dispatcher

    def stream() -> Iterator[int]:
        with d.span("block"):
            yield 1

    gc.disable()
    try:
        _freed_in_a_cycle_elsewhere(stream())
        with traced.tracer.start_as_current_span("app"):
            _collect()
            assert _current_otel_name() == "app"
    finally:
        gc.enable()
    _no_failed_detach(otel_log)
    assert _current_otel_name() is None
    assert sorted(short(s.name) for s in traced.spans()) == ["app", "block"]


def test_a_traced_generator_closed_elsewhere_is_current_again_after_its_block(
    traced: Traced, otel_log: pytest.LogCaptureFixture
) -> None:
    """The generator is current again where it is closed; after its block ends there,
    it is what OpenTelemetry has current (as we do), not the block that ended."""
    d = traced.dispatcher
    seen: list[tuple[str | None, str | None]] = []

    @d.span
    def stream() -> Iterator[int]:
        try:
            with d.span("block"):
                yield 1
        finally:
            ours = current_span()
            seen.append(
                (_current_otel_name(), None if ours is None else short(span_name_of(ours.id_)))
            )
            with traced.tracer.start_as_current_span("cleanup"):
                pass

    gc.disable()
    try:
        _freed_in_a_cycle_elsewhere(stream())
        _collect()
    finally:
        gc.enable()
    _no_failed_detach(otel_log)
    assert seen == [("stream", "stream")]
    spans = {short(s.name): s for s in traced.spans()}
    assert hex_parent(spans["cleanup"]) == hex_span(spans["stream"])
    assert hex_parent(spans["block"]) == hex_span(spans["stream"])
    assert _current_otel_name() is None


async def test_a_block_left_in_a_task_started_inside_it(
    traced: Traced, otel_log: pytest.LogCaptureFixture
) -> None:
    """The task inherited the block as current: once it left the block, nothing of it
    is current there, and a span it starts next is no child of the span that ended."""
    d = traced.dispatcher
    seen: list[str | None] = []

    async def enter_then_leave_in_a_child_task() -> None:
        block = d.span("block")
        block.__enter__()

        async def leave() -> None:
            block.__exit__(None, None, None)
            seen.append(_current_otel_name())
            with traced.tracer.start_as_current_span("next"):
                pass

        await asyncio.create_task(leave())

    await asyncio.create_task(enter_then_leave_in_a_child_task())
    _no_failed_detach(otel_log)
    assert seen == [None]
    spans = {short(s.name): s for s in traced.spans()}
    assert spans["next"].parent is None


async def test_a_block_left_in_another_task_leaves_that_tasks_own_span_current(
    traced: Traced, otel_log: pytest.LogCaptureFixture
) -> None:
    """Where the block never was current, what is current stays so."""
    d = traced.dispatcher
    block = d.span("block")
    seen: list[str | None] = []

    async def enter() -> None:
        block.__enter__()

    async def leave() -> None:
        with traced.tracer.start_as_current_span("app"):
            block.__exit__(None, None, None)
            seen.append(_current_otel_name())

    await asyncio.create_task(enter())
    await asyncio.create_task(leave())
    _no_failed_detach(otel_log)
    assert seen == ["app"]
    assert sorted(short(s.name) for s in traced.spans()) == ["app", "block"]


async def test_an_async_generator_holding_a_block_closed_by_the_loop(
    traced: Traced, otel_log: pytest.LogCaptureFixture
) -> None:
    """Left by ``break``: the loop closes it in a task of its own, which inherited the
    block as current from where the generator last ran; it ends with the block there."""
    d = traced.dispatcher
    seen: list[str | None] = []

    async def stream() -> AsyncIterator[int]:
        try:
            async with d.span("block"):
                yield 1
                yield 2
        finally:
            seen.append(_current_otel_name())

    async def read_one() -> None:
        async for _ in stream():
            break

    await asyncio.create_task(read_one())
    for _ in range(5):
        await asyncio.sleep(0)
    _no_failed_detach(otel_log)
    assert seen == [None]
    assert [short(s.name) for s in traced.spans()] == ["block"]


def test_a_hand_made_span_reset_in_another_context(
    traced: Traced, otel_log: pytest.LogCaptureFixture
) -> None:
    """``active_span_id.set`` in one context and ``reset`` in another, LlamaIndex-style."""
    d = traced.dispatcher
    span_id = "manual-0123456789abcdef"
    d.span_enter(id_=span_id, bound_args=EMPTY_BOUND_ARGS)
    token = contextvars.copy_context().run(active_span_id.set, span_id)
    with traced.tracer.start_as_current_span("app"):
        active_span_id.reset(token)
        assert _current_otel_name() == "app"
    d.span_exit(id_=span_id, bound_args=EMPTY_BOUND_ARGS)
    _no_failed_detach(otel_log)
    assert _current_otel_name() is None


def test_a_block_closed_in_the_same_context_inside_a_later_call_leaves_otel_alone(
    traced: Traced, otel_log: pytest.LogCaptureFixture
) -> None:
    """Advanced inside one call and closed inside the next, on the same thread: the
    block's reset made the first call, ended, current again in OpenTelemetry's context
    too, and the second call's child became the first's."""
    d = traced.dispatcher

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

    seen: list[str | None] = []

    @d.span
    def second(gen: Iterator[int]) -> None:
        gen.close()  # type: ignore[attr-defined]
        seen.append(_current_otel_name())
        child()

    second(first())
    _no_failed_detach(otel_log)
    assert seen == ["second"]
    spans = {short(s.name): s for s in traced.spans()}
    assert hex_parent(spans["child"]) == hex_span(spans["second"])
    assert _current_otel_name() is None
