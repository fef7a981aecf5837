"""Deterministic, prefix-consistent token generation and the stop logic.

The next token is a function of a keyed BLAKE2b state over the *context characters*:
the sampling parameters first, then the prompt text, then the text of every generated
token. Feeding "prompt + first k generated tokens" as a new prompt therefore reaches the
same state as having generated those k tokens, and the remaining tokens (and where EOS
falls) come out identical. Python's ``hash()`` is never used: it is salted per process.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ha_agent.sim.chat_template import ASSISTANT
from ha_agent.sim.reasoning import ThinkMode
from ha_agent.sim.tokenizer import EOS_ID, SimTokenizer
from ha_agent.sim.tool_calls import TOOL_END, TOOL_START, Tool, call_body

_KEY = b"sglang-ha-simulator"  # fixed key: identical streams on every instance
_PERSON = b"sim-gen-v1"
_GREEDY_WORDS = 64  # temperature 0 picks among the most frequent words only
_TWO64 = 1 << 64
# Inside the reasoning, the chance per token that the model closes it with `</think>`.
THINK_END_RATE = 0.08
# With tools, the chance per answer token that the model starts its call now (a few
# words first, or none); it never ends its turn before it has called.
TOOL_START_RATE = 0.35


@dataclass(frozen=True)
class SamplingKey:
    """The sampling parameters that shape the token distribution (not max tokens, stops)."""

    seed: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: whole vocabulary

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-6

    def header(self) -> bytes:
        # Greedy decoding ignores the seed, as it does on a real engine.
        seed = "greedy" if self.greedy else str(self.seed)
        temp = 0.0 if self.greedy else self.temperature
        return f"{seed}|{temp!r}|{self.top_p!r}|{self.top_k}|".encode()

    def candidate_count(self, num_words: int) -> int:
        k = num_words
        if self.top_k > 0:
            k = min(k, self.top_k)
        if self.top_p < 1.0:
            k = min(k, max(1, math.ceil(num_words * self.top_p)))
        if self.greedy:
            k = min(k, _GREEDY_WORDS)
        return k


class TokenStream:
    """Free generation: the next token from the rolling state; O(1) work per token.

    A thinking model (`think`) writes `<think>` first when its template does not, and
    closes the reasoning with `</think>` where the same state says so: the added tokens'
    text enters the state like any other, so a continuation whose context holds them
    (continue_final_message) goes on exactly as the original would have.

    With `tools` in its prompt it calls one (sim/tool_calls.py): the call's text is fixed
    by the state at `<tool_call>`, so a context that stops inside the call is continued
    to the same call, and a turn that holds a whole call ends.
    """

    def __init__(
        self,
        tokenizer: SimTokenizer,
        key: SamplingKey,
        context_text: str,
        eos_rate: float,
        think: ThinkMode | None = None,
        tools: tuple[Tool, ...] | None = None,
    ) -> None:
        self._tok = tokenizer
        self._k = key.candidate_count(tokenizer.num_words)
        self._eos_threshold = int(eos_rate * _TWO64)
        self._think_end = self._eos_threshold + int(THINK_END_RATE * _TWO64)
        self._h = hashlib.blake2b(digest_size=16, key=_KEY, person=_PERSON)
        self._h.update(key.header())
        self._h.update(context_text.encode("utf-8", "surrogatepass"))
        self._start = think is not None and think.emit_start
        self._reasoning = think is not None and (think.emit_start or think.in_reasoning)
        self._tools = tools or ()
        self._key = key
        self._call: list[int] = []  # the rest of a tool call being written
        self._called = False  # this turn holds a whole call: it ends
        if self._tools:
            self._resume_call(context_text)

    def _state(self, text: str) -> hashlib.blake2b:
        h = hashlib.blake2b(digest_size=16, key=_KEY, person=_PERSON)
        h.update(self._key.header())
        h.update(text.encode("utf-8", "surrogatepass"))
        return h

    def _resume_call(self, context: str) -> None:
        """Where the answer so far (after the template's assistant tag) leaves a call."""
        turn_at = context.rfind(ASSISTANT)
        turn_at = 0 if turn_at < 0 else turn_at + len(ASSISTANT)
        opened, closed = context.rfind(TOOL_START, turn_at), context.rfind(TOOL_END, turn_at)
        if closed > opened:
            self._called = True
        elif opened >= 0:
            cut = opened + len(TOOL_START)
            body = call_body(self._tools, self._state(context[:cut]).digest())
            written = context[cut:]
            # Not this call's beginning: close what is open, as the model would.
            rest = body[len(written) :] if body.startswith(written) else "\n" + TOOL_END
            self._call = self._tok.encode(rest)
            self._reasoning = False

    def _added(self, token_id: int) -> int:
        self._h.update(self._tok.piece_bytes[token_id])
        return token_id

    def next_token(self, allow_eos: bool) -> int:
        if self._start:
            self._start = False
            return self._added(self._tok.think_start_id)
        if self._call:
            token_id = self._added(self._call.pop(0))
            self._called = not self._call
            return token_id
        digest = self._h.digest()  # digest() does not consume the running state
        draw = int.from_bytes(digest[:8], "little")
        calling = bool(self._tools) and not self._called and not self._reasoning
        if allow_eos and (self._called or (draw < self._eos_threshold and not calling)):
            return EOS_ID
        if self._reasoning and self._eos_threshold <= draw < self._think_end:
            self._reasoning = False
            return self._added(self._tok.think_end_id)
        if calling and draw < int(TOOL_START_RATE * _TWO64):
            self._added(self._tok.tool_start_id)
            self._call = self._tok.encode(call_body(self._tools, self._h.digest()))
            return self._tok.tool_start_id
        index = int.from_bytes(digest[8:], "little") % self._k
        self._h.update(self._tok.word_bytes[index])
        return self._tok.word_id(index)


class FixedStream:
    """Constrained output: a precomputed token list, then EOS (as a grammar forces)."""

    def __init__(self, ids: Sequence[int]) -> None:
        self._ids = list(ids)
        self._pos = 0

    def next_token(self, allow_eos: bool) -> int:
        if self._pos >= len(self._ids):
            return EOS_ID
        tid = self._ids[self._pos]
        self._pos += 1
        return tid


@dataclass
class StopRules:
    stop: list[str] = field(default_factory=list)
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    no_stop_trim: bool = False


class Detokenizer:
    """Accumulates generated text, applies SGLang's stop checks, holds back stop prefixes.

    Order follows SGLang's ``Req.update_finish_state``: a stop string (searched in the
    generated text only) or EOS / a stop token id beats the length cap, so a stop on the
    last allowed token is a stop, not ``length``. ``ignore_eos`` turns off the stop token
    ids too (``_check_token_based_finish``). Matched stop strings are trimmed from the
    text (unless ``no_stop_trim``); a matched stop token or EOS is kept in
    ``output_ids`` but adds no text.
    """

    def __init__(self, tokenizer: SimTokenizer, rules: StopRules) -> None:
        self._tok = tokenizer
        self._rules = rules
        self._max_stop = max((len(s) for s in rules.stop), default=0)
        self._pieces = tokenizer.piece_bytes  # id -> bytes, EOS -> b""
        self._pending = b""  # bytes of a partial UTF-8 character (constrained output)
        self.text = ""
        self.output_ids: list[int] = []
        self.finish_reason: dict[str, Any] | None = None

    def push(self, token_id: int, max_new_tokens: int) -> dict[str, Any] | None:
        self.output_ids.append(token_id)
        rules = self._rules
        is_stop_id = not rules.ignore_eos and (
            token_id in rules.stop_token_ids or token_id == EOS_ID
        )
        if not is_stop_id:
            self._append_text(token_id)
        if is_stop_id:
            self.finish_reason = {"type": "stop", "matched": token_id}
        elif rules.stop:
            self._check_stop_strings(len(self._pieces[token_id]))
        if self.finish_reason is None and len(self.output_ids) >= max_new_tokens:
            self.finish_reason = {"type": "length", "length": max_new_tokens}
        return self.finish_reason

    def _append_text(self, token_id: int) -> None:
        raw = self._pending + self._pieces[token_id]
        try:
            piece = raw.decode("utf-8")
            self._pending = b""
        except UnicodeDecodeError as exc:
            if exc.reason != "unexpected end of data":
                piece, self._pending = raw.decode("utf-8", "replace"), b""
            else:  # wait for the rest of a multi-byte character
                piece, self._pending = raw[: exc.start].decode("utf-8"), raw[exc.start :]
        self.text += piece

    def _check_stop_strings(self, new_len: int) -> None:
        window_start = max(0, len(self.text) - new_len - self._max_stop + 1)
        best: tuple[int, str] | None = None
        for s in self._rules.stop:
            if not s:
                continue
            pos = self.text.find(s, window_start)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is not None:
            pos, s = best
            self.text = self.text[: pos + len(s)] if self._rules.no_stop_trim else self.text[:pos]
            self.finish_reason = {"type": "stop", "matched": s}

    def visible_text(self) -> str:
        """Text safe to stream now: never a prefix of a stop string that may still match."""
        if self.finish_reason is not None or not self._max_stop:
            return self.text
        text = self.text
        for n in range(min(self._max_stop - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._rules.stop):
                return text[:-n]
        return text
