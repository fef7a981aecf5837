"""Real programs for tests: redis-server, redis-sentinel; free ports; bounded waits."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

T = TypeVar("T")


_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A port free now, for a server a test starts a moment later. Taken below the
    kernel's ephemeral range: a port from bind(0) is one any outgoing connection (to
    Redis, to an engine) may take as its source port before the server binds it
    (seen in CI: EADDRINUSE). Never the same port twice in one test process."""
    high = _ephemeral_low()
    for _ in range(1000):
        port = random.randrange(10000, high)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in 10000-{high}")


def wait_until(
    predicate: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "condition"
) -> T:
    """Poll until predicate() is truthy; fail the test with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # keep polling; report the last error
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc})")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5) -> None:
    """SIGTERM, and SIGKILL if it is still there after `timeout`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@dataclass
class RedisProcess:
    port: int
    password: str
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        stop_process(self.proc)

    def pause(self) -> None:
        """SIGSTOP: the store hangs (worse than down: connections time out)."""
        self.proc.send_signal(19)

    def resume(self) -> None:
        self.proc.send_signal(18)


@contextlib.contextmanager
def redis_server(password: str = "test-password") -> Iterator[RedisProcess]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: run scripts/ensure-test-tools.sh")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="sglang-ha-redis-")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--requirepass",
            password,
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = RedisProcess(port, password, proc)
    try:
        wait_until(lambda: _connectable(port), timeout=10, what=f"redis-server on {port}")
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _connectable(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True
    return False


def env_without_proxy() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env.pop(key, None)
    return env


@dataclass
class SentinelSet:
    master: RedisProcess
    ports: list[int]
    procs: list[subprocess.Popen[bytes]]

    def stop(self, index: int) -> None:
        proc = self.procs[index]
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=5)


@contextlib.contextmanager
def sentinels(
    master: RedisProcess, count: int = 3, name: str = "sglang-ha"
) -> Iterator[SentinelSet]:
    """Real redis-sentinel processes monitoring `master`, password-protected like the stack."""
    binary = shutil.which("redis-sentinel") or shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-sentinel is not installed: run scripts/ensure-test-tools.sh")
    workdir = tempfile.mkdtemp(prefix="sglang-ha-sentinel-")
    ports, procs = [], []
    try:
        for i in range(count):
            port = free_port()
            conf = os.path.join(workdir, f"s{i}.conf")
            with open(conf, "w") as fh:
                fh.write(
                    f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
                    f'requirepass "{master.password}"\n'
                    f'sentinel sentinel-pass "{master.password}"\n'
                    f"sentinel monitor {name} 127.0.0.1 {master.port} 2\n"
                    f'sentinel auth-pass {name} "{master.password}"\n'
                    f"sentinel down-after-milliseconds {name} 5000\n"
                )
            args = [binary, conf] + ([] if binary.endswith("sentinel") else ["--sentinel"])
            procs.append(
                subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
            ports.append(port)
        for port in ports:
            wait_until(partial(_connectable, port), timeout=10, what=f"sentinel on {port}")
        yield SentinelSet(master, ports, procs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        shutil.rmtree(workdir, ignore_errors=True)
