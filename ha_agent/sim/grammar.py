"""Structured output: ``json_schema`` / ``regex`` sampling params and OpenAI ``response_format``.

A constrained request's whole output is chosen up front (seeded by the request), then
streamed token by token like any generation, and ends with EOS as a grammar-constrained
engine does. ``max_new_tokens`` can still cut it short (``finish_reason`` length), as on
SGLang. Constrained output is *not* prefix-consistent under continuation; the relay does
not migrate such requests.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any

from ha_agent.sim.regex_gen import RegexUnsupported, generate_regex, validate_regex
from ha_agent.sim.schema_gen import SchemaGenerator, SchemaUnsupported, check_schema

# What SGLang sends for response_format {"type": "json_object"} (serving_chat.py).
JSON_OBJECT_SCHEMA = '{"type": "object"}'


class GrammarError(ValueError):
    """A constraint the simulator cannot honour; the request answers 400."""


@dataclass(frozen=True)
class Constraint:
    key: str  # the request key that carried it: "json_schema" or "regex"
    spec: str
    schema: Any = None  # parsed JSON Schema for key == "json_schema"


def compile_constraint(
    json_schema: str | None, regex: str | None, ebnf: str | None
) -> Constraint | None:
    """Validate the (at most one) constraint eagerly, so errors are 400s, not stream errors."""
    if sum(x is not None for x in (json_schema, regex, ebnf)) > 1:
        raise GrammarError("Only one of regex, json_schema, or ebnf can be set.")
    if ebnf is not None:
        raise GrammarError("ebnf constraints are not supported by the simulator")
    if regex is not None:
        try:
            validate_regex(regex)
        except RegexUnsupported as exc:
            raise GrammarError(str(exc)) from None
        return Constraint("regex", regex)
    if json_schema is not None:
        try:
            schema = json.loads(json_schema)
        except (TypeError, ValueError) as exc:
            raise GrammarError(f"json_schema is not valid JSON: {exc}") from None
        try:
            check_schema(schema)
        except SchemaUnsupported as exc:
            raise GrammarError(str(exc)) from None
        return Constraint("json_schema", json_schema, schema)
    return None


def constraint_from_response_format(response_format: dict[str, Any] | None) -> str | None:
    """Map OpenAI ``response_format`` to SGLang's json_schema string, as SGLang does."""
    if not response_format:
        return None
    format_type = response_format.get("type")
    if format_type == "json_object":
        return JSON_OBJECT_SCHEMA
    if format_type == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is None:
            raise GrammarError("schema_ is required for json_schema response format request.")
        return json.dumps(schema)
    if format_type in (None, "text"):
        return None
    raise GrammarError(f"response_format type {format_type!r} is not supported by the simulator")


def generate_constrained(
    constraint: Constraint, seed_material: bytes, max_chars: int | None = None
) -> str:
    """The constrained output, deterministic in the request (prompt, seed, params);
    a regex's only as far as ``max_chars`` (what the token budget can hold)."""
    digest = hashlib.blake2b(seed_material, digest_size=8, person=b"sim-grammar-v1").digest()
    rng = random.Random(int.from_bytes(digest, "little"))
    try:
        if constraint.key == "regex":
            return generate_regex(constraint.spec, rng, max_chars)
        value = SchemaGenerator(constraint.schema, rng).generate()
    except (RegexUnsupported, SchemaUnsupported) as exc:
        raise GrammarError(str(exc)) from None
    return json.dumps(value, ensure_ascii=False)
