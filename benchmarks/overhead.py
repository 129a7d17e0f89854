"""Overhead of the core beside llama-index-instrumentation, in one process.

Prints, for each case, our time per call, the peer's, and the ratio, then memory
kept after 100,000 spans. Targets (issue #3): no-handler decorated call at most 3x
a functools.wraps pass-through; SimpleSpanHandler at least 15x faster than the peer
(async 10x); event() with one handler at least 4x faster; at most 20 MB after
100,000 spans. Run with ``make bench`` (or ``python benchmarks/overhead.py``).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

import instrumentation as ours
from instrumentation.event_handlers import BaseEventHandler as OurEventHandler
from instrumentation.events import BaseEvent as OurEvent
from instrumentation.span_handlers import SimpleSpanHandler as OurSimple

try:
    import llama_index_instrumentation as peer
    from llama_index_instrumentation.base import BaseEvent as PeerEvent
    from llama_index_instrumentation.event_handlers import BaseEventHandler as PeerEventHandler
    from llama_index_instrumentation.span_handlers import SimpleSpanHandler as PeerSimple
except ImportError:  # pragma: no cover
    peer = None

QUICK = "--quick" in sys.argv
N = 20_000 if QUICK else 100_000
REPEATS = 5 if QUICK else 7


def per_call(fn: Callable[[], Any], n: int = N) -> float:
    """The fastest of the repeats' times per call, in microseconds.

    The least disturbed sample, as ``timeit`` advises: on a shared machine the others
    measure the neighbours, and a median flips between two levels from run to run.
    """
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(n // 10):
            fn()
            fn()
            fn()
            fn()
            fn()
            fn()
            fn()
            fn()
            fn()
            fn()
        samples.append((time.perf_counter() - start) / n * 1e6)
    return min(samples)


def per_call_async(make: Callable[[], Any], n: int = N) -> float:
    async def run() -> float:
        samples = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            for _ in range(n):
                await make()
            samples.append((time.perf_counter() - start) / n * 1e6)
        return min(samples)

    return asyncio.run(run())


def fresh_noop() -> Callable[[], None]:
    """A new function each time: the peer marks the function it decorates, so
    decorating the same function twice silently returns it undecorated."""

    def noop() -> None:
        return None

    return noop


noop = fresh_noop()


def passthrough(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return wrapper


class OurCounting(OurEventHandler):
    count: int = 0

    def handle(self, event: Any, **kwargs: Any) -> None:
        self.count += 1


class _NoFields(BaseModel):
    pass


def row(label: str, mine: float, theirs: float | None, target: str = "") -> None:
    if theirs is None:
        print(f"{label:<44} {mine:9.3f} us {'-':>12} {'':>9}  {target}")
    else:
        print(f"{label:<44} {mine:9.3f} us {theirs:9.3f} us {theirs / mine:8.1f}x  {target}")


def reset_ours() -> None:
    ours.root_dispatcher.event_handlers = []
    ours.root_dispatcher.span_handlers = []


def memory_after_spans(
    decorate: Callable[[Callable[..., Any]], Callable[..., Any]], n: int, handler: Any
) -> float:
    """Memory kept after ``n`` spans, once the handler's spans have been read (our
    SimpleSpanHandler makes span objects only when they are read: count the worst case)."""
    fn = decorate(fresh_noop())
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(n):
        fn()
    len(list(handler.completed_spans))
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / 1e6


def main() -> None:
    print(f"Python {sys.version.split()[0]}, {N} calls per sample, fastest of {REPEATS}")
    print(f"{'case':<44} {'ours':>12} {'peer':>12} {'ratio':>9}")
    bare = per_call(noop)
    wrapped = per_call(passthrough(noop))
    row("bare call", bare, None)
    row("functools.wraps pass-through", wrapped, None)

    # -- no handler -----------------------------------------------------------------
    reset_ours()
    d = ours.get_dispatcher("bench.nohandler")
    ours_none = per_call(d.span(fresh_noop()))
    peer_default = None
    if peer is not None:
        pd = peer.get_dispatcher("bench.nohandler")
        peer_default = per_call(pd.span(fresh_noop()))
    row(
        "decorated call, no handler (peer: defaults)",
        ours_none,
        peer_default,
        f"target <= 3x pass-through: {ours_none / wrapped:.2f}x",
    )

    # -- SimpleSpanHandler ------------------------------------------------------------
    reset_ours()
    handler = OurSimple()
    ours.root_dispatcher.add_span_handler(handler)
    d = ours.get_dispatcher("bench.simple")
    ours_simple = per_call(d.span(fresh_noop()))
    peer_simple = None
    peer_handler = None
    if peer is not None:
        peer_handler = PeerSimple()
        peer.root_dispatcher.add_span_handler(peer_handler)
        pd = peer.get_dispatcher("bench.simple")
        peer_simple = per_call(pd.span(fresh_noop()), n=N // 5)
    ratio = f"target >= 15x: {peer_simple / ours_simple:.1f}x" if peer_simple else ""
    row("decorated call, SimpleSpanHandler", ours_simple, peer_simple, ratio)

    async def anoop() -> None:
        return None

    ours_async = per_call_async(d.span(anoop))
    peer_async = None
    if peer is not None:
        peer_async = per_call_async(pd.span(anoop), n=N // 5)
    ratio = f"target >= 10x: {peer_async / ours_async:.1f}x" if peer_async else ""
    row("async decorated call, SimpleSpanHandler", ours_async, peer_async, ratio)

    # -- event() ----------------------------------------------------------------------
    reset_ours()
    counting = OurCounting()
    ours.root_dispatcher.add_event_handler(counting)
    de = ours.get_dispatcher("bench.event")
    ours_event = per_call(lambda: de.event(OurEvent()))
    peer_event = None
    if peer is not None:

        class PeerCounting(PeerEventHandler):
            count: int = 0

            def handle(self, event: Any, **kwargs: Any) -> None:
                self.count += 1

        peer.root_dispatcher.event_handlers = [PeerCounting()]
        pe = peer.get_dispatcher("bench.event")
        peer_event = per_call(lambda: pe.event(PeerEvent()))
    ratio = f"target >= 4x: {peer_event / ours_event:.1f}x" if peer_event else ""
    row("event() with one handler, incl. creation", ours_event, peer_event, ratio)
    # Where the time goes: building the event, dispatching a ready one, and what
    # pydantic alone costs for a model with no fields (a floor both sides share).
    built = OurEvent()
    ours_build = per_call(OurEvent)
    ours_dispatch = per_call(lambda: de.event(built))
    peer_build = peer_dispatch = None
    if peer is not None:
        peer_built = PeerEvent()
        peer_build = per_call(PeerEvent)
        peer_dispatch = per_call(lambda: pe.event(peer_built))
    row("  of which: creating the event", ours_build, peer_build)
    row("  of which: event() of a ready event", ours_dispatch, peer_dispatch)
    row("  floor: pydantic BaseModel() with no fields", per_call(_NoFields), None)
    row("  floor: the handler's `self.count += 1`", per_call(lambda: counting.handle(built)), None)

    # -- memory -----------------------------------------------------------------------
    reset_ours()
    mem_handler = OurSimple()
    ours.root_dispatcher.add_span_handler(mem_handler)
    dm = ours.get_dispatcher("bench.memory")
    ours_mb = memory_after_spans(dm.span, 100_000, mem_handler)
    peer_mb = None
    if peer is not None:
        peer_mem_handler = PeerSimple()
        peer.root_dispatcher.span_handlers = [peer_mem_handler]
        pm = peer.get_dispatcher("bench.memory")
        peer_mb = memory_after_spans(pm.span, 100_000, peer_mem_handler)
    print(
        f"{'memory kept after 100,000 spans':<44} {ours_mb:9.1f} MB "
        + (f"{peer_mb:9.1f} MB {peer_mb / max(ours_mb, 0.01):8.1f}x" if peer_mb is not None else "")
        + f"  target <= 20 MB (keeps {len(mem_handler.completed_spans)} spans)"
    )
    reset_ours()

    # -- set-up: a large application's dispatchers ---------------------------------------
    # One per module, as ``get_dispatcher(__name__)`` makes them: the cost is paid at
    # import, and again (for the chains below it) at each handler change.
    def make_tree(get: Callable[[str], Any], top: str) -> float:
        gc.collect()
        gc.disable()  # as timeit does: the spans kept above are not this case's cost
        try:
            start = time.perf_counter()
            for i in range(1000):
                get(f"{top}.pkg{i % 20}.mod{i}")
            return (time.perf_counter() - start) * 1e6 / 1000
        finally:
            gc.enable()

    make_tree(ours.get_dispatcher, "bench_warm")  # the first thousand pay for warming up
    ours_make = make_tree(ours.get_dispatcher, "bench_tree")
    peer_make = None
    if peer is not None:
        make_tree(peer.get_dispatcher, "bench_warm")
        peer_make = make_tree(peer.get_dispatcher, "bench_tree")
    row("making a dispatcher, among 1,000 others", ours_make, peer_make)
    handler = OurSimple()
    count = len(ours.root_manager.dispatchers)
    start = time.perf_counter()
    for _ in range(10):
        ours.root_dispatcher.add_span_handler(handler)
        ours.root_dispatcher.remove_span_handler(handler)
    ours_change = (time.perf_counter() - start) * 1e6 / 20
    row(
        f"attaching a root handler, {count:,} dispatchers",
        ours_change,
        None,
        "rebuilds their cached chains",
    )
    reset_ours()


if __name__ == "__main__":
    main()
