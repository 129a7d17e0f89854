"""Make the OpenTelemetry SDK use our ids for our spans.

Our spans get their ids before any handler sees them (``"Qualname-<16 hex>"`` and a
32-hex trace id), and ``capture_propagation_context()["traceparent"]`` is built from
them. For that header to name a span the backend has, the OpenTelemetry span made
for one of our spans must carry the same ids. The SDK asks its tracer's
``id_generator`` for ids inside ``Tracer.start_span``; this generator hands out the
ids the handler announced just before the call (per thread), and delegates to the
provider's own generator for every other span.
"""

from __future__ import annotations

import threading

from opentelemetry.sdk.trace.id_generator import IdGenerator


class PendingIdGenerator(IdGenerator):
    """Returns the ids given to :meth:`expect` once, then falls back to ``fallback``.

    Thread-safe: the expected ids live in a ``threading.local``, and ``start_span``
    runs synchronously on the thread that announced them.
    """

    def __init__(self, fallback: IdGenerator) -> None:
        self.fallback = fallback
        self._local = threading.local()

    def expect(self, span_id: int, trace_id: int | None) -> None:
        """Use these ids for the next span started on this thread (``trace_id`` for a root)."""
        local = self._local
        local.span_id = span_id
        local.trace_id = trace_id

    def clear(self) -> None:
        """Forget ids that were announced but not used (a child's trace id, a failed start)."""
        local = self._local
        local.span_id = local.trace_id = None

    def generate_span_id(self) -> int:
        local = self._local
        span_id: int | None = getattr(local, "span_id", None)
        if span_id:
            local.span_id = None
            return span_id
        return int(self.fallback.generate_span_id())

    def generate_trace_id(self) -> int:
        local = self._local
        trace_id: int | None = getattr(local, "trace_id", None)
        if trace_id:
            local.trace_id = None
            return trace_id
        return int(self.fallback.generate_trace_id())

    def is_trace_id_random(self) -> bool:
        # Ours are 128 random bits (instrumentation._ids), but the SDK asks this for
        # every span of the tracer, the application's too when it shares the scope:
        # the provider's own generator answers for those (older SDKs neither ask nor
        # have the method).
        answer = getattr(self.fallback, "is_trace_id_random", None)
        return bool(answer()) if answer is not None else False


__all__: list[str] = []
