"""The relay runs as several worker processes; one dying (kill -9) loses
only the streams it held that had received their response head. Streams on the other
workers finish whole; whole answers it held and requests sent while it is down are
answered (Nginx holds each request whole and re-sends it to the next worker), and
supervisord brings the worker back.

A worker that freezes (SIGSTOP) is taken out of Nginx's rotation by the watchdog within
a second (its socket hidden, no Nginx reload), so new requests stop waiting on it long
before the freeze ends; the requests it held finish when it resumes, and it rejoins.
Clients that never re-send lose nothing: no reload closes their keep-alive connections."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
from dataclasses import dataclass

import httpx
import pytest

from tests.support.background_load import background_load
from tests.support.probes import Prober
from tests.support.processes import wait_until
from tests.support.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SUPERVISORCTL = ["supervisorctl", "-c", "/etc/sglang-ha/supervisord.conf"]
STREAMS = 16
TOKENS = 400  # about 5 s at the simulator's 10 ms per token under this load
WHOLE = 8  # non-streaming requests in flight at the kill


@dataclass
class StreamResult:
    worker: str | None = None
    events: int = 0
    done: bool = False
    error: str | None = None


def _relay_pids(stack: Stack) -> dict[str, int]:
    """Relay worker index -> pid, from supervisord (RUNNING workers only)."""
    _, out = stack.container("gateway").exec_run([*SUPERVISORCTL, "status"])
    pids = {}
    for line in out.decode().splitlines():
        parts = line.split()
        if parts and parts[0].startswith("relay:relay-") and "RUNNING" in parts:
            pid = parts[parts.index("pid") + 1].rstrip(",")
            pids[parts[0].rsplit("-", 1)[1]] = int(pid)
    return pids


async def _stream(
    client: httpx.AsyncClient, url: str, i: int, first: asyncio.Event
) -> StreamResult:
    result = StreamResult()
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": f"worker crash test {i}"}],
        "max_tokens": TOKENS,
        "ignore_eos": True,
        "stream": True,
    }
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
            result.worker = resp.headers.get("x-sglang-ha-relay-worker")
            async for line in resp.aiter_lines():
                if line == "data: [DONE]":
                    result.done = True
                elif '"content":"' in line and '"content":""' not in line:
                    result.events += 1  # a content chunk (the role chunk's is empty)
                    first.set()
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def _whole_answer(client: httpx.AsyncClient, url: str, i: int) -> StreamResult:
    """A non-streaming request long enough to be on a worker, answerless, at the kill."""
    result = StreamResult()
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": f"worker crash test, whole answer {i}"}],
        "max_tokens": TOKENS,
        "ignore_eos": True,
    }
    try:
        resp = await client.post(f"{url}/v1/chat/completions", json=body)
        result.worker = resp.headers.get("x-sglang-ha-relay-worker")
        result.done = resp.status_code == 200
        if not result.done:
            result.error = f"HTTP {resp.status_code}: {resp.text[:200]}"
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def _wait_workers(stack: Stack, count: int, timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        pids = _relay_pids(stack)
        if len(pids) >= count:
            return pids
        if time.monotonic() > deadline:
            raise AssertionError(f"relay workers running: {pids}, want {count}")
        time.sleep(0.2)


def _unanswered_on(stack: Stack, victim: str) -> int:
    """Requests Nginx saw fail on the worker's socket before their response head:
    each one it then re-sent to the next worker (its error log)."""
    sock = f"relay-{victim}.sock"
    return sum(
        sock in line and "while reading response header from upstream" in line
        for line in stack.logs("gateway").splitlines()
        if "[error]" in line
    )


def test_a_relay_worker_crash_loses_only_its_own_streams(stack: Stack) -> None:
    before = _wait_workers(stack, 1, 30.0)
    unanswered_before = _unanswered_on(stack, "0")
    if len(before) < 2:
        pytest.skip(f"the gateway runs {len(before)} relay worker(s): nothing to compare")

    async def scenario() -> tuple[str, list[StreamResult], list[StreamResult], list[int]]:
        url = stack.gateway_url
        limits = httpx.Limits(max_connections=STREAMS + WHOLE + 8)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            started = [asyncio.Event() for _ in range(STREAMS)]
            tasks = [
                asyncio.ensure_future(_stream(client, url, i, started[i])) for i in range(STREAMS)
            ]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
            # Sent after every stream's first event: still generating, no byte back yet,
            # when the worker dies.
            whole = [asyncio.ensure_future(_whole_answer(client, url, i)) for i in range(WHOLE)]
            await asyncio.sleep(0.5)
            victim = "0"
            # kill -9 (the image has no kill binary; its Python does the same).
            pid = before[victim]
            code, out = stack.container("gateway").exec_run(
                ["python3", "-c", f"import os, signal; os.kill({pid}, signal.SIGKILL)"]
            )
            assert code == 0, out
            # Requests sent while the worker is gone or restarting: all answered.
            statuses = []
            for k in range(20):
                r = await client.post(
                    f"{url}/v1/chat/completions",
                    json={
                        "model": "default",
                        "messages": [{"role": "user", "content": f"during the crash {k}"}],
                        "max_tokens": 4,
                    },
                )
                statuses.append(r.status_code)
                await asyncio.sleep(0.05)
            results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
            answers = await asyncio.wait_for(asyncio.gather(*whole), 120)
            return victim, results, answers, statuses

    victim, results, answers, statuses = asyncio.run(scenario())
    held = [r for r in results if r.worker == victim]
    others = [r for r in results if r.worker != victim]
    summary = [r.__dict__ for r in results]
    # The blast radius, for docs/failover.md: what the killed worker cost its clients.
    lost = [r for r in answers if not r.done]
    resent = _unanswered_on(stack, victim) - unanswered_before
    print(
        f"relay worker {victim} killed: {len(held)} of {len(results)} streams were on it"
        f" and were cut; {len(lost)} of {len(answers)} whole-answer requests in flight"
        f" (no byte received yet) failed: {[r.error for r in lost][:4]};"
        f" new requests meanwhile {statuses.count(200)}/{len(statuses)} answered 200;"
        f" {resent} request(s) lost by the worker before their response head, re-sent"
        " by Nginx"
    )
    # No byte of these had reached their clients: every one is answered, those the dead
    # worker held included (Nginx re-sends the buffered request to the next worker).
    assert all(r.done for r in answers), [r.__dict__ for r in answers]
    # SO_REUSEPORT spreads Nginx's connections: both workers held streams.
    assert held and others, summary
    # The other workers' streams are untouched: whole, to [DONE].
    assert all(r.done and r.events == TOKENS and r.error is None for r in others), summary
    # The dead worker's streams are cut (the client sees a broken stream, not a hang).
    assert all(not r.done for r in held), summary
    # Sent as the worker died or while it restarted: none fails.
    assert statuses == [200] * len(statuses), statuses
    # supervisord restarts the worker; the gateway is whole again.
    after = _wait_workers(stack, len(before), 30.0)
    assert after[victim] != before[victim]


FREEZE = 12.0  # seconds the worker stays stopped, as in the issue


def _signal(stack: Stack, pid: int, sig: str) -> None:
    """kill -SIG inside the gateway (the image has no kill binary; its Python does it,
    so the signal leaves at the end of the exec, after the interpreter has started)."""
    stack.container("gateway").exec_run(
        ["python3", "-c", f"import os, signal; os.kill({pid}, signal.{sig})"]
    )


def _rotation_changes(stack: Stack, since: float) -> list[float]:
    """Wall-clock times after `since` at which the watchdog took a frozen worker out of
    Nginx's rotation: its own log line, written once the worker's socket was hidden."""
    times = []
    for line in stack.logs("gateway").splitlines():
        if "out of Nginx's rotation" not in line or "no heartbeat" not in line:
            continue
        with contextlib.suppress(ValueError):
            at = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            stamp = at.replace(tzinfo=datetime.timezone.utc).timestamp()
            if stamp >= since:
                times.append(stamp)
    return times


def test_a_frozen_relay_worker_is_bypassed_within_a_second(stack: Stack) -> None:
    before = _wait_workers(stack, 1, 30.0)
    victim = "0"
    pid = before[victim]
    stalls_before = stack.ha_log("gateway").count("RELAY_WORKER_STALLED")
    zero = time.monotonic()
    with (
        # Closed-loop clients that never re-send (max_retries=0) on keep-alive
        # connections: a request lost to the rotation would show as a failure here.
        background_load(stack.gateway_url, concurrency=16, clock_zero=zero) as load,
        # New requests at a steady pace: the load's clients soon all wait on the frozen
        # worker's requests and send nothing new. Bounded past the freeze: what the
        # frozen worker holds must complete, not time out.
        Prober(stack.gateway_url, zero, timeout=FREEZE + 10) as probes,
    ):
        time.sleep(3.0)  # the load under way, on every worker
        _signal(stack, pid, "SIGSTOP")
        frozen, frozen_wall = time.monotonic() - zero, time.time()
        try:
            wait_until(
                lambda: stack.ha_log("gateway").count("RELAY_WORKER_STALLED") > stalls_before,
                timeout=FREEZE,
                interval=0.25,
                what="the watchdog to take the frozen worker out of the rotation",
            )
            # The fault lasts its full length, as a real freeze would.
            time.sleep(max(0.0, frozen + FREEZE - (time.monotonic() - zero)))
        finally:
            _signal(stack, pid, "SIGCONT")
        resumed = time.monotonic() - zero
        time.sleep(2.0)
    rotations = _rotation_changes(stack, frozen_wall)
    assert rotations, "the watchdog never took the worker out of the rotation"
    noticed = rotations[0] - frozen_wall
    during = [r for r in probes.records if frozen + 1.0 <= r.start <= resumed - 3.0]
    slowest = max((r.end - r.start for r in during), default=0.0)
    print(
        f"frozen at {frozen:.1f}s, out of rotation after {noticed:.2f}s; {len(during)} new"
        f" requests during the freeze, slowest {slowest:.2f}s;"
        f" probes {len(probes.records)}, {sum(not r.ok for r in probes.records)} failed; "
        + load.summary()
    )
    assert noticed < 1.0
    # Every request that started after the first second finished without waiting for
    # the freeze to end.
    assert len(during) > 20, len(probes.records)
    late = [r for r in during if not r.ok or r.end >= resumed]
    assert not late, late[:3]
    # None failed, streams included: what the frozen worker held waited for it.
    assert all(r.ok for r in probes.records), [r for r in probes.records if not r.ok][:3]
    assert not load.failed, load.summary()
    assert "relay workers down" not in stack.logs("gateway"), "no Nginx reload for a rotation"
    log = stack.ha_log("gateway")
    assert f"relay worker {victim} (pid {pid}): no heartbeat" in log
    wait_until(
        lambda: f"RELAY_WORKER_RECOVERED relay worker {victim}" in stack.ha_log("gateway"),
        timeout=10,
        what="the worker back in the rotation",
    )
    # The metric counts what the log records (a stall each).
    metrics = httpx.get(f"http://{stack.ip('gateway')}:8002/metrics", timeout=5).text
    stalls = stack.ha_log("gateway").count("): no heartbeat")
    assert f"sglang_ha_relay_worker_stalls_total {float(stalls)}" in metrics, stalls
    assert _wait_workers(stack, len(before), 30.0)[victim] == pid, "resumed, not restarted"
