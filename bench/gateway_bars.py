"""The gateway's latency and worker-scaling bars, against a fixed-rate synthetic engine.

    python -m bench --phases light-latency,relay-scaling     (under the Docker lock)

Local processes, no Docker: a redis-server, two simulators with their agents (as
bench/relay_local.py), in front of each simulator a fixed-rate engine
(bench/fixed_engine.py) that answers the streams, and the relay as its own
process(es) (`python -m ha_agent.gateway`, `HA_RELAY_WORKERS` of them on one
SO_REUSEPORT port, and each on its own Unix socket, as in the gateway image). The
relay is reached directly, and through the whole gateway: the host's nginx with the
gateway's own configuration in front of the workers' sockets (`host_gateway_conf`).

light-latency: 1, 2 and 4 client slots; each slot sends the same 32-token stream
  straight to the engine and through the relay at the same instant (the order
  alternating), again and again, until `latency_pairs` pairs (240: a p99 of a few
  dozen would be their maximum). Per pair: relay TTFT − direct TTFT; per event k of
  the pair: the relay stream's gap before event k − the direct stream's (added
  inter-token latency), and the relay's delivery delay − direct's (each event
  carries the engine's write time, `time.monotonic_ns()`, one clock for every
  process on the host). The same pairs again through the whole gateway and through
  Nginx alone (the reference hop in C), each slot count right after the relay's.
  Bar, read on the whole gateway's pairs: p50 ≤ 1 ms, p99 ≤ 3 ms for TTFT and ITL. The TTFT is
  also given as the relay's quantile less the direct one's over the same pairs: the
  within-pair differences hold the host's jitter between the pair's two requests
  too, once they reach it apart (docs/benchmarks.md, "Where the relay's TTFT tail
  comes from").
relay-scaling: open-loop arrivals of 128-event streams (10 ms apart) at rising
  offered rates, through the relay with 1 and then 2 workers; events delivered per
  second in each window. Saturation throughput is the highest delivered rate over
  the offered rates. Bar: 2 workers ≥ 1.8 × 1 worker, with cores to spare: each
  worker is capped at `scaling_cap` of a core (a cgroup CPU quota, bench/cpu_cap.py),
  so that a worker saturates at its cap while the host still has idle CPU, as it would
  with a core of its own on a bigger host; uncapped on a 2-core host, one worker
  already saturates the host with the engine and the client. The CPU of the relay,
  the engine and the client and the host's busy cores over each window are recorded.
"""

# ruff: noqa: ASYNC220, ASYNC240  (set-up and teardown of local processes)
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx

from bench.cpu import host_busy_seconds, processes_cpu_seconds
from bench.cpu_cap import CapUnavailable, CpuCap
from bench.stacks import direct_nginx_conf
from ha_agent.gateway.edge.nginx_conf import render_template
from ha_agent.gateway.edge.nginx_sync import (
    relay_worker_socket,
    relay_worker_sockets,
    render,
    render_client_keys,
    render_relay_servers,
)
from ha_agent.gateway.edge.workers import nginx_worker_count
from ha_agent.gateway.upstream.topology import parse_seed
from tests.support.cluster import LocalCluster, local_cluster
from tests.support.processes import free_port, redis_server

NAMES = ("sglang-01", "sglang-02")
ITL = 0.01
TTFT = 0.02
LATENCY_BAR = {"p50": 1.0, "p99": 3.0}  # ms, added by the relay
SCALING_BAR = 1.8
_EVENT = re.compile(rb'"content":"t(\d+)"')
_RECEIVED = re.compile(rb'"x_received_ns":(\d+)')


@dataclass(frozen=True)
class BarsConfig:
    slots: tuple[int, ...] = (1, 2, 4)
    # Pairs per slot count: a p99 needs a few hundred (of 37 it is the maximum).
    latency_pairs: int = 240
    latency_seconds: float = 120.0  # the most a slot count may take to collect them
    latency_tokens: int = 32
    scaling_workers: tuple[int, ...] = (1, 2)
    # Offered events/s; the relay alone costs tens of µs per event, so one worker
    # capped at a quarter of a core saturates inside this range, and two at twice that.
    offered: tuple[int, ...] = (2000, 4000, 6000, 7000, 8000, 10000, 12000, 14000, 16000)
    scaling_tokens: int = 128
    # Each relay worker capped at this many cores (bench/cpu_cap.py) so that it
    # saturates with the host's cores still partly idle; 0: uncapped.
    scaling_cap: float = 0.25
    scaling_warmup: float = 1.5
    scaling_seconds: float = 4.0


# -- client (its own process: `python -m bench.gateway_bars client PLAN OUT`) ----------


