"""The pytest plugin of the ``instrumentation`` distribution: the
``instrumentation_capture`` fixture, registered by its ``pytest11`` entry point.

pytest loads an entry point's module into every session of the environment, used or
not. This one imports nothing of the library until a test asks for the fixture:
importing ``instrumentation`` (its dispatchers, events and pydantic models) took about
0.3 s, and added a ``gc.callbacks`` hook, in every test run of every project installed
alongside it. It lives outside the ``instrumentation`` package for that reason:
loading any module inside it imports the package first.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from instrumentation.testing import Capture


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
    from instrumentation.testing import _fixture

    yield from _fixture()


__all__ = ["instrumentation_capture"]
