"""`sglang-ha`: the operator's tool for an sglang-ha cluster (after patronictl).

State is read from the store (Redis) and from each agent's /ha/status; actions go
through the agents' authenticated REST API. Long actions (switchover, restart,
rolling-restart) print the HA events as they happen, from the store's history.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import click
from click.shell_completion import get_completion_class

from ha_agent.config import AgentSettings
from ha_agent.ctl import output
from ha_agent.ctl.client import ClusterClient, ClusterView, NodeRow, Traffic
from ha_agent.dcs.base import AgentStatus, HAEvent, Role

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _client(ctx: click.Context) -> ClusterClient:
    obj: dict[str, Any] = ctx.obj
    if "client" not in obj:
        obj["client"] = ClusterClient(obj["settings"], obj["token"])
    client: ClusterClient = obj["client"]
    return client


@click.group(context_settings=CONTEXT)
@click.option(
    "--token-file",
    type=click.File("r"),
    default=None,
    help="File holding the admin token ('-': stdin). Never on the command line.",
)
@click.pass_context
def cli(ctx: click.Context, token_file: TextIO | None) -> None:
    """Look at and steer an sglang-ha cluster.

    Settings come from the agent's HA_* environment (inside a node container all
    is set); the admin token from --token-file, HA_ADMIN_TOKEN, or the node's
    secret file (/run/secrets/ha_admin_token).
    """
    if ctx.obj is None:  # tests pass their own client
        settings = AgentSettings()
        # A token in argv would show in every process list: file or environment only.
        token = token_file.read().strip() if token_file else os.environ.get("HA_ADMIN_TOKEN")
        if not token and settings.admin_token is not None:
            token = settings.admin_token.get_secret_value()
        ctx.obj = {"settings": settings, "token": token or None}


# -- helpers ------------------------------------------------------------------------------


def _fail(code: int, data: dict[str, Any]) -> click.ClickException:
    message = str(data.get("detail") or json.dumps(data))
    if code == 401:
        return click.ClickException(f"refused: {message} (set HA_ADMIN_TOKEN or --token-file)")
    if code == 0 or message.startswith("refused"):
        return click.ClickException(message)
    return click.ClickException(f"refused ({code}): {message}")


def _row(view: ClusterView, node: str) -> NodeRow:
    row = next((n for n in view.nodes if n.name == node), None)
    if row is None:
        known = ", ".join(n.name for n in view.nodes) or "none"
        raise click.ClickException(f"unknown node {node!r} (known: {known})")
    return row


def _agent(view: ClusterView) -> NodeRow:
    """The agent to send a cluster-wide action to: the primary's if it answers
    (it knows its own state best), else any that answers."""
    answering = [n for n in view.nodes if n.status]
    if not answering:
        raise click.ClickException("no agent answers")
    answering.sort(key=lambda n: n.name != view.primary)
    return answering[0]


class EventFollower:
    """Prints the HA events that appear in the store's history while we wait."""

    def __init__(self, client: ClusterClient) -> None:
        self.client = client
        self.seen: set[HAEvent] = set()
        self.seen.update(self._read())

    def _read(self) -> list[HAEvent]:
        try:
            return self.client.history(100)
        except Exception:  # the history is a courtesy here, not the result
            return []

    def poll(self) -> None:
        for e in self._read():
            if e not in self.seen:
                self.seen.add(e)
                click.echo("  " + output.event_line(e))


def _wait(
    client: ClusterClient,
    follower: EventFollower,
    what: str,
    done: Callable[[ClusterView], bool],
    timeout: float,
) -> ClusterView:
    """Poll the cluster until `done`, printing events, and a line every 10 s."""
    started = time.monotonic()
    noted = started
    while True:
        view = client.view()
        follower.poll()
        if done(view):
            return view
        now = time.monotonic()
        if now - started > timeout:
            raise click.ClickException(f"gave up after {timeout:.0f}s waiting for {what}")
        if now - noted >= 10:
            click.echo(f"  ... still waiting for {what} ({now - started:.0f}s)")
            noted = now
        time.sleep(0.5)


