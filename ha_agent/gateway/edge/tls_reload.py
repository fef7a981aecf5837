"""The edge certificate taken up when it changes on disk, with no Nginx reload at all.

Nginx reads the certificate and key named by a *variable* at every TLS handshake
(`ssl_certificate $edge_tls_pair`, nginx/edge-tls.conf.template), not once at start.
What it reads is not the operator's files but one file of the gateway's own on its
tmpfs (GATEWAY_TLS_PAIR_FILE): the key and the certificate chain together, written
there only once the pair loads (the key matches the certificate), and replaced by a
rename, so that a handshake reads the old pair or the new one, never half of each.

The watchdog (the gateway's housekeeping process) compares the operator's files
with that copy every GATEWAY_TLS_CHECK_INTERVAL and installs a changed pair. The next
handshake gets it; connections already open, and their streams, are not touched.

Why not a reload (SIGHUP): a reload makes the old workers close their idle keep-alive
connections, and a client that sends on one at that instant gets no answer (seen
through the CPU stack, tests/integration/test_edge_tls.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from pathlib import Path

from ha_agent.gateway.edge.periodic import every

log = logging.getLogger(__name__)


def usable(cert: Path, key: Path) -> str | None:
    """Why a handshake could not use this pair (None: it can). A rotation writes one
    file, then the other: a look in between sees a key that fits no certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        return str(exc)
    return None


def pair_text(cert: Path, key: Path) -> str | None:
    """The key, then the certificate chain, as Nginx reads both from one file."""
    try:
        key_text, cert_text = key.read_text(), cert.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    return key_text.rstrip("\n") + "\n" + cert_text.rstrip("\n") + "\n"


def installed(dest: Path) -> str | None:
    try:
        return dest.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def install(cert: Path, key: Path, dest: Path, mode: int = 0o600) -> str | None:
    """Put the pair where Nginx reads it, whole, by a rename; None when done, else why
    not (the pair on disk is not usable now: Nginx keeps the one it has)."""
    text = pair_text(cert, key)
    if text is None:
        return f"cannot read {cert} or {key}"
    problem = usable(cert, key)
    if problem is not None:
        return problem
    if pair_text(cert, key) != text:
        return "changed while it was checked"
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        # The private key: the gateway's user only (Nginx's workers run as it).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return None


class CertificateWatcher:
    def __init__(self, cert: Path, key: Path, dest: Path, mode: int = 0o600) -> None:
        self.cert, self.key, self.dest, self.mode = cert, key, dest, mode
        self._refused: str | None = None  # a pair already reported unusable

    def check(self) -> bool:
        """Install the pair on disk if it differs from what Nginx reads and is usable;
        True if it was installed."""
        text = pair_text(self.cert, self.key)
        if text is None or text == installed(self.dest):
            return False
        problem = install(self.cert, self.key, self.dest, self.mode)
        if problem is not None:
            if self._refused != text:  # once per content, not every look
                log.warning(
                    "edge certificate changed on disk but is not usable yet (%s);"
                    " Nginx keeps serving the one it has",
                    problem,
                )
                self._refused = text
            return False
        log.info("edge certificate changed on disk: served from the next TLS handshake")
        return True

    async def run(self, stop: asyncio.Event, interval: float) -> None:
        await every(interval, self.check, stop, "edge certificate check")
