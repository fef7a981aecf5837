"""One real CPU stack for the whole integration session (built once, always removed).

Fails the run if any component logged a BUG line (after Patroni's behave suite).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.stack import Stack, require_host_tools, running_stack


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    require_host_tools()
    with running_stack() as s:
        yield s
        bugs = s.bug_lines()
        if bugs:
            pytest.fail("components logged BUG lines:\n" + "\n".join(bugs[:20]))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that bring up stacks of their own run first, before the shared stack
    exists: two stacks at once on a small machine would distort failover timings."""
    items.sort(key=lambda item: "stack" in getattr(item, "fixturenames", ()))
