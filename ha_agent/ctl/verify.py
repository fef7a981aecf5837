"""`sglang-ha verify`: the pre-production checklist, run against a live stack.

Runs on the Docker host (it needs the Docker API to find the stack's containers and,
with --disruptive, to freeze a node and stop Redis). Each check says what it saw and,
when it fails, what to do. Checks 3 and 5 disturb the stack: they run only with
--disruptive and always restore what they changed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from ha_agent.config import is_loopback
from ha_agent.dcs.base import AgentStatus, Role
from ha_agent.tls import client_context

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "size": {"type": "integer", "minimum": 1, "maximum": 100},
        "colors": {"type": "array", "items": {"enum": ["black", "white", "red"]}, "maxItems": 3},
        "price": {"type": "number", "minimum": 0},
    },
    "required": ["name", "size", "price"],
    "additionalProperties": False,
}
# Where `make secrets` puts the stack's CA, from the repository root.
DEFAULT_CA = Path("compose/secrets/tls_ca.crt")
# A certificate closer to its end than this fails check 8: time to rotate it.
MIN_CERT_DAYS = 30


@dataclass
class Check:
    number: int
    name: str
    status: str  # pass | fail | skipped
    seen: str
    advice: str = ""


class Stack:
    """The stack's containers, found by their compose project label."""

    def __init__(self, project: str, ca: Path = DEFAULT_CA) -> None:
        import docker  # only on the Docker host, only for verify

        self.project = project
        self.docker = docker.from_env()
        self._client_headers: dict[str, str] | None = None
        self.ca = ca
        self._tls: bool | None = None

    def containers(self, prefix: str = "") -> list[Any]:
        found = self.docker.containers.list(
            all=True, filters={"label": f"com.docker.compose.project={self.project}"}
        )
        return sorted(
            (c for c in found if c.labels.get("com.docker.compose.service", "").startswith(prefix)),
            key=lambda c: c.labels["com.docker.compose.service"],
        )

    def service(self, name: str) -> Any:
        for c in self.containers(name):
            if c.labels["com.docker.compose.service"] == name:
                return c
        raise LookupError(f"no service {name} in project {self.project}")

    @staticmethod
    def ip(container: Any) -> str:
        container.reload()
        networks = container.attrs["NetworkSettings"]["Networks"]
        return str(next(iter(networks.values()))["IPAddress"])

    def nodes(self) -> dict[str, Any]:
        """HA node name -> container."""
        out = {}
        for c in self.containers("node-"):
            env = dict(e.split("=", 1) for e in c.attrs["Config"]["Env"] if "=" in e)
            out[env.get("HA_NODE_NAME", c.name)] = c
        return out

    def gateway_binding(self) -> tuple[str, str, int]:
        """(the address it is published on, one to reach it at, the port)."""
        c = self.service("gateway")
        c.reload()
        binding = c.attrs["NetworkSettings"]["Ports"]["8000/tcp"][0]
        bound = binding["HostIp"]
        host = bound if bound not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return bound, host, int(binding["HostPort"])

    def edge_tls(self) -> bool:
        """Whether the gateway's port speaks TLS (any certificate)."""
        if self._tls is None:
            _, host, port = self.gateway_binding()
            self._tls = _speaks_tls(host, port)
        return self._tls

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """How a client here trusts the gateway: the stack's CA, else the system's."""
        return ssl.create_default_context(cafile=str(self.ca)) if self.ca.is_file() else True

    def gateway_url(self) -> str:
        _, host, port = self.gateway_binding()
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.edge_tls() else 'http'}://{host}:{port}"

    def gateway_bind(self) -> str:
        """The host address the gateway's port is published on ("" or 0.0.0.0: all)."""
        c = self.service("gateway")
        c.reload()
        return str(c.attrs["NetworkSettings"]["Ports"]["8000/tcp"][0]["HostIp"])

    def client_headers(self) -> dict[str, str]:
        """A client key of the gateway's, read where the relay reads them, if keys are on
        (every request the checks send through the gateway presents it)."""
        if self._client_headers is None:
            self._client_headers = _client_headers(self.service("gateway"))
        return self._client_headers

    def status(self, node: str) -> AgentStatus | None:
        try:
            r = httpx.get(f"http://{self.ip(self.nodes()[node])}:8008/ha/status", timeout=1)
            return AgentStatus.from_json(r.json()) if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError):
            return None

    def primary(self) -> str | None:
        for node in self.nodes():
            status = self.status(node)
            if status and status.role is Role.PRIMARY:
                return node
        return None

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.2)
        return False

    def stable(self) -> bool:
        statuses = [self.status(n) for n in self.nodes()]
        roles = sorted(s.role for s in statuses if s)
        healthy = all(s and s.engine.healthy for s in statuses)
        return healthy and roles == [Role.PRIMARY] + [Role.STANDBY] * (len(statuses) - 1)


