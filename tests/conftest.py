"""Fixtures shared by every test package."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.processes import RedisProcess, redis_server


@pytest.fixture
def redis_proc() -> Iterator[RedisProcess]:
    """A real, password-protected redis-server on a free loopback port."""
    with redis_server() as server:
        yield server
