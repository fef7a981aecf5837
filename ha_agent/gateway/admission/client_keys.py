"""Client keys at the gateway: who may use it, under which name, within which limits.

The check copies SGLang 0.5.19's `--api-key` (python/sglang/srt/utils/auth.py,
`decide_request_auth` and `add_api_key_middleware`), so a client sees what a direct
SGLang would answer:

- `OPTIONS` and paths starting with `/health` or `/metrics` need no key;
- the key is read from `Authorization`, split once on a space: the scheme must be
  `bearer` in any case and the rest equal to a key (no trimming), compared in
  constant time;
- anything else is `401` with the body `{"error": "Unauthorized"}` and no
  `WWW-Authenticate` header.

Unlike SGLang, several keys: a file of `name:key` lines (`make secrets` writes one),
re-read when it changes (at most every `client_keys_poll` s, on the request path: a
stat, no thread), so a key is added or withdrawn without a restart. A request is
judged by the keys in the file when it arrives; a stream admitted with a key that is
withdrawn later runs to its end. A file that becomes unreadable or invalid keeps the
keys last read (logged, without any key).

The key's *name* is the client's identity: it scopes `/abort_request`
(policy.rid_owner), carries the per-key limits (`KeyLimits`) and labels
`sglang_ha_relay_client_requests_total`. No key ever reaches a log line or a label.

Nginx sends the relay the client's `Authorization` in `CLIENT_AUTH_HEADER` (its own
`Authorization` carries the engines' key, for its last-resort path straight to the
engines) and checks the same keys itself (nginx_sync.render_client_keys), so that
path is no way around them.
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from ha_agent.config import ClientAuthSettings, ClientKeyLimit
from ha_agent.gateway.errors import json_response, refusal_at

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"  # the metrics label of a request without a known key
# Set by our Nginx to the client's own Authorization (images/gateway, nginx template).
CLIENT_AUTH_HEADER = "X-SGLang-HA-Client-Authorization"
CLIENT: web.RequestKey[str] = web.RequestKey("sglang_ha_client", str)  # the key's name

NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# RFC 6750's b64token: what a bearer credential may hold, so a key needs no quoting in
# a header or in the Nginx map it is rendered into.
KEY = re.compile(r"[A-Za-z0-9._~+/-]+=*")
MIN_KEY_LENGTH = 16


class KeyFileError(ValueError):
    """The key file is missing or malformed (the message never holds a key)."""


def parse_keys(text: str, source: str = "client keys") -> dict[str, str]:
    """`name:key` per line; blank lines and `#` comments ignored. name -> key."""
    keys: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, key = line.partition(":")
        name, key = name.strip(), key.strip()
        where = f"{source}, line {number}"
        if not sep or not NAME.fullmatch(name):
            raise KeyFileError(
                f"{where}: expected name:key with a name of letters, digits, _ . - (1-64)"
            )
        if name == ANONYMOUS:
            raise KeyFileError(f"{where}: {ANONYMOUS!r} is the label of requests without a key")
        if len(key) < MIN_KEY_LENGTH or not KEY.fullmatch(key):
            raise KeyFileError(
                f"{where}: the key of {name!r} must be at least {MIN_KEY_LENGTH} characters"
                " of A-Z a-z 0-9 . _ ~ + / - (a trailing = allowed)"
            )
        if name in keys:
            raise KeyFileError(f"{where}: {name!r} appears twice")
        if key in keys.values():
            raise KeyFileError(f"{where}: {name!r} has the same key as another name")
        keys[name] = key
    if not keys:
        raise KeyFileError(f"{source}: no key in it (one name:key a line; make secrets)")
    return keys


def read_keys(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise KeyFileError(f"cannot read the client key file {path}: {why}") from None
    return parse_keys(text, str(path))


def bearer(header: str | None) -> bytes | None:
    """The credential of an `Authorization` header as SGLang reads it (`parts[1]` of
    `split(" ", 1)` when `parts[0].lower() == "bearer"`), else None."""
    if not header:
        return None
    scheme, sep, given = header.partition(" ")
    if not sep or scheme.lower() != "bearer":
        return None
    # surrogateescape: a header with bytes that are not UTF-8 is a wrong key, not a 500.
    return given.encode("utf-8", "surrogateescape")


class ClientKeys:
    """The key file as last read; `identify` looks for a change at most every `poll` s."""

    def __init__(
        self, path: Path, poll: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path, self.poll, self.clock = path, poll, clock
        self.keys = read_keys(path)  # raises KeyFileError: no gateway without keys
        self._table = [(k.encode(), name) for name, k in self.keys.items()]
        self._stamp = self._stat()
        self._next_look = clock() + poll
        self._bad_stamp: tuple[int, int, int] | None = None
        log.info("client keys: %d (%s)", len(self.keys), ", ".join(sorted(self.keys)))

    @property
    def names(self) -> list[str]:
        return sorted(self.keys)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def refresh(self, force: bool = False) -> bool:
        """Re-read the file if it changed since it was read; True if the keys changed."""
        now = self.clock()
        if not force and now < self._next_look:
            return False
        self._next_look = now + self.poll
        stamp = self._stat()
        if stamp == self._stamp and not force:
            return False
        try:
            keys = read_keys(self.path)
        except KeyFileError as exc:
            if stamp != self._bad_stamp:  # once per change of the file, not per request
                log.error("%s; keeping the %d keys read before", exc, len(self.keys))
                self._bad_stamp = stamp
            return False
        self._stamp, self._bad_stamp = stamp, None
        if keys == self.keys:
            return False
        added = sorted(set(keys) - set(self.keys))
        dropped = sorted(set(self.keys) - set(keys))
        changed = sorted(n for n in set(keys) & set(self.keys) if keys[n] != self.keys[n])
        self.keys = keys
        self._table = [(k.encode(), name) for name, k in keys.items()]
        log.info(
            "client keys re-read: %d (added %s, withdrawn %s, new key for %s)",
            len(keys),
            ", ".join(added) or "-",
            ", ".join(dropped) or "-",
            ", ".join(changed) or "-",
        )
        return True

    def identify(self, authorization: str | None) -> str | None:
        """The name of the key the header presents, or None."""
        self.refresh()
        given = bearer(authorization)
        if given is None:
            return None
        found = None
        for key, name in self._table:  # every key compared: no timing hint of which
            if hmac.compare_digest(given, key):
                found = name
        return found


def exempt(method: str, path: str) -> bool:
    """What SGLang answers without a key (`decide_request_auth`)."""
    return method == "OPTIONS" or path.startswith(("/health", "/metrics"))


def unauthorized() -> web.Response:
    """SGLang's answer, byte for byte in its fields: 401 `{"error": "Unauthorized"}`."""
    return json_response({"error": "Unauthorized"}, 401)