class _Stream(asyncio.Protocol):
    """One raw HTTP/1.1 streamed request; arrival times of the content events."""

    def __init__(self, request: bytes, keep_times: bool, done: asyncio.Future[None]) -> None:
        self.request = request
        self.keep_times = keep_times
        self.done = done
        self.buf = b""
        self.sent_ns = 0
        self.received_ns = 0  # when the engine had the whole request (its first event says)
        self.arrivals: list[tuple[int, int]] = []  # (arrival ns, engine write ns)
        self.count = 0
        self.counts: list[tuple[int, int]] = []  # (arrival ns, events in this read)
        self.status = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, same interface.
        self.transport = cast(asyncio.Transport, transport)
        self.sent_ns = time.monotonic_ns()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        self.buf += data
        cut = self.buf.rfind(b"\n\n")
        if cut < 0:
            return
        ready, self.buf = self.buf[: cut + 2], self.buf[cut + 2 :]
        if not self.status and ready.startswith(b"HTTP/1.1 "):
            self.status = int(ready[9:12])
        if self.keep_times:
            if not self.arrivals:
                received = _RECEIVED.search(ready)
                self.received_ns = int(received.group(1)) if received else 0
            self.arrivals += [(now, int(t)) for t in _EVENT.findall(ready)]
        else:
            n = ready.count(b'"content":"t')
            self.count += n
            self.counts.append((now, n))
        if b"data: [DONE]" in ready and self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


def _request(host: str, port: int, tokens: int) -> bytes:
    body = json.dumps(
        {
            "model": "default",
            "messages": [{"role": "user", "content": "count"}],
            "max_tokens": tokens,
            "stream": True,
            "ignore_eos": True,
        }
    ).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: %s:%d\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s"
        % (host.encode(), port, len(body), body)
    )


async def _one(
    url: str, tokens: int, keep_times: bool, timeout: float, sink: list[_Stream] | None = None
) -> _Stream:
    host, port = url.removeprefix("http://").split(":")
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    proto = _Stream(_request(host, int(port), tokens), keep_times, done)
    if sink is not None:
        sink.append(proto)
    try:
        await loop.create_connection(lambda: proto, host, int(port))
        await asyncio.wait_for(done, timeout)
    except (OSError, TimeoutError):
        pass
    finally:
        # Cut off or cancelled at the window's end: the stream must not go on loading
        # the relay while the next rate is measured.
        if proto.transport is not None and not done.done():
            proto.transport.close()
    return proto


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def quantiles_added(relay: list[float], direct: list[float]) -> dict[str, float | None]:
    """The relay's TTFT quantile − the direct one's, over the same pairs: what the relay
    adds to the distribution a client sees. The pairwise differences' own p99 also
    holds the host's jitter between the pair's two requests (they reach the engine
    apart), 1.7-2.3 ms with nothing in between on the dev host (gateway-bars-runs/,
    2026-12-07-2230-engine-timer)."""
    out: dict[str, float | None] = {}
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        r, d = _pct(relay, q), _pct(direct, q)
        out[name] = None if r is None or d is None else r - d
    return out


async def _pairs(plan: dict[str, Any]) -> dict[str, Any]:
    """`slots` loops, each sending one stream direct and one through the relay at once."""
    ttft: list[float] = []
    each: dict[str, list[float]] = {"direct": [], "relay": []}  # each stream's TTFT, ms
    itl: list[float] = []
    delay: list[float] = []
    path: list[float] = []  # the request's path added, plus the first event's
    failed = pairs = 0
    end = time.monotonic() + plan["seconds"]

    async def slot(i: int) -> None:
        nonlocal failed, pairs
        k = i
        while time.monotonic() < end and pairs + failed < plan["pairs"]:
            first, second = ("direct", "relay") if k % 2 == 0 else ("relay", "direct")
            k += 1
            got = await asyncio.gather(
                _one(plan[first], plan["tokens"], True, 30.0),
                _one(plan[second], plan["tokens"], True, 30.0),
            )
            by = {first: got[0], second: got[1]}
            d, r = by["direct"], by["relay"]
            if len(d.arrivals) != plan["tokens"] or len(r.arrivals) != plan["tokens"]:
                failed += 1
                continue
            pairs += 1
            each["relay"].append((r.arrivals[0][0] - r.sent_ns) / 1e6)
            each["direct"].append((d.arrivals[0][0] - d.sent_ns) / 1e6)
            ttft.append(each["relay"][-1] - each["direct"][-1])
            for j in range(1, plan["tokens"]):
                gap_r = r.arrivals[j][0] - r.arrivals[j - 1][0]
                gap_d = d.arrivals[j][0] - d.arrivals[j - 1][0]
                itl.append((gap_r - gap_d) / 1e6)
            for (ar, er), (ad, ed) in zip(r.arrivals, d.arrivals, strict=True):
                delay.append(((ar - er) - (ad - ed)) / 1e6)
            if r.received_ns and d.received_ns:
                # TTFT added, less the engine's wait between the request and its first
                # event (20 ms on a libuv timer, whose 1 ms rounding puts the relay's
                # first event in the direct one's millisecond or the next).
                to_engine = (r.received_ns - r.sent_ns) - (d.received_ns - d.sent_ns)
                (ar, er), (ad, ed) = r.arrivals[0], d.arrivals[0]
                path.append((to_engine + (ar - er) - (ad - ed)) / 1e6)

    await asyncio.gather(*(slot(i) for i in range(plan["slots"])))

    def summary(xs: list[float]) -> dict[str, Any]:
        return {
            "n": len(xs),
            "p50": _pct(xs, 0.5),
            "p99": _pct(xs, 0.99),
            "mean": statistics.mean(xs) if xs else None,
            "worst": sorted(xs)[-8:],
        }

    return {
        "slots": plan["slots"],
        "pairs": pairs,
        "failed_pairs": failed,
        "ttft_added_ms": summary(ttft),
        "ttft_quantiles_added_ms": quantiles_added(each["relay"], each["direct"]),
        "itl_added_ms": summary(itl),
        "event_delay_added_ms": summary(delay),
        "path_added_ms": summary(path),
    }


