"""Least privilege inside the stack, proved from the inside (docs/security.md):
what each container can reach, which secrets it holds, what it may do as a process,
and what the edge does with input meant to wear it down."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.support.raw_http import raw_http
from tests.support.secrets_held import distinct_secret_values, secrets_held
from tests.support.stack import Stack

pytestmark = pytest.mark.integration

# From inside a container's network namespace: each engine's admin and read routes,
# without a key, with a wrong one, and (to show the key is what matters) with the
# real one when KEY_FILE is readable there. Prints {label: status}.
PROBE = r"""
import json, os, sys, urllib.request, urllib.error
key_file = "/run/secrets/engine_api_key"
keys = {"none": None, "wrong": "Bearer wrong"}
if os.access(key_file, os.R_OK):
    keys["key"] = "Bearer " + open(key_file).read().strip()
out = {}
for node in ("node-1", "node-2"):
    for method, path in (("GET", "/get_server_info"), ("POST", "/pause_generation"),
                         ("POST", "/flush_cache"), ("GET", "/v1/models")):
        for label, auth in keys.items():
            if label == "key" and method == "POST":
                continue  # never pause a live engine
            headers = {"Content-Type": "application/json"}
            if auth:
                headers["Authorization"] = auth
            req = urllib.request.Request(f"http://{node}:30000{path}", method=method,
                                         data=b"{}" if method == "POST" else None,
                                         headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=3) as r:
                    code = r.status
            except urllib.error.HTTPError as e:
                code = e.code
            except OSError as e:
                code = type(e).__name__
            out[f"{node} {method} {path} {label}"] = code
