"""LlamaIndex's ``base.event`` module: the event is :mod:`instrumentation.events.base`'s."""

from instrumentation.events.base import BaseEvent

__all__ = ["BaseEvent"]
