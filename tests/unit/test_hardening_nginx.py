"""The gateway's Nginx, for real: the template rendered as the gateway does, a local
nginx in front of an in-process stand-in for the relay.

What is checked is what a client meets: only the inference API gets through, every
limit (body size, per-client rate and connections, header timeout) answers with the
right status and a JSON body, and a client that goes away mid-stream cancels the
request behind Nginx. Skipped where no nginx binary is installed; the integration
suite checks the same on the gateway container.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from ha_agent.gateway.admission.policy import BODY_SECONDS_HEADER
from ha_agent.gateway.edge.access_log import AccessLogRotator
from ha_agent.gateway.edge.nginx_conf import DEFAULTS, render_template
from ha_agent.gateway.edge.nginx_sync import render_client_keys, render_relay_servers
from ha_agent.openapi.inference import MODEL_PREFIX, PUBLIC_ROUTES
from tests.support.processes import free_port, stop_process
from tests.support.raw_http import framed, raw_http

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = (ROOT / "nginx" / "nginx.conf.template").read_text()
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


@pytest.fixture
def require_nginx() -> None:
    """A real nginx is required, never skipped: scripts/ensure-test-tools.sh installs it."""
    if NGINX is None:
        pytest.fail("no nginx binary: run scripts/ensure-test-tools.sh")


needs_nginx = pytest.mark.usefixtures("require_nginx")


# -- the template itself (no nginx needed) -------------------------------------------------


def test_nginx_passes_exactly_the_public_routes() -> None:
    exact = set(re.findall(r"location = (\S+)\s*\{\s*proxy_pass", TEMPLATE))
    prefixes = set(re.findall(r"location \^~ (\S+)\s*\{\s*proxy_pass", TEMPLATE))
    assert exact == set(PUBLIC_ROUTES)
    assert prefixes == {MODEL_PREFIX}
    # Nothing else is proxied: the catch-all answers 404 itself.
    assert TEMPLATE.count("proxy_pass") == len(exact) + len(prefixes)
    assert re.search(r"location / \{\s*return 404", TEMPLATE)


def test_every_placeholder_has_a_default_and_a_documented_setting() -> None:
    placeholders = set(re.findall(r"@([A-Z][A-Z0-9_]*)@", TEMPLATE))
    assert placeholders <= set(DEFAULTS)
    env_file = (ROOT / "compose" / ".env").read_text()
    control = (ROOT / "compose" / "control.yaml").read_text()
    for name in (p for p in placeholders if p.startswith("GATEWAY_") and p != "GATEWAY_PORT"):
        assert re.search(rf"^{name}=", env_file, re.M), f"{name} is not in compose/.env"
        assert f"{name}: ${{{name}:-{DEFAULTS[name]}}}" in control, f"{name} not passed"
    with pytest.raises(KeyError):
        render_template("x @GATEWAY_NO_SUCH@", {})


# -- a real nginx ----------------------------------------------------------------------


@dataclass
class Upstream:
    """Stands in for the relay: counts what reached it, streams on request."""

    port: int
    seen: list[str] = field(default_factory=list)
    # Nginx's X-SGLang-HA-Body-Seconds and the body's size, per request.
    bodies: list[tuple[str | None, int]] = field(default_factory=list)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(f"{request.method} {request.raw_path}")
        body = await request.read()
        self.bodies.append((request.headers.get(BODY_SECONDS_HEADER), len(body)))
        if request.query.get("hold"):
            await asyncio.wait_for(self.release.wait(), timeout=20)
        if request.query.get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            try:
                for i in range(int(request.query.get("events", 200))):
                    await response.write(f"data: {i}\n\n".encode())
                    await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            return response
        return web.json_response({"ok": True})


@dataclass
class Gateway:
    url: str
    port: int
    upstream: Upstream
    workdir: str


def start_nginx(
    upstream_port: int,
    env: dict[str, str],
    client_keys: dict[str, str] | None = None,
    backup: str = "",
) -> tuple[str, int, subprocess.Popen[bytes]]:
    """Render the template as the gateway does and start nginx on a free port."""
    assert NGINX is not None
    workdir = tempfile.mkdtemp(prefix="sglang-ha-nginx-")
    os.makedirs(os.path.join(workdir, "nginx"))
    for d in (workdir, os.path.join(workdir, "nginx")):
        os.chmod(d, 0o777)  # nginx workers may run as nobody
    port = free_port()
    text = render_template(
        TEMPLATE,
        {"GATEWAY_PORT": f"127.0.0.1:{port}", "HA_RELAY_PORT": str(upstream_port), **env},
    )
    # Only where files live and the internal stub_status port differ from the image.
    for path in ("/run/sglang-ha", "/var/lib/sglang-ha", "/var/log/sglang"):
        text = text.replace(path, workdir)
    text = text.replace("127.0.0.1:8003", f"127.0.0.1:{free_port()}")
    Path(workdir, "nginx-backup-servers.conf").write_text(backup)
    Path(workdir, "nginx-client-keys.conf").write_text(render_client_keys(client_keys))
    Path(workdir, "nginx-relay-servers.conf").write_text(
        render_relay_servers([f"127.0.0.1:{upstream_port}"])
    )
    conf = Path(workdir, "nginx.conf")
    conf.write_text(text)
    proc = subprocess.Popen(
        [NGINX, "-e", "stderr", "-p", workdir, "-c", str(conf), "-g", "daemon off;"],
        stderr=subprocess.PIPE,
    )
    return workdir, port, proc


@contextlib.asynccontextmanager
async def gateway(**env: str) -> AsyncIterator[Gateway]:
    assert NGINX is not None
    upstream = Upstream(free_port())
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", upstream.port).start()
    workdir, port, proc = start_nginx(upstream.port, env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            with contextlib.suppress(OSError):
                _r, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            assert time.monotonic() < deadline, "nginx did not start"
            await asyncio.sleep(0.05)
        yield Gateway(url, port, upstream, workdir)
    finally:
        stop_process(proc, timeout=10)
        await runner.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


def _json_error(r: httpx.Response, code: int) -> None:
    assert r.status_code == code, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["object"] == "error" and body["code"] == code


@needs_nginx
async def test_only_the_public_api_is_proxied() -> None:
    async with gateway() as gw, httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        for path, methods in PUBLIC_ROUTES.items():
            method = "POST" if "POST" in methods else "GET"
            r = await http.request(method, path, content=b"{}" if method == "POST" else None)
            assert r.status_code == 200, path
        assert (await http.get("/v1/models/Qwen/Qwen2.5-7B-Instruct")).status_code == 200
        reached = len(gw.upstream.seen)
        for path in (
            "/pause_generation",
            "/flush_cache",
            "/get_server_info",
            "/metrics",
            "/sim/faults",
            "/",
            "/v1/chat/completions/x",
            "/v1/models/../../pause_generation",
            "/v1/models/%2e%2e/%2e%2e/pause_generation",
            "/v1/models/..%2F..%2Fpause_generation",
            "/generate/../pause_generation",
        ):
            # Raw, unnormalised paths: what Nginx sees is what a client sent.
            status, body = await _raw(gw.port, f"POST {path} HTTP/1.1\r\nHost: x\r\n")
            assert status == 404, (path, body)
            assert json.loads(body) == {"detail": "Not Found"}  # as SGLang (Starlette)
        assert len(gw.upstream.seen) == reached, gw.upstream.seen[reached:]


async def _raw(port: int, head: str, body: bytes = b"") -> tuple[int, bytes]:
    status, _, rest = await raw_http(port, framed(head, body))
    return status, rest


@needs_nginx
async def test_oversized_body_is_413_json_and_never_proxied() -> None:
    async with gateway(GATEWAY_MAX_BODY="1k") as gw, httpx.AsyncClient(timeout=10) as http:
        r = await http.post(gw.url + "/v1/completions", content=b"x" * 2048)
        _json_error(r, 413)
        r = await http.post(gw.url + "/v1/completions", content=b"x" * 512)
        assert r.status_code == 200
        assert gw.upstream.seen == ["POST /v1/completions"]


@needs_nginx
async def test_nginx_passes_a_body_whole_with_the_time_it_took() -> None:
    """The relay sees nothing until the body is whole, then learns how long it took
    (BODY_SECONDS_HEADER, which a client cannot set); a body past the in-memory buffer
    (256 KB, then a temp file) arrives whole too."""
    async with gateway() as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
            + BODY_SECONDS_HEADER.encode()
            + b": 0.000\r\n\r\n{}"
        )
        await writer.drain()
        await asyncio.sleep(1.2)
        assert gw.upstream.seen == [], "passed on before the body was whole"
        writer.write(b"  ")
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        assert status.split()[1] == b"200", status
        [(seconds, size)] = gw.upstream.bodies
        assert seconds is not None and 1.2 <= float(seconds) < 5, seconds
        assert size == 4
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.post(gw.url + "/v1/completions", content=b"x" * (3 * 1024 * 1024))
        assert r.status_code == 200, r.text
        seconds, size = gw.upstream.bodies[-1]
        assert size == 3 * 1024 * 1024 and seconds is not None and float(seconds) < 5


@needs_nginx
async def test_a_flood_from_one_client_gets_429_json() -> None:
    async with (
        gateway(GATEWAY_RATE_PER_CLIENT="5", GATEWAY_BURST_PER_CLIENT="5") as gw,
        httpx.AsyncClient(timeout=10) as http,
    ):
        started = time.monotonic()
        codes = []
        for _ in range(40):
            r = await http.get(gw.url + "/health")
            codes.append(r.status_code)
            if r.status_code == 429:
                _json_error(r, 429)
                assert r.headers["Retry-After"] == "1"
        elapsed = time.monotonic() - started
        assert set(codes) == {200, 429}, codes
        # burst + rate * elapsed, and one for the leaky bucket's edge
        assert codes.count(200) <= 5 + 1 + 5 * elapsed + 1, (codes, elapsed)
        assert len(gw.upstream.seen) == codes.count(200)


@needs_nginx
async def test_too_many_connections_from_one_client_get_429() -> None:
    async with (
        gateway(GATEWAY_CONN_PER_CLIENT="2") as gw,
        httpx.AsyncClient(timeout=20) as http,
    ):
        held = [asyncio.ensure_future(http.get(gw.url + "/health?hold=1")) for _ in range(2)]
        await _until(lambda: len(gw.upstream.seen) == 2, 5)
        r = await http.get(gw.url + "/health")
        _json_error(r, 429)
        gw.upstream.release.set()
        assert [x.status_code for x in await asyncio.gather(*held)] == [200, 200]


@needs_nginx
async def test_slowloris_header_dribble_is_cut_off_by_the_header_timeout() -> None:
    async with gateway(GATEWAY_HEADER_TIMEOUT="1s") as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        started = time.monotonic()
        closed_after = None
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        for i in range(40):  # 0.2 s apart: a header line that never ends, for up to 8 s
            try:
                writer.write(f"X-Slow-{i}: y\r\n".encode())
                await writer.drain()
                data = await asyncio.wait_for(reader.read(100), timeout=0.2)
            except asyncio.TimeoutError:
                continue
            except ConnectionError:
                data = b""
            # Nginx closes without a response (or with a 408 first).
            assert data == b"" or data.split(b" ")[1] == b"408", data
            closed_after = time.monotonic() - started
            break
        writer.close()
        assert closed_after is not None, "the dribbling client was never cut off"
        assert 0.8 <= closed_after <= 3.0, closed_after
        assert gw.upstream.seen == []


@needs_nginx
async def test_a_client_gone_mid_stream_cancels_the_request_behind_nginx() -> None:
    async with gateway() as gw:
        async with (
            httpx.AsyncClient(timeout=10) as http,
            http.stream("GET", gw.url + "/health?stream=1") as resp,
        ):
            assert resp.status_code == 200
            async for _chunk in resp.aiter_bytes():
                break  # one event, then hang up
        await asyncio.wait_for(gw.upstream.cancelled.wait(), timeout=5)


async def _until(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@needs_nginx
async def test_every_edge_failure_is_json_never_html() -> None:
    """Request-line failures used to get Nginx's HTML 500 (named error locations
    cannot serve them); oversized headers an HTML 400."""
    big = "x" * 9000
    cases = {
        b"GET /%00 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n": 400,
        b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n": 400,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n": 400,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: "
        + big.encode()
        + b"\r\n\r\n": 431,
        b"GET /" + big.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n": 414,
        b"GARBAGE\r\n\r\n": 400,
        b"GET /_error/503 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n": 404,
    }
    async with gateway() as gw:
        for request, expected in cases.items():
            status, headers, body = await raw_http(gw.port, request)
            assert status == expected, (request[:40], status, body[:80])
            assert headers.get("content-type", "").startswith("application/json"), (
                request[:40],
                headers,
            )
            assert json.loads(body)["code"] == expected, body
        assert gw.upstream.seen == []


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _access_logs(workdir: str) -> dict[str, str]:
    return {p.name: p.read_text() for p in Path(workdir).glob("access.log*")}


@needs_nginx
async def test_the_access_log_is_kept_to_its_size_without_losing_a_line() -> None:
    """The watchdog's rotation against the real Nginx: renamed, Nginx told to reopen
    (SIGUSR1) and writing a new file, every request on record exactly once. Nginx
    reopens asynchronously: a request served just after the rename is logged to the
    renamed file, which is why nothing is lost (the oldest-file drop: test_access_log)."""
    async with gateway() as gw, httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        log = Path(gw.workdir, "access.log")
        rotator = AccessLogRotator(log, 4096, keep=3, pid_file=Path(gw.workdir, "nginx.pid"))
        sent: list[str] = []

        async def request(name: str) -> None:
            sent.append(name)
            assert (await http.get(f"/v1/models?{name}")).status_code == 200
            await _until(lambda: f"?{name} " in "".join(_access_logs(gw.workdir).values()), 5)

        for rotation in range(3):
            deadline = time.monotonic() + 30
            while _size(log) <= 4096:  # also: Nginx writes the new file after a rotation
                assert time.monotonic() < deadline, "Nginx never wrote a new access.log"
                await request(f"r{rotation}n{len(sent)}")
            assert rotator.check()
        deadline = time.monotonic() + 30
        while _size(log) == 0:
            assert time.monotonic() < deadline, "Nginx never reopened its access log"
            await request(f"last{len(sent)}")
        assert not rotator.check()  # small again: left alone
        logs = _access_logs(gw.workdir)
        assert sorted(logs) == ["access.log", "access.log.1", "access.log.2", "access.log.3"]
        kept = "".join(logs.values())
        assert all(kept.count(f"?{m} ") == 1 for m in sent), sent
