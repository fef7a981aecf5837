"""Sidecar mode: watch an engine container the user runs, through the Docker API.

Why: beside an SGLang container we did not start, HTTP alone cannot tell a crash
from an OOM kill. Docker can: `State.OOMKilled` (the kernel's OOM killer in the
container's memory cgroup), the exit code (137 = SIGKILL), the `die` / `oom` events,
and the container's own output (a CUDA OOM traceback ends in "out of memory").

Only read-only calls are made (inspect, logs, events), so a socket proxy that allows
GET /containers and /events is enough (`HA_DOCKER_HOST=tcp://proxy:2375`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import time
from calendar import timegm
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

from ha_agent.node.engine.process import EXCEPTION_TEXT, OOM_TEXT, ProcessState, ProcessWatch

log = logging.getLogger(__name__)

# A fatal OOM traceback is at the very end of a run's output; looking further back
# would mistake SGLang's routine "out of memory, retracting requests" warnings.
LOG_TAIL_LINES = 100
_ISO = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?$")
# Docker's container statuses that are not "running", as supervisord statenames.
_STATES = {
    "created": "STARTING",
    "restarting": "BACKOFF",
    "paused": "STOPPED",
    "exited": "EXITED",
    "dead": "FATAL",
    "removing": "STOPPING",
}


def docker_time(value: str) -> float:
    """Docker's RFC 3339 time (nanoseconds, UTC) as a Unix time; 0 for 'never'."""
    match = _ISO.match(value or "")
    if match is None or value.startswith("0001-"):
        return 0.0
    whole = timegm(time.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S"))
    fraction = float(f"0.{match.group(2)}") if match.group(2) else 0.0
    offset = match.group(3) or "Z"
    if offset != "Z":
        sign = 1 if offset[0] == "+" else -1
        whole -= sign * (int(offset[1:3]) * 3600 + int(offset[4:6]) * 60)
    return whole + fraction


def exit_how(code: int, oom_killed: bool, error: str = "") -> str:
    if oom_killed:
        return f"killed by the kernel OOM killer (exit status {code})"
    if code > 128:
        try:
            name = signal.Signals(code - 128).name
        except ValueError:
            name = f"signal {code - 128}"
        return f"terminated by {name} (exit status {code})"
    return f"exit status {code}" + (f": {error}" if error else "")


def demux(raw: bytes, tty: bool) -> str:
    """The text of a logs answer: without a TTY, Docker frames each chunk with an
    8-byte header (stream, 0, 0, 0, big-endian size)."""
    if tty:
        return raw.decode(errors="replace")
    out, i = [], 0
    while i + 8 <= len(raw):
        size = int.from_bytes(raw[i + 4 : i + 8], "big")
        out.append(raw[i + 8 : i + 8 + size])
        i += 8 + size
    return b"".join(out).decode(errors="replace")


class DockerUnavailable(Exception):
    """The Docker API did not answer as expected (socket away, no permission)."""


class ContainerWatch(ProcessWatch):
    def __init__(self, container: str, docker_host: str = "unix:///var/run/docker.sock") -> None:
        self.container = container
        self.name = f"container {container}"
        self.docker_host = docker_host
        self._http: aiohttp.ClientSession | None = None
        self._run: tuple[str, str] | None = None  # (id, StartedAt) of the run last seen running
        self._explained: tuple[str, str] | None = None  # the run whose end was read
        self._gone = ("", False, False)  # (how, oom, exception) of the run that ended
        self._api_ok = True

    def describe(self) -> str:
        return f"{self.name} via {self.docker_host}"

    # -- the Docker API ------------------------------------------------------------------

    def _session(self) -> tuple[aiohttp.ClientSession, str]:
        parts = urlsplit(self.docker_host)
        if parts.scheme == "unix":
            base = "http://docker"
        else:  # tcp://host:port (plain HTTP, e.g. a socket proxy) or http(s)://
            scheme = "https" if parts.scheme == "https" else "http"
            base = f"{scheme}://{parts.netloc}"
        if self._http is None or self._http.closed:
            connector = aiohttp.UnixConnector(path=parts.path) if parts.scheme == "unix" else None
            self._http = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=5)
            )
        return self._http, base

    async def _get(self, path: str, **params: str) -> bytes | None:
        """The body of a GET, None on 404; DockerUnavailable on anything else."""
        http, base = self._session()
        try:
            async with http.get(base + path, params=params) as resp:
                body = await resp.read()
        except (aiohttp.ClientError, OSError) as exc:
            raise DockerUnavailable(f"{self.docker_host}: {exc}") from exc
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise DockerUnavailable(f"{path}: HTTP {resp.status} {body[:200]!r}")
        return body

    async def _inspect(self) -> dict[str, Any] | None:
        body = await self._get(f"/containers/{quote(self.container, safe='')}/json")
        return json.loads(body) if body is not None else None

    async def _logs_say(
        self, cid: str, tty: bool, since: str, until: float = 0
    ) -> tuple[bool, bool]:
        """Whether the run's last output tells an OOM, and the engine's own exception."""
        params = {"stdout": "1", "stderr": "1", "tail": str(LOG_TAIL_LINES)}
        if docker_time(since):
            params["since"] = f"{docker_time(since):.6f}"
        if until:
            params["until"] = f"{until:.6f}"
        try:
            body = await self._get(f"/containers/{cid}/logs", **params)
        except DockerUnavailable as exc:  # e.g. a logging driver without read support
            log.debug("engine container logs unreadable: %s", exc)
            return False, False
        text = demux(body or b"", tty)
        return bool(OOM_TEXT.search(text)), bool(EXCEPTION_TEXT.search(text))

    async def _events(self, cid: str, since: float) -> list[dict[str, Any]]:
        """The container's die and oom events since a time (bounded: until now)."""
        filters = json.dumps({"container": [cid], "event": ["die", "oom"]})
        body = await self._get(
            "/events", since=f"{since:.6f}", until=f"{time.time():.6f}", filters=filters
        )
        events = []
        for line in (body or b"").splitlines():
            if line.strip():
                events.append(json.loads(line))
        return events

    # -- the state -----------------------------------------------------------------------

    async def _explain_exit(self, info: dict[str, Any]) -> tuple[str, bool, bool]:
        """How the run in `info` ended, the container not running now."""
        st = info["State"]
        code, oom = int(st.get("ExitCode") or 0), bool(st.get("OOMKilled"))
        how = exit_how(code, oom, str(st.get("Error") or ""))
        tty = bool(info.get("Config", {}).get("Tty"))
        said_oom, exception = await self._logs_say(info["Id"], tty, str(st.get("StartedAt", "")))
        return how, oom or said_oom, exception

    async def _explain_missed(
        self, info: dict[str, Any], previous: tuple[str, str]
    ) -> tuple[str, bool, bool]:
        """How an earlier run ended that Docker restarted before we looked again."""
        cid, started = previous
        events = await self._events(cid, docker_time(started))
        dies = [e for e in events if e.get("Action", e.get("status")) == "die"]
        oom = any(e.get("Action", e.get("status")) == "oom" for e in events)
        if dies:
            code = int(dies[-1].get("Actor", {}).get("Attributes", {}).get("exitCode") or 0)
            how = exit_how(code, oom)
        else:
            how = "exited (status unknown)"
        tty = bool(info.get("Config", {}).get("Tty"))
        until = docker_time(str(info["State"].get("StartedAt", "")))
        said_oom, exception = await self._logs_say(cid, tty, started, until)
        return f"{how}; restarted by Docker", oom or said_oom, exception

    async def _read(self) -> ProcessState:
        info = await self._inspect()
        if info is None:
            if self._run is None:
                return ProcessState(self.name, "STARTING", 0, "container not found yet")
            return ProcessState(
                self.name, "EXITED", 0, "container removed", self._gone[1], self._gone[2]
            )
        st = info["State"]
        run = (str(info["Id"]), str(st.get("StartedAt", "")))
        status = str(st.get("Status", "exited"))
        if status == "running":
            if self._run is not None and run != self._run and self._explained != self._run:
                # Died and came back between two reads (Docker restarts at once): the
                # death still happened, and how matters (OOM). Report it once.
                how, oom, exception = await self._explain_missed(info, self._run)
                self._explained, self._run = self._run, run
                return ProcessState(self.name, "BACKOFF", 0, how, oom, exception)
            self._run = run
            return ProcessState(self.name, "RUNNING", int(st.get("Pid") or 0))
        if status == "paused":
            return ProcessState(self.name, "STOPPED", int(st.get("Pid") or 0))
        if status == "created" or (self._run is None and not docker_time(run[1])):
            return ProcessState(self.name, "STARTING", 0, "container not started yet")
        if self._explained != run:
            self._gone = await self._explain_exit(info)
            self._explained = run
        return ProcessState(self.name, _STATES.get(status, "EXITED"), 0, *self._gone)

    async def read(self, timeout: float) -> ProcessState:
        try:
            state = await asyncio.wait_for(self._read(), timeout)
        except (DockerUnavailable, asyncio.TimeoutError, ValueError, KeyError) as exc:
            if self._api_ok:
                log.warning("%s unreadable, HTTP signals only meanwhile: %s", self.name, exc)
            self._api_ok = False
            raise
        if not self._api_ok:
            log.info("engine %s readable again", self.name)
            self._api_ok = True
        return state

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
