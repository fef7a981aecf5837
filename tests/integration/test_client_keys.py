"""Client keys through the running CPU stack (Nginx, the relay workers, simulators):
what a client meets with no key, a wrong one and a valid one; one client's abort
cannot reach another's request; a key rotated while a stream runs; and with every
relay worker stopped, Nginx's last-resort path to the engines still needs a key."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.processes import wait_until
from tests.support.stack import ROOT, Stack, running_stack

pytestmark = pytest.mark.integration

OVERLAY = Path(__file__).with_name("client_keys.compose.yaml")
ALICE = "alice-integration-key-0123456789"
BOB = "bob-integration-key-0123456789ab"
UNAUTHORIZED = {"error": "Unauthorized"}


def write_keys(path: Path, **keys: str) -> None:
    """In place, as `make secrets` does: the container's bind mount keeps seeing it."""
    with open(path, "w") as fh:
        fh.write("".join(f"{name}:{key}\n" for name, key in keys.items()))
    os.chmod(path, 0o644)  # the gateway's user reads it


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed() -> Iterator[tuple[Stack, Path]]:
    # In the checkout (git-ignored), where the stack's own secret files are: wherever
    # the Docker daemon can mount those, it can mount this one.
    (ROOT / ".cache").mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="client-keys-", dir=ROOT / ".cache"))
    keys = folder / "client_keys"
    write_keys(keys, alice=ALICE, bob=BOB)
    files = ("compose.yaml", "compose.test.yaml", str(OVERLAY))
    env = {"TEST_CLIENT_KEYS_FILE": str(keys)}
    try:
        with running_stack(files, prefix="sglang-ha-keys", env=env) as stack:
            yield stack, keys
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def generate(rid: str, tokens: int) -> dict[str, Any]:
    return {
        "text": "a long story",
        "rid": rid,
        "stream": True,
        "sampling_params": {"max_new_tokens": tokens, "ignore_eos": True},
    }


class Stream:
    """A /generate stream read in a thread: its events, and when the first came."""

    def __init__(self, base: str, key: str, body: dict[str, Any]) -> None:
        self.events: list[dict[str, Any]] = []
        self.status = 0
        self.done = False
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(base, key, body), daemon=True)
        self.thread.start()

    def _run(self, base: str, key: str, body: dict[str, Any]) -> None:
        with (
            httpx.Client(timeout=60) as http,
            http.stream("POST", base + "/generate", json=body, headers=auth(key)) as r,
        ):
            self.status = r.status_code
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    self.done = True
                elif line.startswith("data: {"):
                    self.events.append(json.loads(line[6:]))
                    self.started.set()
        self.started.set()

    def finish(self, timeout: float = 60) -> dict[str, Any]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream did not end"
        assert self.status == 200 and self.events, self.status
        return self.events[-1]["meta_info"]


def test_no_key_or_a_wrong_one_is_401_and_a_valid_key_streams(keyed: tuple[Stack, Path]) -> None:
    stack, _ = keyed
    base = stack.gateway_url
    chat = {
        "model": "default",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8,
        "stream": True,
    }
    engine_key = auth(stack.secrets["HA_ENGINE_API_KEY"])  # opens the engines, not the gateway
    for headers in ({}, auth("wrong-key-0123456789abcdefgh"), engine_key):
        r = httpx.post(base + "/v1/chat/completions", json=chat, headers=headers, timeout=30)
        assert r.status_code == 401, r.text
        assert r.json() == UNAUTHORIZED
    assert httpx.get(base + "/health", timeout=30).status_code == 200  # as SGLang: no key
    with httpx.stream(
        "POST", base + "/v1/chat/completions", json=chat, headers=auth(ALICE), timeout=30
    ) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) > 2
    # Nothing of a key in the access log.
    access = stack.access_log()
    assert ALICE not in access and "wrong-key" not in access


def test_one_client_cannot_abort_anothers_request(keyed: tuple[Stack, Path]) -> None:
    """Both from the same address (this host): only the key tells them apart."""
    stack, _ = keyed
    base = stack.gateway_url
    stream = Stream(base, ALICE, generate("shared-rid", 300))
    assert stream.started.wait(30)
    r = httpx.post(base + "/abort_request", json={"rid": "shared-rid"}, headers=auth(BOB))
    assert r.status_code == 200  # as SGLang for a rid it does not hold: nothing done
    meta = stream.finish()
    assert meta["finish_reason"]["type"] == "length" and meta["completion_tokens"] == 300
    own = Stream(base, ALICE, generate("own-rid", 2000))
    assert own.started.wait(30)
    r = httpx.post(base + "/abort_request", json={"rid": "own-rid"}, headers=auth(ALICE))
    assert r.status_code == 200
    meta = own.finish()
    assert meta["finish_reason"]["type"] == "abort" and meta["completion_tokens"] < 2000


def test_a_key_rotated_while_a_stream_runs(keyed: tuple[Stack, Path]) -> None:
    stack, keys = keyed
    base = stack.gateway_url
    new_alice = "alice-rotated-key-0123456789abc"
    stream = Stream(base, ALICE, generate("before-rotation", 400))
    assert stream.started.wait(30)
    write_keys(keys, alice=new_alice, bob=BOB)

    def rotated() -> bool:
        old = httpx.get(base + "/v1/models", headers=auth(ALICE), timeout=10).status_code
        new = httpx.get(base + "/v1/models", headers=auth(new_alice), timeout=10).status_code
        return old == 401 and new == 200

    wait_until(rotated, timeout=15, what="the new key in, the old one out")
    meta = stream.finish()
    assert stream.done and meta["finish_reason"]["type"] == "length"
    assert meta["completion_tokens"] == 400, "the stream admitted with the old key finished"
    assert httpx.get(base + "/v1/models", headers=auth(BOB), timeout=10).status_code == 200
    write_keys(keys, alice=ALICE, bob=BOB)
    wait_until(
        lambda: httpx.get(base + "/v1/models", headers=auth(ALICE), timeout=10).status_code == 200,
        timeout=15,
        what="the first key back",
    )


def test_with_the_relay_down_the_last_resort_path_needs_a_key_too(
    keyed: tuple[Stack, Path],
) -> None:
    stack, _ = keyed
    base = stack.gateway_url
    gateway = stack.container("gateway")
    ctl = ["supervisorctl", "-c", "/etc/sglang-ha/supervisord.conf"]
    code, out = gateway.exec_run([*ctl, "stop", "relay:*"])
    assert code == 0, out
    try:
        # Served straight from an engine now (no X-SGLang-HA-Node: no relay), only with a key.
        def via_engine() -> bool:
            r = httpx.get(base + "/v1/models", headers=auth(BOB), timeout=10)
            return r.status_code == 200 and "x-sglang-ha-node" not in r.headers

        wait_until(via_engine, timeout=20, what="Nginx's last resort serving")
        r = httpx.get(base + "/v1/models", timeout=10)
        assert r.status_code == 401 and r.json() == UNAUTHORIZED
        r = httpx.post(
            base + "/generate",
            json={"text": "x", "sampling_params": {"max_new_tokens": 2}},
            headers=auth("wrong-key-0123456789abcdefgh"),
            timeout=10,
        )
        assert r.status_code == 401
    finally:
        code, out = gateway.exec_run([*ctl, "start", "relay:*"])
        assert code == 0, out

        def via_relay() -> bool:
            r = httpx.get(base + "/v1/models", headers=auth(BOB), timeout=10)
            return r.status_code == 200 and "x-sglang-ha-node" in r.headers

        wait_until(via_relay, timeout=30, what="the relay back")