class _Bucket:
    __slots__ = ("at", "tokens")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens, self.at = tokens, at


@dataclass(frozen=True)
class Refusal:
    message: str
    retry_after: int

    def response(self, path: str) -> web.Response:
        headers = {"Retry-After": str(self.retry_after)}
        return refusal_at(path, 429, self.message, headers)


class KeyLimits:
    """Each key's rate (a token bucket) and requests in flight, in this relay worker.

    The configured limits are the gateway's; each of its `workers` processes keeps
    its own count and takes an even share (as the warming rate, workers.share), so
    a key whose requests bunch on one worker can be refused a little below its
    limit, and the concurrency share is rounded up (at most `workers - 1` over).
    """

    def __init__(
        self,
        limit_of: Callable[[str], ClientKeyLimit],
        workers: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit_of, self.workers, self.clock = limit_of, max(workers, 1), clock
        self.buckets: dict[str, _Bucket] = {}
        self.inflight: dict[str, int] = {}

    def acquire(self, name: str) -> Refusal | None:
        """None, and one more request in flight for `name` (give it back with
        `release`); or the refusal."""
        limit = self.limit_of(name)
        if limit.concurrency:
            allowed = math.ceil(limit.concurrency / self.workers)
            if self.inflight.get(name, 0) >= allowed:
                return Refusal(
                    f"too many requests in flight for client key {name!r}"
                    f" (limit {limit.concurrency}); retry after 1s",
                    1,
                )
        if limit.rate:
            rate = limit.rate / self.workers
            burst = max(1.0, (limit.burst or limit.rate) / self.workers)
            now = self.clock()
            bucket = self.buckets.get(name)
            if bucket is None:
                bucket = self.buckets[name] = _Bucket(burst, now)
            bucket.tokens = min(burst, bucket.tokens + (now - bucket.at) * rate)
            bucket.at = now
            if bucket.tokens < 1.0:
                wait = max(1, math.ceil((1.0 - bucket.tokens) / rate))
                return Refusal(
                    f"client key {name!r} is over its rate ({limit.rate:g} requests/s);"
                    f" retry after {wait}s",
                    wait,
                )
            bucket.tokens -= 1.0
        self.inflight[name] = self.inflight.get(name, 0) + 1
        return None

    def release(self, name: str) -> None:
        left = self.inflight.get(name, 0) - 1
        if left > 0:
            self.inflight[name] = left
        else:
            self.inflight.pop(name, None)


class ClientGate:
    """The relay's one hook: `identify` (401 or the name), then `admit` (429 or a slot)."""

    def __init__(
        self,
        settings: ClientAuthSettings,
        workers: int = 1,
        engine_authorization: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.on = settings.client_auth_on
        self.keys = (
            ClientKeys(settings.client_keys_file, settings.client_keys_poll, clock)
            if self.on
            else None
        )
        self.limits = KeyLimits(settings.client_key_limit, workers, clock)
        # What our Nginx puts in Authorization itself (the engines' key): never a client's.
        self.not_a_client = engine_authorization

    def credential(self, request: web.BaseRequest) -> str | None:
        """The client's Authorization: as Nginx passes it on, or as sent straight here."""
        passed = request.headers.get(CLIENT_AUTH_HEADER)
        if passed is not None:
            return passed
        own = request.headers.get("Authorization")
        return own if own != self.not_a_client else None

    def identify(self, request: web.Request) -> web.Response | None:
        """None (the key's name, or `anonymous`, is in `request[CLIENT]`), or the 401."""
        if self.keys is None or exempt(request.method, request.path):
            request[CLIENT] = ANONYMOUS
            return None
        name = self.keys.identify(self.credential(request))
        if name is None:
            request[CLIENT] = ANONYMOUS
            return unauthorized()
        request[CLIENT] = name
        return None

    def admit(self, request: web.Request) -> web.Response | None:
        """The 429 of a key over its limits, or None with a slot held (`release`)."""
        name = request.get(CLIENT, ANONYMOUS)
        if name == ANONYMOUS:
            return None  # keys off, or a /health probe: Nginx's per-address limits apply
        refused = self.limits.acquire(name)
        return None if refused is None else refused.response(request.path)

    def release(self, request: web.Request) -> None:
        name = request.get(CLIENT, ANONYMOUS)
        if name != ANONYMOUS:
            self.limits.release(name)