async def _open_loop(plan: dict[str, Any]) -> dict[str, Any]:
    """Streams started at a fixed rate whatever happens to the earlier ones."""
    loop = asyncio.get_running_loop()
    rate = plan["offered"] / plan["tokens"]  # streams per second
    t0 = loop.time()
    lo, hi = t0 + plan["warmup"], t0 + plan["warmup"] + plan["seconds"]
    tasks: list[asyncio.Task[_Stream]] = []
    streams: list[_Stream] = []
    groups = {k: [int(p) for p in v] for k, v in plan["pids"].items()}
    groups["client"] = [os.getpid()]
    i = 0
    cpu0: dict[str, float] = {}
    host0 = host_busy_seconds()
    while (start := t0 + i / rate) < hi:
        if not cpu0 and loop.time() >= lo:
            cpu0 = {k: processes_cpu_seconds(v) for k, v in groups.items()}
            host0 = host_busy_seconds()
        await asyncio.sleep(max(0.0, start - loop.time()))
        tasks.append(
            asyncio.ensure_future(
                _one(plan["url"], plan["tokens"], False, hi - loop.time() + 5, streams)
            )
        )
        i += 1
    await asyncio.sleep(max(0.0, hi - loop.time()))
    cpu1 = {k: processes_cpu_seconds(v) for k, v in groups.items()}
    host1 = host_busy_seconds()
    span = hi - (lo if cpu0 else t0)
    lo_ns, hi_ns = int(lo * 1e9), int(hi * 1e9)
    # loop.time() is time.monotonic() (asyncio's and uvloop's loops alike).
    in_window = sum(n for s in streams for t, n in s.counts if lo_ns <= t < hi_ns)
    running = [t for t in tasks if not t.done()]
    finished = [s for s in streams if s.done.done()]
    for task in running:
        task.cancel()
    for task in running:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    cpu = {k: round((cpu1[k] - cpu0.get(k, 0.0)) / span, 3) for k in groups}
    busy = (host1 - host0) / span  # the host's busy cores over the same window
    return {
        "offered_events_per_s": plan["offered"],
        "streams_started": len(tasks),
        "streams_open_at_end": len(running),
        "failed": sum(1 for s in finished if s.status != 200),
        "delivered_events_per_s": round(in_window / plan["seconds"], 1),
        "cores": cpu,
        "host_busy_cores": round(busy, 2),
    }


async def _client(plan_file: str, out_file: str) -> None:
    plan = json.loads(Path(plan_file).read_text())
    out = await (_pairs(plan) if plan["mode"] == "pairs" else _open_loop(plan))
    Path(out_file).write_text(json.dumps(out))


# -- the harness --------------------------------------------------------------------------


@dataclass
class Bars:
    latency: list[dict[str, Any]] = field(default_factory=list)
    # The same pairs through Nginx alone (the gateway's own config, the relay swapped
    # for the engine): what one hop in C adds on this host, in the same run.
    latency_nginx: list[dict[str, Any]] = field(default_factory=list)
    nginx_unavailable: str = ""  # why that reference is missing, where it is
    # The same pairs through the whole gateway as its image runs it: the host's nginx
    # with the gateway's configuration in front of the relay workers' Unix sockets.
    # What a client of the gateway sees, so the latency bar is read on these rows.
    latency_gateway: list[dict[str, Any]] = field(default_factory=list)
    gateway_unavailable: str = ""
    scaling: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    workers_for_latency: int = 0
    scaling_cap: float = 0.0  # cores per relay worker in the scaling runs; 0: uncapped
    cap_unavailable: str = ""  # why the cap could not be set, where it could not


