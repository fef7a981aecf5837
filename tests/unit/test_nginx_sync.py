"""Nginx's last-resort upstream list: addresses, stable while a name vanishes."""

from __future__ import annotations

import socket

import pytest

from ha_agent.gateway.edge.nginx_conf import render_template
from ha_agent.gateway.edge.nginx_sync import render
from ha_agent.gateway.upstream.topology import parse_seed


def test_nodes_are_written_by_address_and_kept_while_unresolvable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    addresses = {"node-1": "172.18.0.7", "node-2": "172.18.0.9"}

    def fake(host: str, port: int, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        if host not in addresses:
            raise socket.gaierror(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (addresses[host], port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    nodes = [
        parse_seed("sglang-01=http://node-1:30000=http://node-1:8008"),
        parse_seed("sglang-02=http://node-2:30000=http://node-2:8008"),
    ]
    known: dict[str, str] = {}
    first = render(nodes, known)
    assert "server 172.18.0.7:30000 backup" in first and "server 172.18.0.9:30000 backup" in first
    del addresses["node-1"]  # container killed: its name no longer resolves
    assert render(nodes, known) == first, "no change, so no Nginx reload"
    addresses["node-1"] = "172.18.0.12"  # back with a new address: now it changes
    assert "server 172.18.0.12:30000 backup" in render(nodes, known)
    never_seen = [parse_seed("sglang-03=http://node-3:30000=http://node-3:8008")]
    assert "# sglang-03: http://node-3:30000 does not resolve now" in render(never_seen, {})


def test_template_placeholders_and_nginx_variables() -> None:
    text = render_template("listen @GATEWAY_PORT@; set $x $host;", {"GATEWAY_PORT": "9000"})
    assert text == "listen 9000; set $x $host;"
    with pytest.raises(KeyError, match="unknown placeholder"):
        render_template("@NOPE@", {})
