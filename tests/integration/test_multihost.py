"""The multi-host stacks (docs/multi-host.md) as separate hosts on one machine.

A control host (gateway, Redis master, a Sentinel), a GPU host running its own
engine (plus a Sentinel and the Redis replica), and a GPU host in sidecar mode
beside an engine container the "user" runs (plus a Sentinel). Each host is its own
compose project on its own network; they reach each other only through published
ports. The gateway knows no node address but what the registry tells it; failover
across hosts under load loses no request; a third node joins by being started.

The sidecar's container watch and process watch are also checked on their own
against real containers and processes (crash vs OOM kill).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import docker
import httpx
import openai
import pytest

from ha_agent.node.engine.container import ContainerWatch, demux, docker_time, exit_how
from ha_agent.node.engine.process import HostProcessWatch, ProcessState
from tests.failover.load import Load
from tests.failover.runner import (
    ScenarioResult,
    assert_clean_failover,
    run_scenario,
    trial_with_one_retry,
)
from tests.failover.scenarios import Action, Fault, by_name, heals_itself, sim_knobs
from tests.support.capture import Capture, tls_records
from tests.support.multihost import ENGINE_PORT, LABEL, MultiHost, running_hosts
from tests.support.secrets_held import distinct_secret_values, secrets_held
from tests.support.stack import COMPOSE_DIR, Stack, read_secrets, require_host_tools


def client_key() -> str:
    """The gateway's `default` client key (make secrets)."""
    return read_secrets()["HA_CLIENT_KEY"]


pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def hosts() -> Iterator[MultiHost]:
    require_host_tools()
    with running_hosts() as mh:
        yield mh
        bugs = mh.bug_lines()
        if bugs:
            pytest.fail("components logged BUG lines:\n" + "\n".join(bugs[:20]))


# -- the stack files ----------------------------------------------------------------------


