"""The HA event log (ha_agent/events.py)."""

from __future__ import annotations

from pathlib import Path

from ha_agent.events import EventLog


def test_two_logs_of_one_name_keep_their_own_files(tmp_path: Path) -> None:
    """A relay worker holds two logs named "relay": its own (to ha.log) and the
    topology's (stdout only, but in worker 0). An event of the first reaches ha.log
    however many of the second exist."""
    own = EventLog(str(tmp_path / "ha.log"), "relay")
    quiet = EventLog(None, "relay")
    try:
        own.emit("QUERY_QUARANTINED", "generate request abc")
        quiet.emit("LEADER_CHANGED", "from - to a")
    finally:
        own.close()
        quiet.close()
    text = (tmp_path / "ha.log").read_text()
    assert "QUERY_QUARANTINED generate request abc" in text
    assert "LEADER_CHANGED" not in text