def _status_of(view: ClusterView, node: str) -> AgentStatus | None:
    row = next((n for n in view.nodes if n.name == node), None)
    return row.status if row else None


def _switchover(
    client: ClusterClient, follower: EventFollower, target: str | None, wait: bool = True
) -> str:
    """Ask for a planned switchover; with `wait`, follow it until the target leads."""
    view = client.view()
    primary = view.primary
    if primary is None:
        raise click.ClickException("there is no primary to switch over from; use failover")
    if view.cluster is not None and view.cluster.paused:
        raise click.ClickException("the cluster is paused: resume it first")
    agent = _agent(view)
    body = {"to": target} if target else {}
    code, data = client.post(agent.api_url, "/ha/switchover?wait=false", body, timeout=30)
    if code not in (200, 202):
        raise _fail(code, data)
    chosen = str(data.get("to") or target)
    click.echo(str(data.get("detail")))
    if not wait:
        return chosen
    started = time.monotonic()

    def moved(v: ClusterView) -> bool:
        status = _status_of(v, chosen)
        return v.primary == chosen and status is not None and status.role is Role.PRIMARY

    _wait(client, follower, f"{chosen} to take over", moved, client.s.handover_follow_timeout)
    click.echo(f"switched over from {primary} to {chosen} in {time.monotonic() - started:.1f}s")
    return chosen


def _restart(
    client: ClusterClient,
    follower: EventFollower,
    node: str,
    timeout: float,
    drain_timeout: float = 60.0,
) -> None:
    """Restart NODE's engine; a primary hands over first. Returns once it is healthy."""
    view = client.view()
    row = _row(view, node)
    if row.status is None:
        raise click.ClickException(f"the agent of {node} does not answer")
    if view.primary == node or row.status.role is Role.PRIMARY:
        click.echo(f"{node} is the primary: planned switchover first")
        _switchover(client, follower, None)

        def stepped_down(v: ClusterView) -> bool:
            status = _status_of(v, node)
            return status is not None and status.role is Role.STANDBY

        _wait(
            client, follower, f"{node} to step down", stepped_down, client.s.handover_follow_timeout
        )

    def drained(v: ClusterView) -> bool:
        status = _status_of(v, node)
        return status is not None and status.engine.running == 0 and status.engine.queued == 0

    # New requests no longer go to a standby; those it still runs (streams begun
    # before a switchover) finish first. A stuck one does not block the restart.
    try:
        _wait(client, follower, f"requests in flight on {node} to finish", drained, drain_timeout)
    except click.ClickException as exc:
        click.echo(f"  {exc.message}: restarting anyway (the engine drains on stop)")
    click.echo(f"restarting the engine of {node}")
    started = time.monotonic()
    code, data = client.post(row.api_url, "/ha/restart-engine", {}, timeout=120)
    if code != 200:
        raise _fail(code, data)
    click.echo(str(data.get("detail")))

    def healthy_again(v: ClusterView) -> bool:
        status = _status_of(v, node)
        return (
            status is not None
            and status.engine.healthy
            and status.engine.for_seconds <= time.monotonic() - started
        )

    _wait(client, follower, f"the engine of {node} to be healthy", healthy_again, timeout)
    click.echo(f"{node}: engine healthy again, {time.monotonic() - started:.1f}s after the restart")


def _output_option(default: str = "table") -> Callable[[Any], Any]:
    return click.option(
        "-o",
        "--output",
        "fmt",
        type=click.Choice(output.FORMATS),
        default=default,
        show_default=True,
        help="Output format.",
    )


# -- looking ------------------------------------------------------------------------------


