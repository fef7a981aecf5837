"""One real CPU stack for the whole integration session (built once, always removed).

Fails the run if any component logged a BUG line (after Patroni's behave suite).
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterator

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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On a failure, attach the tail of each component's log: CI keeps only the
    test output, and an HA failure is rarely explained by the assertion alone."""
    report = yield
    stack = getattr(item, "funcargs", {}).get("stack")
    if report.failed and call.when == "call" and isinstance(stack, Stack):
        for service in ("node-1", "node-2", "gateway"):
            with contextlib.suppress(Exception):
                tail = "\n".join(stack.logs(service).splitlines()[-60:])
                report.sections.append((f"{service} log (last 60 lines)", tail))
    return report
