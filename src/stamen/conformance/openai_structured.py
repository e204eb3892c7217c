"""Structured-output cases of the OpenAI contract suite, through the official `openai` SDK.

What a user of `response_format` relies on, against any server: `json_object` gives a
JSON object; `json_schema` with `strict: true` gives JSON that validates against the
schema, streamed and not (the same text both ways, greedy); a schema feature the server
cannot enforce, or a `response_format` of an unknown type, is a 400 in OpenAI's shape
and never a 500 or an unconstrained answer.

The schema is small and fully bounded (short strings, few items), so a correct server
finishes it with `finish_reason == "stop"` well inside `MAX_TOKENS`; it is checked by
hand here so that the suite needs nothing beyond the SDK.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from stamen.conformance.openai import CheckFailed, Suite, expect

MAX_TOKENS = 200
PETS = ["cat", "dog", "fish"]
PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": PETS}, "maxItems": 3},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}
PERSON_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True},
}
PERSON_PROMPT = [
    {"role": "system", "content": "Answer in JSON."},
    {"role": "user", "content": "Describe a person and their pets."},
]


def _json(text: str, finish_reason: str | None) -> Any:
    expect(finish_reason == "stop", f"finish_reason {finish_reason!r} for {text!r}")
    try:
        return json.loads(text)
    except ValueError as error:
        raise CheckFailed(f"not JSON ({error}): {text!r}") from error


def _check_person(value: Any) -> None:
    """PERSON_SCHEMA, checked by hand."""
    expect(isinstance(value, dict), f"not an object: {value!r}")
    expect(set(value) == {"name", "age", "pets"}, f"keys {sorted(value)}")
    name, age, pets = value["name"], value["age"], value["pets"]
    expect(isinstance(name, str) and len(name) <= 20, f"name {name!r}")
    expect(type(age) is int and 0 <= age <= 120, f"age {age!r}")
    expect(isinstance(pets, list) and len(pets) <= 3, f"pets {pets!r}")
    expect(all(pet in PETS for pet in pets), f"pets {pets!r}")


def _stream_text(suite: Suite, **kwargs: Any) -> tuple[str, str | None]:
    chunks = list(suite.client.chat.completions.create(model=suite.model, stream=True, **kwargs))
    choices = [c.choices[0] for c in chunks if c.choices]
    expect(bool(choices), "an empty stream")
    text = "".join(choice.delta.content or "" for choice in choices)
    return text, choices[-1].finish_reason


def check_json_object(suite: Suite) -> None:
    response = suite.chat(
        messages=[
            {"role": "system", "content": "Answer in JSON."},
            {"role": "user", "content": "Give the name and the age of a person, in JSON."},
        ],
        temperature=0,
        max_tokens=MAX_TOKENS,
        response_format={"type": "json_object"},
    )
    choice = response.choices[0]
    value = _json(choice.message.content or "", choice.finish_reason)
    expect(isinstance(value, dict), f"json_object gave a {type(value).__name__}")


def check_json_schema_strict(suite: Suite) -> None:
    response = suite.chat(
        messages=PERSON_PROMPT,
        temperature=0,
        max_tokens=MAX_TOKENS,
        response_format=PERSON_FORMAT,
    )
    choice = response.choices[0]
    _check_person(_json(choice.message.content or "", choice.finish_reason))
    expect(response.usage.completion_tokens < MAX_TOKENS, f"usage {response.usage}")


def check_json_schema_strict_stream(suite: Suite) -> None:
    kwargs: dict[str, Any] = {
        "messages": PERSON_PROMPT,
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "response_format": PERSON_FORMAT,
    }
    text, finish_reason = _stream_text(suite, **kwargs)
    _check_person(_json(text, finish_reason))
    whole = suite.chat(**kwargs).choices[0].message.content
    expect(text == whole, f"streamed {text!r} but whole {whole!r}")


def check_json_schema_n(suite: Suite) -> None:
    """Every choice follows the schema on its own (sampled, so they may differ)."""
    response = suite.chat(
        messages=PERSON_PROMPT,
        n=2,
        temperature=1,
        seed=5,
        max_tokens=MAX_TOKENS,
        response_format=PERSON_FORMAT,
    )
    expect(len(response.choices) == 2, f"{len(response.choices)} choices")
    for choice in response.choices:
        _check_person(_json(choice.message.content or "", choice.finish_reason))


def check_unsupported_schema_feature(suite: Suite) -> None:
    """A keyword that cannot be enforced under strict mode (here `not`) is a 400."""
    schema = {"type": "object", "properties": {"x": {"not": {"type": "string"}}}}
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "negated", "schema": schema, "strict": True},
    }
    suite.expect_status(400, lambda: suite.chat(response_format=response_format))


def check_bad_response_format(suite: Suite) -> None:
    suite.expect_status(400, lambda: suite.chat(response_format={"type": "xml"}))
    bad_schema = {"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "nope"}}}
    suite.expect_status(400, lambda: suite.chat(response_format=bad_schema))


CHECKS: list[tuple[str, Callable[[Suite], None]]] = [
    ("structured_json_object", check_json_object),
    ("structured_json_schema_strict", check_json_schema_strict),
    ("structured_json_schema_strict_stream", check_json_schema_strict_stream),
    ("structured_json_schema_n", check_json_schema_n),
    ("structured_unsupported_feature_400", check_unsupported_schema_feature),
    ("structured_bad_response_format_400", check_bad_response_format),
]
