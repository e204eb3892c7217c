"""Real swarm processes on 127.0.0.1 for integration tests.

`SwarmProcesses` starts `swarm-bootstrap` and `swarm-host` as subprocesses (stdout and
stderr of each go to one log file), waits for their ready lines, and tears every one of
them down (SIGTERM, then SIGKILL) however the test ends. When a test fails, the tail of
every process log that was alive during it is attached to the report.

Helpers here know how to start processes and reach them; what a test checks is the test's.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from stamen.swarm_core.client.distributed import (
    AutoDistributedModelForCausalLM,
    DistributedModelForCausalLM,
    _LoopThread,
)
from stamen.swarm_core.client.remote import HostInfo, SpanClient
from stamen.swarm_core.client.swarm import ClientSettings, SwarmClient
from stamen.transports.base import Credentials
from stamen.transports.factory import SchemeRouter

NEW_TOKENS = 20  # generated per SmolLM2 test
START_TIMEOUT_S = 120.0  # a host loads its span and measures itself on 2 busy cores
STOP_TIMEOUT_S = 20.0
LOG_TAIL_LINES = 60

_BOOTSTRAP_READY = re.compile(r"swarm-bootstrap ready: dht=(\S+) signaling=(\S+) peer_id=(\S+)")
_HOST_READY = re.compile(r"serving blocks \[(\d+), (\d+)\) of (\S+) as (\S+) at (.+)$", re.M)
_HOST_JOINING = re.compile(r"loading blocks \[(\d+), (\d+)\)")

_live: list[ManagedProcess] = []  # every process not yet reaped, for failure reports


class ProcessFailed(RuntimeError):
    """A swarm process exited or stayed silent before printing its ready line."""


@dataclass
class ManagedProcess:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def wait_for(
        self, pattern: re.Pattern[str], timeout_s: float = START_TIMEOUT_S
    ) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while True:
            match = pattern.search(self.log())
            if match:
                return match
            if self.popen.poll() is not None:
                raise ProcessFailed(
                    f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise ProcessFailed(f"{self.name} not ready after {timeout_s} s:\n{self.tail()}")
            time.sleep(0.2)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def terminate(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, waiting up to `timeout_s`; SIGKILL after that. Returns the exit code."""
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        code = self.popen.wait()
        _forget(self)
        return code

    def kill(self) -> None:
        if self.alive:
            self.popen.kill()
        self.popen.wait()


def _forget(process: ManagedProcess) -> None:
    if process in _live:
        _live.remove(process)


@dataclass
class HostProcess(ManagedProcess):
    blocks: tuple[int, int] = (0, 0)
    short_id: str = ""
    address: str = ""

    def serves(self, peer_id: str) -> bool:
        return peer_id[1:].startswith(self.short_id)


class SwarmProcesses:
    """A bootstrap node plus any number of hosts, owned by one fixture."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: list[ManagedProcess] = []
        self.dht = ""
        self.signaling = ""

    def _spawn(self, name: str, module: str, args: list[str], cls: type[Any]) -> Any:
        log_path = self.log_dir / f"{name}.log"
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        process = cls(name=name, popen=popen, log_path=log_path)
        self.processes.append(process)
        _live.append(process)
        return process

    def start_bootstrap(self) -> ManagedProcess:
        process: ManagedProcess = self._spawn(
            "bootstrap",
            "stamen.swarm_core.bootstrap_cli",
            ["--listen", "127.0.0.1:0", "--signaling-listen", "127.0.0.1:0", "--log-level", "INFO"],
            ManagedProcess,
        )
        match = process.wait_for(_BOOTSTRAP_READY, timeout_s=60.0)
        self.dht, self.signaling = match.group(1), match.group(2)
        return process

    def start_host(self, model: str | Path, *args: str, webrtc: bool = False) -> HostProcess:
        """Start `swarm-host MODEL ARGS...` joined to this bootstrap; returns once it has
        announced itself JOINING (its span is chosen), without waiting for it to serve."""
        transport = (
            ["--transport", "webrtc", "--listen", f"webrtc://{self.signaling}"] if webrtc else []
        )
        name = f"host{sum(isinstance(p, HostProcess) for p in self.processes)}"
        host: HostProcess = self._spawn(
            name,
            "stamen.swarm_core.host.cli",
            [str(model), "--initial-peers", self.dht, "--announce-interval-s", "2", *transport]
            + list(args),
            HostProcess,
        )
        joining = host.wait_for(_HOST_JOINING)
        host.blocks = (int(joining.group(1)), int(joining.group(2)))
        return host

    def wait_ready(self, *hosts: HostProcess) -> None:
        for host in hosts:
            match = host.wait_for(_HOST_READY)
            host.short_id, host.address = match.group(4), match.group(5).strip()

    def hosts(self) -> list[HostProcess]:
        return [p for p in self.processes if isinstance(p, HostProcess)]

    def host_of(self, peer_id: str) -> HostProcess:
        for process in self.processes:
            if isinstance(process, HostProcess) and process.short_id and process.serves(peer_id):
                return process
        raise KeyError(peer_id)

    def close(self) -> None:
        # Hosts first (all at once: each drains for a while), so that their OFFLINE
        # announcements still find the bootstrap node.
        hosts = [p for p in self.hosts() if p.alive]
        for host in hosts:
            host.popen.send_signal(signal.SIGTERM)
        for process in [*hosts, *self.processes]:
            process.terminate()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for process in list(_live):
            report.sections.append((f"{process.name} log (tail)", process.tail()))


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_gguf: Path) -> Any:
    """transformers' own SmolLM2, loaded once per test session (about 20 s)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_prompt(smollm2_gguf: Path) -> torch.Tensor:
    from stamen.models.loading import load_tokenizer

    tokenizer = load_tokenizer(smollm2_gguf)
    return tokenizer("The three primary colors are", return_tensors="pt").input_ids