print(json.dumps(out))
"""


def _probe_from(stack: Stack, service: str) -> dict[str, Any]:
    """Run PROBE in `service`'s network namespace: a throwaway container from the
    gateway image (Redis images have no Python) that joins it, with no secrets."""
    target = stack.container(service)
    image = stack.container("gateway").image.id
    out = stack.client.containers.run(
        image,
        entrypoint=["/opt/sglang-ha/bin/python", "-c", PROBE],
        network_mode=f"container:{target.id}",
        remove=True,
        cap_drop=["ALL"],
        labels={"com.docker.compose.project": stack.project, "sglang-ha.test": "least"},
    )
    return dict(json.loads(out))


@pytest.mark.parametrize("service", ["redis-1", "sentinel-1"])
def test_the_engines_refuse_redis_and_sentinel(stack: Stack, service: str) -> None:
    stack.wait_stable()
    seen = _probe_from(stack, service)
    assert seen and not any(label.endswith(" key") for label in seen)
    assert set(seen.values()) == {401}, seen


def test_from_the_gateway_only_the_engine_key_opens_an_engine(stack: Stack) -> None:
    """The relay's own container: without its key (a process there that does not read
    the secret file) refused; with it, the engine answers."""
    code, out = stack.container("gateway").exec_run(["python3", "-c", PROBE])
    assert code == 0, out
    seen = json.loads(out)
    keyed = {k: v for k, v in seen.items() if k.endswith(" key")}
    others = {k: v for k, v in seen.items() if not k.endswith(" key")}
    assert keyed and set(keyed.values()) == {200}, keyed
    assert set(others.values()) == {401}, others


# The secrets each service may hold (scripts/secrets.sh, compose/*.yaml), nothing else.
OWN = {
    "redis-1": {"REDIS_PASSWORD"},
    "redis-2": {"REDIS_PASSWORD"},
    "sentinel-1": {"HA_SENTINEL_PASSWORD", "REDIS_SENTINEL_PASSWORD"},
    "sentinel-2": {"HA_SENTINEL_PASSWORD", "REDIS_SENTINEL_PASSWORD"},
    "sentinel-3": {"HA_SENTINEL_PASSWORD", "REDIS_SENTINEL_PASSWORD"},
    "gateway": {
        "HA_ENGINE_API_KEY",
        "HA_CLIENT_KEY",
        "HA_REDIS_PASSWORD",
        "HA_SENTINEL_PASSWORD",
    },
    "node-1": {
        "HA_ENGINE_API_KEY",
        "HA_REDIS_PASSWORD",
        "HA_SENTINEL_PASSWORD",
        "HA_ADMIN_TOKEN",
        "SIM_ADMIN_TOKEN",
    },
}
OWN["node-2"] = OWN["node-1"]


def test_each_container_holds_only_its_own_secrets_and_none_as_environment(
    stack: Stack,
) -> None:
    values = distinct_secret_values(stack.secrets)
    for service, own in OWN.items():
        held, leaked = secrets_held(stack.container(service), values)
        assert held == own, (service, sorted(held))
        assert not leaked, (service, leaked)


def test_every_container_runs_without_capabilities_or_a_writable_root(stack: Stack) -> None:
    for service in OWN:
        c = stack.container(service)
        c.reload()
        host = c.attrs["HostConfig"]
        assert host["CapDrop"] == ["ALL"] and not host["CapAdd"], service
        assert "no-new-privileges:true" in (host["SecurityOpt"] or []), service
        assert host["Memory"] > 0 and host["PidsLimit"] > 0, service
        log = host["LogConfig"]
        assert log["Type"] == "json-file" and log["Config"].get("max-size"), service
        # Sentinels rewrite their config with what they learned: kept writable.
        assert host["ReadonlyRootfs"] is (not service.startswith("sentinel")), service
        # What the processes hold: no effective or bounding capability at all.
        code, out = c.exec_run(["sh", "-c", "grep -E '^Cap(Eff|Bnd)' /proc/1/status"])
        assert code == 0
        assert {line.split()[1] for line in out.decode().splitlines()} == {"0000000000000000"}
        if host["ReadonlyRootfs"]:
            code, out = c.exec_run(["sh", "-c", "touch /etc/x 2>&1 || touch /usr/x 2>&1"])
            assert code != 0 and b"Read-only file system" in out, (service, out)


def test_the_sentinels_reach_redis_only_as_their_restricted_user(stack: Stack) -> None:
    sentinel_pw = stack.secrets["REDIS_SENTINEL_PASSWORD"]
    c = stack.container("sentinel-1")
    for command, allowed in (
        ("PING", True),
        ("INFO replication", True),
        ("GET sglang-ha:sglang-ha:leader", False),
        ("FLUSHALL", False),
        ("CONFIG GET requirepass", False),
        ("ACL LIST", False),
    ):
        _, out = c.exec_run(
            ["sh", "-c", f"redis-cli -h redis-1 --user sentinel {command}"],
            environment={"REDISCLI_AUTH": sentinel_pw},
        )
        assert (b"NOPERM" not in out) is allowed, (command, out)
    # Its password is not the admin one: as `default` it gets nowhere.
    _, out = c.exec_run(
        ["redis-cli", "-h", "redis-1", "PING"], environment={"REDISCLI_AUTH": sentinel_pw}
    )
    assert b"PONG" not in out, out


def _gateway_address(stack: Stack) -> tuple[str, int]:
    parts = urlsplit(stack.gateway_url)
    assert parts.hostname and parts.port
    return parts.hostname, parts.port


async def _raw(host: str, port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    return await raw_http(port, request, host=host, timeout=15)


def test_request_line_and_header_failures_get_json(stack: Stack) -> None:
    host, port = _gateway_address(stack)
    big = b"x" * 9000
    for request, expected in (
        (b"GET /%00 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 400),
        (b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 400),
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + big + b"\r\n\r\n", 431),
    ):
        status, headers, body = asyncio.run(_raw(host, port, request))
        assert status == expected, (request[:30], status, body[:100])
        assert headers["content-type"].startswith("application/json"), headers
        assert json.loads(body)["code"] == expected
    assert b"Bearer xxxx" not in stack.logs("gateway").encode()


def _relay_408s(stack: Stack) -> tuple[float, float]:
    """The relay's 408 answers so far: (all of them, those it held under 1 s)."""
    text = httpx.get(f"http://{stack.ip('gateway')}:8002/metrics", timeout=5).text
    every = quick = 0.0
    for line in text.splitlines():
        if 'code="408"' not in line or line.startswith("#"):
            continue
        name, value = line.rsplit(" ", 1)
        if name.startswith("sglang_ha_relay_request_duration_seconds_count"):
            every += float(value)
        elif name.startswith("sglang_ha_relay_request_duration_seconds_bucket") and (
            'le="1.0"' in name
        ):
            quick += float(value)
    return every, quick


