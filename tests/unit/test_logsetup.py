"""Process-wide loop settings: abandoned lookups are quiet, real errors are not."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from ha_agent.logsetup import configure_loop


def test_only_abandoned_name_lookups_are_quieted(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.new_event_loop()
    try:
        configure_loop(loop)
        with caplog.at_level(logging.DEBUG, logger="asyncio"):
            loop.call_exception_handler(
                {
                    "message": "Future exception was never retrieved",
                    "exception": socket.gaierror(-3, "Temporary failure in name resolution"),
                }
            )
            loop.call_exception_handler(
                {"message": "Task exception was never retrieved", "exception": KeyError("x")}
            )
    finally:
        loop.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "Task exception" in errors[0].getMessage()
    assert any("abandoned name lookup" in r.getMessage() for r in caplog.records)