async def _run_client(plan: dict[str, Any], timeout: float) -> dict[str, Any]:
    """The client in its own process; awaited, so the agents in this process keep
    their leases while it runs."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "plan.json").write_text(json.dumps(plan))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.gateway_bars",
            "client",
            f"{tmp}/plan.json",
            f"{tmp}/out.json",
        )
        if await asyncio.wait_for(proc.wait(), timeout) != 0:
            raise RuntimeError(f"bench client failed ({proc.returncode}): {plan['mode']}")
        result: dict[str, Any] = json.loads(Path(tmp, "out.json").read_text())
        return result


@contextlib.asynccontextmanager
async def _fixed_engines(cluster: LocalCluster, ports: dict[str, int]) -> AsyncIterator[list[int]]:
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.fixed_engine",
                "--port",
                str(ports[name]),
                "--forward",
                node.engine_url,
                "--ttft",
                str(TTFT),
                "--itl",
                str(ITL),
            ]
        )
        for name, node in cluster.nodes.items()
    ]
    try:
        for name in cluster.nodes:
            await _wait(f"http://127.0.0.1:{ports[name]}/health", 20.0)
        yield [p.pid for p in procs]
    finally:
        await _stop(procs)


@contextlib.asynccontextmanager
async def _relay(
    cluster: LocalCluster,
    workers: int,
    caps: list[CpuCap] | None = None,
    socket_dir: str | None = None,
) -> AsyncIterator[tuple[str, list[int]]]:
    """The relay's workers on one TCP port; with `socket_dir`, each also on its own
    Unix socket there, as in the gateway image (where its Nginx reaches them)."""
    port, admin = free_port(), free_port()
    metrics_dir = tempfile.mkdtemp(prefix="sglang-ha-bars-metrics-")
    env = {
        **os.environ,
        "HA_RELAY_HOST": "127.0.0.1",
        "HA_RELAY_PORT": str(port),
        "HA_RELAY_ADMIN_PORT": str(admin),
        "HA_RELAY_HOST_ADMIN": "127.0.0.1",
        "HA_RELAY_WORKERS": str(workers),
        "HA_NODES": ",".join(_seeds(cluster)),
        "HA_CLUSTER": "local",
        "HA_REDIS_URL": cluster.redis.url,
        "HA_REDIS_PASSWORD": cluster.redis.password,
        "HA_HA_LOG": os.path.join(cluster.workdir, "relay.ha.log"),
        "HA_LOG_LEVEL": "WARNING",
        "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
    }
    if socket_dir is not None:
        env["HA_RELAY_WORKER_SOCKET_DIR"] = socket_dir
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ha_agent.gateway"],
            env={**env, "HA_RELAY_WORKER_INDEX": str(i)},
        )
        for i in range(workers)
    ]
    try:
        for proc, cap in zip(procs, caps or [], strict=False):
            cap.add(proc.pid)
        await _wait(f"http://127.0.0.1:{admin}/health", 30.0)
        if socket_dir is not None:
            sockets = [relay_worker_socket(socket_dir, i) for i in range(workers)]
            await _wait_for(lambda: all(os.path.exists(p) for p in sockets), 30.0, "sockets")
            for path in sockets:
                # The host's nginx, started as root, runs its workers as nobody (in the
                # image Nginx and the relay are one user): let them connect.
                os.chmod(path, 0o666)
        yield f"http://127.0.0.1:{port}", [p.pid for p in procs]
    finally:
        await _stop(procs)
        for cap in caps or []:
            cap.remove()


# The gateway's Nginx writes under these; the reference run puts them in a folder of its own.
_NGINX_PATHS = ("/run/sglang-ha/", "/var/lib/sglang-ha/nginx/", "/var/log/sglang/")
TEMPLATE = Path(__file__).resolve().parents[1] / "nginx" / "nginx.conf.template"


def host_nginx_conf(engine: str, listen: str, status_listen: str, root: Path) -> str:
    """The capacity table's "Nginx alone" configuration (the gateway's own, the relay
    swapped for `engine`, one worker) for the host's nginx: its files under `root`."""
    text = direct_nginx_conf(TEMPLATE.read_text(), engine, "", 1, listen)
    return _on_host(text, status_listen, root)


def _on_host(text: str, status_listen: str, root: Path) -> str:
    """A rendered gateway Nginx configuration moved for the host's nginx: its files
    under `root`, its status listener on `status_listen`."""
    for prefix in _NGINX_PATHS:
        text = text.replace(prefix, f"{root}/")
    text, found = re.subn(r"listen 127\.0\.0\.1:8003;", f"listen {status_listen};", text)
    if found != 1:
        raise ValueError("the gateway's Nginx template changed: update bench/gateway_bars.py")
    return text


def listening(port: int) -> bool:
    """Something accepts connections on 127.0.0.1:`port`."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _seeds(cluster: LocalCluster) -> list[str]:
    """HA_NODES for the relay: each node's engine as the fixed-rate engine in front of it."""
    return [f"{n.name}={cluster.advertise[n.name]}={n.api_url}" for n in cluster.nodes.values()]


