"""NaN and the infinities out of JSON-bound values, and ints too long to print.

Python's ``json`` writes them as ``NaN`` and ``Infinity``, which no other JSON parser
takes (PostgreSQL's ``jsonb``, ``jq``, ``JSON.parse``, OTLP backends). The storage,
its command line and the OpenTelemetry export all write them as ``null``, as pydantic
does. An int of more digits than Python prints (4,300 by default) ``json`` does not
write at all: it is written as ``"<int of N bits>"`` (see
:func:`instrumentation._text.printable_int`).
"""

from __future__ import annotations

import math
from typing import Any

from instrumentation._text import printable_int

#: Deeper than this, containers are left as they are (a list that holds itself stops
#: here; what then still fails is the caller's to mark as unserialisable).
MAX_DEPTH = 100


def finite(value: Any) -> Any:
    """``value`` with NaN and infinite floats in it, in dicts, lists and tuples (made
    lists), replaced by None, and ints too long to print by a placeholder. Walked
    without recursion, copying what it walks.

    A container met twice (held in two places, or holding itself) is copied once and
    that copy put in both places: copied anew each time, ``x = [x, x]`` made 2**100
    copies (the process hung), and one holding itself a chain of 100. So the copy of
    one that holds itself holds itself too, and ``json`` says so at once."""
    root: list[Any] = [value]
    stack: list[tuple[Any, Any, int]] = [(root, 0, 0)]
    # By id(), with the original kept beside its copy: a container made during the
    # walk (by a subclass's iteration, say) is freed once copied, and its id reused.
    copies: dict[int, tuple[Any, Any]] = {}
    while stack:
        container, key, depth = stack.pop()
        item = container[key]
        if isinstance(item, float):
            if not math.isfinite(item):
                container[key] = None
        elif isinstance(item, int):
            container[key] = printable_int(item)
        elif depth < MAX_DEPTH and isinstance(item, (dict, list, tuple)):
            known = copies.get(id(item))
            if known is not None:
                container[key] = known[1]
            elif isinstance(item, dict):
                mapping = dict(item)
                container[key] = mapping
                copies[id(item)] = (item, mapping)
                stack.extend((mapping, k, depth + 1) for k in mapping)
            else:
                items = list(item)
                container[key] = items
                copies[id(item)] = (item, items)
                stack.extend((items, i, depth + 1) for i in range(len(items)))
    return root[0]


__all__ = ["MAX_DEPTH", "finite"]
