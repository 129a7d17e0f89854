"""``python -m instrumentation``: list, show, follow and export stored traces.

    python -m instrumentation --db traces.db list --limit 20 --status error
    python -m instrumentation --db traces.db show latest          # or an id (prefix)
    python -m instrumentation --db postgresql://localhost/traces tail --interval 1
    python -m instrumentation --db traces.db tail --lookback 300  # and the last 5 minutes
    python -m instrumentation --db traces.db export --limit 100 > traces.jsonl

``--db`` takes a SQLite path (or ``sqlite:///path``) or a PostgreSQL DSN; it defaults to
``$INSTRUMENTATION_DB``, then ``instrumentation.db``. The command line only reads: it
opens the store with ``read_only=True``, so it never creates a database, creates
tables or migrates a schema; anything that is not a trace database of this release's
schema exits with status 2 and says why.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, TextIO

from instrumentation.storage.base import Store
from instrumentation.storage.models import StoredSpan, TraceSummary, roots_of
from instrumentation.tree import build_forest, format_duration, render_forest


def _when(value: str) -> datetime:
    """``2026-11-23T10:00``, or an age such as ``15m``, ``2h``, ``3d``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value and value[-1] in units and value[:-1].replace(".", "", 1).isdigit():
        return datetime.now(timezone.utc) - timedelta(seconds=float(value[:-1]) * units[value[-1]])
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a time: use ISO 8601 (2026-11-23T10:00) or an age (15m, 2h, 3d)"
        ) from None
    # Without an offset it is local time, as ``list`` prints times: one copied from
    # its output selects that trace.
    return parsed if parsed.tzinfo else parsed.astimezone()


_DATE = re.compile(r"\d{4}-?\d{2}-?\d{2}")
_TIME_OF_DAY = re.compile(r"(\d{2})(:?\d{2})?(:?\d{2})?([.,]\d+)?")


def _until(value: str) -> datetime:
    """Like :func:`_when`, but a time given to the second, minute, hour or day includes
    that whole second (minute, ...): a time copied from ``list``, which prints whole
    seconds, selects that trace with ``--until`` as it does with ``--since``."""
    bound = _when(value)
    text = value.strip()
    if _DATE.fullmatch(text):
        return bound + timedelta(days=1)
    clock = re.split(r"[T ]", text, maxsplit=1)
    if len(clock) != 2 or not _DATE.fullmatch(clock[0]):
        return bound  # an age: exact
    found = _TIME_OF_DAY.match(clock[1])
    if found is None or found.group(4):
        return bound  # fractions of a second: exact
    if found.group(3):
        return bound + timedelta(seconds=1)
    return bound + (timedelta(minutes=1) if found.group(2) else timedelta(hours=1))


def _seconds(value: str) -> float:
    """A number of seconds, 0 or more."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not (0 <= seconds < 10**9):  # also NaN and inf
        raise argparse.ArgumentTypeError(f"takes seconds (0 or more), got {value!r}")
    return seconds


def _positive_seconds(value: str) -> float:
    """A number of seconds, more than 0."""
    try:
        seconds = _seconds(value)
    except argparse.ArgumentTypeError:
        seconds = 0.0
    if seconds == 0:
        raise argparse.ArgumentTypeError(f"takes seconds (more than 0), got {value!r}")
    return seconds


def _positive_int(value: str) -> int:
    """A count, 1 or more."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"takes a whole number, 1 or more, got {value!r}")
    return number


def _meta_item(item: str) -> tuple[str, str]:
    """One ``--meta KEY=VALUE`` (an argument error, status 2, without the ``=``)."""
    key, sep, value = item.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"takes KEY=VALUE (e.g. --meta user=alice), got {item!r}")
    return key, value


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
    return f"${c:.4f}" if c else ""


def summary_line(s: TraceSummary) -> str:
    parts = [
        s.start.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
        s.trace_id,
        f"{s.name or '?'}",
        format_duration(s.duration),
        f"{s.span_count} spans",
        "✗ " + (s.error or "failed")
        if s.status == "error"
        else "ok" + (_failed_inside(s.error_count) if s.error_count else ""),
        _tokens(s.total_tokens),
        _cost(s.cost_usd),
    ]
    return "  ".join(p for p in parts if p)


def _failed_inside(count: int) -> str:
    # The trace's outcome is its root's (what --status selects); spans that failed
    # inside it (an error caught and handled, a retry) are counted beside it.
    return f" ({count} span{'s' if count != 1 else ''} failed inside)"


