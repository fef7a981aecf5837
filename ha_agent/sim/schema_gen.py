"""Generate a small JSON value that is valid against a JSON Schema (a practical subset).

Supported: ``type`` (also lists), ``enum``, ``const``, ``properties``, ``required``,
``additionalProperties``, ``minProperties``/``maxProperties``, ``items``,
``minItems``/``maxItems``, ``uniqueItems``, ``minLength``/``maxLength``, ``pattern``,
``format`` (date, date-time, time, email, uuid, uri, ipv4, hostname), ``minimum``/
``maximum`` (and exclusive forms), integer ``multipleOf``, ``anyOf``, ``oneOf``, ``$ref``
into ``$defs``/``definitions`` (recursion included). Anything else is refused up front
with the keyword's name, so a client learns at once what the simulator cannot honour.

Values are kept small (short strings, 1-3 array items, optional properties about half
the time) so that documents finish within ordinary ``max_tokens``.
"""

from __future__ import annotations

import json
import math
import random
import re
from typing import Any

from ha_agent.sim.regex_gen import RegexUnsupported, generate_regex, validate_regex


class SchemaUnsupported(ValueError):
    """The schema is malformed or uses keywords the simulator does not implement."""


_ANNOTATIONS = {
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "deprecated",
    "readOnly",
    "writeOnly",
    "$defs",
    "definitions",
    "strict",
}
_HANDLED = {
    "type",
    "enum",
    "const",
    "properties",
    "required",
    "additionalProperties",
    "minProperties",
    "maxProperties",
    "items",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "anyOf",
    "oneOf",
    "$ref",
}
_TYPES = {"object", "array", "string", "integer", "number", "boolean", "null"}
_SOFT_DEPTH = 4  # past this, only required parts are generated (recursion terminates)
_HARD_DEPTH = 32
_MAX_SIZE = 4096  # largest minLength / minItems / minProperties honoured
_WORDS = (
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
)


def _ref_target(root: dict[str, Any], ref: str) -> Any:
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        raise SchemaUnsupported(f"$ref {ref!r}: only local references (#/...) are supported")
    node: Any = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            raise SchemaUnsupported(f"$ref {ref!r} does not resolve")
        node = node[part]
    return node


def check_schema(root: Any) -> None:
    """Walk the whole schema once; raise SchemaUnsupported naming the first problem."""

    def walk(node: Any, path: str) -> None:
        if isinstance(node, bool):
            return
        if not isinstance(node, dict):
            raise SchemaUnsupported(f"schema at {path} must be an object or a boolean")
        for key in node:
            if key not in _HANDLED and key not in _ANNOTATIONS:
                raise SchemaUnsupported(
                    f"JSON Schema keyword {key!r} (at {path}) is not supported by the simulator"
                )
        types = node.get("type")
        for t in types if isinstance(types, list) else [types] if types else []:
            if t not in _TYPES:
                raise SchemaUnsupported(f"unknown JSON Schema type {t!r} at {path}")
        if not isinstance(node.get("required") or [], list):
            raise SchemaUnsupported(f"required at {path} must be a list")
        if "$ref" in node:
            _ref_target(root if isinstance(root, dict) else {}, node["$ref"])
        if "pattern" in node:
            try:
                validate_regex(node["pattern"])
            except RegexUnsupported as exc:
                raise SchemaUnsupported(f"pattern at {path}: {exc}") from None
        mult = node.get("multipleOf")
        if mult is not None and (not isinstance(mult, int) or isinstance(mult, bool) or mult <= 0):
            raise SchemaUnsupported(f"multipleOf at {path}: only positive integers are supported")
        for name in ("properties", "$defs", "definitions"):
            if not isinstance(node.get(name) or {}, dict):
                raise SchemaUnsupported(f"{name} at {path} must be an object")
            for key, sub in (node.get(name) or {}).items():
                walk(sub, f"{path}/{name}/{key}")
        if isinstance(node.get("items"), list):
            raise SchemaUnsupported(f"tuple-style 'items' (a list) at {path} is not supported")
        for name in ("items", "additionalProperties"):
            if isinstance(node.get(name), (dict, bool)):
                walk(node[name], f"{path}/{name}")
        for name in ("anyOf", "oneOf"):
            branches = node.get(name)
            if branches is not None:
                if not isinstance(branches, list) or not branches:
                    raise SchemaUnsupported(f"{name} at {path} must be a non-empty list")
                for i, sub in enumerate(branches):
                    walk(sub, f"{path}/{name}/{i}")

    walk(root, "#")


