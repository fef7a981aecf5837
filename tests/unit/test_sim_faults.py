"""Fault knobs: hang (gray failure), error_rate, slow_factor, fail_health, oom, auth."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from ha_agent.config import SimSettings
from ha_agent.sim.faults import Faults
from tests.support.processes import free_port
from tests.unit.conftest import SimClientFactory, sim_json_events, sim_metric, sim_read_sse

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(30)


async def next_event(resp: ClientResponse, timeout: float = 5.0) -> dict:
    raw = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), timeout)
    return json.loads(raw[6:])


async def no_event_within(resp: ClientResponse, seconds: float) -> bool:
    try:
        await asyncio.wait_for(resp.content.readuntil(b"\n\n"), seconds)
    except asyncio.TimeoutError:
        return True
    return False


async def test_hang_stops_tokens_and_health_times_out(sim_client_factory: SimClientFactory):
    """A hung scheduler as on SGLang: no token, no gauge update, /health 503 after its
    timeout (nothing comes out, sglang http_server.py health_generate); /model_info and
    /metrics, served without the scheduler, still answer 200."""
    client = await sim_client_factory(itl=0.005, health_check_timeout=0.3)
    body = {
        "text": "x",
        "stream": True,
        "sampling_params": {"max_new_tokens": 60, "ignore_eos": True},
    }
    running = await client.post("/generate", json=body)
    await next_event(running)
    gauge = await sim_metric(client, "sglang:num_running_reqs")
    assert (await client.post("/sim/faults", json={"hang": True})).status == 200
    tokens = await sim_metric(client, "sglang:realtime_tokens_total", mode="decode")
    fresh = await client.post("/generate", json={**body, "text": "y"})
    assert await no_event_within(fresh, 0.3)  # a new request gets no token either
    await asyncio.sleep(0.05)  # let any byte produced before the hang arrive
    running.content.read_nowait()  # drop what was produced before the hang
    assert await no_event_within(running, 0.2)
    assert await sim_metric(client, "sglang:realtime_tokens_total", mode="decode") == tokens
    assert await sim_metric(client, "sglang:num_running_reqs") == gauge  # frozen
    for path in ("/health", "/health_generate"):
        assert (await client.get(path)).status == 503, path
    for path in ("/model_info", "/metrics", "/server_info"):
        assert (await client.get(path)).status == 200, path
    # An abort is not processed by a hung scheduler; the request stays running.
    await client.post("/abort_request", json={"abort_all": True})
    assert await no_event_within(running, 0.1)
    # Clearing the fault lets the scheduler move again (and process the abort).
    assert (await client.delete("/sim/faults")).status == 200
    for resp in (running, fresh):
        events = sim_json_events(await sim_read_sse(resp))
        assert events[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert (await client.get("/health")).status == 200


async def test_error_rate_is_deterministic_with_sglang_bodies(sim_client_factory):
    client = await sim_client_factory()
    await client.post("/sim/faults", json={"error_rate": 0.5})
    statuses = []
    for _ in range(6):
        resp = await client.post(
            "/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 2}}
        )
        statuses.append(resp.status)
        if resp.status == 500:
            assert "simulated failure" in (await resp.json())["error"]["message"]
    assert statuses == [200, 500] * 3
    resp = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert resp.status == 200
    resp = await client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
    )
    assert resp.status == 500
    err = await resp.json()
    assert err["object"] == "error" and err["type"] == "InternalServerError"
    assert err["code"] == 500
    await client.post("/sim/faults", json={"error_rate": 1.0})
    assert (await client.post("/generate", json={"text": "x"})).status == 500
    await client.delete("/sim/faults")
    assert (
        await client.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1}})
    ).status == 200


async def test_slow_factor_multiplies_latency(sim_client_factory: SimClientFactory):
    client = await sim_client_factory(itl=0.004, ttft_base=0.004)
    body = {"text": "x", "sampling_params": {"max_new_tokens": 25, "ignore_eos": True}}

    async def e2e() -> float:
        t0 = time.monotonic()
        assert (await client.post("/generate", json=body)).status == 200
        return time.monotonic() - t0

    normal = await e2e()
    await client.post("/sim/faults", json={"slow_factor": 5})
    slow = await e2e()
    assert slow / normal > 2.5, (normal, slow)


async def test_fail_health(sim_client: TestClient):
    await sim_client.post("/sim/faults", json={"fail_health": True})
    assert (await sim_client.get("/health")).status == 503
    assert (await sim_client.get("/health_generate")).status == 503
    assert (await sim_client.get("/model_info")).status == 200
    resp = await sim_client.post(
        "/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1}}
    )
    assert resp.status == 200  # only health lies
    await sim_client.delete("/sim/faults")
    assert (await sim_client.get("/health")).status == 200


async def test_faults_endpoint_validation_and_reads(sim_client: TestClient):
    assert await (await sim_client.get("/sim/faults")).json() == Faults().as_dict()
    for bad in ({"hang": "yes"}, {"explode": True}, {"error_rate": 2}, {"slow_factor": 0}, []):
        resp = await sim_client.post("/sim/faults", json=bad)
        assert resp.status == 400, bad
    current = await (await sim_client.post("/sim/faults", json={"slow_factor": 2})).json()
    assert current["slow_factor"] == 2.0 and current["hang"] is False


async def test_admin_token_is_required_when_set(sim_client_factory: SimClientFactory):
    client = await sim_client_factory(admin_token="s3cret")
    assert (await client.get("/sim/faults")).status == 401
    wrong = {"Authorization": "Bearer nope"}
    assert (await client.post("/sim/faults", json={"hang": True}, headers=wrong)).status == 401
    ok = {"Authorization": "Bearer s3cret"}
    assert (await client.post("/sim/faults", json={"fail_health": True}, headers=ok)).status == 200
    assert (await client.get("/health")).status == 503


async def test_faults_closed_without_a_token(sim_client_factory: SimClientFactory):
    client = await sim_client_factory(admin_token=None)
    for method in ("GET", "POST", "DELETE"):
        resp = await client.request(method, "/sim/faults", json={"hang": True})
        assert resp.status == 401, method
    assert (await client.get("/health")).status == 200  # nothing was changed


async def test_non_utf8_token_is_refused_not_a_500(sim_client_factory: SimClientFactory):

    client = await sim_client_factory(admin_token="s3cret")
    # Raw bytes: HTTP clients refuse to send non-ASCII header values themselves.
    request = (
        b"GET /sim/faults HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
        b"Connection: close\r\n\r\n"
    )
    port = client.server.port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status_line.split()[1] == b"401", status_line


async def test_faults_from_settings_and_env(sim_client_factory, monkeypatch):
    client = await sim_client_factory(faults={"fail_health": True, "slow_factor": 3})
    assert (await client.get("/health")).status == 503
    assert (await (await client.get("/sim/faults")).json())["slow_factor"] == 3.0
    monkeypatch.setenv("SIM_FAULTS", '{"hang": true}')
    assert SimSettings().faults == {"hang": True}
    with pytest.raises(ValueError, match="SIM_FAULTS"):
        await sim_client_factory(faults={"nonsense": 1})


# -- oom: a real process, killed like the OOM killer / a CUDA OOM would ---------------
def _spawn(port: int, **env: str) -> subprocess.Popen[bytes]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SIM_")}
    full_env.update({"SIM_STARTUP_DELAY": "0", "PYTHONPATH": str(REPO), **env})
    return subprocess.Popen(
        [sys.executable, "-m", "ha_agent.sim", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _wait_healthy(proc: subprocess.Popen[bytes], port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        try:
            # SGLang's /health answers after its first 1 s look at the earliest (the
            # simulator's default too): a 1 s client timeout raced it and lost.
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    raise AssertionError("simulator did not become healthy")


def _assert_oom_death(proc: subprocess.Popen[bytes]) -> None:
    try:
        _, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert b"torch.OutOfMemoryError: CUDA out of memory." in stderr


def test_oom_knob_kills_the_process_with_sigkill() -> None:
    port = free_port()
    proc = _spawn(port, SIM_ADMIN_TOKEN="t0k")
    try:
        _wait_healthy(proc, port)
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/sim/faults",
            data=b'{"oom": true}',
            method="POST",
            headers={"Content-Type": "application/json", "Authorization": "Bearer t0k"},
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert json.loads(resp.read())["oom"] is True
        _assert_oom_death(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_oom_from_sim_faults_env_at_startup() -> None:
    proc = _spawn(free_port(), SIM_FAULTS='{"oom": true}', SIM_STARTUP_DELAY="0.2")
    _assert_oom_death(proc)


def test_crash_marker_kills_the_process_only_for_the_marked_prompt() -> None:
    port = free_port()
    proc = _spawn(port, SIM_FAULTS='{"crash_marker": "QOD-7f3a"}')
    try:
        _wait_healthy(proc, port)

        def generate(text: str) -> int:
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/generate",
                data=json.dumps({"text": text, "sampling_params": {"max_new_tokens": 2}}).encode(),
                method="POST",
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=5) as resp:
                return int(resp.status)

        assert generate("an innocent prompt") == 200
        with pytest.raises((OSError, http.client.HTTPException)):
            generate("a prompt with QOD-7f3a inside")  # the connection drops
        _, stderr = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == -signal.SIGKILL
    assert b"Scheduler hit an exception" in stderr
    assert b"CUDA error: an illegal memory access" in stderr


async def test_crash_marker_knob_is_validated(sim_client: TestClient) -> None:
    r = await sim_client.post("/sim/faults", json={"crash_marker": 5})
    assert r.status == 400
    r = await sim_client.post("/sim/faults", json={"crash_marker": "X"})
    assert (await r.json())["crash_marker"] == "X"
