"""A whole swarm on this machine: one `swarm-bootstrap` and N `swarm-host` child processes.

This is the embedded default behind `swarm-api` with no peers, and a convenience for
demos and benchmarks:

    async with LocalSwarm(model_ref, num_hosts=2) as swarm:
        peers = swarm.initial_peers           # ["127.0.0.1:PORT"]

Blocks are split evenly and given to hosts with `--blocks`, so startup does not wait on
block selection; `spans` names the hosts' spans instead (overlaps give redundancy), and
`host_processes` lets a test or a demo stop or kill one host. Children log to files in
`log_dir` (a temporary directory by default); `start` waits for each to say it is ready
and raises `LocalSwarmError` with the tail of its log if one exits or times out. `stop`
sends SIGTERM (hosts announce OFFLINE) and kills what is still running after
`stop_timeout_s`. Children get `--parent-pid` of this process, so that they stop by
themselves (within about a second) if it dies without calling `stop`.

The children share this machine's cores, so they run with `OMP_WAIT_POLICY=PASSIVE`
(unless the environment says otherwise): with OpenMP's default spinning, an idle host's
threads keep burning the cores that the computing host needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

logger = logging.getLogger(__name__)

_BOOTSTRAP_READY = re.compile(r"swarm-bootstrap ready: dht=(\S+) signaling=(\S+)")
_HOST_READY = re.compile(r"serving blocks \[(\d+), (\d+)\)")


class LocalSwarmError(RuntimeError):
    """A child process of the local swarm failed to start."""


def split_blocks(num_blocks: int, num_hosts: int) -> list[tuple[int, int]]:
    """`num_blocks` blocks in `num_hosts` contiguous, near-equal spans."""
    num_hosts = max(1, min(num_hosts, num_blocks))
    bounds = [round(i * num_blocks / num_hosts) for i in range(num_hosts + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


@dataclass
class _Child:
    name: str
    process: asyncio.subprocess.Process
    log_path: Path
    log_file: IO[bytes]

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


@dataclass
class LocalSwarm:
    model_ref: str | Path
    num_blocks: int
    num_hosts: int = 2
    spans: Sequence[tuple[int, int]] | None = None  # [start, end) per host; None: split evenly
    transport: str = "tcp"
    host_args: Sequence[str] = ()
    log_dir: Path | None = None
    start_timeout_s: float = 300.0
    stop_timeout_s: float = 15.0
    initial_peers: list[str] = field(default_factory=list)
    signaling_address: str = ""
    _children: list[_Child] = field(default_factory=list)
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    async def __aenter__(self) -> LocalSwarm:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def logs(self) -> Path:
        if self.log_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="stamen-local-swarm-")
            self.log_dir = Path(self._tmp.name)
        return self.log_dir

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        bootstrap = await self._spawn(
            "bootstrap",
            "stamen.swarm_core.bootstrap_cli",
            "--listen",
            "127.0.0.1:0",
            "--signaling-listen",
            "127.0.0.1:0",
        )
        match = await self._wait_for(bootstrap, _BOOTSTRAP_READY)
        self.initial_peers = [match.group(1)]
        self.signaling_address = match.group(2)
        listen = (
            f"webrtc://{self.signaling_address}"
            if self.transport == "webrtc"
            else "tcp://127.0.0.1:0"
        )
        hosts = []
        spans = self.spans or split_blocks(self.num_blocks, self.num_hosts)
        for i, (start, end) in enumerate(spans):
            hosts.append(
                await self._spawn(
                    f"host{i}",
                    "stamen.swarm_core.host.cli",
                    str(self.model_ref),
                    "--blocks",
                    f"{start}:{end}",
                    "--transport",
                    self.transport,
                    "--listen",
                    listen,
                    "--initial-peers",
                    *self.initial_peers,
                    *self.host_args,
                )
            )
        # Hosts load their spans concurrently; wait for all of them.
        await asyncio.gather(*(self._wait_for(host, _HOST_READY) for host in hosts))
        logger.info("local swarm ready: %d hosts, DHT at %s", len(hosts), self.initial_peers[0])

    @property
    def host_processes(self) -> list[asyncio.subprocess.Process]:
        """The hosts' processes, in the order of their spans."""
        return [child.process for child in self._children[1:]]

    async def _spawn(self, name: str, module: str, *args: str) -> _Child:
        log_path = self.logs / f"{name}.log"
        log_file = log_path.open("wb")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            *args,
            "--parent-pid",
            str(os.getpid()),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            env={"OMP_WAIT_POLICY": "PASSIVE", **os.environ},
        )
        child = _Child(name, process, log_path, log_file)
        self._children.append(child)
        logger.info("started %s (pid %d), log %s", name, process.pid, log_path)
        return child

    async def _wait_for(self, child: _Child, pattern: re.Pattern[str]) -> re.Match[str]:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            match = pattern.search(child.log_path.read_text(errors="replace"))
            if match:
                return match
            if child.process.returncode is not None:
                raise LocalSwarmError(
                    f"{child.name} exited with {child.process.returncode}:\n{child.log_tail()}"
                )
            await asyncio.sleep(0.2)
        raise LocalSwarmError(
            f"{child.name} not ready after {self.start_timeout_s:g} s:\n{child.log_tail()}"
        )

    async def stop(self) -> None:
        """Stop hosts first (they announce OFFLINE through the bootstrap), then it."""
        for group in (self._children[1:], self._children[:1]):
            for child in group:
                if child.process.returncode is None:
                    child.process.terminate()
            await asyncio.gather(*(self._reap(child) for child in group))
        for child in self._children:
            child.log_file.close()
        self._children.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self.log_dir = None

    async def _reap(self, child: _Child) -> None:
        try:
            await asyncio.wait_for(child.process.wait(), self.stop_timeout_s)
        except TimeoutError:
            logger.warning("%s did not stop in %g s; killing it", child.name, self.stop_timeout_s)
            with contextlib.suppress(ProcessLookupError):
                child.process.kill()
            await child.process.wait()