def _event_fields(payload: Any, shown: str | None, width: int = 100) -> str:
    """An event's own fields on one line, cut at ``width`` characters (not the one
    whose value is ``shown`` already, as its error)."""
    if not isinstance(payload, dict):
        return ""
    parts = []
    for key, value in payload.items():
        if (key == "tags" and not value) or (shown is not None and value == shown):
            continue
        text = repr(value)
        parts.append(f"{key}={text if len(text) <= 40 else text[:39] + '…'}")
    line = " ".join(parts)
    return line if len(line) <= width else line[: width - 1] + "…"


def span_label(span: StoredSpan) -> str:
    parts = [span.name or span.id_, format_duration(span.duration)]
    models = sorted({e.model for e in span.events if e.model})
    if models:
        parts.append(",".join(models))
    if span.total_tokens:
        parts.append(_tokens(span.total_tokens))
    if span.cost_usd:
        parts.append(_cost(span.cost_usd))
    if span.status == "error":
        parts.append(f"✗ {span.error}")
    return "  ".join(parts)


def format_trace(spans: list[StoredSpan], *, events: bool = False) -> str:
    """A stored trace as an indented tree (the same drawing as ``SimpleSpanHandler``)."""
    if events:

        def label(item: Any) -> str:
            if isinstance(item, StoredSpan):
                return span_label(item)
            fields = _event_fields(item.payload, item.error)
            return (
                f"· {item.type}"
                + (f"  {fields}" if fields else "")
                + (f"  ✗ {item.error}" if item.error else "")
            )

        items: list[Any] = [*spans, *(e for s in spans for e in s.events)]
        forest = build_forest(
            items,
            lambda i: i.id_,
            lambda i: i.parent_id if isinstance(i, StoredSpan) else i.span_id,
            lambda i: i.start if isinstance(i, StoredSpan) else i.time,
        )
        return render_forest(forest, label)
    forest = build_forest(spans, lambda s: s.id_, lambda s: s.parent_id, lambda s: s.start)
    return render_forest(forest, span_label)


def format_traces(store: Store, limit: int = 20, **filters: Any) -> str:
    """The most recent traces, oldest first, each as its summary line and its tree.

    ``filters`` are those of ``store.traces()``. What ``make demo`` prints after
    reading the demo's traces back from its SQLite file.
    """
    blocks = []
    for summary in reversed(store.traces(limit=limit, **filters)):
        blocks.append(summary_line(summary) + "\n" + format_trace(store.trace(summary.trace_id)))
    return "\n\n".join(blocks) if blocks else "(no traces)"


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(type(value).__name__)


def trace_record(trace_id: str, spans: list[StoredSpan]) -> dict[str, Any]:
    """One exported JSON line: the trace with its spans (flat, with parent ids) and events."""
    flat = []
    for span in spans:
        data = dataclasses.asdict(span)
        data.pop("children")
        flat.append(data)
    return {"trace_id": trace_id, "roots": [s.id_ for s in roots_of(spans)], "spans": flat}


