"""The simulator's tokenizer: reversible for any text, stable ids, sensible costs."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ha_agent.sim.tokenizer import EOS_ID, SimTokenizer, get_tokenizer


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_decode_encode_roundtrip_any_unicode(text: str) -> None:
    tok = get_tokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_roundtrip_edge_cases() -> None:
    tok = get_tokenizer()
    for text in [
        "",
        " ",
        "  lorem",
        "lorem ipsum",
        "\ud800 lone surrogate",
        "émoji 🎉\n\t",
        "a" * 5,
    ]:
        assert tok.decode(tok.encode(text)) == text


def test_ids_are_identical_across_instances() -> None:
    a, b = SimTokenizer(), SimTokenizer()
    text = 'The quick brown fox, lorem ipsum dolor sit amet: {"k": [1, 2]}'
    assert a.encode(text) == b.encode(text)
    assert a.vocab_size == b.vocab_size and a.words == b.words


def test_words_pairs_and_bytes() -> None:
    tok = get_tokenizer()
    ids = tok.encode(" lorem ipsum")
    assert len(ids) == 2 and all(tok.is_word(i) for i in ids)
    assert len(tok.encode('{"ab": 12}')) < len('{"ab": 12}')  # pairs: ~2 chars per token
    assert tok.encode("é") == list("é".encode())  # byte fallback
    assert tok.num_words >= 2000


def test_eos_is_special() -> None:
    tok = get_tokenizer()
    assert tok.decode([EOS_ID]) == ""
    assert tok.decode([EOS_ID], skip_special_tokens=False) == "<|eos|>"
    assert EOS_ID not in tok.encode("<|eos|>")  # text never becomes a special token


def test_out_of_range_ids_are_rejected() -> None:
    tok = get_tokenizer()
    try:
        tok.check_ids([1, tok.vocab_size])
    except ValueError as exc:
        assert "out of vocabulary range" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("expected ValueError")
