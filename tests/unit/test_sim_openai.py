"""The official ``openai`` client against the simulator, streaming and not."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
from aiohttp.test_utils import TestClient

pytestmark = pytest.mark.timeout(30)

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"enum": ["big", "old", "new"]}, "maxItems": 2},
    },
    "required": ["city", "population"],
    "additionalProperties": False,
}


@pytest.fixture
async def oai(sim_client: TestClient) -> openai.AsyncOpenAI:
    client = openai.AsyncOpenAI(
        base_url=str(sim_client.make_url("/v1")), api_key="sim", max_retries=0, timeout=10
    )
    yield client
    await client.close()


async def test_models_list(oai: openai.AsyncOpenAI) -> None:
    models = await oai.models.list()
    assert [m.id for m in models.data] == ["sglang-ha-simulator"]


async def test_completions_stream_and_non_stream(oai: openai.AsyncOpenAI) -> None:
    kwargs = {
        "model": "sglang-ha-simulator",
        "prompt": "The cluster",
        "max_tokens": 12,
        "seed": 42,
        "temperature": 0.8,
    }
    plain = await oai.completions.create(**kwargs)
    assert plain.choices[0].finish_reason in ("length", "stop")
    assert plain.usage.completion_tokens <= 12
    stream = await oai.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    texts, usage = [], None
    async for chunk in stream:
        if chunk.choices:
            texts.append(chunk.choices[0].text)
        else:
            usage = chunk.usage
    assert "".join(texts) == plain.choices[0].text
    assert usage is not None and usage.completion_tokens == plain.usage.completion_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_chat_stream_and_non_stream(oai: openai.AsyncOpenAI) -> None:
    kwargs = {
        "model": "sglang-ha-simulator",
        "seed": 7,
        "max_completion_tokens": 15,
        "messages": [
            {"role": "system", "content": "You are a simulator."},
            {"role": "user", "content": "Say something."},
        ],
    }
    plain = await oai.chat.completions.create(**kwargs)
    message = plain.choices[0].message
    assert message.role == "assistant" and message.content
    assert plain.choices[0].finish_reason in ("length", "stop")
    stream = await oai.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    parts, roles, finishes, usage = [], [], [], None
    async for chunk in stream:
        if not chunk.choices:
            usage = chunk.usage
            continue
        delta = chunk.choices[0].delta
        roles += [delta.role] if delta.role else []
        parts.append(delta.content or "")
        finishes += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
    assert roles == ["assistant"]
    assert "".join(parts) == message.content
    assert finishes == [plain.choices[0].finish_reason]
    assert usage is not None and usage.completion_tokens == plain.usage.completion_tokens


async def test_seed_is_the_sampling_seed(oai: openai.AsyncOpenAI) -> None:
    msgs = [{"role": "user", "content": "pick words"}]

    async def content(seed: int | None) -> str:
        out = await oai.chat.completions.create(model="m", messages=msgs, max_tokens=20, seed=seed)
        return out.choices[0].message.content or ""

    assert await content(1) == await content(1)
    assert await content(1) != await content(2)
    assert await content(None) == await content(0)  # default seed 0: always deterministic


async def test_response_format_json_schema_and_json_object(oai: openai.AsyncOpenAI) -> None:
    msgs = [{"role": "user", "content": "A city as JSON."}]
    out = await oai.chat.completions.create(
        model="m",
        messages=msgs,
        max_tokens=200,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": SCHEMA, "strict": True},
        },
    )
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
    stream = await oai.chat.completions.create(
        model="m",
        messages=msgs,
        max_tokens=200,
        stream=True,
        response_format={"type": "json_object"},
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert isinstance(json.loads(text), dict)
    # SGLang stops at max_tokens even mid-document.
    cut = await oai.chat.completions.create(
        model="m",
        messages=msgs,
        max_tokens=3,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}},
    )
    assert cut.choices[0].finish_reason == "length"


async def test_regex_extra_body(oai: openai.AsyncOpenAI) -> None:
    out = await oai.completions.create(
        model="m", prompt="Phone:", max_tokens=30, extra_body={"regex": r"\+1-\d{3}-\d{4}"}
    )
    assert re.fullmatch(r"\+1-\d{3}-\d{4}", out.choices[0].text)


async def test_errors_surface_as_openai_exceptions(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        await oai.chat.completions.create(
            model="m", n=2, max_tokens=3, messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.BadRequestError, match="max_tokens must be positive"):
        await oai.completions.create(model="m", prompt="x", max_tokens=0)
