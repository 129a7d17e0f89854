from __future__ import annotations

from collections.abc import Iterator

import pytest

from instrumentation.audit import runner


@pytest.fixture(autouse=True)
def _fresh_audit_log_rate_limit() -> Iterator[None]:
    """Each test sees the first error log of each handler (the limit is per process)."""
    runner._last_logged.clear()
    yield
    runner._last_logged.clear()
