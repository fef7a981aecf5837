"""A file-lock arbiter that stands in for Redis on a single host (optional).

The article's fallback: where both nodes share a host volume, whoever holds an
exclusive flock() on one file there may be primary while the store is away. The
primary takes the lock when it is promoted and keeps it until it steps down; the
kernel drops it when the holder's process dies. So during a Redis outage a standby
can get the lock only when the primary is really gone or has stepped down — and
then fail over, under a new epoch, without Redis.

Single host only: flock() is not reliable across hosts (NFS), so HA_ARBITER_FILE
must stay unset in multi-host deployments.
"""

from __future__ import annotations

import contextlib
import fcntl
import os


class FileArbiter:
    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it. Never blocks."""
        if self._fd is not None:
            return True
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
