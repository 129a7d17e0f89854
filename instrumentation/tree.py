"""Draw spans as indented trees, for terminals and tests.

Used by :class:`SimpleSpanHandler` and by the storage command line, so that a trace
looks the same wherever it is read. A span whose parent is not among the spans given
(a parent in another process, or one evicted from a bounded buffer) becomes a root.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, TextIO, TypeVar, cast

T = TypeVar("T")

#: Levels of indentation drawn; deeper spans are drawn at this depth, numbered.
MAX_INDENT = 64


def draw_tree(
    items: Iterable[T],
    id_of: Callable[[T], Any],
    parent_of: Callable[[T], Any],
    label: Callable[[T], str],
    sort_key: Callable[[T], Any] | None = None,
) -> str:
    """Draw ``items`` nested by parent id, with box-drawing branches, one tree per root.

    An item whose parent is not among ``items`` is a root; one whose id is that of an
    item above it (ids given twice, a loop) is left out, so the drawing always ends.
    Drawn with a stack, not recursion: a trace thousands of levels deep (a recursive
    algorithm, traced) is drawn too.
    """
    items = list(items)
    by_id = {id_of(item): item for item in items}
    children: dict[Any, list[T]] = {}
    roots: list[T] = []
    for item in items:
        parent = parent_of(item)
        if parent is not None and parent in by_id and parent != id_of(item):
            children.setdefault(parent, []).append(item)
        else:
            roots.append(item)
    if sort_key is not None:
        for kids in children.values():
            kids.sort(key=sort_key)
        roots.sort(key=sort_key)
    lines: list[str] = []
    for root in roots:
        lines.append(label(root))
        above = [id_of(root)]  # the ids from the root down to the item being drawn
        on_path = set(above)
        # Each level: the children left to draw, the next one's index, and the prefix.
        stack: list[tuple[list[T], int, str]] = [(children.get(above[0], []), 0, "")]
        while stack:
            kids, index, prefix = stack[-1]
            if index == len(kids):
                stack.pop()
                on_path.discard(above.pop())
                continue
            stack[-1] = (kids, index + 1, prefix)
            kid = kids[index]
            ident = id_of(kid)
            if ident in on_path:
                continue
            last = index == len(kids) - 1
            depth = len(above)
            # Past MAX_INDENT levels the indentation stops growing (each line would
            # repeat it: a trace 10,000 deep drew 200 million characters); the depth
            # is written out instead.
            mark = f"[{depth}] " if depth > MAX_INDENT else ""
            lines.append(f"{prefix}{'└── ' if last else '├── '}{mark}{label(kid)}")
            above.append(ident)
            on_path.add(ident)
            if depth < MAX_INDENT:
                prefix += "    " if last else "│   "
            stack.append((children.get(ident, []), 0, prefix))
    return "\n".join(lines)


def format_duration(seconds: float | None) -> str:
    """``seconds`` with a readable unit (``252 µs``, ``12.3 ms``, ``2.50 s``); from a
    minute up in two units, the larger and the next (``2m 02s``, ``2h 02m``, ``3d
    00h``), where ``7322.00 s`` had to be worked out. ``open`` for ``None``. The unit
    is the one the rounded figure fits: 999.7 µs is ``1.0 ms``, not ``1000 µs``, and
    59.999 s ``1m 00s``."""
    if seconds is None:
        return "open"
    if round(seconds * 1e6, 0) < 1000:
        return f"{seconds * 1e6:.0f} µs"
    if round(seconds * 1e3, 1) < 1000:
        return f"{seconds * 1e3:.1f} ms"
    if round(seconds, 2) < 60 or not math.isfinite(seconds):
        return f"{seconds:.2f} s"
    return _in_two_units(seconds)


def _in_two_units(seconds: float) -> str:
    """A minute or more as ``2m 02s``, ``2h 02m`` or ``3d 00h``, rounded to the smaller
    unit (the larger is the one that rounded figure reaches)."""
    whole_seconds = round(seconds)
    if whole_seconds < 3600:
        return f"{whole_seconds // 60}m {whole_seconds % 60:02d}s"
    minutes = round(seconds / 60)
    if minutes < 24 * 60:
        return f"{minutes // 60}h {minutes % 60:02d}m"
    hours = round(seconds / 3600)
    return f"{hours // 24}d {hours % 24:02d}h"


#: What the drawing uses, and what stands for it where the output's encoding has no
#: such character (``PYTHONIOENCODING=ascii``, a Latin-1 terminal, Windows' cp1252
#: when the output is redirected).
_FALLBACKS = {"µ": "u", "✗": "x", "…": "...", "·": "-", "├": "|", "└": "`", "│": "|", "─": "-"}
#: Characters of every kind a name may hold: an output that takes all of them (UTF-8)
#: is written to as it is.
_PROBE = "".join(_FALLBACKS) + "é名😀"


def _encodes(text: str, encoding: str) -> bool:
    try:
        text.encode(encoding)
    except (UnicodeError, LookupError):
        return False
    return True


class FittedStream:
    """Writes text to a stream whose encoding cannot take every character: the tree's
    symbols become ASCII look-alikes (``µs`` -> ``us``, ``├──`` -> ``|--``), and any
    other character it lacks a ``?``. Without it, a trace printed to a terminal set to
    ASCII (``LC_ALL=C`` without UTF-8 mode) or to a redirected output on Windows
    failed on the first ``├`` with a ``UnicodeEncodeError``."""

    def __init__(self, stream: TextIO, encoding: str) -> None:
        self._stream = stream
        self._encoding = encoding
        self._table = str.maketrans(
            {c: r for c, r in _FALLBACKS.items() if not _encodes(c, encoding)}
        )

    def write(self, text: str) -> int:
        if not text.isascii():
            text = text.translate(self._table)
            text = text.encode(self._encoding, "replace").decode(self._encoding)
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()


def fitted_stream(stream: TextIO) -> TextIO:
    """``stream``, or a :class:`FittedStream` over it if its encoding cannot take
    every character (a ``StringIO``, which has none, takes them all)."""
    encoding = getattr(stream, "encoding", None)
    if not isinstance(encoding, str) or _encodes(_PROBE, encoding):
        return stream
    return cast(TextIO, FittedStream(stream, encoding))


__all__ = ["draw_tree", "fitted_stream", "format_duration"]
