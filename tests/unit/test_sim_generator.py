"""Token generation: determinism, prefix consistency and SGLang's stop logic, without HTTP."""

from __future__ import annotations

from ha_agent.sim.generator import Detokenizer, SamplingKey, StopRules, TokenStream
from ha_agent.sim.tokenizer import EOS_ID, get_tokenizer

TOK = get_tokenizer()


def run(
    prompt: str,
    key: SamplingKey,
    max_new: int,
    eos_rate: float = 0.02,
    rules: StopRules | None = None,
) -> Detokenizer:
    stream = TokenStream(TOK, key, prompt, eos_rate)
    detok = Detokenizer(TOK, rules or StopRules())
    while detok.finish_reason is None:
        allow_eos = not (rules and rules.ignore_eos)
        detok.push(stream.next_token(allow_eos), max_new)
    return detok


def test_same_request_same_tokens_and_seed_matters() -> None:
    a = run("Tell me a story", SamplingKey(seed=7), 50)
    b = run("Tell me a story", SamplingKey(seed=7), 50)
    c = run("Tell me a story", SamplingKey(seed=8), 50)
    assert a.output_ids == b.output_ids and a.text == b.text
    assert a.output_ids != c.output_ids


def test_sampling_params_shape_the_stream_but_greedy_ignores_the_seed() -> None:
    base = run("p", SamplingKey(seed=1, temperature=0.7), 30, eos_rate=0).output_ids
    assert base != run("p", SamplingKey(seed=1, temperature=0.9), 30, eos_rate=0).output_ids
    g1 = run("p", SamplingKey(seed=1, temperature=0.0), 30, eos_rate=0).output_ids
    g2 = run("p", SamplingKey(seed=2, temperature=0.0), 30, eos_rate=0).output_ids
    assert g1 == g2
    top2 = run("p", SamplingKey(seed=3, top_k=2), 40, eos_rate=0).output_ids
    assert len(set(top2)) <= 2


def test_prefix_consistency_over_context_text() -> None:
    key = SamplingKey(seed=11, temperature=0.8)
    prompt = "Once upon a time"
    full = run(prompt, key, 60, eos_rate=0.03)
    n = len(full.output_ids)
    for k in range(n):
        partial_text = TOK.decode(full.output_ids[:k])
        cont = run(prompt + partial_text, key, 60 - k, eos_rate=0.03)
        assert cont.output_ids == full.output_ids[k:]
        assert cont.text == full.text[len(partial_text) :]
        assert cont.finish_reason["type"] == full.finish_reason["type"]


def test_eos_adds_no_text_and_beats_length_on_the_last_token() -> None:
    key = next(
        SamplingKey(seed=s)
        for s in range(500)
        if run("x", SamplingKey(seed=s), 100, eos_rate=0.2).output_ids[-1] == EOS_ID
    )
    full = run("x", key, 100, eos_rate=0.2)
    assert full.finish_reason == {"type": "stop", "matched": EOS_ID}
    assert full.text == TOK.decode(full.output_ids)
    # Req.update_finish_state checks EOS before length: with max = position of EOS, a stop.
    cut = run("x", key, len(full.output_ids), eos_rate=0.2)
    assert cut.finish_reason == {"type": "stop", "matched": EOS_ID}
    assert cut.output_ids == full.output_ids


def test_stop_string_trimmed_and_held_back() -> None:
    key = SamplingKey(seed=5)
    free = run("q", key, 30, eos_rate=0)
    words = free.text.split(" ")
    stop = " " + words[4][:2]  # a stop string that starts a later word
    detok = Detokenizer(TOK, StopRules(stop=[stop]))
    stream = TokenStream(TOK, key, "q", 0)
    while detok.finish_reason is None:
        detok.push(stream.next_token(True), 30)
        visible = detok.visible_text()
        assert free.text.startswith(visible) and stop not in visible
    assert detok.finish_reason == {"type": "stop", "matched": stop}
    assert detok.text == free.text[: free.text.index(stop)]
    kept = Detokenizer(TOK, StopRules(stop=[stop], no_stop_trim=True))
    stream = TokenStream(TOK, key, "q", 0)
    while kept.finish_reason is None:
        kept.push(stream.next_token(True), 30)
    assert kept.text.endswith(stop)


def test_stop_token_ids() -> None:
    key = SamplingKey(seed=9, top_k=3)
    free = run("z", key, 20, eos_rate=0)
    target = free.output_ids[5]
    first = free.output_ids.index(target)
    hit = run("z", key, 20, eos_rate=0, rules=StopRules(stop_token_ids=frozenset({target})))
    assert hit.finish_reason == {"type": "stop", "matched": target}
    assert hit.output_ids == free.output_ids[: first + 1]
    assert hit.text == TOK.decode(free.output_ids[:first])  # the stop token adds no text


def test_a_stop_on_the_last_allowed_token_is_a_stop_not_length() -> None:
    """managers/schedule_batch.py `Req.update_finish_state`: a stop string, then EOS or
    a stop token id, and only then the length cap; `_check_token_based_finish` ignores
    the stop token ids too under `ignore_eos`."""
    words = run("z", SamplingKey(seed=9), 10, eos_rate=0).output_ids
    first, last = words[:3], words[3]
    stop = TOK.decode([last])
    assert last not in first and stop not in TOK.decode(first)  # the stop is new at the end

    def ending_with(token: int, rules: StopRules) -> dict[str, object] | None:
        detok = Detokenizer(TOK, rules)
        for t in first:
            assert detok.push(t, 4) is None
        return detok.push(token, 4)  # the 4th token: the last one allowed

    assert ending_with(EOS_ID, StopRules()) == {"type": "stop", "matched": EOS_ID}
    by_id = StopRules(stop_token_ids=frozenset({last}))
    assert ending_with(last, by_id) == {"type": "stop", "matched": last}
    assert ending_with(last, StopRules(stop=[stop])) == {"type": "stop", "matched": stop}
    assert ending_with(words[4], StopRules()) == {"type": "length", "length": 4}
    ignored = StopRules(stop_token_ids=frozenset({last}), ignore_eos=True)
    assert ending_with(last, ignored) == {"type": "length", "length": 4}