def reference_greedy(reference: Any, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    with torch.inference_mode():
        return reference.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            min_new_tokens=max_new_tokens,
        )


def independent_client(
    model: DistributedModelForCausalLM, initial_peers: list[str]
) -> DistributedModelForCausalLM:
    """A second client of the same swarm: its own event loop, DHT node, identity,
    connections and ban list, sharing only `model`'s already loaded head (loading a head
    from the GGUF costs seconds per client on this machine)."""
    source = model.swarm
    loop = _LoopThread()
    credentials = Credentials.generate()

    async def connect() -> SwarmClient:
        swarm = SwarmClient(
            source.model_name,
            source.num_blocks,
            SchemeRouter(credentials),
            credentials,
            initial_peers=initial_peers,
            settings=source.settings,
        )
        await swarm.__aenter__()
        await swarm.wait_for_coverage(60.0)
        return swarm

    swarm = loop.run(connect())
    return DistributedModelForCausalLM(
        model.config, model.head, model.generation_config, swarm, loop
    )


def refresh(model: DistributedModelForCausalLM) -> None:
    """Re-read the DHT now instead of waiting for the client's next background refresh."""
    model._loop.run(model.swarm.refresh())


class FavouringView:
    """The swarm as a client with stale or lying records sees it: `favoured` claims to be
    a hundred times faster than anyone and to have room for anything, so routing picks it
    first. Everything else is the real `SwarmClient`'s."""

    def __init__(self, inner: SwarmClient, favoured: str) -> None:
        self._inner = inner
        self._favoured = favoured

    def hosts(self) -> list[HostInfo]:
        hosts = self._inner.hosts()
        fastest = max(h.throughput_tokens_s for h in hosts)
        return [
            HostInfo(
                h.peer_id, h.start, h.end, fastest * 100, 1 << 20, h.state, h.ping_s, h.started_at_s
            )
            if h.peer_id == self._favoured
            else h
            for h in hosts
        ]

    async def connect(self, peer_id: str) -> SpanClient:
        return await self._inner.connect(peer_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# -- one SmolLM2 swarm shared by the test_swarm_* modules (tcp) ------------------------


@pytest.fixture(scope="package")
def smollm2_swarm(
    tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path
) -> Iterator[SwarmProcesses]:
    """A bootstrap node and two hosts that choose their own 15 of SmolLM2's 30 blocks.
    Tests may add hosts (prefer `--dht-client` for short-lived ones: a server-mode DHT
    node that leaves makes everyone's lookups wait for it to time out) but must not stop
    these two."""
    processes = SwarmProcesses(tmp_path_factory.mktemp("smollm2-swarm"))
    try:
        processes.start_bootstrap()
        first = processes.start_host(smollm2_gguf, "--num-blocks", "15")
        second = processes.start_host(smollm2_gguf, "--num-blocks", "15")
        processes.wait_ready(first, second)
        yield processes
    finally:
        processes.close()


@pytest.fixture(scope="package")
def smollm2_model(
    smollm2_swarm: SwarmProcesses, smollm2_gguf: Path
) -> Iterator[DistributedModelForCausalLM]:
    model = AutoDistributedModelForCausalLM.from_pretrained(
        smollm2_gguf,
        initial_peers=[smollm2_swarm.dht],
        settings=ClientSettings(refresh_interval_s=1.0),
    )
    try:
        yield model
    finally:
        model.close()


@pytest.fixture(scope="package")
def smollm2_expected(smollm2_reference: Any, smollm2_prompt: torch.Tensor) -> torch.Tensor:
    """transformers' greedy continuation of `smollm2_prompt`, NEW_TOKENS long."""
    return reference_greedy(smollm2_reference, smollm2_prompt, NEW_TOKENS)


class KillAfter:
    """A streamer that SIGKILLs `victim()`'s process once `tokens` new tokens came out."""

    def __init__(self, tokens: int, victim: Any) -> None:
        self.tokens = tokens
        self.victim = victim
        self.seen = -1  # the first `put` is the prompt
        self.killed: HostProcess | None = None

    def put(self, value: torch.Tensor) -> None:
        self.seen += 1
        if self.seen == self.tokens and self.killed is None:
            self.killed = self.victim()
            self.killed.kill()

    def end(self) -> None:
        pass
