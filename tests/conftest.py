from __future__ import annotations

from collections.abc import Iterator

import pytest

from instrumentation import telemetry
from instrumentation.testing import Snapshot


@pytest.fixture(autouse=True)
def _clean_instrumentation_state() -> Iterator[None]:
    """Every test starts with no handlers on the tree and zeroed counters, and leaves none."""
    snapshot = Snapshot()
    from instrumentation.dispatcher import root_manager

    for node in root_manager.dispatchers.values():
        node._event_handlers = ()
        node._span_handlers = ()
        node._propagate = True
    root_manager._rebuild_all()
    telemetry.reset()
    try:
        yield
    finally:
        snapshot.restore()
