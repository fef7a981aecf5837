"""`sglang-ha`: look at and steer an sglang-ha cluster (after patronictl).

    sglang-ha status                 nodes, roles, epoch, engine health, lease time left
    sglang-ha switchover [--to N]    planned hand-over; refused unless the target is healthy
    sglang-ha failover --to N --force   for when the primary is gone
    sglang-ha pause | resume         keep roles, suspend automatic actions (maintenance)
    sglang-ha history [-n 50]        the HA events, from the store
    sglang-ha verify [--disruptive]  the pre-production checklist (on the Docker host)

Settings come from the same HA_* environment as the agent (inside a node container
everything is set); the admin token from HA_ADMIN_TOKEN or --token.
"""

from __future__ import annotations

import json
import time
from typing import Any

import click

from ha_agent.config import AgentSettings
from ha_agent.ctl.client import ClusterClient, ClusterView
from ha_agent.dcs.base import Role


def _client(ctx: click.Context) -> ClusterClient:
    obj: dict[str, Any] = ctx.obj
    return ClusterClient(obj["settings"], obj["token"])


@click.group(help=__doc__)
@click.option("--token", envvar="HA_ADMIN_TOKEN", default=None, help="Admin token.")
@click.pass_context
def cli(ctx: click.Context, token: str | None) -> None:
    ctx.obj = {"settings": AgentSettings(), "token": token}


def _table(view: ClusterView) -> str:
    header = ("NODE", "ROLE", "ENGINE", "EPOCH", "LEASE LEFT", "DEGRADED", "PAUSED", "API")
    rows = [header]
    for n in view.nodes:
        s = n.status
        if s is None:
            rows.append((n.name, n.role, "?", "?", "", "?", "?", n.api_url))
            continue
        rows.append(
            (
                n.name,
                n.role,
                s.engine.state.value,
                str(s.epoch),
                f"{s.lease_time_left:.1f}s" if s.role is Role.PRIMARY else "",
                "yes" if s.degraded else "no",
                "yes" if s.paused else "no",
                n.api_url,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    c = view.cluster
    if c is not None:
        leader = f"{c.leader.node} (epoch {c.leader.epoch})" if c.leader else "none"
        lines.insert(
            0,
            f"cluster {view.cluster and 'ok'}: leader {leader}, max epoch {c.max_epoch}"
            + (", PAUSED" if c.paused else ""),
        )
    else:
        lines.insert(0, f"store UNREACHABLE ({view.store_error}): showing the agents' own view")
    return "\n".join(lines)


@cli.command(help="Nodes, roles, epoch, engine health, lease time left, degraded mode.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    view = _client(ctx).view()
    if as_json:
        click.echo(
            json.dumps(
                {
                    "leader": view.primary,
                    "store_error": view.store_error,
                    "nodes": [
                        {
                            "name": n.name,
                            "api_url": n.api_url,
                            "status": n.status.to_json() if n.status else None,
                        }
                        for n in view.nodes
                    ],
                },
                indent=2,
            )
        )
    else:
        click.echo(_table(view))


def _act(ctx: click.Context, path: str, body: dict[str, Any], timeout: float = 30.0) -> None:
    client = _client(ctx)
    view = client.view()
    targets = [n for n in view.nodes if n.status]
    if not targets:
        raise click.ClickException("no agent answers")
    # Ask the primary's agent if there is one (it knows its own state best).
    targets.sort(key=lambda n: n.role != Role.PRIMARY.value)
    code, data = client.post(targets[0].api_url, path, body, timeout=timeout)
    message = data.get("detail") or json.dumps(data)
    if code in (200, 202):
        click.echo(message)
        return
    if code == 401:
        raise click.ClickException(f"refused: {message} (set HA_ADMIN_TOKEN or --token)")
    raise click.ClickException(f"refused ({code}): {message}")


@cli.command(help="Planned hand-over to a healthy standby; no request fails.")
@click.option(
    "--to", "target", default=None, help="Node to promote (default: any healthy standby)."
)
@click.option("--no-wait", is_flag=True, help="Return once requested, not once done.")
@click.pass_context
def switchover(ctx: click.Context, target: str | None, no_wait: bool) -> None:
    path = "/ha/switchover" + ("?wait=false" if no_wait else "")
    _act(ctx, path, {"to": target} if target else {})


@cli.command(help="Force NODE to become primary (when the primary is gone).")
@click.option("--to", "target", required=True, help="Node to promote.")
@click.option("--force", is_flag=True, help="Required: this drops the current lease.")
@click.pass_context
def failover(ctx: click.Context, target: str, force: bool) -> None:
    if not force:
        raise click.UsageError("failover drops the current lease: add --force")
    _act(ctx, "/ha/failover", {"to": target, "force": True})


@cli.command(help="Keep roles; suspend automatic failover (maintenance).")
@click.pass_context
def pause(ctx: click.Context) -> None:
    _act(ctx, "/ha/pause", {})


@cli.command(help="Resume automatic actions.")
@click.pass_context
def resume(ctx: click.Context) -> None:
    _act(ctx, "/ha/resume", {})


@cli.command(help="The HA events, oldest first, from the store.")
@click.option("-n", "--count", default=50, show_default=True, type=click.IntRange(1, 10000))
@click.pass_context
def history(ctx: click.Context, count: int) -> None:
    try:
        events = _client(ctx).history(count)
    except Exception as exc:
        raise click.ClickException(f"history unavailable: {exc}") from exc
    for e in events:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.ts))
        click.echo(f"[{stamp}] {e.event} {e.detail}".rstrip() + f"  ({e.node})")


@cli.command(help="The pre-production checklist against a running stack (on the Docker host).")
@click.option("--project", default="sglang-ha", show_default=True, help="Compose project name.")
@click.option(
    "--disruptive", is_flag=True, help="Also freeze the primary and stop Redis (restored)."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def verify(project: str, disruptive: bool, as_json: bool) -> None:
    from ha_agent.ctl import verify as checklist

    results = checklist.run(project, disruptive)
    click.echo(checklist.as_json(results) if as_json else checklist.render(results))
    if any(c.status == "fail" for c in results):
        raise SystemExit(1)


def main() -> None:
    cli(prog_name="sglang-ha")


if __name__ == "__main__":
    main()
