"""The real CPU stack in containers, driven from tests: bring-up, faults, observation.

Brought up with testcontainers' DockerCompose under a unique project name and the
test overlay (gateway on a random loopback port). Faults are the real thing:
SIGKILL/SIGSTOP of the engine process, `docker kill`, `docker pause`, the node's
eth0 taken down inside its network namespace, and the simulator's gray-failure
knobs (hang with /health still 200, HTTP 500s).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker
from docker.models.containers import Container
from testcontainers.compose import DockerCompose

from tests.support.cluster_view import ClusterView, set_link

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
# The default pair's nodes (name -> compose service); a pool stack has its own.
NODES = {"sglang-01": "node-1", "sglang-02": "node-2"}


def node_services(count: int) -> dict[str, str]:
    """The names and services scripts/stack-nodes.sh gives `count` nodes."""
    return {f"sglang-{i:02d}": f"node-{i}" for i in range(1, count + 1)}


def read_secrets() -> dict[str, str]:
    path = COMPOSE_DIR / "secrets.env"
    key_file = COMPOSE_DIR / "secrets" / "engine_api_key"
    # Always: it keeps what exists, and completes an older layout (one file per
    # service's secret, separate Sentinel and simulator values).
    subprocess.run([str(ROOT / "scripts" / "secrets.sh")], check=True)
    out = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    # A compose secret file, not environment; checked like the others (test_hardening).
    out["HA_ENGINE_API_KEY"] = key_file.read_text().strip()
    return out


@dataclass
class Stack(ClusterView):
    project: str
    compose: DockerCompose
    client: docker.DockerClient = field(default_factory=docker.from_env)
    secrets: dict[str, str] = field(default_factory=read_secrets)
    services: dict[str, str] = field(default_factory=lambda: dict(NODES))  # node -> service
    mode: str = "pair"

    # -- containers and addresses ------------------------------------------------------

    def container(self, service: str) -> Container:
        found = self.client.containers.list(
            all=True,
            filters={
                "label": [
                    f"com.docker.compose.project={self.project}",
                    f"com.docker.compose.service={service}",
                ]
            },
        )
        if not found:
            raise LookupError(f"no container for service {service}")
        return found[0]

    def ip(self, service: str) -> str:
        c = self.container(service)
        c.reload()
        networks = c.attrs["NetworkSettings"]["Networks"]
        return str(next(iter(networks.values()))["IPAddress"])

    @property
    def engine_auth(self) -> dict[str, str]:
        """What the agents and relay present to an engine (SGLang --api-key)."""
        return {"Authorization": f"Bearer {self.secrets['HA_ENGINE_API_KEY']}"}

    @property
    def gateway_url(self) -> str:
        c = self.container("gateway")
        c.reload()
        binding = c.attrs["NetworkSettings"]["Ports"]["8000/tcp"][0]
        return f"http://127.0.0.1:{binding['HostPort']}"

    def engine_url(self, node: str) -> str:
        return f"http://{self.ip(self.services[node])}:30000"

    def agent_url(self, node: str) -> str:
        return f"http://{self.ip(self.services[node])}:8008"

    @property
    def nodes(self) -> list[str]:
        return list(self.services)

    # -- observing (agents, relay, primary, wait_stable: ClusterView) ---------------------

    def ha_log(self, service: str) -> str:
        code, out = self.container(service).exec_run(["cat", "/var/log/sglang/ha.log"])
        return out.decode(errors="replace") if code == 0 else ""

    def access_log(self) -> str:
        code, out = self.container("gateway").exec_run(["cat", "/var/log/sglang/access.log"])
        return out.decode(errors="replace") if code == 0 else ""

    def logs(self, service: str) -> str:
        return self.container(service).logs().decode(errors="replace")

    # -- faults -------------------------------------------------------------------------

    def _engine_pid(self, node: str) -> int:
        code, out = self.container(self.services[node]).exec_run(
            ["supervisorctl", "-c", "/etc/sglang-ha/supervisord.conf", "pid", "engine"]
        )
        pid = int(out.decode().strip() or 0)
        if code != 0 or pid <= 0:
            raise RuntimeError(f"engine of {node} has no pid: {out!r}")
        return pid

    def signal_engine(self, node: str, sig: str) -> None:
        pid = self._engine_pid(node)
        code, out = self.container(self.services[node]).exec_run(["kill", f"-{sig}", str(pid)])
        if code != 0:
            raise RuntimeError(f"kill -{sig} {pid} failed: {out!r}")

    def kill_container(self, node: str) -> None:
        self.container(self.services[node]).kill()

    def start_container(self, node: str) -> None:
        c = self.container(self.services[node])
        c.reload()
        if c.status != "running":
            with contextlib.suppress(docker.errors.APIError):
                c.start()

    def pause(self, node: str) -> None:
        self.container(self.services[node]).pause()

    def unpause(self, node: str) -> None:
        c = self.container(self.services[node])
        c.reload()
        if c.status == "paused":
            c.unpause()

    def nic(self, node: str, state: str) -> None:
        """`ip link set eth0 down|up` inside the node's network namespace."""
        c = self.container(self.services[node])
        c.reload()
        gateway = next(iter(c.attrs["NetworkSettings"]["Networks"].values()))["Gateway"]
        set_link(c.attrs["State"]["Pid"], state, gateway)

    def bug_lines(self) -> list[str]:
        lines = []
        for service in (*self.services.values(), "gateway"):
            with contextlib.suppress(LookupError):
                lines += [
                    f"{service}: {line}"
                    for line in self.logs(service).splitlines()
                    if "BUG" in line or "Error handling request" in line
                ]
        return lines


