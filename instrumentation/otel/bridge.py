"""Join our context and OpenTelemetry's, in both directions.

The core knows other tracing systems only through the ``ContextBridge`` protocol
(:func:`instrumentation.context.register_bridge`). This bridge, registered while any
:class:`~instrumentation.otel.table.SpanTable` is alive, does two things:

- ``attach``: whenever one of our spans becomes current (enter, and every resume of
  a generator), the OpenTelemetry span made for it becomes current in
  OpenTelemetry's context too, so ``tracer.start_as_current_span(...)`` inside a
  decorated function makes a child of our span. A span of ours that no handler turned
  into an OpenTelemetry span (its dispatcher has no such handler) is made current as a
  non-recording span with our ids, so foreign children still point at the right parent.
- ``parent_for``: when a span of ours starts while a *foreign* OpenTelemetry span is
  current (one started by the application or by another instrumentation, after our
  innermost span), that foreign span is its parent and its trace is ours.

- ``restore``: ``restore_propagation_context`` makes the remote parent current in
  OpenTelemetry's context as well (a non-recording span with its ids, its trace flags
  and its ``tracestate``), with the ``baggage`` received, so an OpenTelemetry span
  started next continues the restored trace, and is sampled or not as the sender
  decided, and ``opentelemetry.baggage`` reads what the sender set.
- ``propagation``: ``capture_propagation_context`` sends the trace flags and the
  ``tracestate`` of the current OpenTelemetry span, and the baggage of
  OpenTelemetry's current context, as OpenTelemetry's own propagators would.

How "more recent" is decided without clocks: since ``attach`` makes each of our spans
current in OpenTelemetry's context, the current OpenTelemetry span is our innermost
span's unless something foreign was started inside it. The same holds for a parent
restored while this bridge was registered: an OpenTelemetry span current instead of
it was started after the restore, and is the parent. A parent restored before (the
bridge could not mirror it) is kept, because the application asked for it.
"""

from __future__ import annotations

import threading
import weakref
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, cast

from opentelemetry import context as otel_context
from opentelemetry import trace as trace_api
from opentelemetry.baggage.propagation import W3CBaggagePropagator

from instrumentation.context import (
    RemoteSpanContext,
    SpanContext,
    current_span,
    register_bridge,
    register_context_keeper,
    restored_propagation,
    span_hex_of,
    unregister_bridge,
)

if TYPE_CHECKING:
    from instrumentation.otel.spans import SpanTable

_SAMPLED = trace_api.TraceFlags(trace_api.TraceFlags.SAMPLED)
_UNSAMPLED = trace_api.TraceFlags(trace_api.TraceFlags.DEFAULT)

#: The remote parent :meth:`OpenTelemetryBridge.restore` mirrored in this context (None:
#: only baggage was), the OpenTelemetry context it replaced (what restoring no span puts
#: back), and the one it attached (to tell whether the mirror is still what is current
#: there).
_mirrored: ContextVar[
    tuple[SpanContext | None, otel_context.Context, otel_context.Context] | None
] = ContextVar("instrumentation_otel_mirrored_parent", default=None)
_BAGGAGE = W3CBaggagePropagator()
_get_current_span = trace_api.get_current_span
_set_span_in_context = trace_api.set_span_in_context
_attach = otel_context.attach
_detach = otel_context.detach
#: What OpenTelemetry's context holds where nothing was ever attached.
_EMPTY_CONTEXT = otel_context.Context()


def _undo_mirror() -> None:
    """Put back OpenTelemetry's context from before ``restore`` mirrored a parent, if
    the mirror is still current: a span the application started on top of it since
    stays current (it puts the mirror back itself when it ends)."""
    mirrored = _mirrored.get()
    if mirrored is not None:
        _mirrored.set(None)
        if otel_context.get_current() is mirrored[2]:
            _attach(mirrored[1])


def received_flags_and_state(
    trace_id: str, default: trace_api.TraceFlags
) -> tuple[trace_api.TraceFlags, trace_api.TraceState | None]:
    """The trace flags and trace state ``restore_propagation_context`` received in this
    context for trace ``trace_id``; ``default`` and None for another trace, or none."""
    received = restored_propagation()
    if received is None or received.trace_id != trace_id:
        return default, None
    state = received.tracestate
    return (
        trace_api.TraceFlags(received.flags),
        trace_api.TraceState.from_header([state]) if state else None,
    )


