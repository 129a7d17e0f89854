"""What is active right now: the current span, the current tags, and suppression.

Everything here lives in ``contextvars``, so it follows asyncio tasks (each task
starts from a copy of its creator's context) and threads started with a copied
context (:class:`instrumentation.threads.Thread`). Nothing here takes a lock.

A *bridge* (see :func:`register_bridge`) lets another tracing system, such as
OpenTelemetry, take part: it can name the parent of a new root span of ours and
make our spans current in its own context while they run. The core knows bridges
only through the small :class:`ContextBridge` protocol and never imports one.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from operator import itemgetter
from typing import Any, NamedTuple, Protocol

from instrumentation import _w3c, telemetry
from instrumentation._bounded import put_bounded
from instrumentation._ids import new_trace_id

_HEX16 = re.compile(r"[0-9a-f]{16}\Z")


class SpanContext(tuple):  # type: ignore[type-arg]
    """The identity of a live span, as children and events see it.

    ``id_`` is the span id handlers receive (``"Qualname-<16 hex digits>"`` for
    decorated calls, as in LlamaIndex); ``trace_id`` is shared by a whole call tree
    (32 hex digits, W3C); ``span_hex`` is the 16-hex-digit W3C span id. ``remote``
    marks a parent that lives in another process or tracing system.

    A tuple underneath: one is made for every traced call, and a tuple is the
    cheapest object Python can make (the hot path calls ``tuple.__new__`` directly).
    """

    __slots__ = ()

    remote = False

    def __new__(
        cls, id_: str, trace_id: str, parent_id: str | None = None, name: str | None = None
    ) -> SpanContext:
        return tuple.__new__(cls, (id_, trace_id, parent_id, name))

    id_: str = property(itemgetter(0))  # type: ignore[assignment]
    trace_id: str = property(itemgetter(1))  # type: ignore[assignment]
    parent_id: str | None = property(itemgetter(2))  # type: ignore[assignment]
    name: str | None = property(itemgetter(3))  # type: ignore[assignment]

    @property
    def span_hex(self) -> str:
        return span_hex_of(self[0])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(id_={self[0]!r}, trace_id={self[1]!r}, "
            f"parent_id={self[2]!r}, name={self[3]!r})"
        )


class RemoteSpanContext(SpanContext):
    """A parent span that lives in another process or another tracing system."""

    __slots__ = ()

    remote = True


def span_hex_of(span_id: str) -> str:
    """The 16-hex-digit W3C span id behind one of our span id strings.

    Decorated spans end in 16 hex digits; any other string (a span id chosen by hand)
    is hashed to 64 bits, so the same string always maps to the same W3C id.
    """
    tail = span_id[-16:]
    if _HEX16.match(tail):
        return tail
    import hashlib

    return hashlib.blake2b(span_id.encode("utf-8"), digest_size=8).hexdigest()


_active_span: ContextVar[SpanContext | None] = ContextVar(
    "instrumentation_active_span", default=None
)


class _NoTags(dict[str, Any]):
    """The tags outside every ``instrument_tags`` block: an empty ``dict``, as handlers
    written for LlamaIndex expect (``isinstance(tags, dict)``, ``json.dumps``,
    ``copy.deepcopy``), but read-only. Handlers receive the active tags as they are (no
    copy per span), and this one is shared by every context: a handler writing into it
    must fail rather than tag everything. (A block's own dict is private to its
    context.) Copies and pickles are plain empty dicts, free to change."""

    __slots__ = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if args or kwargs:
            self._read_only()
        super().__init__()

    def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "these tags are read-only (no instrument_tags block is active): copy them "
            "to change them, dict(tags), or set tags with instrument_tags({...})"
        )

    __setitem__ = __delitem__ = __ior__ = _read_only
    setdefault = update = pop = popitem = clear = _read_only

    def copy(self) -> dict[str, Any]:
        return {}

    def __copy__(self) -> dict[str, Any]:
        return {}

    def __deepcopy__(self, memo: Any) -> dict[str, Any]:
        return {}

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, ())


_EMPTY_TAGS: Mapping[str, Any] = _NoTags()
_active_tags: ContextVar[Mapping[str, Any]] = ContextVar(
    "instrumentation_active_tags", default=_EMPTY_TAGS
)
_suppressed: ContextVar[bool] = ContextVar("instrumentation_suppressed", default=False)


def current_span() -> SpanContext | None:
    """The innermost span of ours active in this context, if any."""
    return _active_span.get()


def current_span_id() -> str | None:
    span = _active_span.get()
    return None if span is None else span.id_


def current_trace_id() -> str | None:
    span = _active_span.get()
    return None if span is None else span.trace_id


def current_tags() -> Mapping[str, Any]:
    return _active_tags.get()


_UUID_TAIL = re.compile(r"-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")


def span_name_of(span_id: str) -> str:
    """The name in a span id: ours end in ``-<16 hex>``, LlamaIndex's in ``-<uuid4>``."""
    uuid_tail = _UUID_TAIL.search(span_id)
    if uuid_tail is not None:
        return span_id[: uuid_tail.start()] or span_id
    return span_id.rpartition("-")[0] or span_id