@cli.command(short_help="Nodes, roles, epoch, engine health, lease time left.")
@_output_option()
@click.option("--json", "as_json", is_flag=True, help="Same as -o json.")
@click.option("-w", "--watch", is_flag=True, help="Refresh in place until Ctrl-C.")
@click.option(
    "-n", "--interval", default=2.0, show_default=True, type=click.FloatRange(0.2), help="s."
)
@click.option("-c", "--count", type=click.IntRange(1), default=None, help="Stop after N views.")
@click.pass_context
def status(
    ctx: click.Context,
    fmt: str,
    as_json: bool,
    watch: bool,
    interval: float,
    count: int | None,
) -> None:
    """Nodes, roles, engine health, share of traffic, epoch, lease time left, degraded mode."""
    fmt = "json" if as_json else fmt
    client = _client(ctx)
    shown = 0
    clear = watch and fmt == "table" and sys.stdout.isatty()
    previous: Traffic | None = None
    try:
        while True:
            view = client.view()
            if fmt == "table":
                # A watch shows each node's share of the traffic between two views.
                text = output.status_table(view, since=previous)
                previous = view.traffic
            else:
                text = output.render(output.status_document(view), fmt)
            if clear:
                click.clear()
            if watch and fmt == "table":
                click.echo(time.strftime("%Y-%m-%d %H:%M:%S"))
            click.echo(text)
            shown += 1
            if not watch or (count is not None and shown >= count):
                return
            if not clear:
                click.echo()
            time.sleep(interval)
    except KeyboardInterrupt:
        return  # Ctrl-C ends a watch; not an error


@cli.command(short_help="The HA events, oldest first, from the store.")
@click.option("-n", "--count", default=50, show_default=True, type=click.IntRange(1, 10000))
@_output_option()
@click.pass_context
def history(ctx: click.Context, count: int, fmt: str) -> None:
    """The HA events, oldest first, from the store."""
    try:
        events = _client(ctx).history(count)
    except Exception as exc:
        raise click.ClickException(f"history unavailable: {exc}") from exc
    if fmt != "table":
        click.echo(output.render([output.event_document(e) for e in events], fmt))
        return
    for e in events:
        click.echo(output.event_line(e))


@cli.command("show-config", short_help="The cluster-wide dynamic settings.")
@_output_option("yaml")
@click.pass_context
def show_config(ctx: click.Context, fmt: str) -> None:
    """The cluster-wide dynamic settings; those not set, with the value in effect."""
    client = _client(ctx)
    agent = _agent(client.view())
    code, data = client.get(agent.api_url, "/ha/config")
    if code != 200:
        raise _fail(code, data)
    if fmt == "yaml":
        click.echo(output.config_text(data["config"], data["effective"], data["node"]))
    else:
        click.echo(output.render(data, fmt))


# -- acting -------------------------------------------------------------------------------


@cli.command(short_help="Planned hand-over to a healthy standby; no request fails.")
@click.option("--to", "target", default=None, help="Node to promote (default: any healthy one).")
@click.option("--no-wait", is_flag=True, help="Return once requested, not once done.")
@click.pass_context
def switchover(ctx: click.Context, target: str | None, no_wait: bool) -> None:
    """Planned hand-over to a healthy standby; no request fails."""
    client = _client(ctx)
    _switchover(client, EventFollower(client), target, wait=not no_wait)


@cli.command(short_help="Force a node to become primary (the primary is gone).")
@click.option("--to", "target", required=True, help="Node to promote.")
@click.option("--force", is_flag=True, help="Required: this drops the current lease.")
@click.pass_context
def failover(ctx: click.Context, target: str, force: bool) -> None:
    """Force a node to become primary, for when the primary is gone."""
    if not force:
        raise click.UsageError("failover drops the current lease: add --force")
    client = _client(ctx)
    follower = EventFollower(client)
    agent = _agent(client.view())
    code, data = client.post(
        agent.api_url, "/ha/failover", {"to": target, "force": True}, timeout=60
    )
    follower.poll()
    if code not in (200, 202):
        raise _fail(code, data)
    click.echo(str(data.get("detail")))


