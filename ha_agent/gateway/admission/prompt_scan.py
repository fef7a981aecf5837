"""Refuse a prompt that cannot fit while its body is still arriving.

A 15 MB prompt under the gateway's 16 MB body limit costs the relay the whole
transfer, a full JSON parse and only then `Limits.check`'s verdict. The scanner
follows the JSON as chunks arrive, with C-level searches (no per-byte Python), and
keeps a lower bound on the characters of the request's prompt strings: the same
fields `limits.prompt_size` counts, as the endpoint table's `prompt_paths` places them
(chat `messages[*].content` and its parts' `text`; completions `prompt`, /generate
`text` and `input_ids`, a string or a list of them). Once
that bound is past `context_length * chars_per_token`, `Limits.check` on the parsed
body would refuse it too (it counts at least these characters and allows at most
that many), so the relay answers the same 400 without keeping or parsing the rest
(it still reads it: see `policy._read_scanning` for why).

Only prompt fields count: other strings may legitimately be megabytes (base64 images,
audio and video in `image_url`, `image_data`, `input_audio`...), and the body's size
alone is never a reason. The scanner is a fast path, never the judge: on anything it
does not follow (an escaped key, nesting past `MAX_DEPTH`, more than `MAX_EVENTS`
tokens, a stray closing bracket) it stops counting, and the whole body goes to the
usual parse and checks. Three differences it cannot see coming: a body that turns
out not to be JSON after a too long prompt gets the length 400 rather than the
parse's 400; a chat content part's `text` counts whatever the part's `type` (which
may come after it), where `prompt_size` counts `text` parts only; and a key repeated
later in the same object replaces the earlier value in the parsed body (`json.loads`
keeps the last), so a prompt string already too long is refused even when a later
duplicate key would have replaced it with a short one.

The count is a lower bound on the decoded characters: a UTF-8 continuation byte
(0x80-0xBF) adds no character, and each backslash takes 6 bytes off the count, which
covers every escape (`\\n` is 2 bytes for 1 character, a surrogate pair `\\uD83D\\uDE00`
12 bytes for 1).
"""

from __future__ import annotations

from ha_agent.openapi.endpoints import generation

MAX_DEPTH = 16  # prompt paths are at most 5 deep; past this: give up
MAX_EVENTS = 20_000  # structural tokens and escaped quotes followed at most
_KEY_MAX = 64  # longer keys are no prompt key: kept as "?"
_TOKENS = b'"{}[]'  # what matters outside strings (',' and ':' are told by position)
_CONTINUATION = bytes(range(0x80, 0xC0))
_WHITESPACE = b" \t\r\n"


class PromptTooLong(Exception):
    """The body's prompt cannot fit: raised while reading it (`RequestPolicy.read_body`)."""

    def __init__(self, scanner: PromptScanner) -> None:
        super().__init__(scanner.chars_at_least)
        self.scanner = scanner


