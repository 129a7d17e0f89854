"""The ``instrumentation_capture`` fixture under its former name, for ``-p
instrumentation.testing.pytest_plugin`` and ``pytest_plugins = [...]``. The entry point
registers :mod:`instrumentation_pytest`, which imports nothing of the library until the
fixture is used (this module, inside the package, imports all of it).

It does not import that module: a checkout installed (``pip install -e .``) before the
module existed registers this one, and its import finder knows only the package.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from instrumentation.testing import Capture, _fixture


@pytest.fixture
def instrumentation_capture() -> Iterator[Capture]:
    """Events and spans emitted during the test, the counters from zero, and what the
    test changed undone afterwards: see :mod:`instrumentation_pytest`'s fixture."""
    yield from _fixture()


__all__ = ["instrumentation_capture"]
