"""Each handler gets back exactly its own contexts, under heavy interleaving."""

from __future__ import annotations

import asyncio
import random

import pytest

from instrumentation import ContextThreadPoolExecutor, audit, get_dispatcher
from instrumentation.llms import ChatMessage, OfflineLLM

from .helpers import AsyncRecorder, SyncRecorder


async def test_thousand_interleaved_async_requests() -> None:
    sync_handler, async_handler = SyncRecorder(), AsyncRecorder()
    llm = OfflineLLM(latency_s=0.001)
    rng = random.Random(5)

    async def one(i: int) -> None:
        question = f"question number {i}."
        async with audit.request(
            question=question, collection="c", handlers=[sync_handler, async_handler], timeout=60
        ) as req:
            await asyncio.sleep(rng.random() * 0.01)
            first = await llm.achat([ChatMessage(role="user", content=question)])
            await asyncio.sleep(rng.random() * 0.01)
            await llm.acomplete(question + " again")
            req.result = first.message.content
        assert req.completed

    await asyncio.gather(*(one(i) for i in range(1000)))
    for handler in (sync_handler, async_handler):
        handler.rec.check(expected_requests=1000, events_per_request=2)
        questions = {ctx.question for ctx in handler.rec.returned_request.values()}
        assert len(questions) == 1000
        for output, ctx in handler.rec.request_ends:
            assert output.result == f"Echo: {ctx.question}"


def test_requests_across_threads() -> None:
    handlers = [SyncRecorder(), AsyncRecorder(pause=0.001)]
    llm = OfflineLLM()

    def one(i: int) -> str:
        question = f"thread question {i}."
        with audit.request(question=question, handlers=handlers) as req:
            req.result = llm.chat([ChatMessage(role="user", content=question)]).message.content
        return req.id

    with ContextThreadPoolExecutor(max_workers=8) as pool:
        ids = list(pool.map(one, range(200)))
    assert len(set(ids)) == 200
    for handler in handlers:
        handler.rec.check(expected_requests=200, events_per_request=1)


def test_one_request_whose_llm_calls_run_in_threads() -> None:
    handler = SyncRecorder()
    llm = OfflineLLM(latency_s=0.005)
    with (
        audit.request(question="fan out", handlers=[handler]),
        ContextThreadPoolExecutor(max_workers=4) as pool,
    ):
        list(
            pool.map(
                lambda i: llm.chat([ChatMessage(role="user", content=f"fan out {i}")]),
                range(8),
            )
        )
    handler.rec.check(expected_requests=1, events_per_request=8)


@pytest.mark.parametrize("handler_type", [SyncRecorder, AsyncRecorder])
async def test_adapter_requests_interleaved(handler_type: type) -> None:
    d = get_dispatcher("tests.audit.interleaved")
    handler = handler_type()
    adapter = audit.attach(d, [handler], timeout=0)  # async app: do not block the loop
    llm = OfflineLLM(latency_s=0.001)

    @d.span(request=True)
    async def ask(question: str) -> str:
        await asyncio.sleep(0.001)
        reply = await llm.achat([ChatMessage(role="user", content=question)])
        return str(reply.message.content)

    await asyncio.gather(*(ask(f"adapter question {i}.") for i in range(200)))
    assert adapter.active_requests == 0
    assert await adapter.aflush(timeout=30)  # timeout=0: they finished in the background
    handler.rec.check(expected_requests=200, events_per_request=1)


async def test_streamed_llm_calls_are_one_event_each() -> None:
    handler = SyncRecorder()
    llm = OfflineLLM(answers={"stream": "one two three four"})
    async with audit.request(question="stream please", handlers=[handler]) as req:
        chunks = await llm.astream_chat([ChatMessage(role="user", content="stream please")])
        req.result = "".join([c.delta or "" async for c in chunks])
        for _ in llm.stream_chat([ChatMessage(role="user", content="stream please")]):
            pass
    handler.rec.check(expected_requests=1, events_per_request=2)
    assert [e.response for _, _, e in handler.rec.event_ends] == ["one two three four"] * 2
