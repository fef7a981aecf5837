"""`sglang-ha` parsing and rendering, with click's CliRunner and a fake cluster client
(the verbs against the real stack: tests/integration/test_cli.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from ha_agent.config import AgentSettings
from ha_agent.ctl import output
from ha_agent.ctl.__main__ import cli
from ha_agent.ctl.client import ClusterView, NodeRow, Traffic, parse_relay_metrics
from ha_agent.dcs.base import Cluster, EngineState, HAEvent, Leader, Role
from tests.support.fakes import agent_status

URL = {"sglang-01": "http://node-1:8008", "sglang-02": "http://node-2:8008"}


class FakeClient:
    """What the CLI asks of ClusterClient, answered from fixed data; records posts."""

    def __init__(self, engine: EngineState = EngineState.HEALTHY) -> None:
        self.s = AgentSettings(redis_url="redis://unused")
        self.engine = engine
        self.posts: list[tuple[str, str, dict[str, Any]]] = []
        self.answers: dict[str, tuple[int, dict[str, Any]]] = {}
        self.config: dict[str, Any] = {}
        self.views = 0
        self.interrupt_after: int | None = None
        self.events = [HAEvent(1764660000.0, "PROMOTED", "sglang-01", "sglang-01 to primary")]

    def view(self) -> ClusterView:
        self.views += 1
        if self.interrupt_after is not None and self.views > self.interrupt_after:
            raise KeyboardInterrupt
        rows = [
            NodeRow(
                "sglang-01",
                URL["sglang-01"],
                agent_status("sglang-01", Role.PRIMARY, lease_time_left=1.9),
            ),
            NodeRow(
                "sglang-02",
                URL["sglang-02"],
                agent_status("sglang-02", Role.STANDBY, self.engine, for_seconds=0.0),
            ),
        ]
        return ClusterView(Cluster(Leader("sglang-01", 1, 2000), max_epoch=1), None, rows)

    def post(
        self, api_url: str, path: str, body: dict[str, Any] | None = None, timeout: float = 5
    ) -> tuple[int, dict[str, Any]]:
        self.posts.append((api_url, path, body or {}))
        return self.answers.get(path, (200, {"detail": "ok"}))

    def get(self, api_url: str, path: str) -> tuple[int, dict[str, Any]]:
        assert path == "/ha/config"
        effective = {"lease_ttl": 2.5, "loop_wait": 0.5, "failback": "never", **self.config}
        return 200, {"config": self.config, "node": "sglang-01", "effective": effective}

    def history(self, count: int) -> list[HAEvent]:
        return self.events[-count:]


def run(client: FakeClient, *args: str, **kwargs: Any) -> Any:
    obj = {"client": client, "settings": client.s, "token": "t"}
    return CliRunner().invoke(cli, list(args), obj=obj, catch_exceptions=False, **kwargs)


def test_help_reads_like_patronictl_one_line_per_command() -> None:
    result = CliRunner().invoke(cli, ["--help"], terminal_width=80)
    assert result.exit_code == 0
    commands = result.output.split("Commands:", 1)[1].strip().splitlines()
    names = [line.split()[0] for line in commands]
    assert names == sorted(names) and len(names) == 13
    assert {"restart", "rolling-restart", "edit-config", "show-config", "remove"} <= set(names)
    for line in commands:
        assert len(line.split(None, 1)) == 2, f"no help for {line!r}"
        assert not line.endswith("..."), f"help cut short: {line!r}"


def test_status_renders_table_json_and_yaml() -> None:
    client = FakeClient()
    table = run(client, "status").output
    assert table.splitlines()[0] == "cluster ok: leader sglang-01 (epoch 1), max epoch 1"
    assert table.splitlines()[2].split()[:8] == [
        "sglang-01",
        "primary",
        "healthy",
        "no",  # the fake's status does not say it serves
        "-",  # no relay to ask: no share of traffic
        "-",
        "1",
        "1.9s",
    ]
    doc = json.loads(run(client, "status", "-o", "json").output)
    assert doc["leader"] == "sglang-01" and doc["epoch"] == 1 and doc["paused"] is False
    assert [n["status"]["role"] for n in doc["nodes"]] == ["primary", "standby"]
    assert json.loads(run(client, "status", "--json").output) == doc
    assert yaml.safe_load(run(client, "status", "-o", "yaml").output) == doc


def test_status_watch_is_bounded_by_count_and_ends_on_ctrl_c() -> None:
    client = FakeClient()
    result = run(client, "status", "-w", "-c", "3", "-n", "0.2")
    assert result.exit_code == 0 and result.output.count("cluster ok") == 3
    client = FakeClient()
    client.interrupt_after = 2
    result = run(client, "status", "--watch", "--interval", "0.2")
    assert result.exit_code == 0, "Ctrl-C ends a watch cleanly"
    assert result.output.count("cluster ok") == 2


def test_history_as_json() -> None:
    events = json.loads(run(FakeClient(), "history", "-o", "json").output)
    assert events == [
        {
            "ts": 1764660000.0,
            "event": "PROMOTED",
            "node": "sglang-01",
            "detail": "sglang-01 to primary",
        }
    ]


def test_edit_config_set_types_values_and_sends_the_previous_config() -> None:
    client = FakeClient()
    client.config = {"warm_rate": 1.0}
    client.answers["/ha/config"] = (200, {"detail": "x", "config": {}, "diff": []})
    result = run(
        client,
        "edit-config",
        "--set",
        "lease_ttl=4",
        "-s",
        "failback=preferred",
        "--set",
        "warm_rate=",
        "--force",
    )
    assert result.exit_code == 0, result.output
    assert "lease_ttl: - -> 4" in result.output and "warm_rate: 1.0 -> -" in result.output
    url, path, body = client.posts[-1]
    assert (url, path) == (URL["sglang-01"], "/ha/config")
    assert body == {
        "config": {"lease_ttl": 4, "failback": "preferred"},
        "previous": {"warm_rate": 1.0},
    }


def test_edit_config_shows_the_refusal_and_fails() -> None:
    client = FakeClient()
    client.answers["/ha/config"] = (422, {"detail": "refused: breaks the lease-timing rule X"})
    result = run(client, "edit-config", "--set", "lease_ttl=1", "--force")
    assert result.exit_code == 1
    assert "Error: refused: breaks the lease-timing rule X" in result.output


def test_edit_config_asks_before_applying() -> None:
    client = FakeClient()
    result = run(client, "edit-config", "--set", "lease_ttl=4", input="n\n")
    assert result.exit_code == 1 and "Apply these changes?" in result.output
    assert client.posts == []
    result = run(client, "edit-config", "--set", "badly")
    assert result.exit_code == 1 and "'badly' is not key=value" in result.output


def test_edit_config_in_the_editor(monkeypatch: pytest.MonkeyPatch) -> None:
    shown: list[str] = []

    def edit(text: str, extension: str) -> str:
        shown.append(text)
        return text.replace("# loop_wait: 0.5", "loop_wait: 0.4")

    monkeypatch.setattr("click.edit", edit)
    client = FakeClient()
    client.answers["/ha/config"] = (200, {"detail": "x", "config": {}, "diff": []})
    result = run(client, "edit-config", "--force")
    assert result.exit_code == 0, result.output
    assert "# lease_ttl: 2.5" in shown[0], "unset settings shown with the value in effect"
    assert client.posts[-1][2]["config"] == {"loop_wait": 0.4}


def test_show_config_lists_set_and_unset_values() -> None:
    client = FakeClient()
    client.config = {"lease_ttl": 4.0}
    out = run(client, "show-config").output
    assert "\nlease_ttl: 4.0\n" in out and "# loop_wait: 0.5" in out
    assert "# lease_ttl" not in out
    assert json.loads(run(client, "show-config", "-o", "json").output)["config"] == {
        "lease_ttl": 4.0
    }


def test_restart_of_a_standby_goes_to_its_own_agent_and_waits_healthy() -> None:
    client = FakeClient()
    client.answers["/ha/restart-engine"] = (200, {"detail": "engine restarted (pid 7)", "pid": 7})
    result = run(client, "restart", "sglang-02")
    assert result.exit_code == 0, result.output
    assert client.posts == [(URL["sglang-02"], "/ha/restart-engine", {})]
    assert "sglang-02: engine healthy again" in result.output
    result = run(client, "restart", "sglang-09")
    assert result.exit_code == 1 and "unknown node 'sglang-09'" in result.output


def test_rolling_restart_refuses_while_a_node_is_unhealthy() -> None:
    client = FakeClient(engine=EngineState.HUNG)
    result = run(client, "rolling-restart")
    assert result.exit_code == 1 and "not healthy: sglang-02" in result.output
    assert client.posts == []


def test_remove_and_failover_need_confirmation() -> None:
    client = FakeClient()
    assert run(client, "remove", "sglang-02", input="n\n").exit_code == 1
    assert run(client, "failover", "--to", "sglang-02").exit_code == 2
    assert client.posts == []
    result = run(client, "remove", "sglang-02", "--force")
    assert result.exit_code == 0
    assert client.posts == [(URL["sglang-01"], "/ha/remove", {"node": "sglang-02"})]


def test_completion_script() -> None:
    out = CliRunner().invoke(cli, ["completion", "bash"]).output
    assert "_SGLANG_HA_COMPLETE=bash_complete" in out


def test_edit_config_apply_merges_a_yaml_file_from_stdin() -> None:
    client = FakeClient()
    client.config = {"warm_rate": 1.0, "loop_wait": 0.4}
    client.answers["/ha/config"] = (200, {"detail": "x", "config": {}, "diff": []})
    text = "# from a file\nlease_ttl: 3.5\nwarm_rate: null\n"
    result = run(client, "edit-config", "--apply", "-", "--force", input=text)
    assert result.exit_code == 0, result.output
    assert client.posts[-1][2]["config"] == {"loop_wait": 0.4, "lease_ttl": 3.5}
    result = run(client, "edit-config", "--apply", "-", "--force", input="- a\n- b\n")
    assert result.exit_code == 1 and "must be a mapping" in result.output


def relay_metrics(counts: dict[str, int], can_serve: dict[str, int]) -> str:
    """A relay's /metrics as prometheus_client writes it, for the counters status reads."""
    lines = [
        "# HELP sglang_ha_relay_requests_total Requests answered by the relay.",
        "# TYPE sglang_ha_relay_requests_total counter",
    ]
    for node, n in counts.items():
        # Split over endpoints and outcomes, as the relay counts them.
        ok, other = n - n // 4, n // 4
        lines.append(
            f'sglang_ha_relay_requests_total{{code="200",endpoint="/v1/completions",'
            f'node="{node}",outcome="ok"}} {float(ok)}'
        )
        lines.append(
            f'sglang_ha_relay_requests_total{{code="200",endpoint="/generate",'
            f'node="{node}",outcome="migrated"}} {float(other)}'
        )
    lines.append(
        'sglang_ha_relay_requests_total{code="503",endpoint="/generate",node="-",'
        'outcome="failed"} 7.0'
    )
    lines += [
        "# HELP sglang_ha_relay_node_can_serve 1 while the relay considers the node able.",
        "# TYPE sglang_ha_relay_node_can_serve gauge",
    ]
    lines += [
        f'sglang_ha_relay_node_can_serve{{node="{n}"}} {float(v)}' for n, v in can_serve.items()
    ]
    return "\n".join(lines) + "\n"


