"""Shared fixtures for the gateway tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio (the gateway's loop, uvloop in production)."""
    return "asyncio"
