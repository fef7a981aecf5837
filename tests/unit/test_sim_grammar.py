"""Structured output: JSON Schema and regex generation, validated independently."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from ha_agent.sim.grammar import (
    GrammarError,
    compile_constraint,
    constraint_from_response_format,
    generate_constrained,
)

SCHEMAS: dict[str, dict] = {
    "flat": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 3, "maxLength": 12},
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "active": {"type": "boolean"},
            "nothing": {"type": "null"},
        },
        "required": ["name", "age", "score", "active"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "format": "uuid"},
                    "email": {"type": "string", "format": "email"},
                    "tags": {
                        "type": "array",
                        "items": {"type": "string", "enum": ["a", "b", "c"]},
                        "minItems": 2,
                        "maxItems": 3,
                        "uniqueItems": True,
                    },
                },
                "required": ["id", "email", "tags"],
            },
            "kind": {"const": "person"},
            "level": {"enum": [1, 2, "three", None]},
        },
        "required": ["user", "kind", "level"],
    },
    "refs_and_unions": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                "required": ["x", "y"],
                "additionalProperties": False,
            },
            "node": {
                "type": "object",
                "properties": {
                    "value": {"type": "integer", "multipleOf": 5},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                },
                "required": ["value"],
            },
        },
        "type": "object",
        "properties": {
            "where": {"$ref": "#/$defs/point"},
            "tree": {"$ref": "#/$defs/node"},
            "either": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            "exactly": {"oneOf": [{"type": "string", "maxLength": 3}, {"type": "boolean"}]},
            "maybe": {"type": ["string", "null"]},
            "code": {"type": "string", "pattern": "^[A-Z]{3}-\\d{4}$"},
        },
        "required": ["where", "tree", "either", "exactly", "maybe", "code"],
    },
    "top_level_array": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"d": {"type": "string", "format": "date"}},
            "required": ["d"],
        },
        "minItems": 1,
    },
    "pydantic_style": {
        "definitions": {"Color": {"enum": ["red", "green"], "title": "Color", "type": "string"}},
        "title": "Model",
        "type": "object",
        "properties": {
            "color": {"$ref": "#/definitions/Color"},
            "n": {"title": "N", "type": "integer"},
        },
        "required": ["color", "n"],
    },
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_output_is_valid_json_and_valid_against_schema(name: str) -> None:
    schema = SCHEMAS[name]
    constraint = compile_constraint(json.dumps(schema), None, None)
    assert constraint is not None
    outputs = set()
    for seed in range(25):
        text = generate_constrained(constraint, f"prompt-{seed}".encode())
        validator = jsonschema.Draft202012Validator(
            schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
        )
        validator.validate(json.loads(text))
        assert len(text) < 600  # small documents, they must fit ordinary max_tokens
        outputs.add(text)
    assert len(outputs) > 1  # the seed matters
    assert generate_constrained(constraint, b"same") == generate_constrained(constraint, b"same")


def test_json_object_response_format() -> None:
    spec = constraint_from_response_format({"type": "json_object"})
    constraint = compile_constraint(spec, None, None)
    value = json.loads(generate_constrained(constraint, b"x"))
    assert isinstance(value, dict) and value


@pytest.mark.parametrize(
    "pattern",
    [
        r"\d{3}-\d{2}-\d{4}",
        r"(yes|no|maybe)",
        r"[A-Z][a-z]{2,5}( [A-Z][a-z]+)?",
        r"[^aeiou\s]{4}\.\w+",
        r"(0x[0-9a-f]{2,4}|#\d+)*",
        r"\s?[a-c]+?b*\b.",
        r"^(?:https?://)[a-z]+\.(com|org)/?$",
    ],
)
def test_regex_output_fullmatches(pattern: str) -> None:
    constraint = compile_constraint(None, pattern, None)
    for seed in range(20):
        text = generate_constrained(constraint, f"s{seed}".encode())
        assert re.fullmatch(pattern, text), (pattern, text)


@pytest.mark.parametrize(
    ("json_schema", "regex", "ebnf", "needle"),
    [
        (None, r"(?=abc)abc", None, "lookahead"),
        (None, r"(a)\1", None, "backreferences"),
        (None, r"(", None, "invalid regex"),
        (None, None, "root ::= 'a'", "ebnf"),
        ('{"type": "object", "patternProperties": {}}', None, None, "patternProperties"),
        ('{"type": "strange"}', None, None, "strange"),
        ("{not json", None, None, "not valid JSON"),
        ('{"$ref": "#/$defs/missing"}', None, None, "does not resolve"),
        ('{"type": "string"}', "a", None, "Only one of"),
    ],
)
def test_unsupported_constraints_are_clear_errors(
    json_schema: str | None, regex: str | None, ebnf: str | None, needle: str
) -> None:
    with pytest.raises(GrammarError, match=re.escape(needle)):
        compile_constraint(json_schema, regex, ebnf)


def test_a_nested_regex_is_generated_only_as_far_as_the_token_budget() -> None:
    """SGLang decodes a grammar token by token up to max_new_tokens; it never expands
    `(?:a{1000}){1000}` whole. The simulator stops at the budget likewise."""
    import time

    from ha_agent.sim.grammar import compile_constraint, generate_constrained

    constraint = compile_constraint(None, "(?:a{1000}){1000}", None)
    assert constraint is not None
    started = time.perf_counter()
    text = generate_constrained(constraint, b"seed", max_chars=17 * 16)
    assert time.perf_counter() - started < 0.05
    assert text == "a" * (17 * 16)
    assert generate_constrained(constraint, b"seed") == "a" * 1_000_000  # unbounded: whole