def _degraded(status: AgentStatus | None) -> bool:
    return status is not None and status.degraded


def _chat(
    base: str,
    body: dict[str, Any],
    timeout: float = 60,
    headers: dict[str, str] | None = None,
    verify: ssl.SSLContext | bool = True,
) -> httpx.Response:
    return httpx.post(
        f"{base}/v1/chat/completions", json=body, timeout=timeout, headers=headers, verify=verify
    )


def _speaks_tls(host: str, port: int) -> bool:
    """A TLS handshake with whatever certificate: False where plain HTTP answers."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return True
    except ssl.SSLError:
        return False


def _engine_endpoint(stack: Stack, node: str, container: Any) -> tuple[str, ssl.SSLContext | bool]:
    """How to reach a node's engine from this host, and what verifies it.

    An engine serving TLS (its agent's HA_ENGINE_URL is https: a multi-host node) is
    reached at the URL its agent advertises -- the host address its certificate
    names -- and verified against the CA the node itself trusts
    (HA_ENGINE_TLS_CA_FILE), never without verification. Otherwise, plain HTTP on
    the container's address (single-host stacks, on their internal network).
    """
    env = dict(e.split("=", 1) for e in container.attrs["Config"]["Env"] if "=" in e)
    if not env.get("HA_ENGINE_URL", "").startswith("https:"):
        return f"http://{stack.ip(container)}:30000", True
    status = stack.status(node)
    if status is None or not status.engine_url.startswith("https:"):
        raise RuntimeError(f"{node}: its engine serves TLS but its agent advertises no https URL")
    ca = env.get("HA_ENGINE_TLS_CA_FILE", "")
    code, out = container.exec_run(["cat", ca]) if ca else (1, b"")
    if code != 0:
        raise RuntimeError(f"{node}: no CA to verify its engine (HA_ENGINE_TLS_CA_FILE={ca!r})")
    return status.engine_url, client_context(ca_data=out.decode())


def _engine_headers(container: Any) -> dict[str, str]:
    """The engine's API key, read where the node reads it (a compose secret), if set."""
    code, out = container.exec_run(["sh", "-c", 'cat "${HA_ENGINE_API_KEY_FILE:-/dev/null}"'])
    key = out.decode(errors="replace").strip() if code == 0 else ""
    return {"Authorization": f"Bearer {key}"} if key else {}


def _gateway_env(gateway: Any) -> dict[str, str]:
    env = gateway.attrs["Config"]["Env"] or []
    return dict(e.split("=", 1) for e in env if "=" in e)


def _client_headers(gateway: Any) -> dict[str, str]:
    """The first key of the gateway's client key file (name:key lines), if it has one."""
    path = _gateway_env(gateway).get("HA_CLIENT_KEYS_FILE", "/run/secrets/client_keys")
    code, out = gateway.exec_run(["cat", path])
    if code != 0:
        return {}
    for line in out.decode(errors="replace").splitlines():
        name, sep, key = line.strip().partition(":")
        if sep and name and not name.startswith("#") and key.strip():
            return {"Authorization": f"Bearer {key.strip()}"}
    return {}


# -- the checks --------------------------------------------------------------------------


def check_consistency(stack: Stack, runs: int = 10) -> Check:
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "Name three prime numbers."}],
        "max_tokens": 32,
        "temperature": 0,
        "seed": 1234,
    }
    seen: dict[str, set[tuple[str, str]]] = {}
    for node, container in stack.nodes().items():
        url, verify = _engine_endpoint(stack, node, container)
        headers = _engine_headers(container)
        answers = set()
        for _ in range(runs):
            r = _chat(url, body, headers=headers, verify=verify)
            r.raise_for_status()
            choice = r.json()["choices"][0]
            answers.add((choice["message"]["content"], choice["finish_reason"]))
        seen[node] = answers
    distinct = {a for answers in seen.values() for a in answers}
    ok = len(distinct) == 1
    detail = ", ".join(f"{n}: {len(a)} distinct answer(s)" for n, a in seen.items())
    return Check(
        1,
        "consistency",
        "pass" if ok else "fail",
        f"{runs} deterministic requests per node; {detail}; {len(distinct)} across nodes",
        ""
        if ok
        else "Enable --enable-deterministic-inference on both engines and run the same "
        "GPU model, TP size, attention backend and SGLang version on both nodes.",
    )


