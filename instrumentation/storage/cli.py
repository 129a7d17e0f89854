"""``python -m instrumentation``: list, show, follow and export stored traces, and list
their events.

    python -m instrumentation --db traces.db list --limit 20 --status error
    python -m instrumentation --db traces.db show latest          # or an id (prefix)
    python -m instrumentation --db postgresql://localhost/traces tail --interval 1
    python -m instrumentation --db traces.db tail --lookback 300  # and the last 5 minutes
    python -m instrumentation --db traces.db events --type LLMChatEndEvent --since 1h
    python -m instrumentation --db traces.db export --limit 100 > traces.jsonl

``--db`` takes a SQLite path (or ``sqlite:///path``) or a PostgreSQL DSN; it defaults to
``$INSTRUMENTATION_DB``, then ``instrumentation.db``. The command line only reads: it
opens the store with ``read_only=True``, so it never creates a database, creates
tables or migrates a schema; anything that is not a trace database of this release's
schema exits with status 2 and says why.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import errno
import heapq
import itertools
import json
import os
import secrets
import shlex
import shutil
import stat
import sys
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, TextIO, TypeVar, cast

from instrumentation._cli_args import PAGE, parse_arguments
from instrumentation._finite import finite
from instrumentation._text import escape_controls as _printable
from instrumentation.storage.base import Store
from instrumentation.storage.models import StoredEvent, StoredSpan, TraceSummary, roots_of
from instrumentation.tree import FittedStream, draw_tree, fitted_stream, format_duration

_T = TypeVar("_T")


def _meta(values: list[tuple[str, str]] | None) -> dict[str, str]:
    wanted: dict[str, str] = {}
    for key, value in values or []:
        if key in wanted and wanted[key] != value:
            raise ValueError(
                f"--meta {key}= is given twice ({wanted[key]!r} and {value!r}): "
                "a trace has one value per key"
            )
        wanted[key] = value
    return wanted


def _tokens(n: int) -> str:
    return f"{n} tok" if n else ""


def _cost(c: float | None) -> str:
    """Dollars to the hundredth of a cent; below a cent, to two significant digits
    (a call to a small model costs $0.000023, which four decimals showed as $0.0000).
    Empty for no cost known; ``$0`` for a known one of nothing (a local model priced
    at zero), which showed as unknown."""
    if c is None:
        return ""
    if c == 0:
        return "$0"
    if abs(c) >= 0.01:
        return f"${c:.4f}"
    return "$" + format(Decimal(f"{c:.2g}"), "f")


def _char_width(char: str) -> int:
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def _width(text: str) -> int:
    """Terminal columns ``text`` takes (CJK characters take two, accents none)."""
    if text.isascii():
        return len(text)
    return sum(_char_width(c) for c in text)


def _cap(text: str, columns: int) -> str:
    """``text`` cut to ``columns`` terminal columns, with ``…`` where it was cut."""
    if _width(text) <= columns:
        return text
    used = 0
    for index, char in enumerate(text):
        used += _char_width(char)
        if used > columns - 1:
            return text[:index] + "…"
    return text


def _pad(text: str, columns: int) -> str:
    return text + " " * (columns - _width(text))


def _first_line(text: str) -> str:
    """The first line of ``text``, with ``…`` if more lines follow (a validation error
    of many lines must not break ``list``'s one line per trace)."""
    first, newline, rest = text.strip("\n").partition("\n")
    return first + (" …" if newline and rest.strip() else "")


#: The most terminal columns a name takes in ``list`` (and ``tail``), and an error.
_NAME_COLUMNS = 120
_ERROR_COLUMNS = 200
#: ``list`` pads names to the widest, up to this: a longer one shifts its own line's
#: later columns, rather than every line's by a hundred blanks.
_ALIGN_COLUMNS = 48


def _clock(moment: datetime, milliseconds: bool = False) -> str:
    """``moment`` in local time, to the second (or millisecond); in UTC where local
    time would leave the years 1 to 9999 (an event dated by hand to the year 1, west
    of Greenwich). The year has four digits (``strftime`` writes the year 1 as 1)."""
    try:
        moment = moment.astimezone()
    except (OverflowError, ValueError):
        pass
    text = f"{moment.year:04d}-{moment:%m-%d %H:%M:%S}"
    return f"{text}.{moment.microsecond // 1000:03d}" if milliseconds else text


def _summary_columns(s: TraceSummary) -> list[str]:
    """``list``'s columns for one trace: time, id, name, duration, spans, outcome,
    tokens, cost (the last two empty when there are none)."""
    if s.status == "error":
        outcome = "✗ " + _cap(_printable(_first_line(s.error or "failed")), _ERROR_COLUMNS)
    else:
        outcome = "ok" + (_failed_inside(s.error_count) if s.error_count else "")
    return [
        _clock(s.start),
        _printable(s.trace_id),
        _cap(_printable(s.name or "?"), _NAME_COLUMNS),
        format_duration(s.duration),
        f"{s.span_count} span" if s.span_count == 1 else f"{s.span_count} spans",
        outcome,
        _tokens(s.total_tokens),
        _cost(s.cost_usd),
    ]


def summary_line(s: TraceSummary) -> str:
    """One trace on one line: its start, id, root span, duration, span count, how it
    ended (the first line of its error), tokens and cost. Control characters in the
    name and the error are escaped, and a very long name is cut (see :func:`_cap`)."""
    return "  ".join(p for p in _summary_columns(s) if p)


def summary_lines(summaries: Sequence[TraceSummary]) -> list[str]:
    """:func:`summary_line` of each trace, in columns: the ids, names, durations and
    span counts padded to the widest of them, so that the columns after line up."""
    rows = [_summary_columns(s) for s in summaries]
    if not rows:
        return []
    widths = [max(_width(row[i]) for row in rows) for i in range(5)]
    widths[2] = max([_width(row[2]) for row in rows if _width(row[2]) <= _ALIGN_COLUMNS] or [0])
    lines = []
    for row in rows:
        row[1] = _pad(row[1], widths[1])
        row[2] = _pad(row[2], widths[2])
        row[3] = " " * (widths[3] - _width(row[3])) + row[3]
        row[4] = " " * (widths[4] - _width(row[4])) + row[4]
        lines.append("  ".join(p for p in row if p))
    return lines


def _failed_inside(count: int) -> str:
    # The trace's outcome is its root's (what --status selects); spans that failed
    # inside it (an error caught and handled, a retry) are counted beside it.
    return f" ({count} span{'s' if count != 1 else ''} failed inside)"


#: The fields that hold what a call answered (``response`` of the LLM chat and
#: completion events, ``output`` of the predict ones): ``show --events`` puts them
#: first, as text, with the room the line has. After the messages, usage and latency,
#: cut at 40 characters, the model's answer was never seen.
_ANSWER_FIELDS = ("response", "output")
#: The most characters of a field's value on an event's line (an answer: the line's).
_VALUE_CHARS = 40


def _answer_text(value: Any) -> str | None:
    """The text of a stored answer: a chat response's message content, a completion's
    text, or a plain string; ``None`` for anything else (shown as its ``repr``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        message = value.get("message")
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            return str(message["content"])
        if isinstance(value.get("text"), str):
            return str(value["text"])
    return None


def _event_fields(
    payload: Any, shown: str | None, width: int = 100, metadata: Mapping[str, str] | None = None
) -> str:
    """An event's own fields on one line, cut at ``width`` characters (not the one
    whose value is ``shown`` already, as its error; nor the tags that ``metadata``
    shows already, the same on every event of a request, which took up the line).

    What the call answered comes first, as its text (see :data:`_ANSWER_FIELDS`);
    the value of any other field is cut at :data:`_VALUE_CHARS` characters."""
    if not isinstance(payload, dict):
        return ""
    answers = [k for k in _ANSWER_FIELDS if payload.get(k) is not None]
    parts = []
    for key in [*answers, *(k for k in payload if k not in answers)]:
        value = payload[key]
        if key == "tags" and isinstance(value, dict) and metadata:
            value = {k: v for k, v in value.items() if metadata.get(k) != v}
        if (key == "tags" and not value) or (shown is not None and value == shown):
            continue
        if key == "err_type" and shown is not None:  # a drop event's: its error is shown
            continue
        answer = _answer_text(value) if key in answers else None
        label = key
        if key in answers and answer is None and isinstance(value, dict):
            # A streamed chunk's response is stored without the answer so far (see
            # ``serialise._REPEATED_IN_CHUNKS``): its new text is what it answered.
            # Shown as the dict, its ``raw`` provider chunk filled the line.
            delta = value.get("delta")
            if isinstance(delta, str):
                answer, label = delta, "delta"
        text = _printable(repr(value if answer is None else answer))
        room = width if key in answers else _VALUE_CHARS
        cut = text if len(text) <= room else text[: room - 1] + "…"
        parts.append(f"{_printable(str(label))}={cut}")
    line = " ".join(parts)
    return line if len(line) <= width else line[: width - 1] + "…"


def span_label(span: StoredSpan) -> str:
    """A span's line in the tree: name, duration, models, tokens, cost and error, on
    one line (control characters escaped)."""
    parts = [_printable(span.name or span.id_), format_duration(span.duration)]
    models = sorted({e.model for e in span.events if e.model})
    if models:
        parts.append(_printable(",".join(models)))
    if span.total_tokens:
        parts.append(_tokens(span.total_tokens))
    if span.cost_usd:
        parts.append(_cost(span.cost_usd))
    if span.status == "error":
        parts.append(f"✗ {_printable(span.error or 'failed')}")
    return "  ".join(parts)


def shared_metadata(spans: Sequence[StoredSpan]) -> dict[str, str]:
    """The metadata every root of a trace has, with the same value: what ``show``
    prints once, above the tree, instead of on each event."""
    roots = roots_of(list(spans))
    if not roots:
        return {}
    common = dict(roots[0].metadata)
    for root in roots[1:]:
        common = {k: v for k, v in common.items() if root.metadata.get(k) == v}
    return common


def format_trace(
    spans: list[StoredSpan],
    *,
    events: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """A stored trace as an indented tree (the same drawing as ``SimpleSpanHandler``).

    With ``events``, each span's events are listed under it, with their fields; the
    tags that ``metadata`` holds (what ``show`` prints above the tree) are left out.
    The tree is built and drawn without recursion: a trace thousands of spans deep
    (a recursive algorithm, an agent's loop) is drawn like any other.
    """
    if not isinstance(spans, (list, tuple)) or not all(isinstance(s, StoredSpan) for s in spans):
        raise TypeError(
            "format_trace() takes the spans of one trace, as store.trace(trace_id) returns "
            f"them (a list of StoredSpan); got {_kinds(spans)}"
        )
    if events:
        hidden = dict(metadata or {})

        def label(item: Any) -> str:
            if isinstance(item, StoredSpan):
                return span_label(item)
            fields = _event_fields(item.payload, item.error, metadata=hidden)
            error = _event_error(item)
            return (
                f"· {_printable(item.type)}"
                + (f"  {fields}" if fields else "")
                + (f"  ✗ {_printable(error)}" if error else "")
            )

        items: list[Any] = [*spans, *(e for s in spans for e in s.events)]
        return draw_tree(
            items,
            lambda i: i.id_,
            lambda i: i.parent_id if isinstance(i, StoredSpan) else i.span_id,
            label,
            lambda i: i.start if isinstance(i, StoredSpan) else i.time,
        )
    return draw_tree(spans, lambda s: s.id_, lambda s: s.parent_id, span_label, lambda s: s.start)


def format_traces(store: Store, limit: int = 20, **filters: Any) -> str:
    """The most recent traces, oldest first, each as its summary line and its tree.

    ``filters`` are those of ``store.traces()``. What ``make demo`` prints after
    reading the demo's traces back from its SQLite file.
    """
    if not isinstance(store, Store):
        raise TypeError(
            "format_traces() takes a store (storage.open_store(path) or SQLiteStore(path)), "
            f"got {type(store).__name__}"
        )
    blocks = []
    for summary in reversed(store.traces(limit=limit, **filters)):
        blocks.append(summary_line(summary) + "\n" + format_trace(store.trace(summary.trace_id)))
    return "\n\n".join(blocks) if blocks else "(no traces)"


def _kinds(value: Any) -> str:
    """What ``value`` is, for an error message: its type, and for a list the types in it."""
    if isinstance(value, (list, tuple)):
        inside = sorted({type(item).__name__ for item in value})
        return f"a {type(value).__name__} of {', '.join(inside)}" if inside else "an empty list"
    return f"a {type(value).__name__}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(type(value).__name__)


_SPAN_FIELDS = tuple(f.name for f in dataclasses.fields(StoredSpan) if f.name != "children")
_EVENT_FIELDS = tuple(f.name for f in dataclasses.fields(StoredEvent))


def trace_record(trace_id: str, spans: list[StoredSpan]) -> dict[str, Any]:
    """One exported JSON line: the trace with its spans (flat, with parent ids) and events.

    Each span's dict is made from its own fields, its events' from theirs: not with
    ``dataclasses.asdict``, which copied each span's whole subtree (``children``) to
    drop it again, so that a trace of 50,000 spans took seconds and hundreds of MB, and
    a deep one exceeded the recursion limit. The dicts share the spans' ``tags``,
    ``attributes``, ``metadata`` and ``payload`` dicts (copy them to change them).
    """
    flat = []
    for span in spans:
        data = {name: getattr(span, name) for name in _SPAN_FIELDS}
        data["events"] = [{name: getattr(e, name) for name in _EVENT_FIELDS} for e in span.events]
        flat.append(data)
    return {"trace_id": trace_id, "roots": [s.id_ for s in roots_of(spans)], "spans": flat}


#: The characters of a trace id ``events`` prints: unique among many traces, and
#: taken by ``show`` and ``export`` as a prefix.
_SHORT_ID = 12


def event_line(event: StoredEvent) -> str:
    """One event on one line: when (local time, to the millisecond), its type and its
    trace's id (cut), what an LLM call's end event holds (model, tokens, cost,
    latency, error), then its own fields, cut to fit."""
    return "  ".join(p for p in _event_columns(event) if p)


def event_lines(events: Sequence[StoredEvent]) -> list[str]:
    """:func:`event_line` of each event, in columns: the types padded to the widest
    (up to 48 columns, as ``list`` pads names) and the trace ids to 12 characters, so
    that the ids and what follows them line up."""
    rows = [_event_columns(e) for e in events]
    width = max([_width(r[1]) for r in rows if _width(r[1]) <= _ALIGN_COLUMNS] or [0])
    lines = []
    for row in rows:
        row[1] = _pad(row[1], width)
        row[2] = _pad(row[2], _SHORT_ID)
        lines.append("  ".join(p for p in row if p).rstrip(" "))
    return lines


def _event_columns(event: StoredEvent) -> list[str]:
    """:func:`event_line`'s columns for one event (those it lacks empty)."""
    parts = [
        _clock(event.time, milliseconds=True),
        _cap(_printable(event.type), _NAME_COLUMNS),
        _printable((event.trace_id or "-")[:_SHORT_ID]),
    ]
    if event.model:
        parts.append(_cap(_printable(event.model), _NAME_COLUMNS))
    if event.total_tokens:
        parts.append(_tokens(event.total_tokens))
    parts.append(_cost(event.cost_usd))
    if event.latency_ms is not None:
        parts.append(format_duration(event.latency_ms / 1000))
    error = _event_error(event)
    if error:
        parts.append("✗ " + _cap(_printable(_first_line(error)), _ERROR_COLUMNS))
    # Not again among the fields what the columns before show.
    shown = {
        key
        for key, value in (
            ("model", event.model),
            ("usage", event.total_tokens),
            ("cost_usd", event.cost_usd),
            ("latency_ms", event.latency_ms),
        )
        if value
    }
    payload = {k: v for k, v in event.payload.items() if k not in shown}
    parts.append(_event_fields(payload, event.error))
    return parts


def _event_error(event: StoredEvent) -> str | None:
    """An event's error as its line shows it: a ``SpanDropEvent``'s with the exception's
    class first (``KeyError: 'k'``), as the span's line has it. Its stored error is
    ``str()`` of the exception, which for a ``KeyError`` is only the key, and for a
    ``ValueError()`` or a cancellation nothing at all."""
    kind = event.payload.get("err_type") if isinstance(event.payload, dict) else None
    if not isinstance(kind, str) or not kind:
        return event.error
    return f"{kind}: {event.error}" if event.error else kind


def _event_record(event: StoredEvent) -> dict[str, Any]:
    """One ``events --json`` line: the event's stored fields (``export``'s event)."""
    return {name: getattr(event, name) for name in _EVENT_FIELDS}


def _cmd_events(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    trace_id = None
    if args.trace is not None:
        trace_id = store.resolve_trace_id(args.trace)
        if trace_id is None:
            print(_no_match(store, args.trace), file=sys.stderr)
            return 1
    filters: dict[str, Any] = {
        "trace_id": trace_id,
        "type": args.type,
        "since": args.since,
        "until": args.until,
    }
    # The last ones, in the order they happened (as ``tail`` shows a log); --all reads
    # every one a page at a time.
    found: Iterable[StoredEvent] = (
        store.iter_events(**filters)
        if args.all
        else reversed(store.events(limit=args.limit, newest_first=True, **filters))
    )
    if args.json:
        for event in found:
            out.write(_json_line(_event_record(event), out))
            out.write("\n")
        return 0
    # In columns a page at a time: --all prints as it reads.
    if not _print_in_pages(found, event_lines, out):
        print("(no events)", file=out)
        _hint(_type_hint(store, args.type))
    return 0


def _hint(hint: str | None) -> None:
    """Say on stderr why a filter may have found nothing (stdout stays the result)."""
    if hint is not None:
        print(f"hint: {hint}", file=sys.stderr)


#: The most event types ``events`` reads to tell a near miss of ``--type``.
_TYPES_READ = 1000


def _type_hint(store: Store, given: str | None) -> str | None:
    """The stored type ``--type`` is close to, when it is none of them (``Hitt`` for
    ``Hit``, ``llmchatendevent``): asked only when no event was found."""
    if given is None:
        return None
    stored = store.event_types(_TYPES_READ)
    if given in stored or len(stored) == _TYPES_READ:  # it may be among those not read
        return None
    by_lower = {t.lower(): t for t in stored}
    lower = given.lower()
    meant = [lower] if lower in by_lower else difflib.get_close_matches(lower, by_lower, n=3)
    close = [by_lower[t] for t in meant]
    if not close:
        return None
    return f"no event has type {given!r}; did you mean {' or '.join(map(repr, close))}?"


def _print_in_pages(
    items: Iterable[_T], lines_of: Callable[[list[_T]], list[str]], out: TextIO
) -> bool:
    """Print ``lines_of`` each page of ``items`` (their columns lined up within it), read
    as it is printed; whether there was any."""
    printed = False
    for page in _pages(items, _PAGE):
        for line in lines_of(page):
            print(line, file=out)
        printed = True
    return printed


def _pages(items: Iterable[_T], size: int) -> Iterator[list[_T]]:
    """``items`` in lists of ``size`` (the last shorter), read as they are needed."""
    iterator = iter(items)
    while page := list(itertools.islice(iterator, size)):
        yield page


def _cmd_list(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    # Read and printed a page at a time, each page's columns lined up: traces() held a
    # summary of every trace, and its line, before the first was printed.
    filters: dict[str, Any] = {
        "since": args.since,
        "until": args.until,
        "name": args.name,
        "status": args.status,
        "min_duration": args.min_duration,
        "dispatcher": args.dispatcher,
        "metadata": _meta(args.meta),
    }
    found = store.iter_traces(limit=None if args.all else args.limit, **filters)
    if not _print_in_pages(found, summary_lines, out):
        print("(no traces)", file=out)
        _hint(_name_hint(store, filters))
    return 0


def _name_hint(store: Store, filters: dict[str, Any]) -> str | None:
    """When ``--name`` (without ``*``) is no trace's name but the start of some: the
    user meant a prefix (``handle`` for ``handle_request``). One query, of one trace,
    asked only when nothing was listed."""
    name = filters["name"]
    if name is None or "*" in name or not store.traces(limit=1, **{**filters, "name": name + "*"}):
        return None
    wanted = shlex.quote(name + "*")
    return f"none is named exactly {name!r}, but names that start with it match: --name {wanted}"


def _no_match(store: Store, given: str) -> str:
    """Why ``given`` (a trace id, a prefix, or ``latest``) names no single trace."""
    if given != "latest" and len(store.trace_ids_starting_with(given)) > 1:
        return f"several traces start with {given!r}: give more of the id (see `list`)"
    if store.traces(limit=1):
        lower = given.lower()
        if lower != given and given != "latest" and store.trace_ids_starting_with(lower, 1):
            return f"no trace matches {given!r}: trace ids are lower case (try {lower!r})"
        return f"no trace matches {given!r} (see `list` for the ids)"
    none_yet = "there are no traces yet (a trace is listed once its root span has ended)"
    return none_yet if given == "latest" else f"no single trace matches {given!r}: {none_yet}"


def _cmd_show(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    trace_id = store.resolve_trace_id(args.trace_id)
    if trace_id is None:
        print(_no_match(store, args.trace_id), file=sys.stderr)
        return 1
    spans = store.trace(trace_id)
    if args.json:
        # ASCII JSON (``\u`` escapes), as it always was: the same on any terminal.
        print(_json_line(trace_record(trace_id, spans), out, unicode=False), file=out)
    else:
        metadata = shared_metadata(spans)
        shown = "".join(f"  {k}={_printable(v)}" for k, v in metadata.items())
        print(f"trace {_printable(trace_id)}{shown}", file=out)
        print(format_trace(spans, events=args.events, metadata=metadata), file=out)
    return 0


#: How far behind the last trace shown ``tail`` looks again: a trace that ended
#: earlier may reach the database later (its writer batches, or was down a while).
_LATE = timedelta(seconds=60)
#: How often (seconds) ``tail`` reads that stretch again; in between it reads only
#: what is new since its last position.
_RECHECK_EVERY = 5.0
#: The most traces ``tail`` remembers having shown (to show none twice when it reads
#: the last 60 seconds again). Past that, it forgets the oldest, and no longer looks
#: for late traces that ended before them.
_REMEMBER = 10_000
#: Traces read per query.
_PAGE = PAGE
#: Times read back may differ from those stored by under a microsecond (SQLite keeps
#: more digits): what tail forgets lies this far behind where it reads again.
_MARGIN = timedelta(milliseconds=1)
_MICROSECOND = timedelta(microseconds=1)

#: Where tail reads from: a time, or ``(end, root span id)`` of a trace read.
_Position = datetime | tuple[datetime, str]


def _end_of(position: _Position) -> datetime:
    return position if isinstance(position, datetime) else position[0]


class _Follower:
    """What ``tail`` has shown, and where it reads next.

    It reads the traces that ended after its position, by end time then root span id,
    a page at a time, the position being the ``(end, root span id)`` of the last trace
    read: each query starts where the previous one stopped, however many traces end at
    the same moment. Every :data:`_RECHECK_EVERY` seconds it starts again from its
    floor, :data:`_LATE` before the last trace shown, for traces that reached the
    database late. To show none twice, it remembers the traces it has shown that ended
    after the floor, at most :data:`_REMEMBER`: past that, it forgets the oldest and
    raises the floor above them, never past the last trace read (the frontier). A
    trace is remembered by its root span, not its trace id: a trace continued in
    another process is listed by that process's root until the span it continues is
    stored, and then by its top span, which must be shown as well.
    """

    def __init__(self, store: Store, shown_from: datetime) -> None:
        self._store = store
        #: Only traces after this are shown: every one shown since is remembered.
        self._floor: _Position = shown_from
        self._position: _Position = shown_from
        #: The furthest trace read, and whether the position is there (or past it).
        self._frontier: tuple[datetime, str] | None = None
        self._at_frontier = True
        self._latest: datetime | None = None  # the latest end of a trace shown
        self._seen: set[str] = set()  # root span ids of the traces shown
        self._by_end: list[tuple[datetime, str]] = []  # a heap of what _seen holds
        self._rechecked: float | None = None

    @property
    def remembered(self) -> int:
        """How many shown traces are remembered (at most :data:`_REMEMBER`)."""
        return len(self._seen)

    def new_traces(self) -> Iterator[TraceSummary]:
        """Every trace not shown yet that ended after the floor, by end time; each is
        taken as shown once yielded."""
        now = time.monotonic()
        if self._rechecked is None or now - self._rechecked >= _RECHECK_EVERY:
            self._rechecked = now
            self._position = self._floor
            self._at_frontier = self._frontier is None or self._floor == self._frontier
        elif self._frontier is not None:
            self._position = self._frontier
            self._at_frontier = True
        while True:
            # Room for a whole page, so that what is remembered stays within bounds.
            self._forget(keep=max(0, _REMEMBER - _PAGE))
            page = self._store.traces(limit=_PAGE, ended_after=self._position)
            for summary in page:
                if summary.end is None:  # not listed: only ended traces are
                    continue
                read = (summary.end, summary.root_span_id)
                self._position = read
                frontier = self._frontier
                if not self._at_frontier and (
                    frontier is None or read[1] == frontier[1] or read[0] > frontier[0]
                ):
                    self._at_frontier = True
                if self._at_frontier:
                    self._frontier = read
                # By root span, not trace id: a trace that spans two processes has
                # a root in each (the other process's root is listed until the span
                # it continues is stored), and the one that ends last completes it.
                if summary.root_span_id in self._seen:
                    continue
                self._seen.add(summary.root_span_id)
                heapq.heappush(self._by_end, (summary.end, summary.root_span_id))
                if self._latest is None or summary.end > self._latest:
                    self._latest = summary.end
                yield summary
            if len(page) < _PAGE:
                return

    def _forget(self, keep: int) -> None:
        """Forget what ended too long before the latest trace shown, and the oldest
        past ``keep``; raise the floor above all that is forgotten."""
        floor = old = _end_of(self._floor)
        if self._latest is not None:
            floor = max(floor, self._latest - _LATE)
        while self._by_end and (len(self._seen) > keep or self._by_end[0][0] + _MARGIN < floor):
            end, root_span_id = heapq.heappop(self._by_end)
            self._seen.discard(root_span_id)
            floor = max(floor, end + _MARGIN)
        if floor <= old:
            return
        frontier = self._frontier
        if frontier is not None and floor >= frontier[0] - _MICROSECOND:
            # So many traces ended that close together that a floor in time would
            # pass some never read: read on from the last one read instead.
            self._floor = self._position = frontier
            self._at_frontier = True
            return
        self._floor = floor
        if floor > _end_of(self._position):
            self._position = floor


def _start_tail(args: argparse.Namespace) -> None:
    """Note when ``tail`` started, before it opens the database (which it may wait
    for): ``--max-seconds`` counts from then, and the traces that end after then are
    shown, with ``--lookback`` those that ended up to that long before."""
    args.started = time.monotonic()
    args.shown_from = datetime.now(timezone.utc) - timedelta(seconds=args.lookback)


def _tail_out_of_time(args: argparse.Namespace) -> bool:
    return args.max_seconds is not None and time.monotonic() - args.started >= args.max_seconds


#: How long ``tail`` takes a database file that has appeared but is no trace database
#: yet for one being made: the application's writer makes the tables a moment after
#: the file.
_BEING_MADE = 5.0


def _open_when_made(
    open_store: Callable[[], Store], args: argparse.Namespace, shown: str, named_by: str
) -> Store | None:
    """The store ``tail`` follows, once the application has made it; ``None`` if
    ``--max-seconds`` pass first. Starting ``tail`` before the application is natural:
    it exited at once, telling to set ``$INSTRUMENTATION_DB`` when that was set."""
    print(
        f"no trace database at {shown!r} yet ({named_by}); waiting for it to be made "
        "(Ctrl-C stops)",
        file=sys.stderr,
        flush=True,
    )
    appeared: float | None = None
    while not _tail_out_of_time(args):
        time.sleep(args.interval)
        try:
            return open_store()
        except FileNotFoundError:
            appeared = None
        except Exception:
            now = time.monotonic()
            appeared = now if appeared is None else appeared
            if now - appeared >= _BEING_MADE:
                raise
    return None


def _cmd_tail(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    if not hasattr(args, "started"):
        _start_tail(args)
    shown_from: datetime = args.shown_from
    print(
        f"following traces that end after {shown_from.astimezone():%Y-%m-%d %H:%M:%S}"
        " (Ctrl-C stops)",
        file=sys.stderr,
        flush=True,
    )
    follower = _Follower(store, shown_from)
    shown = 0
    down_since: float | None = None

    def out_of_time() -> bool:
        return _tail_out_of_time(args)

    while True:
        found = follower.new_traces()
        while True:
            try:
                summary = next(found, None)
            except (ValueError, TypeError):
                raise
            except Exception as exc:
                # The server restarted, or the file is locked for a while: tail is for
                # watching over time, so it says so once and keeps polling.
                if down_since is None:
                    down_since = time.monotonic()
                    print(f"cannot read the trace database ({exc}); retrying", file=sys.stderr)
                break
            if down_since is not None:
                print(
                    f"reading the trace database again after {time.monotonic() - down_since:.1f} s",
                    file=sys.stderr,
                )
                down_since = None
            if summary is None:
                break
            print(summary_line(summary), file=out)
            if args.tree:
                print(format_trace(store.trace(summary.trace_id)), file=out)
            out.flush()
            shown += 1
            if args.count is not None and shown >= args.count:
                return 0
            if out_of_time():
                return 0
        if out_of_time():
            return 0
        time.sleep(args.interval)


def _json_line(record: dict[str, Any], out: Any, *, unicode: bool | None = None) -> str:
    """A record as one line of JSON: UTF-8 text where the output takes it, else with
    ``\\u`` escapes (still the same JSON) for a terminal that cannot show the rest."""
    if unicode is None:
        unicode = not isinstance(out, FittedStream)
    try:
        return json.dumps(record, default=_jsonable, ensure_ascii=not unicode, allow_nan=False)
    except ValueError:  # NaN or an infinity, stored by an earlier release
        return json.dumps(finite(record), default=_jsonable, ensure_ascii=not unicode)


def _refuse_database_as_output(output: str, store: Store) -> None:
    """``export -o`` of the database itself (or its ``-wal``/``-shm``/``-journal``)
    would destroy the traces it reads: refuse it before anything is opened."""
    path = getattr(store, "path", None)
    if not isinstance(path, str) or path == ":memory:":
        return
    target = os.path.realpath(output)
    for suffix in ("", "-wal", "-shm", "-journal"):
        candidate = path + suffix
        same = target == os.path.realpath(candidate)
        if not same and os.path.exists(target) and os.path.exists(candidate):
            same = os.path.samefile(target, candidate)  # a hard link
        if same:
            what = "the trace database" + (f"'s {suffix[1:]} file" if suffix else "")
            raise ValueError(
                f"--output {output!r} is {what} being read: writing it would destroy "
                "the traces; give another file"
            )


class _ReplacedAtEnd:
    """The file ``export -o`` writes: a new file in the same folder, put in place of
    the target (``os.replace``) once every trace is written. An export that fails or
    is stopped half-way leaves the target as it was (it truncated it at the start).

    Where that cannot be done as the target's owner could, the target is written as
    before, directly: a target that is no regular file (``/dev/stdout``, a named pipe,
    ``/dev/fd/1`` over a file), a writable file in a folder this user may not create
    files in, or one a sticky folder (``/tmp``) does not let this user replace. A file
    this user may not write is refused, as opening it would be.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self._temporary: str | None = None
        if target.endswith(("/", os.sep)):
            raise IsADirectoryError(f"cannot write {target!r}: a file's name does not end in /")
        self._real = os.path.realpath(target)
        try:
            self._stat: os.stat_result | None = os.stat(target)  # through symbolic links
        except OSError:
            self._stat = None  # not there yet (or unreadable: opening it says why)
        mode = None if self._stat is None else self._stat.st_mode
        if mode is not None and stat.S_ISDIR(mode):
            raise IsADirectoryError(f"cannot write {target!r}: it is a folder")
        special = target.startswith(("/dev/", "/proc/")) or self._real.startswith(
            ("/dev/", "/proc/")
        )
        if mode is not None and (special or not stat.S_ISREG(mode)):
            self.file: TextIO = open(target, "w", encoding="utf-8")  # noqa: SIM115
            return
        if mode is not None and not os.access(target, os.W_OK):
            raise PermissionError(f"cannot write {target!r}: permission denied")
        folder, name = os.path.split(self._real)
        temporary = os.path.join(folder, f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            # 0o666 less the umask, as open() makes a file (mkstemp's would be 0o600).
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as exc:
            if mode is not None:  # a file to write, in a folder to make none in
                self.file = open(target, "w", encoding="utf-8")  # noqa: SIM115
                return
            raise OSError(
                f"cannot write {target!r}: {exc.strerror or exc} (in {folder!r})"
            ) from None
        self._temporary = temporary
        self.file = open(fd, "w", encoding="utf-8")  # noqa: SIM115

    def commit(self) -> None:
        """Put the written file in place of the target, with the target's mode and (as
        far as this user may) owner; where the folder does not allow replacing it,
        copy the export over it."""
        self.file.close()
        temporary = self._temporary
        if temporary is None:
            return
        try:
            if self._stat is not None:
                os.chmod(temporary, stat.S_IMODE(self._stat.st_mode))
                chown = getattr(os, "chown", None)  # not on Windows
                if chown is not None:
                    with contextlib.suppress(OSError):
                        chown(temporary, self._stat.st_uid, self._stat.st_gid)
            try:
                os.replace(temporary, self._real)
            except PermissionError:
                with open(temporary, "rb") as source, open(self._real, "wb") as written:
                    shutil.copyfileobj(source, written)
        finally:
            self._temporary = None
            with contextlib.suppress(OSError):
                os.unlink(temporary)

    def discard(self) -> None:
        """Remove what was written; the target stays as it was."""
        try:
            self.file.close()
        finally:
            if self._temporary is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self._temporary)
                self._temporary = None


#: ``export -o`` names that mean standard output.
_STDOUT_NAMES = frozenset({"-", "/dev/stdout", "/dev/fd/1", "/proc/self/fd/1"})


def _cmd_export(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    if args.output and args.output not in _STDOUT_NAMES:
        _refuse_database_as_output(args.output, store)
    given: list[str] = args.trace_ids
    # Ids that trace_ids() returns are whole ids already: only those given on the
    # command line (prefixes, "latest") are looked up (a query each). trace_ids()
    # reads a page at a time, so ``--limit`` of every trace holds a page in memory,
    # not a summary of each trace.
    ids: Iterable[tuple[str, bool]] = [(g, True) for g in given] or (
        (trace_id, False)
        for trace_id in store.trace_ids(limit=args.limit, since=args.since, until=args.until)
    )
    # Standard output by name: written through it, not opened again (a new opening of
    # a file the shell redirected to would truncate it, and write over what is there).
    to_stdout = args.output in _STDOUT_NAMES
    output = _ReplacedAtEnd(args.output) if args.output and not to_stdout else None
    target = output.file if output is not None else out
    unicode = output is not None or not isinstance(out, FittedStream)
    status = 0
    try:
        for ref, resolve in ids:
            trace_id = store.resolve_trace_id(ref) if resolve else ref
            if trace_id is None:
                print(_no_match(store, ref), file=sys.stderr)
                status = 1
                continue
            record = trace_record(trace_id, store.trace(trace_id))
            target.write(_json_line(record, out, unicode=unicode))
            # The newline on its own, then a flush: a reader that went away (``| head``)
            # is found out at each record. (Python drops what a write of one long
            # line could not send to a closed pipe, without an error.)
            target.write("\n")
            target.flush()
        if output is not None:
            # Not all it was asked for (status 1): the file is left as it was.
            if status == 0:
                output.commit()
            else:
                output.discard()
    except BaseException:
        if output is not None:
            output.discard()
        raise
    return status


_COMMANDS = {
    "list": _cmd_list,
    "show": _cmd_show,
    "tail": _cmd_tail,
    "events": _cmd_events,
    "export": _cmd_export,
}


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the command line; returns the exit status."""
    return run(parse_arguments(argv), out)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run the command ``args`` name (as :func:`parse_arguments` read them); returns
    the exit status."""
    from instrumentation.storage import DB_ENV, database_target, open_store
    from instrumentation.storage.addresses import redacted

    if args.command == "tail":
        _start_tail(args)
    stream = out if out is not None else sys.stdout
    writer = fitted_stream(cast(TextIO, _Output(stream)))
    # ``--db ""`` is a mistake (an unset shell variable), not a request for the default.
    where = database_target(args.db)
    shown = redacted(where)  # lines on stderr end up in logs: no password in them
    # Where the address came from: telling to set $INSTRUMENTATION_DB when it named
    # the database already sent the user looking in the wrong place.
    if args.db is not None:
        named_by = "given with --db"
    elif os.environ.get(DB_ENV):
        named_by = f"named by ${DB_ENV}"
    else:
        named_by = f"the default; give --db or set ${DB_ENV}"

    def read_only_store() -> Store:
        # A read-only store creates no database, no tables and migrates nothing: a
        # file that is not a trace database (an application's own SQLite file, say)
        # is refused, and left as it was.
        return open_store(where, read_only=True)

    try:
        try:
            made: Store | None = read_only_store()
        except FileNotFoundError:
            if args.command != "tail":
                raise
            # tail started before the application made its database: it waits.
            made = _open_when_made(read_only_store, args, shown, named_by)
        if made is None:
            print(
                f"no trace database was made at {shown!r} within --max-seconds ({named_by})",
                file=sys.stderr,
            )
            return 2
        store = made
    except FileNotFoundError:
        # No such SQLite file: a mistyped path must not look like an empty store.
        print(f"no trace database at {shown!r} ({named_by})", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:  # not a database address, a folder...
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # while tail waited for the database
        return 130
    except Exception as exc:
        print(f"cannot open the trace database {shown!r}: {exc}", file=sys.stderr)
        return 2
    try:
        status = _COMMANDS[args.command](store, args, writer)
        writer.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``show latest --json | head``): stop quietly, as Unix
        # tools do when SIGPIPE ends them.
        _quiet_closed_stdout(stream)
        return _SIGPIPE_STATUS
    except OSError as exc:  # e.g. export --output into a folder that does not exist
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the database went away, or refused the query
        print(f"cannot read the trace database {shown!r}: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()


#: What a shell reports for a program ended by SIGPIPE (128 + 13).
_SIGPIPE_STATUS = 141

#: The errors a write to standard output fails with once its reader has gone: EPIPE,
#: and on Windows EINVAL (a pipe closed at the other end is an "invalid argument" there).
_READER_GONE = (errno.EPIPE, errno.EINVAL) if sys.platform == "win32" else (errno.EPIPE,)


class _Output:
    """The output stream, whose write errors that mean "the reader went away" all come
    out as ``BrokenPipeError``: on Windows they are a plain ``OSError(EINVAL)``, which
    ``main`` would otherwise report as an error (exit 2) after ``... | more`` ends."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.encoding: str | None = getattr(stream, "encoding", None)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            raise _as_broken_pipe(exc) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            raise _as_broken_pipe(exc) from None


def _as_broken_pipe(exc: OSError) -> OSError:
    if isinstance(exc, BrokenPipeError) or exc.errno not in _READER_GONE:
        return exc
    return BrokenPipeError(errno.EPIPE, f"the output's reader went away ({exc})")


def _quiet_closed_stdout(stream: TextIO) -> None:
    """Point standard output, if ``stream`` is it, at ``os.devnull``: what is left in
    its buffer is then dropped at exit instead of raising ``BrokenPipeError`` again."""
    if stream is not sys.stdout:
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor (replaced sys.stdout)
        pass


__all__ = ["main"]
