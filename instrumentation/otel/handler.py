"""One handler that turns our spans and events into OpenTelemetry spans and span events.

``OpenTelemetrySpanHandler`` is a span handler *and* an event handler: it subclasses
both bases (pydantic allows it), so the same object goes to ``add_span_handler`` and
``add_event_handler``. It overrides ``span_enter``/``span_exit``/``span_drop``
directly (there is no intermediate span model) and offers the dispatcher positional
versions of enter and exit, backed by a plain :class:`SpanTable` (see :mod:`.spans`
for why, and for how ids are made to agree).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, ClassVar

from opentelemetry import trace as trace_api
from pydantic import ConfigDict, Field, PrivateAttr

from instrumentation.event_handlers.base import BaseEventHandler
from instrumentation.events.base import BaseEvent
from instrumentation.otel.bridge import BRIDGE
from instrumentation.otel.spans import SpanTable
from instrumentation.span.base import BaseSpan
from instrumentation.span_handlers.base import BaseSpanHandler

_CLOSED_TEXT = "instrumentation shut down while the span was open"


class OpenTelemetrySpanHandler(BaseSpanHandler[BaseSpan], BaseEventHandler):
    """Every span becomes an OpenTelemetry span; every event a span event on its span.

    - ``tracer_provider``: the ``TracerProvider`` to use; ``None`` means the global
      one (looked up again until the application sets a real one).
    - ``openinference``: also set OpenInference attributes (for Phoenix).
    - ``capture_content``: put prompt and completion text on LLM spans (already
      redacted by the LLM layer); off keeps only counts, models and parameters.

    The options are read when the handler is made. Span names are the ``name`` the
    dispatcher passes (the decorated function's qualified name); a dropped span gets
    status ERROR with the exception recorded. Creating a handler registers the
    OpenTelemetry context bridge (see :mod:`.bridge`); ``close()`` unregisters it.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    tracer_provider: Any = Field(default=None, exclude=True)
    openinference: bool = False
    capture_content: bool = True

    #: We never read the call's arguments: the dispatcher need not bind them for us.
    needs_bound_args: ClassVar[bool] = False

    _table: SpanTable = PrivateAttr()
    if TYPE_CHECKING:
        # The same table, put straight in __dict__ by model_post_init: a pydantic
        # private attribute is read through BaseModel.__getattr__ (over a microsecond),
        # and handle() and span_drop() read it for every event and dropped span.
        @property
        def _fast_table(self) -> SpanTable: ...

    def __init__(self, tracer_provider: Any = None, **data: Any) -> None:
        # Positional for LlamaIndex-style calls; a field like the others from here on.
        data["tracer_provider"] = tracer_provider
        super().__init__(**data)

    def model_post_init(self, __context: Any) -> None:
        super().model_post_init(__context)
        provider = self.tracer_provider
        if isinstance(provider, type):
            raise TypeError(
                f"tracer_provider takes a TracerProvider instance; got the class "
                f"{provider.__name__} itself: write {provider.__name__}(...)"
            )
        if provider is not None and not hasattr(provider, "get_tracer"):
            raise TypeError(
                "tracer_provider must be an OpenTelemetry TracerProvider (or None for the "
                f"global one); got {type(provider).__name__}"
            )
        self._table = table = SpanTable(provider, self.openinference, self.capture_content)
        self.__dict__["_fast_table"] = table
        BRIDGE.add(table)

    @property
    def table(self) -> SpanTable:
        """The span table behind this handler (its ``open`` dict maps our ids to spans)."""
        return self._table

    def tracer_for(self, dispatcher: str | None) -> Any:
        """The OpenTelemetry tracer the spans of ``dispatcher`` are made with."""
        return self._table.tracer_for(dispatcher)

    # -- the dispatcher's fast path ------------------------------------------------------

    @property
    def positional_span_enter(self) -> Any:
        return self._table.enter

    @property
    def positional_span_exit(self) -> Any:
        return self._table.exit

    # -- the span handler protocol -------------------------------------------------------

    def span_enter(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        parent_id: str | None = None,
        tags: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._fast_table.enter(
            id_,
            bound_args,
            instance,
            parent_id,
            tags,
            kwargs.get("name"),
            kwargs.get("trace_id"),
            kwargs.get("dispatcher"),
            kwargs.get("attributes"),
        )

    def span_exit(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        result: Any | None = None,
        **kwargs: Any,
    ) -> None:
        self._fast_table.exit(id_, bound_args, instance, result)

    def span_drop(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        err: BaseException | None = None,
        **kwargs: Any,
    ) -> None:
        self._fast_table.drop(id_, err)

    # -- the event handler protocol ------------------------------------------------------

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        """Add ``event`` to the span it was created in (or the current OpenTelemetry span)."""
        self._fast_table.event(event)

    # -- the rest ------------------------------------------------------------------------

    def open_span_ids(self) -> list[str]:
        """Ids of our spans whose OpenTelemetry span has not ended."""
        return list(self._table.open)

    def close(self) -> None:
        """End spans still open (status ERROR) and stop bridging; the provider stays up.

        Called by ``Dispatcher.shutdown()`` and by the ``configure_otlp`` handle. Safe
        to call twice.
        """
        BRIDGE.remove(self._table)
        self._table.end_all(_CLOSED_TEXT)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Flush the provider's processors (if it can); True when everything was exported."""
        provider = self.tracer_provider or trace_api.get_tracer_provider()
        flush = getattr(provider, "force_flush", None)
        return bool(flush(timeout_millis)) if flush is not None else True

    # Required by the base class; unused because span_enter/exit/drop are overridden.
    def new_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        parent_span_id: str | None = None,
        tags: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> BaseSpan | None:
        return None

    def prepare_to_exit_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        result: Any | None = None,
        **kwargs: Any,
    ) -> BaseSpan | None:
        return None

    def prepare_to_drop_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        err: BaseException | None = None,
        **kwargs: Any,
    ) -> BaseSpan | None:
        return None


__all__ = ["OpenTelemetrySpanHandler"]
