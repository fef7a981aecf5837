"""A prompt too long for the context is refused while its body arrives
(gateway/admission/prompt_scan.py): the scanner counts what `limits.prompt_size` counts, never
more, at any chunking; the relay answers the usual 400 without keeping or parsing the
rest, and a big body that is not a long prompt (base64 media) goes through untouched."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ha_agent.gateway.admission.limits import Limits, LimitSettings, prompt_size
from ha_agent.gateway.admission.prompt_scan import MAX_DEPTH, MAX_EVENTS, PromptScanner
from ha_agent.gateway.stream.relay import Relay
from ha_agent.openapi.endpoints import CHAT, COMPLETIONS, GENERATE
from tests.support.fakes import relay_over

MB = 1024 * 1024
UNBOUNDED = float("inf")


def scan(kind: str, body: bytes, chunks: list[int], max_chars: float = UNBOUNDED) -> PromptScanner:
    """`body` fed in pieces cut at the offsets `chunks`."""
    scanner = PromptScanner(kind, max_chars)
    cuts = [0, *chunks, len(body)]
    for start, stop in itertools.pairwise(cuts):
        scanner.feed(body[start:stop])
    return scanner


def every_split(body: bytes) -> list[list[int]]:
    """Two pieces cut at every byte boundary, and one byte at a time."""
    return [[i] for i in range(len(body) + 1)] + [list(range(1, len(body)))]


# Bodies in every prompt shape, with escapes (\", \\, \n, \u) and non-ASCII text, next
# to strings that are no prompt (sampling params, images, a message's name).
SHAPES: list[tuple[str, dict[str, Any]]] = [
    (GENERATE, {"text": 'say "hi"\\ now', "sampling_params": {"regex": 'a"b\\', "stop": ["q"]}}),
    (GENERATE, {"input_ids": [1, 2, 3], "text": ["ab", 'c"d\\', "é☃"], "rid": "r\\"}),
    (GENERATE, {"text": "x", "image_data": base64.b64encode(b"\x00" * 300).decode()}),
    (
        CHAT,
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief\n", "name": 'n"\\'},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": 'what is "this"? \U0001f600'},
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
                        },
                        {"type": "text", "text": "ünïcode"},
                    ],
                },
            ],
            "tools": [{"type": "function", "function": {"name": "f", "description": "d" * 50}}],
        },
    ),
    (COMPLETIONS, {"model": "m", "prompt": ["one", 'two "2"'], "stop": "\\"}),
    (COMPLETIONS, {"prompt": "tab\there", "model": "m", "logit_bias": {"1": 2}}),
]


@pytest.mark.parametrize(("kind", "payload"), SHAPES)
@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_the_scanner_never_counts_more_than_prompt_size_at_any_split(
    kind: str, payload: dict[str, Any], ensure_ascii: bool
) -> None:
    body = json.dumps(payload, ensure_ascii=ensure_ascii).encode()
    chars, _ = prompt_size(kind, payload)
    counts = set()
    for chunks in every_split(body):
        scanner = scan(kind, body, chunks)
        assert scanner.active, chunks
        counts.add(scanner.chars_at_least)
    # The same count whatever the chunking, a lower bound of the real one.
    assert len(counts) == 1
    assert 0 <= counts.pop() <= chars


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        (GENERATE, {"text": "lorem ipsum dolor sit amet", "stream": True}),
        (GENERATE, {"text": ["lorem ipsum", "dolor sit amet"]}),
        (COMPLETIONS, {"model": "m", "prompt": "lorem ipsum dolor sit amet"}),
        (COMPLETIONS, {"model": "m", "prompt": ["lorem ipsum", "dolor sit amet"]}),
        (CHAT, {"model": "m", "messages": [{"role": "user", "content": "lorem ipsum"}]}),
        (
            CHAT,
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "lorem ipsum"}]},
                    {"role": "assistant", "content": "dolor sit amet"},
                ]
            },
        ),
    ],
)
def test_plain_text_is_counted_exactly(kind: str, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    chars, _ = prompt_size(kind, payload)
    for chunks in every_split(body):
        assert scan(kind, body, chunks).chars_at_least == chars


@pytest.mark.parametrize("size", [100, 101])
@pytest.mark.parametrize(
    ("kind", "shape"),
    [
        (GENERATE, lambda t: {"sampling_params": {"max_new_tokens": 1}, "text": t}),
        (COMPLETIONS, lambda t: {"model": "m", "prompt": [t[:50], t[50:]]}),
        (CHAT, lambda t: {"messages": [{"role": "u", "content": [{"type": "text", "text": t}]}]}),
    ],
)
def test_over_the_bound_only_past_it(kind: str, shape: Any, size: int) -> None:
    body = json.dumps(shape("y" * size)).encode()
    for chunks in every_split(body):
        assert scan(kind, body, chunks, max_chars=100).over is (size > 100)


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        # Media: base64 and data URIs are megabytes and no prompt.
        (
            CHAT,
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is it?"},
                            {"type": "image_url", "image_url": {"url": "data:;base64," + "A" * 99}},
                            {"type": "input_audio", "input_audio": {"data": "B" * 500}},
                        ],
                    }
                ]
            },
        ),
        (GENERATE, {"text": "q", "image_data": ["C" * 500], "audio_data": "D" * 500}),
        # Long strings elsewhere: another kind's prompt field, a nested "content", a
        # constraint (limits.py bounds those itself), an escaped key.
        (GENERATE, {"prompt": "w" * 500, "messages": [{"content": "w" * 500}]}),
        (CHAT, {"messages": [{"role": "user", "content": "q", "x": {"content": "w" * 500}}]}),
        (CHAT, {"messages": [{"role": "user", "content": "q"}], "regex": "w" * 500}),
        (COMPLETIONS, {"prompt": "q", "stop": ["w" * 500], "suffix": "w" * 500}),
        (GENERATE, {"t\\u0065xt": "w" * 500}),
        # Token ids are numbers: nothing to count here (limits.py counts them exactly).
        (GENERATE, {"input_ids": list(range(500)), "text": "q"}),
    ],
)
def test_strings_that_are_no_prompt_never_count(kind: str, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    for chunks in every_split(body)[::7]:
        scanner = scan(kind, body, chunks, max_chars=100)
        assert not scanner.over and scanner.chars_at_least <= 11


def test_a_string_that_ends_in_escaped_backslashes_ends_there() -> None:
    # `"\\\\"` is two backslashes, then the string ends: what follows is the prompt.
    body = b'{"rid": "a\\\\\\\\", "stop": "\\"", "text": "' + b"z" * 120 + b'"}'
    assert json.loads(body)["text"] == "z" * 120
    for chunks in every_split(body):
        scanner = scan(GENERATE, body, chunks, max_chars=100)
        assert scanner.over and 100 < scanner.chars_at_least <= 120


def test_it_gives_up_rather_than_follow_too_much() -> None:
    deep = b"[" * (MAX_DEPTH + 1)
    assert not scan(GENERATE, b'{"x": ' + deep, []).active
    tokens = b'{"x": [' + b"{}," * MAX_EVENTS + b'{}], "text": "' + b"z" * 200 + b'"}'
    scanner = scan(GENERATE, tokens, [], max_chars=100)
    assert not scanner.active and not scanner.over  # the full parse judges
    assert not scan(GENERATE, b"]" + b'"text": "' + b"z" * 200, [], max_chars=100).over
    assert not PromptScanner("embeddings", 100).active  # no prompt limit there


def test_escapes_and_multibyte_text_are_a_lower_bound() -> None:
    text = "line\n" * 40 + "☃" * 40 + "\U0001f600" * 40  # 280 characters
    for ensure_ascii in (True, False):
        body = json.dumps({"text": text}, ensure_ascii=ensure_ascii).encode()
        scanner = scan(GENERATE, body, [len(body) // 3])
        assert 0 <= scanner.chars_at_least <= len(text)


# -- in the relay ----------------------------------------------------------------------


def test_a_body_too_short_to_be_over_is_not_scanned() -> None:
    """The scanner counts at most a character per byte: a body of at most the allowed
    characters is left to the parsed check, one byte more is scanned, an unknown
    length (chunked) always is."""
    limits = Limits(LimitSettings(context_length=100, chars_per_token=10))
    assert limits.scanner(CHAT, 1000) is None
    assert limits.scanner(CHAT, 1001) is not None
    assert limits.scanner(CHAT) is not None
    # What the scanner would have refused is refused by the check of the parsed body.
    body = {"messages": [{"role": "user", "content": "x" * 1001}]}
    assert limits.check(CHAT, body) is not None


class Engine:
    """An engine that records the bodies it was sent."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.read())
        return web.json_response({"text": "ok", "meta_info": {}})


