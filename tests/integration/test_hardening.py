"""Bad input at every door of the real stack: none of it costs a request or moves a role.

Runs on the shared session stack and leaves it as it found it: nothing here reaches
an engine's admin endpoint, Nginx is reloaded back to its own configuration, and
the only admin calls are rejected ones (never on sglang-01's /ha/pause, whose
rejection count test_stack.py asserts exactly).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis as sync_redis

from tests.support.stack import NODES, Stack

pytestmark = pytest.mark.integration

CHAT = {"model": "default", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 12}
LONG_STREAM = {
    "text": "Tell me everything",
    "stream": True,
    "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True},
}


# -- observing ----------------------------------------------------------------------------


def metric(text: str, name: str, required: bool = True) -> float:
    """Sum of a metric over its label sets, from Prometheus text. A labelled counter
    nothing has incremented yet has no sample at all: 0 unless `required`."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found or not required, f"metric {name} not exported"
    return total


def engine_metric(stack: Stack, node: str, name: str) -> float:
    return metric(httpx.get(f"{stack.engine_url(node)}/metrics", timeout=5).text, name)


def relay_metrics(stack: Stack) -> str:
    return httpx.get(f"http://{stack.ip('gateway')}:8002/metrics", timeout=5).text


def cluster_view(stack: Stack) -> dict[str, Any]:
    """What must not move: roles, epochs, engine states, the relay's node view."""
    agents = {}
    for node in NODES:
        status = stack.agent_status(node, timeout=2)
        assert status is not None, f"{node}'s agent did not answer"
        agents[node] = (status["role"], status["epoch"], status["engine"]["state"])
    relay = stack.relay_status()
    assert relay is not None
    nodes = sorted(
        (n["name"], n["failed"], n["can_serve"], n["engine"], n["role"]) for n in relay["nodes"]
    )
    return {"agents": agents, "primary": relay["primary"], "epoch": relay["epoch"], "nodes": nodes}


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last})")


def gateway_port(stack: Stack) -> int:
    return int(stack.gateway_url.rsplit(":", 1)[1])


