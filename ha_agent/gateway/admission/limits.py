"""Limits before the engine: requests too heavy to be worth an engine's time.

A prompt far longer than the model's context is refused by SGLang only *after* it has
been tokenized, and SGLang tokenizes in its HTTP process, on its event loop
(`python/sglang/srt/managers/tokenizer_manager.py`: `_tokenize_one_request` runs
`_tokenize_texts`, then `_validate_one_request` compares the token count with
`context_len`). Megabytes of prompt hold that loop for seconds: /metrics, /health and
every other client wait, and the standby the warmer mirrors to waits too. So the
relay refuses them first, counted cheaply:

- token-id prompts by their length (exact);
- text by characters: a prompt of more than `context_length * chars_per_token`
  characters cannot fit (the estimate is generous on purpose: refusing a valid prompt
  is worse than tokenizing a slightly too long one, which the engine still refuses);
  counted while the body still arrives by `scanner` (prompt_scan.py), so a 15 MB
  prompt is never kept or parsed whole.

`context_length` is the relay's setting, or else what the primary reports as
`max_model_len` in `GET /v1/models` (SGLang's `model_config.context_len`; its
`/model_info` does not carry it), learnt by `learn_context_length`.

Structured output: SGLang compiles a regex / JSON schema / EBNF grammar in a thread
pool and gives up after `SGLANG_GRAMMAR_MAX_POLL_ITERATIONS` polls
(`python/sglang/srt/constrained/grammar_manager.py`), but has no bound on a
pattern's size: a nested repeat like `(?:a{1000}){1000}` expands to a million
states. The relay refuses a constraint over `constraint_max_bytes`, a JSON schema
nested deeper than `constraint_max_depth`, and a regex whose nested repeat counts
multiply past `regex_max_repeat`. Both refusals are 400s in the endpoint's own error
shape (`errors.refusal_at`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from ha_agent.gateway.admission.prompt_scan import PromptScanner
from ha_agent.gateway.upstream.topology import Topology
from ha_agent.gateway.upstream.transport import Transport
from ha_agent.openapi.endpoints import generation

try:  # Python >= 3.11
    import re._parser as sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse

import re

log = logging.getLogger(__name__)

# While the context is not known yet (the relay just started), a prompt this short goes
# on; a longer one waits for the primary's answer (milliseconds) before it is judged.
UNKNOWN_OK = 16384


@dataclass(frozen=True)
class LimitSettings:
    context_length: int = 0  # 0: learn it from the primary
    chars_per_token: float = 10.0
    constraint_max_bytes: int = 65536
    constraint_max_depth: int = 32
    regex_max_repeat: int = 100_000
    warm_max_chars: int = 65536


class Limits:
    def __init__(self, settings: LimitSettings) -> None:
        self.s = settings
        self.learnt_context: int | None = None

    @property
    def context_length(self) -> int | None:
        return self.s.context_length or self.learnt_context

    def must_learn_first(self, kind: str, payload: dict[str, Any]) -> bool:
        """Is the context unknown while this prompt may not fit any model's?"""
        return self.context_length is None and sum(prompt_size(kind, payload)) > UNKNOWN_OK

    def check(self, kind: str, payload: dict[str, Any]) -> str | None:
        """Why this generation request is refused, or None."""
        return self._prompt(kind, payload) or self._constraints(kind, payload)

    # -- prompt length ---------------------------------------------------------------

    def scanner(self, kind: str, length: int | None = None) -> PromptScanner | None:
        """A scanner that refuses this kind's prompt while the body arrives
        (prompt_scan.py); None while the context is unknown, for other kinds, and for
        a body of `length` bytes too short to be refused by it."""
        context = self.context_length
        if context is None:
            return None
        max_chars = context * self.s.chars_per_token
        if length is not None and length <= max_chars:
            # It counts at most one character per byte: such a body is never over, and
            # `check` on the parsed body judges it as it would have (most requests).
            return None
        scanner = PromptScanner(kind, max_chars)
        return scanner if scanner.active else None

    def too_long(self, scanner: PromptScanner) -> str:
        """Why a prompt the scanner found too long is refused (as `_prompt` says it)."""
        return self._too_many_chars(f"over {scanner.chars_at_least}", scanner.chars_at_least)

    def _too_many_chars(self, said: str, chars: int) -> str:
        return (
            f"The input ({said} characters, at least {int(chars / self.s.chars_per_token)}"
            f" tokens) is longer than the model's context length ({self.context_length} tokens)."
        )

    def _prompt(self, kind: str, payload: dict[str, Any]) -> str | None:
        context = self.context_length
        if context is None:
            return None  # not known yet: the engine checks (after tokenizing)
        chars, ids = prompt_size(kind, payload)
        if ids >= context:
            return (
                f"The input ({ids} tokens) is longer than the model's context length"
                f" ({context} tokens)."
            )
        budget = (context - ids) * self.s.chars_per_token
        if chars > budget:
            return self._too_many_chars(str(chars), chars)
        return None

    # -- structured output -----------------------------------------------------------

    def _constraints(self, kind: str, payload: dict[str, Any]) -> str | None:
        for name, value in constraints(kind, payload):
            spec = value if isinstance(value, str) else json.dumps(value)
            if len(spec) > self.s.constraint_max_bytes:
                return f"{name} is {len(spec)} bytes; the limit is {self.s.constraint_max_bytes}"
            if name == "regex" and isinstance(value, str):
                why = self._regex(value)
            elif name == "json_schema":
                why = self._schema(value)
            else:
                why = None
            if why:
                return why
        return None

    def _regex(self, pattern: str) -> str | None:
        try:
            parsed = sre_parse.parse(pattern)
        except (re.error, RecursionError, OverflowError):
            return None  # not a regex at all: the engine's own error says so
        product = _repeat_product(parsed, 1, self.s.regex_max_repeat)
        if product > self.s.regex_max_repeat:
            return (
                f"regex nests repeats to more than {self.s.regex_max_repeat} expansions;"
                " simplify the pattern"
            )
        return None

    def _schema(self, value: Any) -> str | None:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):
                return None  # the engine answers an invalid schema itself
        limit = self.s.constraint_max_depth
        if _depth(value, limit) > limit:
            return f"json_schema is nested deeper than {limit} levels"
        return None


