"""The span life cycle shared by every kind of decorated callable.

A live span is a :class:`SpanContext`; it carries the handler chain that saw it
start, so that handlers added or removed while it runs never see an exit without an
enter. Nothing here takes a lock: handler chains are immutable tuples.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from instrumentation import telemetry
from instrumentation._ids import new_span_hex, new_trace_id
from instrumentation import context as _context
from instrumentation.context import SpanContext, _active_span, _active_tags, parent_for_new_span
from instrumentation.events.span import SpanDropEvent

_report = telemetry.report_handler_error
_SPANS_STARTED = telemetry.SPANS_STARTED
_SPANS_ENDED = telemetry.SPANS_ENDED
_SPANS_DROPPED = telemetry.SPANS_DROPPED

class Chain:
    """The handlers a dispatcher's spans and events reach, parents included."""

    __slots__ = ("dispatcher", "events", "spans")

    def __init__(
        self, dispatcher: str, events: tuple[Any, ...], spans: tuple[Any, ...]
    ) -> None:
        self.dispatcher = dispatcher
        self.events = events
        self.spans = spans


class LazySignature:
    """``inspect.signature`` of a function, computed once and only if a handler asks."""

    __slots__ = ("_drop_first", "_func", "_sig")

    def __init__(self, func: Any, drop_first: bool) -> None:
        self._func = func
        self._drop_first = drop_first
        self._sig: inspect.Signature | None = None

    def get(self) -> inspect.Signature:
        sig = self._sig
        if sig is None:
            try:
                sig = inspect.signature(self._func)
            except (TypeError, ValueError):
                sig = inspect.Signature()
            if self._drop_first and sig.parameters:
                sig = sig.replace(parameters=list(sig.parameters.values())[1:])
            self._sig = sig
        return sig


EMPTY_SIGNATURE = inspect.Signature()


class LazyBoundArguments(inspect.BoundArguments):
    """An ``inspect.BoundArguments`` that binds the call's arguments on first use.

    Binding costs microseconds; most handlers never look at the arguments, so the
    dispatcher hands this over and only a handler that reads ``arguments``, ``args``
    or ``kwargs`` pays for it. A call whose arguments do not fit the signature binds
    what it can (``bind_partial``), and failing that, nothing.
    """

    __slots__ = ("_lazy_args", "_lazy_bound", "_lazy_kwargs", "_lazy_sig")

    def __init__(
        self, signature: LazySignature | None, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self._lazy_sig = signature
        self._lazy_args = args
        self._lazy_kwargs = kwargs
        self._lazy_bound: dict[str, Any] | None = None

    @property  # type: ignore[override]
    def _signature(self) -> inspect.Signature:
        return EMPTY_SIGNATURE if self._lazy_sig is None else self._lazy_sig.get()

    @property  # type: ignore[override]
    def arguments(self) -> dict[str, Any]:
        bound = self._lazy_bound
        if bound is None:
            sig = self._signature
            try:
                bound = sig.bind(*self._lazy_args, **self._lazy_kwargs).arguments
            except TypeError:
                try:
                    bound = sig.bind_partial(*self._lazy_args, **self._lazy_kwargs).arguments
                except TypeError:
                    bound = {}
            self._lazy_bound = bound
        return bound

    @arguments.setter
    def arguments(self, value: dict[str, Any]) -> None:
        self._lazy_bound = value

    def __repr__(self) -> str:
        return f"<LazyBoundArguments ({', '.join(f'{k}={v!r}' for k, v in self.arguments.items())})>"


EMPTY_BOUND_ARGS = LazyBoundArguments(None, (), {})


def start(
    chain: Chain,
    name: str,
    instance: Any,
    bound_args: inspect.BoundArguments,
    attributes: Mapping[str, Any] | None,
    extra_tags: Mapping[str, Any] | None = None,
) -> SpanContext:
    """Open a span under the current one and tell the chain's span handlers."""
    # _context._bridges is read each time: the tuple is replaced when bridges change.
    parent = parent_for_new_span() if _context._bridges else _active_span.get()
    if parent is None:
        trace_id = new_trace_id()
        parent_id = None
    else:
        trace_id = parent.trace_id
        parent_id = parent.id_
    tags = _active_tags.get()
    if extra_tags:
        tags = {**tags, **extra_tags}
    span_id = f"{name}-{new_span_hex()}"
    span = SpanContext(span_id, trace_id, parent_id, name, tags, bound_args, instance, chain)
    _SPANS_STARTED.inc()
    for handler in chain.spans:
        try:
            handler.span_enter(
                id_=span_id,
                bound_args=bound_args,
                instance=instance,
                parent_id=parent_id,
                tags=tags,
                name=name,
                trace_id=trace_id,
                dispatcher=chain.dispatcher,
                attributes=attributes,
            )
        except Exception as exc:
            _report(handler, "span_enter", span_id, exc)
    return span


def finish(span: SpanContext, result: Any) -> None:
    """Close ``span`` normally."""
    _SPANS_ENDED.inc()
    span_id = span.id_
    for handler in span.dispatcher.spans:
        try:
            handler.span_exit(
                id_=span_id, bound_args=span.bound_args, instance=span.instance, result=result
            )
        except Exception as exc:
            _report(handler, "span_exit", span_id, exc)


def fail(span: SpanContext, err: BaseException) -> None:
    """Close ``span`` because of ``err``: a ``SpanDropEvent``, then ``span_drop``."""
    _SPANS_DROPPED.inc()
    chain: Chain = span.dispatcher
    span_id = span.id_
    if chain.events:
        try:
            drop_event = SpanDropEvent(
                span_id=span_id, trace_id=span.trace_id, err_str=str(err), tags=dict(span.tags or {})
            )
        except Exception:  # str(err) itself can raise
            drop_event = SpanDropEvent(
                span_id=span_id, trace_id=span.trace_id, err_str=type(err).__name__
            )
        dispatch_event(chain.events, drop_event, {})
    for handler in chain.spans:
        try:
            handler.span_drop(
                id_=span_id, bound_args=span.bound_args, instance=span.instance, err=err
            )
        except Exception as exc:
            _report(handler, "span_drop", span_id, exc)


def dispatch_event(handlers: tuple[Any, ...], event: Any, kwargs: dict[str, Any]) -> None:
    telemetry.EVENTS_DISPATCHED.inc()
    for handler in handlers:
        try:
            handler.handle(event, **kwargs)
        except Exception as exc:
            _report(handler, "handle", event.class_name(), exc)


__all__ = [
    "EMPTY_BOUND_ARGS",
    "Chain",
    "LazyBoundArguments",
    "LazySignature",
    "dispatch_event",
    "fail",
    "finish",
    "start",
]
