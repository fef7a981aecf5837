"""What the CLI prints: the status table, JSON and YAML documents, event lines.

Pure functions of what the client read, so that they are tested without a cluster
(tests/unit/test_ctl.py).
"""

from __future__ import annotations

import json
import time
from typing import Any

import yaml

from ha_agent.config import DYNAMIC_SETTINGS
from ha_agent.ctl.client import ClusterView, Traffic
from ha_agent.dcs.base import HAEvent, Role

FORMATS = ("table", "json", "yaml")


def status_document(view: ClusterView) -> dict[str, Any]:
    """`status -o json|yaml`: the store's view, each agent's own answer, and what the
    relays routed to each node since they started (null: no relay answered)."""
    c = view.cluster
    t = view.traffic

    def traffic(name: str) -> dict[str, Any] | None:
        share = t.share(name) if t else None
        if t is None or (share is None and not t.requests and t.errors):
            return None
        return {
            "requests": int(t.requests.get(name, 0.0)),
            "share": round(share[1], 4) if share else 0.0,
            "in_rotation": t.can_serve.get(name),
        }

    return {
        "leader": view.primary,
        "epoch": c.leader.epoch if c and c.leader else None,
        "max_epoch": c.max_epoch if c else None,
        "paused": c.paused if c else None,
        "store_error": view.store_error,
        "nodes": [
            {
                "name": n.name,
                "api_url": n.api_url,
                "status": n.status.to_json() if n.status else None,
                "traffic": traffic(n.name),
            }
            for n in view.nodes
        ],
        "relay_errors": t.errors if t else [],
    }


def _traffic_cells(view: ClusterView, name: str, since: Traffic | None) -> tuple[str, str]:
    """ROUTED (in the relays' rotation) and SHARE (of the requests they answered)."""
    t = view.traffic
    if t is None:
        return "-", "-"
    can = t.can_serve.get(name)
    routed = "?" if can is None else ("yes" if can else "no")
    share = t.share(name, since)
    return routed, "-" if share is None else f"{100 * share[1]:.0f}% ({share[0]:.0f})"


def status_table(view: ClusterView, since: Traffic | None = None) -> str:
    """The status table; SHARE counts since the relays started, or since `since` (the
    previous view of a watch)."""
    header = (
        "NODE",
        "ROLE",
        "ENGINE",
        "SERVING",
        "ROUTED",
        "SHARE",
        "EPOCH",
        "LEASE LEFT",
        "DEGRADED",
        "PAUSED",
        "API",
    )
    rows: list[tuple[str, ...]] = [header]
    for n in view.nodes:
        s = n.status
        routed, share = _traffic_cells(view, n.name, since)
        if s is None:
            rows.append((n.name, n.role, "?", "?", routed, share, "?", "", "?", "?", n.api_url))
            continue
        rows.append(
            (
                n.name,
                n.role,
                s.engine.state.value,
                "yes" if s.serving else "no",
                routed,
                share,
                str(s.epoch),
                f"{s.lease_time_left:.1f}s" if s.role is Role.PRIMARY else "",
                "yes" if s.degraded else "no",
                "yes" if s.paused else "no",
                n.api_url,
            )
        )
    lines = _columns(rows)
    if view.traffic is not None:
        span = "since the last view" if since is not None else "since the relay started"
        lines.append(f"SHARE: requests the relay answered from each node, {span}")
        for error in view.traffic.errors:
            lines.append(f"relay UNREACHABLE: {error}")
    # Pool mode: why a node is out of service or not yet back in it.
    for n in view.nodes:
        s = n.status
        if s is not None and s.mode == "pool" and s.pool and not s.serving:
            lines.append(f"{n.name}: {s.pool}")
    # Why a hung engine is (not yet) restarted, and how many automatic restarts so far.
    for n in view.nodes:
        s = n.status
        if s is not None and (s.engine_restart or s.engine_restarts):
            note = s.engine_restart or "engine not hung"
            lines.append(f"{n.name}: {note} ({s.engine_restarts} automatic restart(s) lately)")
    c = view.cluster
    if c is not None:
        leader = f"{c.leader.node} (epoch {c.leader.epoch})" if c.leader else "none"
        modes = sorted({n.status.mode for n in view.nodes if n.status})
        lines.insert(
            0,
            f"cluster ok: leader {leader}, max epoch {c.max_epoch}"
            # The default pair says nothing; a pool, or agents that disagree, say so.
            + (f", mode {'/'.join(modes)}" if modes and modes != ["pair"] else "")
            + (", PAUSED" if c.paused else ""),
        )
    else:
        lines.insert(0, f"store UNREACHABLE ({view.store_error}): showing the agents' own view")
    return "\n".join(lines)


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]


def render(document: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(document, indent=2)
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False).rstrip()


def event_line(e: HAEvent) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.ts))
    return f"[{stamp}] {e.event} {e.detail}".rstrip() + f"  ({e.node})"


def event_document(e: HAEvent) -> dict[str, Any]:
    return {"ts": e.ts, "event": e.event, "node": e.node, "detail": e.detail}


def config_text(stored: dict[str, Any], effective: dict[str, Any], node: str) -> str:
    """show-config, and what edit-config opens in $EDITOR: the values set, as YAML,
    then the settings not set, commented out, with the value in effect on `node`."""
    lines = [
        "# Cluster-wide dynamic settings (sglang-ha edit-config). A value set here",
        "# overrides every agent's and the relay's environment, without a restart.",
    ]
    if stored:
        lines.append(yaml.safe_dump(stored, sort_keys=True).rstrip())
    unset = [k for k in DYNAMIC_SETTINGS if k not in stored]
    if unset:
        lines.append(f"# Not set (value from the environment, as on {node}):")
        for key in unset:
            value = effective.get(key)
            shown = "(relay setting)" if value is None else json.dumps(value)
            lines.append(f"# {key}: {shown}")
    return "\n".join(lines)


def parse_mapping(text: str) -> dict[str, Any]:
    """A YAML mapping of setting: value (comments ignored; null kept, it unsets)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("the config must be a mapping of setting: value")
    return {str(k): v for k, v in data.items()}


def parse_config_text(text: str) -> dict[str, Any]:
    """What the operator left in the editor: the whole config, as a YAML mapping."""
    return {k: v for k, v in parse_mapping(text).items() if v is not None}


def parse_assignment(item: str) -> tuple[str, Any]:
    """`--set key=value`: the value typed as YAML reads it; `key=` or `key=null` unsets."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"{item!r} is not key=value")
    value = yaml.safe_load(raw) if raw.strip() else None
    return key, value