@pytest.fixture
async def relay() -> AsyncIterator[tuple[TestClient, Relay, Engine]]:
    engine = Engine()
    app = web.Application(client_max_size=32 * MB)
    app.router.add_route("POST", "/{tail:.*}", engine.handle)
    upstream = TestClient(TestServer(app))
    await upstream.start_server()
    relay = relay_over([f"http://127.0.0.1:{upstream.server.port}"], context_length=1000)
    client = TestClient(TestServer(relay.app()))
    await client.start_server()
    yield client, relay, engine
    await client.close()
    await relay.transport.close()
    await upstream.close()


async def read_answer(reader: asyncio.StreamReader) -> tuple[bytes, Any]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    return head.split(b"\r\n")[0], json.loads(await reader.readexactly(length))


async def test_a_long_prompt_is_refused_unparsed_and_the_connection_stays_usable(
    relay: tuple[TestClient, Relay, Engine],
) -> None:
    client, relay_, engine = relay
    assert client.server.port is not None
    body = json.dumps({"text": "lorem ipsum " * (15 * MB // 12)}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    head = f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    writer.write(head.encode() + body)
    await writer.drain()
    status, answer = await read_answer(reader)
    assert status.startswith(b"HTTP/1.1 400 ")
    message = answer["error"]["message"]
    assert "longer than the model's context length (1000 tokens)" in message
    # Counted while it arrived: the count stopped far short of the 15 MB it holds.
    counted = int(message.split("over ")[1].split(" characters")[0])
    assert 10_000 < counted < 4 * MB
    assert not engine.bodies
    refused = relay_.metrics.registry.get_sample_value(
        "sglang_ha_relay_refused_total", {"endpoint": GENERATE, "reason": "limits"}
    )
    assert refused == 1
    # The whole body was read: the same connection serves the client's next request.
    small = b'{"text": "hi"}'
    writer.write(
        f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: {len(small)}\r\n\r\n".encode()
        + small
    )
    status, answer = await read_answer(reader)
    writer.close()
    assert status.startswith(b"HTTP/1.1 200 ") and answer["text"] == "ok"
    assert engine.bodies == [small]


async def test_the_openai_shape_and_a_big_media_body_passes_untouched(
    relay: tuple[TestClient, Relay, Engine],
) -> None:
    client, _, engine = relay
    long = {"model": "m", "messages": [{"role": "user", "content": "lorem ipsum " * 2000}]}
    r = await client.post("/v1/chat/completions", json=long)
    got = await r.json()
    assert r.status == 400 and got["object"] == "error" and got["type"] == "BadRequestError"
    assert "context length (1000 tokens)" in got["message"]
    image = base64.b64encode(os.urandom(11 * MB)).decode()  # 15 MB of base64
    media = {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is it?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                ],
            }
        ],
    }
    body = json.dumps(media).encode()
    r = await client.post(
        "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    assert r.status == 200
    assert engine.bodies == [body]
