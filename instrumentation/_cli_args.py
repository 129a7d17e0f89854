"""The command line's arguments (``python -m instrumentation``), checked without
loading storage: ``--help`` and a mistyped argument answer at once, and only a
command that runs imports :mod:`instrumentation.storage.cli` (the stores, the LLM
events), a third of a second more.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

#: The largest ``--limit``: what both databases read a ``LIMIT`` as, a 64-bit integer
#: (``instrumentation.storage.base.MAX_LIMIT``, not imported: that loads storage).
_MAX_LIMIT = 2**63 - 1

#: How many lines ``list`` prints of each page of traces it reads, the columns lined up
#: within each (``instrumentation.storage.cli`` reads that many per query).
PAGE = 500

#: What times are (``datetime`` runs from the year 1 to 9999), for error messages.
_TIME_RANGE = "times run from the year 1 to 9999"


def _out_of_range(value: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"{value!r} is out of range ({_TIME_RANGE})")


#: Seconds in each unit of an age (``--since 15m``) and of a duration.
_AGE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _when(value: str) -> datetime:
    """``2026-11-23T10:00``, or an age such as ``15m``, ``2h``, ``3d``.

    A time or an age beyond what a ``datetime`` holds (``--since 99999999d``, the
    year 10000) is an argument error, as a misspelt one is, not a traceback.
    """
    if value and value[-1] in _AGE_UNITS and value[:-1].replace(".", "", 1).isdigit():
        try:
            ago = timedelta(seconds=float(value[:-1]) * _AGE_UNITS[value[-1]])
            return datetime.now(timezone.utc) - ago
        except (OverflowError, ValueError):
            raise _out_of_range(value) from None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a time: use ISO 8601 (2026-11-23T10:00) or an age (15m, 2h, 3d)"
        ) from None
    try:
        # Without an offset it is local time, as ``list`` prints times: one copied
        # from its output selects that trace.
        found = parsed if parsed.tzinfo else _local(parsed)
        found.timestamp()  # what the store compares: it must exist too
    except (OverflowError, ValueError, OSError):
        raise _out_of_range(value) from None
    return found


def _local(naive: datetime) -> datetime:
    """``naive`` in the local time zone. Python finds the offset through the C library,
    which cannot take the first or last days of the calendar (``0001-01-01`` failed
    even in UTC): those take today's offset."""
    try:
        return naive.astimezone()
    except (OverflowError, ValueError, OSError):
        return naive.replace(tzinfo=datetime.now().astimezone().tzinfo)


_DATE = re.compile(r"\d{4}-?\d{2}-?\d{2}")
_TIME_OF_DAY = re.compile(r"(\d{2})(:?\d{2})?(:?\d{2})?([.,]\d+)?")


def _until(value: str) -> datetime:
    """Like :func:`_when`, but a time given to the second, minute, hour or day includes
    that whole second (minute, ...): a time copied from ``list``, which prints whole
    seconds, selects that trace with ``--until`` as it does with ``--since``."""
    bound = _when(value)
    try:
        return bound + _whole_unit(value.strip())
    except OverflowError:  # the last day there is: its end is past what times hold
        raise _out_of_range(value) from None


def _whole_unit(text: str) -> timedelta:
    """How much past the time it names ``text`` reaches (0 for an age or fractions)."""
    if _DATE.fullmatch(text):
        return timedelta(days=1)
    clock = re.split(r"[T ]", text, maxsplit=1)
    if len(clock) != 2 or not _DATE.fullmatch(clock[0]):
        return timedelta(0)  # an age: exact
    found = _TIME_OF_DAY.match(clock[1])
    if found is None or found.group(4):
        return timedelta(0)  # fractions of a second: exact
    if found.group(3):
        return timedelta(seconds=1)
    return timedelta(minutes=1) if found.group(2) else timedelta(hours=1)


