"""Field policy for inference bodies: what a client may make an engine do.

Some request fields make SGLang act outside the request itself:

- media (``image_data`` / ``video_data`` / ``audio_data`` on /generate, ``image_url`` /
  ``video_url`` / ``audio_url`` content parts on the OpenAI routes): SGLang loads a
  string that names a local file from disk and fetches an http(s) URL
  (python/sglang/srt/utils/common.py ``load_image``, ``load_audio``, ``load_video``):
  a local file read or a request from inside the cluster (SSRF). Only ``data:`` URLs
  and inline base64 pass, plus URL prefixes an operator allows (``HA_MEDIA_URL_ALLOW``);
- ``custom_logit_processor``: a serialized (dill) callable the engine runs
  (python/sglang/srt/sampling/custom_logit_processor.py): code execution, refused
  unless ``HA_ALLOW_CUSTOM_LOGIT_PROCESSOR`` (SGLang also needs
  --enable-custom-logit-processor);
- ``lora_path``: picks an adapter by path; ``bootstrap_host`` / ``_port`` / ``_room``:
  make the engine connect to a host for prefill/decode disaggregation. Never a
  client's choice here;
- ``rid``: SGLang's request id, which /abort_request and its bookkeeping key on; a
  client-chosen one can collide with another client's (or a warming mirror's,
  ``HA_WARM_*``). It is replaced by ours, derived from the client (its client key's
  name, else its credential, or its address without one) and its rid
  (``engine_rid``); the client's travels back in the ``X-SGLang-HA-Client-Rid``
  response header. Derived, not drawn and remembered:
  a client's abort by its own rid reaches the same engine rid in whichever relay
  worker it lands, with no state shared between them, and nobody else can name it.
  As on SGLang, one client reusing a rid for two requests at once collides.

``apply`` is called by the relay's request check once the body has passed
ha_agent/openapi/inference.py; a refusal is an ``inference.BadInput`` (400), so it is
answered like every other bad input and never reaches an engine.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ha_agent.config import RelaySettings
from ha_agent.gateway.admission.client_keys import ANONYMOUS, CLIENT
from ha_agent.gateway.admission.prompt_scan import PromptScanner, PromptTooLong
from ha_agent.openapi.inference import NO_CUSTOM_LOGIT_PROCESSOR, BadInput

# Set by our Nginx (nginx.conf.template) to how long the request took to arrive, in
# seconds: it buffers the whole body before passing the request on. Nginx replaces any
# client's own header of this name; sent straight to the relay, it can only get the
# sender refused, as the relay's own read bound applies all the same.
BODY_SECONDS_HEADER = "X-SGLang-HA-Body-Seconds"
CLIENT_RID_HEADER = "X-SGLang-HA-Client-Rid"
RID_HEADER = "X-SGLang-HA-Rid"
RID_PREFIX = "HA_"

# Fields no client may set, with the reason given back.
FORBIDDEN = {
    "lora_path": "adapters are chosen by the operator, not per request",
    "bootstrap_host": "disaggregation endpoints are the operator's",
    "bootstrap_port": "disaggregation endpoints are the operator's",
    "bootstrap_room": "disaggregation endpoints are the operator's",
}
# Keys whose strings SGLang loads as media (a path, a URL, data: or base64).
MEDIA_KEYS = frozenset(
    {"image_data", "video_data", "audio_data", "image_url", "video_url", "audio_url"}
)
# Shorter than this is no real image, audio or video: a short "base64" string is more
# likely a relative path that happens to use base64's alphabet.
_MIN_INLINE = 64


@dataclass(frozen=True)
class FieldPolicy:
    """What the operator allows beyond the defaults (RelaySettings)."""

    media_url_allow: tuple[str, ...] = ()
    allow_custom_logit_processor: bool = False
    body_timeout: float = 60.0
    # What our Nginx puts in Authorization (the engines' key, for its last-resort
    # path): no client's credential, so it never names a client (rid_owner).
    engine_authorization: str = ""

    @classmethod
    def from_settings(cls, settings: RelaySettings) -> FieldPolicy:
        return cls(
            media_url_allow=tuple(settings.media_url_allow),
            allow_custom_logit_processor=settings.allow_custom_logit_processor,
            body_timeout=settings.body_timeout,
            engine_authorization=settings.engine_headers().get("Authorization", ""),
        )


@dataclass
class Applied:
    """The body to send and the rid mapping made for it."""

    body: bytes
    payload: dict[str, Any]
    client_rids: list[str] = field(default_factory=list)
    our_rids: list[str] = field(default_factory=list)

    @property
    def sent(self) -> tuple[bytes, dict[str, Any]]:
        return self.body, self.payload


def _strings(value: Any) -> Iterator[str]:
    """Every string a media field holds: str, lists of them, {"url": ...} objects."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for key in ("url", "data"):
            if key in value:
                yield from _strings(value[key])