def check_structured_output(stack: Stack, count: int = 100) -> Check:
    import jsonschema

    base = stack.gateway_url()
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "Describe a product as JSON."}],
        "max_tokens": 256,
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
    }

    headers = stack.client_headers()

    def one(i: int) -> str | None:
        r = _chat(base, {**body, "seed": i}, headers=headers, verify=stack.verify)
        if r.status_code != 200:
            return f"HTTP {r.status_code}"
        try:
            jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), SCHEMA)
        except (ValueError, jsonschema.ValidationError) as exc:
            return f"invalid: {str(exc)[:80]}"
        return None

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        problems = [p for p in pool.map(one, range(count)) if p]
    return Check(
        2,
        "structured output",
        "fail" if problems else "pass",
        f"{count - len(problems)}/{count} answers valid against the JSON schema"
        + (f"; first problem: {problems[0]}" if problems else ""),
        ""
        if not problems
        else "Check the engine's grammar backend (--grammar-backend) and "
        "that the model follows response_format.",
    )


@contextlib.contextmanager
def _requests_in_background(
    base: str, headers: dict[str, str], verify: ssl.SSLContext | bool
) -> Iterator[list[tuple[float, int, str | None]]]:
    """Sequential small requests through the gateway: (time, status, node)."""
    results: list[tuple[float, int, str | None]] = []
    stop = False

    def loop() -> None:
        with httpx.Client(timeout=30, headers=headers, verify=verify) as client:
            while not stop and len(results) < 5000:
                body = {
                    "model": "default",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 4,
                }
                try:
                    r = client.post(f"{base}/v1/chat/completions", json=body)
                    results.append(
                        (time.monotonic(), r.status_code, r.headers.get("x-sglang-ha-node"))
                    )
                except httpx.HTTPError:
                    results.append((time.monotonic(), 0, None))

    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(loop)
    try:
        yield results
    finally:
        stop = True
        future.result(timeout=60)
        pool.shutdown()


