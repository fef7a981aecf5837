"""The benchmark's container stacks: ours (with the "Nginx only" path) and the baselines.

Compose is driven with plain `docker compose` calls under unique project names, and
every stack is taken down (`down -v`) however the benchmark ends. Fault injection
and observation reuse the failover harness's `Stack` (tests/support/stack.py): the
baseline engines are services `node-1` / `node-2` like the nodes, so the same
faults apply unchanged.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from testcontainers.compose import DockerCompose

from bench.cpu import container_cpu_file
from bench.credentials import engine_authorization, engine_headers
from ha_agent.gateway.edge.nginx_conf import render_template
from tests.failover.load import PROMPTS
from tests.support.stack import COMPOSE_DIR, NODES, ROOT, Stack, read_secrets

OUR_FILES = ("compose.yaml", "compose.test.yaml", "bench.yaml")
BASELINE_FILES = ("bench-baselines.yaml",)
BASELINE_FRONTENDS = ("nginx-article", "router-default", "router-hc1s")
FRONTEND_PORT = 8000


@dataclass
class Compose:
    project: str
    files: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    profiles: tuple[str, ...] = ()

    def run(self, *args: str, timeout: float = 600, check: bool = True) -> str:
        cmd = ["docker", "compose", "-p", self.project]
        for f in self.files:
            cmd += ["-f", str(COMPOSE_DIR / f)]
        for p in self.profiles:
            cmd += ["--profile", p]
        proc = subprocess.run(
            [*cmd, *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd[3:])} {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
            )
        return proc.stdout

    def down(self) -> None:
        self.run("down", "-v", "--remove-orphans", "--timeout", "5", timeout=180, check=False)


def _stack(compose: Compose) -> Stack:
    # Stack only needs the project name to find containers; the DockerCompose
    # object is never started (compose is driven by Compose above).
    return Stack(compose.project, DockerCompose(str(COMPOSE_DIR)))


def build_images() -> None:
    """Build every image the benchmark runs (cached layers make this quick)."""
    read_secrets()
    Compose("sglang-ha-bench-build", OUR_FILES).run("build", timeout=1200)
    Compose("sglang-ha-bench-build", BASELINE_FILES, env={"BENCH_SUBNET": "10.213.0"}).run(
        "build", timeout=1200
    )


# -- our stack ------------------------------------------------------------------------


def direct_nginx_conf(
    template: str, engine: str, authorization: str, workers: int = 1, listen: str = ""
) -> str:
    """The gateway's own Nginx configuration with the relay swapped for `engine`
    (host:port): the "Nginx only" path differs from ours by the relay alone. It
    presents the engines' key (`authorization`) as the gateway's Nginx does on its
    last-resort path. `listen`: the public port's address, where not the default."""
    env = {"ENGINE_AUTHORIZATION": authorization}
    if listen:
        env["GATEWAY_PORT"] = listen
    text = render_template(template, env)
    # With a keep-alive cache to the engine, as any Nginx in front of SGLang has (the
    # gateway keeps none to its relay workers, so that none is used on a frozen one).
    text, relay = re.subn(
        r"^\s*include /run/sglang-ha/nginx-relay-servers\.conf;$",
        f"        server {engine} max_fails=1 fail_timeout=2s;\n        keepalive 256;",
        text,
        flags=re.M,
    )
    text, include = re.subn(
        r"^\s*include /run/sglang-ha/nginx-backup-servers\.conf;\n", "", text, flags=re.M
    )
    # No client keys on the baseline (the gateway's own are off on loopback too).
    text, keys = re.subn(
        r"^\s*include /run/sglang-ha/nginx-client-keys\.conf;$",
        '        default "-";',
        text,
        flags=re.M,
    )
    # One worker for "Nginx alone" in the capacity table, and a second copy at the
    # stack gateway's own Nginx worker count (bench/capacity.py).
    text, found = re.subn(
        r"^worker_processes \S+;", f"worker_processes {workers};", text, flags=re.M
    )
    # The main upstream and the relay-only one (/abort_request).
    if relay != 2 or include != 1 or found != 1 or keys != 1:
        raise ValueError(
            "the gateway's Nginx template changed: update bench.stacks.direct_nginx_conf"
        )
    return text


