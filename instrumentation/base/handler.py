"""LlamaIndex's ``BaseInstrumentationHandler``: a class that sets up instrumentation once."""

from __future__ import annotations

from abc import ABC, abstractmethod


class BaseInstrumentationHandler(ABC):
    """Subclass it with an ``init`` classmethod that attaches your handlers."""

    @classmethod
    @abstractmethod
    def init(cls) -> None:
        """Attach handlers (to ``get_dispatcher()``, say)."""


__all__ = ["BaseInstrumentationHandler"]