#: The traces of spans entered by hand (``Dispatcher.span_enter``) and not ended yet,
#: so that ``active_span_id.set(id_)`` after the enter puts the span in its own trace.
_manual_traces: dict[str, str] = {}
_MANUAL_TRACES_KEPT = 10_000


def remember_manual_trace(span_id: str, trace_id: str) -> None:
    put_bounded(_manual_traces, span_id, trace_id, _MANUAL_TRACES_KEPT)


def forget_manual_trace(span_id: str) -> None:
    _manual_traces.pop(span_id, None)


class _ActiveSpanId:
    """Stands in for LlamaIndex's ``active_span_id`` context variable.

    ``get()`` gives the current span's id. ``set(id_)`` makes a span of that id
    current (a child of the span current before, in its trace; a new trace at the
    top), so the hand-made spans of code written for LlamaIndex still parent what
    runs inside them; ``reset(token)`` puts back what was current.
    """

    __slots__ = ()

    name = "active_span_id"

    def get(self, default: str | None = None) -> str | None:
        span = _active_span.get()
        return default if span is None else span.id_

    def set(self, value: str | None) -> SpanIdToken:
        if value is None:
            return SpanIdToken(_active_span.set(None))
        if not isinstance(value, str):
            raise TypeError(f"active_span_id.set() takes a span id (str) or None; got {value!r}")
        parent = _active_span.get()
        if parent is None:
            trace_id = _manual_traces.get(value) or new_trace_id()
            span = SpanContext(value, trace_id, None, span_name_of(value))
        else:
            span = SpanContext(value, parent.trace_id, parent.id_, span_name_of(value))
        return SpanIdToken(activate(span), span)

    def reset(self, token: SpanIdToken) -> None:
        if not isinstance(token, SpanIdToken):
            raise TypeError(
                f"active_span_id.reset() takes what active_span_id.set() returned; got {token!r}"
            )
        deactivate(token.handle, token.span)


class SpanIdToken:
    """What ``active_span_id.set()`` returns, read as the ``contextvars.Token`` of
    LlamaIndex's context variable: code copied from LlamaIndex's span wrapper takes the
    parent from ``token.old_value`` (the id current before, ``None``, or
    ``Token.MISSING`` when nothing was ever current here)."""

    __slots__ = ("handle", "span")

    MISSING = Token.MISSING

    def __init__(
        self, handle: Token[SpanContext | None] | _Activation, span: SpanContext | None = None
    ) -> None:
        self.handle = handle
        self.span = span  # the span set() made current

    @property
    def var(self) -> _ActiveSpanId:
        return active_span_id

    @property
    def old_value(self) -> Any:
        handle = self.handle
        token = handle.token if type(handle) is _Activation else handle
        old = token.old_value  # type: ignore[union-attr]
        return old.id_ if isinstance(old, SpanContext) else old

    def __repr__(self) -> str:
        return f"<SpanIdToken old_value={self.old_value!r}>"


