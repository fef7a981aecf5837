"""Server-sent events, cut only where an event ends.

The relay forwards whole events so that a stream broken mid-event never reaches
the client half-written, and a migrated stream can be spliced on an event
boundary. It does not parse events on the hot path: it only looks for b"\\n\\n".
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

DONE = b"data: [DONE]\n\n"


class EventSplitter:
    """Feed bytes in; get back the longest prefix made of complete events."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> bytes:
        buf = self._buf + chunk if self._buf else chunk
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            self._buf = buf
            return b""
        self._buf = buf[cut + 2 :]
        return buf[: cut + 2]

    @property
    def pending(self) -> bytes:
        return self._buf


def iter_data(raw: bytes) -> Iterator[str]:
    """The `data:` payload of each event in `raw` (complete events only)."""
    for event in raw.split(b"\n\n"):
        if not event.strip():
            continue
        lines = [
            line[5:].lstrip() if line.startswith(b"data:") else None for line in event.split(b"\n")
        ]
        data = b"\n".join(x for x in lines if x is not None)
        if data:
            yield data.decode("utf-8", errors="replace")


def iter_json(raw: bytes) -> Iterator[dict[str, Any]]:
    """Decoded JSON objects of the events in `raw`; skips [DONE] and non-JSON."""
    for data in iter_data(raw):
        if data == "[DONE]":
            continue
        try:
            value = json.loads(data)
        except ValueError:
            continue
        if isinstance(value, dict):
            yield value


def encode(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def error_event(message: str, code: int = 503, retryable: bool = True) -> bytes:
    """SGLang's in-band stream error, which OpenAI clients raise as an APIError."""
    return encode(
        {
            "error": {
                "message": message,
                "type": "ServiceUnavailableError" if code == 503 else "InternalServerError",
                "code": code,
                "retryable": retryable,
            }
        }
    )
