"""The field policy for inference bodies (ha_agent/gateway/admission/policy.py), alone and in
the relay: what would make an engine read files, reach URLs or run code is refused
with a 400 before any engine sees it; a client's rid is replaced by ours."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ha_agent.gateway.admission.policy import (
    BODY_SECONDS_HEADER,
    CLIENT_RID_HEADER,
    RID_HEADER,
    FieldPolicy,
    RequestPolicy,
    apply,
    check_fields,
    engine_rid,
    media_allowed,
    rid_owner,
)
from ha_agent.gateway.upstream.transport import forward_headers
from ha_agent.openapi.inference import NO_CUSTOM_LOGIT_PROCESSOR, BadInput

DEFAULT = FieldPolicy()
PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG" + bytes(200)).decode()
RAW_B64 = base64.b64encode(bytes(range(256))).decode()


def _chat(url: Any) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hi"},
                    {"type": "image_url", "image_url": url},
                ],
            }
        ],
    }


@pytest.mark.parametrize(
    "text",
    [
        "file:///etc/passwd",
        "/etc/passwd",
        "../../etc/shadow",
        "~/secret.png",
        "http://169.254.169.254/latest/meta-data/",
        "https://example.com/cat.png",
        "gs://bucket/x.png",
        "etc/abcd",  # base64's alphabet, but a relative path: too short to be media
    ],
)
def test_media_that_names_a_file_or_url_is_refused(text: str) -> None:
    assert not media_allowed(text, ())
    for payload in (
        {"text": "x", "image_data": text},
        {"text": "x", "image_data": [[text]]},
        {"text": "x", "video_data": text},
        {"text": "x", "audio_data": [text]},
        _chat({"url": text}),
        _chat(text),
        {"messages": [{"role": "user", "content": [{"type": "audio_url", "audio_url": text}]}]},
    ):
        with pytest.raises(BadInput) as info:
            check_fields(payload, DEFAULT)
        assert info.value.status == 400
        assert text not in info.value.message  # the answer does not echo the path


def test_data_urls_and_inline_base64_pass() -> None:
    for text in (PNG, RAW_B64):
        check_fields({"text": "x", "image_data": [text, text]}, DEFAULT)
        check_fields(_chat({"url": text, "detail": "auto"}), DEFAULT)


def test_an_allow_list_opens_only_its_prefixes() -> None:
    policy = FieldPolicy(media_url_allow=("https://images.example.com/",))
    check_fields(_chat({"url": "https://images.example.com/cat.png"}), policy)
    with pytest.raises(BadInput):
        check_fields(_chat({"url": "https://images.example.com.evil/cat.png"}), policy)
    with pytest.raises(BadInput):
        check_fields(_chat({"url": "file:///etc/passwd"}), policy)


@pytest.mark.parametrize(
    "field,value",
    [
        ("lora_path", "/models/adapter"),
        ("bootstrap_host", "10.0.0.9"),
        ("bootstrap_port", 8998),
        ("bootstrap_room", 1),
    ],
)
def test_fields_that_steer_the_engine_are_refused(field: str, value: Any) -> None:
    with pytest.raises(BadInput) as info:
        check_fields({"text": "x", field: value}, DEFAULT)
    assert field in info.value.message
    check_fields({"text": "x", field: None}, DEFAULT)  # null is "not set"


def test_custom_logit_processor_is_refused_in_sglangs_own_words() -> None:
    """As a server without --enable-custom-logit-processor answers (tokenizer_manager.py):
    a client sees the same refusal through the gateway as straight at SGLang."""
    with pytest.raises(BadInput) as info:
        check_fields({"text": "x", "custom_logit_processor": '{"callable": "gASV..."}'}, DEFAULT)
    assert info.value.message == NO_CUSTOM_LOGIT_PROCESSOR
    check_fields({"text": "x", "custom_logit_processor": None}, DEFAULT)


def test_custom_logit_processor_when_the_operator_enables_it() -> None:
    check_fields(
        {"text": "x", "custom_logit_processor": "x"},
        FieldPolicy(allow_custom_logit_processor=True),
    )


def test_no_rid_leaves_the_body_byte_for_byte() -> None:
    body = b'{"text": "x",  "sampling_params": {"max_new_tokens": 1.0}}'
    applied = apply(json.loads(body), body, DEFAULT)
    assert applied.body is body and not applied.client_rids


def test_a_client_rid_is_replaced_by_ours() -> None:
    payload = {"text": "x", "rid": "mine"}
    applied = apply(payload, json.dumps(payload).encode(), DEFAULT, "key:a")
    sent = json.loads(applied.body)
    assert sent["rid"] != "mine" and sent["rid"].startswith("HA_")
    assert applied.client_rids == ["mine"] and applied.our_rids == [sent["rid"]]
    # Two clients choosing the same rid get different ones upstream; the same client
    # always the same one (its abort finds it in any relay worker).
    other = apply(payload, json.dumps(payload).encode(), DEFAULT, "key:b")
    assert json.loads(other.body)["rid"] != sent["rid"]
    assert sent["rid"] == engine_rid("key:a", "mine")
    batch = {"text": ["a", "b"], "rid": ["r1", "r2"]}
    applied = apply(batch, json.dumps(batch).encode(), DEFAULT, "key:a")
    assert len(set(json.loads(applied.body)["rid"])) == 2
    assert applied.client_rids == ["r1", "r2"]
    for bad in (3, ["a", 4], {"x": 1}):
        with pytest.raises(BadInput):
            apply({"text": "x", "rid": bad}, b"{}", DEFAULT)


async def test_in_an_app_the_rid_pair_is_in_the_headers() -> None:
    policy = RequestPolicy(DEFAULT)
    seen: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        payload = json.loads(await request.read())
        try:
            body, sent = policy.check(request, payload, b"").sent
        except BadInput as bad:
            return web.json_response({"message": bad.message}, status=bad.status)
        seen["owner"] = rid_owner(request)
        seen["sent"] = sent
        response = web.StreamResponse()
        await response.prepare(request)  # a stream: headers leave before the body
        await response.write(body)
        return response

    app = web.Application()
    policy.install(app)
    app.router.add_post("/generate", handler)
    async with TestClient(TestServer(app)) as client:
        headers = {"Authorization": "Bearer client-a"}
        resp = await client.post("/generate", json={"text": "x", "rid": "mine"}, headers=headers)
        assert resp.status == 200
        assert resp.headers[CLIENT_RID_HEADER] == "mine"
        assert resp.headers[RID_HEADER] == seen["sent"]["rid"]
        assert seen["sent"]["rid"] == engine_rid(seen["owner"], "mine")
        assert seen["owner"].startswith("key:") and "client-a" not in seen["owner"]
        await resp.read()
        # An odd rid is quoted, never a header injection.
        resp = await client.post("/generate", json={"text": "x", "rid": "a\r\nSet-Cookie: x"})
        assert resp.headers[CLIENT_RID_HEADER] == '"a\\r\\nSet-Cookie: x"'
        assert "Set-Cookie" not in resp.headers
        resp = await client.post("/generate", json={"text": "x", "lora_path": "/x"})
        assert resp.status == 400 and CLIENT_RID_HEADER not in resp.headers


def _body_reader_app(body_timeout: float) -> web.Application:
    """An app whose /generate reads the body through RequestPolicy.read_body and echoes
    it, or answers a refusal as JSON (its code and message)."""
    policy = RequestPolicy(FieldPolicy(body_timeout=body_timeout))

    async def handler(request: web.Request) -> web.Response:
        try:
            body = await policy.read_body(request)
        except BadInput as bad:
            return web.json_response({"code": bad.status, "message": str(bad)}, status=bad.status)
        return web.Response(body=body)

    app = web.Application()
    app.router.add_post("/generate", handler)
    return app


async def test_a_body_that_does_not_arrive_in_time_is_a_408() -> None:
    app = _body_reader_app(0.5)
    async with TestClient(TestServer(app)) as client:
        assert (await (await client.post("/generate", data=b"{}")).read()) == b"{}"
        port = client.server.port
        assert port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        loop = asyncio.get_running_loop()
        started = loop.time()
        status = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        assert status.split()[1] == b"408"
        assert loop.time() - started < 2


async def test_a_body_nginx_took_too_long_to_receive_is_a_408() -> None:
    """Nginx buffers the body and says how long it took (BODY_SECONDS_HEADER): over the
    total is the relay's 408; absent (a connection straight to the relay), no check."""
    app = _body_reader_app(10)
    async with TestClient(TestServer(app)) as client:
        for seconds, status in (
            (None, 200),
            ("0.004", 200),
            ("10.000", 200),  # the total itself is in time
            ("10.001", 408),
            ("3600", 408),
            # Not a number of seconds: no claim (our Nginx writes "%d.%03d").
            ("soon", 200),
            ("-1", 200),
            ("nan", 200),
        ):
            headers = {} if seconds is None else {BODY_SECONDS_HEADER: seconds}
            resp = await client.post("/generate", data=b"{}", headers=headers)
            assert resp.status == status, (seconds, await resp.text())
            if status == 408:
                assert "within 10 s" in (await resp.json())["message"]


