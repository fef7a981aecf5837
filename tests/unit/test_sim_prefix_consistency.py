"""Prefix consistency over HTTP: continuing from prompt + the first k generated tokens
yields exactly the remaining tokens and the same finish, on every endpoint the relay uses.

(a) /generate with input_ids + output_ids[:k]; (b) /generate with text + text so far;
(c) /v1/completions with prompt + text so far; (d) chat with an assistant prefill and
``continue_final_message``. Each runs for a request that ends by EOS and one by length.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from ha_agent.sim.tokenizer import EOS_ID, get_tokenizer
from tests.unit.conftest import SimClientFactory, sim_json_events, sim_read_sse, sim_word_prefix

N = 40  # max new tokens of the original request
EOS_RATE = 0.06  # makes an EOS within N tokens common, so both endings are easy to find

pytestmark = pytest.mark.timeout(30)


def ks(n_out: int) -> list[int]:
    return sorted({0, 1, 2, n_out // 2, n_out - 1} - {-1})


async def generate(client: TestClient, **body: Any) -> dict[str, Any]:
    resp = await client.post("/generate", json=body)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def find_seed(client: TestClient, prompt: str, want: str) -> tuple[int, dict[str, Any]]:
    """A seed whose original request ends the way we want ('stop' = EOS, or 'length')."""
    for seed in range(60):
        out = await generate(
            client,
            text=prompt,
            sampling_params={"max_new_tokens": N, "sampling_seed": seed, "temperature": 0.7},
        )
        if out["meta_info"]["finish_reason"]["type"] == want and len(out["output_ids"]) > 3:
            return seed, out
    raise AssertionError(f"no seed ends with {want}")


def assert_same_finish(orig: dict[str, Any], cont: dict[str, Any], k: int) -> None:
    assert cont["type"] == orig["type"]
    if orig["type"] == "length":
        assert k + cont["length"] == orig["length"]  # same absolute position
    else:
        assert cont["matched"] == orig["matched"] == EOS_ID


@pytest.fixture
async def client(sim_client_factory: SimClientFactory) -> TestClient:
    return await sim_client_factory(eos_rate=EOS_RATE)


@pytest.mark.parametrize("ending", ["stop", "length"])
async def test_a_generate_input_ids(client: TestClient, ending: str) -> None:
    prompt = "The history of high availability"
    seed, _ = await find_seed(client, prompt, ending)
    ids = get_tokenizer().encode(prompt)
    params = {"max_new_tokens": N, "sampling_seed": seed, "temperature": 0.7}
    orig = await generate(client, input_ids=ids, sampling_params=params)
    out_ids, fin = orig["output_ids"], orig["meta_info"]["finish_reason"]
    assert fin["type"] == ending
    for k in ks(len(out_ids)):
        cont = await generate(
            client, input_ids=ids + out_ids[:k], sampling_params={**params, "max_new_tokens": N - k}
        )
        assert cont["output_ids"] == out_ids[k:], k
        assert_same_finish(fin, cont["meta_info"]["finish_reason"], k)


@pytest.mark.parametrize("ending", ["stop", "length"])
async def test_b_generate_text_from_stream(client: TestClient, ending: str) -> None:
    prompt = "Explain leader leases"
    seed, _ = await find_seed(client, prompt, ending)
    params = {"max_new_tokens": N, "sampling_seed": seed, "temperature": 0.7}
    resp = await client.post(
        "/generate", json={"text": prompt, "sampling_params": params, "stream": True}
    )
    events = sim_json_events(await sim_read_sse(resp))
    final = events[-1]
    # What a relay holds after k tokens: the cumulative text of the k-th event.
    text_at = {0: "", **{len(e["output_ids"]): e["text"] for e in events}}
    for k in (k for k in ks(len(final["output_ids"])) if k in text_at):
        so_far = text_at[k]
        cont = await generate(
            client, text=prompt + so_far, sampling_params={**params, "max_new_tokens": N - k}
        )
        assert so_far + cont["text"] == final["text"], k
        assert cont["output_ids"] == final["output_ids"][k:]
        assert_same_finish(
            final["meta_info"]["finish_reason"], cont["meta_info"]["finish_reason"], k
        )


@pytest.mark.parametrize("ending", ["stop", "length"])
async def test_c_completions_prompt_plus_text(client: TestClient, ending: str) -> None:
    prompt = "Write about failover"
    seed, native = await find_seed(client, prompt, ending)
    body = {"prompt": prompt, "max_tokens": N, "seed": seed, "temperature": 0.7}
    orig = await (await client.post("/v1/completions", json=body)).json()
    text, fin = orig["choices"][0]["text"], orig["choices"][0]["finish_reason"]
    assert text == native["text"]  # same state on both endpoints
    n_out = orig["usage"]["completion_tokens"]
    for k in ks(n_out):
        so_far = sim_word_prefix(text, k)
        cont = await (
            await client.post(
                "/v1/completions", json={**body, "prompt": prompt + so_far, "max_tokens": N - k}
            )
        ).json()
        assert so_far + cont["choices"][0]["text"] == text, k
        assert cont["choices"][0]["finish_reason"] == fin
        assert k + cont["usage"]["completion_tokens"] == n_out


@pytest.mark.parametrize("ending", ["stop", "length"])
async def test_d_chat_continue_final_message(client: TestClient, ending: str) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why do we need fencing tokens?"},
    ]
    body: dict[str, Any] = {"messages": messages, "max_tokens": N, "temperature": 0.7}
    for seed in range(60):
        orig = await (await client.post("/v1/chat/completions", json={**body, "seed": seed})).json()
        if orig["choices"][0]["finish_reason"] == ending and orig["usage"]["completion_tokens"] > 3:
            break
    else:
        raise AssertionError(f"no seed ends with {ending}")
    text = orig["choices"][0]["message"]["content"]
    n_out = orig["usage"]["completion_tokens"]
    for k in ks(n_out):
        so_far = sim_word_prefix(text, k)
        cont = await (
            await client.post(
                "/v1/chat/completions",
                json={
                    **body,
                    "seed": seed,
                    "max_tokens": N - k,
                    "continue_final_message": True,
                    "messages": [*messages, {"role": "assistant", "content": so_far}],
                },
            )
        ).json()
        assert so_far + cont["choices"][0]["message"]["content"] == text, k
        assert cont["choices"][0]["finish_reason"] == ending
        assert k + cont["usage"]["completion_tokens"] == n_out


async def test_without_continue_final_message_the_assistant_turn_is_not_a_prefill(
    client: TestClient,
) -> None:
    messages = [{"role": "user", "content": "hello"}]
    orig = await (
        await client.post(
            "/v1/chat/completions",
            json={"messages": messages, "max_tokens": 10, "ignore_eos": True},
        )
    ).json()
    text = orig["choices"][0]["message"]["content"]
    cont = await (
        await client.post(
            "/v1/chat/completions",
            json={
                "messages": [*messages, {"role": "assistant", "content": sim_word_prefix(text, 3)}],
                "max_tokens": 7,
                "ignore_eos": True,
            },
        )
    ).json()
    assert sim_word_prefix(text, 3) + cont["choices"][0]["message"]["content"] != text