def host_gateway_conf(
    seeds: list[str], socket_dir: str, workers: int, listen: str, status_listen: str, root: Path
) -> str:
    """The gateway's Nginx configuration as its image renders it (nginx_conf.main, TLS
    off, no client keys), for the host's nginx, its files under `root`: the relay
    workers' Unix sockets in `socket_dir`, the engines of `seeds` as the last resort,
    one Nginx worker per two relay workers."""
    env = {"GATEWAY_PORT": listen, "NGINX_WORKERS": str(nginx_worker_count(workers))}
    text = _on_host(render_template(TEMPLATE.read_text(), env), status_listen, root)
    servers = render_relay_servers(relay_worker_sockets(socket_dir, workers))
    Path(root, "nginx-relay-servers.conf").write_text(servers)
    Path(root, "nginx-backup-servers.conf").write_text(render(parse_seed(s) for s in seeds))
    Path(root, "nginx-client-keys.conf").write_text(render_client_keys(None))
    return text


@contextlib.asynccontextmanager
async def _host_nginx(
    conf: Callable[[str, str, Path], str], why_missing: Callable[[str], None]
) -> AsyncIterator[str | None]:
    """The host's nginx with `conf(listen, status_listen, root)`, or None (said why by
    `why_missing`) where there is none to run."""
    nginx = shutil.which("nginx")
    if nginx is None:
        why_missing("no nginx on PATH (Debian: apt-get install nginx)")
        yield None
        return
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="sglang-ha-bars-nginx-") as tmp:
        os.chmod(tmp, 0o755)  # the workers run as nobody when started as root
        path = Path(tmp, "nginx.conf")
        path.write_text(conf(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}", Path(tmp)))
        proc = subprocess.Popen([nginx, "-p", tmp, "-c", str(path), "-g", "daemon off;"])
        failed = ""
        try:
            deadline = time.monotonic() + 10.0
            while not listening(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    failed = f"nginx did not start (exit {proc.poll()})"
                    why_missing(failed)
                    break
                await asyncio.sleep(0.1)
            yield None if failed else f"http://127.0.0.1:{port}"
        finally:
            await _stop([proc])


def _nginx_alone(engine_url: str, bars: Bars) -> contextlib.AbstractAsyncContextManager[str | None]:
    """The host's nginx in front of the engine (the capacity table's "Nginx alone")."""
    engine = engine_url.split("//", 1)[1]

    def missing(why: str) -> None:
        bars.nginx_unavailable = why

    return _host_nginx(
        lambda listen, status, root: host_nginx_conf(engine, listen, status, root), missing
    )


def _gateway_nginx(
    cluster: LocalCluster, socket_dir: str, workers: int, bars: Bars
) -> contextlib.AbstractAsyncContextManager[str | None]:
    """The host's nginx with the gateway's own configuration in front of the relay."""
    seeds = _seeds(cluster)

    def missing(why: str) -> None:
        bars.gateway_unavailable = why

    return _host_nginx(
        lambda listen, status, root: host_gateway_conf(
            seeds, socket_dir, workers, listen, status, root
        ),
        missing,
    )


async def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM, then waited for without blocking the loop the agents run on."""
    for p in procs:
        p.terminate()
    for _ in range(150):  # 15 s
        if all(p.poll() is not None for p in procs):
            break
        await asyncio.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


async def _wait(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url, timeout=2)).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} not healthy after {timeout}s")
            await asyncio.sleep(0.2)


async def _wait_for(ready: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} after {timeout}s")
        await asyncio.sleep(0.1)


async def _wait_relay_routes(url: str, timeout: float) -> None:
    """The relay answers a stream (it has found the primary) before a measurement."""
    deadline = time.monotonic() + timeout
    while True:
        s = await _one(url, 2, True, 5.0)
        if s.status == 200 and len(s.arrivals) == 2:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"relay at {url} did not stream within {timeout}s")
        await asyncio.sleep(0.3)


async def _run(cfg: BarsConfig, phases: set[str]) -> Bars:
    bars = Bars()
    fronts = {name: free_port() for name in NAMES}
    advertise = {name: f"http://127.0.0.1:{p}" for name, p in fronts.items()}
    sim_env = {"SIM_ITL": str(ITL), "SIM_TTFT_BASE": str(TTFT)}
    with redis_server() as redis:
        async with local_cluster(
            redis, NAMES, relay=False, sim_env=sim_env, advertise=advertise
        ) as cluster:
            primary = await cluster.wait_ready()
            direct = advertise[primary]
            async with _fixed_engines(cluster, fronts) as engine_pids:
                if "light-latency" in phases:
                    workers = bars.workers_for_latency = os.cpu_count() or 1
                    sockets = tempfile.mkdtemp(prefix="sglang-ha-bars-relay-")
                    os.chmod(sockets, 0o755)
                    try:
                        async with (
                            _relay(cluster, workers, socket_dir=sockets) as (url, _),
                            _gateway_nginx(cluster, sockets, workers, bars) as gateway,
                            _nginx_alone(direct, bars) as nginx,
                        ):
                            await _wait_relay_routes(url, 30.0)
                            if gateway is not None:
                                await _wait_relay_routes(gateway, 30.0)
                            # Each slot count through the relay, the whole gateway, then
                            # Nginx alone.
                            for slots in cfg.slots:
                                for name, hop, into in (
                                    ("relay", url, bars.latency),
                                    ("gateway", gateway, bars.latency_gateway),
                                    ("nginx-alone", nginx, bars.latency_nginx),
                                ):
                                    if hop is None:
                                        continue
                                    plan = {
                                        "mode": "pairs",
                                        "direct": direct,
                                        "relay": hop,
                                        "slots": slots,
                                        "seconds": cfg.latency_seconds,
                                        "pairs": cfg.latency_pairs,
                                        "tokens": cfg.latency_tokens,
                                    }
                                    res = await _run_client(plan, cfg.latency_seconds + 120)
                                    print(
                                        f"  light-latency/{name}/{slots}: {res['pairs']} pairs",
                                        flush=True,
                                    )
                                    into.append(res)
                    finally:
                        shutil.rmtree(sockets, ignore_errors=True)
                if "relay-scaling" in phases:
                    for workers in cfg.scaling_workers:
                        bars.scaling[workers] = await _scaling(
                            cluster, cfg, workers, _caps(bars, cfg, workers), engine_pids
                        )
    return bars


async def _scaling(
    cluster: LocalCluster, cfg: BarsConfig, workers: int, caps: list[CpuCap], engine_pids: list[int]
) -> list[dict[str, Any]]:
    """Delivered events/s at each offered rate through `workers` relay workers."""
    rows = []
    async with _relay(cluster, workers, caps) as (url, relay_pids):
        await _wait_relay_routes(url, 30.0)
        for offered in cfg.offered:
            plan = {
                "mode": "open",
                "url": url,
                "offered": offered,
                "tokens": cfg.scaling_tokens,
                "warmup": cfg.scaling_warmup,
                "seconds": cfg.scaling_seconds,
                "pids": {"relay": relay_pids, "engine": engine_pids},
            }
            res = await _run_client(plan, cfg.scaling_seconds + 120)
            print(
                f"  relay-scaling/{workers}w/{offered}: {res['delivered_events_per_s']} events/s",
                flush=True,
            )
            rows.append(res)
            # Let the streams still open from this rate drain.
            await asyncio.sleep(2.0)
    return rows


def _caps(bars: Bars, cfg: BarsConfig, workers: int) -> list[CpuCap]:
    """A cap per worker, or none where the host gives no cgroup to write (said so)."""
    if cfg.scaling_cap <= 0 or bars.cap_unavailable:
        return []
    caps: list[CpuCap] = []
    try:
        for i in range(workers):
            caps.append(CpuCap(f"sglang-ha-bench-{os.getpid()}-{workers}-{i}", cfg.scaling_cap))
    except CapUnavailable as exc:
        for cap in caps:
            cap.remove()
        bars.cap_unavailable = str(exc)
        return []
    bars.scaling_cap = cfg.scaling_cap
    return caps


def run(cfg: BarsConfig, phases: set[str]) -> Bars:
    return asyncio.run(_run(cfg, phases))


def saturation(rows: list[dict[str, Any]]) -> float:
    return max((r["delivered_events_per_s"] for r in rows), default=0.0)


def judged_latency(bars: Bars) -> tuple[str, list[dict[str, Any]]]:
    """The rows the latency bar is read on: the whole gateway's (Nginx and the relay,
    what its clients see), or the relay's alone where the host has no nginx to run."""
    return ("gateway", bars.latency_gateway) if bars.latency_gateway else ("relay", bars.latency)


def targets(bars: Bars) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def row(what: str, got: float | None, bar: float) -> None:
        out.append(
            {
                "what": what,
                "target": f"<= {bar}",
                "measured": None if got is None else round(got, 3),
                "met": got is not None and got <= bar,
            }
        )

    hop, judged = judged_latency(bars)
    for res in judged:
        slots = res["slots"]
        for key, label in (("ttft_added_ms", "TTFT"), ("itl_added_ms", "ITL")):
            for q, bar in LATENCY_BAR.items():
                row(f"{hop} − direct {label} {q}, {slots} pair slots (ms)", res[key][q], bar)
        quantiles = res.get("ttft_quantiles_added_ms") or {}
        for q, bar in LATENCY_BAR.items():
            row(f"{hop} TTFT {q} − direct TTFT {q}, {slots} pair slots (ms)", quantiles.get(q), bar)
    if 1 in bars.scaling and 2 in bars.scaling:
        one, two = saturation(bars.scaling[1]), saturation(bars.scaling[2])
        ratio = two / one if one else 0.0
        out.append(
            {
                "what": "relay events/s at saturation, 2 workers / 1 worker",
                "target": f">= {SCALING_BAR}",
                "measured": round(ratio, 3),
                "met": ratio >= SCALING_BAR,
            }
        )
    return out


def to_json(bars: Bars, cfg: BarsConfig) -> dict[str, Any]:
    return {
        "config": {**cfg.__dict__, "itl_s": ITL, "ttft_s": TTFT},
        "latency_relay_workers": bars.workers_for_latency,
        "latency": bars.latency,
        "latency_nginx_alone": bars.latency_nginx,
        "nginx_alone_unavailable": bars.nginx_unavailable,
        "latency_gateway": bars.latency_gateway,
        "gateway_unavailable": bars.gateway_unavailable,
        "scaling": {str(k): v for k, v in bars.scaling.items()},
        "scaling_cap_cores": bars.scaling_cap,
        "scaling_cap_unavailable": bars.cap_unavailable,
        "targets": targets(bars),
    }


def _cap_line(bars: Bars) -> str:
    if bars.scaling_cap:
        return (
            f"each relay worker capped at {bars.scaling_cap:g} of a core by a cgroup CPU"
            " quota, so that it saturates while the host still has idle cores"
        )
    if bars.cap_unavailable:
        return f"relay workers uncapped: {bars.cap_unavailable}"
    return "relay workers uncapped"


def _latency_header(hop: str) -> list[str]:
    """The light-latency table's head, for the relay's rows or Nginx alone's."""
    return [
        f"| pair slots | pairs (failed) | TTFT added p50 | p99 | TTFT p50 {hop} − direct"
        f" | TTFT p99 {hop} − direct | ITL added p50 | p99 | event delivery added p50 | p99"
        " | request path + first event added p50 | p99 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]


def _latency_row(r: dict[str, Any], ms: Callable[[float | None], str]) -> str:
    t, i, d = r["ttft_added_ms"], r["itl_added_ms"], r["event_delay_added_ms"]
    p = r.get("path_added_ms") or {"p50": None, "p99": None}
    qa = r.get("ttft_quantiles_added_ms") or {"p50": None, "p99": None}
    return (
        f"| {r['slots']} | {r['pairs']} ({r['failed_pairs']}) | {ms(t['p50'])}"
        f" | {ms(t['p99'])} | {ms(qa['p50'])} | {ms(qa['p99'])} | {ms(i['p50'])}"
        f" | {ms(i['p99'])} | {ms(d['p50'])}"
        f" | {ms(d['p99'])} | {ms(p['p50'])} | {ms(p['p99'])} |"
    )


def _gateway_lines(bars: Bars, ms: Callable[[float | None], str]) -> list[str]:
    """The same pairs through the whole gateway: Nginx in front of the relay."""
    if not bars.latency_gateway:
        why = bars.gateway_unavailable or "not run"
        return [
            f"The whole gateway (Nginx in front of the relay): not measured ({why}); the"
            " latency bar below is read on the relay alone.",
            "",
        ]
    nginx_workers = nginx_worker_count(bars.workers_for_latency)
    lines = [
        "**The same pairs through the whole gateway** (the host's nginx with the gateway's"
        f" own configuration as its image renders it, {nginx_workers} worker, in front of"
        " the same relay workers' Unix sockets, one connection per request as shipped, the"
        " engines as its last resort; each slot count right after the relay's): what a"
        " client of the gateway sees. The latency bar is read on these rows.",
        "",
        *_latency_header("gateway"),
        *(_latency_row(r, ms) for r in bars.latency_gateway),
        "",
    ]
    pairs = zip(bars.latency_gateway, bars.latency, strict=False)
    lines.append(
        "The gateway's Nginx in front of the relay (the gateway less the relay alone,"
        " request path + first event, p50 / p99): "
        + "; ".join(
            f"{g['slots']} slot{'s' if g['slots'] > 1 else ''}"
            f" {ms(_minus(g, r, 'p50'))} / {ms(_minus(g, r, 'p99'))} ms"
            for g, r in pairs
        )
        + "."
    )
    lines.append("")
    return lines


def _nginx_alone_lines(bars: Bars, ms: Callable[[float | None], str]) -> list[str]:
    """The same pairs through Nginx alone: what a hop in C adds on this host."""
    if not bars.latency_nginx:
        why = bars.nginx_unavailable or "not run"
        return [f"Nginx alone, the reference hop: not measured ({why}).", ""]
    lines = [
        '**The same pairs through Nginx alone** (the capacity table\'s "Nginx alone":'
        " the gateway's own Nginx configuration with the relay swapped for the engine, one"
        " worker, the host's nginx; each slot count right after the relay's): what one hop"
        " in C adds on this host, in the same run, beside the relay's figures above.",
        "",
        *_latency_header("Nginx"),
        *(_latency_row(r, ms) for r in bars.latency_nginx),
        "",
    ]
    pairs = zip(bars.latency, bars.latency_nginx, strict=False)
    lines.append(
        "The relay's own part less Nginx's (request path + first event, p50 / p99): "
        + "; ".join(
            f"{r['slots']} slot{'s' if r['slots'] > 1 else ''}"
            f" {ms(_minus(r, n, 'p50'))} / {ms(_minus(r, n, 'p99'))} ms"
            for r, n in pairs
        )
        + "."
    )
    lines.append("")
    return lines


def _minus(relay: dict[str, Any], nginx: dict[str, Any], q: str) -> float | None:
    a = (relay.get("path_added_ms") or {}).get(q)
    b = (nginx.get("path_added_ms") or {}).get(q)
    return None if a is None or b is None else a - b


def markdown(bars: Bars, cfg: BarsConfig, run_line: str) -> str:
    def ms(x: float | None) -> str:
        return "—" if x is None else f"{x:+.3f}"

    lines = [
        run_line,
        "",
        "Upstream: a fixed-rate synthetic engine (`bench/fixed_engine.py`: first event"
        f" {TTFT * 1000:.0f} ms after the request, then one every {ITL * 1000:.0f} ms on each"
        " stream's own clock, a few µs of CPU per event) in front of each simulator, which"
        " answers everything but the streams. The relay (`python -m ha_agent.gateway`) is"
        " reached directly, and through the gateway's Nginx (the host's nginx); local"
        " processes, no Docker.",
        "",
    ]
    if bars.latency:
        lines += [
            f"**Added latency at light load** (relay with {bars.workers_for_latency} workers;"
            f" {cfg.latency_tokens}-event streams, each sent straight to the engine and through"
            " the relay at the same instant; differences within each pair, ms)",
            "",
            *_latency_header("relay"),
        ]
        lines += [_latency_row(r, ms) for r in bars.latency]
        lines += [
            "",
            "TTFT added is end to end; the last two columns time the relay's own part of"
            " it (the request's way to the engine, relay − direct, by the engine's clock"
            " at the request's last byte, plus the first event's delivery), without the"
            " engine's 20 ms wait, whose deadline a kernel timer keeps to tens of"
            " microseconds (a libuv timer, until e271f7f, rounded it to the millisecond"
            " and so moved the TTFT p50 well under the path's figure or near it)."
            ' "TTFT added" is the quantile of the differences within'
            " pairs; \"relay − direct\" is the relay's TTFT quantile less the direct one's"
            " over the same pairs: what the relay adds to the TTFT distribution a client"
            " sees. The first also holds the host's jitter between the pair's two requests,"
            " which reach the engine about 1 ms apart: with nothing in between, requests"
            " 1-2 ms apart read a p99 of 1.7-2.3 ms by it (bench/results/gateway-bars-runs/"
            "2026-12-07-2230-engine-timer/pair-noise-kernel-timer.json).",
            "",
        ]
        lines += _gateway_lines(bars, ms)
        lines += _nginx_alone_lines(bars, ms)
        lines.append("")
    if bars.scaling:
        lines += [
            f"**Relay workers at saturation** (open loop: {cfg.scaling_tokens}-event streams"
            f" started at a fixed rate; {cfg.scaling_warmup:.1f} s warm-up, then"
            f" {cfg.scaling_seconds:.0f} s counted; cores are CPU seconds per second over the"
            f" window; {_cap_line(bars)})",
            "",
            "| relay workers | offered events/s | delivered events/s | streams started"
            " (open at end) | failed | relay cores | engine cores | client cores | host busy"
            " cores |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for workers, rows in sorted(bars.scaling.items()):
            for r in rows:
                c = r["cores"]
                lines.append(
                    f"| {workers} | {r['offered_events_per_s']} | {r['delivered_events_per_s']:.0f}"
                    f" | {r['streams_started']} ({r['streams_open_at_end']}) | {r['failed']}"
                    f" | {c['relay']:.2f} | {c['engine']:.2f} | {c['client']:.2f}"
                    f" | {r['host_busy_cores']:.2f} |"
                )
        lines.append("")
        if bars.scaling_cap and 1 in bars.scaling and 2 in bars.scaling:
            top = max(bars.scaling[2], key=lambda r: r["delivered_events_per_s"])
            lines += [
                f"At 2 workers' saturation the host had {top['host_busy_cores']:.2f} of its"
                f" {os.cpu_count()} cores busy: "
                + (
                    "the caps, not the host, set the limit."
                    if top["host_busy_cores"] <= (os.cpu_count() or 1) - 0.5
                    else "near the host's own limit, so the ratio may understate the relay's."
                ),
                "",
            ]
    verdict = targets(bars)
    if verdict:
        lines += ["| bar (issue 27) | target | measured | met |", "|---|---|---|---|"]
        for t in verdict:
            lines.append(
                f"| {t['what']} | {t['target']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "client":
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        asyncio.run(_client(argv[1], argv[2]))
        return 0
    print("usage: python -m bench --phases light-latency,relay-scaling", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
