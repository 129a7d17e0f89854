"""Text made from what the application handed over, for wherever it is written out:
a value whose ``str()`` raises, a lone surrogate, an escape sequence in a question."""

from __future__ import annotations

import re
from typing import Any

#: Lone halves of a surrogate pair (text decoded with ``surrogateescape``, a file name
#: say): nothing encodes them as UTF-8, neither the databases nor OTLP's exporter.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

#: Characters that move the cursor, end the line, or make the terminal do something
#: (C0 and C1 controls, DEL, the Unicode line and paragraph separators, and the
#: bidirectional overrides that show text in another order than it is).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}

#: Longest text written out of one value the application handed over: an
#: OpenTelemetry attribute, the message of a span's error. An exception's ``str()``
#: can be any size (a 50 MB document quoted in a ``ValueError``), and each span
#: handler wrote it whole: to every row, export request and printed tree.
MAX_TEXT_CHARS = 8192

#: An int of at most this many bits has fewer digits than Python prints at the least
#: (640, the lowest ``sys.set_int_max_str_digits()`` takes).
_PRINTABLE_INT_BITS = 2_000


def without_lone_surrogates(text: str) -> str:
    """``text`` with lone surrogates replaced by U+FFFD (ASCII text as it is, cheaply)."""
    return text if text.isascii() else _LONE_SURROGATE.sub("\ufffd", text)


def _escape(char: str) -> str:
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def escape_controls(text: str, *, multiline: bool = False) -> str:
    """``text`` with its control characters escaped (``\\n``, ``\\x1b``): shown, not
    obeyed by the terminal (``\\x1b[2J`` would clear it). ``multiline`` keeps newlines
    and tabs, for output that is text of several lines."""
    if text.isascii() and text.isprintable():
        return text

    def escaped(found: re.Match[str]) -> str:
        char = found.group()
        return char if multiline and char in "\n\t" else _escape(char)

    return _CONTROL.sub(escaped, text)


def safe_str(value: Any) -> str:
    """``str(value)``, or a placeholder naming its type when that raises."""
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__qualname__}>"


def cut(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """``text``, or its first characters ending with ``...`` when it is longer than
    ``limit``."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def printable_int(value: int) -> int | str:
    """``value``, or ``"<int of N bits>"`` in its place when it has more digits than
    Python prints (``sys.get_int_max_str_digits()``, 4,300 by default): ``str()``,
    ``repr()`` and ``json.dumps`` raise for it, and what wrote it out lost the value
    it was in, or left a marker saying its ``repr`` failed."""
    if value.bit_length() <= _PRINTABLE_INT_BITS:
        return value
    try:
        int.__repr__(value)
    except ValueError:
        return f"<int of {value.bit_length()} bits>"
    return value


def describe_error(err: BaseException) -> str:
    """``"ValueError: bad input"``; the class name alone when the message is empty
    (``GeneratorExit``, a bare ``raise KeyboardInterrupt``), not a dangling colon. The
    message is :func:`cut` to :data:`MAX_TEXT_CHARS`."""
    message = cut(safe_str(err))
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def safe_repr(value: Any) -> str:
    """``repr(value)``, or a placeholder naming its type when that raises (or recurses
    past the limit)."""
    try:
        return repr(value)
    except Exception:
        return f"<unprintable {type(value).__qualname__}>"


__all__ = [
    "MAX_TEXT_CHARS",
    "cut",
    "describe_error",
    "escape_controls",
    "printable_int",
    "safe_repr",
    "safe_str",
    "without_lone_surrogates",
]
