"""Separate hosts on one machine, running the multi-host stacks (docs/multi-host.md).

Each "host" is its own compose project on its own Docker network, started from the
same files and the same kind of env file a user writes for a real host. The host's
address is its network's gateway IP, and everything it serves is published on that
address only. Docker isolates bridge networks from each other, so a container on
one host reaches another host only as across real machines: through that host's
published ports (a test checks this, so the simulation cannot silently cheat).

Faults hit a whole host, as the article's failures do: every container of the host
killed (the server dies), or every container's eth0 taken down (its NIC fails).

`MultiHost` and tests.support.stack.Stack are both a ClusterView (wait_stable,
agent_status, primary, relay_status, ip), so tests/failover's Load and run_scenario
measure these stacks unchanged.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import httpx
from docker.models.containers import Container

from ha_agent.tls import client_context
from tests.support.cluster_view import ClusterView, set_link
from tests.support.stack import COMPOSE_DIR, ROOT, read_secrets

LABEL = "sglang-ha.multihost"
NODE_IMAGE = "sglang-ha/node:0.1.0-cpu"
ENGINE_PORT, AGENT_PORT = 30000, 8008
CPU_NODE = ("node-host.yaml", "node-host.cpu.yaml")
SIDECAR_NODE = ("node-host.yaml", "node-sidecar.yaml")
COMPOSE_TIMEOUT = 300


@dataclass
class Host:
    key: str  # ctl, gpu1, ...
    project: str
    network: str
    addr: str  # the host's address: its network's gateway IP
    files: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    node: str | None = None  # the HA node it runs, if any
    engine: str | None = None  # sidecar hosts: the user's own engine container

    @property
    def sentinel(self) -> str:
        return f"{self.addr}:26379"


class MultiHost(ClusterView):
    def __init__(self) -> None:
        self.run = uuid.uuid4().hex[:6]
        self.client = docker.from_env()
        self.secrets = read_secrets()
        self.dir = Path(tempfile.mkdtemp(prefix="sglang-ha-multihost-"))
        self.hosts: dict[str, Host] = {}
        self.gateway_port = 0
        # The stacks' TLS material, made as `make secrets` makes it (scripts/tls-certs.sh)
        # but in a test folder: a CA of the run's own, and for each node host an engine
        # certificate naming the host's address (known only once its network exists).
        self.tls = self.dir / "tls"
        _tls_certs(self.tls / "ca")
        self.ca_file = self.tls / "ca" / "tls_ca.crt"

    # -- hosts -----------------------------------------------------------------------------

    def add_network(self, key: str) -> Host:
        """A new host: its own network, its address the network's gateway."""
        name = f"sglang-ha-mh{self.run}-{key}"
        net = self.client.networks.create(name, driver="bridge", labels={LABEL: self.run})
        net.reload()
        addr = net.attrs["IPAM"]["Config"][0]["Gateway"]
        host = Host(key, name, name, addr)
        self.hosts[key] = host
        return host

    def host_of(self, node: str) -> Host:
        return next(h for h in self.hosts.values() if h.node == node)

    @property
    def nodes(self) -> list[str]:
        return sorted(h.node for h in self.hosts.values() if h.node)

    @property
    def control(self) -> Host:
        return self.hosts["ctl"]

    def sentinels(self) -> str:
        """The three quorum hosts: the control host and the first two GPU hosts."""
        return ",".join(self.hosts[k].sentinel for k in ("ctl", "gpu1", "gpu2"))

    def compose(self, host: Host, *args: str, timeout: float = COMPOSE_TIMEOUT) -> str:
        env_file = self.dir / f"{host.key}.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in host.env.items()))
        # Only the test's addition: the host's network exists already (its address
        # had to be known to write the env file).
        overlay = self.dir / f"{host.key}.network.yaml"
        overlay.write_text(f"networks:\n  ha:\n    name: {host.network}\n    external: true\n")
        files = [a for f in host.files for a in ("-f", f)] + ["-f", str(overlay)]
        cmd = ["docker", "compose", "-p", host.project, "--env-file", str(env_file), *files]
        result = subprocess.run(
            [*cmd, *args], cwd=COMPOSE_DIR, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} on {host.key} failed:\n{result.stderr[-4000:]}")
        return result.stdout

    def engine_tls(self, host: Host) -> Path:
        """This host's engine certificate and key (engine_tls.crt, .key), signed by the
        run's CA, for its address: what ENGINE_TLS_SANS=IP:<addr> make secrets gives."""
        folder = self.tls / host.key
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("tls_ca.crt", "tls_ca.key"):
            shutil.copy(self.tls / "ca" / name, folder / name)
        _tls_certs(folder, ENGINE_TLS_SANS=f"IP:{host.addr}")
        return folder

    def tls_env(self, host: Host) -> dict[str, str]:
        """The env file's lines naming the TLS files (compose `secrets:` file paths)."""
        env = {"TLS_CA_FILE": str(self.ca_file)}
        if host.key.startswith("gpu"):
            folder = self.engine_tls(host)
            env |= {
                "ENGINE_TLS_CERT_FILE": str(folder / "engine_tls.crt"),
                "ENGINE_TLS_KEY_FILE": str(folder / "engine_tls.key"),
            }
        return env

    def start_control(self) -> None:
        ctl = self.control
        self.gateway_port = free_port(ctl.addr)
        ctl.files = ("control-host.yaml",)
        ctl.env = self.tls_env(ctl) | {
            "HOST_ADDR": ctl.addr,
            "HA_SENTINELS": self.sentinels(),
            "GATEWAY_BIND": ctl.addr,
            "GATEWAY_PORT": str(self.gateway_port),
            # Plain HTTP at the edge, which these tests reach as clients; edge TLS has
            # its own tests (tests/unit/test_edge_tls.py, tests/integration/test_edge_tls.py).
            "GATEWAY_TLS": "off",
        }
        self.compose(ctl, "build")
        # The gateway turns healthy only once a node serves: wait for Redis alone.
        self.compose(ctl, "up", "-d", "--wait", "--wait-timeout", "60", "redis-1", "sentinel-1")
        self.compose(ctl, "up", "-d")

    def node_env(self, host: Host, node: str, profiles: str) -> dict[str, str]:
        peers = [
            f"http://{h.addr}:{AGENT_PORT}"
            for h in self.hosts.values()
            if h.key.startswith("gpu") and h.key != host.key
        ]
        return self.tls_env(host) | {
            "HA_NODE_NAME": node,
            "HOST_ADDR": host.addr,
            "HA_SENTINELS": self.sentinels(),
            "HA_PEERS": ",".join(peers),
            "REDIS_MASTER_ADDR": self.control.addr,
            "COMPOSE_PROFILES": profiles,
        }

    def start_node(self, host: Host, node: str, profiles: str = "", build: bool = False) -> None:
        """A node host running its own engine (the simulator in the node image)."""
        host.node, host.files = node, CPU_NODE
        host.env = self.node_env(host, node, profiles)
        if build:
            self.compose(host, "build")
        self.compose(host, "up", "-d", "--wait", "--wait-timeout", "120")

    def start_sidecar(self, host: Host, node: str, profiles: str = "") -> None:
        """A GPU host where the user already runs the engine in a container of their
        own; the node image runs beside it (ENGINE=external) and watches it."""
        engine = f"{host.project}-sglang"
        # The user's server serves TLS with SGLang's flags and the host's certificate.
        tls = self.engine_tls(host)
        self.client.containers.run(
            NODE_IMAGE,
            name=engine,
            entrypoint=[
                "sglang-ha-sim",
                "--host",
                "0.0.0.0",
                "--port",
                str(ENGINE_PORT),
                "--ssl-certfile",
                "/tls/engine_tls.crt",
                "--ssl-keyfile",
                "/tls/engine_tls.key",
                "--enable-ssl-refresh",
            ],
            volumes={
                str(tls / name): {"bind": f"/tls/{name}", "mode": "ro"}
                for name in ("engine_tls.crt", "engine_tls.key")
            },
            environment={
                "SIM_ADMIN_TOKEN": self.secrets["SIM_ADMIN_TOKEN"],
                "SIM_INSTANCE_NAME": node,
            },
            network=host.network,
            ports={f"{ENGINE_PORT}/tcp": (host.addr, ENGINE_PORT)},
            init=True,  # so the engine's own SIGKILL (OOM) ends the container: exit 137
            restart_policy={"Name": "unless-stopped"},
            # Compose labels images it builds; the container would inherit them and
            # pass for a container of the project that built the image.
            labels={LABEL: self.run, "com.docker.compose.project": ""},
            detach=True,
        )
        host.node, host.engine, host.files = node, engine, SIDECAR_NODE
        host.env = self.node_env(host, node, profiles) | {
            "ENGINE_PORT": str(ENGINE_PORT),
            "ENGINE_CONTAINER": engine,
            "DOCKER_GID": str(os.stat("/var/run/docker.sock").st_gid),
        }
        self.compose(host, "up", "-d", "--wait", "--wait-timeout", "120")

    def stop_host(self, host: Host) -> None:
        with contextlib.suppress(Exception):
            self.compose(host, "down", "-v", "--remove-orphans", "--timeout", "5", timeout=120)
        if host.engine:
            with contextlib.suppress(docker.errors.NotFound):
                self.client.containers.get(host.engine).remove(force=True)

    def destroy(self) -> None:
        for host in reversed(list(self.hosts.values())):
            if host.files:
                self.stop_host(host)
        for c in self.client.containers.list(all=True, filters={"label": f"{LABEL}={self.run}"}):
            with contextlib.suppress(docker.errors.APIError):
                c.remove(force=True)
        for net in self.client.networks.list(filters={"label": f"{LABEL}={self.run}"}):
            with contextlib.suppress(docker.errors.APIError):
                net.remove()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- containers ------------------------------------------------------------------------

    def containers(self, host: Host) -> list[Container]:
        found = self.client.containers.list(
            all=True,
            filters={
                "label": [
                    f"com.docker.compose.project={host.project}",
                    "com.docker.compose.container-number",  # made by compose, not inherited
                ]
            },
        )
        if host.engine:
            found.append(self.client.containers.get(host.engine))
        return found

    def container(self, host: Host, service: str) -> Container:
        for c in self.containers(host):
            if c.labels.get("com.docker.compose.service") == service:
                return c
        raise LookupError(f"no {service} on {host.key}")

    def node_container(self, node: str) -> Container:
        return self.container(self.host_of(node), "node")

    def ip(self, service: str) -> str:
        """A control-host container's own address (the test machine sees every network)."""
        c = self.container(self.control, service)
        c.reload()
        return str(c.attrs["NetworkSettings"]["Networks"][self.control.network]["IPAddress"])

    # -- what clients and operators see ------------------------------------------------------

    @property
    def gateway_url(self) -> str:
        return f"http://{self.control.addr}:{self.gateway_port}"

    def engine_url(self, node: str) -> str:
        return f"https://{self.host_of(node).addr}:{ENGINE_PORT}"

    def engine_verify(self) -> ssl.SSLContext:
        """The engines are verified as the relay verifies them: the run's CA only."""
        return client_context(str(self.ca_file))

    def engine_client(self) -> httpx.Client:
        return httpx.Client(verify=self.engine_verify(), timeout=5)

    def bridge(self, host: Host) -> str:
        """The host interface of the host's network (Docker names it br-<id>)."""
        net = self.client.networks.get(host.network)
        name = net.attrs.get("Options", {}).get("com.docker.network.bridge.name")
        return str(name or f"br-{net.id[:12]}")

    def agent_url(self, node: str) -> str:
        return f"http://{self.host_of(node).addr}:{AGENT_PORT}"

    # -- observing (agents, relay, primary, wait_stable: ClusterView) -------------------------

    def node_settled(self, status: dict[str, Any]) -> bool:
        """Engine healthy and its agent on the store, not only serving."""
        return status["engine"]["state"] == "healthy" and not status.get("degraded")

    def relay_settled(self, relay: dict[str, Any]) -> bool:
        serving = {n["name"] for n in relay.get("nodes", []) if n["can_serve"]}
        return serving >= set(self.nodes)

    def switchover(self, to: str, timeout: float = 30.0) -> None:
        primary = self.wait_stable()
        if primary == to:
            return
        r = httpx.post(
            f"{self.agent_url(primary)}/ha/switchover",
            json={"to": to},
            headers=self.admin_headers,
            timeout=timeout,
        )
        assert r.status_code == 200, r.text
        assert self.wait_stable(timeout) == to

    def ha_log(self, node: str) -> str:
        code, out = self.node_container(node).exec_run(["cat", "/var/log/sglang/ha.log"])
        return out.decode(errors="replace") if code == 0 else ""

    def gateway_file(self, path: str) -> str:
        code, out = self.container(self.control, "gateway").exec_run(["cat", path])
        return out.decode(errors="replace") if code == 0 else ""

    def bug_lines(self) -> list[str]:
        lines = []
        for host in self.hosts.values():
            for service in ("node", "gateway"):
                with contextlib.suppress(LookupError, docker.errors.APIError):
                    text = self.container(host, service).logs().decode(errors="replace")
                    lines += [f"{host.key}/{service}: {x}" for x in text.splitlines() if "BUG" in x]
        return lines

    # -- faults (on the host that runs `node`) ------------------------------------------------

    def kill_host(self, node: str) -> None:
        """The server dies: every container on it, at once."""
        for c in self.containers(self.host_of(node)):
            c.kill()

    def start_host(self, node: str) -> None:
        host = self.host_of(node)
        ordered = sorted(self.containers(host), key=lambda c: c.name != host.engine)
        for c in ordered:  # the user's engine first, as it would boot
            c.reload()
            if c.status != "running":
                with contextlib.suppress(docker.errors.APIError):
                    c.start()

    def host_nic(self, node: str, state: str) -> None:
        """`ip link set eth0 down|up` in every network namespace of the host."""
        host = self.host_of(node)
        for c in self.containers(host):
            c.reload()
            pid = int(c.attrs["State"]["Pid"] or 0)
            if pid:
                set_link(pid, state, host.addr)

    def kill_engine_container(self, node: str) -> None:
        host = self.host_of(node)
        assert host.engine, f"{node} is not a sidecar node"
        self.client.containers.get(host.engine).kill()

    def start_engine_container(self, node: str) -> None:
        host = self.host_of(node)
        assert host.engine
        c = self.client.containers.get(host.engine)
        c.reload()
        if c.status != "running":
            c.start()


def _tls_certs(folder: Path, **env: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [str(ROOT / "scripts" / "tls-certs.sh"), str(folder)],
        check=True,
        capture_output=True,
        timeout=60,
        env=os.environ | env,
    )


def free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_hosts() -> Iterator[MultiHost]:
    """Control host, a GPU host with its own engine (and the Redis replica), and a
    GPU host in sidecar mode beside a user-run engine container: a Sentinel on each."""
    mh = MultiHost()
    try:
        for key in ("ctl", "gpu1", "gpu2"):
            mh.add_network(key)
        mh.start_control()
        mh.start_node(mh.hosts["gpu1"], "sglang-01", "sentinel,redis-replica", build=True)
        mh.start_sidecar(mh.hosts["gpu2"], "sglang-02", "sentinel")
        mh.wait_stable(90)
        yield mh
    finally:
        mh.destroy()
