"""TLS to the engines: the engine (here the simulator, with SGLang's --ssl-* flags)
serves https, and every client of it -- the relay's pooled session and stream
passthrough, the quarantine probe, the agent's engine client -- verifies it against
the stack's CA (HA_ENGINE_TLS_CA_FILE); another CA's certificate, or none, fails.

The certificates are made by scripts/tls-certs.sh, as `make secrets` makes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from multidict import CIMultiDict
from pydantic import ValidationError

from ha_agent.config import AgentSettings, RelaySettings, SimSettings
from ha_agent.gateway.admission.quarantine import still_answering
from ha_agent.gateway.edge.nginx_sync import render
from ha_agent.gateway.stream.passthrough import open_stream
from ha_agent.gateway.upstream.topology import parse_seed
from ha_agent.gateway.upstream.transport import Transport, UpstreamFailure
from ha_agent.node.__main__ import load_settings
from ha_agent.node.engine.client import EngineClient, EngineUnreachable
from ha_agent.resolver import CachingResolver
from ha_agent.tls import client_context
from tests.support.sim import sim_in_process

ROOT = Path(__file__).resolve().parents[2]
KEY = "engine-key-4c1d9e-never-in-clear"
AUTH = {"Authorization": f"Bearer {KEY}"}
pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@dataclass
class Pki:
    ca: Path  # the stack's CA certificate (tls_ca.crt)
    crt: Path  # the engines' certificate, signed by it
    key: Path
    other_ca: Path  # a CA that did not sign it


def _make(folder: Path, *flags: str) -> None:
    subprocess.run(
        [str(ROOT / "scripts" / "tls-certs.sh"), *flags, str(folder)],
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    stack, other = tmp_path_factory.mktemp("stack"), tmp_path_factory.mktemp("other")
    _make(stack)
    _make(other)
    return Pki(
        stack / "tls_ca.crt",
        stack / "engine_tls.crt",
        stack / "engine_tls.key",
        other / "tls_ca.crt",
    )


@contextlib.asynccontextmanager
async def tls_sim(pki: Pki, **overrides: Any) -> AsyncIterator[str]:
    async with sim_in_process(
        api_key=KEY, ssl_certfile=str(pki.crt), ssl_keyfile=str(pki.key), **overrides
    ) as sim:
        yield sim.url


# -- the setting ----------------------------------------------------------------------------


def test_one_setting_gives_every_client_a_context_that_verifies(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HA_ENGINE_TLS_CA_FILE", str(pki.ca))
    for settings in (RelaySettings(), AgentSettings()):
        ctx = settings.engine_ssl_context()
        assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
        assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
        # The stack's CA alone: a public CA's certificate for the same name is refused.
        assert [c["subject"] for c in ctx.get_ca_certs()] == [
            ((("commonName", "sglang-ha stack CA"),),)
        ]
        assert settings.engine_ssl_context() is ctx  # made once, shared by every session
    monkeypatch.setenv("HA_ENGINE_TLS_CA_FILE", "")
    unset = RelaySettings()
    assert unset.engine_tls_ca_file is None
    assert unset.engine_ssl_context().verify_mode == ssl.CERT_REQUIRED  # the system's CAs


@pytest.mark.parametrize("content", [None, "not a certificate\n"])
def test_a_missing_or_unreadable_ca_file_is_a_settings_error(
    tmp_path: Path, content: str | None
) -> None:
    path = tmp_path / "ca.crt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValidationError, match="engine_tls_ca_file"):
        RelaySettings(engine_tls_ca_file=str(path))


def test_an_agent_advertises_its_engine_with_the_scheme_it_uses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HA_ENGINE_URL", "https://127.0.0.1:30443")
    monkeypatch.delenv("HA_ADVERTISE_ENGINE_URL", raising=False)
    assert (load_settings().advertise_engine_url or "").startswith("https://")
    assert load_settings().advertise_engine_url.endswith(":30443")  # type: ignore[union-attr]


def test_nginx_last_resort_skips_an_engine_that_serves_tls() -> None:
    """Nginx's upstream block is plain HTTP: no broken backup line for a TLS engine."""
    nodes = [parse_seed("sglang-01=https://127.0.0.1:30000=http://127.0.0.1:8008")]
    text = render(nodes, {})
    assert "server " not in text
    assert "# sglang-01: https://127.0.0.1:30000 serves TLS" in text


# -- the simulator, as SGLang with --ssl-certfile -----------------------------------------------


def test_ssl_flags_are_checked_as_sglang_checks_them(pki: Pki) -> None:
    with pytest.raises(ValidationError, match="--ssl-certfile requires --ssl-keyfile"):
        SimSettings(ssl_certfile=str(pki.crt))
    with pytest.raises(ValidationError, match="--ssl-ca-certs has no effect"):
        SimSettings(ssl_ca_certs=str(pki.ca))
    with pytest.raises(ValidationError, match="--enable-ssl-refresh requires"):
        SimSettings(enable_ssl_refresh=True)
    with pytest.raises(ValidationError, match="--ssl-keyfile path"):
        SimSettings(ssl_certfile=str(pki.crt), ssl_keyfile="/nonexistent/key")