def compose_config(env_file: str, *files: str, profiles: str = "") -> dict[str, Any]:
    cmd = ["docker", "compose", "--env-file", f"env/{env_file}"]
    cmd += [a for f in files for a in ("-f", f)] + ["config", "--format", "json"]
    env = os.environ | {"COMPOSE_PROFILES": profiles} if profiles else None
    result = subprocess.run(
        cmd, cwd=COMPOSE_DIR, capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr
    return cast(dict[str, Any], json.loads(result.stdout))


def test_control_host_stack_bakes_in_no_node_address() -> None:
    config = compose_config("control-host.env.example", "control-host.yaml")
    services = config["services"]
    assert set(services) == {"gateway", "redis-1", "sentinel-1"}
    gateway = services["gateway"]["environment"]
    assert gateway["HA_NODES"] == ""
    assert gateway["HA_SENTINELS"] == "10.0.0.10:26379,10.0.0.11:26379,10.0.0.12:26379"
    # Redis and the Sentinel announce and publish the host's address, not a name.
    assert services["redis-1"]["environment"]["ANNOUNCE_HOST"] == "10.0.0.10"
    assert services["sentinel-1"]["environment"]["REDIS_MASTER_HOST"] == "10.0.0.10"
    for name in ("redis-1", "sentinel-1"):
        assert {p["host_ip"] for p in services[name]["ports"]} == {"10.0.0.10"}
    local = compose_config(
        "control-host.env.example", "control-host.yaml", profiles="local-sentinels"
    )
    published = sorted(p["published"] for s in local["services"].values() for p in s["ports"])
    assert published == ["26379", "26380", "26381", "6379", "8000"]
    # Secrets as files, each service its own, none from secrets.env; the CA that
    # verifies the engines, never a TLS key.
    assert _secret_files(services["gateway"]) == {
        "engine_api_key",
        "client_keys",
        "ha_redis_password",
        "ha_sentinel_password",
        "gateway_tls_crt",
        "gateway_tls_key",
        "tls_ca_crt",
    }
    assert gateway["HA_ENGINE_TLS_CA_FILE"] == "/run/secrets/tls_ca.crt"
    assert _secret_files(services["sentinel-1"]) == {
        "ha_sentinel_password",
        "redis_sentinel_password",
    }
    assert _secret_files(services["redis-1"]) == {
        "redis_password",
        "ha_redis_password_sha256",
        "redis_sentinel_password_sha256",
    }
    assert all("secrets.env" not in str(svc.get("env_file")) for svc in services.values())


@pytest.mark.parametrize(
    "files",
    [
        ("node-host.yaml",),
        ("node-host.yaml", "node-host.cpu.yaml"),
        ("node-host.yaml", "node-sidecar.yaml"),
    ],
)
def test_node_host_stack_advertises_the_host_address(files: tuple[str, ...]) -> None:
    config = compose_config("node-host.env.example", *files)
    node = config["services"]["node"]
    env = node["environment"]
    assert env["HA_NODE_NAME"] == "sglang-01"
    # Engine traffic between hosts is TLS, verified against the stack's CA.
    assert env["HA_ADVERTISE_ENGINE_URL"] == "https://10.0.0.11:30000"
    assert env["HA_ENGINE_TLS_CA_FILE"] == "/run/secrets/tls_ca.crt"
    assert env["HA_ADVERTISE_API_URL"] == "http://10.0.0.11:8008"
    assert env["HA_SENTINELS"] == "10.0.0.10:26379,10.0.0.11:26379,10.0.0.12:26379"
    # Published on the configured address only, never on every interface.
    assert {p["host_ip"] for p in node["ports"]} == {"10.0.0.11"}
    ports = sorted(p["target"] for p in node["ports"])
    if "node-sidecar.yaml" in files:
        assert env["ENGINE"] == "external"
        assert ports == [8008]  # the user's server publishes the engine port itself
        assert "deploy" not in node
    else:
        assert ports == [8008, 30000]
    assert ("deploy" in node) == (files == ("node-host.yaml",))
    assert config["services"]["sentinel"]["environment"]["REDIS_MASTER_HOST"] == "10.0.0.10"
    # Secrets as files, each service its own (the running hosts' test checks the values).
    own = {"engine_api_key", "ha_redis_password", "ha_sentinel_password", "ha_admin_token"}
    own |= {"tls_ca_crt"}
    # The engine's certificate and key where the engine runs, not beside a user's.
    engine_tls = {"engine_tls_crt", "engine_tls_key"}
    own |= {
        ("node-host.yaml",): {"hf_token"} | engine_tls,
        ("node-host.yaml", "node-host.cpu.yaml"): {"sim_admin_token"} | engine_tls,
        ("node-host.yaml", "node-sidecar.yaml"): set(),
    }[files]
    assert _secret_files(node) == own
    assert env["HA_ENGINE_API_KEY_FILE"] == "/run/secrets/engine_api_key"
    if "node-sidecar.yaml" in files:
        assert env["HA_ENGINE_URL"] == "https://10.0.0.11:30000"
    else:  # the agent reaches its own engine over TLS too: it serves nothing else
        assert env["HA_ENGINE_URL"] == "https://127.0.0.1:30000"
        assert env["ENGINE_SSL_CERTFILE"] == "/run/secrets/engine_tls.crt"
        assert env["ENGINE_SSL_KEYFILE"] == "/run/secrets/engine_tls.key"
    assert _secret_files(config["services"]["sentinel"]) == {
        "ha_sentinel_password",
        "redis_sentinel_password",
    }
    assert all("secrets.env" not in str(svc.get("env_file")) for svc in config["services"].values())


def _secret_files(service: dict[str, Any]) -> set[str]:
    return {s["source"] for s in service.get("secrets", [])}


# -- the hosts ------------------------------------------------------------------------------


def _connects(mh: MultiHost, node: str, addr: str, port: int) -> bool:
    probe = f"import socket; socket.create_connection(({addr!r}, {port}), timeout=2)"
    code, _ = mh.node_container(node).exec_run(["python3", "-c", probe])
    return code == 0


def test_hosts_reach_each_other_only_through_published_ports(hosts: MultiHost) -> None:
    redis = hosts.container(hosts.control, "redis-1")
    redis.reload()
    redis_ip = redis.attrs["NetworkSettings"]["Networks"][hosts.control.network]["IPAddress"]
    assert not _connects(hosts, "sglang-01", redis_ip, 6379), "networks are not isolated"
    assert _connects(hosts, "sglang-01", hosts.control.addr, 6379)
    assert _connects(hosts, "sglang-01", hosts.host_of("sglang-02").addr, 8008)


# The secrets each container of the multi-host stacks may hold (compose/*-host.yaml).
NODE_OWN = {"HA_ENGINE_API_KEY", "HA_REDIS_PASSWORD", "HA_SENTINEL_PASSWORD", "HA_ADMIN_TOKEN"}
HOST_OWN = {
    ("ctl", "redis-1"): {"REDIS_PASSWORD"},
    ("ctl", "sentinel-1"): {"HA_SENTINEL_PASSWORD", "REDIS_SENTINEL_PASSWORD"},
    ("ctl", "gateway"): {
        "HA_ENGINE_API_KEY",
        "HA_CLIENT_KEY",
        "HA_REDIS_PASSWORD",
        "HA_SENTINEL_PASSWORD",
    },
    # The simulator's fault knobs; its engine's TLS key (gpu2's is in the user's engine).
    ("gpu1", "node"): NODE_OWN | {"SIM_ADMIN_TOKEN", "GPU1_ENGINE_TLS_KEY"},
    ("gpu1", "sentinel"): {"HA_SENTINEL_PASSWORD", "REDIS_SENTINEL_PASSWORD"},
    ("gpu1", "redis-replica"): {"REDIS_PASSWORD"},
    ("gpu2", "node"): NODE_OWN,  # sidecar: the agent only
    ("gpu2", "sentinel"): {"HA_SENTINEL_PASSWORD", "REDIS_SENTINEL_PASSWORD"},
}


def test_each_host_container_holds_only_its_own_secrets_as_files(hosts: MultiHost) -> None:
    values = distinct_secret_values(hosts.secrets)
    for key in ("gpu1", "gpu2"):
        pem = (hosts.tls / key / "engine_tls.key").read_text()
        values[f"{key.upper()}_ENGINE_TLS_KEY"] = pem.splitlines()[1]  # a line of the key
    for (key, service), own in HOST_OWN.items():
        held, leaked = secrets_held(hosts.container(hosts.hosts[key], service), values)
        assert held == own, (key, service, sorted(held))
        assert not leaked, (key, service, leaked)


def test_an_engine_on_its_host_answers_only_with_the_engine_key(hosts: MultiHost) -> None:
    """Published on the host's address for the gateway and the agents: the key, not
    the network, is what keeps others out (SGLang's --api-key; the simulator here)."""
    url = f"{hosts.engine_url('sglang-01')}/get_server_info"
    with hosts.engine_client() as engine:
        assert engine.get(url).status_code == 401
        key = {"Authorization": f"Bearer {hosts.secrets['HA_ENGINE_API_KEY']}"}
        assert engine.get(url, headers=key).status_code == 200


def test_gateway_learns_every_node_from_the_registry(hosts: MultiHost) -> None:
    gateway = hosts.container(hosts.control, "gateway")
    assert "HA_NODES=" in gateway.attrs["Config"]["Env"]
    relay = hosts.relay_status()
    assert relay is not None
    seen = {n["name"]: (n["engine_url"], n["agent_url"]) for n in relay["nodes"]}
    assert seen == {n: (hosts.engine_url(n), hosts.agent_url(n)) for n in hosts.nodes}
    # Each agent registered its advertised URLs, its epoch view and a TTL.
    redis = hosts.container(hosts.control, "redis-1")
    auth = {"REDISCLI_AUTH": hosts.secrets["REDIS_PASSWORD"]}
    for node in hosts.nodes:
        key = f"sglang-ha:sglang-ha:member:{node}"
        _, raw = redis.exec_run(["redis-cli", "GET", key], environment=auth)
        member = json.loads(raw)
        assert member["engine_url"] == hosts.engine_url(node)
        assert member["api_url"] == hosts.agent_url(node)
        assert "epoch" in member
        _, ttl = redis.exec_run(["redis-cli", "PTTL", key], environment=auth)
        assert 0 < int(ttl) <= 10_000
    # Nginx's last resort, if the relay itself is down, is plain HTTP: the engines
    # serve TLS only, so each is named there and left out (docs/security.md).
    backup = hosts.gateway_file("/run/sglang-ha/nginx-backup-servers.conf")
    assert not [line for line in backup.splitlines() if line.startswith("server")]
    for node in hosts.nodes:
        assert f"# {node}: {hosts.engine_url(node)} serves TLS" in backup


def test_cli_on_a_node_host_sees_the_whole_cluster(hosts: MultiHost) -> None:
    code, out = hosts.node_container("sglang-02").exec_run(["sglang-ha", "status", "--json"])
    assert code == 0, out
    view = json.loads(out)
    assert view["store_error"] is None
    assert view["leader"] == hosts.wait_stable()
    assert {n["name"]: n["api_url"] for n in view["nodes"]} == {
        n: hosts.agent_url(n) for n in hosts.nodes
    }
    assert all(n["status"]["engine"]["state"] == "healthy" for n in view["nodes"])


def test_chat_completion_through_the_gateway(hosts: MultiHost) -> None:
    primary = hosts.wait_stable()
    # Published on the host's address: the gateway requires a client key.
    assert httpx.get(hosts.gateway_url + "/v1/models", timeout=10).status_code == 401
    client = openai.OpenAI(base_url=hosts.gateway_url + "/v1", api_key=client_key(), max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="default", messages=[{"role": "user", "content": "Hello"}], max_tokens=16
    )
    assert raw.headers["x-sglang-ha-node"] == primary
    assert raw.parse().choices[0].message.content


def test_engine_traffic_between_hosts_is_tls_with_no_key_in_clear(hosts: MultiHost) -> None:
    """A capture on the host network, where the gateway's connections to the engines'
    published ports cross it, while requests (plain and streamed) go through the
    gateway: TLS records only, the engine key nowhere. (The same recording over plain
    HTTP shows the key: tests/unit/test_engine_tls.py, the negative control.)"""
    primary = hosts.wait_stable()
    engines = {hosts.host_of(n).addr for n in hosts.nodes}
    key = hosts.secrets["HA_ENGINE_API_KEY"].encode()
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 16,
    }

    def handshakes_and_data(cap: Capture) -> bool:
        kinds = set().union(*(tls_records(b) for b in cap.stream_bytes()))
        return {22, 23} <= kinds

    with Capture(hosts.bridge(hosts.control), engines, ENGINE_PORT) as cap:
        with httpx.Client(
            base_url=hosts.gateway_url,
            timeout=30,
            headers={"Authorization": f"Bearer {client_key()}"},
        ) as client:
            for stream in (False, True, False, True):
                r = client.post("/v1/chat/completions", json={**body, "stream": stream})
                assert r.status_code == 200, r.text
        assert cap.wait_for(handshakes_and_data, 10), "no TLS seen toward the engines"
    flows = cap.stream_bytes()
    assert hosts.host_of(primary).addr in {f[2] for f in cap.flows}  # toward its engine
    assert sum(len(b) for b in flows) > 2000
    for data in flows:
        assert key not in data, "the engine key crossed the host network in clear"
        assert b"HTTP/1.1" not in data and b"POST /" not in data, "plain HTTP seen"


