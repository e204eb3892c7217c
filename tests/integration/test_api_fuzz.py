"""Fuzz `swarm-api --in-process` (a fresh interpreter) from its own OpenAPI document with
schemathesis: no request may get a 5xx, and a normal chat request is served afterwards.

Cases come from the served document, so they cover what it promises (types, ranges,
tagged messages) and step just outside it. Half the bodies are steered onto the served
model with a few tokens, so that fuzzing reaches generation instead of stopping at the
404 for an unknown model. Runs for `STAMEN_API_FUZZ_SECONDS` (default 20 s); the slow
variant for 120 s.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from stamen.api.cli import DEFAULT_MODEL_ID
from tests.integration.test_api_lifecycle import Api, start_api

EXAMPLES_PER_ROUND = 15


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    served = start_api(tmp_path_factory.mktemp("fuzz"), "--in-process", "--max-n", "2")
    yield served
    served.process.terminate()
    served.process.wait(timeout=30)


def _steer(body: Any, data: st.DataObject) -> None:
    if not isinstance(body, dict) or not data.draw(st.booleans(), label="steer"):
        return
    body["model"] = DEFAULT_MODEL_ID
    limit = data.draw(st.integers(1, 4), label="max_tokens")
    if "input" in body:  # /v1/responses: without a limit it may generate to the context end
        body["max_output_tokens"] = limit
    else:
        body["max_tokens"] = limit
    body.pop("max_completion_tokens", None)


def fuzz(api: Api, seconds: float) -> int:
    """Fuzz every operation in turn until `seconds` pass; returns the cases sent."""
    schema = schemathesis.openapi.from_url(f"{api.base_url}/schema/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert any(op.path == "/v1/chat/completions" for op in operations)
    sent = 0
    deadline = time.monotonic() + seconds

    for number in range(10**6):
        if time.monotonic() > deadline:
            break
        operation = operations[number % len(operations)]

        @given(case=operation.as_strategy(), data=st.data())
        @settings(
            max_examples=EXAMPLES_PER_ROUND,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def one_round(case: Any, data: st.DataObject) -> None:
            nonlocal sent
            # Draw before looking at the clock: a case that stops drawing early when the
            # deadline passes looks to hypothesis like a strategy depending on outside state.
            _steer(case.body, data)
            if time.monotonic() > deadline:
                return
            response = case.call(base_url=api.base_url, timeout=60)
            sent += 1
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path} -> {response.status_code}\n"
                f"body: {case.body!r}\n{response.text}\n{api.log()}"
            )

        one_round()
    return sent


def _serves_a_normal_chat(api: Api) -> None:
    body = {
        "model": DEFAULT_MODEL_ID,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 4,
        "temperature": 0,
    }
    response = httpx.post(f"{api.base_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]
    assert httpx.get(f"{api.base_url}/readyz").status_code == 200


@pytest.mark.slow  # ~25 s of fuzzing; the wire fuzz runs by default
def test_fuzzing_the_openapi_document_never_gets_a_5xx(api: Api) -> None:
    sent = fuzz(api, float(os.environ.get("STAMEN_API_FUZZ_SECONDS", "20")))
    assert sent > 20
    _serves_a_normal_chat(api)


@pytest.mark.slow
def test_long_fuzz_never_gets_a_5xx(api: Api) -> None:
    fuzz(api, 120)
    _serves_a_normal_chat(api)


def test_oversized_chunked_body_gets_413(api: Api) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(6):
            yield b"x" * (1 << 20)

    response = httpx.post(f"{api.base_url}/v1/chat/completions", content=chunks(), timeout=60)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
