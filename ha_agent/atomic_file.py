"""Files other processes read while we replace them."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | Path, text: str) -> None:
    """Replace `path` with `text` so a reader sees the old file or the new one, never
    half of one. The temporary name carries the pid: several processes (the relay
    workers, the watchdog) may write the same file at once."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