async def test_simulator_serves_tls_that_only_the_stack_ca_verifies(pki: Pki) -> None:
    async with tls_sim(pki, ssl_ca_certs=str(pki.ca)) as url:
        assert url.startswith("https://127.0.0.1:")
        async with httpx.AsyncClient(verify=client_context(str(pki.ca)), timeout=5) as c:
            r = await c.get(f"{url}/v1/models", headers=AUTH)
            assert r.status_code == 200, r.text
            # --ssl-ca-certs asks no client certificate (SGLang 0.5.19: no mTLS).
            assert (await c.get(f"{url}/health")).status_code == 200
        for ca in (None, str(pki.other_ca)):  # the system's CAs; another CA
            async with httpx.AsyncClient(verify=client_context(ca), timeout=5) as c:
                with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                    await c.get(f"{url}/health")
        # The port speaks TLS only: plain HTTP gets no HTTP answer.
        async with httpx.AsyncClient(timeout=5) as c:
            with pytest.raises(httpx.TransportError):
                await c.get(url.replace("https://", "http://") + "/health")


async def test_a_rotated_certificate_is_served_without_a_restart(pki: Pki, tmp_path: Path) -> None:
    """--enable-ssl-refresh: new connections get the new certificate, a connection
    opened before keeps working."""
    crt, key = tmp_path / "engine_tls.crt", tmp_path / "engine_tls.key"
    for name in ("tls_ca.crt", "tls_ca.key", "engine_tls.crt", "engine_tls.key"):
        shutil.copy(pki.ca.parent / name, tmp_path / name)
    ctx = client_context(str(pki.ca))

    def serial() -> str:
        pem = ssl.get_server_certificate(("127.0.0.1", port), ca_certs=str(pki.ca))
        return ssl.PEM_cert_to_DER_cert(pem).hex()

    async with sim_in_process(
        api_key=KEY, ssl_certfile=str(crt), ssl_keyfile=str(key), enable_ssl_refresh=True
    ) as sim:
        port = int(sim.url.rsplit(":", 1)[1])
        before = await asyncio.to_thread(serial)
        async with httpx.AsyncClient(verify=ctx, timeout=5) as kept:
            assert (await kept.get(f"{sim.url}/health")).status_code == 200
            await asyncio.to_thread(_make, tmp_path, "--rotate")
            deadline = asyncio.get_running_loop().time() + 10
            while await asyncio.to_thread(serial) == before:
                assert asyncio.get_running_loop().time() < deadline, "never reloaded"
                await asyncio.sleep(0.2)
            assert (await kept.get(f"{sim.url}/health")).status_code == 200
        async with httpx.AsyncClient(verify=ctx, timeout=5) as fresh:
            assert (await fresh.get(f"{sim.url}/v1/models", headers=AUTH)).status_code == 200


# -- the clients ----------------------------------------------------------------------------


async def test_the_relay_verifies_the_engine_on_both_of_its_paths(pki: Pki) -> None:
    """The pooled session (non-streamed requests, warming, aborts) and the streaming
    passthrough's own connections."""
    body = b'{"text": "hi", "sampling_params": {"max_new_tokens": 4}, "stream": true}'
    async with tls_sim(pki) as url:
        good = Transport(0.5, 5.0, AUTH, ssl_context=client_context(str(pki.ca)))
        bad = Transport(0.5, 5.0, AUTH, ssl_context=client_context(str(pki.other_ca)))
        try:
            async with good.session.post(
                f"{url}/generate", data=body.replace(b"true", b"false")
            ) as resp:
                assert resp.status == 200
            headers = good.upstream_headers({"Content-Type": "application/json"})
            conn = await open_stream(url, "/generate", headers, body, good.resolver, 2.0, good.ssl)
            events: list[bytes] = []

            def sink(data: bytes) -> bool:
                events.append(data)
                return b"[DONE]" in data

            try:
                assert (await conn.head())[0] == 200
                await conn.pump(sink)
            finally:
                conn.close()
            assert b"[DONE]" in b"".join(events)
            with pytest.raises(UpstreamFailure) as failed:
                await open_stream(
                    url, "/generate", CIMultiDict(AUTH), body, CachingResolver(), 2.0, bad.ssl
                )
            assert failed.value.connect  # a node we cannot verify is one we cannot reach
            with pytest.raises(Exception, match="certificate verify failed"):
                async with bad.session.post(f"{url}/generate", data=body):
                    pass
        finally:
            await good.close()
            await bad.close()


