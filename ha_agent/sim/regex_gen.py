"""Generate a string that fully matches a regex, by walking Python's own parse tree.

Supported: literals, classes (ranges, negation, ``\\d \\w \\s``), ``.``, every quantifier,
groups, alternation, anchors. Lookarounds, backreferences and conditionals are refused:
those are exactly the constructs where a naive walk produces non-matching strings.
Every result is checked with ``re.fullmatch``; a few seeded retries cover ``\\b`` and
the like before giving up.
"""

from __future__ import annotations

import random
import re
import string

try:  # Python >= 3.11
    import re._parser as sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse


class RegexUnsupported(ValueError):
    """The pattern is invalid or uses a construct the simulator cannot generate."""


class _Enough(Exception):
    """The output already holds as much as the request may generate."""


_ALPHABET = [chr(c) for c in range(0x20, 0x7F)]
_WORD = set(string.ascii_letters + string.digits + "_")
_SPACE = set(" \t\n\r\f\v")
_MAX_EXTRA_REPEAT = 3  # unbounded quantifiers repeat at most min + 3 times
_ATTEMPTS = 25
_MAX_MIN_REPEAT = 4096

_UNSUPPORTED = {
    sre_parse.ASSERT: "lookahead/lookbehind assertions",
    sre_parse.ASSERT_NOT: "negative lookahead/lookbehind assertions",
    sre_parse.GROUPREF: "backreferences",
    sre_parse.GROUPREF_EXISTS: "conditional groups",
}
_REPEATS = {sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT}
if hasattr(sre_parse, "POSSESSIVE_REPEAT"):
    _REPEATS.add(sre_parse.POSSESSIVE_REPEAT)


def _category_has(cat: object, ch: str) -> bool:
    name = getattr(cat, "name", str(cat))
    negate = "NOT_" in name
    if "DIGIT" in name:
        hit = ch.isdigit()
    elif "SPACE" in name:
        hit = ch in _SPACE
    elif "WORD" in name:
        hit = ch in _WORD or ch.isalnum()
    elif "LINEBREAK" in name:
        hit = ch == "\n"
    else:
        raise RegexUnsupported(f"regex character category {name} is not supported")
    return hit != negate


def _class_has(items: list, ch: str) -> bool:
    code = ord(ch)
    for op, av in items:
        if op is sre_parse.LITERAL and av == code:
            return True
        if op is sre_parse.RANGE and av[0] <= code <= av[1]:
            return True
        if op is sre_parse.CATEGORY and _category_has(av, ch):
            return True
    return False


def _pick_class(items: list, rng: random.Random) -> str:
    if items and items[0][0] is sre_parse.NEGATE:
        allowed = [c for c in _ALPHABET if not _class_has(items[1:], c)]
    else:
        # Prefer printable ASCII members; fall back to any member of a range.
        allowed = [c for c in _ALPHABET if _class_has(items, c)]
        if not allowed:
            for op, av in items:
                if op is sre_parse.LITERAL:
                    allowed.append(chr(av))
                elif op is sre_parse.RANGE:
                    allowed.append(chr(rng.randint(av[0], av[1])))
    if not allowed:
        raise RegexUnsupported("regex character class matches no generatable character")
    return rng.choice(allowed)


def _check(parsed: sre_parse.SubPattern) -> None:
    for op, av in parsed:
        if op in _UNSUPPORTED:
            raise RegexUnsupported(
                f"regex uses {_UNSUPPORTED[op]}, which the simulator does not support"
            )
        if op is sre_parse.BRANCH:
            for branch in av[1]:
                _check(branch)
        elif op is sre_parse.SUBPATTERN:
            _check(av[3])
        elif op in _REPEATS:
            _check(av[2])
        elif op is getattr(sre_parse, "ATOMIC_GROUP", None):
            _check(av)


def _emit(
    parsed: sre_parse.SubPattern, rng: random.Random, out: list[str], limit: int | None = None
) -> None:
    for op, av in parsed:
        if limit is not None and len(out) >= limit:
            raise _Enough()
        if op is sre_parse.LITERAL:
            out.append(chr(av))
        elif op is sre_parse.NOT_LITERAL:
            out.append(rng.choice([c for c in _ALPHABET if ord(c) != av]))
        elif op is sre_parse.ANY:
            out.append(rng.choice(_ALPHABET))
        elif op is sre_parse.IN:
            out.append(_pick_class(av, rng))
        elif op is sre_parse.BRANCH:
            _emit(rng.choice(av[1]), rng, out, limit)
        elif op is sre_parse.SUBPATTERN:
            _emit(av[3], rng, out, limit)
        elif op in _REPEATS:
            lo, hi, sub = av
            if lo > _MAX_MIN_REPEAT:
                raise RegexUnsupported(f"regex repeat minimum {lo} is too large to generate")
            top = lo + _MAX_EXTRA_REPEAT if hi is sre_parse.MAXREPEAT else min(hi, lo + 3)
            for _ in range(rng.randint(lo, max(lo, top))):
                _emit(sub, rng, out, limit)
        elif op is getattr(sre_parse, "ATOMIC_GROUP", None):
            _emit(av, rng, out, limit)
        elif op is sre_parse.AT:
            continue  # anchors and \b are zero-width; fullmatch checks the result
        else:
            raise RegexUnsupported(f"regex construct {op} is not supported by the simulator")


def validate_regex(pattern: str) -> re.Pattern[str]:
    """Compile and check a pattern; raise RegexUnsupported with a clear reason."""
    try:
        compiled = re.compile(pattern)
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError) as exc:
        raise RegexUnsupported(f"invalid regex {pattern!r}: {exc}") from None
    _check(parsed)
    return compiled


def generate_regex(pattern: str, rng: random.Random, max_chars: int | None = None) -> str:
    """A string ``s`` with ``re.fullmatch(pattern, s)``, deterministic in ``rng``.

    With ``max_chars``, only the first ``max_chars`` characters of such a string: a
    grammar-constrained engine decodes token by token and stops at ``max_new_tokens``,
    so it never expands a pattern further than it generates (``(?:a{1000}){1000}``
    costs SGLang nothing until it decodes). The caller's budget covers that many tokens.
    """
    compiled = validate_regex(pattern)
    parsed = sre_parse.parse(pattern)
    for _ in range(_ATTEMPTS):
        out: list[str] = []
        try:
            _emit(parsed, rng, out, max_chars)
        except _Enough:
            return "".join(out)[:max_chars]
        candidate = "".join(out)
        if compiled.fullmatch(candidate):
            return candidate
    raise RegexUnsupported(f"could not generate a string matching regex {pattern!r}")
