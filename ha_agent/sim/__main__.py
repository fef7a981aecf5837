"""``sglang-ha-sim`` / ``python -m ha_agent.sim``: serve the SGLang API simulator.

Settings come from ``SimSettings`` (defaults, then ``SIM_*`` environment variables), then
``--host/--port/--model-name``. ``--validate-config`` prints the effective settings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import cast

from aiohttp import web

from ha_agent.config import SimSettings
from ha_agent.sim.server import SIM_KEY, create_app
from ha_agent.tls import refresh_loop, server_context

log = logging.getLogger("ha_agent.sim")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="sglang-ha-sim",
        description="SGLang-compatible engine simulator (CPU demo and tests; not SGLang).",
    )
    p.add_argument("--host", help="bind address (SIM_HOST)")
    p.add_argument("--port", type=int, help="port (SIM_PORT)")
    p.add_argument("--model-name", help="served model name (SIM_MODEL_NAME)")
    # SGLang's flags; prefer SIM_API_KEY(_FILE) / SIM_ADMIN_API_KEY(_FILE): argv is public.
    p.add_argument("--api-key", help="as SGLang's --api-key (SIM_API_KEY, SIM_API_KEY_FILE)")
    p.add_argument(
        "--admin-api-key",
        help="as SGLang's --admin-api-key (SIM_ADMIN_API_KEY, SIM_ADMIN_API_KEY_FILE)",
    )
    p.add_argument(
        "--reasoning-parser",
        choices=["qwen3", "deepseek-r1"],
        help="as SGLang's --reasoning-parser (SIM_REASONING_PARSER)",
    )
    p.add_argument(
        "--tool-call-parser",
        choices=["qwen25", "qwen"],
        help="as SGLang's --tool-call-parser (SIM_TOOL_CALL_PARSER)",
    )
    p.add_argument("--ssl-keyfile", help="as SGLang's --ssl-keyfile (SIM_SSL_KEYFILE)")
    p.add_argument("--ssl-certfile", help="as SGLang's --ssl-certfile (SIM_SSL_CERTFILE)")
    p.add_argument("--ssl-ca-certs", help="as SGLang's --ssl-ca-certs (SIM_SSL_CA_CERTS)")
    p.add_argument(
        "--ssl-keyfile-password",
        help="as SGLang's --ssl-keyfile-password (SIM_SSL_KEYFILE_PASSWORD)",
    )
    p.add_argument(
        "--enable-ssl-refresh",
        action="store_true",
        default=None,
        help="as SGLang's --enable-ssl-refresh (SIM_ENABLE_SSL_REFRESH)",
    )
    p.add_argument("--validate-config", action="store_true", help="print settings and exit")
    return p.parse_args(argv)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class KeepAlive:
    """uvicorn's idle-connection rule, as SGLang serves (protocols/http/httptools_impl.py
    and h11_impl.py, `on_response_complete`, `data_received`): no timer on a connection
    before its first request; after each response, closed if no request comes within
    the timeout. aiohttp arms its own timer at connect as well (web_protocol.py
    `connection_made`), so the process runs with aiohttp's timer out of reach and this
    middleware instead."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        # By connection (aiohttp's protocols take no weak references); an entry lasts
        # while a request runs or a timer is armed, and a timer removes its own.
        self._timers: dict[object, asyncio.TimerHandle] = {}
        self._active: dict[object, int] = {}

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        conn = request.protocol
        timer = self._timers.pop(conn, None)
        if timer is not None:
            timer.cancel()
        self._active[conn] = self._active.get(conn, 0) + 1
        try:
            return await handler(request)
        finally:
            left = self._active.pop(conn) - 1
            transport = request.transport
            if left:
                self._active[conn] = left
            elif transport is not None and not transport.is_closing():
                self._arm(conn, transport)

    def _arm(self, conn: object, transport: asyncio.BaseTransport) -> None:
        loop = asyncio.get_running_loop()
        self._timers[conn] = loop.call_later(self.timeout, self._expire, conn, transport)

    def _expire(self, conn: object, transport: asyncio.BaseTransport) -> None:
        self._timers.pop(conn, None)
        if self._active.get(conn) or transport.is_closing():
            return
        # The middleware returns before aiohttp writes a plain response: wait for it.
        if cast(asyncio.WriteTransport, transport).get_write_buffer_size():
            self._arm(conn, transport)
            return
        transport.close()