def _strings(value: Any, budget: int = 100_000) -> Iterator[Any]:
    """Every leaf of a prompt value, breadth bounded (a prompt is shallow)."""
    stack = [value]
    while stack and budget > 0:
        budget -= 1
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            if item and all(type(x) is int for x in item[:8]):
                yield item  # token ids
            else:
                stack.extend(item)
        else:
            yield item


def prompt_size(kind: str, payload: dict[str, Any]) -> tuple[int, int]:
    """(characters of text, token ids) in the request's prompt (the endpoint table's
    `prompt_text`); cheap, no tokenizer."""
    route = generation(kind)
    if route is None:
        return 0, 0
    chars = ids = 0
    for field in route.prompt_text(payload):
        for leaf in _strings(field):
            if isinstance(leaf, str):
                chars += len(leaf)
            elif isinstance(leaf, list):
                ids = max(ids, len(leaf))  # a batch: its longest prompt
    return chars, ids


def constraints(kind: str, payload: dict[str, Any]) -> list[tuple[str, Any]]:
    """(name, value) of every structured-output constraint in the request (the
    endpoint table's `grammars`)."""
    route = generation(kind)
    return [] if route is None else route.grammars(payload)


def _repeat_product(parsed: Any, outer: int, cap: int) -> int:
    """The largest product of repeat counts along any nesting path (stops past cap)."""
    worst = outer
    for op, av in parsed:
        if worst > cap:
            break
        if op in (sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT) or op is getattr(
            sre_parse, "POSSESSIVE_REPEAT", None
        ):
            lo, hi, sub = av
            count = lo if hi is sre_parse.MAXREPEAT else hi
            worst = max(worst, _repeat_product(sub, outer * max(count, 1), cap))
        elif op is sre_parse.SUBPATTERN:
            worst = max(worst, _repeat_product(av[3], outer, cap))
        elif op is sre_parse.BRANCH:
            for branch in av[1]:
                worst = max(worst, _repeat_product(branch, outer, cap))
        elif op is getattr(sre_parse, "ATOMIC_GROUP", None):
            worst = max(worst, _repeat_product(av, outer, cap))
    return worst


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value, without recursion, stopping past limit."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, (dict, list)):
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            break
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children)
    return deepest


async def ask_context_length(
    limits: Limits, topology: Topology, transport: Transport, timeout: float = 5.0
) -> int | None:
    """Ask the primary (`GET /v1/models`) and keep its answer in `limits.learnt_context`."""
    node = topology.nodes.get(topology.primary or "")
    if node is None:
        return None
    try:
        async with transport.session.get(
            node.engine_url + "/v1/models", timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            data = await resp.json()
        lengths = [m.get("max_model_len") for m in data.get("data", []) if isinstance(m, dict)]
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError):
        return None
    known = [n for n in lengths if isinstance(n, int) and n > 0]
    if known and max(known) != limits.learnt_context:
        limits.learnt_context = max(known)
        log.info("context length %d (from %s)", max(known), node.name)
    return limits.learnt_context


async def learn_context_length(
    limits: Limits, topology: Topology, transport: Transport, stop: asyncio.Event
) -> None:
    """Keep `limits.learnt_context` as the primary reports it, every minute."""
    while not stop.is_set():
        await ask_context_length(limits, topology, transport)
        delay = 60.0 if limits.learnt_context else 2.0
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
