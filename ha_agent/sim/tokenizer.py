"""A small reversible tokenizer for the simulator.

Vocabulary (ids are stable across processes and versions of this file's data):

* ``0..255``   one raw byte each (byte-level fallback: any Unicode text encodes);
* ``256``      ``EOS_ID``, a special token that decodes to nothing;
* ``257..``    pseudo-words with a leading space (``" lorem"``); generation samples these,
  so generated text is clean ASCII words;
* then every pair of printable ASCII characters whose second character is not a space
  (``"ab"``, ``'{"'``), so prompts and JSON cost about half a token per character,
  close to what real BPE tokenizers cost;
* last ``<think>``, ``</think>``, ``<tool_call>`` and ``</tool_call>``, one added token
  each, matched in text before anything else and kept in decoded text, as Qwen2.5's and
  Qwen3's tokenizers do (not special: the reasoning parsers split on the first two,
  ``ha_agent/sim/reasoning.py``, the tool-call parser on the others,
  ``ha_agent/sim/tool_calls.py``).

``decode(encode(text)) == text`` for any ``str`` (lone surrogates included).
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

EOS_ID = 256
EOS_TEXT = "<|eos|>"
_FIRST_WORD_ID = 257
_NUM_WORDS = 2048
_PRINTABLE = [chr(c) for c in range(0x20, 0x7F)]
_PAIR_SECOND = [chr(c) for c in range(0x21, 0x7F)]

# Most "frequent" words first: top_k / top_p restrict sampling to a prefix of this list.
_SEED_TEXT = (
    "the of and to in is that it for on with as was at by this be from or an are not "
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua enim ad minim veniam quis nostrud "
    "exercitation ullamco laboris nisi aliquip ex ea commodo consequat duis aute irure "
    "in reprehenderit voluptate velit esse cillum fugiat nulla pariatur excepteur sint "
    "occaecat cupidatat non proident sunt culpa qui officia deserunt mollit anim id est"
)
_ONSETS = "b c d f g h j k l m n p r s t v w z br ch cl cr dr fl fr gl gr pl pr sh st th tr"
_VOWELS = "a e i o u ai ea io ou"
_CODAS = ("", "", "", "n", "r", "s", "t", "l", "m", "x")

# One regex pass does the whole scan in C: a vocabulary word (space + letters, ending at a
# word boundary), else a printable pair, else a single character (bytes of its UTF-8).
_SCAN = re.compile(
    r"</?think>|</?tool_call>| [a-z]{1,16}(?![a-z])|[\x20-\x7e][\x21-\x7e]|.", re.DOTALL
)
_ADDED = ("<think>", "</think>", "<tool_call>", "</tool_call>")
_PAIRS_ONLY = re.compile(r"[\x20-\x7e][\x21-\x7e]|.", re.DOTALL)


def _build_words() -> list[str]:
    # random.Random with an int seed is reproducible across runs and platforms.
    rng = random.Random(20240917)
    onsets, vowels = _ONSETS.split(), _VOWELS.split()
    words: list[str] = []
    seen: set[str] = set()
    for w in _SEED_TEXT.split():
        if w not in seen:
            seen.add(w)
            words.append(w)
    while len(words) < _NUM_WORDS:
        n = rng.choice((1, 2, 2, 2, 3, 3))
        w = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(n))
        w += rng.choice(_CODAS)
        if 2 <= len(w) <= 12 and w not in seen:
            seen.add(w)
            words.append(w)
    return words


class SimTokenizer:
    """Byte-fallback tokenizer with a word and an ASCII-pair vocabulary."""

    def __init__(self) -> None:
        self.words: list[str] = _build_words()
        self.word_pieces: list[str] = [" " + w for w in self.words]
        self._word_to_id = {p: _FIRST_WORD_ID + i for i, p in enumerate(self.word_pieces)}
        first_pair = _FIRST_WORD_ID + len(self.words)
        pairs = [a + b for a in _PRINTABLE for b in _PAIR_SECOND]
        self._pair_to_id = {p: first_pair + i for i, p in enumerate(pairs)}
        first_added = first_pair + len(pairs)
        self._added_to_id = {t: first_added + i for i, t in enumerate(_ADDED)}
        self.think_start_id, self.think_end_id = first_added, first_added + 1
        self.tool_start_id, self.tool_end_id = first_added + 2, first_added + 3
        self.vocab_size = first_added + len(_ADDED)
        table: list[bytes] = [bytes([b]) for b in range(256)]
        table.append(b"")  # EOS when special tokens are skipped
        table.extend(p.encode("ascii") for p in self.word_pieces)
        table.extend(p.encode("ascii") for p in pairs)
        table.extend(t.encode("ascii") for t in _ADDED)
        self.piece_bytes = table
        self._bytes_with_special = [*table[:EOS_ID], EOS_TEXT.encode(), *table[EOS_ID + 1 :]]
        self.word_bytes: list[bytes] = [p.encode("ascii") for p in self.word_pieces]

    @property
    def num_words(self) -> int:
        return len(self.words)

    def word_id(self, index: int) -> int:
        return _FIRST_WORD_ID + index

    def is_word(self, token_id: int) -> bool:
        return _FIRST_WORD_ID <= token_id < _FIRST_WORD_ID + len(self.words)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        words, pairs = self._word_to_id, self._pair_to_id
        for m in _SCAN.finditer(text):
            piece = m.group()
            tid = words.get(piece) if piece[0] == " " and len(piece) > 2 else None
            if tid is not None:
                ids.append(tid)
            elif len(piece) == 2 and piece in pairs:
                ids.append(pairs[piece])
            elif piece[0] == "<" and piece in self._added_to_id:
                ids.append(self._added_to_id[piece])
            elif len(piece) == 1:
                ids.extend(piece.encode("utf-8", "surrogatepass"))
            else:  # a space + letters that is not a vocabulary word
                for sub in _PAIRS_ONLY.finditer(piece):
                    s = sub.group()
                    if len(s) == 2:
                        ids.append(pairs[s])
                    else:
                        ids.extend(s.encode("ascii"))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        table = self.piece_bytes if skip_special_tokens else self._bytes_with_special
        raw = b"".join([table[i] for i in ids])
        try:
            return raw.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return raw.decode("utf-8", "replace")

    def check_ids(self, ids: list[int]) -> None:
        """Raise ValueError for an id outside the vocabulary (a 400 for the caller)."""
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"Token id {i} is out of vocabulary range [0, {self.vocab_size}).")


@lru_cache(maxsize=1)
def get_tokenizer() -> SimTokenizer:
    """The process-wide tokenizer (building it takes a few milliseconds)."""
    return SimTokenizer()
