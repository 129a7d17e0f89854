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


def describe_error(err: BaseException) -> str:
    """``"ValueError: bad input"``; the class name alone when the message is empty
    (``GeneratorExit``, a bare ``raise KeyboardInterrupt``), not a dangling colon."""
    message = safe_str(err)
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def safe_repr(value: Any) -> str:
    """``repr(value)``, or a placeholder naming its type when that raises (or recurses
    past the limit)."""
    try:
        return repr(value)
    except Exception:
        return f"<unprintable {type(value).__qualname__}>"


__all__ = ["escape_controls", "safe_repr", "safe_str", "without_lone_surrogates"]
