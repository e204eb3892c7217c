"""The embedded default under load: `swarm-api` with no peers (a bootstrap and two hosts
as child processes, serving SmolLM2), hit by 64, 128 and 256 concurrent streams.

Every stream must complete well-formed and without an error event (one session too many
must never close the connection that carries the others), and greedy decoding of one
prompt must give one text. 64 streams run in the default suite; 128 and 256 are slow.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from stamen.conformance.load import run_streams

MODEL_ID = "SmolLM2-135M-Instruct"
START_TIMEOUT_S = 240.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _ready(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def embedded_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a `swarm-api` started as a user would, with nothing but a port."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("embedded-api") / "swarm-api.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "stamen.api.cli", "--port", str(port), "--log-level", "INFO"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _ready(base_url):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"swarm-api did not become ready:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield base_url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _run(base_url: str, streams: int) -> None:
    result = asyncio.run(
        run_streams(f"{base_url}/v1", MODEL_ID, streams=streams, max_tokens=6, timeout_s=300)
    )
    assert not result.failures, "\n".join(result.failures[:20])
    assert all(s.completion_tokens >= 1 for s in result.streams)
    # The server serves normally right after the burst.
    assert _ready(base_url)


def test_64_concurrent_streams_all_complete(embedded_api: str) -> None:
    _run(embedded_api, 64)


@pytest.mark.slow
@pytest.mark.parametrize("streams", [128, 256])
def test_many_concurrent_streams_all_complete(embedded_api: str, streams: int) -> None:
    _run(embedded_api, streams)
