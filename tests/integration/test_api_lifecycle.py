"""`swarm-api` as users run it, in a fresh interpreter: how it stops.

SIGTERM or SIGINT with generations in flight: the process exits within
`SHUTDOWN_BOUND_S`, the stream ends with a `service_unavailable` error event and the
whole completion with a 503, and no child process (the embedded swarm's bootstrap and
hosts) is left. SIGKILL of `swarm-api`: its children notice (`--parent-pid`) and stop by
themselves. The in-process variant runs by default; the embedded swarm ones are slow.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import psutil
import pytest

from stamen.api.cli import DEFAULT_MODEL_ID, SHUTDOWN_BOUND_S

EOS_TOKEN_ID = 2  # SmolLM2's <|im_end|>


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Api:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    children: list[psutil.Process] = field(default_factory=list)  # once ready
    results: dict[str, object] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)


def start_api(tmp_path: Path, *args: str, timeout_s: float = 240) -> Api:
    """`swarm-api` on a free port, once `/readyz` says 200."""
    port = free_port()
    log_path = tmp_path / "swarm-api.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "stamen.api.cli", "--port", str(port), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={"OMP_WAIT_POLICY": "PASSIVE", **os.environ},
        )
    api = Api(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"swarm-api exited with {process.returncode}:\n{api.log()}")
        try:
            if httpx.get(f"{api.base_url}/readyz", timeout=2).status_code == 200:
                api.children = api.descendants()
                return api
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    process.kill()
    pytest.fail(f"swarm-api not ready after {timeout_s} s:\n{api.log()}")


@pytest.fixture
def stopper() -> Iterator[list[Api]]:
    """Whatever a test started is killed at the end, whatever happened."""
    started: list[Api] = []
    yield started
    for api in started:
        api.process.kill()
        api.process.wait(timeout=10)
        for child in api.children:
            if child.is_running():
                child.kill()


def never_ending(stream: bool) -> dict[str, object]:
    return {
        "model": DEFAULT_MODEL_ID,
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": 4000,
        "logit_bias": {str(EOS_TOKEN_ID): -100},
        "stream": stream,
    }


def _stream(api: Api) -> None:
    url = f"{api.base_url}/v1/chat/completions"
    with httpx.stream("POST", url, json=never_ending(True), timeout=60) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    api.results["stream_last"] = lines[-1]


def _whole(api: Api) -> None:
    url = f"{api.base_url}/v1/chat/completions"
    api.results["whole"] = httpx.post(url, json=never_ending(False), timeout=60)


def stop_with_generations_in_flight(api: Api, signum: int) -> float:
    """Start a stream and a whole completion, send `signum`; seconds until exit."""
    clients = [threading.Thread(target=f, args=(api,)) for f in (_stream, _whole)]
    for client in clients:
        client.start()
    deadline = time.monotonic() + 60
    metrics = f"{api.base_url}/metrics"
    while "stamen_api_requests_in_flight 2.0" not in httpx.get(metrics).text:
        assert time.monotonic() < deadline, api.log()
        time.sleep(0.1)
    time.sleep(1.0)  # both are generating now
    started = time.monotonic()
    api.process.send_signal(signum)
    api.process.wait(timeout=60)
    elapsed = time.monotonic() - started
    for client in clients:
        client.join(timeout=30)
    last = orjson.loads(str(api.results["stream_last"])[len("data: ") :])
    assert last["error"]["code"] == "service_unavailable", api.log()
    whole = api.results["whole"]
    assert isinstance(whole, httpx.Response) and whole.status_code == 503, api.log()
    return elapsed


@pytest.mark.slow  # ~27 s
def test_sigterm_ends_generations_and_exits_in_time(tmp_path: Path, stopper: list[Api]) -> None:
    api = start_api(tmp_path, "--in-process")
    stopper.append(api)
    elapsed = stop_with_generations_in_flight(api, signal.SIGTERM)
    print(f"stopped in {elapsed:.2f} s")
    assert elapsed < SHUTDOWN_BOUND_S, (elapsed, api.log())
    assert "Application shutdown complete" in api.log()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_embedded_swarm_stops_with_its_children(
    tmp_path: Path, stopper: list[Api], signum: int
) -> None:
    api = start_api(tmp_path)
    stopper.append(api)
    children = api.children
    assert len(children) == 3, children  # bootstrap and two hosts
    elapsed = stop_with_generations_in_flight(api, signum)
    print(f"stopped in {elapsed:.2f} s")
    assert elapsed < SHUTDOWN_BOUND_S, (elapsed, api.log())
    _, alive = psutil.wait_procs(children, timeout=0.5)
    assert not alive, alive


@pytest.mark.slow
def test_children_stop_when_swarm_api_is_killed(tmp_path: Path, stopper: list[Api]) -> None:
    api = start_api(tmp_path)
    stopper.append(api)
    children = api.children
    assert len(children) == 3, children
    api.process.kill()
    api.process.wait(timeout=10)
    started = time.monotonic()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, alive
    # one poll interval (1 s) to notice, then the SIGTERM path (hosts announce OFFLINE)
    assert time.monotonic() - started < 5
