"""Turn what the application handed over (events, finished spans) into table rows.

Runs on the writer thread, never the application's. Nothing here raises for bad
data: a value that cannot be serialised is stored as its ``repr`` under the marker
``"__unserialisable__"`` (the row is kept), and in a JSON object longer than
``max_payload_chars`` the largest fields are replaced, one at a time, by
``{"__truncated__": true, "original_chars": n, "preview": "<the first characters>"}``
until it fits, so that one long prompt does not cost the event its other fields.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import sys
from collections.abc import Callable, Mapping
from datetime import date, datetime, time
from decimal import Decimal
from pathlib import PurePath
from time import monotonic as _monotonic
from typing import Any
from uuid import UUID

from pydantic import BaseModel

from instrumentation import telemetry
from instrumentation._classcache import remember
from instrumentation._dump import dump, dump_json
from instrumentation._finite import finite
from instrumentation.dispatcher import ROOT_NAME
from instrumentation.events.span import SpanDropEvent
from instrumentation.storage.base import Row, index_key
from instrumentation.storage.models import METADATA_KEYS

logger = logging.getLogger("instrumentation.storage")
_INF = math.inf

UNSERIALISABLE = "__unserialisable__"
TRUNCATED = "__truncated__"

_FALLBACKS = telemetry.counter("storage.unserialisable_values")
_TRUNCATED = telemetry.counter("storage.truncated_payloads")
_UNWRITABLE = telemetry.counter("storage.unwritable_entries")

#: Fields of an event stored in their own columns, left out of the payload.
_EVENT_COLUMN_FIELDS = {"id_", "timestamp", "span_id", "trace_id"}

#: What a streamed chunk's event repeats of its call, left out of its payload: the
#: messages or prompt (the start event has them) and the answer so far (the chunks'
#: deltas add up to it, and the end event has it whole). Stored, a stream of n chunks
#: kept n copies of the prompt and n growing copies of the answer: five streamed
#: answers of 500 words to a 16 kB prompt took 46 MB, 99% of it in chunk events.
#: By class name in :mod:`instrumentation.events.llm`, looked up in ``sys.modules``:
#: such an event exists only once that module is imported, and importing it here was an
#: eighth of ``import instrumentation.storage`` for applications without LLM events.
_REPEATED_IN_CHUNKS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("LLMChatInProgressEvent", {"messages": True, "response": {"message": True}}),
    ("LLMCompletionInProgressEvent", {"prompt": True, "response": {"text": True}}),
)
_LLM_EVENTS_MODULE = "instrumentation.events.llm"

#: The ``exclude`` of each event class's payload (by ``id(cls)``: see ``remember``).
_excludes: dict[int, Any] = {}


def _exclude_of(cls: type) -> Any:
    try:
        return _excludes[id(cls)]
    except KeyError:
        return remember(_excludes, cls, _work_out_exclude(cls))


def _work_out_exclude(cls: type) -> dict[str, Any]:
    exclude: dict[str, Any] = dict.fromkeys(_EVENT_COLUMN_FIELDS, True)
    llm_events = sys.modules.get(_LLM_EVENTS_MODULE)
    for name, repeated in _REPEATED_IN_CHUNKS:
        kind = getattr(llm_events, name, None)
        if kind is not None and issubclass(cls, kind):
            exclude.update(repeated)
    return exclude


def _safe_repr(value: Any, limit: int = 2000) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__
        text = f"<{type(value).__qualname__} (repr failed: {type(exc).__name__})>"
    return text if len(text) <= limit else text[:limit] + "…"


def unserialisable(value: Any) -> dict[str, str]:
    """The marker stored in place of ``value``."""
    _FALLBACKS.inc()
    return {UNSERIALISABLE: type(value).__qualname__, "repr": _safe_repr(value)}


def _default(value: Any) -> Any:
    """``json.dumps`` hook: common non-JSON types by value, anything else as a marker."""
    try:
        return _by_value(value)
    except Exception:  # a datetime whose tzinfo raises, say
        return unserialisable(value)


def _by_value(value: Any) -> Any:
    # What is returned is written as it is (the hook is not called on it again), so it
    # has its NaNs made null here.
    if isinstance(value, BaseModel):
        try:
            return finite(dump(value, mode="json", fallback=unserialisable))
        except Exception:  # pydantic before 2.11 has no fallback; a field that fails
            pass
        try:
            # Plain values: what JSON does not take goes through this hook in turn.
            return finite(dump(value))
        except Exception:
            return unserialisable(value)
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (UUID, Decimal, PurePath)):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return finite(list(value))
    if isinstance(value, bytes):
        return {UNSERIALISABLE: "bytes", "repr": _safe_repr(value, 200), "length": len(value)}
    return unserialisable(value)


#: Room for a marker's own keys and the preview's escaping, in characters.
_MARKER_ROOM = 100


def _marker(text: str, preview_chars: int) -> dict[str, Any]:
    return {TRUNCATED: True, "original_chars": len(text), "preview": text[: max(0, preview_chars)]}


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    _TRUNCATED.inc()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and data:
        fitted = _truncate_fields(data, len(text), limit)
        if fitted is not None:
            return fitted
    whole: dict[str, Any] = {"": None}
    _fit_marker(whole, "", text, limit - _MARKER_ROOM, limit)
    return _dumps(whole[""])


def _fit_marker(data: dict[str, Any], key: str, field: str, preview: int, limit: int) -> int:
    """Put a marker for ``field`` at ``data[key]``, its preview cut until ``data`` fits
    in ``limit`` or the preview is empty; the length of ``data`` as JSON.

    The preview's characters grow when escaped again (a newline or a quote takes two,
    a control character six), so a cut made by counting characters may not be enough.
    Each round cuts what is still over, scaled by how much the preview grew when
    escaped, so as to keep as much of it as fits.
    """
    while True:
        data[key] = _marker(field, preview)
        total = len(_dumps(data))
        if total <= limit or preview <= 0:
            return total
        shown = min(preview, len(field))
        escaped = max(len(_dumps(field[:shown])) - 2, 1)  # without its quotes
        preview = shown - max(math.ceil((total - limit) * shown / escaped), 1)


def _truncate_fields(data: dict[str, Any], total: int, limit: int) -> str | None:
    """``data`` with its largest fields replaced by markers until it fits in ``limit``,
    or None when even that is too long (a great many small fields)."""
    texts = {key: value if isinstance(value, str) else _dumps(value) for key, value in data.items()}
    for key in sorted(texts, key=lambda k: len(texts[k]), reverse=True):
        if total <= limit:
            break
        field = texts[key]
        if len(field) <= _MARKER_ROOM:
            break  # the rest are as small: markers would not make them shorter
        # What the rest of the payload leaves for this field, as JSON.
        room = limit - (total - len(_dumps(data[key])))
        total = _fit_marker(data, key, field, room - 2 * _MARKER_ROOM, limit)
    if total > limit:
        return None
    return _dumps(data)


def to_json(value: Any, limit: int) -> str:
    """``value`` as JSON text, never raising, at most about ``limit`` characters.

    The text is strict JSON, which PostgreSQL's ``jsonb`` and every JSON parser take:
    NaN and the infinities are written as ``null``, as pydantic writes them in events.
    """
    try:
        text = _dumps_any(value)
    except Exception:
        try:
            text = _dumps_any(finite(value))
        except Exception:
            if isinstance(value, dict):
                # Only the fields that cannot be written (a list that holds itself,
                # say) become markers: the others stay readable as fields.
                text = _dumps({_str_key(k): _json_or_marker(v) for k, v in value.items()})
            else:
                text = _dumps(unserialisable(value))
    return _truncate(text, limit)


def _dumps_any(value: Any) -> str:
    return json.dumps(
        value, default=_default, ensure_ascii=False, separators=(",", ":"), allow_nan=False
    )


def _str_key(key: Any) -> str:
    try:
        return str(key)
    except Exception:
        return _safe_repr(key)


def _json_or_marker(value: Any) -> Any:
    try:
        return json.loads(_dumps_any(finite(value)))
    except Exception:
        return unserialisable(value)


def event_payload(event: Any, limit: int) -> str:
    """The event's fields (except those with their own columns, and what a streamed
    chunk repeats of its call) as JSON text."""
    exclude = _exclude_of(type(event))
    try:
        text = dump_json(event, exclude=exclude, fallback=unserialisable)
    except Exception:
        try:
            data = dump(event, exclude=exclude)
        except Exception:
            data = _fields_one_by_one(event, exclude)
        else:
            if "class_name" not in type(event).model_fields:
                data.pop("class_name", None)  # BaseEvent.model_dump adds it; the type column has it
        return to_json(data, limit)
    return _truncate(text, limit)


def _fields_one_by_one(event: Any, exclude: Mapping[str, Any]) -> dict[str, Any]:
    """The event's stored fields as they are, for an event pydantic cannot dump at all
    (a computed field that raises): each is written, or marked, on its own, where the
    whole payload was one marker (whose ``repr`` failed too)."""
    try:
        fields = type(event).model_fields
        data = {
            name: value
            for name, value in vars(event).items()
            if exclude.get(name) is not True and not (name in fields and fields[name].exclude)
        }
        data.update(event.__pydantic_extra__ or {})
    except Exception:  # not a pydantic model
        return unserialisable(event)
    return data


def _key(value: Any) -> Any:
    """An indexed column's value: see :func:`index_key` (None and non-text as they are)."""
    return index_key(value) if isinstance(value, str) else value


