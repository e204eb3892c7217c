"""Tool calling through the official `openai` SDK and LangChain against the API on a real
uvicorn server on 127.0.0.1 (SmolLM2, greedy): the conformance cases of
`stamen.conformance.openai_tools`, and what this server promises beyond them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jsonschema
import openai
import pytest

from stamen.conformance import openai_tools
from stamen.conformance.openai import Suite
from tests.integration.test_api_server import served  # noqa: F401  (the fixture)
from tests.unit.test_api_app import load_engine_once

DEFAULT_RUN = {"tools_required", "tools_stream", "tools_errors"}  # the rest: slow


@pytest.fixture(scope="module")
def suite(served: tuple[str, Any]) -> Iterator[Suite]:  # noqa: F811
    root, engine = served
    base_url = f"{root}/v1"
    client = openai.OpenAI(base_url=base_url, api_key="none", timeout=120, max_retries=0)
    yield Suite(
        client, lambda: openai.AsyncOpenAI(base_url=base_url, api_key="none"), engine.model_id
    )
    client.close()


def _cases() -> list[Any]:
    return [
        pytest.param(check, id=name, marks=() if name in DEFAULT_RUN else pytest.mark.slow)
        for name, check in openai_tools.CHECKS
    ]


@pytest.mark.parametrize("check", _cases())
def test_conformance_case(suite: Suite, check: Callable[[Suite], None]) -> None:
    check(suite)


@pytest.mark.slow
def test_calls_validate_against_the_full_schema_and_choices_are_independent(
    suite: Suite,
) -> None:
    response = openai_tools.tool_chat(suite, tool_choice="required", n=2, temperature=1.0,
                                      seed=7, messages=openai_tools.TWO_QUESTIONS)  # fmt: skip
    assert [choice.index for choice in response.choices] == [0, 1]
    for choice in response.choices:
        for call in openai_tools.expect_calls(choice):
            schema = openai_tools.PARAMETERS[call.function.name]
            jsonschema.validate(openai_tools.expect_valid_arguments(
                call.function.name, call.function.arguments), schema)  # fmt: skip


@pytest.mark.slow
def test_parallel_tool_calls_decides_whether_a_second_call_may_follow(suite: Suite) -> None:
    # With EOS banned, a choice that may call again must; one that may not still ends
    # (its grammar allows only EOS after the call: the mask outranks the bias).
    no_eos = {"logit_bias": {str(token): -100 for token in load_engine_once().eos_token_ids}}
    several = openai_tools.tool_chat(suite, tool_choice="required", parallel_tool_calls=True,
                                     **no_eos).choices[0]  # fmt: skip
    assert several.finish_reason == "length" and len(several.message.tool_calls) >= 2
    for call in several.message.tool_calls[:2]:
        openai_tools.expect_valid_arguments(call.function.name, call.function.arguments)
    one = openai_tools.tool_chat(suite, tool_choice="required", parallel_tool_calls=False,
                                 **no_eos).choices[0]  # fmt: skip
    assert len(openai_tools.expect_calls(one)) == 1


FEW_SHOT: Any = [
    {"role": "user", "content": "What is the weather in Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
     "function": {"name": "get_weather", "arguments": '{"city": "Rome", "unit": "celsius"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "20 degrees"},
    {"role": "assistant", "content": "It is 20 degrees in Rome."},
    *openai_tools.QUESTION,
]  # fmt: skip


@pytest.mark.slow
def test_auto_constrains_the_call_the_model_starts(suite: Suite) -> None:
    """Taught by the conversation, the model starts a call under `auto`: the trigger
    switches the grammar on, and the call comes back parsed, not as content."""
    choice = openai_tools.tool_chat(suite, tool_choice="auto", messages=FEW_SHOT).choices[0]
    calls = openai_tools.expect_calls(choice)
    assert [call.function.name for call in calls] == ["get_weather"]
    assert openai_tools.expect_valid_arguments("get_weather", calls[0].function.arguments)[
        "city"] == "Paris"  # fmt: skip


@pytest.mark.slow
def test_langchain_bind_tools_gets_tool_calls(suite: Suite) -> None:
    from langchain_openai import ChatOpenAI

    base_url = str(suite.client.base_url).rstrip("/")
    chat = ChatOpenAI(base_url=base_url, api_key="none", model=suite.model, temperature=0,
                      max_tokens=openai_tools.MAX_TOKENS)  # fmt: skip
    bound = chat.bind_tools([openai_tools.WEATHER], tool_choice="required")
    message = bound.invoke("What is the weather in Paris?")
    assert [call["name"] for call in message.tool_calls] == ["get_weather"]
    arguments = message.tool_calls[0]["args"]
    jsonschema.validate(arguments, openai_tools.WEATHER_PARAMETERS)
    assert message.tool_calls[0]["id"].startswith("call_")
