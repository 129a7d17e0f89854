"""The span handler: turns span enter/exit/drop into spans of its own type."""

from __future__ import annotations

import _thread
import inspect
import sys
import threading
from abc import abstractmethod
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, get_origin

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from instrumentation._bounded import put_bounded
from instrumentation._classcache import remember
from instrumentation._options import SpellCheckedOptions
from instrumentation.context import _EMPTY_TAGS, span_name_of
from instrumentation.span.base import BaseSpan
from instrumentation.span_handlers._buffered import SpanDeque

if TYPE_CHECKING:
    from instrumentation.threads import Thread
else:  # LlamaIndex's home for it; imported at first use (see instrumentation._lazy)
    from instrumentation import _lazy

    __getattr__, __dir__ = _lazy.lazy_exports(globals(), {"Thread": "instrumentation.threads"})

T = TypeVar("T", bound=BaseSpan)

_ENDED_BY_SHUTDOWN_KEPT = 1_000

_BOUNDED = frozenset({"completed_spans", "dropped_spans"})

#: The fields LlamaIndex's ``BaseSpanHandler.__init__`` takes by position, in its order.
_POSITIONAL = ("open_spans", "completed_spans", "dropped_spans", "current_span_ids")

#: The methods that receive ``bound_args``.
_SPAN_METHODS = (
    "new_span",
    "prepare_to_exit_span",
    "prepare_to_drop_span",
    "span_enter",
    "span_exit",
    "span_drop",
)


_bounded_found: dict[int, frozenset[str]] = {}
_takes_kwargs_found: dict[int, tuple[bool, bool, bool]] = {}


def _bounded_fields(cls: type[BaseModel]) -> frozenset[str]:
    """Which of ``completed_spans``/``dropped_spans`` the class keeps bounded: all,
    unless a subclass declared its own type for one (``List[MySpan]``, as LlamaIndex
    handlers do), which it then gets as it declared it, growing as it appends."""
    try:
        return _bounded_found[id(cls)]
    except KeyError:
        return remember(_bounded_found, cls, _work_out_bounded(cls))


def _work_out_bounded(cls: type) -> frozenset[str]:
    fields = cls.model_fields  # type: ignore[attr-defined]
    return frozenset(
        name
        for name in _BOUNDED
        if isinstance(kind := get_origin(ann := fields[name].annotation) or ann, type)
        and issubclass(kind, SpanDeque)
    )


def _accepts_var_keyword(func: Any) -> bool:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _takes_kwargs(cls: type) -> tuple[bool, bool, bool]:
    """Whether ``new_span``/``prepare_to_exit_span``/``prepare_to_drop_span`` take ``**kwargs``.

    Handlers written for LlamaIndex may omit ``**kwargs``; they are then called with
    the guide's arguments only, and the extra ones (``name``, ``trace_id``, ...) are
    filled into the span afterwards.
    """
    try:
        return _takes_kwargs_found[id(cls)]
    except KeyError:
        return remember(_takes_kwargs_found, cls, _work_out_takes_kwargs(cls))


def _work_out_takes_kwargs(cls: type) -> tuple[bool, bool, bool]:
    return (
        _accepts_var_keyword(cls.new_span),  # type: ignore[attr-defined]
        _accepts_var_keyword(cls.prepare_to_exit_span),  # type: ignore[attr-defined]
        _accepts_var_keyword(cls.prepare_to_drop_span),  # type: ignore[attr-defined]
    )


