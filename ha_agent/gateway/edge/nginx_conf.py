"""Render the gateway's Nginx configuration from the environment (at start-up).

`@NAME@` placeholders in the template are replaced by the environment value or
the default below; anything else in the template is left alone (Nginx's own
`$variables` included). Also writes the first last-resort upstream list from the
seed nodes, so Nginx can start before the relay has read the registry.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from ha_agent.config import ClientAuthSettings, EdgeTlsSettings, EngineAuthSettings
from ha_agent.gateway.admission.client_keys import read_keys
from ha_agent.gateway.edge.nginx_sync import (
    relay_worker_sockets,
    render,
    render_client_keys,
    render_relay_servers,
    write_private,
)
from ha_agent.gateway.edge.tls_reload import install
from ha_agent.gateway.edge.workers import nginx_worker_count
from ha_agent.gateway.upstream.topology import parse_seed

DEFAULTS = {
    "GATEWAY_PORT": "8000",
    "HA_RELAY_PORT": "8001",
    "GATEWAY_MAX_BODY": "16m",
    "GATEWAY_HEADER_TIMEOUT": "10s",
    "GATEWAY_BODY_TIMEOUT": "30s",
    "GATEWAY_READ_TIMEOUT": "3600s",
    "GATEWAY_RATE_PER_CLIENT": "200",
    "GATEWAY_BURST_PER_CLIENT": "400",
    "GATEWAY_CONN_PER_CLIENT": "512",
    # Computed by main() from HA_ENGINE_API_KEY[_FILE], never set directly.
    "ENGINE_AUTHORIZATION": "",
    # Computed by main() (HA_NGINX_WORKERS, else half the relay's workers); `auto` only
    # where the template is rendered without main() (the benchmark's baseline Nginx).
    "NGINX_WORKERS": "auto",
    # Computed from GATEWAY_TLS / GATEWAY_BIND (tls_placeholders), never set directly.
    "EDGE_LISTEN_TLS": "",
    "EDGE_TLS": "",
    "EDGE_TLS_HTTP": "",
}
TLS_TEMPLATE = "edge-tls.conf.template"
_PLACEHOLDER = re.compile(r"@([A-Z][A-Z0-9_]*)@")


def render_template(template: str, env: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in DEFAULTS:
            raise KeyError(f"unknown placeholder @{name}@ in the Nginx template")
        return env.get(name) or DEFAULTS[name]

    return _PLACEHOLDER.sub(value, template)


def tls_placeholders(settings: EdgeTlsSettings, tls_template: str) -> dict[str, str]:
    """The listen options and directives for TLS at the edge: TLS and, with
    GATEWAY_HTTP2, h2 (Nginx 1.22 takes it on `listen`), or nothing at all."""
    if not settings.tls_enabled:
        return {
            "EDGE_LISTEN_TLS": "",
            "EDGE_TLS": "        # TLS off (GATEWAY_TLS).",
            "EDGE_TLS_HTTP": "    # TLS off (GATEWAY_TLS).",
        }
    directives = tls_template.rstrip("\n")
    return {
        "EDGE_LISTEN_TLS": " ssl http2" if settings.http2 else " ssl",
        "EDGE_TLS": directives,
        # A variable, so that Nginx reads the pair at each handshake (tls_reload.py);
        # `map` is allowed in the http block only.
        "EDGE_TLS_HTTP": (
            f"    map $ssl_server_name $edge_tls_pair {{ default {settings.tls_pair_file}; }}"
        ),
    }


def relay_servers(env: dict[str, str] | os._Environ[str]) -> list[str]:
    """Where Nginx finds the relay: each worker's own Unix socket when they have one
    (HA_RELAY_WORKER_SOCKET_DIR), else the TCP port they share."""
    socket_dir = env.get("HA_RELAY_WORKER_SOCKET_DIR")
    if not socket_dir:
        return [f"127.0.0.1:{int(env.get('HA_RELAY_PORT') or DEFAULTS['HA_RELAY_PORT'])}"]
    return relay_worker_sockets(socket_dir, int(env.get("HA_RELAY_WORKERS") or 1))


def main() -> int:
    template_path = os.environ.get("NGINX_TEMPLATE", "/etc/sglang-ha/nginx/nginx.conf.template")
    out_path = os.environ.get("NGINX_CONF", "/run/sglang-ha/nginx.conf")
    backup_path = os.environ.get("HA_NGINX_BACKUP_FILE", "/run/sglang-ha/nginx-backup-servers.conf")
    env = dict(os.environ)
    env["ENGINE_AUTHORIZATION"] = EngineAuthSettings().engine_headers().get("Authorization", "")
    env["NGINX_WORKERS"] = str(nginx_worker_count())
    tls = EdgeTlsSettings()
    # The pair Nginx reads at each handshake, checked first: with TLS on and no usable
    # certificate the gateway does not start, and says why.
    if tls.tls_enabled and (problem := install(tls.tls_cert, tls.tls_key, tls.tls_pair_file)):
        print(
            f"TLS at the edge is on (GATEWAY_TLS={tls.tls}, GATEWAY_BIND={tls.bind or '*'}) but"
            f" {tls.tls_cert} and {tls.tls_key} cannot be served: {problem}. Run"
            " 'make secrets', put your own certificate there, or set GATEWAY_TLS=off.",
            file=sys.stderr,
        )
        return 2
    tls_template = Path(template_path).with_name(TLS_TEMPLATE).read_text()
    env.update(tls_placeholders(tls, tls_template))
    with open(template_path) as fh:
        text = render_template(fh.read(), env)
    # It may hold the engines' key: readable by the gateway's user only.
    with open(os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
        fh.write(text)
    relay_file = os.environ.get("HA_NGINX_RELAY_FILE", "/run/sglang-ha/nginx-relay-servers.conf")
    with open(relay_file, "w") as fh:
        fh.write(render_relay_servers(relay_servers(os.environ)))
    # Nginx's copy of the client keys, before it starts (the relay keeps it fresh).
    keys_path = os.environ.get("HA_NGINX_CLIENT_KEYS_FILE", "/run/sglang-ha/nginx-client-keys.conf")
    try:
        auth = ClientAuthSettings()
    except ValueError as exc:
        print(f"invalid configuration: {exc}", file=sys.stderr)
        return 2
    keys = read_keys(auth.client_keys_file) if auth.client_auth_on else None
    write_private(keys_path, render_client_keys(keys))
    seeds = [s.strip() for s in os.environ.get("HA_NODES", "").split(",") if s.strip()]
    with open(backup_path, "w") as fh:
        fh.write(render(parse_seed(s) for s in seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
