"""Cost of a decorated call exported through OpenTelemetrySpanHandler, beside the SDK's own.

Both sides use one ``TracerProvider`` with a ``BatchSpanProcessor`` and an exporter
that drops the batches (so the figures are the cost on the application's thread, not
the network's). Per call:

- ours: ``@dispatcher.span`` on a no-op function, the handler attached to the dispatcher;
- SDK: the same no-op inside ``with tracer.start_as_current_span("work"):``.

Prints the fastest of the repeats for each (microseconds per call; on a shared
machine the slower samples measure the neighbours) and the ratio (target: <= 1.5).
Usage: python benchmarks/otel.py [--quick]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from instrumentation import get_dispatcher
from instrumentation.otel import OpenTelemetrySpanHandler


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
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(DropExporter(), max_queue_size=1_000_000))
    tracer = provider.get_tracer("benchmark")

    handler = OpenTelemetrySpanHandler(tracer_provider=provider)
    dispatcher = get_dispatcher("benchmarks.otel")
    dispatcher.add_span_handler(handler)
    dispatcher.add_event_handler(handler)

    @dispatcher.span
    def ours() -> int:
        return 1

    def sdk() -> int:
        with tracer.start_as_current_span("work"):
            return 1

    def bare() -> int:
        return 1

    for func in (ours, sdk):  # warm up
        per_call_us(func, calls // 10, 1)
    ours_us: list[float] = []
    sdk_us: list[float] = []
    for _ in range(3):  # interleave, so a noisy neighbour hurts both sides alike
        ours_us.append(per_call_us(ours, calls, repeats))
        sdk_us.append(per_call_us(sdk, calls, repeats))
    bare_us = per_call_us(bare, calls, repeats)
    ours_best, sdk_best = min(ours_us), min(sdk_us)
    ratio = ours_best / sdk_best
    print(f"plain call                                   {bare_us:8.2f} us/call")
    print(f"SDK tracer.start_as_current_span             {sdk_best:8.2f} us/call")
    print(f"@dispatcher.span + OpenTelemetrySpanHandler  {ours_best:8.2f} us/call")
    print(f"ratio ours/SDK                               {ratio:8.2f}x  (target <= 1.5x)")
    dispatcher.remove_span_handler(handler)
    dispatcher.remove_event_handler(handler)
    handler.close()
    provider.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
