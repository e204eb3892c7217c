"""`python -m stamen.demo --exit`: one command starts the embedded swarm behind swarm-api,
streams an answer through the openai SDK, and stops everything it started."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.slow
def test_demo_streams_an_answer_and_exits(smollm2_gguf: object) -> None:
    port = _free_port()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stamen.demo",
            "--exit",
            "--port",
            str(port),
            "--prompt",
            "What is the capital of France?",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    answer = re.search(r"assistant> (.*?)\n\((\d+) tokens in", done.stdout, re.S)
    assert answer is not None, done.stdout
    assert answer.group(1).strip() and int(answer.group(2)) >= 1
    # The demo stopped swarm-api (and with it the local swarm) before exiting.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