def check_fault_injection(stack: Stack, target: float = 6.0) -> Check:
    primary = stack.primary()
    nodes = stack.nodes()
    if primary is None or len(nodes) < 2:
        return Check(
            3,
            "fault injection",
            "fail",
            f"no primary/standby pair (primary {primary})",
            "Bring the stack to a stable state first (sglang-ha status).",
        )
    standby = next(n for n in nodes if n != primary)
    gateway = stack.service("gateway")
    log_before = _access_log(gateway)
    frozen_at = 0.0
    with _requests_in_background(
        stack.gateway_url(), stack.client_headers(), stack.verify
    ) as results:
        time.sleep(2)
        nodes[primary].pause()
        frozen_at = time.monotonic()
        try:
            served = stack.wait(
                lambda: any(t > frozen_at and s == 200 and n == standby for t, s, n in results),
                timeout=30,
            )
            time.sleep(2)
        finally:
            nodes[primary].unpause()
    took = min(
        (t - frozen_at for t, s, n in results if t > frozen_at and s == 200 and n == standby),
        default=None,
    )
    failed = [s for t, s, _ in results if s != 200]
    new_lines = _access_log(gateway)[len(log_before) :]
    bad = [line for line in new_lines if re.search(r'" 50[23] ', line)]
    stack.wait(stack.stable, timeout=60)
    ok = served and took is not None and took <= target and not failed and not bad
    return Check(
        3,
        "fault injection",
        "pass" if ok else "fail",
        f"froze {primary}: standby {standby} served after "
        f"{'—' if took is None else f'{took:.2f}s'} (target {target:g}s); "
        f"{len(failed)} failed of {len(results)}; {len(bad)} 502/503 lines in the access log",
        ""
        if ok
        else "Check the lease TTL and relay settings (docs/configuration.md) and the "
        "access log (/var/log/sglang/access.log in the gateway).",
    )


def _access_log(gateway: Any) -> list[str]:
    code, out = gateway.exec_run(["cat", "/var/log/sglang/access.log"])
    return out.decode(errors="replace").splitlines() if code == 0 else []


def check_log_isolation(stack: Stack) -> Check:
    nodes = stack.nodes()
    volumes, urls, pidns = set(), set(), set()
    problems = []
    for node, c in nodes.items():
        c.reload()
        mounts = {m["Destination"]: m.get("Name") or m.get("Source") for m in c.attrs["Mounts"]}
        log_volume = mounts.get("/var/log/sglang")
        if log_volume is None:
            problems.append(f"{node}: /var/log/sglang is not on a volume")
        volumes.add(log_volume)
        status = stack.status(node)
        urls.add(status.engine_url if status else None)
        _, out = c.exec_run(["readlink", "/proc/1/ns/pid"])
        pidns.add(out.decode().strip())
        _, out = c.exec_run(["sh", "-c", "test -s /var/log/sglang/ha.log && echo ok"])
        if b"ok" not in out:
            problems.append(f"{node}: no ha.log")
    n = len(nodes)
    if len(volumes) != n:
        problems.append("nodes share a log volume")
    if len(urls) != n:
        problems.append("nodes advertise the same engine URL")
    if len(pidns) != n:
        problems.append("nodes share a PID namespace")
    return Check(
        4,
        "log isolation",
        "fail" if problems else "pass",
        f"{n} nodes: {len(volumes)} log volumes, {len(urls)} engine URLs, {len(pidns)} PID "
        "namespaces" + (f"; {'; '.join(problems)}" if problems else ""),
        ""
        if not problems
        else "Give each node its own log volume, hostname and ports (compose/nodes-*.yaml).",
    )


def check_redis_fallback(stack: Stack) -> Check:
    redis = [c for c in stack.containers("redis-")]
    if not redis:
        return Check(
            5,
            "Redis failure fallback",
            "skipped",
            "no Redis container in this project",
            "Run it where Redis is part of the project (control stack).",
        )
    nodes = list(stack.nodes())
    for c in redis:
        c.stop(timeout=5)
    try:
        degraded = stack.wait(lambda: all(_degraded(stack.status(n)) for n in nodes), timeout=30)
        base = stack.gateway_url()
        codes = [
            _chat(
                base,
                {
                    "model": "default",
                    "max_tokens": 4,
                    "messages": [{"role": "user", "content": "hi"}],
                },
                verify=stack.verify,
            ).status_code
            for _ in range(20)
        ]
    finally:
        for c in redis:
            c.start()
    recovered = stack.wait(lambda: not any(_degraded(stack.status(n)) for n in nodes), timeout=60)
    ok = degraded and recovered and all(code == 200 for code in codes)
    return Check(
        5,
        "Redis failure fallback",
        "pass" if ok else "fail",
        f"Redis stopped: {codes.count(200)}/20 requests served; degraded mode reported: "
        f"{degraded}; coordination resumed: {recovered}",
        ""
        if ok
        else "Check that the agents can reach each other (HA_PEERS) for the failsafe "
        "acknowledgement and that the relay's seed list (HA_NODES) is right.",
    )