# -- failover across hosts ----------------------------------------------------------------------


def _run(
    hosts: MultiHost, fault: Fault, before_retry: Callable[[], object] = lambda: None
) -> ScenarioResult:
    """The scenario, once more if it missed only its recovery time; `before_retry`
    sets the stage again (the primary has moved)."""

    async def scenario(trial: int) -> ScenarioResult:
        if trial > 1:
            before_retry()
        load = Load(hosts.gateway_url, concurrency=8, api_key=client_key())
        try:
            await load.take_references()
            # The runner drives tests.support.stack.Stack; MultiHost offers the same calls.
            return await run_scenario(cast(Stack, hosts), fault, trial=trial, load=load)
        finally:
            await load.close()

    return trial_with_one_retry(lambda trial: asyncio.run(scenario(trial)))


def _assert_clean_failover(hosts: MultiHost, result: ScenarioResult) -> str:
    summary = assert_clean_failover(result)
    old, new = result.primary_before, result.primary_after
    print(  # shown with `pytest -rP`: the numbers docs/multi-host.md quotes
        f"{result.fault}: {old} -> {new}, detected {result.detected:.2f}s,"
        f" promoted {result.promoted:.2f}s, recovered {result.recovered:.2f}s,"
        f" {result.requests} requests, {result.nonstream_failed + result.stream_failed} failed,"
        f" {result.migrations} streams migrated, p99 during fault {result.p99_during_fault:.2f}s"
    )
    ha_log = "".join(hosts.ha_log(n) for n in hosts.nodes)
    assert f"FAILOVER_INITIATED from {old} to {new}" in ha_log, summary
    # Whole again: the healed host's agent is back on the store, not only serving.
    hosts.wait_stable(30)
    return summary