class PromptScanner:
    """Feed the body's chunks in order; `over` says once the prompt cannot fit."""

    def __init__(self, kind: str, max_chars: float) -> None:
        self.kind = kind
        # The prompt strings' paths from the body's root: where the endpoint table's
        # `prompt_text`, which `limits.prompt_size` counts, finds them.
        route = generation(kind)
        self.paths = route.prompt_paths() if route is not None else frozenset()
        self.max_chars = max_chars
        self.chars = 0  # lower bound on the prompt's characters in strings ended so far
        self._string_chars = 0  # the same for the string being read (may dip below 0)
        self.over = False
        self.active = bool(self.paths)
        self._events = 0
        # Outside strings: the containers' paths, each a key or "*", from the root.
        self._path: list[str] = []
        self._kinds: list[int] = []  # per open container: ord("{") or ord("[")
        self._key = "?"  # the last key read in the innermost object
        self._prev = 0  # last non-whitespace byte outside strings, 0 for none yet
        # Inside a string: what it is, and its state across chunks.
        self._in_string = False
        self._string_is_key = False
        self._counts = False  # a prompt string: its characters count
        self._backslashes = 0  # trailing run of backslashes so far (escape parity)
        self._key_bytes: bytearray | None = None

    @property
    def chars_at_least(self) -> int:
        return self.chars + max(self._string_chars, 0)

    def feed(self, chunk: bytes) -> bool:
        """Follow one more chunk; True once the prompt is known to be too long."""
        if not self.active or self.over:
            return self.over
        pos, end = 0, len(chunk)
        # Where each token byte is next in this chunk (memchr-fast `find`s, redone only
        # for those behind pos: a regex search is ~25 times slower on 16 MB of numbers).
        ahead = [-2] * len(_TOKENS)
        while pos < end and self.active:
            if self._in_string:
                pos = self._string(chunk, pos)
                if self.over:
                    return True
                continue
            stop = end
            for i, token in enumerate(_TOKENS):
                at = ahead[i]
                if at != -1 and at < pos:
                    at = ahead[i] = chunk.find(token, pos)
                if at != -1 and at < stop:
                    stop = at
            tail = chunk[pos:stop].rstrip(_WHITESPACE)
            if tail:
                self._prev = tail[-1]
            if stop == end:
                break
            self._events += 1
            if self._events > MAX_EVENTS:
                self.active = False
                break
            self._token(chunk[stop])
            pos = stop + 1
        return self.over

    # -- outside strings -------------------------------------------------------------

    def _token(self, byte: int) -> None:
        if byte == 0x22:  # '"'
            self._open_string()
        elif byte in (0x7B, 0x5B):  # '{' '['
            if len(self._kinds) >= MAX_DEPTH:
                self.active = False
                return
            if self._kinds:
                self._path.append(self._member())
            self._kinds.append(byte)
            self._key = "?"
            self._prev = byte
        else:  # '}' ']'
            if not self._kinds:
                self.active = False  # not JSON: the parse says why
                return
            self._kinds.pop()
            if self._kinds:  # a nested container ended: back to its parent's path
                self._path.pop()
            self._key = "?"
            self._prev = byte

    def _member(self) -> str:
        """The path element of a value starting here: its key, or "*" in an array."""
        return "*" if self._kinds[-1] == 0x5B else self._key

    def _open_string(self) -> None:
        self._in_string, self._backslashes = True, 0
        in_object = bool(self._kinds) and self._kinds[-1] == 0x7B
        self._string_is_key = in_object and self._prev in (0x7B, 0x2C)  # after '{' or ','
        self._key_bytes = bytearray() if self._string_is_key else None
        self._counts, self._string_chars = False, 0
        if not self._string_is_key and self._kinds:
            self._counts = (*self._path, self._member()) in self.paths

    # -- inside a string -------------------------------------------------------------

    def _string(self, chunk: bytes, pos: int) -> int:
        """Consume string bytes from pos; the position after what was consumed."""
        while True:
            quote = chunk.find(b'"', pos)
            stop = len(chunk) if quote < 0 else quote
            segment = chunk[pos:stop]
            if segment:
                self._take(segment)
            if quote < 0:
                return len(chunk)
            if self._backslashes % 2:  # an escaped quote: part of the string
                self._events += 1
                if self._events > MAX_EVENTS:
                    self.active = False
                    return len(chunk)
                self._take(b'"')
                pos = quote + 1
                if self.over:
                    return pos
                continue
            self._close_string()
            return quote + 1

    def _take(self, segment: bytes) -> None:
        stripped = len(segment) - len(segment.rstrip(b"\\"))
        if stripped == len(segment):
            self._backslashes += stripped
        else:
            self._backslashes = stripped
        if self._key_bytes is not None:
            if len(self._key_bytes) + len(segment) <= _KEY_MAX and b"\\" not in segment:
                self._key_bytes += segment
            else:
                self._key_bytes = None  # too long or escaped: matches no prompt key
        if self._counts:
            chars = len(segment) - 6 * segment.count(b"\\")
            if not segment.isascii():
                chars -= len(segment) - len(segment.translate(None, _CONTINUATION))
            self._string_chars += chars
            if self.chars + self._string_chars > self.max_chars:
                self.over = True

    def _close_string(self) -> None:
        self._in_string = False
        self.chars += max(self._string_chars, 0)
        self._string_chars = 0
        if self._string_is_key:
            key = self._key_bytes
            self._key = key.decode("utf-8", "replace") if key is not None else "?"
        self._key_bytes = None
        self._prev = 0x22