def foreign_parent(span_context: trace_api.SpanContext) -> SpanContext:
    """Our view of an OpenTelemetry span: 16-hex id, 32-hex trace id, ``remote``."""
    return RemoteSpanContext(
        format(span_context.span_id, "016x"), format(span_context.trace_id, "032x"), None, None
    )


def stand_in_context(span: SpanContext) -> otel_context.Context:
    """An OpenTelemetry context whose current span carries ``span``'s ids (not recorded).

    Its sampled flag and trace state are those of the OpenTelemetry span current where
    it becomes current when that one is in the same trace (its parent, or an ancestor):
    a span of ours no handler exported, inside a trace its root chose not to sample,
    must not make the spans started inside it sampled (a parent-based sampler would
    export them, children of a parent no backend has). Otherwise those a restore in this
    context received for the trace (restored before any bridge could mirror it), else
    sampled.
    """
    trace_id = int(span.trace_id, 16)
    current = _get_current_span().get_span_context()
    state: trace_api.TraceState | None
    if current.is_valid and current.trace_id == trace_id:
        flags, state = current.trace_flags, current.trace_state
    else:
        flags, state = received_flags_and_state(span.trace_id, _SAMPLED)
    ids = trace_api.SpanContext(
        trace_id,
        int(span_hex_of(span.id_), 16),
        is_remote=False,
        trace_flags=flags,
        trace_state=state,
    )
    return _set_span_in_context(trace_api.NonRecordingSpan(ids))


