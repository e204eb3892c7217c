"""The API on a real uvicorn server on 127.0.0.1: the OpenAI SDK conformance suite, and a
client that disconnects mid-stream."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import uvicorn

from stamen.api.app import create_app, static_engines
from stamen.api.engine import LocalEngine
from stamen.api.state import ServingSettings
from stamen.conformance.openai import format_table, run_suite
from tests.unit.test_api_app import load_engine_once


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until(condition, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, LocalEngine]]:
    engine = load_engine_once()
    app = create_app(ServingSettings(), static_engines(engine))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait_until(lambda: server.started, 60, "uvicorn to start")
    yield f"http://127.0.0.1:{port}", engine
    server.should_exit = True
    thread.join(timeout=30)


def test_openai_conformance_suite_passes(served: tuple[str, LocalEngine]) -> None:
    base_url, engine = served
    # The core section; structured outputs, tools and the Responses API have their own
    # tests in the default run, and their conformance sections run in the slow suite.
    results = run_suite(f"{base_url}/v1", engine.model_id, sections=("core",))
    assert all(r.passed for r in results), format_table(results)


def test_client_disconnect_mid_stream_closes_the_chain(served: tuple[str, LocalEngine]) -> None:
    base_url, engine = served
    closed_before = engine.chains_closed
    body = {
        "model": engine.model_id,
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": 4000,
        "temperature": 0,
        "stream": True,
    }
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response,
    ):
        lines = response.iter_lines()
        received = [line for _, line in zip(range(6), lines, strict=False)]
        assert any(line.startswith("data: {") for line in received)
        assert engine.chains_in_use == 1
    # The response is closed: the server must notice, stop generating and free the cache
    # long before 4000 tokens are produced.
    _wait_until(lambda: engine.chains_closed > closed_before, 60, "the chain to close")
    assert engine.chains_in_use == 0
    metrics = httpx.get(f"{base_url}/metrics").text
    assert "stamen_api_requests_in_flight 0.0" in metrics


def send_and_abandon(base_url: str, body: dict, in_use: Callable[[], bool]) -> float:
    """POST `body` on a raw socket, close it once `in_use()`; seconds until not `in_use()`."""
    host, port = base_url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        _wait_until(in_use, 60, "the generation to start")
        time.sleep(0.5)
    closed = time.monotonic()
    _wait_until(lambda: not in_use(), 10, "the generation to stop")
    return time.monotonic() - closed


def test_client_disconnect_before_a_whole_completion_closes_the_chain(
    served: tuple[str, LocalEngine],
) -> None:
    base_url, engine = served
    body = {
        "model": engine.model_id,
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": 4000,
        "logit_bias": {str(token): -100 for token in engine.eos_token_ids},
    }
    elapsed = send_and_abandon(base_url, body, lambda: engine.chains_in_use > 0)
    assert elapsed < 1.0
    metrics = httpx.get(f"{base_url}/metrics").text
    assert "stamen_api_requests_in_flight 0.0" in metrics
    assert 'endpoint="/v1/chat/completions",status="499"' in metrics
