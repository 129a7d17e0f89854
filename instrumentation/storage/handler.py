"""The storage handler: every finished span and every event, handed to a batch writer.

One object is both the event handler and the span handler
(``class StorageHandler(BaseSpanHandler[BaseSpan], BaseEventHandler)``): attach it to
a dispatcher with both ``add_event_handler`` and ``add_span_handler``, or let
:meth:`StorageHandler.attach` do both.

On the application's thread it does the least it can: ``span_enter`` keeps a tuple
of the start (wall clock, ``perf_counter``, parent, tags...) in ``open_spans``;
``span_exit``/``span_drop`` pop it and queue ``(start, id, end, error)``; ``handle``
queues the event object itself. Rows are made on the writer thread.
"""

from __future__ import annotations

import inspect
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from pydantic import Field, PrivateAttr, ValidationInfo, field_validator
from typing_extensions import TypedDict

from instrumentation import telemetry
from instrumentation._text import cut
from instrumentation.context import (
    SpanContext,
    current_span,
    instrument_tags,
    register_bridge,
    span_name_of,
    unregister_bridge,
)
from instrumentation.dispatcher import Dispatcher, root_dispatcher
from instrumentation.event_handlers.base import BaseEventHandler
from instrumentation.events.base import BaseEvent
from instrumentation.span.base import BaseSpan
from instrumentation.span_handlers.base import BaseSpanHandler
from instrumentation.storage import checks
from instrumentation.storage import writer as writer_module
from instrumentation.storage.base import Store
from instrumentation.storage.models import METADATA_ALIASES, METADATA_KEYS
from instrumentation.storage.serialise import RowMaker, closed_early
from instrumentation.storage.spool import DEFAULT_MAX_BYTES as DEFAULT_MAX_SPOOL_BYTES
from instrumentation.storage.writer import BatchWriter, OnFull

_perf_counter = time.perf_counter
_time = time.time

#: When this process was forked (``perf_counter``, the same clock in parent and child;
#: -inf in a process that was not): spans opened before are the parent's.
_forked_at = [float("-inf")]


def _note_fork() -> None:
    _forked_at[0] = _perf_counter()


if hasattr(os, "register_at_fork"):  # pragma: no branch - absent on Windows only
    os.register_at_fork(after_in_child=_note_fork)


