"""TLS at the edge: the gateway's Nginx config with and without it, and a real nginx
serving the stack's certificate (scripts/tls-certs.sh), refusing plain HTTP on the TLS
port, and taking a certificate rotated on disk without a restart or a failed request.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
import subprocess
import time
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from ha_agent.config import EdgeTlsSettings, is_loopback
from ha_agent.gateway.edge.nginx_conf import TLS_TEMPLATE, render_template, tls_placeholders
from ha_agent.gateway.edge.tls_reload import CertificateWatcher, install
from tests.support.nginx_render import render_into
from tests.unit.test_hardening_nginx import TEMPLATE, Gateway, gateway, needs_nginx, require_nginx  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[2]
TLS_DIRECTIVES = (ROOT / "nginx" / TLS_TEMPLATE).read_text()
TLS_CERTS = ROOT / "scripts" / "tls-certs.sh"


def rendered(**env: str) -> str:
    settings = EdgeTlsSettings(**env)  # type: ignore[arg-type]
    return render_template(TEMPLATE, tls_placeholders(settings, TLS_DIRECTIVES))


def listen_line(conf: str) -> str:
    return re.findall(r"^\s*listen 8000\b[^;]*;", conf, re.M)[0].strip()


# -- the rendered config -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bind", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("", False),
        ("::", False),
        ("192.168.1.10", False),
        ("gateway.example.com", False),
    ],
)
def test_tls_is_on_by_default_wherever_the_gateway_binds_beyond_loopback(
    bind: str, loopback: bool
) -> None:
    assert is_loopback(bind) is loopback
    assert EdgeTlsSettings(bind=bind).tls_enabled is not loopback
    # An explicit setting wins either way.
    assert EdgeTlsSettings(bind=bind, tls="on").tls_enabled
    assert not EdgeTlsSettings(bind=bind, tls="off").tls_enabled


def test_tls_on_renders_tls_12_and_13_only_with_modern_defaults() -> None:
    conf = rendered(tls="on")
    assert listen_line(conf) == "listen 8000 ssl http2 backlog=4096;"
    # Read at each handshake, from the gateway's own checked copy of the pair.
    assert "ssl_certificate     $edge_tls_pair;" in conf
    assert "ssl_certificate_key $edge_tls_pair;" in conf
    assert "map $ssl_server_name $edge_tls_pair { default /run/sglang-ha/edge-tls.pem; }" in conf
    assert re.findall(r"^\s*ssl_protocols ([^;]*);", conf, re.M) == ["TLSv1.2 TLSv1.3"]
    ciphers = re.findall(r"^\s*ssl_ciphers ([^;]*);", conf, re.M)[0].split(":")
    # Forward secrecy and AEAD only: no RSA key exchange, CBC, SHA-1 or DHE suites.
    assert ciphers and all(c.startswith("ECDHE-") for c in ciphers)
    assert all("GCM" in c or "CHACHA20-POLY1305" in c for c in ciphers)
    assert "ssl_prefer_server_ciphers off;" in conf
    assert "ssl_session_tickets off;" in conf
    # The same server block as plain HTTP: every location once, not a second copy.
    assert conf.count("location = /v1/chat/completions") == 1
    assert conf.count("server {") == TEMPLATE.count("server {")
    assert "@" not in re.sub(r"'[^']*'|\"[^\"]*\"", "", conf.split("log_format")[0])


def test_tls_off_renders_no_tls_directive() -> None:
    conf = rendered(tls="off", http2="true")
    assert listen_line(conf) == "listen 8000 backlog=4096;"
    assert not re.search(r"^\s*ssl_", conf, re.M)
    assert "http2" not in listen_line(conf)


def test_http2_is_offered_on_the_tls_listener_unless_turned_off() -> None:
    assert listen_line(rendered(tls="on")) == "listen 8000 ssl http2 backlog=4096;"
    assert listen_line(rendered(tls="on", http2="false")) == "listen 8000 ssl backlog=4096;"


def test_the_pair_nginx_reads_comes_from_the_settings() -> None:
    conf = rendered(tls="on", tls_pair_file="/run/x/pair.pem")
    assert "map $ssl_server_name $edge_tls_pair { default /run/x/pair.pem; }" in conf


# -- a real nginx with the stack's certificates --------------------------------------------


def trust(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def make_certs(directory: Path, rotate: bool = False) -> None:
    args = ["bash", str(TLS_CERTS), *(["--rotate"] if rotate else []), str(directory)]
    subprocess.run(args, check=True, capture_output=True, timeout=60)


def served_serial(port: int, ca: Path) -> str:
    """The serial of the certificate a fresh TLS handshake gets, verified against `ca`."""
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        cert = tls.getpeercert()
    assert cert is not None
    return str(cert["serialNumber"])


def file_serial(cert: Path) -> str:
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-serial", "-in", str(cert)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.strip().split("=", 1)[1].upper()


def tls_env(**more: str) -> dict[str, str]:
    settings = EdgeTlsSettings(tls="on", **more)  # type: ignore[arg-type]
    return tls_placeholders(settings, TLS_DIRECTIVES)


def watcher_for(secrets: Path, gw: Gateway) -> CertificateWatcher:
    """What the gateway's watchdog does, for the test's nginx: its workers run as
    nobody here (the test runs as root), so the pair is readable by all."""
    cert, key = secrets / "gateway_tls.crt", secrets / "gateway_tls.key"
    # /run/sglang-ha/edge-tls.pem in the image; the test's nginx has its own folder.
    return CertificateWatcher(cert, key, Path(gw.workdir) / "edge-tls.pem", mode=0o644)


@contextlib.asynccontextmanager
async def tls_gateway(secrets: Path, **more: str) -> AsyncIterator[Gateway]:
    async with gateway(**tls_env(**more)) as gw:
        assert watcher_for(secrets, gw).check()  # as the gateway's start does
        yield gw


@needs_nginx
async def test_clients_verify_the_edge_against_the_stack_ca(tmp_path: Path) -> None:
    make_certs(tmp_path)
    ca = tmp_path / "tls_ca.crt"
    async with tls_gateway(tmp_path) as gw:
        url = f"https://localhost:{gw.port}"
        async with httpx.AsyncClient(verify=trust(ca), timeout=10) as http:
            r = await http.get(url + "/health")
            assert r.status_code == 200
            assert r.http_version == "HTTP/1.1"
            r = await http.post(url + "/v1/completions?stream=1&events=5", content=b"{}")
            assert r.text == "".join(f"data: {i}\n\n" for i in range(5))
        # Not signed by a CA the client trusts: refused by the client.
        async with httpx.AsyncClient(timeout=10) as http:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await http.get(url + "/health")
        # TLS 1.2 and 1.3 are served, anything older is not.
        for version, served in (
            (ssl.TLSVersion.TLSv1_3, True),
            (ssl.TLSVersion.TLSv1_2, True),
            (ssl.TLSVersion.TLSv1_1, False),
        ):
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.load_verify_locations(str(ca))
            context.set_ciphers("ALL:@SECLEVEL=0")
            with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point
                warnings.simplefilter("ignore", DeprecationWarning)
                context.minimum_version = context.maximum_version = version
            try:
                await asyncio.to_thread(_handshake, gw.port, context)
                got = True
            except ssl.SSLError:
                got = False
            assert got is served, version


def _handshake(port: int, context: ssl.SSLContext) -> None:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost"),
    ):
        pass


@needs_nginx
async def test_plain_http_to_the_tls_port_is_refused_with_a_json_400(tmp_path: Path) -> None:
    make_certs(tmp_path)
    async with tls_gateway(tmp_path) as gw, httpx.AsyncClient(timeout=10) as http:
        r = await http.post(f"http://127.0.0.1:{gw.port}/v1/completions", content=b"{}")
        assert r.status_code == 400
        assert r.headers["content-type"].startswith("application/json")
        assert "https://" in r.json()["message"]
        assert gw.upstream.seen == []  # nothing reached the relay


@needs_nginx
async def test_http2_when_enabled_streams_the_same_events(tmp_path: Path) -> None:
    make_certs(tmp_path)
    ca = tmp_path / "tls_ca.crt"
    async with (
        tls_gateway(tmp_path) as gw,
        httpx.AsyncClient(verify=trust(ca), http2=True, timeout=10) as http,
    ):
        url = f"https://localhost:{gw.port}/v1/chat/completions?stream=1&events=5"
        async with http.stream("POST", url, content=b"{}") as r:
            assert r.http_version == "HTTP/2"
            assert b"".join([c async for c in r.aiter_bytes()]) == b"".join(
                f"data: {i}\n\n".encode() for i in range(5)
            )


def _h2_one_event_then_reset(port: int, ca: Path) -> bytes:
    """An HTTP/2 client that reads the first DATA of a stream, then cancels it with
    RST_STREAM, as a browser or an h2 client that gives up does (httpx just stops
    reading)."""
    import h2.config
    import h2.connection
    import h2.events

    context = trust(ca)
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        headers = [
            (":method", "GET"),
            (":path", "/health?stream=1"),
            (":scheme", "https"),
            (":authority", "localhost"),
        ]
        conn.send_headers(1, headers, end_stream=True)
        tls.sendall(conn.data_to_send())
        while True:
            data = tls.recv(65536)
            assert data, "connection closed before any event"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    conn.reset_stream(1)
                    tls.sendall(conn.data_to_send())
                    return bytes(event.data)


@needs_nginx
async def test_an_http2_client_that_cancels_a_stream_cancels_the_request_behind_nginx(
    tmp_path: Path,
) -> None:
    make_certs(tmp_path)
    async with tls_gateway(tmp_path) as gw:
        first = await asyncio.to_thread(_h2_one_event_then_reset, gw.port, tmp_path / "tls_ca.crt")
        assert first.startswith(b"data: 0")
        await asyncio.wait_for(gw.upstream.cancelled.wait(), timeout=5)


@needs_nginx
async def test_a_rotated_certificate_is_served_without_a_restart_or_a_failed_request(
    tmp_path: Path,
) -> None:
    make_certs(tmp_path)
    ca = tmp_path / "tls_ca.crt"
    cert = tmp_path / "gateway_tls.crt"
    async with tls_gateway(tmp_path) as gw:
        watcher = watcher_for(tmp_path, gw)
        old = await asyncio.to_thread(served_serial, gw.port, ca)
        assert old == file_serial(cert)
        url = f"https://localhost:{gw.port}"
        failures: list[str] = []
        done = asyncio.Event()

        async def stream() -> bytes:
            # ~3 s of events, across the swap.
            async with (
                httpx.AsyncClient(verify=trust(ca), timeout=20) as http,
                http.stream("POST", url + "/v1/completions?stream=1&events=60", content=b"{}") as r,
            ):
                assert r.status_code == 200
                return b"".join([c async for c in r.aiter_bytes()])

        async def requests() -> int:
            # Short requests on a kept-alive connection the whole time.
            count = 0
            async with httpx.AsyncClient(verify=trust(ca), timeout=10) as http:
                while not done.is_set():
                    try:
                        r = await http.get(url + "/health")
                        if r.status_code != 200:
                            failures.append(f"{r.status_code} {r.text}")
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
                    count += 1
                    await asyncio.sleep(0.02)
            return count

        streaming = asyncio.ensure_future(stream())
        polling = asyncio.ensure_future(requests())
        await asyncio.sleep(0.5)
        assert not watcher.check()  # nothing changed yet
        await asyncio.to_thread(make_certs, tmp_path, True)
        new = file_serial(cert)
        assert new != old
        assert watcher.check()  # changed and usable: handed to Nginx
        assert not watcher.check()  # once per change
        deadline = time.monotonic() + 10
        while (served := await asyncio.to_thread(served_serial, gw.port, ca)) != new:
            assert time.monotonic() < deadline, f"still serving {served}, not {new}"
            await asyncio.sleep(0.1)
        body = await asyncio.wait_for(streaming, 20)
        done.set()
        count = await asyncio.wait_for(polling, 20)
        assert body == b"".join(f"data: {i}\n\n".encode() for i in range(60))
        assert count > 20
        assert failures == []


def test_a_half_written_pair_is_not_handed_to_nginx(tmp_path: Path) -> None:
    make_certs(tmp_path)
    cert, key = tmp_path / "gateway_tls.crt", tmp_path / "gateway_tls.key"
    pair = tmp_path / "edge-tls.pem"
    watcher = CertificateWatcher(cert, key, pair)
    assert watcher.check()
    assert pair.stat().st_mode & 0o777 == 0o600  # a private key: the gateway's user only
    first = pair.read_text()
    assert first.index("PRIVATE KEY") < first.index("CERTIFICATE")
    old_cert = cert.read_bytes()
    make_certs(tmp_path, rotate=True)
    new_cert = cert.read_bytes()
    # The new key is on disk, the certificate still the old one: not usable, not handed on.
    cert.write_bytes(old_cert)
    assert not watcher.check()
    assert pair.read_text() == first
    cert.write_bytes(new_cert)
    assert watcher.check()
    assert pair.read_text() == key.read_text() + cert.read_text()


def _main_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **env: str) -> Path:
    # Client keys have their own tests (test_client_keys.py): off here.
    conf = render_into(
        monkeypatch,
        tmp_path,
        GATEWAY_TLS_PAIR_FILE=str(tmp_path / "edge-tls.pem"),
        HA_CLIENT_AUTH="off",
    )
    for name in ("GATEWAY_TLS", "GATEWAY_BIND", "GATEWAY_HTTP2"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return conf


def test_the_gateway_start_renders_tls_beyond_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ha_agent.gateway.edge import nginx_conf

    make_certs(tmp_path)
    conf = _main_env(
        monkeypatch,
        tmp_path,
        GATEWAY_BIND="0.0.0.0",
        GATEWAY_TLS_CERT=str(tmp_path / "gateway_tls.crt"),
        GATEWAY_TLS_KEY=str(tmp_path / "gateway_tls.key"),
    )
    assert nginx_conf.main() == 0
    assert listen_line(conf.read_text()) == "listen 8000 ssl http2 backlog=4096;"
    pair = tmp_path / "edge-tls.pem"
    assert pair.read_text().endswith((tmp_path / "gateway_tls.crt").read_text())
    conf = _main_env(monkeypatch, tmp_path, GATEWAY_BIND="127.0.0.1")
    assert nginx_conf.main() == 0
    assert listen_line(conf.read_text()) == "listen 8000 backlog=4096;"


def test_the_gateway_refuses_to_start_with_tls_on_and_no_usable_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ha_agent.gateway.edge import nginx_conf

    conf = _main_env(
        monkeypatch,
        tmp_path,
        GATEWAY_TLS="on",
        GATEWAY_TLS_CERT=str(tmp_path / "none.crt"),
        GATEWAY_TLS_KEY=str(tmp_path / "none.key"),
    )
    assert nginx_conf.main() == 2
    assert "make secrets" in capsys.readouterr().err
    assert not conf.exists()


class FakeStack:
    """What `sglang-ha verify`'s edge TLS check asks of the stack, for a local nginx."""

    def __init__(self, bound: str, port: int, ca: Path) -> None:
        self.bound, self.port, self.ca = bound, port, ca

    def gateway_binding(self) -> tuple[str, str, int]:
        return self.bound, "127.0.0.1", self.port

    def edge_tls(self) -> bool:
        from ha_agent.ctl.verify import _speaks_tls

        return _speaks_tls("127.0.0.1", self.port)

    @property
    def verify(self) -> ssl.SSLContext | bool:
        return trust(self.ca) if self.ca.is_file() else True