@cli.command(short_help="Keep roles; suspend automatic failover (maintenance).")
@click.pass_context
def pause(ctx: click.Context) -> None:
    """Keep roles; suspend automatic failover (maintenance)."""
    _simple(ctx, "/ha/pause", "paused: automatic actions suspended, roles kept")


@cli.command(short_help="Resume automatic actions.")
@click.pass_context
def resume(ctx: click.Context) -> None:
    """Resume automatic actions."""
    _simple(ctx, "/ha/resume", "resumed: automatic actions on")


def _simple(ctx: click.Context, path: str, done: str) -> None:
    client = _client(ctx)
    code, data = client.post(_agent(client.view()).api_url, path, {})
    if code != 200:
        raise _fail(code, data)
    click.echo(done)


@cli.command(short_help="Restart a node's engine (a primary hands over first).")
@click.argument("node")
@click.option(
    "--timeout", default=900.0, show_default=True, help="How long the engine may take, s."
)
@click.pass_context
def restart(ctx: click.Context, node: str, timeout: float) -> None:
    """Restart NODE's engine and wait until it is healthy.

    A primary hands over by planned switchover first, so no request fails.
    """
    client = _client(ctx)
    _restart(client, EventFollower(client), node, timeout)


@cli.command("rolling-restart", short_help="Restart every engine, standbys first; none fails.")
@click.option(
    "--timeout", default=900.0, show_default=True, help="How long each engine may take, s."
)
@click.pass_context
def rolling_restart(ctx: click.Context, timeout: float) -> None:
    """Restart every node's engine one after the other: the standbys first, then
    the primary after a planned switchover. Each must be healthy before the next."""
    client = _client(ctx)
    view = client.view()
    sick = [n.name for n in view.nodes if n.status is None or not n.status.engine.healthy]
    if sick:
        raise click.ClickException(f"not healthy: {', '.join(sick)}; fix that before restarting")
    if view.primary is None:
        raise click.ClickException("there is no primary; a rolling restart needs one")
    order = [*sorted(n.name for n in view.nodes if n.name != view.primary), view.primary]
    click.echo(f"rolling restart of {', '.join(order)}")
    follower = EventFollower(client)
    started = time.monotonic()
    for i, node in enumerate(order, 1):
        click.echo(f"[{i}/{len(order)}] {node}")
        _restart(client, follower, node, timeout)
    click.echo(f"rolling restart done in {time.monotonic() - started:.0f}s")
    click.echo(output.status_table(client.view()))


@cli.command("edit-config", short_help="Change the cluster-wide dynamic settings.")
@click.option(
    "-s",
    "--set",
    "assignments",
    multiple=True,
    metavar="KEY=VALUE",
    help="Set a value without an editor (KEY= or KEY=null unsets); repeatable.",
)
@click.option(
    "--apply",
    "apply_file",
    type=click.File("r"),
    default=None,
    metavar="FILE",
    help="Merge the YAML mapping in FILE ('-': stdin; null unsets) without an editor.",
)
@click.option("-f", "--force", is_flag=True, help="Apply without asking.")
@click.pass_context
def edit_config(
    ctx: click.Context, assignments: tuple[str, ...], apply_file: Any, force: bool
) -> None:
    """Change the cluster-wide dynamic settings (lease timing, failback, warming).

    Opens $EDITOR unless --set or --apply is given. The change is checked against
    the settings' schema and the lease-timing rule before it is stored, then every
    agent and the relay apply it within a cycle, without a restart; history records
    the diff.
    """
    client = _client(ctx)
    view = client.view()
    agent = _agent(view)
    code, data = client.get(agent.api_url, "/ha/config")
    if code != 200:
        raise _fail(code, data)
    current: dict[str, Any] = data["config"]
    try:
        if assignments or apply_file is not None:
            changes_in: list[tuple[str, Any]] = []
            if apply_file is not None:
                changes_in += list(output.parse_mapping(apply_file.read()).items())
            changes_in += [output.parse_assignment(item) for item in assignments]
            new = dict(current)
            for key, value in changes_in:
                if value is None:
                    new.pop(key, None)
                else:
                    new[key] = value
        else:
            text = output.config_text(current, data["effective"], data["node"])
            edited = click.edit(text, extension=".yaml")
            if edited is None:
                click.echo("not saved: no change")
                return
            new = output.parse_config_text(edited)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    changes = [
        f"{k}: {current.get(k, '-')} -> {new.get(k, '-')}"
        for k in sorted(set(current) | set(new))
        if current.get(k) != new.get(k)
    ]
    if not changes:
        click.echo("no change")
        return
    for line in changes:
        click.echo(f"  {line}")
    if not force:
        click.confirm("Apply these changes?", abort=True)
    code, data = client.post(agent.api_url, "/ha/config", {"config": new, "previous": current})
    if code != 200:
        raise _fail(code, data)
    click.echo(f"stored: {data.get('detail')}")
    _wait_applied(client, view, data.get("config", {}))


