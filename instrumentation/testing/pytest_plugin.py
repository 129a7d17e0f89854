"""pytest plugin: the ``instrumentation_capture`` fixture (registered by entry point)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from instrumentation.testing import Capture, isolated


@pytest.fixture
def instrumentation_capture() -> Iterator[Capture]:
    """Events and spans emitted during the test. Afterwards the handler lists of the
    dispatchers that existed before it, and the current span and tags, are put back
    (a dispatcher made during the test keeps its handlers: see ``Snapshot``)."""
    with isolated() as capture:
        yield capture