async def test_the_agent_and_the_quarantine_probe_verify_the_engine(pki: Pki) -> None:
    async with tls_sim(pki) as url:
        settings = AgentSettings(engine_tls_ca_file=str(pki.ca), engine_api_key=KEY)
        ours = EngineClient(
            url, settings.engine_headers(), ssl_context=settings.engine_ssl_context()
        )
        other = EngineClient(url, AUTH, ssl_context=client_context(str(pki.other_ca)))
        try:
            result = await ours.canary(timeout=5.0)
            assert result.ok, result.detail
            await ours.scrape(timeout=5.0)
            with pytest.raises(EngineUnreachable):
                await other.scrape(timeout=5.0)
        finally:
            await ours.close()
            await other.close()
        assert await still_answering(url, 2.0, client_context(str(pki.ca)))
        assert not await still_answering(url, 2.0, client_context(str(pki.other_ca)))


# -- what crosses the wire ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def recording_proxy(target_port: int) -> AsyncIterator[tuple[int, bytearray]]:
    """A TCP forwarder to the engine that keeps every byte client and engine send:
    what a capture on the network between them would see."""
    seen = bytearray()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                seen.extend(data)
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1], seen


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain-control"])
async def test_the_engine_key_crosses_the_wire_only_encrypted(pki: Pki, tls: bool) -> None:
    """The negative control (plain HTTP) shows the key and the request in the bytes,
    so the TLS case's absence of them means something."""
    overrides: dict[str, Any] = (
        {"ssl_certfile": str(pki.crt), "ssl_keyfile": str(pki.key)} if tls else {}
    )
    async with sim_in_process(api_key=KEY, **overrides) as sim:
        port = int(sim.url.rsplit(":", 1)[1])
        async with recording_proxy(port) as (proxy_port, seen):
            url = f"{'https' if tls else 'http'}://localhost:{proxy_port}"
            transport = Transport(0.5, 5.0, AUTH, ssl_context=client_context(str(pki.ca)))
            try:
                async with transport.session.post(
                    f"{url}/generate",
                    data=b'{"text": "hello", "sampling_params": {"max_new_tokens": 2}}',
                ) as resp:
                    assert resp.status == 200
                    await resp.read()
            finally:
                await transport.close()
    assert len(seen) > 200
    if tls:
        assert KEY.encode() not in seen and b"POST /generate" not in seen
        assert seen[:1] == b"\x16" and b"\x17\x03\x03" in seen  # handshake, then records
    else:
        assert KEY.encode() in seen and b"POST /generate" in seen


# -- sglang-ha verify -------------------------------------------------------------------------


class _Container:
    """What verify reads of a node container: its environment and its CA file."""

    def __init__(self, env: dict[str, str], files: dict[str, bytes]) -> None:
        self.attrs = {"Config": {"Env": [f"{k}={v}" for k, v in env.items()]}}
        self.files = files

    def exec_run(self, cmd: list[str]) -> tuple[int, bytes]:
        path = cmd[-1]
        return (0, self.files[path]) if path in self.files else (1, b"no such file")


class _Stack:
    def __init__(self, engine_url: str) -> None:
        self.engine_url = engine_url

    def status(self, node: str) -> Any:
        return type("Status", (), {"engine_url": self.engine_url})()

    def ip(self, container: object) -> str:
        return "172.30.0.5"


async def test_verify_reaches_a_tls_engine_at_its_advertised_url_and_verifies_it(
    pki: Pki,
) -> None:
    from ha_agent.ctl.verify import _chat, _engine_endpoint

    ca = "/run/secrets/tls_ca.crt"
    env = {"HA_ENGINE_URL": "https://127.0.0.1:30000", "HA_ENGINE_TLS_CA_FILE": ca}
    async with tls_sim(pki) as url:
        node = _Container(env, {ca: pki.ca.read_bytes()})
        base, verify = _engine_endpoint(_Stack(url), "sglang-01", node)  # type: ignore[arg-type]
        assert base == url and isinstance(verify, ssl.SSLContext)
        body = {
            "model": "default",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
        }
        r = await asyncio.to_thread(_chat, base, body, 10, AUTH, verify)
        assert r.status_code == 200, r.text
        # The node trusting another CA: verify fails rather than skipping the check.
        other = _Container(env, {ca: pki.other_ca.read_bytes()})
        _, wrong = _engine_endpoint(_Stack(url), "sglang-01", other)  # type: ignore[arg-type]
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await asyncio.to_thread(_chat, base, body, 10, AUTH, wrong)
    # One host, plain HTTP on the internal network: the container's address, as before.
    plain = _Container({"HA_ENGINE_URL": "http://127.0.0.1:30000"}, {})
    assert _engine_endpoint(_Stack(""), "sglang-01", plain) == (  # type: ignore[arg-type]
        "http://172.30.0.5:30000",
        True,
    )
