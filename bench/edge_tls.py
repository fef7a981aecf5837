"""Streaming through the gateway's Nginx with TLS at the edge: HTTP/1.1 against HTTP/2.

    python -m bench.edge_tls [--streams 32] [--seconds 8] [--rounds 2]

The gateway's own Nginx configuration (nginx/nginx.conf.template rendered as the
gateway renders it, one worker process) in front of one simulator engine (ITL 10 ms),
the relay left out: what differs between the paths is Nginx's side of the client
connection alone. Paths, taking turns each round: plain HTTP (the loopback demo),
TLS with HTTP/1.1 (a connection per stream) and TLS with HTTP/2 (every stream on one
connection, GATEWAY_HTTP2=true). The client is the same for all three: httpx
(`http2=True` for h2, with the `h2` package), closed loop, `--streams` streams of
128-token chat completions. Measured: events per second, time to the first event,
gaps between events of a stream, and Nginx's CPU (master and worker, /proc) per
event. Writes bench/results/edge-tls.json and edge-tls.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.cpu import processes_cpu_seconds
from bench.report import machine
from bench.stats import percentile
from ha_agent.config import EdgeTlsSettings
from ha_agent.gateway.edge.nginx_conf import TLS_TEMPLATE, render_template, tls_placeholders
from ha_agent.gateway.edge.nginx_sync import render_relay_servers
from ha_agent.gateway.edge.tls_reload import install
from tests.support.processes import free_port, stop_process

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SIM = {"SIM_ITL": "0.01", "SIM_TTFT_BASE": "0.02", "SIM_PREFILL_PER_TOKEN": "0.0002"}
MAX_TOKENS = 128
PATHS = ("plain-h1", "tls-h1", "tls-h2")


@dataclass
class Run:
    path: str
    round: int
    streams: int
    seconds: float
    events: int = 0
    requests: int = 0
    failed: int = 0
    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    nginx_cpu: float = 0.0
    client_cpu: float = 0.0
    http_versions: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "round": self.round,
            "streams": self.streams,
            "seconds": self.seconds,
            "requests": self.requests,
            "failed": self.failed,
            "http_versions": sorted(set(self.http_versions)),
            "events_per_s": self.events / self.seconds,
            "ttft_p50_ms": _ms(percentile(self.ttft, 0.5)),
            "ttft_p99_ms": _ms(percentile(self.ttft, 0.99)),
            "gap_p50_ms": _ms(percentile(self.gaps, 0.5)),
            "gap_p99_ms": _ms(percentile(self.gaps, 0.99)),
            "nginx_cpu_s": self.nginx_cpu,
            "nginx_us_per_event": self.nginx_cpu / max(self.events, 1) * 1e6,
            "client_cpu_s": self.client_cpu,
        }


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000.0


def _family(pid: int) -> list[int]:
    """Nginx's master and its workers (processes whose parent it is)."""
    family = [pid]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                family.append(int(entry.name))
    return family


@contextlib.contextmanager
def simulator(port: int) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIM_API_KEY")}
    env.update(SIM)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ha_agent.sim", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the simulator did not start")
            time.sleep(0.1)
        yield proc
    finally:
        stop_process(proc, timeout=10)


