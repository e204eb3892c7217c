"""Tool-calling cases of the OpenAI contract suite, through the official `openai` SDK.

What a user of `tools` relies on, against any server: `tool_choice: "required"` and a
named function give calls (finish reason "tool_calls", content None, `call_` ids, type
"function", a tool's name, JSON arguments that validate against its parameters); with
`parallel_tool_calls: false` there is one call; streamed tool-call deltas (id, type and
name first with empty arguments, then argument fragments) reassemble to the calls of
the same request not streamed (greedy); a conversation that carries a call and its
result is answered; `auto` gives content or valid calls, never call markup as content;
`none` calls nothing; a malformed parameters schema, a `tool_choice` naming no tool and
a tool of an unknown type are 400s in OpenAI's shape.

The schemas are small and bounded (short strings, enums), so a correct server finishes
each call well inside `MAX_TOKENS`; arguments are checked by hand so that the suite
needs nothing beyond the SDK.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from stamen.conformance.openai import CheckFailed, Suite, expect

MAX_TOKENS = 120
WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": WEATHER_PARAMETERS,
        "strict": True,
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current local time in a city.",
        "parameters": TIME_PARAMETERS,
        "strict": True,
    },
}
TOOLS = [WEATHER, TIME]
PARAMETERS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
TWO_QUESTIONS = [
    {"role": "user", "content": "What is the weather in Paris, and what time is it in Tokyo?"}
]
CALL_MARKUP = "<tool_call>"


def tool_chat(suite: Suite, **kwargs: Any) -> Any:
    kwargs.setdefault("messages", QUESTION)
    kwargs.setdefault("tools", TOOLS)
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    return suite.client.chat.completions.create(model=suite.model, **kwargs)


def expect_valid_arguments(name: str, arguments: str) -> dict[str, Any]:
    """The arguments parse as JSON and validate against the tool's (bounded) schema."""
    try:
        value = json.loads(arguments)
    except ValueError as error:
        raise CheckFailed(f"{name}: arguments are not JSON: {arguments!r}") from error
    schema = PARAMETERS.get(name)
    expect(schema is not None, f"called an unknown function {name!r}")
    assert schema is not None
    expect(isinstance(value, dict), f"{name}: arguments {value!r} are not an object")
    properties = schema["properties"]
    expect(set(schema["required"]) <= set(value) <= set(properties),
           f"{name}: argument names {sorted(value)}")  # fmt: skip
    for key, item in value.items():
        spec = properties[key]
        if "enum" in spec:
            expect(item in spec["enum"], f"{name}.{key}: {item!r} not in {spec['enum']}")
        else:
            expect(isinstance(item, str) and len(item) <= spec["maxLength"],
                   f"{name}.{key}: {item!r}")  # fmt: skip
    return value


def expect_calls(choice: Any, *, at_least: int = 1) -> list[Any]:
    """A choice that called tools, in OpenAI's shape; its calls."""
    message = choice.message
    calls = message.tool_calls or []
    expect(len(calls) >= at_least, f"{len(calls)} tool calls, expected {at_least} or more")
    expect(choice.finish_reason == "tool_calls", f"finish_reason {choice.finish_reason!r}")
    expect(not message.content, f"content {message.content!r} beside the calls")
    for call in calls:
        expect(call.type == "function" and call.id.startswith("call_"), f"call {call}")
        expect_valid_arguments(call.function.name, call.function.arguments)
    expect(len({call.id for call in calls}) == len(calls), "two calls share an id")
    return list(calls)


# -- checks --------------------------------------------------------------------------------


def check_required(suite: Suite) -> None:
    response = tool_chat(suite, tool_choice="required", parallel_tool_calls=False)
    calls = expect_calls(response.choices[0])
    expect(len(calls) == 1, f"parallel_tool_calls false gave {len(calls)} calls")


def check_named(suite: Suite) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    calls = expect_calls(tool_chat(suite, tool_choice=choice).choices[0])
    expect(all(c.function.name == "get_time" for c in calls), "called another function")