class SchemaGenerator:
    """Seeded generator; ``generate()`` returns a Python value to ``json.dumps``."""

    def __init__(self, root: Any, rng: random.Random) -> None:
        check_schema(root)
        self.root = root
        self.rng = rng

    def generate(self) -> Any:
        return self._gen(self.root, 0)

    # -- dispatch -------------------------------------------------------------------
    def _gen(self, s: Any, depth: int) -> Any:
        if depth > _HARD_DEPTH:
            raise SchemaUnsupported("schema recursion is too deep to produce a finite value")
        if s is True or s == {}:
            return self._words(1, 2)
        if s is False:
            raise SchemaUnsupported("schema 'false' accepts no value")
        if "$ref" in s:
            target = _ref_target(self.root, s["$ref"])
            rest = {k: v for k, v in s.items() if k != "$ref" and k not in _ANNOTATIONS}
            return self._gen({**target, **rest} if rest else target, depth + 1)
        if "const" in s:
            return s["const"]
        if "enum" in s:
            return self.rng.choice(s["enum"])
        for key in ("anyOf", "oneOf"):
            if key in s:
                return self._gen_union(s, key, depth)
        return self._gen_typed(s, self._pick_type(s, depth), depth)

    def _gen_union(self, s: dict[str, Any], key: str, depth: int) -> Any:
        rest = {k: v for k, v in s.items() if k != key}
        branches = list(s[key])
        self.rng.shuffle(branches)
        if depth >= _SOFT_DEPTH:  # prefer branches that do not recurse
            branches.sort(key=lambda b: isinstance(b, dict) and "$ref" in json.dumps(b))
        last_error: Exception | None = None
        for branch in branches:
            merged = {**rest, **branch} if isinstance(branch, dict) else branch
            try:
                value = self._gen(merged, depth + 1)
            except SchemaUnsupported as exc:
                last_error = exc
                continue
            if key == "oneOf":
                hits = sum(
                    self.valid(value, {**rest, **b} if isinstance(b, dict) else b) for b in s[key]
                )
                if hits != 1:
                    continue
            return value
        raise SchemaUnsupported(f"could not satisfy {key}: {last_error or 'branches overlap'}")

    def _pick_type(self, s: dict[str, Any], depth: int) -> str:
        t = s.get("type")
        if isinstance(t, list):
            choices = [x for x in t if x != "null"] if depth >= _SOFT_DEPTH and "null" in t else t
            return str(self.rng.choice(choices or t))
        if t:
            return str(t)
        if "properties" in s or "required" in s or "additionalProperties" in s:
            return "object"
        if "items" in s or "minItems" in s:
            return "array"
        if any(k in s for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
            return "number"
        return "string"

    def _gen_typed(self, s: dict[str, Any], t: str, depth: int) -> Any:
        if t == "object":
            return self._object(s, depth)
        if t == "array":
            return self._array(s, depth)
        if t == "integer":
            return self._integer(s)
        if t == "number":
            return self._number(s)
        if t == "boolean":
            return self.rng.random() < 0.5
        if t == "null":
            return None
        return self._string(s)

    # -- leaves ---------------------------------------------------------------------
    def _words(self, lo: int, hi: int) -> str:
        return " ".join(self.rng.choice(_WORDS) for _ in range(self.rng.randint(lo, hi)))

    def _string(self, s: dict[str, Any]) -> str:
        lo = _size(s, "minLength")
        hi = int(s["maxLength"]) if "maxLength" in s else 1 << 30
        if lo > hi:
            raise SchemaUnsupported(f"minLength {lo} > maxLength {hi}")
        if "pattern" in s:
            for _ in range(10):
                try:
                    value = generate_regex(s["pattern"], self.rng)
                except RegexUnsupported as exc:
                    raise SchemaUnsupported(str(exc)) from None
                if lo <= len(value) <= hi:
                    return value
            raise SchemaUnsupported("could not satisfy pattern together with min/maxLength")
        value = self._format(s.get("format")) or self._words(1, 3)
        while len(value) < lo:
            value += " " + self._words(1, 2)
        if len(value) > hi:
            value = value[:hi].rstrip() if len(value[:hi].rstrip()) >= lo else value[:hi]
        return value

    def _format(self, fmt: Any) -> str | None:
        r = self.rng
        if fmt == "date":
            return f"20{r.randint(10, 29)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}"
        if fmt == "date-time":
            return (
                f"20{r.randint(10, 29)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}"
                f"T{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}Z"
            )
        if fmt == "time":
            return f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}Z"
        if fmt == "email":
            return f"{r.choice(_WORDS)}@example.com"
        if fmt == "uuid":
            h = f"{r.getrandbits(128):032x}"
            return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:32]}"
        if fmt in ("uri", "url"):
            return f"https://example.com/{r.choice(_WORDS)}"
        if fmt == "ipv4":
            return ".".join(str(r.randint(1, 254)) for _ in range(4))
        if fmt == "hostname":
            return f"{r.choice(_WORDS)}.example.com"
        return None

    def _bounds(self, s: dict[str, Any], integer: bool) -> tuple[float, float]:
        lo: float = -math.inf
        hi: float = math.inf
        step = 1 if integer else 0.01
        if "minimum" in s:
            lo = s["minimum"]
        if "exclusiveMinimum" in s and not isinstance(s["exclusiveMinimum"], bool):
            lo = max(lo, s["exclusiveMinimum"] + step)
        if "maximum" in s:
            hi = s["maximum"]
        if "exclusiveMaximum" in s and not isinstance(s["exclusiveMaximum"], bool):
            hi = min(hi, s["exclusiveMaximum"] - step)
        if lo == -math.inf:
            lo = min(0, hi - 100) if hi != math.inf else 0
        if hi == math.inf:
            hi = lo + 100
        if lo > hi:
            raise SchemaUnsupported(f"numeric bounds are empty (minimum {lo} > maximum {hi})")
        return lo, hi

    def _integer(self, s: dict[str, Any]) -> int:
        lo, hi = self._bounds(s, integer=True)
        ilo, ihi = math.ceil(lo), math.floor(hi)
        mult = s.get("multipleOf")
        if mult:
            klo, khi = math.ceil(ilo / mult), math.floor(ihi / mult)
            if klo > khi:
                raise SchemaUnsupported("no multiple of multipleOf within the bounds")
            return self.rng.randint(klo, khi) * mult
        if ilo > ihi:
            raise SchemaUnsupported("no integer within the bounds")
        return self.rng.randint(ilo, ihi)

    def _number(self, s: dict[str, Any]) -> float | int:
        if s.get("multipleOf"):
            return self._integer(s)
        lo, hi = self._bounds(s, integer=False)
        value = round(self.rng.uniform(lo, hi), 2)
        return value if lo <= value <= hi else lo

    # -- containers -----------------------------------------------------------------
    def _object(self, s: dict[str, Any], depth: int) -> dict[str, Any]:
        props: dict[str, Any] = s.get("properties") or {}
        required = list(s.get("required") or [])
        extra = s.get("additionalProperties", True)
        chosen = list(required)
        if depth < _SOFT_DEPTH:
            chosen += [k for k in props if k not in required and self.rng.random() < 0.5]
        lo = _size(s, "minProperties")
        hi = int(s.get("maxProperties", 1 << 30))
        for k in props:  # top up to minProperties with optional properties
            if len(chosen) >= lo:
                break
            if k not in chosen:
                chosen.append(k)
        if not props and extra is not False and not required and depth < _SOFT_DEPTH:
            lo = max(lo, self.rng.randint(1, 3))  # a bare {"type": "object"}
        i = 0
        while len(chosen) < lo:
            if extra is False:
                raise SchemaUnsupported("minProperties cannot be met without extra properties")
            word = self.rng.choice(_WORDS)
            key = word if not props and i < len(_WORDS) else f"{word}_{i}"
            if key not in chosen and key not in props:
                chosen.append(key)
            i += 1
        while len(chosen) > hi:
            optional = [k for k in chosen if k not in required]
            if not optional:
                raise SchemaUnsupported("maxProperties is below the number of required ones")
            chosen.remove(optional[-1])
        order = {k: i for i, k in enumerate(props)}
        chosen.sort(key=lambda k: order.get(k, len(order)))
        out: dict[str, Any] = {}
        for key in chosen:
            if key in props:
                sub = props[key]
            elif isinstance(extra, dict):
                sub = extra
            else:
                sub = {"type": self.rng.choice(["string", "integer"])}
            out[key] = self._gen(sub, depth + 1)
        return out

    def _array(self, s: dict[str, Any], depth: int) -> list[Any]:
        items = s.get("items", {})
        lo = _size(s, "minItems")
        hi = int(s.get("maxItems", lo + 3))
        if lo > hi:
            raise SchemaUnsupported(f"minItems {lo} > maxItems {hi}")
        if depth >= _SOFT_DEPTH:
            count = lo
        else:
            base = max(lo, 1) if hi >= 1 else 0
            count = self.rng.randint(base, min(hi, base + 2))
        out: list[Any] = []
        seen: set[str] = set()
        attempts = 0
        while len(out) < count:
            value = self._gen(items, depth + 1)
            attempts += 1
            if s.get("uniqueItems"):
                key = json.dumps(value, sort_keys=True)
                if key in seen:
                    if attempts > 20 * count + 20:
                        raise SchemaUnsupported("could not generate enough unique items")
                    continue
                seen.add(key)
            out.append(value)
        return out

    # -- validation (for oneOf: the value must match exactly one branch) -------------
    def valid(self, value: Any, s: Any) -> bool:
        if s is True or s == {}:
            return True
        if s is False:
            return False
        if "$ref" in s:
            rest = {k: v for k, v in s.items() if k != "$ref"}
            if not self.valid(value, _ref_target(self.root, s["$ref"])):
                return False
            return self.valid(value, rest) if rest else True
        if "const" in s and value != s["const"]:
            return False
        if "enum" in s and value not in s["enum"]:
            return False
        if "anyOf" in s and not any(self.valid(value, b) for b in s["anyOf"]):
            return False
        if "oneOf" in s and sum(self.valid(value, b) for b in s["oneOf"]) != 1:
            return False
        t = s.get("type")
        if t is not None and not any(
            _is_type(value, x) for x in (t if isinstance(t, list) else [t])
        ):
            return False
        return self._valid_keywords(value, s)

    def _valid_keywords(self, value: Any, s: dict[str, Any]) -> bool:
        if isinstance(value, str):
            if not s.get("minLength", 0) <= len(value) <= s.get("maxLength", math.inf):
                return False
            if "pattern" in s and not re.search(s["pattern"], value):
                return False
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value < s.get("minimum", -math.inf) or value > s.get("maximum", math.inf):
                return False
            if "exclusiveMinimum" in s and value <= s["exclusiveMinimum"]:
                return False
            if "exclusiveMaximum" in s and value >= s["exclusiveMaximum"]:
                return False
            if s.get("multipleOf") and value % s["multipleOf"] != 0:
                return False
        if isinstance(value, list):
            if not s.get("minItems", 0) <= len(value) <= s.get("maxItems", math.inf):
                return False
            items = s.get("items")
            if items is not None and not all(self.valid(v, items) for v in value):
                return False
        if isinstance(value, dict):
            props = s.get("properties") or {}
            if any(k not in value for k in s.get("required") or []):
                return False
            extra = s.get("additionalProperties", True)
            for k, v in value.items():
                if k in props:
                    if not self.valid(v, props[k]):
                        return False
                elif extra is False or (isinstance(extra, dict) and not self.valid(v, extra)):
                    return False
        return True


def _size(s: dict[str, Any], key: str) -> int:
    value = int(s.get(key, 0))
    if value > _MAX_SIZE:
        raise SchemaUnsupported(f"{key} {value} is larger than the simulator generates")
    return value


def _is_type(value: Any, t: str) -> bool:
    if t == "null":
        return value is None
    if t == "boolean":
        return isinstance(value, bool)
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t == "string":
        return isinstance(value, str)
    if t == "array":
        return isinstance(value, list)
    if t == "object":
        return isinstance(value, dict)
    return False
