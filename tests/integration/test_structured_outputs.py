"""Structured outputs through the official `openai` SDK: SmolLM2's answers parse and
validate (`jsonschema`, formats checked) against every schema of tests/data/json_schemas.py.

The default run takes a few schemas (one streamed) and the structured conformance checks
on the in-process engine behind uvicorn; the whole set, streamed and not, runs over the
real swarm of test_api_swarm (three host processes) and is marked slow. An answer cut by
the token limit fails: the schemas are bounded so that a correct server never hits it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import openai
import pytest

from stamen.conformance.openai import Suite
from stamen.conformance.openai_structured import CHECKS
from tests.data.json_schemas import MAX_TOKENS, SCHEMAS
from tests.integration.test_api_server import served  # noqa: F401 (a fixture)
from tests.integration.test_api_swarm import MODEL_ID, Stack, stack  # noqa: F401 (a fixture)

logger = logging.getLogger(__name__)

SYSTEM = "Answer in JSON."
DEFAULT_RUN = ["person", "enum_int", "email", "any_of_objects", "nested_refs"]
STREAMED_IN_DEFAULT_RUN = "email"
SLOW_WORKERS = 4  # concurrent requests: the swarm serves them side by side


def response_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def ask(
    client: openai.OpenAI, model: str, name: str, prompt: str, schema: dict[str, Any],
    *, stream: bool, n: int = 1,
) -> list[tuple[str, str | None]]:  # fmt: skip
    """(text, finish_reason) of each choice."""
    kwargs: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "response_format": response_format(name, schema),
        "n": n,
    }
    kwargs.update({"temperature": 0} if n == 1 else {"temperature": 0.8, "seed": 1})
    if not stream:
        response = client.chat.completions.create(**kwargs)
        return [(c.message.content or "", c.finish_reason) for c in response.choices]
    texts: dict[int, list[str]] = {}
    finishes: dict[int, str | None] = {}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            texts.setdefault(choice.index, []).append(choice.delta.content or "")
            if choice.finish_reason is not None:
                finishes[choice.index] = choice.finish_reason
    return [("".join(texts[i]), finishes.get(i)) for i in sorted(texts)]


def problems(name: str, schema: dict[str, Any], answers: list[tuple[str, str | None]]) -> list[str]:
    """What is wrong with the answers to one schema (nothing, for a correct server)."""
    out = []
    validator = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    for text, finish_reason in answers:
        if finish_reason != "stop":
            out.append(f"{name}: finish_reason {finish_reason!r} (cut?): {text!r}")
            continue
        try:
            value = json.loads(text)
        except ValueError as error:
            out.append(f"{name}: not JSON ({error}): {text!r}")
            continue
        errors = [e.message for e in validator.iter_errors(value)]
        if errors:
            out.append(f"{name}: {errors[0]}: {text!r}")
    return out


def client_for(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", timeout=600, max_retries=0)


@pytest.fixture(scope="module")
def local(served: tuple[str, Any]) -> Iterator[tuple[openai.OpenAI, str]]:  # noqa: F811
    base_url, engine = served
    client = client_for(base_url)
    yield client, engine.model_id
    client.close()


# -- the default run: the in-process engine ------------------------------------------------


@pytest.mark.parametrize("name", DEFAULT_RUN)
def test_answers_validate_against_the_schema(local: tuple[openai.OpenAI, str], name: str) -> None:
    client, model = local
    prompt, schema = next((p, s) for n, p, s in SCHEMAS if n == name)
    answers = ask(client, model, name, prompt, schema, stream=name == STREAMED_IN_DEFAULT_RUN)
    assert not problems(name, schema, answers)


@pytest.mark.slow  # the schemas above and the 400s below are the default run's share
@pytest.mark.parametrize(("check_name", "check"), CHECKS, ids=[c[0] for c in CHECKS])
def test_structured_conformance_checks(local: tuple[openai.OpenAI, str], check_name: str, check: Any) -> None:  # fmt: skip
    client, model = local
    check(Suite(client, None, model))


BAD_FORMATS: list[tuple[str, Any, str]] = [
    ("invalid schema", response_format("t", {"type": "object", "properties": {"a": {"type": 7}}}),
     "invalid_json_schema"),
    ("schema not an object", response_format("t", ["a"]), "invalid_json_schema"),  # type: ignore[arg-type]
    ("unsupported feature", response_format("t", {"type": "array", "uniqueItems": True}),
     "unsupported_parameter"),
    ("wrong type", {"type": "yaml"}, "invalid_value"),
    ("bad name", response_format("no spaces allowed", {"type": "object"}), "invalid_value"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "body", "code"), BAD_FORMATS, ids=[b[0] for b in BAD_FORMATS])
def test_bad_response_formats_are_400_in_openai_shape(
    local: tuple[openai.OpenAI, str], what: str, body: Any, code: str
) -> None:
    client, model = local
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], response_format=body
        )
    assert caught.value.status_code == 400
    assert caught.value.code == code
    assert str(caught.value.param).startswith("response_format")
    with pytest.raises(openai.BadRequestError):  # the completions extension refuses it too
        client.completions.create(model=model, prompt="Hi", extra_body={"response_format": body})


def test_completions_take_response_format_as_an_extension(local: tuple[openai.OpenAI, str]) -> None:
    client, model = local
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}  # fmt: skip
    response = client.completions.create(
        model=model, prompt="A digit in JSON:", max_tokens=40, temperature=0, n=2,
        extra_body={"response_format": response_format("digit", schema)},
    )  # fmt: skip
    assert not problems("digit", schema, [(c.text, c.finish_reason) for c in response.choices])


# -- the whole set over the swarm ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(2400)  # 114 requests, 4 at a time, on a busy 2-core machine
def test_every_schema_validates_over_the_swarm_streamed_and_not(stack: Stack) -> None:  # noqa: F811
    client = client_for(stack.base_url)

    def one(case: tuple[str, str, dict[str, Any], bool]) -> list[str]:
        name, prompt, schema, stream = case
        started = time.perf_counter()
        try:  # whole answers with n=2 sampled; streamed greedy
            answers = ask(
                client, MODEL_ID, name, prompt, schema, stream=stream, n=1 if stream else 2
            )
        except openai.APIError as error:
            return [f"{name} (stream={stream}): {error!r}"]
        found = problems(name, schema, answers)
        logger.info("%s stream=%s: %.1f s, %s", name, stream, time.perf_counter() - started,
                    found or "valid")  # fmt: skip
        return found

    cases = [(n, p, s, stream) for n, p, s in SCHEMAS for stream in (False, True)]
    with ThreadPoolExecutor(SLOW_WORKERS) as pool:
        found = [p for ps in pool.map(one, cases) for p in ps]
    client.close()
    assert not found, "\n".join(found)
