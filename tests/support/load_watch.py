"""What the saturation and overload tests watch while their load runs: the agents'
roles, the streams' ends, the HA logs."""

from __future__ import annotations

import asyncio
import calendar
import time
from typing import Any

import httpx

from tests.support.stack import NODES, Stack

# (role, epoch, engine state, engine reason) of one node, as /ha/status said it.
AgentView = tuple[str, Any, Any, Any]
Views = list[tuple[float, dict[str, AgentView]]]


async def watch_agents(
    stack: Stack, http: httpx.AsyncClient, views: Views, until: float, every: float = 0.5
) -> None:
    """Every node's /ha/status, every `every` seconds until `until`."""
    while time.monotonic() < until:
        view: dict[str, AgentView] = {}
        for node in NODES:
            try:
                s = (await http.get(f"{stack.agent_url(node)}/ha/status", timeout=2)).json()
                view[node] = (s["role"], s["epoch"], s["engine"]["state"], s["engine"]["reason"])
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                view[node] = ("unanswered", None, None, str(exc))
        views.append((time.monotonic(), view))
        await asyncio.sleep(every)


def role_changes(views: Views, primary: str, epochs: dict[str, Any]) -> list[Any]:
    """The views (seconds from the first) in which `primary` was not the primary of
    its epoch with a healthy engine, or another node was primary."""
    t0 = views[0][0] if views else 0.0
    return [
        (round(t - t0, 1), view)
        for t, view in views
        if view[primary][:3] != ("primary", epochs[primary], "healthy")
        or any(view[n][0] == "primary" for n in NODES if n != primary)
    ]


def ha_log_lengths(stack: Stack) -> dict[str, int]:
    return {n: len(stack.ha_log(n).splitlines()) for n in NODES.values()}


def moved_lines(stack: Stack, before: dict[str, int]) -> list[str]:
    """FAILOVER and ENGINE_UNHEALTHY lines logged since `before` (ha_log_lengths)."""
    return [
        line
        for service, count in before.items()
        for line in stack.ha_log(service).splitlines()[count:]
        if "FAILOVER" in line or "ENGINE_UNHEALTHY" in line
    ]


async def stream_completed(r: httpx.Response, tokens: int, failed: list[str]) -> bool:
    """Read a /generate stream to its end: whether it generated all `tokens`; if
    not, how it ended goes to `failed`."""
    last = ""
    async for line in r.aiter_lines():
        if line.startswith("data:") and "[DONE]" not in line:
            last = line
    if f'"completion_tokens":{tokens}' in last.replace(" ", ""):
        return True
    failed.append(f"ended early: {last[-200:]}")
    return False


def engine_down_spans(ha_log: str) -> list[tuple[float, float]]:
    """(from, to) in seconds (the log's whole-second stamps, read as UTC: only their
    differences matter) in which an agent's log (ha.log, or the part written since
    some moment) had its engine unhealthy: from an ENGINE_UNHEALTHY to the next
    ENGINE_HEALTHY, or to infinity when still down at the end."""
    spans: list[tuple[float, float]] = []
    down: float | None = None
    for line in ha_log.splitlines():
        if not line.startswith("[") or "] ENGINE_" not in line:
            continue
        try:
            at = float(calendar.timegm(time.strptime(line[1:20], "%Y-%m-%d %H:%M:%S")))
        except ValueError:
            continue
        if "] ENGINE_UNHEALTHY " in line and down is None:
            down = at
        elif "] ENGINE_HEALTHY " in line and down is not None:
            spans.append((down, at))
            down = None
    if down is not None:
        spans.append((down, float("inf")))
    return spans


def overlapping(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[Any]:
    """Spans of `a` and `b` that share more than a boundary second (the log's stamps
    are whole seconds: one node back and the other down within the same second is
    not counted; the status samples cover that)."""
    return [(x, y) for x in a for y in b if x[0] < y[1] and y[0] < x[1]]
