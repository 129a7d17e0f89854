"""pytest plugin: the ``instrumentation_capture`` fixture (registered by entry point)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from instrumentation.testing import Capture, isolated


@pytest.fixture
def instrumentation_capture() -> Iterator[Capture]:
    """Events and spans emitted during the test; every handler list is restored after."""
    with isolated() as capture:
        yield capture