def _seconds(value: str) -> float:
    """A number of seconds, 0 or more."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not (0 <= seconds < 10**9):  # also NaN and inf
        raise argparse.ArgumentTypeError(f"takes seconds (0 or more), got {value!r}")
    return seconds


#: The units ``--min-duration`` takes, as ``list`` prints durations (``381 µs``, or
#: ``381 us`` where the output has no ``µ``; Greek mu too; ``2m 02s``, ``3d 00h``).
_DURATION_UNITS = {
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    **_AGE_UNITS,
}
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_UNIT = r"([a-zA-Z\u00b5\u03bc]+)"
#: A number with its unit, one or more times (``2m 02s``).
_WITH_UNITS = re.compile(rf"\s*(?:{_NUMBER}\s*{_UNIT}\s*)+")
_NUMBER_AND_UNIT = re.compile(rf"{_NUMBER}\s*{_UNIT}")


def _duration(value: str) -> float:
    """Seconds, 0 or more: a plain number, as before, or a duration as ``list`` prints
    it (``381us`` or ``381µs``, ``12.5ms``, ``2s``, ``2m 02s``, ``2h 02m``, ``3d
    00h``), or minutes, hours or days alone (``1.5m``, ``2h``, as ``--since`` takes
    ages)."""
    seconds = -1.0
    if _WITH_UNITS.fullmatch(value):
        total = 0.0
        for number, unit in _NUMBER_AND_UNIT.findall(value):
            scale = _DURATION_UNITS.get(unit.lower())
            if scale is None:  # 5 parsecs
                break
            total += float(number) * scale
        else:
            seconds = total
    else:
        with contextlib.suppress(argparse.ArgumentTypeError):
            seconds = _seconds(value)
    if not 0 <= seconds < 10**9:
        raise argparse.ArgumentTypeError(
            "takes seconds, or a duration with its unit (381us, 12ms, 2s, 1.5m, 2m 02s, "
            f"3d), got {value!r}"
        )
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
    """A count, 1 or more (and no more than a 64-bit integer, what the databases read
    a ``LIMIT`` as: a larger one is an argument error, not the database's)."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"takes a whole number, 1 or more, got {value!r}")
    if number > _MAX_LIMIT:
        raise argparse.ArgumentTypeError(
            f"takes a whole number up to {_MAX_LIMIT} (2**63 - 1), got {value!r}"
        )
    return number


def _trace_ref(value: str) -> str:
    """A trace id, a prefix of one, or ``latest``: not empty (an empty prefix is
    every trace's, and an unset shell variable, not a choice)."""
    if not value.strip():
        raise argparse.ArgumentTypeError(
            f"give a trace id or a prefix of one (or 'latest'), got {value!r}"
        )
    return value


def _meta_item(item: str) -> tuple[str, str]:
    """One ``--meta KEY=VALUE`` (an argument error, status 2, without the ``=``)."""
    key, sep, value = item.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"takes KEY=VALUE (e.g. --meta user=alice), got {item!r}")
    return key, value


def _version() -> str:
    from instrumentation import __version__

    return __version__