def test_a_slow_body_is_cut_within_the_stated_total(stack: Stack) -> None:
    """1 byte every 2 s never trips Nginx's per-read timeout (GATEWAY_BODY_TIMEOUT).
    Nginx holds the body until it is whole, then the relay refuses it with a JSON 408
    because it took longer than HA_BODY_TIMEOUT: the relay never held the request while
    it trickled in."""
    gateway = stack.container("gateway")
    gateway.reload()
    env = dict(item.split("=", 1) for item in gateway.attrs["Config"]["Env"])
    total = float(env["HA_BODY_TIMEOUT"])
    host, port = _gateway_address(stack)
    start = b'{"model":"default","messages":[{"role":"user","content":"slow"}]'
    # The last byte arrives about 4 s after the total.
    dribbled = int(total / 2) + 2
    relay_before = _relay_408s(stack)

    async def dribble() -> tuple[float, bytes]:
        reader, writer = await asyncio.open_connection(host, port)
        length = len(start) + dribbled + 1
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % length
        )
        writer.write(head + start)
        started = time.monotonic()
        answer = asyncio.create_task(reader.read())
        try:
            for _ in range(dribbled):
                await asyncio.wait({answer}, timeout=2)
                assert not answer.done(), (await answer)[:200]  # nothing before it is whole
                writer.write(b" ")
                await writer.drain()
            await asyncio.wait({answer}, timeout=2)
            writer.write(b"}")
            await writer.drain()
            return time.monotonic() - started, await asyncio.wait_for(answer, 10)
        finally:
            writer.close()

    took, raw = asyncio.run(dribble())
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split()[1] == b"408", raw[:200]
    error = json.loads(body)
    assert error["code"] == 408, error
    # The relay's refusal (Nginx's own 408 says "request not received in time").
    assert f"within {total:g} s" in error["message"], error
    assert total < took <= total + 12, took
    # Answered by the relay at once, on the whole body: it held nothing while it came.
    every, quick = _relay_408s(stack)
    assert (every - relay_before[0], quick - relay_before[1]) == (1, 1), (relay_before, every)
    print(f"slow body refused by the relay {took:.1f} s after its first byte (total {total:g} s)")


def test_engine_steering_fields_are_refused_and_rids_are_ours(stack: Stack) -> None:
    stack.wait_stable()
    url = stack.gateway_url
    with httpx.Client(timeout=30) as http:
        for extra in (
            {"image_data": "file:///etc/passwd"},
            {"image_data": "http://169.254.169.254/latest/meta-data/"},
            {"lora_path": "/data/adapter"},
            {"bootstrap_host": "10.0.0.1"},
            {"custom_logit_processor": "{}"},
        ):
            r = http.post(url + "/generate", json={"text": "hi", **extra})
            # SGLang's native error shape on /generate: {"error": {"message": ...}}.
            assert r.status_code == 400 and r.json()["error"]["message"], (extra, r.text)
        body = {"text": "hi", "rid": "same-rid", "sampling_params": {"max_new_tokens": 4}}
        first, second = (http.post(url + "/generate", json=body) for _ in range(2))
        for r in (first, second):
            assert r.status_code == 200, r.text
            assert r.headers["X-SGLang-HA-Client-Rid"] == "same-rid"
        # The engine sees ours, never the client's: the same one for this client's
        # rid each time (as SGLang sees a reused rid), another client's differs
        # (tests/unit/test_policy.py; through Nginx this machine is one client).
        ours = {r.headers["X-SGLang-HA-Rid"] for r in (first, second)}
        assert len(ours) == 1 and "same-rid" not in ours and ours.pop().startswith("HA_")
        assert {r.json()["meta_info"]["id"] for r in (first, second)} == {
            first.headers["X-SGLang-HA-Rid"]
        }


def test_the_sim_fault_knobs_refuse_a_non_utf8_token(stack: Stack) -> None:
    engine = stack.engine_url("sglang-01")
    host, port = urlsplit(engine).hostname, urlsplit(engine).port
    assert host and port
    status, _, body = asyncio.run(
        _raw(
            host,
            port,
            b"GET /sim/faults HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
            b"Connection: close\r\n\r\n",
        )
    )
    assert status == 401, body
