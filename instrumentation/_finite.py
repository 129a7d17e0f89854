"""NaN and the infinities out of JSON-bound values.

Python's ``json`` writes them as ``NaN`` and ``Infinity``, which no other JSON parser
takes (PostgreSQL's ``jsonb``, ``jq``, ``JSON.parse``, OTLP backends). The storage,
its command line and the OpenTelemetry export all write them as ``null``, as pydantic
does.
"""

from __future__ import annotations

import math
from typing import Any

#: Deeper than this, containers are left as they are (a list that holds itself stops
#: here; what then still fails is the caller's to mark as unserialisable).
MAX_DEPTH = 100


def finite(value: Any) -> Any:
    """``value`` with NaN and infinite floats in it, in dicts, lists and tuples (made
    lists), replaced by None. Walked without recursion, copying what it walks."""
    root: list[Any] = [value]
    stack: list[tuple[Any, Any, int]] = [(root, 0, 0)]
    while stack:
        container, key, depth = stack.pop()
        item = container[key]
        if isinstance(item, float):
            if not math.isfinite(item):
                container[key] = None
        elif depth < MAX_DEPTH and isinstance(item, dict):
            copied = dict(item)
            container[key] = copied
            stack.extend((copied, k, depth + 1) for k in copied)
        elif depth < MAX_DEPTH and isinstance(item, (list, tuple)):
            items = list(item)
            container[key] = items
            stack.extend((items, i, depth + 1) for i in range(len(items)))
    return root[0]


__all__ = ["MAX_DEPTH", "finite"]
