"""The edge certificate reloaded when it changes on disk, without dropping a connection.

Nginx reads its certificate and key at start and at a reload only. The watchdog (the
gateway's housekeeping process) hashes both files every GATEWAY_TLS_CHECK_INTERVAL;
once their content differs from what Nginx last loaded and the pair is usable (the
key matches the certificate: a rotation writes one file, then the other), it sends
the Nginx master SIGHUP (what `nginx -s reload` sends). The master starts workers
with the new certificate for new connections; the old workers stop accepting and
finish the requests they hold, streams included, before they exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import ssl
from collections.abc import Callable
from pathlib import Path

from ha_agent.atomic_file import write_atomic
from ha_agent.gateway.edge.access_log import nginx_master

log = logging.getLogger(__name__)


def fingerprint(cert: Path, key: Path) -> str | None:
    """Hash of the certificate and key as they are on disk (None while one is unreadable)."""
    digest = hashlib.sha256()
    try:
        for path in (cert, key):
            digest.update(path.read_bytes())
            digest.update(b"\0")
    except OSError:
        return None
    return digest.hexdigest()


def usable(cert: Path, key: Path) -> str | None:
    """Why Nginx could not load this pair (None: it can) -- a reload with a bad pair
    fails and keeps the old one, but says so only in Nginx's own log."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        return str(exc)
    return None


def record_loaded(path: Path, digest: str | None) -> None:
    """Remember which pair Nginx loaded (its hash), across watchdog restarts."""
    if digest is not None:
        with contextlib.suppress(OSError):
            write_atomic(path, digest)


class CertificateWatcher:
    def __init__(
        self,
        cert: Path,
        key: Path,
        pid_file: Path,
        loaded_file: Path | None = None,
        signal_process: Callable[[int, int], None] = os.kill,
    ) -> None:
        self.cert, self.key, self.pid_file = cert, key, pid_file
        self.loaded_file = loaded_file
        self.signal_process = signal_process
        # What Nginx loaded: recorded when its config was rendered and at each reload;
        # without a record, what is on disk now (Nginx starts before the watchdog).
        self.loaded = self._recorded() or fingerprint(cert, key)
        self._refused: str | None = None  # a pair already reported unusable

    def _recorded(self) -> str | None:
        if self.loaded_file is None:
            return None
        try:
            return self.loaded_file.read_text().strip() or None
        except OSError:
            return None

    def check(self) -> bool:
        """Reload Nginx if the pair on disk changed and is usable; True if it was."""
        now = fingerprint(self.cert, self.key)
        if now is None or now == self.loaded:
            return False
        problem = usable(self.cert, self.key)
        if problem is not None:
            if self._refused != now:  # once per content, not every look
                log.warning(
                    "edge certificate changed on disk but is not usable yet (%s);"
                    " Nginx keeps serving the one it has",
                    problem,
                )
                self._refused = now
            return False
        pid = nginx_master(self.pid_file)
        if pid is None:
            return False  # Nginx not up: it loads the new pair when it starts
        try:
            self.signal_process(pid, signal.SIGHUP)
        except ProcessLookupError:
            return False
        self.loaded = now
        if self.loaded_file is not None:
            record_loaded(self.loaded_file, now)
        log.info("edge certificate changed on disk (sha256 %s): Nginx reloaded", now[:12])
        return True

    async def run(self, stop: asyncio.Event, interval: float) -> None:
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.check)
            except Exception:  # never let one bad look end the watch
                log.exception("BUG: edge certificate check failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