#: Compatibility: LlamaIndex's ``active_span_id`` (``get``, ``set``, ``reset``).
active_span_id = _ActiveSpanId()

#: Compatibility: LlamaIndex's ``active_instrument_tags`` context variable, the tags
#: :func:`instrument_tags` makes active.
active_instrument_tags = _active_tags


@contextmanager
def instrument_tags(new_tags: Mapping[str, Any]) -> Iterator[None]:
    """Attach ``new_tags`` to every event and span started inside the block.

    Nested blocks merge: inner keys win. Tags must be JSON-able if they are to cross
    processes with :meth:`Dispatcher.capture_propagation_context`.
    """
    if not isinstance(new_tags, Mapping):
        raise TypeError(
            "instrument_tags() takes a mapping of tag names to values, "
            f"got {type(new_tags).__name__}"
        )
    outer = _active_tags.get()
    token = _active_tags.set({**outer, **new_tags} if outer else dict(new_tags))
    try:
        yield
    finally:
        _active_tags.reset(token)


@contextmanager
def suppress_instrumentation() -> Iterator[None]:
    """Emit no events and start no spans inside the block.

    Exporters and writers run their own I/O under it so that the library never traces
    itself (an instrumented HTTP or database client would otherwise loop forever).
    """
    token = _suppressed.set(True)
    try:
        yield
    finally:
        _suppressed.reset(token)


def is_suppressed() -> bool:
    return _suppressed.get()


class ContextBridge(Protocol):
    """How another tracing system joins ours (see ``instrumentation.otel``).

    ``parent_for`` is called when a span starts, with our innermost active span; it
    returns the parent to use instead (for example a foreign span that is more
    recent), or ``own`` unchanged. ``attach`` is called each time one of our spans
    becomes current in a context (enter, and each resume of a generator) and
    ``detach`` with what it returned when it stops being current. What they raise is
    logged and counted as a handler's error (``telemetry``), and the call goes on;
    a stop (``KeyboardInterrupt``, ``SystemExit``) ``attach`` raises reaches the
    caller once nothing is left current, and a span starting is dropped with it.

    A bridge may also have ``restore(parent, sampled)``, called when
    ``restore_propagation_context`` makes ``parent`` (a remote span, or None) current
    in this context without a token to undo it, so that the other system continues
    the restored trace too (with the flags, ``tracestate`` and ``baggage`` received,
    from :func:`restored_propagation`); ``capture()`` and ``reattach(state)``, to keep
    what is current in the other system inside a generator across its ``yield``;
    ``sampled()``, False when the other system's current span is not sampled
    (``capture_propagation_context`` then sends flags ``00``); and
    ``propagation(span)``, the ``(flags, tracestate, baggage)`` the other system holds
    where ``span`` (ours, or None) is current, None for each it does not know.
    """

    def parent_for(self, own: SpanContext | None) -> SpanContext | None: ...

    def attach(self, span: SpanContext) -> object: ...

    def detach(self, token: object) -> None: ...


_bridges: tuple[ContextBridge, ...] = ()


# Only for changing the bridges (two integrations may do it at once); the hot paths
# read the tuple without it.
_bridges_lock = threading.Lock()


def _new_bridges_lock() -> None:
    global _bridges_lock
    _bridges_lock = threading.Lock()  # another thread may have held it at fork()


if hasattr(os, "register_at_fork"):  # pragma: no branch - absent on Windows only
    os.register_at_fork(after_in_child=_new_bridges_lock)


def register_bridge(bridge: ContextBridge) -> None:
    """Let ``bridge`` see our spans become current; idempotent."""
    global _bridges
    with _bridges_lock:
        if bridge not in _bridges:
            _bridges = (*_bridges, bridge)


def unregister_bridge(bridge: ContextBridge) -> None:
    global _bridges
    with _bridges_lock:
        _bridges = tuple(b for b in _bridges if b is not bridge)


def bridges() -> tuple[ContextBridge, ...]:
    return _bridges


