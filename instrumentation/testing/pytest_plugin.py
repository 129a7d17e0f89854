"""The ``instrumentation_capture`` fixture under its former name, for ``-p
instrumentation.testing.pytest_plugin`` and ``pytest_plugins = [...]``. The entry point
registers :mod:`instrumentation_pytest`, which imports nothing of the library until the
fixture is used (this module, inside the package, imports all of it)."""

from __future__ import annotations

from instrumentation_pytest import instrumentation_capture

__all__ = ["instrumentation_capture"]
