"""LlamaIndex's ``base`` package, kept so that its imports keep working."""

from instrumentation.base.event import BaseEvent
from instrumentation.base.handler import BaseInstrumentationHandler

__all__ = ["BaseEvent", "BaseInstrumentationHandler"]