async def raw_status(port: int, request: bytes, timeout: float = 10) -> int:
    """Send bytes as they are (no client-side normalisation); the status Nginx answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readline(), timeout=timeout)
    finally:
        writer.close()
    return int(head.split()[1])


@contextlib.contextmanager
def engines_resumed(stack: Stack) -> Iterator[None]:
    """Should an engine admin call ever get through (the test then fails), undo it
    directly on the engines so the shared stack is left as it was found."""
    try:
        yield
    finally:
        for node in NODES:
            with contextlib.suppress(httpx.HTTPError, LookupError):
                httpx.post(
                    f"{stack.engine_url(node)}/continue_generation",
                    headers=stack.engine_auth,
                    timeout=5,
                )


# -- the flood ------------------------------------------------------------------------------


def _chat(**extra: Any) -> bytes:
    return json.dumps({**CHAT, **extra}).encode()


# (method, path, body, expected statuses): answered by Nginx, the relay or the engine.
BAD: list[tuple[str, str, bytes, set[int]]] = [
    ("POST", "/v1/chat/completions", b"{broken", {400}),
    ("POST", "/v1/chat/completions", b'{"messages": [], "temperature": NaN}', {400}),
    ("POST", "/v1/chat/completions", b"[" * 5000 + b"]" * 5000, {400}),
    ("POST", "/v1/chat/completions", _chat(temperature=-1), {400}),
    ("POST", "/v1/chat/completions", _chat(temperature="nan"), {400}),
    ("POST", "/v1/chat/completions", _chat(top_p=0), {400}),
    ("POST", "/v1/chat/completions", _chat(n=10**6), {400}),
    ("POST", "/v1/chat/completions", _chat(max_tokens="lots"), {400}),
    ("POST", "/v1/chat/completions", _chat(messages=[]), {400}),
    ("POST", "/v1/completions", json.dumps({"prompt": [1, -5]}).encode(), {400}),
    # Valid for the relay, refused by the engine: a 4xx that passes through untouched.
    (
        "POST",
        "/generate",
        json.dumps({"text": "x", "sampling_params": {"max_new_tokens": 10**7}}).encode(),
        {400},
    ),
    ("POST", "/v1/completions", json.dumps({"prompt": "x", "n": 2}).encode(), {400}),
    ("GET", "/v1/chat/completions", b"", {405}),
    ("POST", "/pause_generation", b"{}", {404}),
    ("POST", "/abort_request", b'{"abort_all": true}', {403}),  # the scoped abort's refusal
    ("GET", "/get_server_info", b"", {404}),
    ("POST", "/sim/faults", b"{}", {404}),
    ("GET", "/no/such/path", b"", {404}),
]


@dataclass
class FloodResult:
    statuses: dict[int, int] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    legit: list[str] = field(default_factory=list)  # one entry per legit request: "ok" or why
    disconnected: int = 0
    slowloris_cut_after: list[float] = field(default_factory=list)
    views: list[dict[str, Any]] = field(default_factory=list)


async def _bad_requests(url: str, result: FloodResult, count: int, rate: float) -> None:
    """`count` bad requests, paced at `rate` per second (under the per-client limit)."""
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    async with httpx.AsyncClient(base_url=url, timeout=20, limits=limits) as http:
        sem = asyncio.Semaphore(16)

        async def one(i: int) -> None:
            method, path, body, expected = BAD[i % len(BAD)]
            async with sem:
                r = await http.request(method, path, content=body or None)
            result.statuses[r.status_code] = result.statuses.get(r.status_code, 0) + 1
            ok_json = r.headers.get("content-type", "").startswith("application/json")
            if r.status_code not in expected | {429} or not ok_json:
                result.unexpected.append(f"{method} {path}: {r.status_code} {r.text[:120]}")

        started = time.monotonic()
        tasks = []
        for i in range(count):
            tasks.append(asyncio.ensure_future(one(i)))
            await asyncio.sleep(max(started + (i + 1) / rate - time.monotonic(), 0))
        await asyncio.gather(*tasks)


async def _legit(url: str, result: FloodResult, stop: asyncio.Event, worker: int) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                if (i + worker) % 2:
                    r = await http.post("/v1/chat/completions", json=CHAT)
                    status = r.status_code
                    ok = status == 200 and bool(r.json()["choices"][0]["message"]["content"])
                else:
                    async with http.stream(
                        "POST", "/v1/chat/completions", json={**CHAT, "stream": True}
                    ) as resp:
                        body = (await resp.aread()).decode()
                    status = resp.status_code
                    ok = status == 200 and body.endswith("data: [DONE]\n\n")
                result.legit.append("ok" if ok else f"bad answer: HTTP {status}")
            except httpx.HTTPError as exc:
                result.legit.append(f"{type(exc).__name__}: {exc}")


async def _disconnecting_clients(url: str, result: FloodResult, streams: int, unary: int) -> None:
    """Clients that go away mid-generation: the engine must abort their work."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        for _ in range(streams):
            async with http.stream("POST", "/generate", json=LONG_STREAM) as resp:
                assert resp.status_code == 200
                async for _chunk in resp.aiter_bytes():
                    break  # the first event, then hang up
            result.disconnected += 1
    body = {**LONG_STREAM, "stream": False}
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30, read=0.5)) as http:
        for _ in range(unary):
            with contextlib.suppress(httpx.ReadTimeout):
                await http.post("/generate", json=body)
                raise AssertionError("a 3000-token generation answered within 0.5 s")
            result.disconnected += 1