def _inline(text: str) -> bool:
    if len(text) < _MIN_INLINE or text.startswith((".", "/", "~")):
        return False
    try:
        binascii.a2b_base64(text.encode("ascii"), strict_mode=True)  # type: ignore[call-arg]
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return False
    return True


def media_allowed(text: str, allow: tuple[str, ...]) -> bool:
    if text.startswith("data:"):
        return True
    if any(text.startswith(prefix) for prefix in allow):
        return True
    return "://" not in text and _inline(text)


def _walk_media(value: Any, policy: FieldPolicy, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if key in MEDIA_KEYS:
                for text in _strings(item):
                    if not media_allowed(text, policy.media_url_allow):
                        raise BadInput(
                            f"{where}{key}: only data: URLs or inline base64 media are"
                            " accepted here (no file paths or remote URLs)"
                        )
            else:
                _walk_media(item, policy, where)
    elif isinstance(value, list):
        for item in value:
            _walk_media(item, policy, where)


def check_fields(payload: dict[str, Any], policy: FieldPolicy) -> None:
    """Raise BadInput for a field this gateway does not let clients use."""
    for name, why in FORBIDDEN.items():
        if payload.get(name) is not None:
            raise BadInput(f"{name} is not accepted: {why}")
    # It runs code on the engine. Refused in SGLang's own words for a server without
    # --enable-custom-logit-processor, so a client sees what a direct SGLang would say.
    if payload.get("custom_logit_processor") and not policy.allow_custom_logit_processor:
        raise BadInput(NO_CUSTOM_LOGIT_PROCESSOR)
    _walk_media(payload, policy, "")


def rid_owner(request: web.BaseRequest, not_a_client: str = "") -> str:
    """Whoever may act on a request: the name of its client key when keys are on
    (client_keys.py; the same after the key is rotated), else the client's
    credential when it sent one, else its address as Nginx saw it. `not_a_client`
    is the Authorization our own Nginx sets (the engines' key): behind it, without
    keys, every client is known by its address."""
    name = request.get(CLIENT)
    if name is not None and name != ANONYMOUS:
        return f"client:{name}"
    auth = request.headers.get("Authorization")
    if auth and auth != not_a_client:
        digest = hashlib.sha256(auth.encode("utf-8", "surrogateescape")).hexdigest()
        return f"key:{digest[:32]}"
    # Set by our Nginx (the relay listens on loopback behind it), not by the client.
    return "addr:" + (request.headers.get("X-Real-IP") or request.remote or "-")


def engine_rid(owner: str, client_rid: str) -> str:
    """The rid an engine sees for `client_rid` sent by `owner`."""
    material = f"{owner}\0{client_rid}".encode("utf-8", "surrogateescape")
    return RID_PREFIX + hashlib.blake2b(material, digest_size=16).hexdigest()


def apply(payload: dict[str, Any], body: bytes, policy: FieldPolicy, owner: str = "") -> Applied:
    """Check the fields, then replace a client's rid(s) with ours (for `owner`).

    The body is re-encoded only when a rid was replaced; otherwise the client's bytes
    go upstream unchanged.
    """
    check_fields(payload, policy)
    rid = payload.get("rid")
    if rid is None:
        return Applied(body, payload)
    clients = [rid] if isinstance(rid, str) else list(rid) if isinstance(rid, list) else None
    if clients is None or not all(isinstance(r, str) for r in clients):
        raise BadInput("rid must be a string or a list of strings")
    ours = [engine_rid(owner, r) for r in clients]
    out = {**payload, "rid": ours[0] if isinstance(rid, str) else ours}
    return Applied(json.dumps(out).encode(), out, clients, ours)


T = TypeVar("T")
_SLICE = 0.5  # s: one wait of within_running_time


async def within_running_time(work: Awaitable[T], timeout: float) -> T | None:
    """`work`'s result, or None once it has taken `timeout` s of this loop's running
    time. A stall of the loop itself (a frozen worker resumed, a blocked loop) is not
    charged: the client's bytes sat in the socket all along, and on resuming, uvloop
    (libuv) fires due timers before it reads the sockets, so a plain deadline would
    turn every request the worker held into a timeout. So it waits in slices, and a
    slice that overran by more than a slice (the loop stood still) does not count."""
    task = asyncio.ensure_future(work)
    # If this wait is cancelled (the client left) as the read fails (its reset), the
    # read's error is nobody's news: mark it seen, not "never retrieved" in the log.
    task.add_done_callback(_seen)
    left = timeout
    loop = asyncio.get_running_loop()
    try:
        while True:
            began, wait = loop.time(), min(left, _SLICE)
            done, _ = await asyncio.wait({task}, timeout=wait)
            if done:
                return task.result()
            elapsed = loop.time() - began
            if elapsed > wait + _SLICE:
                continue  # the loop stalled: look again before blaming the client
            left -= elapsed
            if left <= 0:
                return None
    finally:
        if not task.done():
            task.cancel()


def _seen(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


_APPLIED: web.RequestKey[Applied] = web.RequestKey("sglang_ha_rids", Applied)


class RequestPolicy:
    """The relay's hook: ``checked = policy.check(request, payload, body)``."""

    def __init__(self, policy: FieldPolicy) -> None:
        self.policy = policy

    def install(self, app: web.Application) -> None:
        """Echo the rid pair in the response headers (streams included); quiet
        aiohttp's log of malformed requests."""
        app.on_response_prepare.append(self._headers)
        quiet_protocol_errors()

    async def read_body(self, request: web.Request, scanner: PromptScanner | None = None) -> bytes:
        """The whole body within ``body_timeout`` s in total, else a 408, never an
        engine: as Nginx took it (`BODY_SECONDS_HEADER`; Nginx itself only bounds the
        time between two reads), and as read here (a connection straight to the relay).
        With a scanner, each chunk is followed as it arrives: `PromptTooLong` for a
        prompt that cannot fit, the body after that point read but neither kept nor
        parsed (prompt_scan.py)."""
        read = request.read() if scanner is None else _read_scanning(request, scanner)
        if request.content.is_eof():
            # All of it is buffered already (a small body comes with its head): the read
            # cannot wait, so no task and timer to bound it (on every request's path).
            body = await read
        else:
            got = await within_running_time(read, self.policy.body_timeout)
            if got is None:
                raise self._late()
            body = got
        # Checked once the body is read, as the prompt scan's refusal (_read_scanning):
        # a refusal while Nginx still writes the body could break its connection.
        took = body_seconds(request)
        if took is not None and took > self.policy.body_timeout:
            raise self._late()
        return body

    def _late(self) -> BadInput:
        return BadInput(f"request body not received within {self.policy.body_timeout:g} s", 408)

    def check(self, request: web.Request, payload: dict[str, Any], body: bytes) -> Applied:
        owner = rid_owner(request, self.policy.engine_authorization) if "rid" in payload else ""
        applied = apply(payload, body, self.policy, owner)
        if applied.client_rids:
            request[_APPLIED] = applied
        return applied

    @staticmethod
    async def _headers(request: web.Request, response: web.StreamResponse) -> None:
        applied = request.get(_APPLIED)
        if applied is not None and applied.client_rids:
            # Header values must stay one line of visible ASCII: JSON-quote them.
            response.headers[CLIENT_RID_HEADER] = _header_value(applied.client_rids)
            response.headers[RID_HEADER] = _header_value(applied.our_rids)


def body_seconds(request: web.BaseRequest) -> float | None:
    """How long Nginx took to receive the request (`BODY_SECONDS_HEADER`), or None:
    absent (a connection straight to the relay) or not a number of seconds."""
    value = request.headers.get(BODY_SECONDS_HEADER)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


async def _read_scanning(request: web.Request, scanner: PromptScanner) -> bytes:
    """`request.read()` (the same size limit and 413), feeding each chunk to scanner.

    Once the prompt is too long, the rest is read and dropped (neither kept nor
    parsed), and only then refused: an answer and a close while the sender still
    writes the body can break its connection (with Nginx streaming bodies through, a
    client that reused the connection lost its next request: 5 in 30 after a 4 MB
    prompt, through httpx)."""
    limit = request.client_max_size
    if limit:  # as aiohttp's own read: fewer pause/resume cycles for big bodies
        request.content.set_read_chunk_size(limit)
    body = bytearray()
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if limit and size > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
        if not scanner.over:
            body += chunk
            if scanner.feed(chunk):
                body.clear()
    if scanner.over:
        raise PromptTooLong(scanner)
    return bytes(body)


def _header_value(rids: list[str]) -> str:
    if len(rids) == 1 and rids[0].isascii() and rids[0].isprintable() and len(rids[0]) <= 256:
        return rids[0]
    return json.dumps(rids if len(rids) > 1 else rids[0], ensure_ascii=True)[:4096]


class _ProtocolErrors(logging.Filter):
    """aiohttp logs every malformed request (a header over its 8190 bytes...) at ERROR
    with a traceback that quotes the start of the offending line: often a bearer
    token. Keep one line without any request content, at most once per ``every`` s,
    with the count of those left out."""

    def __init__(self, every: float = 10.0) -> None:
        super().__init__()
        self.every = every
        self.last = -every
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        now = time.monotonic()
        if now - self.last < self.every:
            self.dropped += 1
            return False
        record.msg = "malformed request refused: %s %s (%d more since the last line)"
        record.args = (type(exc).__name__, exc.code, self.dropped)
        record.exc_info = None
        record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        self.last, self.dropped = now, 0
        return True


_QUIET = _ProtocolErrors()


def quiet_protocol_errors() -> None:
    logger = logging.getLogger("aiohttp.server")
    if _QUIET not in logger.filters:
        logger.addFilter(_QUIET)
