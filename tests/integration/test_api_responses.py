"""The Responses API through the official `openai` SDK against the API on a real uvicorn
server on 127.0.0.1 (the bundled SmolLM2 in process): text, the typed event stream, a
conversation continued with `previous_response_id` after a restart of the app on the
same data directory, `store: false`, refused requests, a disconnect mid-stream,
structured output, a streamed function call whose output continues the conversation;
and (slow) the conformance checks.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import uvicorn

from stamen.api.app import create_app, static_engines
from stamen.api.engine import LocalEngine
from stamen.api.state import FineTuningSettings, ServingSettings
from stamen.conformance.openai import Suite
from stamen.conformance.openai_responses import CHECKS, CITY_SCHEMA, WEATHER_TOOL
from tests.unit.test_api_app import load_engine_once

QUESTION = "What is the capital of France?"
FOLLOW_UP = "And of Germany?"
INSTRUCTIONS = "Answer in one short sentence."


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def serving(data_dir: Path) -> Iterator[str]:
    """The API app on uvicorn, its store under `data_dir`; yields the base URL."""
    engine = load_engine_once()
    settings = ServingSettings(fine_tuning=FineTuningSettings(data_dir=data_dir))
    app = create_app(settings, static_engines(engine))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def sdk(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine() -> LocalEngine:
    return load_engine_once()


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serving(tmp_path_factory.mktemp("responses-data")) as url:
        yield url


def chat_text(client: openai.OpenAI, model: str, messages: Any, max_tokens: int) -> str:
    chat = client.chat.completions.create(
        model=model, messages=messages, max_completion_tokens=max_tokens, temperature=0
    )
    return chat.choices[0].message.content or ""


def test_a_conversation_continues_after_a_restart_on_the_same_store(
    tmp_path: Path, engine: LocalEngine
) -> None:
    model = engine.model_id
    with serving(tmp_path) as url:
        client = sdk(url)
        first = client.responses.create(
            model=model, input=QUESTION, instructions=INSTRUCTIONS, max_output_tokens=16,
            temperature=0, metadata={"case": "restart"},
        )  # fmt: skip
        expected = chat_text(
            client, model,
            [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}],
            16,
        )  # fmt: skip
        assert first.output_text == expected and expected
        assert first.id.startswith("resp_") and first.object == "response"
        assert first.status in ("completed", "incomplete") and first.model == model
        message = first.output[0]
        assert message.type == "message" and message.role == "assistant"
        assert message.content[0].type == "output_text" and message.content[0].annotations == []
        usage = first.usage
        assert usage is not None and usage.output_tokens > 0
        assert usage.total_tokens == usage.input_tokens + usage.output_tokens
        assert first.instructions == INSTRUCTIONS and first.metadata == {"case": "restart"}
        assert first.store is True and first.temperature == 0

    with serving(tmp_path) as url:  # a new app, a new store object, the same database
        client = sdk(url)
        again = client.responses.retrieve(first.id)
        assert again.output_text == first.output_text and again.usage == first.usage
        items = client.responses.input_items.list(first.id).data
        assert [(i.type, i.role) for i in items] == [("message", "user")]
        assert items[0].content[0].text == QUESTION
        second = client.responses.create(
            model=model, input=FOLLOW_UP, previous_response_id=first.id, max_output_tokens=16,
            temperature=0,
        )  # fmt: skip
        assert second.previous_response_id == first.id
        # The earlier turn's instructions do not carry over; its input and output do.
        conversation = [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": FOLLOW_UP},
        ]
        assert second.output_text == chat_text(client, model, conversation, 16)


def test_the_event_stream_is_ordered_and_matches_the_final_response(
    base_url: str, engine: LocalEngine
) -> None:
    client = sdk(base_url)
    with client.responses.stream(
        model=engine.model_id, input=QUESTION, max_output_tokens=10, temperature=0
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * len(deltas),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed" if final.status == "completed" else "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert len({e.response.id for e in events if hasattr(e, "response")}) == 1
    text = "".join(d.delta for d in deltas)
    item_id = events[2].item.id
    assert all(d.item_id == item_id and d.output_index == 0 for d in deltas)
    assert events[-4].text == text == final.output_text
    whole = client.responses.create(
        model=engine.model_id, input=QUESTION, max_output_tokens=10, temperature=0
    )
    assert whole.output_text == text
    stored = client.responses.retrieve(final.id)
    assert stored.output_text == text and stored.output[0].id == item_id


def test_max_output_tokens_makes_an_incomplete_response(base_url: str, engine: LocalEngine) -> None:
    client = sdk(base_url)
    response = client.responses.create(
        model=engine.model_id, input="Write a long story about a dragon.", max_output_tokens=3,
        temperature=0, store=False,
    )  # fmt: skip
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 3
    assert response.output[0].status == "incomplete" and response.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def _status(call: Any) -> tuple[int, dict[str, Any]]:
    with pytest.raises(openai.APIStatusError) as raised:
        call()
    body = raised.value.body
    assert isinstance(body, dict) and {"message", "type", "param", "code"} <= set(body)
    return raised.value.status_code, body


@pytest.mark.parametrize(
    ("fields", "status", "param"),
    [
        ({"previous_response_id": "resp_unknown"}, 404, "previous_response_id"),
        ({"reasoning": {"effort": "low"}}, 400, "reasoning"),
        ({"background": True}, 400, "background"),
        ({"include": ["message.output_text.logprobs"]}, 400, "include"),
        ({"truncation": "auto"}, 400, "truncation"),
        ({"tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
        ({"input": [{"type": "message", "role": "robot", "content": "hi"}]}, 400, "input[0].role"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, 400,
         "input[0].content[0].type"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, 400, "input[0].call_id"),
        ({"input": [42]}, 400, "input[0]"),
        ({"input": []}, 400, "input"),
        ({"tool_choice": "required"}, 400, "tool_choice"),
        ({"max_output_tokens": 10**6}, 400, "max_output_tokens"),
    ],
)  # fmt: skip
def test_bad_requests_are_refused_naming_the_field(
    base_url: str, engine: LocalEngine, fields: dict[str, Any], status: int, param: str
) -> None:
    client = sdk(base_url)
    body: Any = {"model": engine.model_id, "input": "hi", "max_output_tokens": 4, **fields}
    got, error = _status(lambda: client.responses.create(**body))
    assert (got, error["param"]) == (status, param)


def test_unknown_responses_are_404_and_delete_removes(base_url: str, engine: LocalEngine) -> None:
    client = sdk(base_url)
    assert _status(lambda: client.responses.retrieve("resp_unknown"))[0] == 404
    assert _status(lambda: client.responses.delete("resp_unknown"))[0] == 404
    assert _status(lambda: client.responses.input_items.list("resp_unknown"))[0] == 404
    items: Any = [{"role": "user", "content": f"Say the number {n}."} for n in range(5)]
    response = client.responses.create(model=engine.model_id, input=items, max_output_tokens=1)
    newest_first = client.responses.input_items.list(response.id, limit=2)
    paged = [item.id for item in newest_first]  # the SDK follows the cursor
    listed = client.responses.input_items.list(response.id, order="asc").data
    assert paged == [item.id for item in listed][::-1] and len(paged) == 5
    assert [item.content[0].text for item in listed] == [i["content"] for i in items]
    client.responses.delete(response.id)
    assert _status(lambda: client.responses.retrieve(response.id))[0] == 404
    assert _status(lambda: client.responses.create(
        model=engine.model_id, input="hi", previous_response_id=response.id
    ))[1]["param"] == "previous_response_id"  # fmt: skip


def test_a_disconnect_mid_stream_closes_the_chain(base_url: str, engine: LocalEngine) -> None:
    closed_before = engine.chains_closed
    body = {"model": engine.model_id, "input": "Write a very long story.", "stream": True,
            "max_output_tokens": 4000, "temperature": 0}  # fmt: skip
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", f"{base_url}/v1/responses", json=body) as response,
    ):
        received = [line for _, line in zip(range(12), response.iter_lines(), strict=False)]
        assert any('"response.output_text.delta"' in line for line in received)
        assert engine.chains_in_use == 1
    deadline = time.monotonic() + 30
    while engine.chains_closed == closed_before:
        assert time.monotonic() < deadline, "the chain stayed open after the client left"
        time.sleep(0.05)
    assert engine.chains_in_use == 0


def test_a_disconnect_before_a_whole_response_closes_the_chain(
    base_url: str, engine: LocalEngine
) -> None:
    body = {"model": engine.model_id, "input": "Write a very long story.",
            "max_output_tokens": 4000}  # fmt: skip
    payload = json.dumps(body).encode()
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(
            b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        deadline = time.monotonic() + 60
        while engine.chains_in_use == 0:
            assert time.monotonic() < deadline, "the generation did not start"
            time.sleep(0.05)
    left = time.monotonic()
    while engine.chains_in_use > 0:
        assert time.monotonic() - left < 5, "the chain stayed open after the client left"
        time.sleep(0.05)
    metrics = httpx.get(f"{base_url}/metrics").text
    assert 'endpoint="/v1/responses",status="499"' in metrics


# -- structured output and tools --------------------------------------------------------

CITY, WEATHER = CITY_SCHEMA, WEATHER_TOOL  # the conformance cases' schema and tool


def test_text_format_json_schema(base_url: str, engine: LocalEngine) -> None:
    client = sdk(base_url)
    text: Any = {"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}}
    response = client.responses.create(
        model=engine.model_id, input="Name a large city of Japan as JSON.", text=text,
        max_output_tokens=60, temperature=0,
    )  # fmt: skip
    assert response.status == "completed" and response.text.format.type == "json_schema"
    jsonschema.validate(json.loads(response.output_text), CITY)


def test_a_function_call_streams_and_its_output_continues(
    base_url: str, engine: LocalEngine
) -> None:
    client = sdk(base_url)
    ask: Any = {"model": engine.model_id, "tools": [WEATHER], "max_output_tokens": 40,
                "temperature": 0, "parallel_tool_calls": False}  # fmt: skip
    with client.responses.stream(
        input="What is the weather in Paris?", tool_choice="required", **ask
    ) as stream:
        events = list(stream)
        response = stream.get_final_response()
    kinds = [e.type for e in events]
    arguments = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert arguments and kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * len(arguments),
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    (call,) = response.output
    assert call.type == "function_call" and call.status == "completed"
    assert call.name == "get_weather" and call.id.startswith("fc_") and call.call_id
    assert "".join(e.delta for e in arguments) == call.arguments == events[-3].arguments
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    assert client.responses.retrieve(response.id).output[0].arguments == call.arguments

    result: Any = [{"type": "function_call_output", "call_id": call.call_id, "output": "22 C"}]
    answer = client.responses.create(
        input=result, previous_response_id=response.id, tool_choice="none",
        **{**ask, "max_output_tokens": 8},
    )  # fmt: skip
    assert [item.type for item in answer.output] == ["message"] and answer.output_text
    items = client.responses.input_items.list(answer.id).data
    assert [(i.type, i.call_id) for i in items] == [("function_call_output", call.call_id)]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "check"), CHECKS, ids=[name for name, _ in CHECKS])
def test_conformance_checks_pass(base_url: str, engine: LocalEngine, name: str, check: Any) -> None:
    client = sdk(base_url)

    def async_client() -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0)

    check(Suite(client, async_client, engine.model_id))