def check_parallel(suite: Suite) -> None:
    response = tool_chat(suite, messages=TWO_QUESTIONS, tool_choice="required",
                         parallel_tool_calls=True)  # fmt: skip
    expect_calls(response.choices[0])


def _streamed_calls(chunks: list[Any]) -> tuple[str, list[tuple[str, str, str]], str | None]:
    """Content, (id, name, arguments) per call and the finish reason of a stream."""
    content, finish = "", None
    calls: list[list[str]] = []
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                if delta.id is not None:  # a call's first chunk
                    expect(delta.index == len(calls), f"call index {delta.index}")
                    expect(delta.type == "function" and bool(delta.function.name), f"{delta}")
                    expect(delta.function.arguments == "", "arguments on a call's first chunk")
                    calls.append([delta.id, delta.function.name, ""])
                else:
                    expect(delta.index < len(calls) and delta.function.name is None, f"{delta}")
                    calls[delta.index][2] += delta.function.arguments or ""
    return content, [(i, n, a) for i, n, a in calls], finish


def check_stream(suite: Suite) -> None:
    kwargs: dict[str, Any] = {"tool_choice": "required", "messages": TWO_QUESTIONS}
    whole = expect_calls(tool_chat(suite, **kwargs).choices[0])
    content, calls, finish = _streamed_calls(list(tool_chat(suite, stream=True, **kwargs)))
    expect(CALL_MARKUP not in content and not content.strip(), f"content {content!r}")
    expect(finish == "tool_calls", f"stream finish_reason {finish!r}")
    streamed = [(name, arguments) for _, name, arguments in calls]
    expected = [(c.function.name, c.function.arguments) for c in whole]
    expect(streamed == expected, f"streamed {streamed} != non-streamed {expected}")


def check_follow_up(suite: Suite) -> None:
    arguments = json.dumps({"city": "Paris", "unit": "celsius"})
    messages = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1",
         "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees celsius, sunny"},
    ]  # fmt: skip
    choice = tool_chat(suite, messages=messages).choices[0]
    expect(choice.finish_reason in ("stop", "length", "tool_calls"), f"{choice.finish_reason}")
    expect(CALL_MARKUP not in (choice.message.content or ""), "call markup in the content")
    for call in choice.message.tool_calls or []:
        expect_valid_arguments(call.function.name, call.function.arguments)


def check_auto(suite: Suite) -> None:
    choice = tool_chat(suite, tool_choice="auto").choices[0]
    if choice.message.tool_calls:
        expect_calls(choice)
    else:
        expect(choice.finish_reason in ("stop", "length"), f"{choice.finish_reason}")
        expect(CALL_MARKUP not in (choice.message.content or ""), "call markup in the content")


def check_none(suite: Suite) -> None:
    choice = tool_chat(suite, tool_choice="none", max_tokens=20).choices[0]
    expect(not choice.message.tool_calls, "tool_choice none gave tool calls")
    expect(choice.finish_reason in ("stop", "length"), f"{choice.finish_reason}")


def check_errors(suite: Suite) -> None:
    broken = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "no-such-type"}}}}}  # fmt: skip
    suite.expect_status(400, lambda: tool_chat(suite, tools=[broken]),
                        param="tools[0].function.parameters")  # fmt: skip
    unknown = {"type": "function", "function": {"name": "no_such_function"}}
    suite.expect_status(400, lambda: tool_chat(suite, tool_choice=unknown))
    retrieval = {"type": "retrieval", "function": {"name": "f"}}
    suite.expect_status(400, lambda: tool_chat(suite, tools=[retrieval]))


CHECKS: list[tuple[str, Callable[[Suite], None]]] = [
    ("tools_required", check_required),
    ("tools_named", check_named),
    ("tools_parallel", check_parallel),
    ("tools_stream", check_stream),
    ("tools_follow_up", check_follow_up),
    ("tools_auto", check_auto),
    ("tools_none", check_none),
    ("tools_errors", check_errors),
]
