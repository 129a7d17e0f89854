"""``@dispatcher.span``: one wrapper per kind of callable.

With no handler in the dispatcher's chain a wrapper costs one attribute read and a
call. Otherwise it opens a span (see :mod:`instrumentation._spans`), makes it
current while the wrapped code runs, and closes it when the code is done: for a
generator, when it is exhausted, closed or raises, and the span is made current
again at every resume, so that interleaved generators each parent their own work.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import sys
import types
import weakref
from collections.abc import Callable, Mapping
from contextvars import Token
from typing import TYPE_CHECKING, Any

from instrumentation import _aio
from instrumentation import context as _context
from instrumentation._classcache import keep
from instrumentation._spans import (
    _DEFERRED_KEPT,
    EMPTY_BOUND_ARGS,
    Chain,
    LazyBoundArguments,
    LazySignature,
    _deferred,
    _fail,
    activate_started,
    after_span_end_async,
    fail,
    finish,
    start,
)
from instrumentation.context import (
    SpanContext,
    _active_span,
    _active_tags,
    _suppressed,
    activate,
    deactivate,
    suspend,
)

if TYPE_CHECKING:
    import asyncio

_set_active = _active_span.set
_partial = functools.partial
_reset_active = _active_span.reset

#: Set on every wrapper: the dispatcher that made it (LlamaIndex's marker name too).
MARK = "__instrumentation_dispatcher__"
LLAMA_MARK = "__dispatcher_span_decorated__"

#: The wrappers this module made. Decorating one again with its dispatcher is a no-op;
#: the mark alone cannot say so, as ``functools.wraps`` copies it onto any decorator
#: put around a traced function (which must then be traced in its own right).
_wrappers: weakref.WeakSet[Any] = weakref.WeakSet()


def mark_traced(wrapper: Any, dispatcher: Any) -> None:
    """Mark ``wrapper``, a function that traces calls of ``dispatcher`` by other means,
    as ``@dispatcher.span`` marks its own: decorating it again is a no-op."""
    setattr(wrapper, MARK, dispatcher)
    setattr(wrapper, LLAMA_MARK, True)
    _wrappers.add(wrapper)


def _traced_by(func: Any, dispatcher: Any) -> bool:
    try:
        ours = func in _wrappers
    except TypeError:  # unhashable, or no weak references: not one of ours
        return False
    return ours and getattr(func, MARK, None) is dispatcher


_METHOD_FIRST_PARAMS = frozenset({"self", "cls", "mcs", "klass", "metacls"})

#: What a traced call's result is: returned as it is (false), awaited in the call's
#: span, or an asyncio future whose end ends the span.
_RETURNED, _AWAITED, _FUTURE = 0, 1, 2

#: Which of those a result of each class is: by the class for the classes that live
#: for good (the traced call's plain lookup), by ``id()`` for the others, forgotten with
#: them (see :func:`instrumentation._classcache.keep`). Keyed by the class alone, it
#: kept alive every class a traced call had returned, up to its bound: pydantic models
#: made per call (``create_model``), and all they refer to. A future is told by its
#: class, once per class: asyncio is read from ``sys.modules`` then, not imported (a
#: class made before asyncio was imported is no future).
_awaitable_types: dict[type, int] = {}
_awaitable_made_types: dict[int, int] = {}


def _is_awaitable(value: Any) -> int:
    """Whether the span should last until ``value`` is awaited (``_AWAITED``), or ends
    with it (``_FUTURE``), or at the return (``_RETURNED``).

    Futures and coroutines, including generator-based ones (``types.coroutine``).
    Other objects with ``__await__`` are returned as they are, and their span ends
    at the return: they are often something else too (an async context manager, a
    response), and wrapping them in a coroutine would take that away.
    """
    kind = type(value)
    known = _awaitable_types.get(kind)
    if known is None:
        known = _awaitable_made_types.get(id(kind))
    if known is None:
        if kind is types.GeneratorType:  # a coroutine only if its code says so
            return _AWAITED if inspect.isawaitable(value) else _RETURNED
        if _aio.is_future_class(kind):
            known = _FUTURE
        elif issubclass(kind, collections.abc.Coroutine):
            known = _AWAITED
        else:
            known = _RETURNED
        if len(_awaitable_types) + len(_awaitable_made_types) < 4096:
            keep(_awaitable_types, _awaitable_made_types, kind, known)
    return known


def _is_types_coroutine(func: Any) -> bool:
    """A ``@types.coroutine`` generator function: awaited, not iterated."""
    while isinstance(func, functools.partial):
        func = func.func
    code = getattr(getattr(func, "__func__", func), "__code__", None)
    return code is not None and bool(code.co_flags & inspect.CO_ITERABLE_COROUTINE)


def _looks_like_method(func: Callable[..., Any]) -> bool:
    """Whether ``func`` was defined in a class body with ``self``/``cls`` first.

    Decided once, at decoration: a function defined in a class body has a dotted
    qualified name whose last scope is not ``<locals>``, and a method's first
    parameter is ``self`` or ``cls`` by universal convention (a staticmethod's is not).
    """
    qualname = getattr(func, "__qualname__", "")
    scope, _, _ = qualname.rpartition(".")
    if not scope or scope.endswith("<locals>"):
        return False
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return False
    return (
        bool(params)
        and params[0].name in _METHOD_FIRST_PARAMS
        and params[0].kind
        in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        )
    )


def _await_in_span(
    awaitable: Any, chain: Chain, span: SpanContext, bound: Any, instance: Any
) -> Any:
    # What the span is dropped with if the coroutine is never awaited; emptied once it
    # is, so that a coroutine kept after its end (by its finished Task) does not keep the
    # instance and the arguments alive through its finalizer.
    unstarted: list[Any] = [chain, span, bound, instance]

    async def run() -> Any:
        unstarted.clear()
        handle = activate_started(chain, span, bound, instance)
        try:
            result = await awaitable
        except BaseException as err:
            closing = isinstance(err, GeneratorExit)  # no await then: "ignored GeneratorExit"
            fail(chain, span, bound, instance, err, not closing)
            if chain.async_afters and not closing:
                await after_span_end_async(chain, span.id_)
            raise
        else:
            finish(chain, span, bound, instance, result, True)
            if chain.async_afters:
                await after_span_end_async(chain, span.id_)
            return result
        finally:
            deactivate(handle)

    @types.coroutine
    def run_generator_based() -> Any:
        # A ``types.coroutine`` result stays one: plain generators may ``yield from`` it.
        # Whoever drives it, the span is current only while it runs. Awaited, as the
        # coroutine above: waiting for the handlers (an audit request's) blocked the loop.
        unstarted.clear()
        try:
            result = yield from _drive(awaitable, chain, span, bound, instance, awaited=True)
        except BaseException as err:
            if chain.async_afters and not isinstance(err, GeneratorExit):
                yield from after_span_end_async(chain, span.id_)
            raise
        if chain.async_afters:
            yield from after_span_end_async(chain, span.id_)
        return result

    coro = run_generator_based() if type(awaitable) is types.GeneratorType else run()
    weakref.finalize(coro, _drop_unstarted, unstarted)
    return coro


def _drive(
    gen: Any, chain: Chain, span: SpanContext, bound: Any, instance: Any, awaited: bool = False
) -> Any:
    """Run generator ``gen`` to its end as the span: current at each resume (not while
    it is suspended, so interleaved generators each parent their own work), ended when
    it returns, raises or is closed.

    ``awaited``: ``gen`` is a generator-based coroutine, whose caller awaits
    :func:`after_span_end_async` once it ended (unless it was closed: no await then)."""
    to_send: Any = None
    to_throw: BaseException | None = None
    # What is current inside the body when it yields (a block it opened, say) is made
    # current again when it resumes, not just the generator's span.
    current: SpanContext = span
    resumed = None  # what other tracing systems had current inside, at the last yield
    while True:
        try:
            handle = activate(current, resumed)
        except BaseException as err:  # a bridge's stop, nothing left current: see activate
            fail(chain, span, bound, instance, err)
            raise
        try:
            if to_throw is not None:
                pending, to_throw = to_throw, None
                item = gen.throw(pending)
            else:
                item = gen.send(to_send)
        except StopIteration as stop:
            finish(chain, span, bound, instance, stop.value, awaited)
            return stop.value
        except BaseException as err:
            fail(chain, span, bound, instance, err, awaited and not isinstance(err, GeneratorExit))
            raise
        finally:
            current = _active_span.get() or span
            if type(handle) is Token:  # no bridge: nothing to note for the resume
                deactivate(handle)
                resumed = None
            else:
                resumed = suspend(handle)
        try:
            to_send = yield item
        except GeneratorExit as closing:
            # What close() does, but a generator that catches the close and returns
            # ends its span normally: closing early was, for it, a way to finish.
            try:
                handle = activate(current, resumed)
            except BaseException as err:  # a bridge's stop, nothing left current: see activate
                fail(chain, span, bound, instance, err)
                raise
            try:
                gen.throw(closing)
            except StopIteration as stop:
                returned: StopIteration | None = stop
            except GeneratorExit:
                returned = None
            except BaseException as err:
                fail(chain, span, bound, instance, err)
                raise
            else:
                ignored = RuntimeError("generator ignored GeneratorExit")
                fail(chain, span, bound, instance, ignored)
                raise ignored from None
            finally:
                deactivate(handle)
            if returned is not None:
                finish(chain, span, bound, instance, returned.value)
            else:
                fail(chain, span, bound, instance, closing)
            raise
        except BaseException as err:
            to_throw, to_send = err, None


def _first_step_unhooked(agen: Any) -> Any:
    """``agen.asend(None)`` for the generator inside a traced async generator, made
    with the thread's async-generator hooks off, so that the event loop never learns of
    it (the hooks run at an async generator's first step, and only then).

    The wrapper alone is the loop's to close. Known to the loop, the inner generator
    was closed by ``asyncio.run``'s shutdown beside its wrapper, and whichever went
    second met the other's clean-up still running: "an error occurred during closing
    of asynchronous generator", logged for code that had done nothing wrong.

    Its finalizer (:func:`_leave_unclosed`) is not the loop's either: the wrapper
    closes it when it is closed itself.
    """
    hooks = sys.get_asyncgen_hooks()
    if hooks.firstiter is None and hooks.finalizer is None:
        return agen.asend(None)
    sys.set_asyncgen_hooks(firstiter=None, finalizer=_leave_unclosed)
    try:
        return agen.asend(None)
    finally:
        sys.set_asyncgen_hooks(*hooks)


def _leave_unclosed(agen: Any) -> None:
    """The finalizer of the generator inside a traced async generator. Freed unclosed,
    it is left so, as the loop leaves its wrapper: that happens only when the wrapper
    was freed by a loop closed without ``shutdown_asyncgens()`` (otherwise the wrapper
    closes it, or the loop brings the wrapper back to close it). With no finalizer,
    Python closed it there and then, on no loop: its ``finally`` blocks ran, which they
    do not undecorated, and one that awaits was reported as "async generator ignored
    GeneratorExit"."""


class _EndWhenDiscarded:
    """Held by a traced async generator's frame while its span is open.

    An async generator left unfinished is closed by its event loop, but a loop
    closed before that (``loop.close()`` without ``shutdown_asyncgens()``, as code
    that makes a loop per call does) closes nothing: the generator is freed as it
    is, its ``finally`` blocks never run, and its span stayed open for good, one more
    in every handler's ``open_spans`` per call. Freed with the frame, this ends the
    span as a generator closed early (``GeneratorExit``), as it ends under
    ``asyncio.run``. It is also the span's one "ended" flag: the collector may run
    this finalizer and then the loop may close the wrapper it brought back (a
    generator in a reference cycle), and only the first of them ends the span.
    """

    __slots__ = ("args", "ended")

    def __init__(self, chain: Chain, span: SpanContext, bound: Any, instance: Any) -> None:
        self.args: tuple[Chain, SpanContext, Any, Any] = (chain, span, bound, instance)
        self.ended = False

    def __del__(self) -> None:
        self.fail(GeneratorExit())

    def finish(self, in_async: bool = False) -> None:
        """End the span normally, unless it has ended already."""
        if not self.ended:
            self.ended = True
            finish(*self.args, None, in_async)

    def fail(self, err: BaseException, in_async: bool = False) -> None:
        """End the span with ``err``, unless it has ended already."""
        if not self.ended:
            self.ended = True
            fail(*self.args, err, in_async)


def _drop_unstarted(unstarted: list[Any]) -> None:
    if unstarted:
        chain, span, bound, instance = unstarted
        fail(chain, span, bound, instance, RuntimeError("the returned awaitable was never awaited"))


def _end_with_future(
    future: asyncio.Future[Any], chain: Chain, span: SpanContext, bound: Any, instance: Any
) -> asyncio.Future[Any]:
    def done(fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            import asyncio  # imported already: asyncio made fut

            fail(chain, span, bound, instance, asyncio.CancelledError())
            return
        err = fut.exception()
        if err is not None:
            fail(chain, span, bound, instance, err)
        else:
            finish(chain, span, bound, instance, fut.result())

    future.add_done_callback(done)
    return future


def check_span_name(name: object) -> None:
    """A span name given by hand is a non-empty str (the id is built from it)."""
    if not isinstance(name, str):
        raise TypeError(f"a span name is a str, got {type(name).__name__}")
    if not name:
        raise ValueError("a span name must not be empty: span('load') or span(name='load')")


def wrap(
    dispatcher: Any,
    func: Any,
    name: str | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> Any:
    """Wrap ``func`` so that each call is a span of ``dispatcher``."""
    if name is not None:
        check_span_name(name)
    if isinstance(func, staticmethod):
        return staticmethod(wrap(dispatcher, func.__func__, name, attributes))
    if isinstance(func, classmethod):
        if _traced_by(func.__func__, dispatcher) and name is None and attributes is None:
            return func  # idempotent, as below
        inner = _wrap_callable(dispatcher, func.__func__, name, attributes, method=True)
        return classmethod(inner)
    if isinstance(func, type):
        # Wrapped, a class would become a function: isinstance() and subclassing break.
        raise TypeError(
            f"@dispatcher.span decorates functions, methods, coroutines and generators, "
            f"not classes; got the class {func.__qualname__}: decorate its __init__ (or "
            f"the methods to trace) instead"
        )
    if not callable(func):
        hint = (
            ": put @dispatcher.span under @property, on the getter"
            if isinstance(func, property)
            else ""
        )
        raise TypeError(
            f"@dispatcher.span decorates functions, methods, coroutines and generators; "
            f"got {type(func).__name__} object {func!r}{hint}"
        )
    if name is None and attributes is None:
        if _traced_by(func, dispatcher):
            return func  # idempotent: decorating twice with the same dispatcher is one span
        if inspect.ismethod(func) and _traced_by(func.__func__, dispatcher):
            return func  # a bound method of a traced function, or a traced classmethod
    return _wrap_callable(dispatcher, func, name, attributes, method=None)


def _wrap_callable(
    dispatcher: Any,
    func: Callable[..., Any],
    name: str | None,
    attributes: Mapping[str, Any] | None,
    method: bool | None,
) -> Any:
    d = dispatcher
    bound_self: Any = None
    target: Any = func
    if inspect.ismethod(func):  # an already-bound method: the instance is fixed
        bound_self = func.__self__
        target = func.__func__
        is_method = False
    else:
        is_method = _looks_like_method(func) if method is None else method
    signature = LazySignature(func, drop_first=is_method)
    attrs = dict(attributes) if attributes else None

    fixed_name: str | None = name
    named: Any = target
    while isinstance(named, functools.partial):  # named after the function it calls
        named = named.func
    short = getattr(named, "__name__", None) or type(named).__name__
    if fixed_name is None and not is_method:
        fixed_name = getattr(named, "__qualname__", None) or short
    # Split as _awaitable_types is: subclasses made at run time (per tenant, per test)
    # are not kept alive by a method they inherit.
    names_by_type: dict[type, str] = {}
    names_by_made_type: dict[int, str] = {}

    def method_name(instance: Any) -> str:
        # Named after the instance's own class, as LlamaIndex does ("Sub.method"), and
        # for a classmethod after the class itself.
        owner = instance if isinstance(instance, type) else type(instance)
        found = names_by_type.get(owner)
        if found is None:
            found = names_by_made_type.get(id(owner))
        if found is None:
            found = f"{owner.__name__}.{short}"
            if len(names_by_type) + len(names_by_made_type) < 1024:
                keep(names_by_type, names_by_made_type, owner, found)
        return found

    def begin(
        chain: Chain, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[SpanContext, Any, Any]:
        if is_method and args:
            instance = args[0]
            span_name = fixed_name or method_name(instance)
            call_args = args[1:]
        else:
            instance = bound_self
            span_name = fixed_name or short
            call_args = args
        bound = (
            LazyBoundArguments(signature, call_args, kwargs)
            if chain.needs_bound_args
            else EMPTY_BOUND_ARGS
        )
        return start(chain, span_name, instance, bound, attrs), bound, instance

    wrapper: Any
    if inspect.isasyncgenfunction(target):

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            chain = d._hot
            span = bound = instance = None
            if chain is not None and not _suppressed.get():
                span, bound, instance = begin(chain, args, kwargs)
            guard = None if span is None else _EndWhenDiscarded(chain, span, bound, instance)
            try:
                try:
                    agen = func(*args, **kwargs)
                except BaseException as err:  # bad arguments: the body never ran
                    if guard is not None:
                        guard.fail(err)
                    raise
                to_send: Any = None
                to_throw: BaseException | None = None
                # What is current inside the body when it yields (a block it opened, say)
                # is made current again when it resumes, not just the generator's span.
                current: SpanContext | None = span
                resumed = None  # what other tracing systems had current inside, at the last yield
                first = True
                while True:
                    try:
                        handle = activate(current, resumed) if current is not None else None
                    except BaseException as err:  # a bridge's stop: see activate
                        if guard is not None:
                            guard.fail(err)
                        raise
                    try:
                        if to_throw is not None:
                            pending, to_throw = to_throw, None
                            item = await agen.athrow(pending)
                        elif first:
                            first = False
                            item = await _first_step_unhooked(agen)
                        else:
                            item = await agen.asend(to_send)
                    except StopAsyncIteration:
                        if guard is not None:
                            guard.finish(True)
                            if chain is not None and chain.async_afters and span is not None:
                                await after_span_end_async(chain, span.id_)
                        return
                    except BaseException as err:
                        if guard is not None:
                            closing = isinstance(err, GeneratorExit)
                            guard.fail(err, not closing)
                            if (
                                chain is not None
                                and chain.async_afters
                                and span is not None
                                and not closing
                            ):
                                await after_span_end_async(chain, span.id_)
                        raise
                    finally:
                        if handle is not None:
                            current = _active_span.get() or span
                            if type(handle) is Token:  # no bridge: nothing to note
                                deactivate(handle)
                                resumed = None
                            else:
                                resumed = suspend(handle)
                    try:
                        to_send = yield item
                    except GeneratorExit as closing:
                        if getattr(agen, "ag_running", False):
                            # Being closed already by whoever else holds it (the loop does
                            # not: see _first_step_unhooked): nothing to throw into.
                            if guard is not None:
                                guard.fail(closing)
                            raise
                        if getattr(agen, "ag_frame", True) is None:
                            # Over already: freed by the collector together with this
                            # wrapper, and closed then (run with no loop's hooks, it has
                            # no finalizer of ours), as this wrapper is now.
                            if guard is not None:
                                guard.fail(closing)
                            raise
                        # As in _drive: returning after the close ends the span normally.
                        try:
                            handle = activate(current, resumed) if current is not None else None
                        except BaseException as err:  # a bridge's stop: see activate
                            if guard is not None:
                                guard.fail(err)
                            raise
                        try:
                            await agen.athrow(closing)
                        except StopAsyncIteration:
                            returned = True
                        except GeneratorExit:
                            returned = False
                        except BaseException as err:
                            if guard is not None:
                                guard.fail(err)
                            raise
                        else:
                            ignored = RuntimeError("async generator ignored GeneratorExit")
                            if guard is not None:
                                guard.fail(ignored)
                            raise ignored from None
                        finally:
                            if handle is not None:
                                deactivate(handle)
                        if guard is not None:
                            # Closed by aclose() (asyncio's hooks close an abandoned
                            # stream that way too), this may await: not wait for the
                            # handlers blocking the loop. With no loop running here it
                            # may be a close by the collector, which cannot await.
                            in_async = _aio.loop_running()
                            if returned:
                                guard.finish(in_async)
                            else:
                                guard.fail(closing, in_async)
                            if (
                                in_async
                                and chain is not None
                                and chain.async_afters
                                and span is not None
                            ):
                                await after_span_end_async(chain, span.id_)
                        raise
                    except BaseException as err:
                        to_throw, to_send = err, None
            finally:
                if guard is not None:
                    guard.ended = True  # every way out ended the span already

    elif inspect.isgeneratorfunction(target) and not _is_types_coroutine(target):

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            chain = d._hot
            if chain is None or _suppressed.get():
                return (yield from func(*args, **kwargs))
            span, bound, instance = begin(chain, args, kwargs)
            handle = (
                _set_active(span)
                if not _context._bridges
                else activate_started(chain, span, bound, instance)
            )
            try:
                gen = func(*args, **kwargs)
            except BaseException as err:
                fail(chain, span, bound, instance, err)
                raise
            finally:
                deactivate(handle)
            return (yield from _drive(gen, chain, span, bound, instance))

    elif inspect.iscoroutinefunction(target):

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            chain = d._hot
            if chain is None or _suppressed.get():
                return await func(*args, **kwargs)
            span, bound, instance = begin(chain, args, kwargs)
            handle = (
                _set_active(span)
                if not _context._bridges
                else activate_started(chain, span, bound, instance)
            )
            try:
                result = await func(*args, **kwargs)
            except BaseException as err:
                # Not while being closed: an await there is "ignored GeneratorExit".
                closing = isinstance(err, GeneratorExit)
                fail(chain, span, bound, instance, err, not closing)
                if chain.async_afters and not closing:
                    await after_span_end_async(chain, span.id_)
                raise
            else:
                finish(chain, span, bound, instance, result, True)
                if chain.async_afters:
                    await after_span_end_async(chain, span.id_)
                return result
            finally:
                deactivate(handle)

    else:

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            chain = d._hot
            if chain is None or _suppressed.get():
                return func(*args, **kwargs)
            # begin() inlined: this is the hottest path of the library.
            if is_method and args:
                instance = args[0]
                span_name = fixed_name or method_name(instance)
                bound = (
                    LazyBoundArguments(signature, args[1:], kwargs)
                    if chain.needs_bound_args
                    else EMPTY_BOUND_ARGS
                )
            else:
                instance = bound_self
                span_name = fixed_name or short
                bound = (
                    LazyBoundArguments(signature, args, kwargs)
                    if chain.needs_bound_args
                    else EMPTY_BOUND_ARGS
                )
            span = start(chain, span_name, instance, bound, attrs)
            handle = (
                activate_started(chain, span, bound, instance)
                if _context._bridges
                else _set_active(span)
            )
            try:
                result = func(*args, **kwargs)
            except BaseException as err:
                try:
                    fail(chain, span, bound, instance, err)
                except RecursionError:  # no frame left even to call it: see _spans
                    if len(_deferred) < _DEFERRED_KEPT:  # the list's bound, as _put_off keeps
                        _deferred.append(
                            (
                                None,
                                "span_drop",
                                span.id_,
                                _partial(
                                    _fail, chain, span, bound, instance, err, _active_tags.get()
                                ),
                            )
                        )
                raise
            else:
                awaitable = _awaitable_types.get(type(result))
                if awaitable is None:
                    awaitable = _is_awaitable(result)
                if awaitable:
                    if awaitable == _FUTURE:
                        return _end_with_future(result, chain, span, bound, instance)
                    return _await_in_span(result, chain, span, bound, instance)
                finish(chain, span, bound, instance, result)
                return result
            finally:
                if type(handle) is Token:
                    try:
                        _reset_active(handle)
                    except ValueError:
                        deactivate(handle)
                else:
                    deactivate(handle)

    # A callable object's attributes are its state, not a function's metadata: a copy
    # on the wrapper would go stale at its next change.
    updated = functools.WRAPPER_UPDATES if isinstance(target, types.FunctionType) else ()
    try:
        functools.update_wrapper(wrapper, target, updated=updated)
    except (AttributeError, TypeError):  # callables without the usual attributes
        pass
    wrapper.__wrapped__ = func
    mark_traced(wrapper, d)
    return wrapper


__all__ = ["LLAMA_MARK", "MARK", "mark_traced", "wrap"]