def _wait_applied(client: ClusterClient, view: ClusterView, config: dict[str, Any]) -> None:
    """Show each agent taking the new values into effect (bounded: a few cycles)."""
    deadline = time.monotonic() + client.s.config_apply_wait
    pending = [n for n in view.nodes if n.status is not None]
    while pending:
        for row in list(pending):
            code, data = client.get(row.api_url, "/ha/config")
            effective = data.get("effective", {}) if code == 200 else {}
            if all(effective.get(k, v) == v for k, v in config.items()):
                click.echo(f"  {row.name}: in effect")
                pending.remove(row)
        if pending and time.monotonic() > deadline:
            names = ", ".join(n.name for n in pending)
            raise click.ClickException(f"not in effect on {names} yet: see their logs")
        if pending:
            time.sleep(0.3)


@cli.command(short_help="Decommission a stopped node: drop it from the registry.")
@click.argument("node")
@click.option("-f", "--force", is_flag=True, help="Do not ask.")
@click.pass_context
def remove(ctx: click.Context, node: str, force: bool) -> None:
    """Decommission NODE: it leaves the registry, and the relay and the agents forget
    it. Refused for the primary, and while its agent still runs (stop it first)."""
    client = _client(ctx)
    view = client.view()
    if not force:
        click.confirm(f"Remove {node} from the cluster?", abort=True)
    code, data = client.post(_agent(view).api_url, "/ha/remove", {"node": node})
    if code != 200:
        raise _fail(code, data)
    click.echo(str(data.get("detail")))


@cli.command(short_help="The pre-production checklist (on the Docker host).")
@click.option("--project", default="sglang-ha", show_default=True, help="Compose project name.")
@click.option(
    "--disruptive", is_flag=True, help="Also freeze the primary and stop Redis (restored)."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--ca",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("compose/secrets/tls_ca.crt"),
    show_default=True,
    help="CA the gateway's TLS certificate must verify against.",
)
def verify(project: str, disruptive: bool, as_json: bool, ca: Path) -> None:
    """The pre-production checklist against a running stack (on the Docker host)."""
    from ha_agent.ctl import verify as checklist

    results = checklist.run(project, disruptive, ca)
    click.echo(checklist.as_json(results) if as_json else checklist.render(results))
    if any(c.status == "fail" for c in results):
        raise SystemExit(1)


@cli.command(short_help="Shell completion script: eval it in your shell's rc file.")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the completion script for SHELL, e.g. in ~/.bashrc:

    \b
        eval "$(sglang-ha completion bash)"
    """
    cls = get_completion_class(shell)
    assert cls is not None  # click ships all three
    click.echo(cls(cli, {}, "sglang-ha", "_SGLANG_HA_COMPLETE").source())


def main() -> None:
    cli(prog_name="sglang-ha")


if __name__ == "__main__":
    main()
