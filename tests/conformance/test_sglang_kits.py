"""SGLang's own test kits, unchanged, direct and through the gateway.

SGLang 0.5.19's wheel ships HTTP test mixins in `sglang/test/kits/` (plain
`requests` and `openai` clients, no torch). They are loaded by file path from the
pinned wheel, installed with `pip install --no-deps` into a separate directory
(scripts/sglang-test-kits.sh, which `make conformance` runs; never the main venv),
mixed into a `unittest.TestCase` that points them at a target, and run unchanged.
Each kit test must end the same way through the gateway as direct; its verdict on
the simulator is in tests/conformance/sglang_kits.md.

The kits block (sync HTTP), so the simulators and the relay run on their own event
loop in a thread here.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import threading
import unittest
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import openai
import pytest
import requests
from aiohttp import web

from ha_agent.config import SimSettings
from ha_agent.gateway.stream.relay import Relay
from ha_agent.sim import create_app
from tests.conformance.test_conformance import CLIENT_KEY, SIM, client_key_file
from tests.support.fakes import relay_over

ROOT = Path(__file__).resolve().parents[2]
WHEEL = Path(os.environ.get("SGLANG_WHEEL_DIR", ROOT / ".cache" / "sglang-0.5.19"))
KITS_DIR = WHEEL / "sglang" / "test" / "kits"
TABLE_FILE = Path(__file__).with_name("sglang_kits.md")
KITS = {
    "basic_api_contract_kit": "BasicAPIContractMixin",
    "regex_constrained_kit": "RegexConstrainedMixin",
    "json_constrained_kit": "JSONConstrainedMixin",
    "json_mode_kit": "JSONModeMixin",
    "matched_stop_kit": "MatchedStopMixin",
    "ebnf_constrained_kit": "EBNFConstrainedMixin",
}
MODEL = SimSettings().model_name


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"sglang_kit_{name}", KITS_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kit_tests() -> list[tuple[str, str]]:
    if not KITS_DIR.is_dir():
        return []
    out = []
    for module, mixin in KITS.items():
        cls = getattr(_load(module), mixin)
        out += [(module, m) for m in sorted(dir(cls)) if m.startswith("test_")]
    return out


class Servers:
    """Two simulators and the relay in front of them, on a loop of their own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runners: list[web.AppRunner] = []
        self.relay: Relay | None = None

    async def _serve(self, app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    async def _start(self, keys: Path) -> tuple[str, str]:
        urls = [await self._serve(create_app(SimSettings(**SIM))) for _ in range(2)]
        # With client keys on: the kits' verdicts through the gateway hold with a key.
        self.relay = relay_over(urls, client_auth="on", client_keys_file=client_key_file(keys))
        return urls[0], await self._serve(self.relay.app())

    async def _stop(self) -> None:
        if self.relay is not None:
            await self.relay.transport.close()
        for runner in reversed(self.runners):
            await runner.cleanup()

    def start(self, keys: Path) -> tuple[str, str]:
        self.thread.start()
        return asyncio.run_coroutine_threadsafe(self._start(keys), self.loop).result(timeout=60)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    servers = Servers()
    direct, gateway = servers.start(tmp_path_factory.mktemp("keys"))
    try:
        yield {"direct": direct, "gateway": gateway}
    finally:
        servers.stop()


@contextlib.contextmanager
def presenting(key: str | None) -> Iterator[None]:
    """Every request the kit makes carries `key`, as a client of a server with
    --api-key would send it: `requests` calls and the OpenAI clients it makes itself
    (the kits are run unchanged, so the key is added under them)."""
    if key is None:
        yield
        return
    send = requests.Session.request
    make = openai.Client

    def request(self: requests.Session, method: str, url: str, **kw: Any) -> Any:
        kw["headers"] = {"Authorization": f"Bearer {key}", **(kw.get("headers") or {})}
        return send(self, method, url, **kw)

    def client(*args: Any, **kw: Any) -> openai.Client:
        return make(*args, **{**kw, "api_key": key})

    with (
        mock.patch.object(requests.Session, "request", request),
        mock.patch.object(openai, "Client", client),
        mock.patch.object(openai, "OpenAI", client),
    ):
        yield


def run_kit_test(
    module: str, method: str, base_url: str, key: str | None = None
) -> tuple[str, str]:
    """(pass | fail | error | skip, detail) of one kit test against base_url."""
    mixin = getattr(_load(module), KITS[module])
    attrs: dict[str, Any] = {
        "base_url": base_url,
        "model": MODEL,
        "served_model_name": MODEL,
        "client": openai.Client(base_url=base_url + "/v1", api_key=key or "none", max_retries=0),
    }
    host = type(f"{mixin.__name__}Host", (mixin, unittest.TestCase), attrs)
    result = unittest.TestResult()
    with presenting(key):
        host(method).run(result)
    if result.errors:
        return "error", result.errors[0][1][-300:]
    if result.failures:
        return "fail", result.failures[0][1][-300:]
    if result.skipped:
        return "skip", result.skipped[0][1]
    return "pass", ""


def read_table() -> dict[str, str]:
    rows = re.findall(r"^\| (\w+\.\w+) \| ([a-z-]+) \|", TABLE_FILE.read_text(), re.M)
    return dict(rows)


def test_the_wheel_kits_are_installed() -> None:
    """`make conformance` installs them (scripts/sglang-test-kits.sh); never skipped."""
    assert KITS_DIR.is_dir(), f"no SGLang test kits at {KITS_DIR}: run scripts/sglang-test-kits.sh"
    assert set(read_table()) == {f"{m}.{t}" for m, t in _kit_tests()}


@pytest.mark.parametrize(("module", "method"), _kit_tests())
def test_kit_same_verdict_through_the_gateway(
    urls: dict[str, str], module: str, method: str
) -> None:
    expected = read_table()[f"{module}.{method}"]
    direct, why_direct = run_kit_test(module, method, urls["direct"])
    gateway, why_gateway = run_kit_test(module, method, urls["gateway"], CLIENT_KEY)
    if expected == "intentionally-closed":
        assert direct == "pass", why_direct
        assert gateway == "fail" and "404" in why_gateway, why_gateway
        return
    if expected == "simulator-unsupported":
        assert "not supported by the simulator" in why_direct or direct != "pass", why_direct
    elif expected == "pass":
        assert direct == "pass", why_direct
    assert gateway == direct, (why_direct, why_gateway)