def _str_or_none(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else _safe_repr(value, 500)


#: Token counts and costs past these are no real figures (a bug upstream, a sentinel):
#: their columns are left empty, the payload keeps them, and sums over a trace cannot
#: overflow (SQLite's integer SUM raises past 2**63, PostgreSQL's float8 past 1e308).
_MAX_TOKENS = 2**40
_MAX_COLUMN_FLOAT = 1e15
_OUT_OF_RANGE = telemetry.counter("storage.out_of_range_columns")


def _int_or_none(value: Any) -> int | None:
    if type(value) is not int and (not isinstance(value, int) or isinstance(value, bool)):
        return None
    if 0 <= value < _MAX_TOKENS:
        return value
    _OUT_OF_RANGE.inc()
    return None


def _float_or_none(value: Any) -> float | None:
    if type(value) is float:
        number = value
    elif not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    else:
        try:
            number = float(value)
        except OverflowError:  # an int past 1e308
            number = math.inf
    if math.isfinite(number) and abs(number) < _MAX_COLUMN_FLOAT:
        return number
    _OUT_OF_RANGE.inc()
    return None


def metadata_columns(
    tags: Mapping[str, Any] | None, *defaults: Mapping[str, str] | None
) -> tuple[str | None, ...]:
    """The six metadata columns: from the tags first, then each mapping of defaults."""
    out: list[str | None] = []
    for key in METADATA_KEYS:
        value: Any = None
        if tags:
            value = tags.get(key)
        if value is None:
            for mapping in defaults:
                if mapping and mapping.get(key) is not None:
                    value = mapping[key]
                    break
        out.append(None if value is None else index_key(_str_key(value)))
    return tuple(out)


_META_KEYSET = frozenset(METADATA_KEYS)
#: The key of ``dispatcher_metadata`` that applies to every dispatcher.
ROOT_KEY = ROOT_NAME
_LLM_FIELDS = ("usage", "err_str", "error", "model", "provider", "cost_usd", "latency_ms")
#: By ``id(cls)``, forgotten with the class (see :mod:`instrumentation._classcache`):
#: an event class made at run time (pydantic's ``create_model``, one per request) is
#: not kept alive by having been stored once.
_fields_found: dict[int, frozenset[str]] = {}


def _fields_of(cls: type) -> frozenset[str]:
    """Which of the LLM columns' fields an event class has (looked up once per class).

    ``getattr(event, name, None)`` on a pydantic model that lacks ``name`` costs
    microseconds (it raises inside ``__getattr__``); this keeps rows cheap for the
    events that are not LLM events, whether or not ``instrumentation.events.llm``
    exists.
    """
    try:
        return _fields_found[id(cls)]
    except KeyError:
        return remember(_fields_found, cls, _work_out_fields(cls))


def _work_out_fields(cls: type) -> frozenset[str]:
    return frozenset(
        name
        for name in _LLM_FIELDS
        if name in getattr(cls, "model_fields", {})
        or isinstance(getattr(cls, name, None), property)
    )


class RowMaker:
    """Makes rows for one handler: knows its metadata and payload limit."""

    def __init__(
        self,
        metadata: Mapping[str, str] | None,
        dispatcher_metadata: Mapping[str, Mapping[str, str]] | None,
        max_payload_chars: int,
    ) -> None:
        self.metadata = dict(metadata or {})
        self.dispatcher_metadata = {k: dict(v) for k, v in (dispatcher_metadata or {}).items()}
        self.limit = max_payload_chars
        self._defaults: dict[Any, tuple[str | None, ...]] = {}
        self._scopes: dict[Any, dict[str, str]] = {}
        self._last_log = float("-inf")
        #: Told of each entry no row could be made of (the writer counts it as lost).
        self.on_unwritable: Callable[[int], None] | None = None

    def meta(self, tags: Any, scope: Any) -> tuple[str | None, ...]:
        """The metadata columns of a row: tags, then dispatchers, then handler metadata.

        ``scope`` is what the handler recorded for the row's span: ``None`` (no span),
        a dispatcher name, or the linked tuple ``(dispatcher, outer scope)`` of the
        dispatchers of the spans it is inside, innermost first.
        """
        defaults = self._defaults.get(scope)
        if defaults is None:
            defaults = metadata_columns(None, self.for_scope(scope), self.metadata)
            if len(self._defaults) < 10_000:
                self._defaults[scope] = defaults
        if not tags or not isinstance(tags, Mapping) or _META_KEYSET.isdisjoint(tags):
            return defaults
        return metadata_columns(tags, self.for_scope(scope), self.metadata)

    def for_scope(self, scope: Any) -> Mapping[str, str] | None:
        """The dispatcher metadata of a row whose span is inside ``scope``.

        Every dispatcher of the enclosing spans contributes; on a key they both set,
        the inner span's dispatcher wins, and ``"root"`` (every dispatcher) loses.
        """
        if not self.dispatcher_metadata or scope is None:
            return None
        found = self._scopes.get(scope)
        if found is not None:
            return found
        names: list[str | None] = []
        link = scope
        while link is not None:
            names.append(link[0])
            link = link[1]
        merged = dict(self.dispatcher_metadata.get(ROOT_KEY) or {})
        for name in reversed(names):  # outermost first: the inner ones overwrite
            merged.update(self._own(name))
        if len(self._scopes) < 10_000:
            self._scopes[scope] = merged
        return merged

    def _own(self, name: str | None) -> dict[str, str]:
        """``name``'s metadata over its ancestors' (by name), ``"root"`` left out."""
        out: dict[str, str] = {}
        if not name or name == ROOT_KEY:
            return out
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            found = self.dispatcher_metadata.get(".".join(parts[:i]))
            if found:
                out.update(found)
        return out

    def span_row(
        self, entry: tuple[Any, ...], clock_offsets: dict[int, float] | None = None
    ) -> Row:
        """A row from the writer entry ``(start_info, id_, end_perf, error)``.

        ``clock_offsets``: the wall clock less ``perf_counter`` by second of
        ``perf_counter`` (see :meth:`rows`): a span whose two start readings were split
        by another thread's turn is dated by its ``perf_counter`` start, as its end and
        duration are."""
        info, span_id, end_perf, error = entry
        # scope: None, or the dispatchers of the enclosing spans (see StorageHandler).
        start_wall, start_perf, parent_id, is_root, name, trace_id = info[:6]
        dispatcher, tags, attrs, scope = info[6:]
        if clock_offsets:
            second = int(start_perf)
            found = clock_offsets.get
            best = max(found(second - 1, -_INF), found(second, -_INF), found(second + 1, -_INF))
            if 0.0 < best - (start_wall - start_perf) < 0.05:
                start_wall = start_perf + best
        duration = max(0.0, end_perf - start_perf)
        name = _str_or_none(name)
        return (
            _key(span_id),
            _key(trace_id),
            _key(parent_id),
            1 if is_root else 0,
            _key(name),
            dispatcher,
            start_wall,
            start_wall + duration,
            duration,
            "ok" if error is None else "error",
            error,
            to_json(dict(tags) if tags else {}, self.limit),
            to_json(dict(attrs) if attrs else {}, self.limit),
            *self.meta(tags, scope),
        )

    def event_row(self, event: Any, scope: Any) -> Row:
        """A row from an event (LLM columns are read by duck typing, so any event works)."""
        has = _fields_of(type(event))
        usage = event.usage if "usage" in has else None
        prompt = completion = total = None
        if usage is not None:
            prompt = _int_or_none(getattr(usage, "prompt_tokens", None))
            completion = _int_or_none(getattr(usage, "completion_tokens", None))
            total = _int_or_none(getattr(usage, "total_tokens", None))
            if total is None and (prompt is not None or completion is not None):
                total = (prompt or 0) + (completion or 0)
        error = event.err_str if "err_str" in has else None
        if error is None and "error" in has:
            error = event.error
        timestamp = event.timestamp
        tags = event.tags
        return (
            _key(str(event.id_)),
            _key(event.class_name()),
            timestamp.timestamp() if isinstance(timestamp, datetime) else 0.0,
            _key(event.span_id),
            _key(event.trace_id),
            event_payload(event, self.limit),
            _str_or_none(event.model) if "model" in has else None,
            _str_or_none(event.provider) if "provider" in has else None,
            prompt,
            completion,
            total,
            _float_or_none(event.cost_usd) if "cost_usd" in has else None,
            _float_or_none(event.latency_ms) if "latency_ms" in has else None,
            _str_or_none(error),
            *self.meta(tags, scope),
        )

    def rows(self, entries: list[Any]) -> tuple[list[Row], list[Row]]:
        """Span rows and event rows for a batch; a broken entry is logged and skipped.

        A span's start is read twice, wall clock then ``perf_counter`` (its end and
        duration come from the latter); another thread's turn between the two readings
        (up to the 5 ms switch interval) made the span's stored times early by that
        much, and a child could end after its parent. The greatest difference between
        the two clocks among the batch's spans started within a second of it is the one
        read without a pause (the clocks drift apart by a few parts per million): a
        span's readings less than 50 ms behind it are dated by it (a clock step, or a
        sleep of the machine, moves it by more)."""
        spans: list[Row] = []
        events: list[Row] = []
        clock_offsets = _clock_offsets(entries)
        for entry in entries:
            try:
                if type(entry) is tuple:
                    if len(entry) == 4:
                        spans.append(self.span_row(entry, clock_offsets))
                    elif not closed_early(entry[0]):
                        events.append(self.event_row(entry[0], entry[1]))
                elif not closed_early(entry):
                    events.append(self.event_row(entry, None))
            except Exception:
                self._unwritable(entry)
        return spans, events

    def _unwritable(self, entry: Any) -> None:
        """Count an entry no row could be made of; log it at most every 10 seconds."""
        _UNWRITABLE.inc()
        if self.on_unwritable is not None:
            self.on_unwritable(1)
        now = _monotonic()
        if now - self._last_log >= 10.0:
            self._last_log = now
            logger.error(
                "instrumentation.storage could not make a row of %s (%d such entries so far)",
                _safe_repr(entry, 300),
                _UNWRITABLE.value,
                exc_info=True,
            )


def _clock_offsets(entries: list[Any]) -> dict[int, float]:
    """The greatest wall clock less ``perf_counter`` of the spans in ``entries``, by the
    second of ``perf_counter`` they started in."""
    found: dict[int, float] = {}
    for entry in entries:
        if type(entry) is tuple and len(entry) == 4:
            try:
                info = entry[0]
                second = int(info[1])
                offset = float(info[0] - info[1])
            except Exception:  # a broken entry: rows() says so
                continue
            if offset > found.get(second, -_INF):
                found[second] = offset
    return found


def closed_early(event: Any) -> bool:
    """The drop event of a generator whose caller stopped reading: its span is stored
    as ok, and a drop event under it would say otherwise (the OpenTelemetry export
    leaves it out too)."""
    return type(event) is SpanDropEvent and event.err_type == "GeneratorExit"


__all__ = ["TRUNCATED", "UNSERIALISABLE"]
