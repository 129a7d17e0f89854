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
    ``telemetry`` is its own. Afterwards what the test changed is undone: handlers it
    attached are taken off, those it detached put back, ``propagate`` set back, the
    current span and tags put back, in the threads the test started too. What other
    tests running at once changed, what a module imported during the test set up at
    its import, and what the test did in ``keep_changes()`` stay (see
    ``instrumentation.testing``)."""
    telemetry.reset()
    with isolated() as capture:
        yield capture


__all__ = ["instrumentation_capture"]
