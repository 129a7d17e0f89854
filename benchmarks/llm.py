"""Cost of one instrumented chat call, beside the same through llama-index-instrumentation.

Ours: ``OfflineLLM.chat`` (span + LLMChatStartEvent + LLMChatEndEvent with usage,
latency and cost). The peer: LlamaIndex's LLM pattern emulated on its own dispatcher
- ``@dispatcher.span`` around a ``chat`` method that emits LlamaIndex-style start and
end events (``LLMChatStartEvent(messages, additional_kwargs, model_dict)`` /
``LLMChatEndEvent(messages, response)``, defined here on the peer's ``BaseEvent``) -
doing the very same model work (``OfflineLLM._chat``). Each with no handler and with
one handler counting events. The bare model work is printed as the floor.

Run with ``python benchmarks/llm.py [--quick]`` (or ``make bench``).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import instrumentation as ours
from instrumentation.events.base import BaseEvent as OurEvent
from instrumentation.llms import ChatMessage, ChatResponse, OfflineLLM
from instrumentation.testing import Snapshot

try:
    import llama_index_instrumentation as peer
    from llama_index_instrumentation.base import BaseEvent as PeerEvent
    from llama_index_instrumentation.event_handlers import BaseEventHandler as PeerHandler
except ImportError:  # pragma: no cover
    peer = None  # type: ignore[assignment]

QUICK = "--quick" in sys.argv
N = 3_000 if QUICK else 20_000
REPEATS = 5 if QUICK else 7

MESSAGES = [
    ChatMessage(role="system", content="Answer briefly."),
    ChatMessage(role="user", content="What is the capital of France?"),
]
MODEL = OfflineLLM(answers={"capital": "Paris is the capital of France."})


def per_call(fn: Callable[[], Any], n: int = N) -> float:
    """Median over repeats of the time per call, in microseconds."""
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(samples)


class OurCounter(ours.BaseEventHandler):
    count: int = 0

    def handle(self, event: OurEvent, **kwargs: Any) -> None:
        self.count += 1


def bench_ours() -> tuple[float, float]:
    snapshot = Snapshot()
    try:
        for node in (ours.root_dispatcher,):
            node.event_handlers = []
            node.span_handlers = []
        bare = per_call(lambda: MODEL.chat(MESSAGES))
        counter = OurCounter()
        ours.root_dispatcher.add_event_handler(counter)
        counted = per_call(lambda: MODEL.chat(MESSAGES))
        assert counter.count >= 2 * N, counter.count
    finally:
        snapshot.restore()
    return bare, counted


def bench_peer() -> tuple[float, float] | None:
    if peer is None:
        return None

    class LLMChatStartEvent(PeerEvent):
        messages: list[Any]
        additional_kwargs: dict[str, Any]
        model_dict: dict[str, Any]

    class LLMChatEndEvent(PeerEvent):
        messages: list[Any]
        response: Any = None

    dispatcher = peer.get_dispatcher("bench.peer.llm")

    class PeerLLM:
        def __init__(self, model: OfflineLLM) -> None:
            self.model = model

        @dispatcher.span
        def chat(self, messages: list[ChatMessage], **kwargs: Any) -> ChatResponse:
            dispatcher.event(
                LLMChatStartEvent(
                    messages=messages, additional_kwargs=kwargs, model_dict=self.model.metadata
                )
            )
            response = self.model._chat(messages, **kwargs)
            dispatcher.event(LLMChatEndEvent(messages=messages, response=response))
            return response

    class Counter(PeerHandler):
        count: int = 0

        @classmethod
        def class_name(cls) -> str:
            return "Counter"

        def handle(self, event: Any, **kwargs: Any) -> None:
            self.count += 1

    llm = PeerLLM(MODEL)
    root = peer.get_dispatcher()
    saved = list(root.event_handlers)
    bare = per_call(lambda: llm.chat(MESSAGES))
    counter = Counter()
    root.add_event_handler(counter)
    try:
        counted = per_call(lambda: llm.chat(MESSAGES))
    finally:
        root.event_handlers = saved
    assert counter.count >= 2 * N, counter.count
    return bare, counted


def main() -> int:
    floor = per_call(lambda: MODEL._chat(MESSAGES))
    our_bare, our_counted = bench_ours()
    peer_times = bench_peer()
    print(f"one chat call, {N} calls x {REPEATS} repeats, median us/call")
    print(f"  model work alone (floor)           {floor:8.2f}")
    rows = [("no handler", our_bare), ("counting event handler", our_counted)]
    for i, (label, mine) in enumerate(rows):
        line = f"  {label:<34} ours {mine:8.2f}"
        if peer_times is not None:
            theirs = peer_times[i]
            line += f"   peer {theirs:8.2f}   peer/ours {theirs / mine:5.2f}x"
        print(line)
    print(f"  instrumentation cost, counting handler: ours {our_counted - floor:.2f} us", end="")
    if peer_times is not None:
        print(f", peer {peer_times[1] - floor:.2f} us")
    else:
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