def require_host_tools() -> None:
    missing = [t for t in ("nsenter",) if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"missing host tools for fault injection: {missing}")


@contextlib.contextmanager
def running_stack(
    files: tuple[str, ...] = ("compose.yaml", "compose.test.yaml"),
    *,
    prefix: str = "sglang-ha-test",
    env: dict[str, str] | None = None,
    profiles: list[str] | None = None,
    services: list[str] | None = None,
    mode: str = "pair",
    nodes: int = 2,
) -> Iterator[Stack]:
    """Bring the stack up (building images), yield it, always take it down.

    `env` is set for compose while the stack lives; `profiles` and `services` pick
    what starts; `mode` and `nodes` are `make up`'s MODE and NODES (an override from
    scripts/stack-nodes.sh, named after the project). Teardown removes every container
    of the project, whatever started it.
    """
    project = f"{prefix}-{uuid.uuid4().hex[:8]}"
    read_secrets()
    generated: list[Path] = []
    if (mode, nodes) != ("pair", 2):
        subprocess.run(
            [str(ROOT / "scripts" / "stack-nodes.sh"), mode, str(nodes), files[0], project],
            check=True,
            capture_output=True,
            timeout=30,
        )
        generated = [
            COMPOSE_DIR / f"{project}.generated.yaml",
            COMPOSE_DIR / f"{project}.prometheus.generated.yml",
        ]
        files = (*files, generated[0].name)
    env = {"COMPOSE_PROJECT_NAME": project, **(env or {})}
    previous = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    compose = DockerCompose(
        str(COMPOSE_DIR),
        compose_file_name=list(files),
        build=True,
        wait=True,
        profiles=profiles,
        services=services,
    )
    stack = Stack(project, compose, services=node_services(nodes), mode=mode)
    try:
        compose.start()
        stack.wait_stable()
        yield stack
    finally:
        try:
            for node in stack.nodes:  # leave nothing frozen or cut off for `down`
                with contextlib.suppress(Exception):
                    stack.unpause(node)
                with contextlib.suppress(Exception):
                    stack.nic(node, "up")
            # All services of the project, not only those started by name.
            down = [*compose.compose_command_property, "down", "--volumes", "--remove-orphans"]
            subprocess.run(down, cwd=COMPOSE_DIR, capture_output=True, timeout=180, check=False)
            label = f"com.docker.compose.project={project}"
            for container in stack.client.containers.list(all=True, filters={"label": label}):
                with contextlib.suppress(docker.errors.APIError):
                    container.remove(force=True)
        finally:
            for path in generated:
                path.unlink(missing_ok=True)
            for key, value in previous.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@contextlib.contextmanager
def overlay_stack(overlay: Path, prefix: str, mode: str = "pair") -> Iterator[Stack]:
    """The test stack with one more compose file over it, for a module's own settings."""
    require_host_tools()
    files = ("compose.yaml", "compose.test.yaml", str(overlay))
    with running_stack(files, prefix=prefix, mode=mode) as s:
        yield s
