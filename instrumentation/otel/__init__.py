"""OpenTelemetry bridge (extra ``[otel]``): export to any OTLP backend, join existing traces.

- :class:`OpenTelemetrySpanHandler`: add it to a dispatcher as span *and* event handler;
  our spans become OpenTelemetry spans (same names, nesting, ids, times, status), our
  events become span events, LLM events add GenAI (and optionally OpenInference)
  attributes.
- :func:`configure_otlp`: provider + batch processor + OTLP exporter + handler on the
  root dispatcher in one call; ``handle.shutdown()`` flushes and detaches.
- :class:`~instrumentation.otel.receiver.OTLPReceiver` (import it from
  ``instrumentation.otel.receiver``): a loopback OTLP/HTTP receiver for tests and demos.
"""

from __future__ import annotations

try:
    import opentelemetry.sdk.trace  # noqa: F401
except ImportError as exc:  # pragma: no cover - the extra is installed in CI
    raise ImportError(
        "instrumentation.otel needs the OpenTelemetry SDK and OTLP exporter: "
        "pip install 'instrumentation[otel]'"
    ) from exc

from instrumentation.otel.configure import OTLPHandle, configure_otlp
from instrumentation.otel.handler import OpenTelemetrySpanHandler

__all__ = ["OTLPHandle", "OpenTelemetrySpanHandler", "configure_otlp"]
