"""What the agent knows about its engine's process beyond HTTP: running, gone, how it died.

Why: a crash and an OOM kill look the same over HTTP (connection refused); whoever
runs the engine saw the exit status, and the engine's output says whether memory
ran out. Three sources, one interface (`ProcessWatch.read`):

- `SupervisorWatch`: the node image's own engine under supervisord;
- `HostProcessWatch` (sidecar mode): a process the user runs, found by PID or by its
  command line in the host's PID namespace (`--pid=host`);
- `ContainerWatch` (sidecar mode, ha_agent/node/engine/container.py): a container the
  user runs, through the Docker API.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import xmlrpc.client
from dataclasses import dataclass
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

# The engine launcher prints this to stderr, with "(pid N)", before it execs the engine.
START_MARKER = "sglang-ha: engine starting"
OOM_TEXT = re.compile(r"out of memory|OutOfMemoryError|oom-kill", re.IGNORECASE)
# The engine's own fatal exception, logged by the process that raised it just before it
# takes the server down (SGLang 0.5.19 `srt/managers/scheduler.py` run_scheduler_process,
# and likewise data_parallel_controller.py, detokenizer_manager.py, tokenizer_manager.py,
# multi_tokenizer_mixin.py). A kill, an OOM kill or a lost node never print it: only this
# kind of death can be caused by a request (a kernel fault at its prefill).
EXCEPTION_TEXT = re.compile(
    r"\b(?:Scheduler|DataParallelController|DetokenizerManager|TokenizerManager"
    r"|MultiDetokenizerRouter|MultiTokenizerRouter) hit an exception"
)
_EXIT_LINE = re.compile(r"exited: (?P<name>\S+) \((?P<how>[^)]*)\)")
# How long after a death was first seen its run's output is taken as complete in the
# log: supervisord drains a dead process's pipes when it reaps it (supervisor/process.py
# Subprocess.finish), yet a last line was once seen a read later under load; a line
# later than this would also have escaped the relay's older rule (EXCEPTION_GRACE).
OUTPUT_SETTLE = 0.5


def output_of_run(log: str, pid: int) -> str:
    """What the run with `pid` printed, out of the engine's stderr log.

    The launcher marks each start with its pid (it execs the engine, so the pid is
    the engine's). supervisord may already have started the next run by the time
    we read, so the last run in the log is not necessarily the one that died. The
    log outlives the container (a volume) and pids start over in a new one: the
    latest run with that pid is the one.
    """
    runs = list(re.finditer(rf"{re.escape(START_MARKER)}[^\n]*\(pid {pid}\)", log)) if pid else []
    own = runs[-1] if runs else None
    if own:
        return log[own.end() :].split(START_MARKER, 1)[0]
    others = [m.start() for m in re.finditer(re.escape(START_MARKER), log)]
    if pid and others:
        # Its marker has scrolled out of the tail: everything before the next run's.
        return log[: others[0]]
    return log.rsplit(START_MARKER, 1)[-1]


@dataclass(frozen=True)
class ProcessState:
    name: str
    # supervisord's statenames: RUNNING, STARTING, BACKOFF, EXITED, FATAL, STOPPED...;
    # the sidecar watches map onto them (a paused container or a SIGSTOPped process is
    # STOPPED: alive but not running).
    state: str
    pid: int
    exit_how: str = ""  # "terminated by SIGKILL", "exit status 1"
    oom: bool = False
    exception: bool = False  # the run's output ends in the engine's own exception
    # The ended run's output was read `OUTPUT_SETTLE` after its death was seen: `oom`
    # and `exception` will not turn true later, so "no exception" is an answer.
    final: bool = False

    @property
    def running(self) -> bool:
        return self.state == "RUNNING"

    def describe(self) -> str:
        if self.running:
            return f"running (pid {self.pid})"
        how = f", last exit: {self.exit_how}" if self.exit_how else ""
        oom = " — out of memory" if self.oom else ""
        exc = " — the engine's own exception" if self.exception else ""
        return f"{self.state.lower()}{how}{oom}{exc}"


# /proc/<pid>/stat state letters: T/t stopped (SIGSTOP, traced), Z/X gone.
_STOPPED, _GONE = "Tt", "ZX"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class ProcessActivity:
    """What /proc says of the engine's main process (SGLang's HTTP server and
    tokenizer): stopped or not, and the CPU time it has used.

    Why: when /metrics goes unanswered, a SIGSTOPped or deadlocked engine uses no
    CPU, while one tokenizing a big prompt in its HTTP process uses a whole core.
    """

    letter: str  # R running, S sleeping, D disk wait, T stopped...
    cpu_seconds: float  # user + system, all threads

    @property
    def stopped(self) -> bool:
        return self.letter in _STOPPED


def read_activity(pid: int, proc: str = "/proc") -> ProcessActivity | None:
    """The activity of `pid`, None if it is gone or /proc does not show it."""
    try:
        with open(f"{proc}/{pid}/stat") as fh:
            raw = fh.read()
        # The command name (field 2) may hold spaces and parentheses: split after it.
        fields = raw[raw.rindex(")") + 2 :].split()
        letter, utime, stime = fields[0], int(fields[11]), int(fields[12])
    except (OSError, ValueError, IndexError):
        return None
    if letter in _GONE:
        return None
    return ProcessActivity(letter, (utime + stime) / _CLOCK_TICKS)


class ProcessWatch:
    """Reads the engine's process state; raises when the source itself is away
    (the monitor then falls back to HTTP signals alone)."""

    async def read(self, timeout: float) -> ProcessState:  # pragma: no cover - interface
        raise NotImplementedError

    def activity(self, pid: int) -> ProcessActivity | None:
        """/proc's view of the running engine `pid`, where this agent shares its PID
        namespace; None where it cannot see it (a container's host PID)."""
        return None

    def describe(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    async def close(self) -> None:
        return None


class SupervisorWatch(ProcessWatch):
    """The engine program of this container's supervisord."""

    def __init__(self, socket_path: str, program: str) -> None:
        self.program = program
        transport = SupervisorTransport(None, None, f"unix://{socket_path}")
        self._rpc: Any = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
        self._last_pid = 0
        self._last_exit = ""
        self._last_oom = False
        self._last_exception = False
        self._dead_pid = 0  # the run that died last, whose output tells how
        self._dead_seen_at = 0.0  # when its death was first read (monotonic)

    def describe(self) -> str:
        return f"supervisord program {self.program}"

    def _read(self) -> ProcessState:
        info = self._rpc.supervisor.getProcessInfo(self.program)
        state, pid = str(info["statename"]), int(info["pid"])
        if state != "RUNNING":
            if self._last_pid or not self._last_exit:
                # The process just went away: find out how, once.
                self._last_exit = self._exit_how()
                self._dead_pid = self._last_pid
                self._dead_seen_at = time.monotonic()
            if not (self._last_oom and self._last_exception):
                # Looked at on every read while it is down, not once: supervisord may
                # report the death before it has drained the run's last output (the
                # OOM line, the exception) from the pipe into the log.
                tail = str(self._rpc.supervisor.tailProcessStderrLog(self.program, 0, 16384)[0])
                out = output_of_run(tail, self._dead_pid)
                self._last_oom = self._last_oom or bool(OOM_TEXT.search(out))
                self._last_exception = self._last_exception or bool(EXCEPTION_TEXT.search(out))
        if state == "RUNNING" and pid != self._last_pid:
            self._last_oom = self._last_exception = False
        self._last_pid = pid if state == "RUNNING" else 0
        settled = time.monotonic() - self._dead_seen_at >= OUTPUT_SETTLE
        return ProcessState(
            self.program,
            state,
            pid,
            self._last_exit,
            self._last_oom,
            self._last_exception,
            final=state != "RUNNING" and settled,
        )

    def _exit_how(self) -> str:
        log = str(self._rpc.supervisor.readLog(-16384, 0))
        found = [
            m.group("how") for m in _EXIT_LINE.finditer(log) if m.group("name") == self.program
        ]
        return found[-1] if found else ""

    async def read(self, timeout: float) -> ProcessState:
        return await asyncio.wait_for(asyncio.to_thread(self._read), timeout)

    def activity(self, pid: int) -> ProcessActivity | None:
        # The agent runs under the same supervisord, in the same PID namespace.
        return read_activity(pid)


LOG_TAIL = 65536


class HostProcessWatch(ProcessWatch):
    """An engine process the agent did not start, read from /proc.

    Needs the engine's PID namespace (`--pid=host` when the engine runs on the host).
    The exit status of a process that is not our child is unknowable; if the engine
    writes a log file we can read, what it wrote during this run tells an OOM apart.
    """

    def __init__(
        self,
        pid: int | None = None,
        pattern: str | None = None,
        log_file: str | None = None,
        proc: str = "/proc",
    ) -> None:
        if not pid and not pattern:
            raise ValueError("HostProcessWatch needs a pid or a command-line pattern")
        self.pid, self.pattern, self.log_file, self.proc = pid, pattern, log_file, proc
        self.name = f"pid {pid}" if pid else f"process matching {pattern!r}"
        self._run: tuple[int, int] | None = None  # (pid, start time) of the run last seen
        self._log_offset = 0  # log size when that run was first seen
        # How the last run ended: read when it is seen gone, and again, final, once
        # OUTPUT_SETTLE has passed since (`_gone_at`, monotonic).
        self._gone: ProcessState | None = None
        self._gone_at = 0.0

    def describe(self) -> str:
        return self.name

    # -- /proc ---------------------------------------------------------------------------

    def _stat(self, pid: int) -> tuple[str, int, int] | None:
        """(state letter, parent pid, start time) of a process, None if it is gone."""
        try:
            with open(f"{self.proc}/{pid}/stat") as fh:
                raw = fh.read()
        except OSError:
            return None
        # The command name (field 2) may hold spaces and parentheses: split after it.
        fields = raw[raw.rindex(")") + 2 :].split()
        return fields[0], int(fields[1]), int(fields[19])

    def _cmdline(self, pid: int) -> str:
        try:
            with open(f"{self.proc}/{pid}/cmdline", "rb") as fh:
                return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            return ""

    def _find(self) -> int | None:
        assert self.pattern is not None
        me = os.getpid()
        matches: dict[int, int] = {}  # pid -> parent pid
        for entry in os.listdir(self.proc):
            if not entry.isdigit() or int(entry) == me:
                continue
            cmdline = self._cmdline(int(entry))
            # Never ourselves: the agent's own programs are named sglang-ha-*.
            if self.pattern in cmdline and "sglang-ha" not in cmdline:
                stat = self._stat(int(entry))
                if stat is not None and stat[0] not in _GONE:
                    matches[int(entry)] = stat[1]
        # The engine's own worker processes match too: take the root of the tree.
        roots = [pid for pid, parent in matches.items() if parent not in matches]
        return min(roots) if roots else None

    # -- the state ----------------------------------------------------------------------

    def _log_size(self) -> int:
        try:
            return os.path.getsize(self.log_file) if self.log_file else 0
        except OSError:
            return 0

    def _log_says(self) -> tuple[bool, bool]:
        """Whether the engine's log says it ran out of memory, and whether it hit its
        own exception, since this run was seen."""
        if not self.log_file:
            return False, False
        try:
            with open(self.log_file, "rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                start = self._log_offset if self._log_offset <= size else 0  # rotated
                fh.seek(max(start, size - LOG_TAIL))
                text = fh.read().decode(errors="replace")
        except OSError:
            return False, False
        return bool(OOM_TEXT.search(text)), bool(EXCEPTION_TEXT.search(text))

    def _alive(self) -> tuple[int, str, int] | None:
        """(pid, state letter, start time) of the engine if it is alive."""
        pid = self.pid or self._find()
        stat = self._stat(pid) if pid else None
        if pid is None or stat is None or stat[0] in _GONE:
            return None
        if self.pid and self._run is not None and self._run != (pid, stat[2]):
            return None  # the configured PID now belongs to another process
        return pid, stat[0], stat[2]

    def _read(self) -> ProcessState:
        found = self._alive()
        if found is not None:
            pid, letter, started = found
            if self._run != (pid, started):
                # Died and came back between two reads (restarted at once): the death
                # still happened, and how matters. Reported once, as supervisord's
                # BACKOFF; the new run is reported from the next read on.
                missed = self._run is not None and self._gone is None
                said = self._log_says() if missed else (False, False)
                self._run, self._gone = (pid, started), None
                self._log_offset = self._log_size()
                if missed:
                    return ProcessState(self.name, "BACKOFF", 0, "gone and started again", *said)
            if letter in _STOPPED:
                return ProcessState(self.name, "STOPPED", pid)  # SIGSTOP: frozen
            return ProcessState(self.name, "RUNNING", pid)
        if self._run is None:
            # Never seen yet: the user's engine may simply not be up.
            return ProcessState(self.name, "STARTING", 0, "not found yet")
        if self._gone is None or (
            not self._gone.final and time.monotonic() - self._gone_at >= OUTPUT_SETTLE
        ):
            # Read again once settled: the engine's last lines may reach its log
            # file after it is gone (through a pipe, a logger).
            oom, exception = self._log_says()
            final = self._gone is not None
            self._gone_at = self._gone_at if final else time.monotonic()
            self._gone = ProcessState(
                self.name, "EXITED", 0, "gone (exit status unknown)", oom, exception, final
            )
        return self._gone

    async def read(self, timeout: float) -> ProcessState:
        return await asyncio.wait_for(asyncio.to_thread(self._read), timeout)

    def activity(self, pid: int) -> ProcessActivity | None:
        return read_activity(pid, self.proc)