def on_hosts(act: Callable[[MultiHost, str], None]) -> Action:
    """A fault action on the multi-host stacks (the runner hands them over as a Stack)."""
    return lambda s, n: act(cast(MultiHost, s), n)


HOST_FAULTS = by_name(
    Fault(
        "host-kill",
        "every container of the primary's host killed at once (the server dies)",
        on_hosts(MultiHost.kill_host),
        on_hosts(MultiHost.start_host),
    ),
    Fault(
        "host-nic-down",
        "eth0 down in every network namespace of the primary's host",
        on_hosts(lambda h, n: h.host_nic(n, "down")),
        on_hosts(lambda h, n: h.host_nic(n, "up")),
    ),
)


@pytest.mark.parametrize("fault_name", list(HOST_FAULTS))
def test_failover_across_hosts(hosts: MultiHost, fault_name: str) -> None:
    """Run in a row, the two faults hit both hosts: each moves the primary over."""
    result = _run(hosts, HOST_FAULTS[fault_name])
    _assert_clean_failover(hosts, result)


SIDECAR_FAULTS = by_name(
    Fault(
        "sidecar-engine-oom",
        "the user's engine container dies of OOM (CUDA OOM line, SIGKILL, exit 137);"
        " Docker restarts it",
        sim_knobs(oom=True),
        heals_itself,
    ),
    Fault(
        "sidecar-engine-kill",
        "docker kill of the user's engine container (the agent beside it stays up)",
        on_hosts(MultiHost.kill_engine_container),
        on_hosts(MultiHost.start_engine_container),
    ),
)