# aiohttp's own keep-alive timer, armed at connect: beyond any run (KeepAlive rules).
_AIOHTTP_KEEPALIVE = 10.0**9


async def _drain_on_sigterm(app: web.Application) -> None:
    """SGLang's SIGTERM: keep serving and drain (ha_agent/sim/lifecycle.py), not
    aiohttp's stop-at-once. Startup hooks run after aiohttp installed its own."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, app[SIM_KEY].termination.sigterm_handler)


def serving_ssl(app: web.Application, settings: SimSettings) -> ssl.SSLContext | None:
    """The server context SGLang's uvicorn makes from the same flags (ha_agent/tls.py),
    reloaded in place with --enable-ssl-refresh while `app` runs; None: plain HTTP, as
    SGLang without --ssl-certfile."""
    if not (settings.ssl_certfile and settings.ssl_keyfile):
        return None
    password = settings.ssl_keyfile_password
    ctx = server_context(
        settings.ssl_certfile,
        settings.ssl_keyfile,
        settings.ssl_ca_certs,
        password.get_secret_value() if password else None,
    )
    if settings.enable_ssl_refresh:
        app.cleanup_ctx.append(_ssl_refresh(ctx, settings))
    return ctx


def _ssl_refresh(
    ctx: ssl.SSLContext, settings: SimSettings
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def refresher(app: web.Application) -> AsyncIterator[None]:
        assert settings.ssl_certfile and settings.ssl_keyfile
        stop = asyncio.Event()
        task = asyncio.create_task(
            refresh_loop(
                ctx, settings.ssl_certfile, settings.ssl_keyfile, settings.ssl_ca_certs, stop
            )
        )
        log.info("SSL certificate auto-refresh enabled.")
        yield
        stop.set()
        await task

    return refresher


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    overrides = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "model_name": args.model_name,
            "api_key": args.api_key,
            "admin_api_key": args.admin_api_key,
            "reasoning_parser": args.reasoning_parser,
            "tool_call_parser": args.tool_call_parser,
            "ssl_keyfile": args.ssl_keyfile,
            "ssl_certfile": args.ssl_certfile,
            "ssl_ca_certs": args.ssl_ca_certs,
            "ssl_keyfile_password": args.ssl_keyfile_password,
            "enable_ssl_refresh": args.enable_ssl_refresh,
        }.items()
        if v is not None
    }
    try:
        settings = SimSettings(**overrides)
    except ValueError as exc:
        print(f"sglang-ha-sim: invalid settings: {exc}", file=sys.stderr)
        return 2
    if args.validate_config:
        print(json.dumps(settings.model_dump(mode="json"), indent=2))
        return 0
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        app = create_app(settings)
    except ValueError as exc:
        print(f"sglang-ha-sim: {exc}", file=sys.stderr)
        return 2
    log.info(
        "sglang-ha-sim%s: SGLang API simulator (not SGLang) serving model %r on %s:%d",
        f" [{settings.instance_name}]" if settings.instance_name else "",
        settings.model_name,
        settings.host,
        settings.port,
    )
    try:
        ssl_context = serving_ssl(app, settings)
    except (OSError, ssl.SSLError) as exc:
        print(f"sglang-ha-sim: cannot load the TLS certificate: {exc}", file=sys.stderr)
        return 2
    if ssl_context is not None:
        log.info(
            "SSL enabled: certfile=%s, keyfile=%s", settings.ssl_certfile, settings.ssl_keyfile
        )
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    app.on_startup.append(_drain_on_sigterm)
    app.middlewares.append(KeepAlive(settings.keep_alive_timeout).middleware)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        ssl_context=ssl_context,
        loop=loop,
        access_log=None,
        print=None,
        shutdown_timeout=settings.drain_timeout + 5.0,
        keepalive_timeout=_AIOHTTP_KEEPALIVE,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
