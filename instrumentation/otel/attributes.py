"""Turn our values into OpenTelemetry attribute values.

OpenTelemetry accepts ``str``, ``bool``, ``int``, ``float`` and homogeneous sequences
of them. Everything else an event may carry (pydantic models, dicts, mixed lists)
becomes compact JSON, cut at :data:`MAX_VALUE_CHARS` so one large field cannot blow
an exporter's request size.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import BaseModel

from instrumentation._classcache import remember
from instrumentation._dump import dump
from instrumentation._finite import finite
from instrumentation._text import MAX_TEXT_CHARS, cut, printable_int, safe_str
from instrumentation._text import without_lone_surrogates as clean

#: Longest string value we put in an attribute (longer ones end with "...").
MAX_VALUE_CHARS = MAX_TEXT_CHARS

#: Fields every event has, reported through the span event itself rather than as attributes.
BASE_EVENT_FIELDS = frozenset({"timestamp", "id_", "span_id", "trace_id", "tags"})

_PRIMITIVES = (str, bool, int, float)

#: OTLP carries integers as int64; the exporter drops a larger one (and only logs it).
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

AttributeValue = str | bool | int | float | tuple[str, ...] | tuple[int, ...] | tuple[float, ...]


def clip(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    return clean(cut(text, limit))


def to_json(value: Any, limit: int = MAX_VALUE_CHARS) -> str:
    """Compact JSON for any value (models dumped in JSON mode, the rest via ``str``),
    kept valid JSON within ``limit`` characters (see :func:`fit_json`). NaN and the
    infinities are ``null``, as pydantic writes them."""
    try:
        if isinstance(value, BaseModel):
            value = dump(value, mode="json", exclude_none=True)
        elif isinstance(value, (list, tuple)):
            if len(value) > 2 * limit:  # fit_json shows no more than its first and latest
                value = [*value[:limit], *value[-limit:]]
            value = [
                dump(v, mode="json", exclude_none=True) if isinstance(v, BaseModel) else v
                for v in value
            ]
        try:
            return clean(fit_json(value, limit))
        except ValueError:  # NaN or an infinity (or a container holding itself: below)
            return clean(fit_json(finite(value), limit))
    except Exception:  # RecursionError, a key that is no string, a model that fails
        return clip(safe_str(value), limit)


def _dumps(value: Any) -> str:
    return json.dumps(
        value, default=safe_str, ensure_ascii=False, separators=(",", ":"), allow_nan=False
    )


#: What a string cut to fit ends with.
CUT_MARK = "...[cut]"
_SHORTEST_CUT = 32
#: A list's strings are not cut shorter than this before its oldest items are left out:
#: a chat's latest messages, readable, say more than all of them cut to a few words.
_LIST_FLOOR = 256


def _cut_strings(value: Any, longest: int, depth: int = 0) -> Any:
    if isinstance(value, str):
        return value if len(value) <= longest else value[:longest] + CUT_MARK
    if depth > 32:
        return value
    if isinstance(value, dict):
        return {k: _cut_strings(v, longest, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_cut_strings(v, longest, depth + 1) for v in value]
    return value


def _longest_string(value: Any, depth: int = 0) -> int:
    if isinstance(value, str):
        return len(value)
    if depth > 32:
        return 0
    if isinstance(value, dict):
        return max((_longest_string(v, depth + 1) for v in value.values()), default=0)
    if isinstance(value, (list, tuple)):
        return max((_longest_string(v, depth + 1) for v in value), default=0)
    return 0


def _longest_cut_that_fits(value: Any, limit: int, lowest: int) -> str | None:
    """The JSON of ``value`` with its strings cut to the greatest length, at least
    ``lowest``, that fits ``limit`` (a binary search); None if none does."""
    longest = _longest_string(value)
    if longest <= lowest:
        text = _dumps(value)
        return text if len(text) <= limit else None
    low, high = lowest, longest
    best: str | None = None
    while low <= high:
        middle = (low + high) // 2
        candidate = _dumps(_cut_strings(value, middle))
        if len(candidate) <= limit:
            best, low = candidate, middle + 1
        else:
            high = middle - 1
    return best


def _latest_that_fit(items: list[Any], limit: int) -> str | None:
    """A list's JSON within ``limit``: as many of its latest items as fit with their
    strings cut to :data:`_LIST_FLOOR` at most, the strings of those then given back
    as much length as fits. Only the items near the end are serialised (a doubling,
    then a binary search, over how many to keep), so a huge list costs little more
    than the one serialisation that found it too long."""
    floor = _LIST_FLOOR

    def fits(count: int) -> bool:
        return len(_dumps([_cut_strings(i, floor) for i in items[-count:]])) <= limit

    if not fits(1):  # the latest item alone is too long: cut it further
        return _longest_cut_that_fits(items[-1:], limit, _SHORTEST_CUT)
    good, bad = 1, len(items) + 1
    count = 2
    while count < bad:
        if not fits(count):
            bad = count
            break
        good = count
        count *= 2
    else:
        if fits(len(items)):
            good = len(items)
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return _longest_cut_that_fits(items[-good:], limit, floor)


def fit_json(value: Any, limit: int = MAX_VALUE_CHARS) -> str:
    """``value`` as compact JSON of at most ``limit`` characters that is still JSON.

    Backends parse these attributes (a chat's messages, say): JSON cut at a length no
    longer parses, and is shown as a raw string. So the value itself is made smaller:
    for a list, its oldest items are left out and its strings cut (each ending with
    :data:`CUT_MARK`) as little as fits (see :func:`_latest_that_fit`); for anything
    else its strings are cut; what still does not fit becomes a JSON string of the
    cut text.

    This runs on the application's thread, so a value too large to fit however its
    strings are cut (a list of a million numbers, a dict holding one) is never
    serialised whole: only its latest items that may fit, and the beginning of its
    text. For a value JSON can encode the result is the same as if it were. Only a
    value that holds a long list or dict, at any depth, or too many items in all to
    fit, is looked at so (:func:`_items_left_in`): a chat's messages are
    serialised at once.
    """
    left = _items_left_in(value, limit)
    if left < 0 and _least_size(value, limit) > limit:
        if isinstance(value, (list, tuple)):
            latest = _latest_within(value, limit)
            fitted = _latest_that_fit(latest, limit) if latest else None
            if fitted is not None:
                return fitted
        front, _ = _front(value, limit + _FRONT_MARGIN)
        return _as_cut_string(_dumps(front), limit)
    if left == _STRING_TOO_LONG:
        # No string longer than ``limit`` can be whole in what fits: cut to that first,
        # the result is the same, and a 10 MB one is not serialised (a dozen times).
        value = _cut_strings(value, limit)
    text = _dumps(value)
    if len(text) <= limit:
        return text
    if isinstance(value, (list, tuple)) and value:
        fitted = _latest_that_fit(list(value), limit)
    else:
        fitted = _longest_cut_that_fits(value, limit, _SHORTEST_CUT)
    if fitted is not None:
        return fitted
    return _as_cut_string(text, limit)


def _as_cut_string(text: str, limit: int) -> str:
    """``text`` cut to fit ``limit`` as a JSON string."""
    keep = limit - 2
    while True:
        out = _dumps(clip(text, keep))
        if len(out) <= limit or keep <= 3:
            return out
        # Escapes made it longer than it is: shrink in proportion, at least by one.
        keep = max(3, min(keep - 1, keep * limit // len(out)))


#: A list or dict longer than this is long (see :func:`fit_json`).
_LONG = 256
#: How deep :func:`_least_size` and :func:`_front` look, as :func:`_cut_strings` does.
_DEPTH = 32
_CONTAINERS = (list, tuple, dict)
#: What most items are: known at once not to be containers (isinstance costs more).
_LEAVES = frozenset({str, int, float, bool, type(None)})


#: What :func:`_items_left` answers on finding a string too long to fit, whatever left.
_STRING_TOO_LONG = -(2**62)


def _items_left_in(value: Any, limit: int) -> int:
    """Negative when ``value`` is a list or dict longer than :data:`_LONG`, or holds one
    as deep as :func:`_least_size` looks, or more than ``limit // 2`` items in all;
    :data:`_STRING_TOO_LONG` when a string longer than ``limit`` is found first.

    A long list two levels down was serialised whole (and again to be cut) for the 8 KB
    kept of it, where one on top or one level down is not. Each item takes at least
    two characters of JSON (itself, and the comma or bracket after it), so past
    ``limit // 2`` items the value cannot fit however short its containers are: the
    walk stops there, which also bounds it in a container that holds itself.
    """
    return _items_left(value, limit // 2, 0, limit) if isinstance(value, _CONTAINERS) else 0


def _items_left(container: Any, left: int, depth: int, longest: int) -> int:
    """``left`` less the items of ``container`` and of the containers in it, negative
    as soon as one is long (a string too: longer than ``longest``) or they are too
    many: a huge value costs no more than ``left`` items, and the common small one no
    serialisation of its own."""
    size = len(container)
    if size > _LONG:
        return -1
    left -= size
    if left < 0 or depth >= _DEPTH:
        return left
    for item in container.values() if isinstance(container, dict) else container:
        kind = type(item)
        if kind is str:
            if len(item) > longest:
                return _STRING_TOO_LONG
        elif kind not in _LEAVES and isinstance(item, _CONTAINERS):
            left = _items_left(item, left, depth + 1, longest)
            if left < 0:
                return left
    return left


#: Closing brackets and quotes past ``limit`` that :func:`_front` keeps text for.
_FRONT_MARGIN = 2 * _DEPTH + 8


def _least_size(value: Any, budget: int, depth: int = 0) -> int:
    """The fewest characters ``value``'s JSON can take with its strings cut as short as
    :func:`fit_json` cuts them, counted only until the count passes ``budget``: a
    huge value is found too large after ``budget`` items, not after all of them."""
    if isinstance(value, str):
        return min(len(value), _SHORTEST_CUT) + 2
    if depth > _DEPTH or not isinstance(value, (list, tuple, dict)):
        return 1
    if not value:
        return 2
    size = 1  # the opening bracket; each item then counts the comma or bracket after it
    if isinstance(value, dict):
        for key, item in value.items():
            size += (len(key) if isinstance(key, str) else 1) + 4
            size += _least_size(item, budget - size, depth + 1)
            if size > budget:
                break
    else:
        for item in value:
            size += 1 + _least_size(item, budget - size, depth + 1)
            if size > budget:
                break
    return size


def _latest_within(items: list[Any] | tuple[Any, ...], limit: int) -> list[Any]:
    """The latest ``items`` whose fewest characters (see :func:`_least_size`) add up to
    ``limit`` at most: no older item can be in a list's JSON that fits."""
    total = 1
    start = len(items)
    for index in range(len(items) - 1, -1, -1):
        total += 1 + _least_size(items[index], limit - total)
        if total > limit:
            break
        start = index
    return list(items[start:])


def _front(value: Any, budget: int, depth: int = 0) -> tuple[Any, int]:
    """A copy of the beginning of ``value`` whose JSON starts with the same ``budget``
    characters (less its closing brackets) as ``value``'s own, and at least as many
    characters as that: what :func:`_as_cut_string` keeps of a value too large to
    serialise whole. Also returns the fewest characters the copy's JSON takes."""
    if isinstance(value, str):
        # Its first ``budget`` characters are all of it that can be in the text kept.
        return value[:budget], len(value) + 2
    if depth > _DEPTH or not isinstance(value, (list, tuple, dict)):
        return value, 1
    size = 1  # as in _least_size
    if isinstance(value, dict):
        head: dict[Any, Any] = {}
        for key, item in value.items():
            if size > budget:
                break
            head[key], taken = _front(item, budget - size, depth + 1)
            size += (len(key) if isinstance(key, str) else 1) + 4 + taken
        return head, max(size, 2)
    items: list[Any] = []
    for item in value:
        if size > budget:
            break
        copied, taken = _front(item, budget - size, depth + 1)
        items.append(copied)
        size += 1 + taken
    return items, max(size, 2)


#: A homogeneous list longer than this, or of strings longer than this in all, is sent
#: as JSON within :data:`MAX_VALUE_CHARS` (its latest items): an attribute of millions
#: of numbers made a request that collectors refuse, with every span of its batch.
MAX_SEQUENCE_ITEMS = 1024
MAX_SEQUENCE_CHARS = 65_536


def to_attribute(value: Any) -> AttributeValue | None:
    """``value`` as an attribute value, or ``None`` to leave it out. Never raises: a
    value that cannot even be printed is sent as a placeholder naming its type."""
    try:
        return _to_attribute(value)
    except Exception:
        return f"<unprintable {type(value).__qualname__}>"


def _to_attribute(value: Any) -> AttributeValue | None:
    if value is None:
        return None
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, str):
        return clip(value)
    if isinstance(value, _PRIMITIVES):
        if type(value) is int and not _INT64_MIN <= value <= _INT64_MAX:
            return str(printable_int(value))  # exact, where an int64 could not hold it
        return value
    if isinstance(value, datetime):
        return clean(value.isoformat())
    if isinstance(value, (list, tuple)) and value and len(value) <= MAX_SEQUENCE_ITEMS:
        kind = type(value[0])
        if kind in _PRIMITIVES and all(type(v) is kind for v in value):
            if kind is str:
                if sum(map(len, value)) > MAX_SEQUENCE_CHARS:
                    return to_json(value)
                return tuple(clip(v) for v in value)
            if kind is int and not all(_INT64_MIN <= v <= _INT64_MAX for v in value):
                return tuple(str(printable_int(v)) for v in value)
            return tuple(value)
    return to_json(value)