def check_gpu_isolation(stack: Stack) -> Check:
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except Exception as exc:  # no NVML library, no driver, no GPU
        return Check(
            6,
            "GPU isolation",
            "skipped",
            f"no NVIDIA GPU here ({type(exc).__name__})",
            "Run verify on the GPU host.",
        )
    used = []
    for i in range(count):
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        used.append(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    return Check(
        6,
        "GPU isolation",
        "pass",
        f"{count} GPU(s); memory used: {[f'{u / 2**30:.1f} GiB' for u in used]}",
    )


def check_name_resolution(stack: Stack) -> Check:
    gateway = stack.service("gateway")
    live = stack.ip(gateway)
    problems = []
    for node, c in stack.nodes().items():
        code, out = c.exec_run(["getent", "hosts", "gateway"])
        resolved = out.decode().split()[0] if code == 0 and out.strip() else "nothing"
        if resolved != live:
            problems.append(f"{node} resolves gateway to {resolved}")
    try:
        r = httpx.get(
            stack.gateway_url() + "/v1/models",
            headers=stack.client_headers(),
            timeout=5,
            verify=stack.verify,
        )
        answered = r.status_code == 200
    except httpx.HTTPError:
        answered = False
    if not answered:
        problems.append("the published gateway port does not answer")
    return Check(
        7,
        "name resolution",
        "fail" if problems else "pass",
        f"gateway is {live}" + (f"; {'; '.join(problems)}" if problems else "; every node agrees"),
        ""
        if not problems
        else "Flush stale DNS entries / restart the resolver; check "
        "extra_hosts and the compose network.",
    )


# What a gateway published beyond loopback must require of its clients: each returns
# the problems it sees (empty: fine). TLS is check 9's.
EdgeRequirement = Callable[[Stack, str], list[str]]


def _client_keys_required(stack: Stack, base: str) -> list[str]:
    """Keys on: a request without one is SGLang's 401, one with a key is served."""
    problems = []
    if _gateway_env(stack.service("gateway")).get("HA_CLIENT_AUTH") == "off":
        problems.append("HA_CLIENT_AUTH=off")
    try:
        without = httpx.get(base + "/v1/models", timeout=5, verify=stack.verify).status_code
        with_key = httpx.get(
            base + "/v1/models", headers=stack.client_headers(), timeout=5, verify=stack.verify
        )
    except httpx.HTTPError as exc:
        return [*problems, f"the gateway does not answer ({type(exc).__name__})"]
    if without != 401:
        problems.append(f"a request without a client key got {without}, not 401")
    if not stack.client_headers():
        problems.append("no key in the gateway's client key file")
    elif with_key.status_code != 200:
        problems.append(f"a request with a client key got {with_key.status_code}")
    return problems


EDGE_REQUIREMENTS: list[EdgeRequirement] = [_client_keys_required]


def check_edge(stack: Stack) -> Check:
    bind = stack.gateway_bind()
    if is_loopback(bind):
        return Check(
            8,
            "client keys",
            "pass",
            f"the gateway is published on {bind} only (this host): nothing to require",
        )
    base = stack.gateway_url()
    problems = [p for requirement in EDGE_REQUIREMENTS for p in requirement(stack, base)]
    return Check(
        8,
        "client keys",
        "fail" if problems else "pass",
        f"published on {bind or 'every address'}: "
        + ("; ".join(problems) if problems else "client keys required and accepted"),
        ""
        if not problems
        else "Beyond loopback the gateway must require client keys: run 'make secrets'"
        " (compose/secrets/client_keys) and leave HA_CLIENT_AUTH at auto or on"
        " (docs/security.md).",
    )


def check_edge_tls(stack: Stack, min_days: int = MIN_CERT_DAYS) -> Check:
    bound, host, port = stack.gateway_binding()
    beyond = not is_loopback(bound or "0.0.0.0")
    where = f"published on {bound or '*'}:{port}"
    if not stack.edge_tls():
        if not beyond:
            return Check(9, "edge TLS", "pass", f"{where} (loopback only): plain HTTP")
        return Check(
            9,
            "edge TLS",
            "fail",
            f"{where}, beyond loopback, in plain HTTP",
            "Set GATEWAY_TLS=auto (or on) in compose/.env and restart the gateway"
            " (docs/security.md, Edge TLS).",
        )
    context = stack.verify if isinstance(stack.verify, ssl.SSLContext) else None
    context = context or ssl.create_default_context()
    trusted = str(stack.ca) if stack.ca.is_file() else "the system's CAs"
    try:
        with (
            socket.create_connection((host, port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            cert = tls.getpeercert()
            version = tls.version()
    except ssl.SSLError as exc:
        return Check(
            9,
            "edge TLS",
            "fail",
            f"{where}: TLS on, but its certificate does not verify against {trusted} for"
            f" {host}: {exc}",
            "Give the certificate the names clients use (GATEWAY_TLS_SANS=... make secrets"
            " ROTATE=1) or point --ca at the CA that signed yours.",
        )
    assert cert is not None
    days = (ssl.cert_time_to_seconds(str(cert["notAfter"])) - time.time()) / 86400
    seen = (
        f"{where}: {version}, certificate serial {cert['serialNumber']} verifies against"
        f" {trusted}, {days:.0f} days left"
    )
    if days < min_days:
        return Check(
            9,
            "edge TLS",
            "fail",
            seen,
            "Rotate it: make secrets ROTATE=1 (or write your renewed certificate over"
            " compose/secrets/gateway_tls.crt/.key); Nginx reloads it without a restart.",
        )
    return Check(9, "edge TLS", "pass", seen)


CHECKS: list[tuple[int, Callable[[Stack], Check], bool]] = [
    (1, check_consistency, False),
    (2, check_structured_output, False),
    (3, check_fault_injection, True),
    (4, check_log_isolation, False),
    (5, check_redis_fallback, True),
    (6, check_gpu_isolation, False),
    (7, check_name_resolution, False),
    (8, check_edge, False),
    (9, check_edge_tls, False),
]


def run(project: str, disruptive: bool, ca: Path = DEFAULT_CA) -> list[Check]:
    stack = Stack(project, ca)
    results = []
    for number, check, disturbs in CHECKS:
        if disturbs and not disruptive:
            continue
        try:
            results.append(check(stack))
        except Exception as exc:
            results.append(
                Check(
                    number,
                    check.__name__.removeprefix("check_").replace("_", " "),
                    "fail",
                    f"the check itself failed: {type(exc).__name__}: {exc}",
                    "Is the stack up? (make up / sglang-ha status)",
                )
            )
    if not disruptive:
        results += [
            Check(3, "fault injection", "skipped", "disturbs the stack", "Run with --disruptive."),
            Check(
                5,
                "Redis failure fallback",
                "skipped",
                "disturbs the stack",
                "Run with --disruptive.",
            ),
        ]
    return sorted(results, key=lambda c: c.number)


def render(results: list[Check]) -> str:
    lines = []
    for c in results:
        mark = {"pass": "PASS", "fail": "FAIL", "skipped": "SKIP"}[c.status]
        lines.append(f"{c.number}. {mark:4}  {c.name:24} {c.seen}")
        if c.status in ("fail", "skipped") and c.advice:
            lines.append(f"          → {c.advice}")
    return "\n".join(lines)


def as_json(results: list[Check]) -> str:
    return json.dumps([asdict(c) for c in results], indent=2)
