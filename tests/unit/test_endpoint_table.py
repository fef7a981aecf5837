"""The endpoint table drives request handling: a generation endpoint is one table row
plus one migration strategy, and every check (limits, prompt scan, warming,
quarantine, migration) reads the row's prompt, budget and constraint keys."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from ha_agent.gateway.admission.limits import Limits, LimitSettings, constraints, prompt_size
from ha_agent.gateway.admission.prompt_scan import PromptScanner
from ha_agent.gateway.admission.quarantine import fingerprint
from ha_agent.gateway.stream import migration
from ha_agent.gateway.stream.migration import Migration, Progress, Strategy, strategy
from ha_agent.gateway.upstream.warming import Warmer, prefill_only, prefix_key
from ha_agent.openapi import endpoints
from ha_agent.openapi.endpoints import (
    CHAT,
    COMPLETIONS,
    GENERATE,
    GRAMMAR_KEYS,
    ROUTES,
    Endpoint,
    ErrorShape,
    Semantics,
)

# A made-up code-infill API: the prompt in `prefix`, the budget `max_length` (32 when
# absent), `min_length`, and grammars at the top level.
INFILL = "infill"
ROW = Endpoint(
    "/v1/infill",
    INFILL,
    frozenset({"POST"}),
    Semantics.MIGRATE,
    ErrorShape.OPENAI,
    json_body=True,
    prompt_fields=("prefix",),
    budget_keys=("max_length",),
    default_budget=32,
    min_budget_key="min_length",
    constraint_keys=GRAMMAR_KEYS,
)


class _Infill(Strategy):
    """Its stream: completions-like chunks, continued from prefix + the text so far."""

    def piece(self, p: Progress, choice: dict[str, Any]) -> str:
        return str(choice.get("text") or "")

    def continuation(
        self, mig: Migration, body: dict[str, Any], left: int | None
    ) -> dict[str, Any]:
        if left is not None:
            body[self.route.budget_key(body)] = left
        body["prefix"] = str(body["prefix"]) + mig.progress.text
        return body

    def closing(self, mig: Migration) -> bytes:
        return b""


@pytest.fixture
def infill(monkeypatch: pytest.MonkeyPatch) -> Iterator[Endpoint]:
    """The row added to the table and its strategy registered, for this test only."""
    monkeypatch.setitem(endpoints.BY_PATH, ROW.path, ROW)
    monkeypatch.setitem(endpoints.GENERATIONS, ROW.kind, ROW)
    monkeypatch.setattr(migration, "STRATEGIES", dict(migration.STRATEGIES))
    strategy(INFILL)(_Infill)
    yield ROW


def test_limits_read_the_new_rows_prompt_and_grammars(infill: Endpoint) -> None:
    limits = Limits(LimitSettings(context_length=100, chars_per_token=10.0))
    assert prompt_size(INFILL, {"prefix": "abc", "suffix": "x" * 5000}) == (3, 0)
    assert limits.check(INFILL, {"prefix": "y" * 990, "suffix": "z" * 5000}) is None
    assert "longer than the model's context" in (limits.check(INFILL, {"prefix": "y" * 1001}) or "")
    nested = "(?:(?:a{1000}){1000})"
    assert constraints(INFILL, {"prefix": "q", "regex": nested}) == [("regex", nested)]
    assert "nests repeats" in (limits.check(INFILL, {"prefix": "q", "regex": nested}) or "")


def test_the_scanner_follows_the_new_rows_prompt(infill: Endpoint) -> None:
    long_prompt = json.dumps({"suffix": "s" * 300, "prefix": "p" * 300}).encode()
    scanner = PromptScanner(INFILL, 200)
    assert scanner.active
    assert scanner.feed(long_prompt[:200]) is False, "the suffix is no prompt"
    assert scanner.feed(long_prompt[200:]) is True
    short = PromptScanner(INFILL, 200)
    assert short.feed(json.dumps({"suffix": "s" * 300, "prefix": "p"}).encode()) is False


async def test_the_warmer_mirrors_the_new_row_prefill_only(infill: Endpoint) -> None:
    body = {"prefix": "def f(", "max_length": 50, "min_length": 5, "regex": "x+", "stream": True}
    mirror = prefill_only(INFILL, body)
    assert mirror is not None
    assert mirror["max_length"] == 1 and mirror["stream"] is False
    assert "regex" not in mirror and "min_length" not in mirror
    assert mirror["rid"].startswith("HA_WARM_")
    assert body["max_length"] == 50, "the user's request is untouched"
    assert prefill_only(INFILL, {"suffix": "no prompt"}) is None
    assert prefix_key(INFILL, {"prefix": "a" * 2000}) != prefix_key(INFILL, {"prefix": "b" * 2000})

    sent: list[tuple[str, dict[str, Any]]] = []

    class Recording(Warmer):
        def standby(self) -> Any:
            return SimpleNamespace(name="b")

        async def _send(self, node: Any, path: str, body: dict[str, Any]) -> None:
            sent.append((path, body))

    warmer = Recording(None, None, rate=100, registry=None)  # type: ignore[arg-type]
    warmer.offer(INFILL, body)
    await asyncio.sleep(0)
    assert [(path, b["max_length"]) for path, b in sent] == [("/v1/infill", 1)]


def test_the_fingerprint_covers_the_new_rows_prompt_and_constraints(infill: Endpoint) -> None:
    a = {"prefix": "crash me", "regex": "a+", "temperature": 0.1}
    b = {**a, "temperature": 0.9, "max_length": 7}
    assert fingerprint(INFILL, a) == fingerprint(INFILL, b), "sampling knobs do not count"
    assert fingerprint(INFILL, a) != fingerprint(INFILL, {**a, "prefix": "other"})
    assert fingerprint(INFILL, a) != fingerprint(INFILL, {**a, "regex": "b+"})


def infill_chunk(text: str, finish: str | None = None, tokens: int = 0) -> bytes:
    event = {
        "id": "inf-1",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "text": text, "finish_reason": finish}],
        "usage": {"prompt_tokens": 3, "completion_tokens": tokens},
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def test_a_broken_stream_of_the_new_row_migrates(infill: Endpoint) -> None:
    mig = Migration(INFILL, {"prefix": "def f(", "max_length": 10, "stream": True})
    assert mig.refusal() is None
    kept, _, abort = mig.screen(infill_chunk("x", tokens=1) + infill_chunk("y):", tokens=4))
    assert abort is None
    mig.absorb_first_segment(kept)
    nxt = mig.continuation()
    assert nxt is not None
    assert nxt["prefix"] == "def f(xy):" and nxt["max_length"] == 6
    assert Migration(INFILL, {"prefix": "p", "stream": True}).budget() == 32  # the default
    refused = Migration(INFILL, {"prefix": "p", "regex": "a+", "stream": True}).refusal()
    assert refused == "grammar-constrained output cannot be resumed on another engine"


def test_every_migrate_row_has_a_strategy(monkeypatch: pytest.MonkeyPatch) -> None:
    assert migration.unmigrated() == []
    migrate = {e.kind for e in ROUTES if e.semantics is Semantics.MIGRATE}
    assert migrate == set(migration.STRATEGIES) == {GENERATE, COMPLETIONS, CHAT}
    monkeypatch.setitem(endpoints.GENERATIONS, ROW.kind, ROW)
    assert migration.unmigrated() == [INFILL], "a row without its strategy is found"
    with pytest.raises(ValueError, match="no MIGRATE row"):
        strategy("embeddings")(_Infill)


@pytest.mark.parametrize(
    ("kind", "body", "budget"),
    [
        # SamplingParams.max_new_tokens = 128 (srt/sampling/sampling_params.py)
        (GENERATE, {"text": "t"}, 128),
        (GENERATE, {"text": "t", "sampling_params": {"max_new_tokens": None}}, None),
        (GENERATE, {"text": "t", "sampling_params": {"max_new_tokens": "7"}}, 7),
        # CompletionRequest.max_tokens = 16 (srt/entrypoints/openai/protocol.py)
        (COMPLETIONS, {"prompt": "p"}, 16),
        (COMPLETIONS, {"prompt": "p", "max_tokens": 5}, 5),
        # ChatCompletionRequest: `max_completion_tokens or max_tokens`, both None
        (CHAT, {"messages": []}, None),
        (CHAT, {"messages": [], "max_tokens": 9}, 9),
        (CHAT, {"messages": [], "max_completion_tokens": 4, "max_tokens": 9}, 4),
        (CHAT, {"messages": [], "max_completion_tokens": 0, "max_tokens": 9}, 9),
    ],
)
def test_budgets_are_read_as_sglang_reads_them(
    kind: str, body: dict[str, Any], budget: int | None
) -> None:
    route = endpoints.generation(kind)
    assert route is not None and route.budget(body) == budget


def test_constrained_names_what_binds_the_output() -> None:
    chat, gen = endpoints.BY_PATH["/v1/chat/completions"], endpoints.BY_PATH["/generate"]
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert chat.constrained({"tools": tools, "regex": "a"}) == "tools"
    assert chat.constrained({"tools": tools, "tool_choice": "none", "regex": "a"}) == "regex"
    assert chat.constrained({"response_format": {"type": "text"}}) is None
    assert chat.constrained({"response_format": {"type": "json_object"}}) == "response_format"
    assert gen.constrained({"sampling_params": {"structural_tag": "{}"}}) == "structural_tag"
    assert gen.constrained({"regex": "a"}) is None, "/generate reads its sampling_params"


def test_every_grammar_key_is_bounded_in_size() -> None:
    limits = Limits(LimitSettings(context_length=1000, constraint_max_bytes=100))
    for key in GRAMMAR_KEYS:
        body = {"text": "q", "sampling_params": {key: "a" * 101}}
        assert f"{key} is 101 bytes" in (limits.check(GENERATE, body) or ""), key
        assert limits.check(GENERATE, {"text": "q", "sampling_params": {key: "a" * 99}}) is None