GATEWAY_UID = 1000  # the gateway image's user (images/gateway/Dockerfile)


def _write_for_gateway_user(path: Path, text: str) -> None:
    """It holds the engines' key: readable by the gateway image's user only, as the
    gateway's own rendered config is (ha_agent/gateway/edge/nginx_conf.py)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chown(path, GATEWAY_UID, GATEWAY_UID)


@dataclass
class OurStack:
    stack: Stack
    compose: Compose
    primary: str  # node name (sglang-01 / sglang-02)
    nginx_workers: int  # the stack gateway's own Nginx's (gateway_nginx_workers)

    def urls(self) -> dict[str, str]:
        """Every path by container address (no docker-proxy in the way)."""
        s = self.stack
        return {
            "direct": f"http://{s.ip(NODES[self.primary])}:30000",
            "nginx": f"http://{s.ip('nginx-direct')}:{FRONTEND_PORT}",
            "relay": f"http://{s.ip('gateway')}:{FRONTEND_PORT}",
        }

    def capacity_urls(self) -> dict[str, str]:
        """The capacity benchmark's paths (bench/capacity.py)."""
        s, urls = self.stack, self.urls()
        paths = {
            "direct": urls["direct"],
            "nginx": urls["nginx"],
            "router": f"http://{s.ip('router-direct')}:{FRONTEND_PORT}",
            "gateway-1w": f"http://{s.ip('gateway-1w')}:{FRONTEND_PORT}",
            "gateway": urls["relay"],
        }
        if self.nginx_workers > 1:
            paths["nginx-nw"] = f"http://{s.ip('nginx-direct-nw')}:{FRONTEND_PORT}"
        return paths

    def relay_workers(self) -> int:
        """Relay workers in the stack's gateway (what its entrypoint resolved)."""
        out = self.stack.container("gateway").exec_run(
            ["supervisorctl", "-c", "/etc/sglang-ha/supervisord.conf", "status"]
        )
        return sum(line.startswith("relay:") for line in out.output.decode().splitlines())

    def cpu_files(self) -> dict[str, str]:
        """Where the kernel counts each part's CPU time (see bench.cpu)."""
        standby = next(n for n in NODES if n != self.primary)
        parts = {
            "primary node": NODES[self.primary],
            "standby node": NODES[standby],
            "gateway (Nginx + relay)": "gateway",
            "nginx-direct": "nginx-direct",
            "router-direct": "router-direct",
            "gateway-1w": "gateway-1w",
        }
        if self.nginx_workers > 1:
            parts["nginx-direct-nw"] = "nginx-direct-nw"
        out = {}
        for name, service in parts.items():
            path = container_cpu_file(self.stack.container(service).id)
            if path:
                out[name] = path
        return out


def gateway_nginx_workers(stack: Stack) -> int:
    """The worker count of the stack gateway's own Nginx, from its rendered config."""
    out = stack.container("gateway").exec_run(["cat", "/run/sglang-ha/nginx.conf"])
    found = re.search(r"^worker_processes (\d+);", out.output.decode(), flags=re.M)
    if out.exit_code != 0 or not found:
        raise RuntimeError(f"no worker_processes in the gateway's Nginx config: {out.output!r}")
    return int(found.group(1))