async def _slowloris(port: int, result: FloodResult, limit: float) -> None:
    """A request header that never ends, one line a second: Nginx must cut it off."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    try:
        for i in range(int(limit)):
            writer.write(f"X-Slow-{i}: y\r\n".encode())
            await writer.drain()
            with contextlib.suppress(asyncio.TimeoutError):
                data = await asyncio.wait_for(reader.read(100), timeout=1.0)
                assert data == b"" or data.split(b" ")[1] == b"408", data
                result.slowloris_cut_after.append(time.monotonic() - started)
                return
    except ConnectionError:
        result.slowloris_cut_after.append(time.monotonic() - started)
    finally:
        writer.close()


async def _watch(stack: Stack, result: FloodResult, stop: asyncio.Event) -> None:
    while not stop.is_set():
        result.views.append(await asyncio.to_thread(cluster_view, stack))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.5)


def test_a_flood_of_bad_input_costs_no_request_and_moves_nothing(stack: Stack) -> None:
    primary = stack.wait_stable()
    before = cluster_view(stack)
    aborted_before = sum(
        engine_metric(stack, n, "sglang:num_aborted_requests_total") for n in NODES
    )
    retries_before = metric(relay_metrics(stack), "sglang_ha_relay_retries_total", required=False)
    url, port = stack.gateway_url, gateway_port(stack)
    result = FloodResult()

    async def scenario() -> None:
        stop = asyncio.Event()
        background = [asyncio.ensure_future(_legit(url, result, stop, w)) for w in range(3)]
        background.append(asyncio.ensure_future(_watch(stack, result, stop)))
        slow = [asyncio.ensure_future(_slowloris(port, result, limit=25)) for _ in range(4)]
        oversized = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 17000000\r\n\r\n"
        )
        try:
            await asyncio.gather(
                _bad_requests(url, result, count=900, rate=90),
                _disconnecting_clients(url, result, streams=6, unary=2),
                *slow,
            )
            for _ in range(3):  # over the default 16m limit: refused on the header alone
                assert await raw_status(port, oversized) == 413
        finally:
            stop.set()
            await asyncio.gather(*background)

    with engines_resumed(stack):
        asyncio.run(asyncio.wait_for(scenario(), timeout=240))

    summary = (
        f"statuses {result.statuses}, unexpected {result.unexpected[:5]},"
        f" legit {len(result.legit)} ({[x for x in result.legit if x != 'ok'][:3]}),"
        f" slowloris cut after {[round(t, 1) for t in result.slowloris_cut_after]} s,"
        f" {result.disconnected} clients gone, {len(result.views)} view samples"
    )
    print(summary)  # in the log of a passing run too: what the flood looked like
    # Every bad request got its clear 4xx; nothing got a 5xx.
    assert not result.unexpected, summary
    assert sum(result.statuses.values()) == 900 and not any(s >= 500 for s in result.statuses)
    # Every legitimate request running alongside succeeded.
    assert len(result.legit) >= 20 and set(result.legit) == {"ok"}, summary
    # Slowloris: cut off by client_header_timeout (10 s by default), not held open.
    assert len(result.slowloris_cut_after) == 4, result.slowloris_cut_after
    assert all(8.0 <= t <= 16.0 for t in result.slowloris_cut_after), result.slowloris_cut_after
    # Disconnected clients' generations were aborted on the engine, not leaked.
    wait_until(
        lambda: all(engine_metric(stack, n, "sglang:num_running_reqs") == 0 for n in NODES),
        timeout=20,
        what="no request running on either engine",
    )
    aborted = sum(engine_metric(stack, n, "sglang:num_aborted_requests_total") for n in NODES)
    print(f"engine aborts: {aborted - aborted_before:.0f}")
    assert aborted - aborted_before >= result.disconnected == 8, (aborted, aborted_before)
    # Nothing moved: roles, epoch, engine health, the relay's view, at every sample.
    assert len(result.views) >= 5
    for view in result.views:
        assert view == before, (view, before)
    assert cluster_view(stack) == before and before["primary"] == primary
    # Client errors are never retried nor counted against a node.
    assert (
        metric(relay_metrics(stack), "sglang_ha_relay_retries_total", required=False)
        == retries_before
    )


def test_engine_admin_endpoints_are_not_reachable_through_the_gateway(stack: Stack) -> None:
    primary = stack.wait_stable()
    sim_auth = {"Authorization": f"Bearer {stack.secrets['SIM_ADMIN_TOKEN']}"}
    url = stack.gateway_url
    with engines_resumed(stack):
        _admin_paths_refused(stack, url, sim_auth)
    info = httpx.get(
        f"{stack.engine_url(primary)}/get_server_info", headers=stack.engine_auth, timeout=5
    ).json()
    assert info["paused"] is False
    r = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30)
    assert r.status_code == 200


def _admin_paths_refused(stack: Stack, url: str, sim_auth: dict[str, str]) -> None:
    r = httpx.post(url + "/abort_request", json={"abort_all": True}, timeout=5)
    assert r.status_code == 403 and "not available through the gateway" in r.text
    for method, path, body in [
        ("POST", "/pause_generation", {}),
        ("POST", "/flush_cache", {}),
        ("GET", "/get_server_info", None),
        ("GET", "/metrics", None),
        ("POST", "/sim/faults", {}),  # even with the right token
    ]:
        r = httpx.request(method, url + path, json=body, headers=sim_auth, timeout=5)
        assert r.status_code == 404, (path, r.status_code, r.text)
        assert r.json() == {"detail": "Not Found"}  # as SGLang for a path it lacks
    port = gateway_port(stack)
    for path in ("/v1/models/../../pause_generation", "/v1/models/..%2F..%2Fpause_generation"):
        request = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()
        assert asyncio.run(raw_status(port, request)) == 404, path


# -- Nginx limits, configurable -------------------------------------------------------------


def _render_nginx(stack: Stack, overrides: dict[str, str]) -> None:
    """Re-render the gateway's Nginx config from its environment plus `overrides`
    (what the entrypoint does at start) and reload Nginx."""
    script = (
        "import json, os, sys\n"
        "from ha_agent.gateway.edge.nginx_conf import render_template\n"
        "env = {**os.environ, **json.loads(sys.argv[1])}\n"
        "text = render_template(open('/etc/sglang-ha/nginx/nginx.conf.template').read(), env)\n"
        "open('/run/sglang-ha/nginx.conf', 'w').write(text)\n"
    )
    gw = stack.container("gateway")
    before = _accepting_workers(stack)
    assert before, "no Nginx worker found in the gateway"
    for cmd in (
        ["python3", "-c", script, json.dumps(overrides)],
        ["nginx", "-e", "stderr", "-t", "-c", "/run/sglang-ha/nginx.conf"],
        ["nginx", "-e", "stderr", "-c", "/run/sglang-ha/nginx.conf", "-s", "reload"],
    ):
        code, out = gw.exec_run(cmd)
        assert code == 0, (cmd, out.decode(errors="replace"))
    # Until the master has told every old worker to quit, old and new workers
    # accept from the same socket: one 413 does not mean the next is on the new config.
    wait_until(
        lambda: (now := _accepting_workers(stack)) and not (now & before),
        10,
        "Nginx's old workers retired",
    )


_WORKERS = (
    "import os\n"
    "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
    "    try:\n"
    "        title = open(f'/proc/{pid}/cmdline', 'rb').read().rstrip(b'\\0')\n"
    "    except OSError:\n"
    "        continue\n"
    "    if title == b'nginx: worker process':\n"
    "        print(pid)\n"
)


def _accepting_workers(stack: Stack) -> set[int]:
    """PIDs of the gateway's Nginx workers still accepting connections (one that
    is shutting down retitles itself "nginx: worker process is shutting down")."""
    code, out = stack.container("gateway").exec_run(["python3", "-c", _WORKERS])
    assert code == 0, out.decode(errors="replace")
    return {int(line) for line in out.split()}


@contextlib.contextmanager
def nginx_settings(stack: Stack, **overrides: str) -> Iterator[None]:
    _render_nginx(stack, overrides)
    try:
        yield
    finally:
        _render_nginx(stack, {})
        code, out = stack.container("gateway").exec_run(
            ["nginx", "-T", "-c", "/run/sglang-ha/nginx.conf"]
        )
        assert code == 0 and b"client_max_body_size 16m;" in out, "Nginx not back on its settings"


def _body_status(url: str, size: int) -> int:
    # A fresh connection each time: a kept-alive one may still be on an old worker.
    headers = {"Connection": "close", "Content-Type": "application/json"}
    return httpx.post(
        url + "/v1/completions", content=b" " * size, headers=headers, timeout=10
    ).status_code


def test_gateway_limits_are_configurable_and_enforced(stack: Stack) -> None:
    stack.wait_stable()
    url, port = stack.gateway_url, gateway_port(stack)
    assert _body_status(url, 2048) == 400  # the relay's "not valid JSON": not a size matter
    with nginx_settings(
        stack,
        GATEWAY_MAX_BODY="1k",
        GATEWAY_RATE_PER_CLIENT="5",
        GATEWAY_BURST_PER_CLIENT="5",
        GATEWAY_HEADER_TIMEOUT="2s",
    ):
        wait_until(lambda: _body_status(url, 2048) == 413, 10, "the new config in force")
        r = httpx.post(url + "/v1/completions", content=b"x" * 2048, timeout=10)
        assert r.status_code == 413 and r.json()["type"] == "RequestTooLarge"
        codes: list[int] = []
        started = time.monotonic()
        with httpx.Client(timeout=10) as http:
            while len(codes) < 100 and not (429 in codes and codes.count(200) >= 2):
                r = http.get(url + "/v1/models")
                codes.append(r.status_code)
                if r.status_code == 429:
                    assert r.json()["type"] == "RateLimitError" and r.headers["Retry-After"]
        elapsed = time.monotonic() - started
        assert set(codes) == {200, 429}, codes
        assert codes.count(200) <= 5 + 1 + 5 * elapsed, (codes, elapsed)  # burst + rate
        result = FloodResult()
        asyncio.run(_slowloris(port, result, limit=10))
        assert result.slowloris_cut_after and 1.5 <= result.slowloris_cut_after[0] <= 5.0
    wait_until(lambda: _body_status(url, 2048) == 400, 10, "the original config back")
    r = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30)
    assert r.status_code == 200


# -- authentication, users, secrets ----------------------------------------------------------


def test_every_admin_endpoint_of_every_agent_needs_the_token(stack: Stack) -> None:
    stack.wait_stable()
    before = cluster_view(stack)
    for node in NODES:
        url = stack.agent_url(node)
        doc = httpx.get(f"{url}/openapi.json", timeout=5).json()
        admin = [p for p, ops in doc["paths"].items() if "security" in ops.get("post", {})]
        assert {"/ha/switchover", "/ha/failover", "/ha/negotiate", "/ha/failsafe"} <= set(admin)
        for path in admin:
            if node == "sglang-01" and path == "/ha/pause":
                continue  # test_stack.py counts exactly its own rejections there
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
                r = httpx.post(
                    f"{url}{path}", json={"to": node, "force": True}, headers=headers, timeout=5
                )
                assert r.status_code == 401, (node, path, r.status_code)
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
        assert metric(metrics, "sglang_ha_agent_auth_rejected_total") >= 3 * (len(admin) - 1)
        for secret in ("HA_ADMIN_TOKEN", "HA_REDIS_PASSWORD", "REDIS_PASSWORD"):
            assert stack.secrets[secret] not in metrics
    assert cluster_view(stack) == before
    # The relay's admin port is read-only: nothing to change there, with or without a token.
    relay = f"http://{stack.ip('gateway')}:8002"
    for path in ("/relay/status", "/health", "/metrics"):
        assert httpx.post(relay + path, timeout=5).status_code == 405


# Inside a Redis container: its admin password from its secret file (no environment).
ADMIN_AUTH = 'REDISCLI_AUTH="$(cat /run/secrets/redis_password)"'


def test_agents_and_relay_use_the_restricted_redis_user(stack: Stack) -> None:
    stack.wait_stable()
    users = {}
    for service in ("redis-1", "redis-2"):
        code, out = stack.container(service).exec_run(
            ["sh", "-c", f"{ADMIN_AUTH} redis-cli ACL LIST"]
        )
        assert code == 0
        users[service] = out.decode()
        assert "user sglang-ha on #" in users[service], users[service]
        assert stack.secrets["HA_REDIS_PASSWORD"] not in users[service]  # stored hashed

    def clients() -> list[str]:
        found = []
        for service in ("redis-1", "redis-2"):
            _, out = stack.container(service).exec_run(
                ["sh", "-c", f"{ADMIN_AUTH} redis-cli CLIENT LIST"]
            )
            found += [line for line in out.decode().splitlines() if "user=sglang-ha" in line]
        return found

    # Agents and relay hold connections (lease, registry, notifications) as sglang-ha.
    assert len(wait_until(clients, 10, "agent connections")) >= 3
    # Under that user, nothing beyond its own keys and data commands.
    for command in ("FLUSHALL", "CONFIG GET requirepass", "KEYS *", "SET other 1", "ACL LIST"):
        # The Redis container has only the hash: the agents' password comes from here.
        code, out = stack.container("redis-1").exec_run(
            ["sh", "-c", f"redis-cli --user sglang-ha {command}"],
            environment={"REDISCLI_AUTH": stack.secrets["HA_REDIS_PASSWORD"]},
        )
        assert b"NOPERM" in out, (command, out)


def test_only_the_gateway_port_is_published_and_nothing_runs_as_root(stack: Stack) -> None:
    containers = stack.client.containers.list(
        filters={"label": f"com.docker.compose.project={stack.project}"}
    )
    assert len(containers) >= 8
    for c in containers:
        c.reload()
        service = c.labels["com.docker.compose.service"]
        published = {p: b for p, b in (c.attrs["NetworkSettings"]["Ports"] or {}).items() if b}
        if service == "gateway":
            assert list(published) == ["8000/tcp"], published  # not 8001/8002/8003/9113
            assert all(b["HostIp"] == "127.0.0.1" for b in published["8000/tcp"])
        else:
            assert not published, (service, published)
        code, out = c.exec_run(["id", "-u"])
        assert code == 0 and out.decode().strip() != "0", f"{service} runs as root"
        code, out = c.exec_run(
            ["sh", "-c", "ps -eo user=,args= 2>/dev/null || cat /proc/[0-9]*/cmdline"]
        )
        for secret in ("HA_ADMIN_TOKEN", "REDIS_PASSWORD", "HA_REDIS_PASSWORD"):
            assert stack.secrets[secret].encode() not in out, (
                f"{secret} on a command line in {service}"
            )


def test_no_secret_in_images_logs_or_answers(stack: Stack) -> None:
    values = sorted({v for v in stack.secrets.values() if len(v) >= 16})
    assert values
    images = {
        c.image.id
        for c in stack.client.containers.list(
            filters={"label": f"com.docker.compose.project={stack.project}"}
        )
    }
    for image_id in images:
        image = stack.client.images.get(image_id)
        config = json.dumps(image.attrs["Config"]) + json.dumps(image.history())
        assert not [v for v in values if v in config], image.tags
        # Every layer's files: the whole image, streamed through grep.
        save = subprocess.Popen(["docker", "save", image_id], stdout=subprocess.PIPE)
        grep = subprocess.run(
            ["grep", "-a", "-c", "-F", *[a for v in values for a in ("-e", v)]],
            stdin=save.stdout,
            capture_output=True,
            timeout=300,
        )
        save.wait(timeout=60)
        assert grep.stdout.strip() == b"0", f"a secret is in a layer of {image.tags}"
    logs = "".join(stack.logs(s) for s in ("node-1", "node-2", "gateway", "redis-1", "sentinel-1"))
    logs += stack.ha_log("node-1") + stack.ha_log("node-2") + stack.access_log()
    answers = [
        relay_metrics(stack),
        json.dumps(stack.relay_status()),
        *(json.dumps(stack.agent_status(n)) for n in NODES),
        *(httpx.get(f"{stack.agent_url(n)}/metrics", timeout=5).text for n in NODES),
        *(httpx.get(f"{stack.agent_url(n)}/ha/history", timeout=5).text for n in NODES),
        *(httpx.get(f"{stack.engine_url(n)}/metrics", timeout=5).text for n in NODES),
    ]
    for value in values:
        assert value not in logs, "a secret is in a log"
        assert not [a for a in answers if value in a], "a secret is in an API answer"


def test_redis_image_gives_the_agent_user_its_own_password(stack: Stack) -> None:
    """Fresh secrets (scripts/secrets.sh) give the agents a password of their own: the
    Redis image's agent user works with it, and it opens nothing as the default user.
    (The session stack may run on an older secrets file where both are equal.)"""
    image = stack.container("redis-1").image.id
    admin_pw, agent_pw = "admin-" + "a" * 24, "agent-" + "b" * 24
    container = stack.client.containers.run(
        image,
        detach=True,
        environment={"ROLE": "master", "REDIS_PASSWORD": admin_pw, "HA_REDIS_PASSWORD": agent_pw},
        labels={"com.docker.compose.project": stack.project, "sglang-ha.test": "hardening"},
    )
    try:

        def address() -> str:
            container.reload()
            return str(container.attrs["NetworkSettings"]["IPAddress"])

        host = wait_until(address, 20, "the Redis container's address")
        agent = sync_redis.Redis(
            host=host, username="sglang-ha", password=agent_pw, socket_timeout=2
        )
        wait_until(lambda: _pings(agent), 20, "Redis to accept the agent user")
        assert agent.set("sglang-ha:test:key", "1") and agent.publish("sglang-ha:test:ch", "x") == 0
        with pytest.raises(sync_redis.exceptions.NoPermissionError):
            agent.flushall()
        as_default = sync_redis.Redis(host=host, password=agent_pw, socket_timeout=2)
        with pytest.raises(sync_redis.exceptions.AuthenticationError):
            as_default.ping()
        admin = sync_redis.Redis(host=host, password=admin_pw, socket_timeout=2)
        assert admin.ping()
        code, out = container.exec_run(["sh", "-c", "cat /data/master.conf"])
        assert code == 0 and agent_pw.encode() not in out and b"user sglang-ha on #" in out
    finally:
        container.remove(force=True)


def _pings(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False
