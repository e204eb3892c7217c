"""Host churn: the only host of a span SIGKILLed mid-generation and restarted, again and
again, with the same identity and with a fresh one, at the same address; and the API's
readiness following such a host down and up.

Each generation must finish with the tokens of an undisturbed run: the client bans the
dead incarnation only, keeps looking for a route (re-reading the DHT) until the host is
back, and replays its history there. With a fresh identity the old record still points
at the reused address, where another key now answers: that record must drop out of the
view instead of being tried again and again. Slow (a restart loads the span and measures
throughput, several seconds per round on this machine).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from stamen.swarm_core.client.distributed import (
    AutoDistributedModelForCausalLM,
    DistributedModelForCausalLM,
)
from stamen.swarm_core.client.swarm import ClientSettings
from tests.integration.conftest import NEW_TOKENS, HostProcess, SwarmProcesses

pytestmark = pytest.mark.slow

ROUNDS = 10
MODEL_ID = "SmolLM2-135M-Instruct"
# The API holds connections to the hosts it used: a killed host's are reset at once, and
# the view redials every second, so readiness turns within a few seconds (a host the API
# never talked to drops out when its 15 s record lapses, within 20 s).
NOT_READY_WITHIN_S = 5.0
READY_AGAIN_WITHIN_S = 15.0  # after the restarted host printed its ready line


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class _Churn:
    """The host of blocks [15, 30): killed when the stream reaches its `kill_at`-th new
    token, then restarted in the background at the same address."""

    def __init__(self, swarm: SwarmProcesses, model: Path, port: int, identity: Path) -> None:
        self.swarm, self.model, self.port, self.identity = swarm, model, port, identity
        self.host = self.start(fresh_identity=False)
        swarm.wait_ready(self.host)
        self.restarting: threading.Thread | None = None

    def start(self, *, fresh_identity: bool) -> HostProcess:
        if fresh_identity:
            self.identity.unlink(missing_ok=True)  # a new key, and so a new peer id
        return self.swarm.start_host(
            self.model,
            "--blocks",
            "15:30",
            "--dht-client",
            "--listen",
            f"tcp://127.0.0.1:{self.port}",
            "--identity",
            str(self.identity),
        )

    def kill_and_restart(self, *, fresh_identity: bool) -> None:
        self.host.kill()

        def restart() -> None:
            self.host = self.start(fresh_identity=fresh_identity)

        self.restarting = threading.Thread(target=restart)
        self.restarting.start()

    def settle(self) -> None:
        assert self.restarting is not None
        self.restarting.join(timeout=120)
        self.swarm.wait_ready(self.host)


class _KillAt:
    """A streamer that has `churn` kill its host at the `kill_at`-th new token."""

    def __init__(self, churn: _Churn, kill_at: int, *, fresh_identity: bool) -> None:
        self.churn, self.kill_at, self.fresh_identity = churn, kill_at, fresh_identity
        self.seen = -1  # the first `put` is the prompt
        self.killed = False

    def put(self, value: torch.Tensor) -> None:
        self.seen += 1
        if self.seen == self.kill_at and not self.killed:
            self.killed = True
            self.churn.kill_and_restart(fresh_identity=self.fresh_identity)

    def end(self) -> None:
        pass


@pytest.fixture
def churn_swarm(tmp_path: Path, smollm2_gguf: Path) -> Iterator[tuple[SwarmProcesses, _Churn]]:
    swarm = SwarmProcesses(tmp_path)
    try:
        swarm.start_bootstrap()
        first = swarm.start_host(smollm2_gguf, "--blocks", "0:15", "--dht-client")
        churn = _Churn(swarm, smollm2_gguf, _free_port(), tmp_path / "host.key")
        swarm.wait_ready(first)
        yield swarm, churn
    finally:
        swarm.close()


@pytest.fixture
def client(
    churn_swarm: tuple[SwarmProcesses, _Churn], smollm2_gguf: Path
) -> Iterator[DistributedModelForCausalLM]:
    swarm, _ = churn_swarm
    model = AutoDistributedModelForCausalLM.from_pretrained(
        smollm2_gguf,
        initial_peers=[swarm.dht],
        settings=ClientSettings(refresh_interval_s=1.0),
    )
    try:
        yield model
    finally:
        model.close()


def test_killed_and_restarted_host_ten_times_changes_no_token(
    churn_swarm: tuple[SwarmProcesses, _Churn],
    client: DistributedModelForCausalLM,
    smollm2_prompt: torch.Tensor,
    smollm2_expected: torch.Tensor,
) -> None:
    _, churn = churn_swarm
    outcomes = []
    for round_ in range(ROUNDS):
        fresh = round_ >= ROUNDS // 2  # the same identity first, then a new one each time
        streamer = _KillAt(churn, kill_at=2 + round_ % 5, fresh_identity=fresh)
        out = client.generate(
            smollm2_prompt, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamer
        )
        assert streamer.killed, f"round {round_}: the stream ended before the kill"
        churn.settle()
        outcomes.append(out.tolist() == smollm2_expected.tolist())
        # A dead incarnation never lingers in the view: one host per span is listed.
        spans = sorted((h.start, h.end) for h in client.swarm.hosts())
        assert spans == [(0, 15), (15, 30)], f"round {round_}: {spans}"
    assert outcomes == [True] * ROUNDS


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0


def _wait_for_status(url: str, status: int, timeout_s: float) -> float:
    """Seconds until `url` answers `status`; fails the test after `timeout_s`."""
    began = time.monotonic()
    while _status(url) != status:
        if time.monotonic() - began > timeout_s:
            pytest.fail(f"{url} did not answer {status} within {timeout_s} s")
        time.sleep(0.1)
    return time.monotonic() - began


def test_health_is_not_ready_while_the_only_host_of_a_span_is_dead(
    churn_swarm: tuple[SwarmProcesses, _Churn], smollm2_gguf: Path, tmp_path: Path
) -> None:
    swarm, churn = churn_swarm
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "swarm-api.log"
    with log_path.open("wb") as log:
        api = subprocess.Popen(
            [sys.executable, "-m", "stamen.api.cli", "--model", str(smollm2_gguf),
             "--initial-peers", swarm.dht, "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        _wait_for_status(f"{base_url}/health", 200, 120)
        body = {"model": MODEL_ID, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60).is_success
        churn.host.kill()  # blocks [15, 30) have no host now
        dead_s = _wait_for_status(f"{base_url}/health", 503, NOT_READY_WITHIN_S)
        assert _status(f"{base_url}/livez") == 200  # alive, only not ready
        churn.host = churn.start(fresh_identity=False)
        swarm.wait_ready(churn.host)
        back_s = _wait_for_status(f"{base_url}/health", 200, READY_AGAIN_WITHIN_S)
        assert httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60).is_success
        print(f"not ready {dead_s:.2f} s after the kill, ready {back_s:.2f} s after the restart")
    finally:
        api.send_signal(signal.SIGTERM)
        api.wait(timeout=30)