class ContextKeeper(Protocol):
    """Context state an integration keeps outside the core's own variables (such as
    what OpenTelemetry's context holds after ``restore_propagation_context``), which
    the test kit saves and puts back with the core's."""

    def save(self) -> object:
        """What is current in this context now."""
        ...

    def put_back(self, state: object | None) -> None:
        """Make ``state`` (from :meth:`save`) current again; None (the keeper was
        registered after the save) takes back what the integration itself set."""
        ...


_keepers: tuple[ContextKeeper, ...] = ()


def register_context_keeper(keeper: ContextKeeper) -> None:
    """Have the test kit save and put back ``keeper``'s state too; idempotent."""
    global _keepers
    with _bridges_lock:
        if keeper not in _keepers:
            _keepers = (*_keepers, keeper)


def context_keepers() -> tuple[ContextKeeper, ...]:
    return _keepers


class Propagated(NamedTuple):
    """What ``restore_propagation_context`` received beside the parent span, kept in
    the context it restored into (see :func:`restored_propagation`).

    ``trace_id``: the restored trace (None when no span was restored), which ``flags``
    (the known trace-flags bits, sampled included) and ``tracestate`` belong to;
    ``baggage`` goes with the context whatever the trace.
    """

    trace_id: str | None
    flags: int
    tracestate: str | None
    baggage: str | None


_propagated: ContextVar[Propagated | None] = ContextVar("instrumentation_propagated", default=None)


def restored_propagation() -> Propagated | None:
    """The flags, ``tracestate`` and ``baggage`` the last ``restore_propagation_context``
    in this context received (None: nothing restored, or none of them). Bridges read
    it in ``restore`` to give the other system all of it."""
    return _propagated.get()


def propagation_in_bridges(
    span: SpanContext | None,
) -> tuple[int | None, str | None, str | None]:
    """``(flags, tracestate, baggage)`` the bridges know for a context captured with
    ``span`` current; None where none knows (the first bridge that does wins)."""
    flags: int | None = None
    tracestate: str | None = None
    baggage: str | None = None
    for bridge in _bridges:
        propagation = getattr(bridge, "propagation", None)
        if propagation is None:
            continue
        try:
            known = propagation(span)
        except Exception as exc:  # a bridge must not break the application
            telemetry.report_handler_error(bridge, "propagation", "a capture", exc)
            continue
        if known is None:
            continue
        if flags is None:
            flags = known[0]
        if tracestate is None:
            tracestate = known[1]
        if baggage is None:
            baggage = known[2]
    return flags, tracestate, baggage


def restored_in_bridges(parent: SpanContext | None, sampled: bool) -> None:
    """Tell the bridges that ``restore_propagation_context`` made ``parent`` current."""
    for bridge in _bridges:
        restore = getattr(bridge, "restore", None)
        if restore is not None:
            try:
                restore(parent, sampled)
            except Exception as exc:  # a bridge must not break the application
                telemetry.report_handler_error(bridge, "restore", "a restore", exc)


def sampled_in_bridges() -> bool:
    """Whether the trace is sampled: yes, unless a bridge's ``sampled()`` says the
    other system decided not to (a ``traceparent`` that arrived with flags ``00``)."""
    for bridge in _bridges:
        sampled = getattr(bridge, "sampled", None)
        if sampled is not None:
            try:
                if sampled() is False:
                    return False
            except Exception as exc:  # a bridge must not break the application
                telemetry.report_handler_error(bridge, "sampled", "a capture", exc)
    return True


def parent_for_new_span() -> SpanContext | None:
    """The parent a span starting now gets: ours, or what a bridge says."""
    own = _active_span.get()
    for bridge in _bridges:
        try:
            own = bridge.parent_for(own)
        except Exception as exc:  # a bridge must not break the application
            telemetry.report_handler_error(bridge, "parent_for", "a span's start", exc)
    return own


class _Activation:
    __slots__ = ("attached", "token")

    def __init__(
        self, token: Token[SpanContext | None], attached: list[tuple[ContextBridge, object]]
    ) -> None:
        self.token = token
        # Each bridge with its own token: a bridge registered or unregistered while
        # the span is current must still get back exactly what it returned.
        self.attached = attached


