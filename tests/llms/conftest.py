"""Fixtures of the LLM tests: a capture of everything, and global LLM settings reset."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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