def pool_view(traffic: Traffic | None) -> ClusterView:
    """Three pool nodes; sglang-03's engine died and it is out of service."""
    names = ["sglang-01", "sglang-02", "sglang-03"]
    rows = [
        NodeRow(
            name,
            f"http://node-{i}:8008",
            agent_status(
                name,
                Role.PRIMARY if i == 1 else Role.STANDBY,
                EngineState.DEAD if i == 3 else EngineState.HEALTHY,
                lease_time_left=1.9,
                mode="pool",
                serving=i != 3,
                pool="engine dead" if i == 3 else "",
            ),
        )
        for i, name in enumerate(names, 1)
    ]
    return ClusterView(Cluster(Leader("sglang-01", 1, 2000), max_epoch=1), None, rows, traffic)


def test_status_shows_each_nodes_share_of_traffic_summed_over_relays() -> None:
    traffic = Traffic()
    # Two relays (the gateway pair); sglang-03 is out of rotation on both.
    parse_relay_metrics(
        relay_metrics(
            {"sglang-01": 40, "sglang-02": 20}, {"sglang-01": 1, "sglang-02": 1, "sglang-03": 0}
        ),
        traffic,
    )
    parse_relay_metrics(
        relay_metrics(
            {"sglang-01": 20, "sglang-02": 20, "sglang-03": 0},
            {"sglang-01": 1, "sglang-02": 0, "sglang-03": 0},
        ),
        traffic,
    )
    view = pool_view(traffic)
    lines = output.status_table(view).splitlines()
    assert lines[0] == "cluster ok: leader sglang-01 (epoch 1), max epoch 1, mode pool"
    cells = {line.split()[0]: line.split()[2:7] for line in lines[2:5]}
    # Refused requests (node "-") are nobody's share: 60 + 40 + 0 = 100 routed.
    assert cells == {
        "sglang-01": ["healthy", "yes", "yes", "60%", "(60)"],
        "sglang-02": ["healthy", "yes", "yes", "40%", "(40)"],
        "sglang-03": ["dead", "no", "no", "0%", "(0)"],
    }
    assert "sglang-03: engine dead" in lines
    doc = output.status_document(view)
    assert [n["traffic"] for n in doc["nodes"]] == [
        {"requests": 60, "share": 0.6, "in_rotation": True},
        {"requests": 40, "share": 0.4, "in_rotation": True},
        {"requests": 0, "share": 0.0, "in_rotation": False},
    ]


