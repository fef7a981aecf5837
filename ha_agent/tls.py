"""TLS to the engines: the one place a client context and the simulator's server context
are made.

An engine serves TLS with SGLang's own flags (`--ssl-certfile`, `--ssl-keyfile`,
`--ssl-ca-certs`, `--enable-ssl-refresh`); whoever reaches it over an ``https://`` URL
(the relay, its warmer and stream passthrough, the agent's scrapes, canaries and
aborts, `sglang-ha verify`) verifies its certificate and name against the stack's CA
(`EngineTLSSettings.engine_tls_ca_file`) through `client_context`. There is no way to
turn verification off: a certificate that does not verify is a failed connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl

log = logging.getLogger(__name__)


def client_context(ca_file: str | None = None, ca_data: str | None = None) -> ssl.SSLContext:
    """A context that verifies the server's certificate chain and host name.

    With `ca_file` or `ca_data` (PEM) only that CA is trusted -- the stack's own, so a
    certificate from any public CA for the same name is refused; with neither, the
    system's CAs (an engine with a publicly issued certificate).
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file, cadata=ca_data)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def server_context(
    certfile: str,
    keyfile: str,
    ca_certs: str | None = None,
    password: str | None = None,
) -> ssl.SSLContext:
    """The context SGLang's uvicorn builds from its --ssl-* flags
    (uvicorn.config.create_ssl_context with uvicorn's defaults: PROTOCOL_TLS_SERVER,
    cert_reqs CERT_NONE, ciphers "TLSv1"): `ca_certs` is loaded, but no client
    certificate is asked for, as in SGLang 0.5.19 ("No MTLS supported for now",
    entrypoints/http_server.py)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certfile, keyfile, (lambda: password) if password else None)
    ctx.verify_mode = ssl.CERT_NONE
    if ca_certs:
        ctx.load_verify_locations(ca_certs)
    ctx.set_ciphers("TLSv1")
    return ctx


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


async def refresh_loop(
    ctx: ssl.SSLContext,
    certfile: str,
    keyfile: str,
    ca_certs: str | None,
    stop: asyncio.Event,
    every: float = 1.0,
) -> None:
    """SGLang's --enable-ssl-refresh (entrypoints/ssl_utils.py, SSLCertRefresher): a
    changed certificate or key is loaded into the serving context in place, so new
    connections get it and open ones are kept; a file that does not load leaves the
    previous certificate. SGLang watches with inotify (watchfiles); this polls the
    files' inode, mtime and size every `every` seconds, which the simulator's users
    (a rotation by `make secrets ROTATE=1`) cannot tell apart."""
    cert_key = (_stamp(certfile), _stamp(keyfile))
    ca = _stamp(ca_certs) if ca_certs else None
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every)
        now = (_stamp(certfile), _stamp(keyfile))
        if now != cert_key:
            cert_key = now
            try:
                ctx.load_cert_chain(certfile, keyfile)
                log.info("SSL cert/key reloaded: cert=%s key=%s", certfile, keyfile)
            except (OSError, ssl.SSLError) as exc:
                # A rotation writes cert and key one after the other: a half-written
                # pair fails here and loads on the next change (the second file's).
                log.warning("SSL cert/key not reloaded, keeping the previous ones: %s", exc)
        if ca_certs:
            now_ca = _stamp(ca_certs)
            if now_ca != ca:
                ca = now_ca
                try:
                    ctx.load_verify_locations(ca_certs)
                    log.info("SSL CA certificates reloaded: ca=%s", ca_certs)
                except (OSError, ssl.SSLError) as exc:
                    log.warning("SSL CA not reloaded, keeping the previous bundle: %s", exc)
