"""Fixtures of the LLM tests: a capture of everything, and global LLM settings reset."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest

from instrumentation.dispatcher import Dispatcher
from instrumentation.events.base import BaseEvent
from instrumentation.llms import default_price_table, reset_redaction
from instrumentation.testing import Capture, isolated


@pytest.fixture
def cap() -> Iterator[Capture]:
    """Events and spans reaching the root during the test."""
    with isolated() as capture:
        yield capture


@pytest.fixture(autouse=True)
def _llm_settings() -> Iterator[None]:
    """Each test starts and ends with no redaction and the default prices."""
    reset_redaction()
    default_price_table.reset()
    yield
    reset_redaction()
    default_price_table.reset()


@pytest.fixture
def dispatched(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The class names of the events handed to any dispatcher's ``event``/``aevent``
    during the test, whether or not a handler then receives them: an event object
    that reached the dispatcher was built, so an empty list means none was."""
    names: list[str] = []
    event, aevent = Dispatcher.event, Dispatcher.aevent

    def counting_event(self: Dispatcher, ev: BaseEvent, **kwargs: Any) -> None:
        names.append(type(ev).__name__)
        event(self, ev, **kwargs)

    async def counting_aevent(self: Dispatcher, ev: BaseEvent, **kwargs: Any) -> None:
        names.append(type(ev).__name__)
        await aevent(self, ev, **kwargs)

    monkeypatch.setattr(Dispatcher, "event", counting_event)
    monkeypatch.setattr(Dispatcher, "aevent", counting_aevent)
    return names


@pytest.fixture
def manual_gc() -> Iterator[None]:
    """No automatic collection during the test: what it creates stays in the youngest
    generation, in creation order, until it calls ``gc.collect()`` itself. So the order
    in which the cyclic GC finalises a cycle's objects does not depend on when earlier
    tests happened to trigger a collection."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
