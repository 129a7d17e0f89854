"""The checks every number (and flag) the storage takes goes through: options, timeouts.

In one place, so that each option refuses the same things and says the same of what
it takes. Checked one by one they let NaN through (``value <= 0`` is false for it):
``retry_for=nan`` made every write fail and blamed the database, ``block_timeout=inf``
made each ``put()`` overflow the clock, and ``flush("x")`` failed inside
``threading`` with a message that named neither the call nor the argument.
"""

from __future__ import annotations

import math
from typing import Any

#: The longest wait or period the storage takes, in seconds: a day. More is a slip
#: (milliseconds given as seconds, a timestamp); near 300 years a wait overflows the
#: platform's clock. (SQLite's ``busy_timeout`` had this bound already.)
MAX_SECONDS = 86_400.0
#: The most entries (``max_queue``, ``batch_size``) or characters
#: (``max_payload_chars``) a count may be: more than any process holds in memory.
MAX_COUNT = 10**9


def seconds(
    name: str,
    value: Any,
    *,
    positive: bool = False,
    most: float | None = MAX_SECONDS,
    also: str = "",
) -> float:
    """``value`` as seconds: a finite number from 0 (above 0 if ``positive``) up to
    ``most`` (``None``: no bound), as a float.

    Anything else is a ``TypeError`` (not a number) or a ``ValueError`` (NaN, an
    infinity, out of range), naming ``name`` and what it takes (and ``also`` takes).
    """
    if most is None:
        span = "more than 0" if positive else "0 or more"
    else:
        span = f"more than 0, at most {most:g}" if positive else f"0 to {most:g}"
    what = f"{name} is seconds, {span}{also}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what}; got {value!r} ({type(value).__name__})")
    number = float(value)
    if (
        not math.isfinite(number)
        or number < 0
        or (positive and number == 0)
        or (most is not None and number > most)
    ):
        raise ValueError(f"{what}; got {value!r}")
    return number


def count(name: str, value: Any, *, least: int = 1, most: int = MAX_COUNT) -> int:
    """``value`` as a whole number from ``least`` to ``most``: else a ``TypeError`` (not
    an ``int``) or a ``ValueError`` (out of range) naming ``name``."""
    what = f"{name} is a whole number from {least:,} to {most:,}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what}; got {value!r} ({type(value).__name__})")
    if not least <= value <= most:
        raise ValueError(f"{what}; got {value!r}")
    return int(value)


def number(name: str, value: Any, *, whole: bool = False) -> Any:
    """``value`` as it is if it is a number (an ``int`` if ``whole``), else a
    ``TypeError`` naming ``name``. For pydantic fields, checked before pydantic takes
    ``"5"`` for 5 and ``True`` for 1; the range is :func:`seconds`' or :func:`count`'s
    to check after."""
    if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
        kind = "a whole number" if whole else "a number of seconds"
        raise TypeError(f"{name} is {kind}, got {value!r} ({type(value).__name__})")
    return value


def flag(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False``, else a ``TypeError``: ``read_only="no"``
    is a true string, and was taken as ``True``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} is True or False, got {value!r}")
    return value


def timeout(value: Any) -> float | None:
    """The ``timeout`` of ``flush()`` and ``shutdown()``: seconds from 0 to a day, or
    ``None`` to wait as long as it takes."""
    if value is None:
        return None
    return seconds("timeout", value, also=", or None to wait as long as it takes")


__all__: list[str] = []