def test_status_watch_shows_the_share_between_two_views() -> None:
    before, after = Traffic(), Traffic()
    parse_relay_metrics(relay_metrics({"sglang-01": 100, "sglang-02": 0}, {}), before)
    # Since the last view sglang-01 took nothing more: it left the rotation.
    parse_relay_metrics(
        relay_metrics({"sglang-01": 100, "sglang-02": 0, "sglang-03": 30}, {}), after
    )
    lines = output.status_table(pool_view(after), since=before).splitlines()
    shares = {line.split()[0]: line.split()[5] for line in lines[2:5]}
    assert shares == {"sglang-01": "0%", "sglang-02": "0%", "sglang-03": "100%"}
    assert "since the last view" in output.status_table(pool_view(after), since=before)


def test_status_says_when_the_relay_does_not_answer() -> None:
    traffic = Traffic(errors=["http://gateway:8002: connection refused"])
    table = output.status_table(pool_view(traffic))
    assert "relay UNREACHABLE: http://gateway:8002: connection refused" in table
    assert table.splitlines()[2].split()[4:6] == ["?", "-"]
    doc = output.status_document(pool_view(traffic))
    assert [n["traffic"] for n in doc["nodes"]] == [None, None, None]
    assert doc["relay_errors"] == ["http://gateway:8002: connection refused"]


def test_status_reads_the_relays_from_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HA_RELAY_ADMIN_URLS", "http://gateway:8002, http://gateway-2:8002")
    assert AgentSettings().relay_admin_urls == ["http://gateway:8002", "http://gateway-2:8002"]