def activate(
    span: SpanContext, resumed: dict[ContextBridge, object] | None = None
) -> Token[SpanContext | None] | _Activation:
    """Make ``span`` current; return what :func:`deactivate` needs to undo it.

    ``resumed`` is what :func:`suspend` noted when a generator last yielded: each
    bridge makes current again what was current in its system inside the generator
    then (a foreign span the body opened before the ``yield`` and is still inside).
    A bridge's stop (see ``ContextBridge``) is raised once this is undone.
    """
    token = _active_span.set(span)
    if not _bridges:
        return token
    attached: list[tuple[ContextBridge, object]] = []
    for bridge in _bridges:
        try:
            state = resumed.get(bridge) if resumed else None
            if state is not None:
                attached.append((bridge, bridge.reattach(state)))  # type: ignore[attr-defined]
            else:
                attached.append((bridge, bridge.attach(span)))
        except Exception as exc:
            telemetry.report_handler_error(bridge, "attach", span.id_, exc)
        except BaseException:
            # A stop (Ctrl-C, sys.exit()) raised by the bridge: it reaches the caller
            # with nothing left current, ours or the bridges' before it, since no
            # deactivate() comes to undo it; the span was left current for good.
            deactivate(_Activation(token, attached))
            raise
    return _Activation(token, attached)


def suspend(
    handle: Token[SpanContext | None] | _Activation,
) -> dict[ContextBridge, object] | None:
    """:func:`deactivate` for a generator that yields: first note, for the bridges that
    can say (``capture()``), what is current in their system, for :func:`activate` to
    make current again when the generator resumes."""
    resumed: dict[ContextBridge, object] | None = None
    if type(handle) is _Activation:
        for bridge, _ in handle.attached:
            capture = getattr(bridge, "capture", None)
            if capture is not None:
                try:
                    if resumed is None:
                        resumed = {}
                    resumed[bridge] = capture()
                except Exception as exc:
                    telemetry.report_handler_error(bridge, "capture", "a yield", exc)
    deactivate(handle)
    return resumed


def deactivate(
    handle: Token[SpanContext | None] | _Activation, span: SpanContext | None = None
) -> None:
    """Undo :func:`activate`. ``span``, the span it made current, if the caller knows
    it: a span block may be left where it is not current. A generator holding one,
    advanced inside one call and closed (or collected) inside another, left it there:
    putting back what it replaced made the first call, ended, current again in the
    second (or, in another context, took the second's span away), and what the second
    started next had the wrong parent or began a trace. What is current there stays,
    ours and the bridges'. (Where it is current, in a task started inside it say,
    what it replaced is put back as usual.)"""
    if span is not None and _active_span.get() is not span:
        return
    if type(handle) is _Activation:
        for bridge, tok in reversed(handle.attached):
            try:
                bridge.detach(tok)
            except Exception as exc:
                telemetry.report_handler_error(bridge, "detach", "a span's end", exc)
        handle = handle.token
    try:
        _active_span.reset(handle)  # type: ignore[arg-type]
    except TypeError:
        if not isinstance(handle, SpanIdToken):
            raise
        deactivate(handle.handle, handle.span)  # what active_span_id.set() returned
    except ValueError:
        # The token was made in another context (a generator or coroutine driven
        # from elsewhere): put back the value it replaced instead.
        old = handle.old_value  # type: ignore[union-attr]
        _active_span.set(None if old is Token.MISSING else old)


# -- W3C traceparent ---------------------------------------------------------------

# Re-exported: they have always been importable from here.
format_traceparent = _w3c.format_traceparent
parse_traceparent = _w3c.parse_traceparent


__all__ = [
    "SpanContext",
    "active_instrument_tags",
    "active_span_id",
    "current_span",
    "current_span_id",
    "current_tags",
    "current_trace_id",
    "instrument_tags",
    "is_suppressed",
    "suppress_instrumentation",
]
