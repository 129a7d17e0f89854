"""pytest plugin: the ``instrumentation_capture`` fixture (registered by entry point)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from instrumentation import telemetry
from instrumentation.testing import Capture, isolated


@pytest.fixture
def instrumentation_capture() -> Iterator[Capture]:
    """Events and spans emitted during the test. The counters start from zero (and the
    first handler error of each kind is logged again), so that what a test reads in
    ``telemetry`` is its own. Afterwards the handler lists of the dispatchers that
    existed before it, and the current span and tags, are put back (a dispatcher made
    during the test keeps its handlers: see ``Snapshot``)."""
    telemetry.reset()
    with isolated() as capture:
        yield capture