class OpenTelemetryBridge:
    """The one bridge of this process; each handler's span table registers with :meth:`add`.

    Thread-safe: the table list is a tuple of weak references replaced under a lock
    and read without one. ``attach``/``detach``/``parent_for`` never raise.
    """

    def __init__(self) -> None:
        self._tables: tuple[weakref.ref[SpanTable], ...] = ()
        self._lock = threading.Lock()

    # -- which tables exist -------------------------------------------------------------

    def add(self, table: SpanTable) -> None:
        with self._lock:
            live = tuple(r for r in self._tables if r() is not None)
            if not any(r() is table for r in live):
                live = (*live, weakref.ref(table))
            self._tables = live
        register_bridge(self)

    def remove(self, table: SpanTable) -> None:
        """Stop bridging for ``table``; with no table left, leave the core's bridges.

        Unregistering is safe while one of our spans is current somewhere: the core
        keeps each bridge's token with the activation and detaches it all the same.
        """
        with self._lock:
            self._tables = tuple(r for r in self._tables if r() is not None and r() is not table)
            empty = not self._tables
        if empty:
            unregister_bridge(self)

    def tables(self) -> list[SpanTable]:
        return [t for t in (r() for r in self._tables) if t is not None]

    # -- the ContextBridge protocol ------------------------------------------------------

    def parent_for(self, own: SpanContext | None) -> SpanContext | None:
        if not self._tables:
            return own
        if own is not None and own.remote:
            mirrored = _mirrored.get()
            if mirrored is None or mirrored[0] is not own:
                return own  # restored before this bridge could mirror it: kept
        current = _get_current_span().get_span_context()
        if not current.is_valid:
            return own
        if own is not None and int(span_hex_of(own.id_), 16) == current.span_id:
            return own
        return foreign_parent(current)

    def attach(self, span: SpanContext) -> object:
        span_id = span.id_
        live = False
        for ref in self._tables:
            table = ref()
            if table is None:
                continue  # a handler dropped without close()
            live = True
            opened = table.open.get(span_id)
            if opened is not None:
                context = opened.context
                return _attach(context), context
        if not live:
            return None
        context = stand_in_context(span)
        return _attach(context), context

    def detach(self, token: Any) -> None:
        """Undo what :meth:`attach` or :meth:`reattach` did, in any context.

        The token may come back in another context than the one it was made in: a
        block in a generator the garbage collector closes on whatever thread it runs,
        an async generator the loop closes in a task of its own, a block entered in one
        task and left in another. OpenTelemetry's ``detach`` cannot reset it there and
        logs "Failed to detach context" with a traceback, an error the application did
        not make. Nor would doing nothing be right: where the span is still current
        (inherited from where it became current, or made current again by a
        generator's resume), it stayed so after its end, and what started next there
        was its child. So there, what it replaced becomes current again; where
        something else is current (the span never was, or a span started since is),
        that stays. Its attached context is kept with the token to tell the two apart.
        """
        if token is None:
            return
        made, attached = token
        if type(made) is not Token:  # another runtime context than contextvars
            _detach(made)
            return
        try:
            made.var.reset(made)  # what OpenTelemetry's detach does, minus its log
        except ValueError:  # made in another context
            if otel_context.get_current() is attached:
                before = made.old_value
                _attach(_EMPTY_CONTEXT if before is Token.MISSING else before)
        except RuntimeError:  # used already: a bug of ours, which OpenTelemetry reports
            _detach(made)

    def capture(self) -> otel_context.Context:
        """OpenTelemetry's context inside a generator that yields now."""
        return otel_context.get_current()

    def reattach(self, state: otel_context.Context) -> object:
        """Make current again, as the generator resumes, what :meth:`capture` saw."""
        return _attach(state), state

    def sampled(self) -> bool | None:
        """The sampled flag of the current OpenTelemetry span (the one made for our
        current span, or a foreign one inside it); None when there is none."""
        if not self._tables:
            return None
        current = _get_current_span().get_span_context()
        if current.is_valid:
            return bool(current.trace_flags.sampled)
        ours = current_span()
        if ours is not None and any(ours.id_ in table.open for table in self.tables()):
            # A table made a span for ours, and OpenTelemetry gave it no ids: a no-op
            # tracer (OTEL_SDK_DISABLED, no provider set). No backend will have it.
            return False
        return None

    def propagation(self, span: SpanContext | None) -> tuple[int | None, str | None, str | None]:
        """What OpenTelemetry's propagators would send where ``span`` is current: the
        trace flags and ``tracestate`` of the current OpenTelemetry span (when in
        ``span``'s trace), and the baggage of the current context. ``""``: known to be
        empty; None: OpenTelemetry does not know (the core then sends what a restore
        received, if any)."""
        if not self._tables:
            return None, None, None
        flags: int | None = None
        state: str | None = None
        current = _get_current_span().get_span_context()
        if span is not None and current.is_valid and current.trace_id == int(span.trace_id, 16):
            flags = int(current.trace_flags)
            state = current.trace_state.to_header() if current.trace_state else ""
        carrier: dict[str, str] = {}
        _BAGGAGE.inject(carrier)
        baggage = carrier.get("baggage")
        if baggage is None and _mirrored.get() is not None:
            baggage = ""  # a restore put what it received there, and it was taken off
        return flags, state, baggage

    def restore(self, parent: SpanContext | None, sampled: bool) -> None:
        """Make ``parent`` current in OpenTelemetry's context too, with the trace flags
        and trace state received, and the baggage (no token: like
        ``restore_propagation_context`` itself, it is not undone).

        Restoring no span hides no span of the application's own (a server or task
        span stays the parent); it only takes back what an earlier restore mirrored
        (and adds the baggage received, if any).
        """
        if not self._tables:
            return
        received = restored_propagation()
        baggage = None if received is None else received.baggage
        if parent is None and not baggage:
            _undo_mirror()
            return
        # Replacing a mirror still current: what it replaced is what to put back.
        mirrored = _mirrored.get()
        current = otel_context.get_current()
        before = mirrored[1] if mirrored is not None and current is mirrored[2] else current
        mine = before
        if baggage:
            mine = _BAGGAGE.extract({"baggage": baggage}, mine)
        if parent is not None:
            flags, state = received_flags_and_state(
                parent.trace_id, _SAMPLED if sampled else _UNSAMPLED
            )
            ids = trace_api.SpanContext(
                int(parent.trace_id, 16),
                int(span_hex_of(parent.id_), 16),
                is_remote=True,
                trace_flags=flags,
                trace_state=state,
            )
            mine = _set_span_in_context(trace_api.NonRecordingSpan(ids), mine)
        _attach(mine)
        _mirrored.set((parent, before, mine))


class _OpenTelemetryContextKeeper:
    """Lets the test kit put back OpenTelemetry's context (and our mirror in it)."""

    def save(self) -> object:
        return (otel_context.get_current(), _mirrored.get())

    def put_back(self, state: object | None) -> None:
        if state is None:  # first used after the save: undo only what restore() did
            _undo_mirror()
            return
        current, mirrored_then = cast("tuple[otel_context.Context, Any]", state)
        _attach(current)
        _mirrored.set(mirrored_then)


#: The bridge every handler in this process shares.
BRIDGE = OpenTelemetryBridge()
register_context_keeper(_OpenTelemetryContextKeeper())

__all__: list[str] = []
