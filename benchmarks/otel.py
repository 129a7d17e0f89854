"""Cost of a decorated call exported as configure_otlp() sets it up, beside the SDK's own.

Per call:

- ours: ``@dispatcher.span`` on a no-op function, on a dispatcher given to
  ``configure_otlp(exporter=...)``: our handler, our ``AccountedBatchSpanProcessor``
  and ``SuppressedExporter``, exactly what ``configure_otlp`` builds;
- SDK: the same no-op inside ``with tracer.start_as_current_span("work"):`` on a plain
  ``TracerProvider`` with the SDK's own ``BatchSpanProcessor``;
- also the SDK's span on configure_otlp's provider, which isolates our processor's
  cost (the accounts: one lock and a queue check per span).

Every exporter accepts the batches and keeps nothing (so the figures are the cost on
the application's thread, not the network's). Both batch processors get the same
queue size (``OTEL_BSP_MAX_QUEUE_SIZE``, set here so that no span is dropped: a drop
costs differently on each side); the accounts printed at the end show nothing was.

Prints the fastest of the repeats for each (microseconds per call; on a shared
machine the slower samples measure the neighbours) and the ratio (target: <= 1.5).
Usage: python benchmarks/otel.py [--quick]
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from instrumentation import get_dispatcher
from instrumentation.otel import configure_otlp
from instrumentation.otel.configure import AccountedBatchSpanProcessor


class DropExporter(SpanExporter):
    """Accepts every batch and keeps nothing."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def per_call_us(func: Callable[[], object], calls: int, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            func()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return min(samples)


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    calls, repeats = (2_000, 5) if quick else (20_000, 9)
    os.environ.setdefault("OTEL_BSP_MAX_QUEUE_SIZE", "100000")

    sdk_provider = TracerProvider()
    sdk_provider.add_span_processor(BatchSpanProcessor(DropExporter()))
    sdk_tracer = sdk_provider.get_tracer("benchmark")

    dispatcher = get_dispatcher("benchmarks.otel")
    handle = configure_otlp(exporter=DropExporter(), dispatcher=dispatcher)
    processors = handle.tracer_provider._active_span_processor._span_processors
    assert [type(p) for p in processors] == [AccountedBatchSpanProcessor], processors
    handle_tracer = handle.tracer_provider.get_tracer("benchmark")

    @dispatcher.span
    def ours() -> int:
        return 1

    def sdk() -> int:
        with sdk_tracer.start_as_current_span("work"):
            return 1

    def sdk_on_ours() -> int:
        with handle_tracer.start_as_current_span("work"):
            return 1

    def bare() -> int:
        return 1

    sides = {"ours": ours, "sdk": sdk, "sdk_on_ours": sdk_on_ours}
    for func in sides.values():  # warm up
        per_call_us(func, calls // 10, 1)
    best = dict.fromkeys(sides, float("inf"))
    for _ in range(3):  # interleave, so a noisy neighbour hurts every side alike
        for name, func in sides.items():
            best[name] = min(best[name], per_call_us(func, calls, repeats))
    bare_us = per_call_us(bare, calls, repeats)
    ratio = best["ours"] / best["sdk"]
    rows = [
        ("plain call", bare_us),
        ("SDK start_as_current_span, SDK BatchSpanProcessor", best["sdk"]),
        ("SDK start_as_current_span, configure_otlp's provider", best["sdk_on_ours"]),
        ("@dispatcher.span, configure_otlp (handler+processor)", best["ours"]),
    ]
    for label, us in rows:
        print(f"{label:53}{us:8.2f} us/call")
    print(f"{'ratio ours/SDK':53}{ratio:8.2f}x  (target <= 1.5x)")
    clean = handle.shutdown()
    sdk_provider.shutdown()
    accounts = handle.exporter.accounts()
    print(
        f"configure_otlp's accounts: {accounts.handed} spans handed, {accounts.exported} "
        f"exported, {accounts.dropped} dropped, {accounts.not_exported} not exported"
    )
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