async def test_a_client_claiming_its_body_was_quick_is_still_cut_at_the_total() -> None:
    """The header can only get a request refused: sent by a client straight to the
    relay with a small figure, the relay's own bound on reading the body still holds."""
    app = _body_reader_app(0.5)
    async with TestClient(TestServer(app)) as client:
        port = client.server.port
        assert port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
            + BODY_SECONDS_HEADER.encode()
            + b": 0.000\r\n\r\n{"
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        status = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        assert status.split()[1] == b"408"
        assert loop.time() - started < 2


def test_the_body_seconds_header_never_reaches_an_engine() -> None:
    forwarded = forward_headers({BODY_SECONDS_HEADER: "1.0", "X-Request-Id": "r"})
    assert BODY_SECONDS_HEADER not in forwarded and forwarded["X-Request-Id"] == "r"


_FROZEN_READER = """
import asyncio, sys, uvloop
from ha_agent.gateway.admission.policy import within_running_time

async def main():
    done = asyncio.get_running_loop().create_future()

    async def serve(reader, writer):
        print("reading", flush=True)
        done.set_result(await within_running_time(reader.readexactly(5), 0.5))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    print(repr(await asyncio.wait_for(done, 10)), flush=True)

uvloop.run(main())
"""


def _read_across_a_freeze(send: bool) -> str:
    """A relay-like reader on uvloop, frozen (SIGSTOP) for 1.5 s, three times the 0.5 s it
    allows, while the five bytes it waits for arrive (or not); then resumed."""
    child = subprocess.Popen(
        [sys.executable, "-c", _FROZEN_READER], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            assert child.stdout.readline().strip() == "reading"
            child.send_signal(signal.SIGSTOP)
            if send:
                conn.sendall(b"hello")
            time.sleep(1.5)  # the freeze's length, as SIGSTOP holds a real worker
            child.send_signal(signal.SIGCONT)
            out, _ = child.communicate(timeout=10)
        return out.strip()
    finally:
        child.kill()
        child.wait()


def test_a_freeze_of_the_relay_is_not_charged_to_the_client() -> None:
    # The bytes sat in the socket all along; on resuming, libuv fires the due timer
    # before it reads them (epoll_wait returns EINTR after SIGCONT).
    assert _read_across_a_freeze(send=True) == "b'hello'"


def test_a_client_that_sends_nothing_still_times_out_after_a_freeze() -> None:
    assert _read_across_a_freeze(send=False) == "None"


async def test_malformed_requests_log_one_line_without_their_content(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    RequestPolicy(DEFAULT).install(app)
    app.router.add_get("/", ok)
    async with TestClient(TestServer(app)) as client:
        port = client.server.port
        assert port is not None
        for _ in range(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer SECRET" + b"x" * 9000)
            writer.write(b"\r\n\r\n")
            assert b" 400 " in await asyncio.wait_for(reader.readline(), 5)
            writer.close()
    lines = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(lines) == 1, [r.getMessage() for r in lines]  # rate-limited
    assert "SECRET" not in caplog.text and lines[0].exc_info is None


def test_behind_our_nginx_a_client_is_its_address_not_the_engine_key() -> None:
    """Nginx puts the engines' key in Authorization for every request: it names no
    client, so two clients behind it stay apart by address."""
    from aiohttp.test_utils import make_mocked_request

    engine = "Bearer engine-key"

    def owner(headers: dict[str, str]) -> str:
        return rid_owner(make_mocked_request("POST", "/generate", headers=headers), engine)

    a = owner({"Authorization": engine, "X-Real-IP": "10.0.0.1"})
    b = owner({"Authorization": engine, "X-Real-IP": "10.0.0.2"})
    assert a == "addr:10.0.0.1" and b == "addr:10.0.0.2"
    assert engine_rid(a, "same") != engine_rid(b, "same")
    assert owner({"Authorization": "Bearer client", "X-Real-IP": "10.0.0.1"}).startswith("key:")


async def test_a_read_that_fails_as_its_wait_is_cancelled_leaves_no_unretrieved_error() -> None:
    """A client that resets its connection while the relay is reading its body: the
    handler is cancelled and the read fails at once. asyncio must not log "Task
    exception was never retrieved" for it (seen 689 times in one bench run)."""
    import gc

    from ha_agent.gateway.admission.policy import within_running_time

    loop = asyncio.get_running_loop()
    unretrieved: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))
    try:
        gate = asyncio.Event()

        async def read() -> bytes:
            await gate.wait()
            raise ConnectionResetError("client reset")

        waiter = asyncio.ensure_future(within_running_time(read(), 5.0))
        await asyncio.sleep(0)  # the wait is under way
        gate.set()  # the read fails...
        waiter.cancel()  # ...in the same turn as the client's handler is cancelled
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await asyncio.sleep(0)
        gc.collect()
        await asyncio.sleep(0)
        assert not unretrieved, unretrieved
    finally:
        loop.set_exception_handler(None)


def test_a_client_gone_before_the_head_gets_a_499_not_a_relay_bug() -> None:
    from ha_agent.gateway.stream.relay import _Unresumable

    assert _Unresumable().result().status == 499
