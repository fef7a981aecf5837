"""The CPU stack as a user meets it: an OpenAI client through the gateway."""

from __future__ import annotations

import subprocess

import httpx
import openai
import pytest

from tests.support.stack import COMPOSE_DIR, NODES, Stack

pytestmark = pytest.mark.integration


def test_chat_completion_through_the_gateway(stack: Stack) -> None:
    client = openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Hello"}], max_tokens=16
    )
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    models = client.models.list()
    assert [m.id for m in models.data] == ["sglang-ha-simulator"]


def test_streaming_chat_completion_through_the_gateway(stack: Stack) -> None:
    client = openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Count"}],
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage, finish = [], None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces)
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens == len([p for p in pieces if p])


def test_sse_is_not_buffered_by_the_gateway(stack: Stack) -> None:
    """The first event arrives long before the last: Nginx passes events through."""
    body = {
        "text": "x",
        "stream": True,
        "sampling_params": {"max_new_tokens": 200, "ignore_eos": True},
    }
    import time

    with httpx.stream("POST", stack.gateway_url + "/generate", json=body, timeout=30) as resp:
        started = time.monotonic()
        first = None
        for line in resp.iter_lines():
            if line.startswith("data:") and first is None:
                first = time.monotonic() - started
        total = time.monotonic() - started
    assert first is not None and first < total / 4, (first, total)


def test_only_the_gateway_is_published(stack: Stack) -> None:
    for service in ("node-1", "node-2", "redis-1", "redis-2", "sentinel-1", "gateway"):
        container = stack.container(service)
        container.reload()
        published = {
            port: bindings
            for port, bindings in (container.attrs["NetworkSettings"]["Ports"] or {}).items()
            if bindings
        }
        if service == "gateway":
            assert list(published) == ["8000/tcp"]
            assert all(b["HostIp"] == "127.0.0.1" for b in published["8000/tcp"])
        else:
            assert not published, f"{service} publishes {published}"


def test_redis_refuses_clients_without_the_password(stack: Stack) -> None:
    _, out = stack.container("redis-1").exec_run(["redis-cli", "set", "x", "1"])
    assert b"NOAUTH" in out
    _, out = stack.container("sentinel-1").exec_run(
        ["redis-cli", "-p", "26379", "sentinel", "masters"]
    )
    assert b"NOAUTH" in out


def test_admin_endpoints_need_the_token(stack: Stack) -> None:
    url = stack.agent_url("sglang-01")
    assert httpx.post(f"{url}/ha/pause", timeout=5).status_code == 401
    r = httpx.post(f"{url}/ha/pause", headers={"Authorization": "Bearer wrong"}, timeout=5)
    assert r.status_code == 401
    metrics = httpx.get(f"{url}/metrics", timeout=5).text
    assert 'sglang_ha_agent_auth_rejected_total{endpoint="/ha/pause"} 2.0' in metrics
    assert stack.secrets["HA_ADMIN_TOKEN"] not in metrics


def test_nodes_run_as_non_root_and_logs_do_not_collide(stack: Stack) -> None:
    seen = set()
    for node, service in NODES.items():
        container = stack.container(service)
        _, out = container.exec_run(["id", "-u"])
        assert out.decode().strip() != "0", f"{service} runs as root"
        status = stack.agent_status(node)
        assert status is not None and status["node"] == node
        log = stack.ha_log(service)
        assert f"AGENT_STARTED {node}" in log
        mounts = {m["Destination"]: m["Name"] for m in container.attrs["Mounts"] if m.get("Name")}
        seen.add(mounts["/var/log/sglang"])
    assert len(seen) == 2, "each node logs to its own volume"


@pytest.mark.parametrize(
    "files",
    [
        ["compose.yaml"],
        ["compose.gpu.yaml"],
        ["control.yaml"],
        ["compose.yaml", "compose.test.yaml"],
    ],
)
def test_every_stack_file_validates(files: list[str]) -> None:
    cmd = ["docker", "compose"] + [a for f in files for a in ("-f", f)] + ["config", "--quiet"]
    result = subprocess.run(cmd, cwd=COMPOSE_DIR, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
