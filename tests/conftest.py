"""Shared fixtures; the doubles themselves are in fakes.py."""

from __future__ import annotations

import pytest
from fakes import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock at T0 (test modules whose code meets a real server's time override it)."""
    return FakeClock()