def _cmd_list(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    found = store.traces(
        limit=args.limit,
        since=args.since,
        until=args.until,
        name=args.name,
        status=args.status,
        min_duration=args.min_duration,
        dispatcher=args.dispatcher,
        metadata=_meta(args.meta),
    )
    for summary in found:
        print(summary_line(summary), file=out)
    if not found:
        print("(no traces)", file=out)
    return 0


def _no_match(store: Store, given: str) -> str:
    """Why ``given`` (a trace id, a prefix, or ``latest``) names no single trace."""
    if given != "latest" and len(store.trace_ids_starting_with(given)) > 1:
        return f"several traces start with {given!r}: give more of the id (see `list`)"
    if store.traces(limit=1):
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
        print(json.dumps(trace_record(trace_id, spans), default=_jsonable), file=out)
    else:
        print(f"trace {trace_id}", file=out)
        print(format_trace(spans, events=args.events), file=out)
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
_PAGE = 500
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
    raises the floor above them, never past the last trace read (the frontier).
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
        self._seen: set[str] = set()
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
                if summary.trace_id in self._seen:
                    continue
                self._seen.add(summary.trace_id)
                heapq.heappush(self._by_end, (summary.end, summary.trace_id))
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
            end, trace_id = heapq.heappop(self._by_end)
            self._seen.discard(trace_id)
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


def _cmd_tail(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    started = time.monotonic()
    # Only traces that end after this are shown: those that finish once tail has
    # started, and with --lookback those that finished up to that long before.
    shown_from = datetime.now(timezone.utc) - timedelta(seconds=args.lookback)
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
        return args.max_seconds is not None and time.monotonic() - started >= args.max_seconds

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


def _cmd_export(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    ids = args.trace_ids or [
        s.trace_id for s in store.traces(limit=args.limit, since=args.since, until=args.until)
    ]
    target = open(args.output, "w", encoding="utf-8") if args.output else out  # noqa: SIM115
    status = 0
    try:
        for given in ids:
            trace_id = store.resolve_trace_id(given)
            if trace_id is None:
                print(_no_match(store, given), file=sys.stderr)
                status = 1
                continue
            record = trace_record(trace_id, store.trace(trace_id))
            target.write(json.dumps(record, default=_jsonable, ensure_ascii=False) + "\n")
    finally:
        if target is not out:
            target.close()
    return status


def build_parser() -> argparse.ArgumentParser:
    # Started as the ``instrumentation`` command, say so; else ``python -m``.
    invoked = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    parser = argparse.ArgumentParser(
        prog="instrumentation" if invoked == "instrumentation" else "python -m instrumentation",
        description="Read traces kept by instrumentation.storage.",
    )
    db_help = "SQLite path or PostgreSQL DSN (default: $INSTRUMENTATION_DB or instrumentation.db)"
    parser.add_argument("--db", help=db_help)
    # --db is taken after the command too (``list --db x.db``).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", default=argparse.SUPPRESS, help=db_help)
    sub = parser.add_subparsers(dest="command", required=True)

    ls = sub.add_parser("list", help="recent traces, newest first", parents=[common])
    ls.add_argument("--limit", type=_positive_int, default=20)
    ls.add_argument(
        "--since", type=_when, help="ISO time (local unless it has an offset) or age (15m, 2h)"
    )
    ls.add_argument(
        "--until", type=_until, help="as --since; a time to the second includes that second"
    )
    ls.add_argument("--name", help="root span name (* is a wildcard)")
    ls.add_argument("--status", choices=["ok", "error"], help="how the trace's root span ended")
    ls.add_argument("--min-duration", type=_seconds, help="seconds")
    ls.add_argument("--dispatcher", help="dispatcher name (and those below it)")
    ls.add_argument(
        "--meta", action="append", type=_meta_item, help="KEY=VALUE, e.g. user=alice (repeatable)"
    )

    show = sub.add_parser("show", help="one trace as a tree", parents=[common])
    show.add_argument("trace_id", help="a trace id, a unique prefix of one, or 'latest'")
    show.add_argument("--events", action="store_true", help="list each span's events too")
    show.add_argument("--json", action="store_true", help="print the trace as JSON")

    tail = sub.add_parser("tail", help="print traces as they finish, from now on", parents=[common])
    tail.add_argument(
        "--interval", type=_positive_seconds, default=1.0, help="seconds between polls"
    )
    tail.add_argument("--max-seconds", type=_seconds, help="stop after this long")
    tail.add_argument("--count", type=_positive_int, help="stop after this many traces")
    tail.add_argument(
        "--lookback",
        type=_seconds,
        metavar="SECONDS",
        default=0.0,
        help="also show traces that ended up to this many seconds before tail started "
        "(default 0: only those that end after it starts)",
    )
    tail.add_argument("--tree", action="store_true", help="print each trace's tree")

    export = sub.add_parser("export", help="traces as JSON lines", parents=[common])
    export.add_argument("trace_ids", nargs="*", help="traces to export (default: recent)")
    export.add_argument("--limit", type=_positive_int, default=100)
    export.add_argument("--since", type=_when, help="as list --since")
    export.add_argument("--until", type=_until, help="as list --until")
    export.add_argument("--output", "-o", help="file to write (default: stdout)")
    return parser


_COMMANDS = {"list": _cmd_list, "show": _cmd_show, "tail": _cmd_tail, "export": _cmd_export}


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the command line; returns the exit status."""
    from instrumentation.storage import DB_ENV, database_target, open_store
    from instrumentation.storage.addresses import redacted

    args = build_parser().parse_args(argv)
    stream = out if out is not None else sys.stdout
    # ``--db ""`` is a mistake (an unset shell variable), not a request for the default.
    where = database_target(args.db)
    shown = redacted(where)  # lines on stderr end up in logs: no password in them
    try:
        # A read-only store creates no database, no tables and migrates nothing: a
        # file that is not a trace database (an application's own SQLite file, say)
        # is refused, and left as it was.
        store = open_store(where, read_only=True)
    except FileNotFoundError:
        # No such SQLite file: a mistyped path must not look like an empty store.
        print(f"no trace database at {shown!r} (give --db or set ${DB_ENV})", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:  # not a database address, a folder...
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"cannot open the trace database {shown!r}: {exc}", file=sys.stderr)
        return 2
    try:
        status = _COMMANDS[args.command](store, args, stream)
        stream.flush()  # a closed pipe shows here, not at interpreter exit
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


__all__ = [
    "build_parser",
    "format_trace",
    "format_traces",
    "main",
    "span_label",
    "summary_line",
    "trace_record",
]