@needs_nginx
async def test_verify_passes_a_verified_edge_and_fails_plain_http_beyond_loopback(
    tmp_path: Path,
) -> None:
    from ha_agent.ctl.verify import check_edge_tls

    make_certs(tmp_path)
    ca = tmp_path / "tls_ca.crt"
    other = tmp_path / "other"
    make_certs(other)  # another CA: the edge's certificate does not verify against it

    def check(stack: FakeStack, min_days: int = 30) -> tuple[str, str]:
        c = check_edge_tls(stack, min_days)  # type: ignore[arg-type]
        return c.status, c.seen

    async with tls_gateway(tmp_path) as gw:
        status, seen = await asyncio.to_thread(check, FakeStack("0.0.0.0", gw.port, ca))
        assert status == "pass", seen
        assert "TLSv1.3" in seen and "days left" in seen
        status, seen = await asyncio.to_thread(
            check, FakeStack("0.0.0.0", gw.port, other / "tls_ca.crt")
        )
        assert status == "fail" and "does not verify" in seen
        # Leaf certificates live 397 days: one asked to last 400 more is near its end.
        status, seen = await asyncio.to_thread(check, FakeStack("0.0.0.0", gw.port, ca), 400)
        assert status == "fail" and "days left" in seen
    async with gateway() as gw:
        status, seen = await asyncio.to_thread(check, FakeStack("0.0.0.0", gw.port, ca))
        assert status == "fail" and "plain HTTP" in seen
        status, seen = await asyncio.to_thread(check, FakeStack("127.0.0.1", gw.port, ca))
        assert status == "pass" and "loopback only" in seen


def test_a_restarted_watchdog_still_hands_on_a_change_it_did_not_see(tmp_path: Path) -> None:
    make_certs(tmp_path)
    cert, key = tmp_path / "gateway_tls.crt", tmp_path / "gateway_tls.key"
    pair = tmp_path / "edge-tls.pem"
    assert install(cert, key, pair) is None  # as the gateway's start does
    assert not CertificateWatcher(cert, key, pair).check()
    make_certs(tmp_path, rotate=True)  # while no watchdog runs
    assert CertificateWatcher(cert, key, pair).check()
    assert not CertificateWatcher(cert, key, pair).check()
