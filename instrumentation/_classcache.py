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

Where even ``id()`` would cost every traced call (some 25 ns, 1 to 2 percent of it),
a table is split in two (:func:`keep`): classes that live as long as the process
anyway are keyed by themselves, the others by ``id()``, forgotten with them.
"""

from __future__ import annotations

import sys
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


_HEAP_TYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class made by a class statement or type()


def lives_for_good(cls: type) -> bool:
    """Whether ``cls`` is kept alive by the interpreter anyway: a built-in type, or a
    class its module holds under its qualified name (defined at a module's top level,
    or in such a class). A class made in a function, by ``type()`` or by pydantic's
    ``create_model`` is not."""
    if not cls.__flags__ & _HEAP_TYPE:
        return True
    try:
        found: Any = sys.modules.get(cls.__module__)
        for part in cls.__qualname__.split("."):  # "<locals>" is found nowhere
            found = getattr(found, part, None)
    except Exception:  # an odd __module__, a module __getattr__ that raises
        return False
    return found is cls


def keep(by_class: dict[type, T], by_id: dict[int, T], cls: type, value: T) -> T:
    """Remember ``value`` for ``cls``: in ``by_class``, a lookup by the class itself,
    if it lives for good (keeping it costs nothing), else in ``by_id`` until it is
    freed (see :func:`remember`); returns ``value``."""
    if lives_for_good(cls):
        by_class[cls] = value
    else:
        remember(by_id, cls, value)
    return value


__all__ = ["keep", "lives_for_good", "remember"]
