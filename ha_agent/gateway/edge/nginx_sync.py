"""Keep Nginx's upstreams right: the last-resort engines equal to the nodes the relay
knows, and the relay workers' sockets (a frozen one's is hidden by watchdog.py).

Nginx (open source) resolves upstream names once, at load time, and refuses to
start if one does not resolve. So the relay writes the engines' *addresses* into
an include file and reloads Nginx when the list changes: nodes registered in Redis
become reachable directly from Nginx if the relay itself is down, and no node
address is baked into the gateway's configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from ha_agent.atomic_file import write_atomic
from ha_agent.gateway.admission.client_keys import ClientKeys
from ha_agent.gateway.upstream.topology import NodeView, Topology

log = logging.getLogger(__name__)


def resolve(url: str) -> str | None:
    """`host:port` of an engine URL with the host resolved to an address."""
    parts = urlsplit(url)
    if not parts.hostname:
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except OSError:
        return None
    family, _, _, _, sockaddr = infos[0]
    host = f"[{sockaddr[0]}]" if family == socket.AF_INET6 else sockaddr[0]
    return f"{host}:{port}"


def render(nodes: Iterable[NodeView], known: dict[str, str] | None = None) -> str:
    """The include file. `known` remembers each node's last address: a node whose
    name stops resolving for a while (its container was killed) keeps its line.

    Why: every change means an Nginx reload, and a reload closes idle keep-alive
    connections; a client that sends on one at that moment gets a connection error.
    So the file changes only when an address really changes.
    """
    known = {} if known is None else known
    lines = [
        "# Written by the sglang-ha relay: engines Nginx may reach directly if the relay is down."
    ]
    for node in sorted(nodes, key=lambda n: n.name):
        if urlsplit(node.engine_url).scheme == "https":
            # Nginx's upstream block is plain HTTP (the relay's sockets share it): an
            # engine serving TLS gets no last-resort path rather than a broken one.
            lines.append(f"# {node.name}: {node.engine_url} serves TLS, not a backup here")
            continue
        address = resolve(node.engine_url) or known.get(node.name)
        if address:
            known[node.name] = address
            lines.append(f"server {address} backup max_fails=1 fail_timeout=2s;  # {node.name}")
        else:
            lines.append(f"# {node.name}: {node.engine_url} does not resolve now")
    return "\n".join(lines) + "\n"


def relay_worker_socket(socket_dir: str | os.PathLike[str], index: int) -> str:
    """Where relay worker `index` listens alone (service.py) and Nginx finds it."""
    return os.path.join(socket_dir, f"relay-{index}.sock")


def relay_worker_sockets(socket_dir: str | os.PathLike[str], workers: int) -> list[str]:
    """Each relay worker's own Unix socket, as Nginx names it (`unix:` + path)."""
    return [f"unix:{relay_worker_socket(socket_dir, i)}" for i in range(max(workers, 1))]


def render_relay_servers(servers: list[str]) -> str:
    """The relay workers Nginx sends to, one address each. Written once at start: a
    frozen worker leaves the rotation by its socket's name, not by a reload."""
    lines = ["# Written by the sglang-ha gateway: its relay workers."]
    lines += [f"server {server} max_fails=1 fail_timeout=2s;" for server in servers]
    return "\n".join(lines) + "\n"


async def keep_in_sync(
    topology: Topology, path: str, reload_command: str, stop: asyncio.Event, every: float = 2.0
) -> None:
    known: dict[str, str] = {}
    while not stop.is_set():
        text = await asyncio.to_thread(render, list(topology.nodes.values()), known)
        if _changed(path, text):
            await asyncio.to_thread(write_atomic, path, text)
            await reload_nginx(reload_command)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every)


def _changed(path: str, text: str) -> bool:
    try:
        with open(path) as fh:
            return fh.read() != text
    except OSError:
        return True


async def reload_nginx(command: str, why: str = "last-resort upstreams updated") -> None:
    proc = await asyncio.create_subprocess_exec(
        *shlex.split(command), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=10)
    except asyncio.TimeoutError:
        proc.kill()
        log.warning("nginx reload timed out")
        return
    if proc.returncode:
        log.warning("nginx reload failed (%s): %s", proc.returncode, out.decode(errors="replace"))
    else:
        log.info("nginx reloaded: %s", why)


def render_client_keys(keys: dict[str, str] | None) -> str:
    """The body of Nginx's `map $http_authorization $sglang_ha_client` (the template):
    the key's name for a valid `Authorization`, else empty, which Nginx answers with
    SGLang's 401 before any upstream is chosen, so its last-resort path straight to
    the engines needs a key too. None (keys off): every request passes.

    As SGLang reads the header (client_keys.bearer): the scheme in any case, one
    space, the key exactly. Keys hold only RFC 6750 b64token characters
    (client_keys.KEY), of which `.` and `+` mean something in a regex.
    """
    lines = ["# Written by the sglang-ha relay from the client key file. Holds the keys: 0600."]
    if keys is None:
        lines.append('default "-";  # client keys off')
    else:
        lines.append('default "";')
        for name, key in sorted(keys.items()):
            pattern = re.sub(r"([.+])", r"\\\1", key)
            lines.append(f'"~^(?i:bearer) {pattern}$" "{name}";')
    return "\n".join(lines) + "\n"


def write_private(path: str, text: str) -> None:
    """Replace `path` with `text`, readable by this user only (it holds keys)."""
    tmp = f"{path}.tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


async def keep_client_keys_in_sync(
    keys: ClientKeys, path: str, reload_command: str, stop: asyncio.Event
) -> None:
    """Nginx's copy of the client keys follows the file within a poll and a reload;
    a reload lets the streams under way finish in the old Nginx workers."""
    while not stop.is_set():
        keys.refresh()
        text = render_client_keys(keys.keys)
        if _changed(path, text):
            await asyncio.to_thread(write_private, path, text)
            await reload_nginx(reload_command, "client keys updated")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=keys.poll)
