"""A fixed-rate synthetic engine: the upstream for the gateway bars (bench/gateway_bars.py).

    python -m bench.fixed_engine --port P --forward http://127.0.0.1:SIM [--ttft 0.02] [--itl 0.01]

Streamed `/v1/chat/completions` are answered here: the first content event `ttft`
after the request's last byte, then one every `itl` on the stream's own clock
(absolute deadlines, so a late event does not shift the next), each a
chunk in the shape the simulator and SGLang write (role on the first, running usage
when `stream_options.continuous_usage_stats` asks for it, finish chunk, `[DONE]`).
Each content delta is `t<ns>`: `time.monotonic_ns()` when the event was written,
the host-wide clock a client on the same machine reads, so a client sees how long
each event took to reach it. Any other request (non-streaming, `/abort_request`,
the agents' and relay's probes) is passed to the simulator at `--forward` unchanged,
so the engine still looks like SGLang to everything that is not the measured stream.

The first event's deadline is kept by a Linux timerfd (`--timer kernel`, the default):
libuv's timers (uvloop) round to whole milliseconds from a loop clock cached per turn,
which put each stream's first event in one of two 1 ms buckets depending on when its
request arrived, and two requests ~1 ms apart (direct, and through a hop) often in
different ones (gateway-bars-runs/2026-12-06-1830-request-path/pair-noise.json): noise
in the light-latency bar's TTFT within pairs that no gateway made. The following
events stay on the loop's timers at whole milliseconds of the loop's clock from the
request, as before: exactly `itl` apart on that clock, and the events of the streams
due in one tick written together, a little of the burstiness of SGLang's shared
decode step (`--timer loop`: the first event on them too, as before).

Why not the simulator itself: its streams share one decode step (as SGLang's do) and
it competes for the same 2 cores, so it would measure its own step quantisation and
CPU, not the proxy. One write per event, no JSON parsing after the request: a few
microseconds of CPU per event, so the proxy in front is the busy part.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import heapq
import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit

_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_CLOCK_MONOTONIC, _TFD_TIMER_ABSTIME = 1, 1


class KernelTimers:
    """Callbacks at absolute `time.monotonic_ns()` deadlines, woken by one timerfd
    (hrtimer precision, tens of microseconds) armed at the earliest deadline."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.timerfd_create(_CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create")
        self.fd: int = fd
        self._heap: list[tuple[int, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._armed: int | None = None
        self._loop = loop
        loop.add_reader(fd, self._fire)

    def close(self) -> None:
        self._loop.remove_reader(self.fd)
        os.close(self.fd)

    def call_at(self, when_ns: int, callback: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (when_ns, next(self._seq), callback))
        if self._armed is None or when_ns < self._armed:
            self._arm(when_ns)

    def _arm(self, when_ns: int) -> None:
        # A deadline already past fires at once; 0 would disarm, so never ask for it.
        when_ns = max(when_ns, 1)
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(when_ns // 10**9, when_ns % 10**9))
        if self._libc.timerfd_settime(self.fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None):
            raise OSError(ctypes.get_errno(), "timerfd_settime")
        self._armed = when_ns

    def _fire(self) -> None:
        with contextlib.suppress(BlockingIOError):  # re-armed since it fired
            os.read(self.fd, 8)
        self._armed = None
        while self._heap and self._heap[0][0] <= time.monotonic_ns():
            heapq.heappop(self._heap)[2]()
        if self._heap:
            self._arm(self._heap[0][0])


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class _Stream:
    """One streamed answer, written event by event from timer callbacks."""

    def __init__(
        self,
        proto: _Engine,
        body: dict[str, Any],
        received_ns: int,
    ) -> None:
        self.proto = proto
        self.n = max(1, int(body.get("max_tokens") or body.get("max_completion_tokens") or 128))
        opts = body.get("stream_options") or {}
        self.running_usage = bool(opts.get("continuous_usage_stats"))
        self.final_usage = bool(opts.get("include_usage"))
        self.rid = f"fixed-{id(self):x}"
        self.head = (
            b'{"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,"choices":['
            % (self.rid.encode(), int(time.time()), _dumps(body.get("model", "default")))
        )
        self.prompt = 8
        self.sent = 0
        cfg = proto.cfg
        self.ttft, self.itl = cfg.ttft, cfg.itl
        # When the request's last byte was read (the host-wide clock), sent in the first
        # event: the client times the request's path without this engine's own wait.
        self.received_ns = received_ns
        # The later events' deadlines, on the loop's own clock from here.
        self.loop = asyncio.get_running_loop()
        self.start = self.loop.time()
        if proto.kernel_timers is not None:
            proto.kernel_timers.call_at(received_ns + int(cfg.ttft * 1e9), self.tick)
        else:
            self.loop.call_at(self.start + self.ttft, self.tick)

    def _usage(self, k: int) -> bytes:
        return (
            b'{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d,'
            b'"prompt_tokens_details":null,"reasoning_tokens":0}'
            % (self.prompt, self.prompt + k, k)
        )

    def tick(self) -> None:
        if self.proto.closed:
            return
        self.sent += 1
        k = self.sent
        delta = b'"role":"assistant","content":' if k == 1 else b'"content":'
        event = (
            self.head
            + b'{"index":0,"delta":{"reasoning_content":null,'
            + delta
            + b'"t%d"},"logprobs":null,"finish_reason":null,"matched_stop":null}]'
            % time.monotonic_ns()
        )
        if k == 1:  # before the usage, which the relay may cut off (migration.py)
            event += b',"x_received_ns":%d' % self.received_ns
        if self.running_usage:
            event += b',"usage":' + self._usage(k)
        out = _chunk(b"data: " + event + b"}\n\n")
        if k >= self.n:
            out += _chunk(
                b"data: "
                + self.head
                + b'{"index":0,"delta":{"reasoning_content":null},"logprobs":null,'
                b'"finish_reason":"length","matched_stop":null}]}\n\n'
            )
            if self.final_usage:
                out += _chunk(b"data: " + self.head + b'],"usage":' + self._usage(k) + b"}\n\n")
            out += _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
            self.proto.write(out)
            self.proto.done()
            return
        self.proto.write(out)
        self.loop.call_at(self.start + self.ttft + k * self.itl, self.tick)


class _Engine(asyncio.Protocol):
    def __init__(self, cfg: argparse.Namespace, kernel_timers: KernelTimers | None) -> None:
        self.cfg = cfg
        self.kernel_timers = kernel_timers
        self.buf = b""
        self.closed = False
        self.busy = False
        self.transport: asyncio.Transport | None = None
        self.forwarding: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, same interface.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def done(self) -> None:
        self.busy = False
        if self.buf:
            self._next()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next()

    def _next(self) -> None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buf[:end].decode("latin-1")
        lines = head.split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in lines[1:])}
        length = int(headers.get("content-length", "0"))
        if headers.get("transfer-encoding", "").lower() == "chunked":
            # No client here sends chunked bodies (aiohttp sends a length); refuse plainly.
            self.write(b"HTTP/1.1 411 Length Required\r\ncontent-length: 0\r\n\r\n")
            self.buf = b""
            return
        if len(self.buf) < end + 4 + length:
            return
        raw = self.buf[: end + 4 + length]
        body_bytes = raw[end + 4 :]
        self.buf = self.buf[end + 4 + length :]
        self.busy = True
        body: dict[str, Any] = {}
        if method == "POST" and target.split("?")[0] == "/v1/chat/completions":
            try:
                body = json.loads(body_bytes or b"{}")
            except ValueError:
                body = {}
        if body.get("stream"):
            self.write(_HEAD)
            _Stream(self, body, time.monotonic_ns())
        else:
            self.forwarding = asyncio.ensure_future(self._forward(raw))

    async def _forward(self, raw: bytes) -> None:
        """Hand the request to the simulator on a connection of its own, and its answer
        back; the simulator closes after it (`connection: close`), so does this."""
        url = urlsplit(self.cfg.forward)
        head, _, body = raw.partition(b"\r\n\r\n")
        kept = [
            line
            for line in head.split(b"\r\n")
            if not line.lower().startswith((b"connection:", b"keep-alive:"))
        ]
        request = b"\r\n".join([*kept, b"connection: close"]) + b"\r\n\r\n" + body
        try:
            reader, writer = await asyncio.open_connection(url.hostname, url.port)
            writer.write(request)
            answer = await reader.read()
            writer.close()
        except OSError:
            answer = b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n"
        self.write(answer)
        if self.transport is not None:
            self.transport.close()


async def serve(cfg: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    kernel = KernelTimers(loop) if cfg.timer == "kernel" else None
    server = await loop.create_server(
        lambda: _Engine(cfg, kernel), cfg.host, cfg.port, backlog=4096
    )
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fixed_engine", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--forward", required=True, help="the simulator for everything else")
    parser.add_argument("--ttft", type=float, default=0.02)
    parser.add_argument("--itl", type=float, default=0.01)
    parser.add_argument(
        "--timer",
        choices=("kernel", "loop"),
        default=os.environ.get("FIXED_ENGINE_TIMER", "kernel"),
        help="what keeps the first event's deadline (env FIXED_ENGINE_TIMER)",
    )
    cfg = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
