"""Prefix (KV) cache in the spirit of SGLang's RadixAttention, at page granularity.

Each full page of token ids is keyed by a chained hash of everything before it, so a
lookup finds the longest cached prefix in O(pages). Pages live in an LRU bounded by
``max_total_tokens``. Generated tokens are inserted too: a continuation (prompt + the
output so far) hits the cache, as it does on a real engine.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence


def _page_keys(ids: Sequence[int], page_size: int) -> list[bytes]:
    keys: list[bytes] = []
    prev = b""
    for start in range(0, len(ids) - page_size + 1, page_size):
        page = array("I", ids[start : start + page_size]).tobytes()
        prev = hashlib.blake2b(prev + page, digest_size=16).digest()
        keys.append(prev)
    return keys


class PrefixCache:
    def __init__(self, max_tokens: int, page_size: int) -> None:
        self.page_size = page_size
        self.max_pages = max(1, max_tokens // page_size)
        self._pages: OrderedDict[bytes, None] = OrderedDict()

    @property
    def cached_tokens(self) -> int:
        return len(self._pages) * self.page_size

    def match(self, ids: Sequence[int]) -> int:
        """Number of leading tokens already cached (at least one token is always computed)."""
        usable = max(0, len(ids) - 1)
        hits = 0
        for key in _page_keys(ids[:usable], self.page_size):
            if key not in self._pages:
                break
            self._pages.move_to_end(key)
            hits += 1
        return hits * self.page_size

    def insert(self, ids: Sequence[int]) -> None:
        for key in _page_keys(ids, self.page_size):
            self._pages[key] = None
            self._pages.move_to_end(key)
        while len(self._pages) > self.max_pages:
            self._pages.popitem(last=False)

    def flush(self) -> None:
        self._pages.clear()