def _check_metadata(value: Mapping[str, Any] | None, what: str) -> dict[str, str]:
    """``value`` with its keys checked (``user_id``/``session_id`` become ``user``/``session``)
    and its values made ``str`` (``None`` values left out)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} is a mapping such as {{'application': 'rag'}}, got {value!r}")
    unknown = sorted(str(k) for k in value if k not in METADATA_KEYS and k not in METADATA_ALIASES)
    if unknown:
        raise ValueError(
            f"unknown metadata key(s) {unknown} in {what}; use {sorted(METADATA_KEYS)} "
            f"({', '.join(f'{c} for {k}' for c, k in METADATA_ALIASES.items())} are taken "
            "too; put anything else in instrument_tags: tags are stored too)"
        )
    out: dict[str, str] = {}
    for key, raw in value.items():
        if raw is None:
            continue
        name = METADATA_ALIASES.get(key, key)
        text = str(raw)
        if out.get(name, text) != text:
            raise ValueError(
                f"{what} gives {name!r} twice, as {name!r} and as "
                f"{METADATA_KEYS[name]!r}, "
                "with different values"
            )
        out[name] = text
    return out


@contextmanager
def metadata(**values: Any) -> Iterator[None]:
    """Set storage metadata for the spans and events of one request.

    ``with metadata(user="alice", session="s-42"):`` is ``instrument_tags`` with
    checked keys (application, environment, user, session, run_id, step_id; the
    column names ``user_id`` and ``session_id`` are taken for ``user`` and
    ``session``): the values follow the request into threads, tasks and other
    processes like any tag (named by the key: ``user``), and fill the metadata columns
    of every row. They win over the handler's and the dispatcher's metadata.
    """
    checked = _check_metadata(values, "metadata()")
    with instrument_tags(checked):
        yield


class _RecentScopes:
    """The scopes of the spans that ended last (at most ``2 * size``), by span id.

    A span can start after the span it is inside has ended (in an asyncio task, or a
    thread, the parent started and did not wait for), and its events arrive after it.
    Two generations of dicts: adding and looking up cost a dict operation each, and
    the oldest half is dropped at once. A race between threads can lose an entry
    (its spans then get the metadata of their own dispatcher only); it cannot fail.
    """

    __slots__ = ("new", "old", "size")

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self.new: dict[str, Any] = {}
        self.old: dict[str, Any] = {}

    def add(self, span_id: str, scope: Any) -> None:
        new = self.new
        new[span_id] = scope
        if len(new) >= self.size:
            self.old, self.new = new, {}

    def get(self, span_id: str) -> Any:
        found = self.new.get(span_id)
        return found if found is not None else self.old.get(span_id)


class _SpanParents(_RecentScopes):
    """The parent id of each span made current lately, whatever its dispatcher.

    A handler is told of the spans of the dispatchers it is attached to only. Of a
    span it never saw, it can learn the parent while that span is current (it is the
    current span then), not the parent's parent: through two such spans in a row,
    the way up is lost. This context bridge (see
    :func:`instrumentation.context.register_bridge`) only watches: the core calls
    :meth:`attach` for every span of ours it makes current (enter, and each resume
    of a generator), and it keeps the span's parent id, so
    :meth:`StorageHandler._scope_outside` can walk up any number of unseen spans.

    The bridge protocol costs every span of the process about a microsecond, so it
    is registered only while a handler that can use it holds it: one with
    ``dispatcher_metadata``, attached to a dispatcher other than the root (attached
    to the root, a handler sees every span but those of dispatchers that do not
    propagate). Bounded like :class:`_RecentScopes`; a link read from the older half
    is moved to the newer one, so the links of long-lived spans stay while used.
    """

    __slots__ = ("holders", "lock")

    def __init__(self, size: int = 10_000) -> None:
        super().__init__(size)
        self.lock = threading.Lock()
        self.holders: set[int] = set()

    # -- the ContextBridge protocol: watch, change nothing, never raise ------------------

    def parent_for(self, own: SpanContext | None) -> SpanContext | None:
        return own

    def attach(self, span: SpanContext) -> object:
        parent_id = span[2]
        if parent_id is not None:
            self.add(span[0], parent_id)
        return None

    def detach(self, token: object) -> None:
        return None

    # -- for handlers ------------------------------------------------------------------

    def parent_of(self, span_id: str) -> str | None:
        found: str | None = self.new.get(span_id)
        if found is None:
            found = self.old.get(span_id)
            if found is not None:
                self.add(span_id, found)
        return found

    def hold(self, holder: object) -> None:
        with self.lock:
            if id(holder) in self.holders:
                return
            self.holders.add(id(holder))
            if len(self.holders) == 1:
                register_bridge(self)

    def release(self, holder: object) -> None:
        with self.lock:
            if id(holder) not in self.holders:
                return
            self.holders.discard(id(holder))
            if not self.holders:
                unregister_bridge(self)
                self.new, self.old = {}, {}

    def _after_fork_in_child(self) -> None:
        self.lock = threading.Lock()  # another thread may have held it at fork()


_span_parents = _SpanParents()
if hasattr(os, "register_at_fork"):  # pragma: no branch
    os.register_at_fork(after_in_child=_span_parents._after_fork_in_child)

#: How many spans :meth:`StorageHandler._scope_outside` walks up at most (ids chosen
#: by hand can make a loop).
_MAX_WALK = 1000


class StorageOptions(TypedDict, total=False):
    """The options :func:`~instrumentation.storage.record_to` passes on to
    :class:`StorageHandler` (all of its fields but ``store``), spelled out so that a
    type checker catches ``batch_sise=5`` or ``batch_size="many"``."""

    batch_size: int
    debounce: float
    max_queue: int
    on_full: OnFull
    block_timeout: float
    retry_for: float
    retry_backoff: float
    replay_interval: float
    spool_dir: str | None
    max_spool_bytes: int | None
    max_payload_chars: int
    metadata: dict[str, str]
    dispatcher_metadata: dict[str, dict[str, str]]
    close_store: bool


class StorageHandler(BaseSpanHandler[BaseSpan], BaseEventHandler):
    """Keeps every span and event in a :class:`Store`, written in the background.

    ``metadata`` fills the metadata columns of every row (keys application,
    environment, user, session, run_id, step_id; columns ``user_id`` and
    ``session_id`` for user and session, whose names are taken as keys too).
    ``dispatcher_metadata`` maps a dispatcher name (``"root"``: every dispatcher) to
    metadata for its spans and those of the dispatchers below it, and for everything
    inside those spans: nested spans of any dispatcher and their events. Where several
    apply, each key comes from the innermost span's dispatcher that sets it (a
    dispatcher's own over those above it by name, ``"root"`` last). "Inside" holds for
    a span started after its parent ended (among the last 10,000 spans to end) and
    through spans of dispatchers this handler does not see, any number of them in a
    row once it is attached with :meth:`attach` (see ``_SpanParents`` and
    ``docs/storage.md``). Tags with those names (see :func:`metadata`) win over
    both. The other arguments configure the
    :class:`BatchWriter` (see there). ``max_payload_chars`` bounds each JSON value.
    ``close_store=True`` closes ``store`` when the handler shuts down (after the last
    write); :func:`record_to` sets it for a store it opened itself. By default the
    store stays open: it is the caller's to close.
    """

    store: Store
    batch_size: int = 500
    debounce: float = 0.5
    max_queue: int = 100_000
    on_full: OnFull = "block"
    block_timeout: float = 1.0
    retry_for: float = 5.0
    retry_backoff: float = 0.05
    replay_interval: float = 1.0
    spool_dir: str | None = None
    max_spool_bytes: int | None = DEFAULT_MAX_SPOOL_BYTES
    max_payload_chars: int = 65_536
    metadata: dict[str, str] = Field(default_factory=dict)
    dispatcher_metadata: dict[str, dict[str, str]] = Field(default_factory=dict)
    close_store: bool = False

    _writer: BatchWriter = PrivateAttr()
    _attached: list[Dispatcher] = PrivateAttr(default_factory=list)
    if TYPE_CHECKING:
        # Put straight in __dict__ by model_post_init, outside pydantic's knowledge,
        # so that the hot path reads them as plain attributes. Declared as read-only
        # properties: type checkers take annotated names for constructor fields.
        @property
        def _fast_put(self) -> Any: ...
        @property
        def _fast_by_dispatcher(self) -> bool: ...
        @property
        def _recent_scopes(self) -> _RecentScopes: ...

    @field_validator("batch_size", "max_queue", "max_payload_chars", mode="before")
    @classmethod
    def _a_count(cls, value: Any, info: ValidationInfo) -> Any:
        return checks.number(str(info.field_name), value, whole=True)

    @field_validator("max_spool_bytes", mode="before")
    @classmethod
    def _a_bound(cls, value: Any) -> Any:
        return None if value is None else checks.number("max_spool_bytes", value, whole=True)

    @field_validator(
        "debounce", "block_timeout", "retry_for", "retry_backoff", "replay_interval", mode="before"
    )
    @classmethod
    def _seconds(cls, value: Any, info: ValidationInfo) -> Any:
        return checks.number(str(info.field_name), value)

    @field_validator("close_store", mode="before")
    @classmethod
    def _a_flag(cls, value: Any) -> bool:
        return checks.flag("close_store", value)

    @field_validator("metadata", mode="before")
    @classmethod
    def _valid_metadata(cls, value: Any) -> dict[str, str]:
        return _check_metadata(value, "metadata")

    @field_validator("dispatcher_metadata", mode="before")
    @classmethod
    def _valid_dispatcher_metadata(cls, value: Any) -> dict[str, dict[str, str]]:
        if not isinstance(value, Mapping):
            raise TypeError("dispatcher_metadata maps dispatcher names to metadata mappings")
        return {str(k): _check_metadata(v, f"dispatcher_metadata[{k!r}]") for k, v in value.items()}

    def model_post_init(self, __context: Any) -> None:
        super().model_post_init(__context)
        # Through the check every number of the storage takes (the writer's options
        # are checked there): more than 100, for the truncation marker to fit.
        checks.count("max_payload_chars", self.max_payload_chars, least=101)
        rows = RowMaker(self.metadata, self.dispatcher_metadata, self.max_payload_chars)
        self._writer = BatchWriter(
            self.store,
            rows.rows,
            batch_size=self.batch_size,
            debounce=self.debounce,
            max_queue=self.max_queue,
            on_full=self.on_full,
            block_timeout=self.block_timeout,
            retry_for=self.retry_for,
            retry_backoff=self.retry_backoff,
            replay_interval=self.replay_interval,
            spool_dir=self.spool_dir,
            max_spool_bytes=self.max_spool_bytes,
            close_store=self.close_store,
        )
        rows.on_unwritable = self._writer.count_unwritable
        # The hot path reads these two from the instance __dict__: a pydantic private
        # attribute is looked up through __getattr__, which costs microseconds.
        self.__dict__["_fast_put"] = self._writer.put
        self.__dict__["_fast_by_dispatcher"] = bool(self.dispatcher_metadata)
        self.__dict__["_recent_scopes"] = _RecentScopes()
        self._writer.before_stop(self._drop_open_spans)

    @property
    def writer(self) -> BatchWriter:
        return self._writer

    @property
    def dropped(self) -> int:
        """Entries refused because the queue was full (or after shutdown, or once the
        writer thread stopped by an error)."""
        return self._writer.dropped

    # -- events ------------------------------------------------------------------------

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        if closed_early(event):
            # A generator whose caller stopped reading: its span is stored as ok and
            # the writer would not store this. Queued, it took a place in the queue
            # and, refused by a full one, was counted as dropped (storage.dropped)
            # though it was never to be stored.
            return
        if self._fast_by_dispatcher:
            span_id = event.span_id
            opened = self.open_spans.get(span_id) if span_id else None
            if opened is not None:
                self._fast_put((event, opened[9]))  # type: ignore[index]
            else:
                self._fast_put((event, self._scope_outside(span_id) if span_id else None))
        else:
            self._fast_put(event)

    def _scope_outside(self, span_id: str, trace_id: str | None = None) -> Any:
        """The scope (see ``span_enter``) of a span that is not open in this handler:
        one that ended a moment ago (a task it started runs on), or one of a dispatcher
        this handler is not attached to, through the spans that span is inside.

        The parent of an unseen span is known from the current span (when it is that
        span) and from :data:`_span_parents` (while a handler holds it): the walk goes
        up until a span this handler saw, open or recently ended. Given the
        ``trace_id`` of a span starting now whose parent is ``span_id``, a parent that
        is neither the current span nor any span of ours made current is a foreign one
        a bridge chose (OpenTelemetry's, started inside the current span of ours)."""
        recent: _RecentScopes = self._recent_scopes
        found = recent.get(span_id)
        if found is not None:
            return found
        active = current_span()
        if active is not None and active.remote:
            active = None
        opened: dict[str, Any] = self.open_spans
        parent_of = _span_parents.parent_of
        for _ in range(_MAX_WALK):
            # ``span_id`` is a span this handler never saw (the dispatcher it belongs
            # to does not reach this handler): look at the span it is inside.
            if active is not None and active.id_ == span_id:
                outer_id = active.parent_id
            else:
                outer_id = parent_of(span_id)
                if outer_id is None and active is not None and active.trace_id == trace_id:
                    outer_id = active.id_  # a foreign parent, inside the current span
            trace_id = None  # only the parent of a span starting now can be foreign
            if outer_id is None:
                return None
            outer = opened.get(outer_id)
            if outer is not None:
                return outer[9]
            found = recent.get(outer_id)
            if found is not None:
                return found
            span_id = outer_id
        return None

    # -- spans -------------------------------------------------------------------------

    def span_enter(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        parent_id: str | None = None,
        tags: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        is_root = parent_id is None
        if not is_root:
            # A parent in another process (restore_propagation_context) is not ours:
            # this span is the root of what this process stores.
            active = current_span()
            is_root = active is not None and active.remote and active.id_ == parent_id
        opened: dict[str, Any] = self.open_spans
        dispatcher = kwargs.get("dispatcher")
        scope = None
        if self._fast_by_dispatcher:
            # The dispatchers of the spans this one is inside, innermost first, as a
            # linked tuple shared with the parent: dispatcher_metadata applies to all
            # that is nested in a configured dispatcher's spans (resolved on the writer).
            outer = None
            if parent_id is not None and not is_root:
                parent = opened.get(parent_id)
                outer = (
                    parent[9]
                    if parent is not None
                    else self._scope_outside(parent_id, kwargs.get("trace_id"))
                )
            scope = outer if outer is not None and outer[0] == dispatcher else (dispatcher, outer)
        opened[id_] = (
            _time(),
            _perf_counter(),
            parent_id,
            # A parent this handler has not seen open (another dispatcher's span, one
            # open before the handler came, or another process's) is not stored by it:
            # this span is then a root of what the store holds, listed as a trace of its
            # own unless the parent's row is there after all (another handler's).
            is_root or parent_id not in opened,
            kwargs.get("name") or span_name_of(id_),
            kwargs.get("trace_id"),
            dispatcher,
            tags,
            kwargs.get("attributes"),
            scope,
        )

    def span_exit(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        result: Any | None = None,
        **kwargs: Any,
    ) -> None:
        info: Any = self.open_spans.pop(id_, None)
        if info is not None:
            # A root (info[3]): a full queue sets it aside rather than hide its trace.
            self._fast_put((info, id_, _perf_counter(), None), info[3])
            if info[9] is not None:  # only with dispatcher_metadata
                self._recent_scopes.add(id_, info[9])

    def span_drop(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        err: BaseException | None = None,
        **kwargs: Any,
    ) -> None:
        info: Any = self.open_spans.pop(id_, None)
        if info is not None:
            error: str | None
            if isinstance(err, GeneratorExit):
                # A generator its caller stopped reading (``break``, ``close()``) did
                # not fail: stored as ok, as the OpenTelemetry export has it.
                error = None
            elif err is None:
                error = "dropped"
            else:
                try:
                    message = cut(str(err))
                except Exception:  # str(err) itself can raise
                    message = ""
                error = f"{type(err).__name__}: {message}" if message else type(err).__name__
            self._queue_end(info, id_, _perf_counter(), error)

    def _queue_end(self, info: Any, id_: str, end: float, error: str | None) -> None:
        """Queue an ended span (``span_exit`` does the same inline: it is the hot path)."""
        # A root (info[3]): a full queue sets it aside rather than hide its trace.
        self._fast_put((info, id_, end, error), info[3])
        if info[9] is not None:  # only with dispatcher_metadata
            self._recent_scopes.add(id_, info[9])

    def _drop_open_spans(self) -> None:
        """The writer is stopping (at exit, or shut down by hand): store the spans still
        open as dropped. A call running on in a daemon thread, a generator suspended
        for good: without a row of their own, the spans they had finished pointed to a
        parent nobody could find, and their traces were not listed at all."""
        opened: dict[str, Any] = self.open_spans
        if not opened:
            return
        # A forked child holds its parent's open spans too: they are the parent's to
        # store (a row written here would stand for the parent's call, as failed).
        forked_at = _forked_at[0]
        error = (
            "RuntimeError: the process exited while the span was open"
            if writer_module._exiting[0]
            else "RuntimeError: the storage handler shut down while the span was open"
        )
        now = _perf_counter()
        dropped = 0
        for id_ in list(opened):
            found: Any = opened.get(id_)
            if found is None or found[1] < forked_at:
                continue  # ended meanwhile on another thread, or the parent process's
            info: Any = opened.pop(id_, None)
            if info is None:
                continue
            self._queue_end(info, id_, now, error)
            dropped += 1
        if dropped:
            telemetry.SPANS_DROPPED_BY_SHUTDOWN.add(dropped)
            writer_module.logger.warning(
                "instrumentation.storage: %d span(s) still open when the writer for %r "
                "stopped are stored as dropped (%s)",
                dropped,
                self.store,
                error.partition(": ")[2],
            )

    # BaseSpanHandler's abstract methods: unused, span_enter/exit/drop are overridden.
    def new_span(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover
        return None

    def prepare_to_exit_span(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover
        return None

    def prepare_to_drop_span(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover
        return None

    # -- life cycle --------------------------------------------------------------------

    def attach(self, dispatcher: Dispatcher | None = None) -> StorageHandler:
        """Add this handler for events and spans to ``dispatcher`` (the root by default).

        With ``dispatcher_metadata``, attached to another dispatcher than the root,
        the handler also has the parent of every span made current recorded (see
        ``_SpanParents``) until :meth:`detach` or :meth:`shutdown`.

        A handler that is shut down is refused (``RuntimeError``): its writer has
        stopped, and every span and event would be dropped.
        """
        target = root_dispatcher if dispatcher is None else dispatcher
        if not isinstance(target, Dispatcher):
            raise TypeError(f"attach() takes a Dispatcher, got {type(target).__name__}")
        if self._writer.closed:
            raise RuntimeError(
                "this StorageHandler is shut down and writes nothing more; make a new one "
                "(StorageHandler(...) or storage.record_to()) to record again"
            )
        if self._fast_by_dispatcher and target is not root_dispatcher:
            _span_parents.hold(self)  # before the first span this handler sees
        target.add_event_handler(self)
        target.add_span_handler(self)
        if not any(d is target for d in self._attached):
            self._attached.append(target)
        return self

    def detach(self) -> None:
        """Remove this handler from the dispatchers :meth:`attach` added it to."""
        for target in self._attached:
            target.remove_event_handler(self)
            target.remove_span_handler(self)
        self._attached.clear()
        _span_parents.release(self)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """``True`` once everything handled before the call is in the database."""
        return self._writer.flush(timeout)

    def shutdown(self, timeout: float | None = 10.0) -> bool:
        """Detach, write what is queued and stop the writer (idempotent); see
        ``BatchWriter.shutdown``.

        It is detached first from the dispatchers :meth:`attach` (or ``record_to()``)
        added it to, as an OpenTelemetry provider's ``shutdown()`` ends its recording:
        left attached, every later span and event was refused, counted in
        ``storage.dropped`` and logged as lost. With ``close_store``, the store is
        closed too once the writer has stopped.
        """
        checks.timeout(timeout)  # before anything changes
        self.detach()
        return self._writer.shutdown(timeout)

    def close(self) -> None:
        """Called by ``Dispatcher.shutdown()``: write what is queued and stop."""
        self.shutdown()

    def __enter__(self) -> StorageHandler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()  # detaches first


__all__ = ["StorageHandler", "metadata"]