@contextlib.contextmanager
def nginx(
    engine_port: int, tls: EdgeTlsSettings | None, secrets: Path, static: bool = False
) -> Iterator[tuple[int, int]]:
    """The gateway's Nginx, one worker, on a free port; yields (port, master pid).
    `static`: the certificate loaded once at start, as without rotation support."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    workdir = tempfile.mkdtemp(prefix="sglang-ha-bench-nginx-")
    os.makedirs(os.path.join(workdir, "nginx"))
    for d in (workdir, os.path.join(workdir, "nginx")):
        os.chmod(d, 0o777)  # workers may run as nobody
    port = free_port()
    template = (ROOT / "nginx" / "nginx.conf.template").read_text()
    env = {"GATEWAY_PORT": f"127.0.0.1:{port}"}
    if tls is not None:
        env.update(tls_placeholders(tls, (ROOT / "nginx" / TLS_TEMPLATE).read_text()))
    text = render_template(template, env)
    pair = Path(workdir, "edge-tls.pem")
    if tls is not None:
        # Workers run as nobody here (root runs the bench): the pair readable by all.
        problem = install(secrets / "gateway_tls.crt", secrets / "gateway_tls.key", pair, 0o644)
        assert problem is None, problem
        if static:
            text = text.replace("$edge_tls_pair;", f"{pair};")
    for path in ("/run/sglang-ha", "/var/lib/sglang-ha", "/var/log/sglang"):
        text = text.replace(path, workdir)
    text = text.replace("127.0.0.1:8003", f"127.0.0.1:{free_port()}")
    text, n = re.subn(r"^worker_processes \S+;", "worker_processes 1;", text, flags=re.M)
    assert n == 1
    Path(workdir, "nginx-backup-servers.conf").write_text("")
    Path(workdir, "nginx-relay-servers.conf").write_text(
        render_relay_servers([f"127.0.0.1:{engine_port}"])
    )
    conf = Path(workdir, "nginx.conf")
    conf.write_text(text)
    proc = subprocess.Popen(
        [binary, "-e", "stderr", "-p", workdir, "-c", str(conf), "-g", "daemon off;"]
    )
    try:
        deadline = time.monotonic() + 10
        while len(_family(proc.pid)) < 2:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("nginx did not start")
            time.sleep(0.05)
        yield port, proc.pid
    finally:
        stop_process(proc, timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


async def closed_loop(url: str, client: httpx.AsyncClient, run: Run, warmup: float) -> None:
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "Explain leader leases."}],
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": True,
    }
    started = time.monotonic()
    window = (started + warmup, started + warmup + run.seconds)

    async def one_stream() -> None:
        while time.monotonic() < window[1]:
            sent = time.monotonic()
            measured = sent >= window[0]
            last: float | None = None
            try:
                async with client.stream("POST", url, json=body) as r:
                    run.http_versions.append(r.http_version)
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}")
                    async for line in r.aiter_lines():
                        if not line.startswith("data:") or '"content":"' not in line:
                            continue
                        now = time.monotonic()
                        if window[0] <= now < window[1]:
                            run.events += 1
                        if measured and now < window[1]:
                            if last is None:
                                run.ttft.append(now - sent)
                            else:
                                run.gaps.append(now - last)
                        last = now
                if measured:
                    run.requests += 1
            except (httpx.HTTPError, RuntimeError):
                if measured:
                    run.failed += 1

    await asyncio.gather(*(one_stream() for _ in range(run.streams)))


async def measure(path: str, base: str, ca: Path, nginx_pid: int, run: Run, warmup: float) -> None:
    verify: ssl.SSLContext | bool = (
        ssl.create_default_context(cafile=str(ca)) if base.startswith("https") else False
    )
    limits = httpx.Limits(max_connections=run.streams, max_keepalive_connections=run.streams)
    async with httpx.AsyncClient(
        verify=verify, http2=path.endswith("h2"), timeout=60, limits=limits
    ) as client:
        pids = _family(nginx_pid)
        cpu0, client0 = processes_cpu_seconds(pids), time.process_time()
        await closed_loop(base + "/v1/chat/completions", client, run, warmup)
        run.nginx_cpu = processes_cpu_seconds(pids) - cpu0
        run.client_cpu = time.process_time() - client0


HANDSHAKES = 300


def handshakes(port: int, ca: Path, pid: int) -> dict[str, float]:
    """Fresh TLS connections one after another (no resumption), each one request Nginx
    answers itself (a 404): wall time and Nginx CPU per connection."""
    pids = _family(pid)
    cpu0, started = processes_cpu_seconds(pids), time.monotonic()
    for _ in range(HANDSHAKES):
        context = ssl.create_default_context(cafile=str(ca))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            while tls.recv(65536):
                pass
    wall = time.monotonic() - started
    return {
        "connections": HANDSHAKES,
        "ms_per_connection": wall / HANDSHAKES * 1000,
        "nginx_us_per_connection": (processes_cpu_seconds(pids) - cpu0) / HANDSHAKES * 1e6,
    }


def measure_handshakes(secrets: Path, rounds: int) -> list[dict[str, Any]]:
    """The pair read at each handshake (rotation without a reload) against a
    certificate loaded once at start."""
    tls = EdgeTlsSettings(tls="on")
    out = []
    engine_port = free_port()  # nothing listens: every request here stays in Nginx
    for r in range(rounds):
        for static in (False, True) if r % 2 == 0 else (True, False):
            with nginx(engine_port, tls, secrets, static=static) as (port, pid):
                row = {
                    "config": "static" if static else "per-handshake",
                    "round": r + 1,
                    **handshakes(port, secrets / "tls_ca.crt", pid),
                }
                print(row, flush=True)
                out.append(row)
    return out


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return percentile(present, 0.5) if present else None


def markdown(summaries: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Edge TLS: HTTP/1.1 against HTTP/2 through the gateway's Nginx",
        "",
        f"Run of {meta['date']} (commit {meta['commit']}), `python -m bench.edge_tls"
        f" --streams {meta['streams']} --seconds {meta['seconds']} --rounds {meta['rounds']}`:"
        " the gateway's Nginx configuration, one worker, in front of one simulator engine"
        " (ITL 10 ms), no relay; httpx as the client for every path. Medians over the"
        " rounds (each round's own figure in edge-tls.json).",
        "",
        "| path | events/s | TTFT p50 ms | TTFT p99 ms | gap p50 ms | gap p99 ms |"
        " Nginx µs CPU/event | client CPU s | failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path in PATHS:
        rows = [s for s in summaries if s["path"] == path]

        def med(key: str, rows: list[dict[str, Any]] = rows) -> str:
            value = _median([r[key] for r in rows])
            return "—" if value is None else f"{value:.1f}"

        lines.append(
            f"| {path} | {med('events_per_s')} | {med('ttft_p50_ms')} | {med('ttft_p99_ms')} |"
            f" {med('gap_p50_ms')} | {med('gap_p99_ms')} | {med('nginx_us_per_event')} |"
            f" {med('client_cpu_s')} | {sum(r['failed'] for r in rows)} |"
        )
    return "\n".join(lines) + "\n"


def handshake_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "",
        f"Full TLS handshakes ({HANDSHAKES} fresh connections one after another per round,"
        " no session resumption, each with one request Nginx answers itself), medians"
        " over the rounds:",
        "",
        "| certificate | ms per connection | Nginx µs CPU per connection |",
        "|---|---|---|",
    ]
    for config in ("per-handshake", "static"):
        mine = [r for r in rows if r["config"] == config]
        ms = _median([r["ms_per_connection"] for r in mine])
        us = _median([r["nginx_us_per_connection"] for r in mine])
        label = "read at each handshake (ours)" if config == "per-handshake" else "loaded at start"
        lines.append(f"| {label} | {ms or 0:.2f} | {us or 0:.0f} |")
    return "\n".join(lines) + "\n"


async def run_all(args: argparse.Namespace, secrets: Path) -> list[Run]:
    ca = secrets / "tls_ca.crt"

    def tls(http2: bool) -> EdgeTlsSettings:
        return EdgeTlsSettings(
            tls="on",
            http2=http2,
            tls_cert=secrets / "gateway_tls.crt",
            tls_key=secrets / "gateway_tls.key",
        )

    configs = {"plain-h1": None, "tls-h1": tls(False), "tls-h2": tls(True)}
    runs: list[Run] = []
    engine_port = free_port()
    with simulator(engine_port):
        for r in range(args.rounds):
            shift = r % len(PATHS)
            for path in [*PATHS[shift:], *PATHS[:shift]]:
                with nginx(engine_port, configs[path], secrets) as (port, pid):
                    scheme = "http" if configs[path] is None else "https"
                    host = "127.0.0.1" if scheme == "http" else "localhost"
                    run = Run(path, r + 1, args.streams, args.seconds)
                    await measure(path, f"{scheme}://{host}:{port}", ca, pid, run, args.warmup)
                    runs.append(run)
                    s = run.summary()
                    print(
                        f"{path} r{r + 1}: {s['events_per_s']:.0f} events/s, gap p50"
                        f" {s['gap_p50_ms']:.1f} ms p99 {s['gap_p99_ms']:.1f} ms, Nginx"
                        f" {s['nginx_us_per_event']:.1f} µs/event, {run.failed} failed,"
                        f" {s['http_versions']}",
                        flush=True,
                    )
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    secrets = Path(tempfile.mkdtemp(prefix="sglang-ha-bench-tls-"))
    try:
        subprocess.run(
            ["bash", str(ROOT / "scripts" / "tls-certs.sh"), str(secrets)],
            check=True,
            capture_output=True,
        )
        runs = asyncio.run(run_all(args, secrets))
        handshake_rows = measure_handshakes(secrets, args.rounds)
    finally:
        shutil.rmtree(secrets, ignore_errors=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit,
        "streams": args.streams,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "sim": SIM,
        "max_tokens": MAX_TOKENS,
        "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip(),
        "httpx": httpx.__version__,
        "machine": machine(),
    }
    summaries = [run.summary() for run in runs]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "edge-tls.json").write_text(
        json.dumps({"meta": meta, "runs": summaries, "handshakes": handshake_rows}, indent=2) + "\n"
    )
    text = markdown(summaries, meta) + handshake_markdown(handshake_rows)
    (RESULTS / "edge-tls.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
