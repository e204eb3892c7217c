"""Prompts of requests with tools, through SmolLM2's tokenizer: its own template (no
tools: the generic section) and a Hermes-style template that renders tools itself."""

from __future__ import annotations

import copy
from typing import Any

import msgspec
import pytest

from stamen.api import schemas as s
from stamen.api import tools
from stamen.api.errors import APIError
from stamen.api.serving import render_chat
from tests.unit.test_api_app import load_engine_once
from tests.unit.test_api_tools import WEATHER

# Enough of a template that renders tools (as Qwen2.5's and Hermes' do) to tell what it got.
HERMES = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }}"
    "{{ c.function.arguments | tojson }}</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

FOLLOW_UP: Any = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "25 C"},
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_engine_once().tokenizer


def prompt(tokenizer: Any, messages: Any, **fields: Any) -> str:
    request = msgspec.convert(
        {"model": "m", "messages": messages, "tools": [WEATHER], **fields},
        s.ChatCompletionRequest,
    )
    ids = render_chat(tokenizer, request.messages, tools.parse_tools(request))
    return str(tokenizer.decode(ids))


def test_a_template_without_tools_gets_the_generic_section(tokenizer: Any) -> None:
    assert not tools.native_template(tokenizer)
    text = prompt(tokenizer, [{"role": "system", "content": "Be brief."}, FOLLOW_UP[0]])
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert '"name": "get_weather"' in text and '"required": ["city"]' in text
    assert text.count("<|im_start|>system") == 1


def test_tool_choice_none_does_not_describe_the_tools(tokenizer: Any) -> None:
    assert "# Tools" not in prompt(tokenizer, FOLLOW_UP[:1], tool_choice="none")


def test_a_follow_up_turn_shows_the_calls_and_their_results(tokenizer: Any) -> None:
    text = prompt(tokenizer, FOLLOW_UP)
    assert (
        '<|im_start|>assistant\n<tool_call>{"name": "get_weather", "arguments": {"city": '
        '"Paris"}}</tool_call>\n<tool_call>{"name": "get_weather", "arguments": {"city": '
        '"Rome"}}</tool_call><|im_end|>'
    ) in text
    # Both results in one user turn, in the order of the calls.
    assert (
        "<|im_start|>user\nThe function get_weather returned: 18 C\n"
        "The function get_weather returned: 25 C<|im_end|>\n<|im_start|>assistant\n"
    ) in text


def test_a_result_must_answer_an_earlier_call(tokenizer: Any) -> None:
    stray = [FOLLOW_UP[0], {"role": "tool", "tool_call_id": "call_9", "content": "x"}]
    with pytest.raises(APIError) as caught:
        prompt(tokenizer, stray)
    assert caught.value.param == "messages[1].tool_call_id"
    bad_call: Any = [FOLLOW_UP[0], {"role": "assistant", "tool_calls": [{"id": "c"}]}]
    with pytest.raises(APIError) as caught:
        prompt(tokenizer, bad_call)
    assert caught.value.param == "messages[1].tool_calls[0]"


def test_a_template_that_renders_tools_gets_them_and_the_calls(tokenizer: Any) -> None:
    hermes = copy.copy(tokenizer)
    hermes.chat_template = HERMES
    assert tools.native_template(hermes)
    text = prompt(hermes, FOLLOW_UP)
    assert text.startswith("<tools>get_weather;</tools>")  # the template got `tools=`
    assert "# Tools" not in text
    # Arguments reach the template as objects, results as "tool" turns.
    assert '<tool_call>get_weather{"city": "Paris"}</tool_call>' in text
    assert "<|im_start|>tool\n25 C<|im_end|>" in text
    assert not tools.native_template(tokenizer)  # the shared tokenizer is untouched


def job(**fields: Any) -> Any:
    from stamen.api.serving import chat_job

    request = msgspec.convert(
        {"model": "m", "messages": FOLLOW_UP[:1], "tools": [WEATHER], **fields},
        s.ChatCompletionRequest,
    )
    return chat_job(request, load_engine_once(), max_n=4, default_max_tokens=16)


def odd_tool(name: str, strict: bool, city: dict[str, Any]) -> dict[str, Any]:
    parameters = {"type": "object", "properties": {"city": city}}
    return {"type": "function", "function": {"name": name, "parameters": parameters,
            "strict": strict}}  # fmt: skip


def test_a_schema_llguidance_refuses_is_a_400_naming_its_tool() -> None:
    with pytest.raises(APIError) as caught:
        job(tools=[WEATHER, odd_tool("f", False, {"type": "nonsense"})])
    assert caught.value.param == "tools[1].function.parameters"
    assert "Invalid schema for function 'f'" in caught.value.message


def test_strict_holds_a_schema_to_the_letter_and_lenient_leaves_out_what_it_cannot() -> None:
    unknown_format = {"type": "string", "format": "postal-address"}
    assert job(tools=[WEATHER, odd_tool("f", False, unknown_format)]).tools is not None
    with pytest.raises(APIError) as caught:
        job(tools=[WEATHER, odd_tool("f", True, unknown_format)])
    assert caught.value.param == "tools[1].function.parameters"


def test_tools_with_a_json_format_are_refused_unless_tool_choice_is_none() -> None:
    json_format = {"type": "json_object"}
    with pytest.raises(APIError) as caught:
        job(response_format=json_format)
    assert caught.value.param == "response_format"
    none = job(response_format=json_format, tool_choice="none")
    assert none.tools is None and none.constraint is not None  # the format applies
    assert job().constraint is not None and job(tool_choice="none").constraint is None