def clean_attributes(attributes: dict[str, Any]) -> dict[str, Any]:
    """``attributes`` with :func:`clean` applied to their text (and keys), in place: the
    LLM attributes come from many fields (model names, tool calls, finish reasons)."""
    for key, value in list(attributes.items()):
        if isinstance(value, str):
            if not value.isascii():
                attributes[key] = clean(value)
        elif isinstance(value, tuple) and value and isinstance(value[0], str):
            attributes[key] = tuple(clean(v) for v in value)
        if not key.isascii():
            attributes[clean(key)] = attributes.pop(key)
    return attributes


def tag_attributes(tags: Mapping[str, Any] | None, out: dict[str, Any]) -> None:
    """Add ``instrumentation.tag.<key>`` for each tag."""
    if not tags:
        return
    for key, value in tags.items():
        converted = to_attribute(value)
        if converted is not None:
            name = key if isinstance(key, str) else safe_str(key)
            out[clean(f"instrumentation.tag.{name}")] = converted


#: The fields each event class exports, by ``id(cls)`` (see ``remember``).
_exported: dict[int, tuple[str, ...]] = {}


def _exported_fields(cls: type) -> tuple[str, ...]:
    try:
        return _exported[id(cls)]
    except KeyError:
        return remember(_exported, cls, _work_out_exported(cls))


def _work_out_exported(cls: type) -> tuple[str, ...]:
    """The fields of ``cls`` but the base event's and those declared
    ``Field(exclude=True)``: kept out of every dump of the event (a client, a key),
    they were sent to the backend all the same."""
    fields: dict[str, Any] = getattr(cls, "model_fields", {})
    return tuple(
        name for name, info in fields.items() if name not in BASE_EVENT_FIELDS and not info.exclude
    )


def event_attributes(event: Any) -> dict[str, Any]:
    """The attributes of the span event that stands for one of our events."""
    out: dict[str, Any] = {"instrumentation.event_id": event.id_}
    for name in _exported_fields(type(event)):
        converted = to_attribute(getattr(event, name, None))
        if converted is not None:
            out[name] = converted
    tag_attributes(event.tags, out)
    return out


__all__: list[str] = []