class BaseSpanHandler(SpellCheckedOptions, Generic[T]):
    """Subclass it with your span type and implement the three ``new``/``prepare`` methods.

    The dispatcher calls :meth:`span_enter`, :meth:`span_exit` and :meth:`span_drop`
    on the application's thread; they must be quick and should not raise (an error is
    logged and counted, and the application goes on). Besides the guide's arguments,
    the dispatcher passes keyword arguments ``name`` (the function's qualified name),
    ``trace_id``, ``dispatcher`` (the dispatcher's name) and ``attributes`` (what
    ``@dispatcher.span(...)`` was given, or ``None``).

    ``completed_spans`` and ``dropped_spans`` keep at most ``max_completed_spans``
    spans each (the oldest go first), so a long-running process does not grow.
    """

    # A misspelt option (max_completed_span=5) is an error, not silently ignored (and
    # the error names the option meant: see SpellCheckedOptions).
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    open_spans: dict[str, T] = Field(default_factory=dict, description="Spans not ended yet.")
    completed_spans: SpanDeque[T] = Field(
        default_factory=SpanDeque, description="Spans that ended."
    )
    dropped_spans: SpanDeque[T] = Field(default_factory=SpanDeque, description="Spans that raised.")
    current_span_ids: dict[Any, str | None] = Field(default_factory=dict)
    max_completed_spans: int = Field(
        default=10_000,
        ge=0,
        le=sys.maxsize,  # a deque's bound
        description="How many completed (and dropped) spans to keep.",
    )
    _lock: _thread.LockType | None = PrivateAttr(default=None)
    # Two tables kept in the instance's __dict__ (made when first needed), not as
    # pydantic private attributes: those are read through BaseModel.__getattr__, over
    # a microsecond, and these are read at every span's end.
    # "_ended_by_shutdown": spans Dispatcher.shutdown() dropped while their calls still
    # ran: the calls' own exit or drop, when it comes, is not passed on a second time.
    # "_ending": spans being ended now, by the thread ending them: a call's own end and
    # shutdown() dropping the span on another thread each claim it there first, so
    # that only one of them reaches prepare_to_exit_span/prepare_to_drop_span.

    #: Set to False in a handler that never reads ``bound_args``: the dispatcher then
    #: passes an empty one and saves making it on every call.
    needs_bound_args: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A handler that said it never reads the arguments speaks for its own methods
        # only: a subclass whose span methods come from elsewhere (its own body, or a
        # mixin ahead in the MRO: a LlamaIndex-style subclass of SimpleSpanHandler,
        # say) gets them, unless it says otherwise itself.
        if cls.needs_bound_args or "needs_bound_args" in cls.__dict__:
            return
        mro = cls.__mro__

        def provider(name: str) -> int:
            return next((i for i, k in enumerate(mro) if name in k.__dict__), len(mro))

        said_so = provider("needs_bound_args")
        if any(provider(name) < said_so for name in _SPAN_METHODS):
            cls.needs_bound_args = True

    if not TYPE_CHECKING:  # type checkers see pydantic's keyword form, field by field

        def __init__(self, *args: Any, **data: Any) -> None:
            """LlamaIndex's positional form too: ``SimpleSpanHandler({}, [], [])`` is
            ``open_spans``, ``completed_spans``, ``dropped_spans`` and
            ``current_span_ids``, in that order; every field by keyword as well."""
            if args:
                if len(args) > len(_POSITIONAL):
                    raise TypeError(
                        f"{type(self).__name__}() takes at most {len(_POSITIONAL)} positional "
                        f"arguments ({', '.join(_POSITIONAL)}); got {len(args)}: pass the "
                        "others by keyword"
                    )
                for name, value in zip(_POSITIONAL, args, strict=False):
                    if name in data:
                        raise TypeError(
                            f"{type(self).__name__}() got multiple values for argument {name!r}"
                        )
                    data[name] = value
            super().__init__(**data)

    def model_post_init(self, __context: Any) -> None:
        for name in _bounded_fields(type(self)):
            setattr(self, name, SpanDeque(getattr(self, name), maxlen=self.max_completed_spans))

    def __setattr__(self, name: str, value: Any) -> None:
        # What is assigned later stays bounded too: a plain list or an unbounded deque
        # becomes a SpanDeque of the last ``max_completed_spans``; a bounded deque
        # keeps its own bound.
        if (
            name in _BOUNDED
            and not isinstance(value, SpanDeque)
            and name in _bounded_fields(type(self))
        ):
            maxlen = value.maxlen if isinstance(value, deque) else None
            value = SpanDeque(value, maxlen=self.max_completed_spans if maxlen is None else maxlen)
        elif name == "_lock":
            self.__dict__.pop("_fast_lock", None)  # the lock property reads the new one
        elif name == "max_completed_spans" and "max_completed_spans" in self.__dict__:
            raise ValueError(
                "max_completed_spans is fixed when the handler is made "
                f"({type(self).__name__}(max_completed_spans=...)), or assign bounded deques: "
                "handler.completed_spans = deque(maxlen=...)"
            )
        super().__setattr__(name, value)

    @classmethod
    def class_name(cls) -> str:
        return cls.__name__

    @property
    def lock(self) -> threading.Lock:
        # Kept in the instance's __dict__ too ("_fast_lock"): LlamaIndex-style handlers
        # take it at every span's end, and the private attribute is read through
        # BaseModel.__getattr__ (over a microsecond a read).
        lock: threading.Lock | None = self.__dict__.get("_fast_lock")
        if lock is None:
            made = self._lock
            if made is None:
                made = self._lock = threading.Lock()
            # setdefault: two threads here at once both get the one kept.
            lock = self.__dict__.setdefault("_fast_lock", made)
        return lock

    def span_enter(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        parent_id: str | None = None,
        tags: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Make and keep a span with :meth:`new_span`, unless ``id_`` is open already."""
        if id_ in self.open_spans:
            return
        if tags is _EMPTY_TAGS:
            # Outside every instrument_tags block: an empty dict of this span's own, so
            # that a new_span writing into it (LlamaIndex's OpenTelemetry handler tags
            # each root span with its traceparent) neither fails nor tags later spans.
            tags = {}
        if _takes_kwargs(type(self))[0]:
            span = self.new_span(
                id_=id_,
                bound_args=bound_args,
                instance=instance,
                parent_span_id=parent_id,
                tags=tags,
                **kwargs,
            )
        else:
            span = self.new_span(
                id_=id_,
                bound_args=bound_args,
                instance=instance,
                parent_span_id=parent_id,
                tags=tags,
            )
        if span is None:
            return
        # Fill what a handler written for LlamaIndex does not know about, without
        # pydantic's __setattr__ (this runs once per span).
        fields = getattr(span, "__dict__", None)
        if fields is not None:
            if fields.get("trace_id", False) is None and "trace_id" in kwargs:
                fields["trace_id"] = kwargs["trace_id"]
            if fields.get("name", False) is None:
                # An override of span_enter without **kwargs gets no name: take the
                # one in the id ("Qualname-<hex>").
                fields["name"] = kwargs.get("name") or span_name_of(id_)
        self.open_spans[id_] = span

    def span_exit(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        result: Any | None = None,
        **kwargs: Any,
    ) -> None:
        """End span ``id_`` with :meth:`prepare_to_exit_span`, called even when ``id_`` is
        not open here (``new_span`` kept nothing), as in LlamaIndex."""
        self._end_once(
            self.prepare_to_exit_span,
            _takes_kwargs(type(self))[1],
            id_,
            kwargs,
            bound_args=bound_args,
            instance=instance,
            result=result,
        )

    def span_drop(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        err: BaseException | None = None,
        **kwargs: Any,
    ) -> bool | None:
        """End span ``id_`` early, because of ``err``, with :meth:`prepare_to_drop_span`.

        Returns whether a span was dropped (``prepare_to_drop_span`` gave one): what
        :meth:`Dispatcher.shutdown` counts, as a call may end the span on another thread
        meanwhile. An override may return None (not known).
        """
        span = self._end_once(
            self.prepare_to_drop_span,
            _takes_kwargs(type(self))[2],
            id_,
            kwargs,
            bound_args=bound_args,
            instance=instance,
            err=err,
        )
        return span is not None

    def _end_once(
        self,
        prepare: Callable[..., T | None],
        with_kwargs: bool,
        id_: str,
        kwargs: dict[str, Any],
        **given: Any,
    ) -> T | None:
        """Run ``prepare`` (to exit or to drop) for span ``id_``, once: not after
        shutdown() dropped it, nor while another thread ends it (shutdown's drop and the
        call's own end each claim it first); ``None`` when skipped. The span is taken out
        of ``open_spans`` once ``prepare`` gave it back ended, or raised: the call has
        ended all the same, and a handler that fails on every span must not keep them
        all open (its error is reported by the dispatcher)."""
        if self._was_ended_by_shutdown(id_):
            return None
        claimed = self._claim_end(id_)
        if claimed is None:
            return None
        try:  # the claim is let go once the span is out of open_spans
            try:
                if with_kwargs:
                    span = prepare(id_=id_, **given, **kwargs)
                else:
                    span = prepare(id_=id_, **given)
            except RecursionError:
                raise  # no stack left here: the span stays for the end put off (see _spans)
            except BaseException:
                self.open_spans.pop(id_, None)
                raise
            if span is not None:
                self.open_spans.pop(id_, None)
            return span
        finally:
            if claimed:
                self._release_end(id_)

    def _claim_end(self, id_: str) -> bool | None:
        """Claim the end of span ``id_`` for this thread: ``True`` (release it after),
        ``False`` (this thread holds it already: ``shutdown()`` dropping it), ``None``
        (another thread ends it now: leave it to that one)."""
        ending = self.__dict__.get("_ending")
        if ending is None:
            ending = self.__dict__.setdefault("_ending", {})
        me = _thread.get_ident()
        holder = ending.get(id_)
        if holder == me:
            return False
        if holder is not None or ending.setdefault(id_, me) != me:  # setdefault: atomic
            return None
        return True

    def _release_end(self, id_: str) -> None:
        """Let go of the claim :meth:`_claim_end` gave (``True``)."""
        ending = self.__dict__.get("_ending")
        if ending is not None:
            ending.pop(id_, None)

    def _was_ended_by_shutdown(self, id_: str) -> bool:
        """Whether shutdown dropped span ``id_`` already (forgotten once asked)."""
        ended = self.__dict__.get("_ended_by_shutdown")
        if ended is not None and id_ in ended:
            ended.pop(id_, None)
            return True
        return False

    def _dropped_at_shutdown(self, id_: str) -> None:
        """Note that shutdown dropped span ``id_`` (see ``_ended_by_shutdown``)."""
        ended = self.__dict__.get("_ended_by_shutdown")
        if ended is None:
            ended = self.__dict__.setdefault("_ended_by_shutdown", {})
        # Calls that never come back (or handlers that end spans their own way) would
        # keep ids for ever: bounded.
        put_bounded(ended, id_, None, _ENDED_BY_SHUTDOWN_KEPT)

    def capture_propagation_context(self) -> dict[str, Any]:
        """What this handler needs to continue a trace in another process (nothing here)."""
        return {}

    def restore_propagation_context(self, context: dict[str, Any]) -> None:
        """Take back what :meth:`capture_propagation_context` gave, in the other process."""

    def close(self) -> None:
        """Flush and release resources; called by :meth:`Dispatcher.shutdown`."""

    @abstractmethod
    def new_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        parent_span_id: str | None = None,
        tags: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> T | None:
        """Make the span (``None`` to keep nothing)."""

    @abstractmethod
    def prepare_to_exit_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        result: Any | None = None,
        **kwargs: Any,
    ) -> T | None:
        """Finish the span; return it to have it removed from ``open_spans``."""

    @abstractmethod
    def prepare_to_drop_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        err: BaseException | None = None,
        **kwargs: Any,
    ) -> T | None:
        """Finish the span after ``err``; return it to have it removed from ``open_spans``."""


__all__ = ["BaseSpanHandler", "Thread"]
