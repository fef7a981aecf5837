"""TLS at the edge, through the running stack: the gateway with GATEWAY_TLS=on and a
certificate from scripts/tls-certs.sh in a directory of the test's own (mounted as the
gateway's compose secrets), so that rotating it touches nothing of the demo's.

- a client verifying against the stack's CA is served, streams included (curl
  --cacert and httpx);
- plain HTTP to the TLS port is refused with a 400;
- a certificate reissued on disk is served to the next handshake without a restart,
  while a stream that runs across the swap completes and no request fails.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.stack import ROOT, Stack, overlay_stack

pytestmark = [pytest.mark.integration]

TLS_CERTS = ROOT / "scripts" / "tls-certs.sh"


class TlsStack:
    def __init__(self, stack: Stack, secrets: Path) -> None:
        self.stack, self.secrets = stack, secrets
        self.ca = secrets / "tls_ca.crt"
        container = stack.container("gateway")
        container.reload()
        self.port = int(container.attrs["NetworkSettings"]["Ports"]["8000/tcp"][0]["HostPort"])
        # `localhost` is in the certificate's names (scripts/tls-certs.sh).
        self.url = f"https://localhost:{self.port}"

    def trust(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def served_serial(self) -> str:
        with (
            socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw,
            self.trust().wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            cert = tls.getpeercert()
        assert cert is not None
        return str(cert["serialNumber"])

    def file_serial(self) -> str:
        out = subprocess.run(
            ["openssl", "x509", "-noout", "-serial", "-in", str(self.secrets / "gateway_tls.crt")],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return out.strip().split("=", 1)[1].upper()

    def rotate(self) -> None:
        subprocess.run(
            ["bash", str(TLS_CERTS), "--rotate", str(self.secrets)],
            check=True,
            capture_output=True,
            timeout=60,
        )


@pytest.fixture(scope="module")
def tls_stack() -> Iterator[TlsStack]:
    secrets = Path(tempfile.mkdtemp(prefix="sglang-ha-edge-tls-"))
    try:
        subprocess.run(
            ["bash", str(TLS_CERTS), str(secrets)], check=True, capture_output=True, timeout=60
        )
        overlay = secrets / "edge-tls.compose.yaml"
        overlay.write_text(
            "services:\n"
            "  gateway:\n"
            "    environment:\n"
            '      GATEWAY_TLS: "on"\n'
            # Looked at every half second, so the test waits little for the swap.
            '      GATEWAY_TLS_CHECK_INTERVAL: "0.5"\n'
            "secrets:\n"
            "  gateway_tls_crt:\n"
            f"    file: {secrets / 'gateway_tls.crt'}\n"
            "  gateway_tls_key:\n"
            f"    file: {secrets / 'gateway_tls.key'}\n"
        )
        with overlay_stack(overlay, "sglang-ha-edge-tls") as stack:
            yield TlsStack(stack, secrets)
    finally:
        shutil.rmtree(secrets, ignore_errors=True)


STREAM = {
    "text": "x",
    "stream": True,
    "sampling_params": {"max_new_tokens": 40, "ignore_eos": True},
}


def test_curl_with_the_stack_ca_is_served(tls_stack: TlsStack) -> None:
    if shutil.which("curl") is None:
        pytest.fail("no curl on this host: run scripts/ensure-test-tools.sh")
    out = subprocess.run(
        [
            "curl", "-sS", "--fail", "--cacert", str(tls_stack.ca),
            "-H", "Content-Type: application/json",
            "-d", '{"model":"default","messages":[{"role":"user","content":"Hi"}],"max_tokens":8}',
            tls_stack.url + "/v1/chat/completions",
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert '"choices"' in out.stdout
    # Without the CA, curl refuses the certificate.
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", tls_stack.url + "/health"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 60, (out.returncode, out.stderr)  # CURLE_PEER_FAILED_VERIFICATION


def test_a_stream_over_tls_arrives_event_by_event(tls_stack: TlsStack) -> None:
    with httpx.Client(verify=tls_stack.trust(), timeout=60) as http:
        with http.stream("POST", tls_stack.url + "/generate", json=STREAM) as r:
            assert r.status_code == 200
            events = [line for line in r.iter_lines() if line.startswith("data:")]
        assert events[-1] == "data: [DONE]"
        assert len(events) > 2


def test_plain_http_to_the_tls_port_is_refused(tls_stack: TlsStack) -> None:
    r = httpx.get(f"http://127.0.0.1:{tls_stack.port}/health", timeout=10)
    assert r.status_code == 400
    assert "https://" in r.json()["message"]


async def test_a_rotated_certificate_is_served_with_no_restart_and_no_failed_request(
    tls_stack: TlsStack,
) -> None:
    gateway = tls_stack.stack.container("gateway")
    gateway.reload()
    started = gateway.attrs["State"]["StartedAt"]
    old = await asyncio.to_thread(tls_stack.served_serial)
    assert old == tls_stack.file_serial()
    long_stream = {**STREAM, "sampling_params": {"max_new_tokens": 600, "ignore_eos": True}}
    failures: list[str] = []
    done = asyncio.Event()

    async def stream() -> list[str]:
        async with (
            httpx.AsyncClient(verify=tls_stack.trust(), timeout=60) as http,
            http.stream("POST", tls_stack.url + "/generate", json=long_stream) as r,
        ):
            assert r.status_code == 200
            return [line async for line in r.aiter_lines() if line.startswith("data:")]

    async def requests() -> int:
        # Short requests on one kept-alive connection the whole time.
        count = 0
        async with httpx.AsyncClient(verify=tls_stack.trust(), timeout=30) as http:
            while not done.is_set():
                try:
                    r = await http.post(
                        tls_stack.url + "/generate",
                        json={"text": "x", "sampling_params": {"max_new_tokens": 2}},
                    )
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:200]}")
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                count += 1
                await asyncio.sleep(0.05)
        return count

    streaming = asyncio.ensure_future(stream())
    polling = asyncio.ensure_future(requests())
    await asyncio.sleep(1.0)
    await asyncio.to_thread(tls_stack.rotate)
    new = tls_stack.file_serial()
    assert new != old
    deadline = time.monotonic() + 20
    while (served := await asyncio.to_thread(tls_stack.served_serial)) != new:
        assert time.monotonic() < deadline, f"still serving {served}, not {new}"
        await asyncio.sleep(0.2)
    assert not streaming.done(), "the stream ended before the swap: make it longer"
    events = await asyncio.wait_for(streaming, 60)
    done.set()
    count = await asyncio.wait_for(polling, 60)
    assert events[-1] == "data: [DONE]"
    # Every token of it, not a stream cut short by the swap.
    assert json.loads(events[-2].removeprefix("data:"))["meta_info"]["completion_tokens"] == 600
    assert count > 10
    assert failures == []
    gateway.reload()
    assert gateway.attrs["State"]["StartedAt"] == started  # no restart
    assert "edge certificate changed on disk" in tls_stack.stack.logs("gateway")
