"""Answers worked out once per class (a handler's signatures, its kept fields; an event
class's LLM kind and columns), forgotten with the class.

A dict keyed by the class kept every class it was asked about alive: handler and event
classes made at run time (one per test, a factory's per tenant, pydantic's
``create_model`` per request) were never freed. These tables
are keyed by ``id(cls)`` instead, and a weak reference to the class takes its entry out
when the class is freed (before its id can be another's). A lookup stays a plain dict
lookup: a weak-keyed dict makes a weak reference per lookup, and an attribute kept on a
pydantic class is read through its metaclass's ``__getattr__`` hook; both cost two to
three times as much on paths taken for every span.
"""

from __future__ import annotations

import weakref
from typing import Any, TypeVar

T = TypeVar("T")

# The weak references, kept alive until their class goes (each takes itself out). By
# the reference's id: a set would take two references to one live class as one, and
# the second one, dropped, would never take its entry out.
_watching: dict[int, weakref.ref[type]] = {}


def remember(table: dict[int, T], cls: type, value: T) -> T:
    """``table[id(cls)] = value`` until ``cls`` is freed; returns ``value``."""

    # Both tables bound now: at interpreter exit the module's globals may be gone
    # before the last classes are.
    def forget(
        ref: weakref.ref[type], key: int = id(cls), watching: dict[int, Any] = _watching
    ) -> None:
        table.pop(key, None)
        watching.pop(id(ref), None)

    table[id(cls)] = value
    ref = weakref.ref(cls, forget)
    _watching[id(ref)] = ref
    return value


__all__ = ["remember"]
