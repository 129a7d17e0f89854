"""A dict that forgets its oldest keys: for ids remembered until their span ends.

Spans that never end (a generator never finished, a call still running at exit) must
not make such a table grow for ever; the oldest entries go first.
"""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def put_bounded(table: dict[K, V], key: K, value: V, most: int) -> None:
    """``table[key] = value``, first forgetting the oldest key when ``table`` is full.

    Safe against other threads changing ``table`` meanwhile (the oldest key may be gone).
    """
    if len(table) >= most:
        try:
            del table[next(iter(table))]
        except (StopIteration, KeyError, RuntimeError):
            pass
    table[key] = value


__all__ = ["put_bounded"]