@contextlib.contextmanager
def our_stack() -> Iterator[OurStack]:
    """The CPU stack (nodes, Redis, Sentinels, gateway) plus nginx-direct."""
    read_secrets()
    with tempfile.TemporaryDirectory(prefix="sglang-ha-bench-") as tmp:
        os.chmod(tmp, 0o755)  # read by the gateway image's non-root user
        compose = Compose(
            f"sglang-ha-bench-{uuid.uuid4().hex[:8]}",
            OUR_FILES,
            env={"BENCH_NGINX_DIR": tmp},
            profiles=("bench-direct",),
        )
        try:
            compose.run(
                "up", "-d", "--wait", "--wait-timeout", "300", *_our_services(), timeout=420
            )
            stack = _stack(compose)
            primary = stack.wait_stable(120.0)
            template = (ROOT / "nginx" / "nginx.conf.template").read_text()
            engine, key = f"{NODES[primary]}:30000", engine_authorization()
            _write_for_gateway_user(
                Path(tmp, "nginx.conf"), direct_nginx_conf(template, engine, key)
            )
            nginx_workers = gateway_nginx_workers(stack)
            extra: tuple[str, ...] = ()
            if nginx_workers > 1:
                _write_for_gateway_user(
                    Path(tmp, "nginx-nw.conf"),
                    direct_nginx_conf(template, engine, key, nginx_workers),
                )
                extra = ("nginx-direct-nw",)
            compose.env["BENCH_ENGINE_URL"] = f"http://{stack.ip(NODES[primary])}:30000"
            compose.run(
                "up",
                "-d",
                "--no-deps",
                *("nginx-direct", *extra, "router-direct", "gateway-1w"),
                timeout=180,
            )
            ours = OurStack(stack, compose, primary, nginx_workers)
            _wait_answers(ours.capacity_urls().values(), 90.0)
            yield ours
        finally:
            _release_faults(compose)
            compose.down()


def _our_services() -> list[str]:
    return [
        "redis-1",
        "redis-2",
        "sentinel-1",
        "sentinel-2",
        "sentinel-3",
        "node-1",
        "node-2",
        "gateway",
    ]


# -- the baselines --------------------------------------------------------------------


def pick_subnet(used: Iterable[str], prefix: str = "10.213") -> str:
    """The first `prefix.N` /24 that overlaps none of the `used` networks."""
    taken = [ipaddress.ip_network(u, strict=False) for u in used]
    for n in range(256):
        candidate = ipaddress.ip_network(f"{prefix}.{n}.0/24")
        if not any(candidate.overlaps(t) for t in taken):
            return f"{prefix}.{n}"
    raise RuntimeError(f"no free /24 under {prefix}.0.0/16")


def _used_subnets() -> list[str]:
    ids = subprocess.run(
        ["docker", "network", "ls", "-q"], capture_output=True, text=True, check=True
    ).stdout.split()
    used: list[str] = []
    if ids:
        out = subprocess.run(
            ["docker", "network", "inspect", *ids], capture_output=True, text=True, check=True
        ).stdout
        for net in json.loads(out):
            used += [
                c["Subnet"] for c in (net.get("IPAM") or {}).get("Config") or [] if "Subnet" in c
            ]
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    used += [line.split()[0] for line in routes.splitlines() if "/" in line.split()[0]]
    return used


