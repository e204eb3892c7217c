"""Responses API cases of the OpenAI contract suite, through the official `openai` SDK.

What a user of `client.responses` relies on, against any server: a text response's
shape (ids, status, usage adding up, the echoed parameters, `output_text`); greedy
answers equal streamed or not; the typed event stream in order with consecutive
`sequence_number`s and the `responses.stream` helper's final response; a conversation
continued with `previous_response_id` (the earlier turn counted in its input tokens); retrieve, `input_items.list` (cursor pages) and
delete; `store: false` keeping nothing; `max_output_tokens` ending a response
`incomplete`; structured output with `text.format` json_schema; a function tool called
and its output sent back; and errors in OpenAI's shape (404 unknown response or
`previous_response_id`, 400 malformed input items or unsupported tools).

Each check takes a `conformance.openai.Suite`; `CHECKS` lists them by name.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from stamen.conformance.openai import Suite, expect

QUESTION = "What is the capital of France?"

CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city", "country"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather of a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


def _create(suite: Suite, **kwargs: Any) -> Any:
    kwargs.setdefault("input", QUESTION)
    kwargs.setdefault("max_output_tokens", 16)
    kwargs.setdefault("temperature", 0)
    return suite.client.responses.create(model=suite.model, **kwargs)


def check_response_shape(suite: Suite) -> None:
    response = _create(suite, instructions="Answer briefly.", metadata={"suite": "conformance"})
    expect(response.id.startswith("resp_") and response.object == "response", f"id {response.id}")
    expect(response.status in ("completed", "incomplete"), f"status {response.status}")
    expect(response.model == suite.model and response.created_at > 0, "model/created_at")
    expect(bool(response.output_text), "empty output_text")
    message = response.output[0]
    expect(message.type == "message" and message.role == "assistant", f"item {message}")
    expect(bool(message.id) and message.content[0].type == "output_text", "content part")
    usage = response.usage
    expect(usage is not None and usage.output_tokens > 0, f"usage {usage}")
    expect(usage.total_tokens == usage.input_tokens + usage.output_tokens, f"usage {usage}")
    expect(response.instructions == "Answer briefly.", "instructions not echoed")
    expect(response.metadata == {"suite": "conformance"}, f"metadata {response.metadata}")
    expect(response.temperature == 0 and response.tools == [], "parameters not echoed")


def check_stream_events(suite: Suite) -> None:
    whole = _create(suite)
    with suite.client.responses.stream(
        model=suite.model, input=QUESTION, max_output_tokens=16, temperature=0
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    expect(kinds[:2] == ["response.created", "response.in_progress"], f"start {kinds[:2]}")
    expect(kinds[-1] in ("response.completed", "response.incomplete"), f"end {kinds[-1]}")
    numbers = [e.sequence_number for e in events]
    expect(numbers == list(range(numbers[0], numbers[0] + len(numbers))), "sequence numbers")
    order = [k for k in kinds if k != "response.output_text.delta"]
    expected = ["response.output_item.added", "response.content_part.added",
                "response.output_text.done", "response.content_part.done",
                "response.output_item.done"]  # fmt: skip
    expect(order[2:-1] == expected, f"event order {order}")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    expect(text == final.output_text == whole.output_text,
           f"streamed {text!r}, final {final.output_text!r}, whole {whole.output_text!r}")  # fmt: skip


def check_async_create(suite: Suite) -> None:
    async def run() -> Any:
        async with suite.new_async_client() as aclient:
            return await aclient.responses.create(
                model=suite.model, input=QUESTION, max_output_tokens=8, temperature=0
            )

    response = asyncio.run(run())
    expect(response.output_text == _create(suite, max_output_tokens=8).output_text, "async text")


def check_conversation(suite: Suite) -> None:
    first = _create(suite, input="My name is Ada. Remember it.")
    second = _create(suite, input="What is my name?", previous_response_id=first.id,
                     max_output_tokens=24)  # fmt: skip
    expect(second.previous_response_id == first.id, "previous_response_id not echoed")
    # The earlier turn (its input and output) is part of this prompt.
    expect(second.usage.input_tokens > first.usage.total_tokens,
           f"the earlier turn was not replayed: {second.usage} after {first.usage}")  # fmt: skip


def check_retrieve_list_delete(suite: Suite) -> None:
    items: Any = [{"role": "user", "content": f"Item {n}."} for n in range(3)]
    response = _create(suite, input=items, max_output_tokens=2)
    again = suite.client.responses.retrieve(response.id)
    expect(again.id == response.id and again.output_text == response.output_text, "retrieve")
    listed = [i.id for i in suite.client.responses.input_items.list(response.id, limit=1)]
    ascending = suite.client.responses.input_items.list(response.id, order="asc").data
    expect(len(listed) == 3 and listed == [i.id for i in ascending][::-1], "input_items pages")
    expect([i.content[0].text for i in ascending] == [i["content"] for i in items], "items")
    suite.client.responses.delete(response.id)
    suite.expect_status(404, lambda: suite.client.responses.retrieve(response.id))


def check_store_false(suite: Suite) -> None:
    response = _create(suite, store=False, max_output_tokens=2)
    expect(response.store is False, "store not echoed")
    suite.expect_status(404, lambda: suite.client.responses.retrieve(response.id))


def check_incomplete(suite: Suite) -> None:
    response = _create(suite, input="Write a long story about a dragon.", max_output_tokens=3)
    expect(response.status == "incomplete", f"status {response.status}")
    details = response.incomplete_details
    expect(details is not None and details.reason == "max_output_tokens", f"details {details}")


def check_json_schema(suite: Suite) -> None:
    text: Any = {"format": {"type": "json_schema", "name": "city", "schema": CITY_SCHEMA,
                            "strict": True}}  # fmt: skip
    response = _create(suite, input="Name a large city of Japan as JSON.", text=text,
                       max_output_tokens=60)  # fmt: skip
    value = json.loads(response.output_text)
    expect(isinstance(value, dict) and set(value) == {"city", "country"}, f"json {value}")
    expect(all(isinstance(v, str) for v in value.values()), f"json {value}")


def check_function_tool(suite: Suite) -> None:
    ask: Any = {"tools": [WEATHER_TOOL], "max_output_tokens": 60, "parallel_tool_calls": False}
    response = _create(suite, input="What is the weather in Paris?", tool_choice="required", **ask)
    calls = [item for item in response.output if item.type == "function_call"]
    expect(len(calls) == 1 and calls[0].name == "get_weather", f"output {response.output}")
    arguments = json.loads(calls[0].arguments)
    expect(isinstance(arguments, dict) and isinstance(arguments.get("city"), str), "arguments")
    output: Any = [{"type": "function_call_output", "call_id": calls[0].call_id,
                    "output": "22 C, sunny"}]  # fmt: skip
    answer = _create(suite, input=output, previous_response_id=response.id, tool_choice="none",
                     **ask)  # fmt: skip
    expect(bool(answer.output_text), "no answer after the function's output")


def check_errors(suite: Suite) -> None:
    create: Any = suite.client.responses.create
    model = suite.model
    suite.expect_status(404, lambda: suite.client.responses.retrieve("resp_doesnotexist"))
    suite.expect_status(
        404,
        lambda: create(model=model, input="hi", previous_response_id="resp_doesnotexist"),
        "previous_response_id",
    )
    suite.expect_status(404, lambda: create(model="no-such-model", input="hi"), "model")
    bad_role = [{"type": "message", "role": "robot", "content": "hi"}]
    suite.expect_status(400, lambda: create(model=model, input=bad_role))
    suite.expect_status(400, lambda: create(model=model, input=[{"type": "no_such_item"}]))
    suite.expect_status(400, lambda: create(model=model, input="hi", temperature=5))


CHECKS: list[tuple[str, Callable[[Suite], None]]] = [
    ("responses_shape", check_response_shape),
    ("responses_stream_events", check_stream_events),
    ("responses_async", check_async_create),
    ("responses_conversation", check_conversation),
    ("responses_retrieve_list_delete", check_retrieve_list_delete),
    ("responses_store_false", check_store_false),
    ("responses_incomplete", check_incomplete),
    ("responses_json_schema", check_json_schema),
    ("responses_function_tool", check_function_tool),
    ("responses_errors", check_errors),
]
