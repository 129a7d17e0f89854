"""Names a module re-exports, imported at their first use rather than with it.

The handlers and spans nothing in the core uses (``SimpleSpanHandler``, the null
handlers, ``SimpleSpan``, the thread helpers) were a twentieth of ``import
instrumentation`` and of each integration's import, mostly pydantic building their
classes, in programs that never use them. A module lists them under ``if
TYPE_CHECKING:`` (what type checkers read: a misspelt name stays an error there) and
gets its ``__getattr__`` and ``__dir__`` (PEP 562) from :func:`lazy_exports`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    namespace: dict[str, Any], exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of the module whose globals are ``namespace``,
    for ``exports``: each name to the module it comes from, or, for a submodule the
    module's import used to load (reached as an attribute), to that submodule.

    What a name is found to be is kept in ``namespace``: later reads are the plain
    lookup they were, and ``__getattr__`` is not called for it again.
    """
    module_name = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        source = exports.get(name)
        if source is None:  # as Python words it, with its "Did you mean" from __dir__
            raise AttributeError(
                f"module {module_name!r} has no attribute {name!r}",
                name=name,
                obj=sys.modules.get(module_name),
            )
        module = importlib.import_module(source)
        value = module if source == f"{module_name}.{name}" else getattr(module, name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__


__all__ = ["lazy_exports"]
