"""The Responses API routes in process (AsyncTestClient, the bundled SmolLM2): a chain that
breaks mid-stream, a swarm that is not ready, and the OpenAPI document."""

from __future__ import annotations

import orjson
import pytest

from stamen.api.engine import LocalEngine
from tests.unit.test_api_app import FailingEngine, client_for, load_engine_once, sse_data


@pytest.fixture(scope="module")
def engine() -> LocalEngine:
    return load_engine_once()


def body(engine: LocalEngine, **extra: object) -> dict[str, object]:
    return {"model": engine.model_id, "input": "What is the capital of France?",
            "temperature": 0, "max_output_tokens": 8, **extra}  # fmt: skip


async def test_a_chain_failure_mid_stream_ends_with_response_failed(engine: LocalEngine) -> None:
    failing = FailingEngine(engine)
    async with client_for(failing) as client:
        streamed = await client.post("/v1/responses", json=body(engine, stream=True))
        events = [orjson.loads(item) for item in sse_data(streamed.text) if item != "[DONE]"]
        last = events[-1]
        assert last["type"] == "response.failed"
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        failed = last["response"]
        assert failed["status"] == "failed" and "host went away" in failed["error"]["message"]
        assert failed["error"]["code"] == "server_error"
        stored = await client.get(f"/v1/responses/{failed['id']}")
        assert stored.status_code == 200 and stored.json()["status"] == "failed"
        whole = await client.post("/v1/responses", json=body(engine))
        assert whole.status_code >= 500 and "message" in whole.json()["error"]
    assert failing.closed == 2


async def test_not_ready_answers_503_with_retry_after(engine: LocalEngine) -> None:
    async with client_for(FailingEngine(engine, ready=False), retry_after_s=7) as client:
        response = await client.post("/v1/responses", json=body(engine))
    assert response.status_code == 503 and response.headers["retry-after"] == "7"
    assert response.json()["error"]["code"] == "service_unavailable"


async def test_openapi_document_describes_the_responses_routes(engine: LocalEngine) -> None:
    async with client_for(engine) as client:
        document = (await client.get("/schema/openapi.json")).json()
    create = document["paths"]["/v1/responses"]["post"]
    ref = create["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/ResponsesRequest"
    assert "text/event-stream" in create["responses"]["200"]["content"]
    assert {"get", "delete"} <= set(document["paths"]["/v1/responses/{response_id}"])
    assert "/v1/responses/{response_id}/input_items" in document["paths"]