@pytest.mark.parametrize("fault_name", list(SIDECAR_FAULTS))
def test_sidecar_tells_oom_from_crash(hosts: MultiHost, fault_name: str) -> None:
    trial_log_from = 0  # where the last trial's lines begin in the node's HA log

    def stage() -> None:
        nonlocal trial_log_from
        hosts.wait_stable(30)
        hosts.switchover("sglang-02")  # the sidecar node: its engine is the one to fail
        trial_log_from = len(hosts.ha_log("sglang-02"))  # the log only grows

    stage()
    result = _run(hosts, SIDECAR_FAULTS[fault_name], stage)
    summary = _assert_clean_failover(hosts, result)
    assert result.primary_before == "sglang-02", summary
    log = hosts.ha_log("sglang-02")[trial_log_from:]
    if fault_name == "sidecar-engine-oom":
        assert log.count("ENGINE_OOM sglang-02") == 1, log
        engine = hosts.client.containers.get(hosts.host_of("sglang-02").engine or "")
        assert engine.attrs["RestartCount"] >= 1  # Docker brought it back, not the test
    else:
        assert "ENGINE_OOM" not in log, log
        assert "terminated by SIGKILL (exit status 137)" in log, log


# -- growing the cluster ----------------------------------------------------------------------


def test_a_third_node_joins_by_starting_it(hosts: MultiHost) -> None:
    gpu3 = hosts.add_network("gpu3")
    hosts.start_node(gpu3, "sglang-03")
    try:
        hosts.wait_stable(60)  # now with sglang-03 healthy and servable in the relay
        relay = hosts.relay_status() or {}
        urls = {n["name"]: n["engine_url"] for n in relay.get("nodes", [])}
        assert urls.get("sglang-03") == f"https://{gpu3.addr}:30000"
        # Nginx's last resort is plain HTTP: it learns the node, and leaves it out.
        deadline = time.monotonic() + 15
        while f"# sglang-03: https://{gpu3.addr}:30000 serves TLS" not in hosts.gateway_file(
            "/run/sglang-ha/nginx-backup-servers.conf"
        ):
            assert time.monotonic() < deadline, "Nginx's last resort never learned sglang-03"
            time.sleep(0.5)
        hosts.switchover("sglang-03")
        reply = httpx.post(
            hosts.gateway_url + "/v1/chat/completions",
            json={"model": "default", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {client_key()}"},
            timeout=30,
        )
        assert reply.status_code == 200, reply.text
        assert reply.headers["x-sglang-ha-node"] == "sglang-03"
    finally:
        hosts.stop_host(gpu3)  # a stopping primary hands its lease over
        gpu3.node = None
    primary = hosts.wait_stable(30)
    assert primary in ("sglang-01", "sglang-02")


# -- the sidecar's watches on their own -----------------------------------------------------------


def test_docker_answers_are_read_right() -> None:
    assert docker_time("0001-01-01T00:00:00Z") == 0.0
    assert docker_time("2024-05-01T10:00:00.123456789Z") == pytest.approx(1714557600.123456789)
    assert docker_time("2024-05-01T12:00:00+02:00") == 1714557600.0
    framed = b"\x02\x00\x00\x00\x00\x00\x00\x05oops\n\x01\x00\x00\x00\x00\x00\x00\x03ok\n"
    assert demux(framed, tty=False) == "oops\nok\n"
    assert exit_how(137, False) == "terminated by SIGKILL (exit status 137)"
    assert exit_how(137, True) == "killed by the kernel OOM killer (exit status 137)"
    assert exit_how(1, False, "") == "exit status 1"


def _container(client: docker.DockerClient, script: str, **extra: Any) -> Any:
    return client.containers.run(
        "debian:bookworm-slim",
        ["sh", "-c", script],
        name=f"sglang-ha-watch-{os.getpid()}-{time.monotonic_ns() % 10**9}",
        labels={LABEL: "watch"},
        detach=True,
        **extra,
    )


async def _read_until(watch: Any, done: Any, timeout: float = 30.0) -> ProcessState:
    deadline = time.monotonic() + timeout
    while True:
        state = await watch.read(timeout=5)
        if done(state):
            return cast(ProcessState, state)
        assert time.monotonic() < deadline, f"still {state}"
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("death", ["cgroup-oom", "docker-kill"])
def test_container_watch_tells_an_oom_kill_from_a_kill(death: str) -> None:
    client = docker.from_env()
    if death == "cgroup-oom":  # wants 256 MiB in a 48 MiB container
        script = "sleep 1; v=$(head -c 268435456 /dev/zero | tr '\\0' x); sleep 60"
        c = _container(client, script, mem_limit="48m", memswap_limit="48m")
    else:
        c = _container(client, "sleep 60", init=True)

    async def watch() -> tuple[ProcessState, ProcessState]:
        w = ContainerWatch(c.name)
        try:
            running = await _read_until(w, lambda s: s.running)
            if death == "docker-kill":
                c.kill()
            return running, await _read_until(w, lambda s: not s.running)
        finally:
            await w.close()

    try:
        running, dead = asyncio.run(watch())
    finally:
        c.remove(force=True)
    assert running.pid > 0
    assert dead.state == "EXITED"
    if death == "cgroup-oom":
        assert dead.oom and "OOM killer" in dead.exit_how, dead
    else:
        assert not dead.oom and dead.exit_how == "terminated by SIGKILL (exit status 137)", dead


def test_container_watch_sees_a_death_that_docker_already_restarted() -> None:
    """Docker restarts at once; between two reads the death must still count, with how."""
    client = docker.from_env()
    script = "sleep 1; echo 'torch.OutOfMemoryError: CUDA out of memory.' >&2; kill -9 $$; sleep 60"
    c = _container(client, script, init=True, restart_policy={"Name": "on-failure"})

    async def watch() -> ProcessState:
        w = ContainerWatch(c.name)
        try:
            await _read_until(w, lambda s: s.running)
            # Look away until Docker has restarted it, then look again.
            deadline = time.monotonic() + 30
            while True:
                c.reload()
                if c.attrs["RestartCount"] >= 1 and c.attrs["State"]["Status"] == "running":
                    break
                assert time.monotonic() < deadline, c.attrs["State"]
                await asyncio.sleep(0.1)
            return await w.read(timeout=5)
        finally:
            await w.close()

    try:
        seen = asyncio.run(watch())
    finally:
        c.remove(force=True)
    assert not seen.running, seen
    assert seen.oom, seen
    assert seen.exit_how == "terminated by SIGKILL (exit status 137); restarted by Docker", seen


def test_host_process_watch_follows_the_engine_by_its_command_line() -> None:
    tag = f"fake-sglang-engine-{os.getpid()}"
    with tempfile.NamedTemporaryFile("w", suffix=".log") as log:
        log.write("an earlier run: CUDA out of memory\n")
        log.flush()
        watch = HostProcessWatch(pattern=tag, log_file=log.name)

        def read() -> ProcessState:
            return asyncio.run(watch.read(timeout=5))

        def spawn() -> subprocess.Popen[bytes]:
            return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", tag])

        assert read().state == "STARTING"  # not up yet: not dead either
        engine = spawn()
        try:
            deadline = time.monotonic() + 10
            while (state := read()).pid != engine.pid:
                assert time.monotonic() < deadline, state
                time.sleep(0.05)
            assert state.running
            engine.send_signal(signal.SIGSTOP)
            deadline = time.monotonic() + 10
            while (state := read()).state != "STOPPED":
                assert time.monotonic() < deadline, state
                time.sleep(0.05)
            engine.send_signal(signal.SIGCONT)
            log.write("torch.OutOfMemoryError: CUDA out of memory\n")
            log.flush()
            engine.kill()
            engine.wait(10)
            gone = read()
            assert (gone.state, gone.oom) == ("EXITED", True), gone
            # A new run with no OOM line of its own is not an OOM when it dies.
            engine = spawn()
            deadline = time.monotonic() + 10
            while not read().running:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            engine.kill()
            engine.wait(10)
            gone = read()
            assert (gone.state, gone.oom) == ("EXITED", False), gone
        finally:
            engine.kill()
            engine.wait(10)