#: The end of ``--help``: a first command to type, and what makes the database.
_EXAMPLES = """examples:
  {prog} --db traces.db list --status error --since 2h
  {prog} --db traces.db show latest --events
  {prog} --db traces.db tail --tree
  {prog} --db traces.db events --type LLMChatEndEvent --since 1h
  {prog} --db traces.db export --limit 100 -o traces.jsonl

An application records traces with instrumentation.storage:
  with storage.record_to("traces.db"): ...
Each command's --help lists its options: {prog} list --help"""


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (what :func:`parse_arguments` reads the arguments with)."""
    return _parsers()[0]


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The arguments, as :func:`build_parser`'s parser reads them, with two answers of
    its own (status 2, as argparse's): no command prints the whole help, where
    argparse said only that a command is required; an argument the command does not
    take is refused with that command's usage (``show ID ID``), where argparse showed
    the top-level one, which does not say what ``show`` takes."""
    parser, commands = _parsers()
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        parser.exit(2, f"\n{parser.prog}: error: give a command ({', '.join(commands)})\n")
    if unknown:
        commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser, and each command's own by name."""
    # Started as the ``instrumentation`` command, say so; else ``python -m``.
    invoked = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    prog = "instrumentation" if invoked == "instrumentation" else "python -m instrumentation"
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Read traces kept by instrumentation.storage.",
        epilog=_EXAMPLES.format(prog=prog),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    db_help = "SQLite path or PostgreSQL DSN (default: $INSTRUMENTATION_DB or instrumentation.db)"
    parser.add_argument("--db", help=db_help)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    # --db is taken after the command too (``list --db x.db``).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", default=argparse.SUPPRESS, help=db_help)
    sub = parser.add_subparsers(dest="command")

    ls = sub.add_parser("list", help="recent traces, newest first", parents=[common])
    how_many_traces = ls.add_mutually_exclusive_group()
    how_many_traces.add_argument(
        "--limit",
        type=_positive_int,
        default=20,
        help="how many traces, newest first (default: 20)",
    )
    how_many_traces.add_argument(
        "--all",
        action="store_true",
        help=f"every matching trace, newest first (columns line up by {PAGE} lines)",
    )
    ls.add_argument(
        "--since", type=_when, help="ISO time (local unless it has an offset) or age (15m, 2h)"
    )
    ls.add_argument(
        "--until", type=_until, help="as --since; a time to the second includes that second"
    )
    ls.add_argument("--name", help="root span name (* is a wildcard)")
    ls.add_argument("--status", choices=["ok", "error"], help="how the trace's root span ended")
    ls.add_argument(
        "--min-duration",
        type=_duration,
        metavar="DURATION",
        help="only traces that took this long or longer: seconds, or with a unit as list "
        "prints them (381us, 12ms, 2s, 1.5m, 2m 02s, 3d)",
    )
    ls.add_argument("--dispatcher", help="dispatcher name (and those below it)")
    ls.add_argument(
        "--meta", action="append", type=_meta_item, help="KEY=VALUE, e.g. user=alice (repeatable)"
    )

    show = sub.add_parser("show", help="one trace as a tree", parents=[common])
    show.add_argument(
        "trace_id", type=_trace_ref, help="a trace id, a unique prefix of one, or 'latest'"
    )
    show.add_argument("--events", action="store_true", help="list each span's events too")
    show.add_argument("--json", action="store_true", help="print the trace as JSON")

    tail = sub.add_parser("tail", help="print traces as they finish, from now on", parents=[common])
    tail.add_argument(
        "--interval",
        type=_positive_seconds,
        default=1.0,
        help="seconds between polls (default: 1)",
    )
    tail.add_argument(
        "--max-seconds", type=_seconds, help="stop after this many seconds (default: never)"
    )
    tail.add_argument(
        "--count", type=_positive_int, help="stop after this many traces (default: never)"
    )
    tail.add_argument(
        "--lookback",
        type=_seconds,
        metavar="SECONDS",
        default=0.0,
        help="also show traces that ended up to this many seconds before tail started "
        "(default 0: only those that end after it starts)",
    )
    tail.add_argument("--tree", action="store_true", help="print each trace's tree")

    events = sub.add_parser(
        "events", help="the last events, in the order they happened", parents=[common]
    )
    events.add_argument("--type", help="event class name, e.g. LLMChatEndEvent")
    events.add_argument(
        "--trace", type=_trace_ref, help="a trace id, a unique prefix of one, or 'latest'"
    )
    events.add_argument("--since", type=_when, help="as list --since")
    events.add_argument("--until", type=_until, help="as list --until")
    how_many = events.add_mutually_exclusive_group()
    how_many.add_argument(
        "--limit",
        type=_positive_int,
        default=50,
        help="how many of the last matching events (default: 50)",
    )
    how_many.add_argument("--all", action="store_true", help="every matching event, oldest first")
    events.add_argument("--json", action="store_true", help="print each event as a JSON line")

    export = sub.add_parser("export", help="traces as JSON lines", parents=[common])
    export.add_argument(
        "trace_ids",
        nargs="*",
        type=_trace_ref,
        help="trace ids, unique prefixes of ids, or 'latest' (default: the --limit most recent)",
    )
    export.add_argument(
        "--limit",
        type=_positive_int,
        default=100,
        help="how many recent traces, when no ids are given (default: 100)",
    )
    export.add_argument("--since", type=_when, help="as list --since")
    export.add_argument("--until", type=_until, help="as list --until")
    export.add_argument(
        "--output", "-o", help="file to write (default, or - or /dev/stdout: standard output)"
    )
    return parser, {"list": ls, "show": show, "tail": tail, "events": events, "export": export}