@dataclass
class Baselines:
    stack: Stack
    compose: Compose

    def url(self, frontend: str) -> str:
        return f"http://{self.stack.ip(frontend)}:{FRONTEND_PORT}"

    def reset(
        self, fault_node: str, timeout: float = 90.0, tries: int = 8
    ) -> dict[str, str | None]:
        """Fresh front-ends and two healthy engines before a trial, so no front-end
        starts it remembering the previous one (Nginx's failed peer, the router's
        circuit breaker or unhealthy mark); returns the engine that carries each
        front-end's traffic.

        SGLang's router at its default (cache-aware) policy pins each prompt prefix
        to one worker, chosen by what its radix trees hold when the prefix first
        comes; which worker that is varies from start to start. A front-end is
        restarted until every prompt of the load goes to `fault_node` (at most
        `tries` times), so that the fault hits the engine that carries its
        traffic, as it hits the article's primary and our primary."""
        self.wait_engines(timeout)
        serving: dict[str, str | None] = {}
        pending = list(BASELINE_FRONTENDS)
        for _ in range(tries):
            self.compose.run("restart", "--timeout", "2", *pending, timeout=120)
            self.wait_frontends(pending, timeout)
            for frontend in pending:
                serving[frontend] = self.serving_engine(frontend)
            pending = [f for f in pending if serving[f] != fault_node]
            if not pending:
                break
        return serving

    def wait_engines(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if all(_answers(f"{self.stack.engine_url(n)}/health") for n in NODES):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"baseline engines not healthy after {timeout}s")
            time.sleep(0.2)

    def wait_frontends(self, frontends: Iterable[str], timeout: float) -> None:
        """Each front-end ready to route: the router's own health check passes before
        it has checked its workers, and until then it answers 503 "No available
        workers" (seen: the first request of a run, right after `up --wait`)."""
        deadline = time.monotonic() + timeout
        for frontend in frontends:
            while not self._ready(frontend):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{frontend} not ready after {timeout}s")
                time.sleep(0.2)

    def serving_engine(self, frontend: str) -> str | None:
        """The engine that answered every probe through `frontend` (by the engines'
        request counters), or None if they were split or one failed. The probes are
        the failover load's own prompts, streamed and not, one at a time."""
        before = self._served()
        sent = 0
        for i, prompt in enumerate(PROMPTS):
            for stream in (False, True):
                sent += 1
                if not _generates(self.url(frontend), prompt, stream, seed=i):
                    return None
        after = self._served()
        moved = {n: after[n] - before[n] for n in NODES}
        full = [n for n, count in moved.items() if count == sent]
        return full[0] if len(full) == 1 and sum(moved.values()) == sent else None

    def _served(self) -> dict[str, float]:
        out = {}
        for node in NODES:
            text = httpx.get(f"{self.stack.engine_url(node)}/metrics", timeout=2).text
            out[node] = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("sglang:num_requests_total")
            )
        return out

    def _ready(self, frontend: str) -> bool:
        """Answering, without sending a generation (that would pick the router's worker)."""
        try:
            url = self.url(frontend)
            if frontend.startswith("router"):
                workers = httpx.get(f"{url}/workers", timeout=1).json()["workers"]
                return len(workers) == 2 and all(w["is_healthy"] for w in workers)
            return _answers(f"{url}/health")
        except (httpx.HTTPError, ValueError, KeyError, LookupError):
            return False


@contextlib.contextmanager
def baselines() -> Iterator[Baselines]:
    read_secrets()
    subnet = pick_subnet(_used_subnets())
    compose = Compose(
        f"sglang-ha-bench-base-{uuid.uuid4().hex[:8]}", BASELINE_FILES, env={"BENCH_SUBNET": subnet}
    )
    try:
        compose.run("up", "-d", "--wait", "--wait-timeout", "180", timeout=300)
        b = Baselines(_stack(compose), compose)
        b.wait_engines(90.0)
        b.wait_frontends(BASELINE_FRONTENDS, 90.0)
        yield b
    finally:
        _release_faults(compose)
        compose.down()


# -- helpers --------------------------------------------------------------------------


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _generates(base: str, prompt: str = "ping", stream: bool = False, seed: int = 0) -> bool:
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 2,
        "temperature": 0,
        "seed": seed,
        "stream": stream,
    }
    try:
        r = httpx.post(
            f"{base}/v1/chat/completions", json=body, headers=engine_headers(), timeout=5
        )
        return r.status_code == 200 and (not stream or r.text.endswith("data: [DONE]\n\n"))
    except httpx.HTTPError:
        return False


def _wait_answers(urls: Iterable[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for url in urls:
        while not _generates(url):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} does not answer after {timeout}s")
            time.sleep(0.2)


def _release_faults(compose: Compose) -> None:
    """Nothing frozen or cut off is left for `down` (it would hang on a paused container)."""
    stack = _stack(compose)
    for node in NODES:
        with contextlib.suppress(Exception):
            stack.unpause(node)
        with contextlib.suppress(Exception):
            stack.nic(node, "up")
