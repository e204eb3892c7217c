"""One swarm hop over tcp on loopback, and what it adds to the compute, in one run.

    .venv/bin/python benchmarks/hop_speed.py [--steps 200] [--rounds 3] [--blocks 3]
        [--compare OLD_SRC_DIR]

A host process serves blocks [0, `--blocks`) of the bundled SmolLM2-135M (float32) over
tcp; this process keeps one inference session open on it and times single-token decode
steps (`RpcHopSession.step`: encode, send, host runtime, run_span, reply, decode). Rows:

- hop step ms: one step through the host, median of rounds;
- local ms: the same blocks stepped with `run_span` in this process (the compute);
- added ms per hop: hop step - local, next to a bare RPC `Ping` round trip (the floor);
- runtime added ms: `SpanRuntime.step` in process minus `run_span` (the worker-thread
  hand-off and validation, no networking).

`--compare OLD_SRC_DIR` runs the same measurement with another source tree first on
`PYTHONPATH` (an older checkout's `src`), alternating trees round by round so that load
from other work on the machine hits both alike, and prints them side by side.
Every process uses `--threads` torch threads and OMP_WAIT_POLICY=PASSIVE.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from stamen.testing import git_revision

PREFILL_TOKENS = 16
MAX_LENGTH = 64


def _env(src: str | None, threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
    if src is not None:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


# --- the host process ---------------------------------------------------------------------


async def _serve(blocks: int) -> None:
    import torch

    from stamen.models.loading import load_span
    from stamen.swarm_core.host.runtime import RuntimeLimits, SpanRuntime
    from stamen.swarm_core.host.server import Host, HostSettings
    from stamen.swarm_core.protocol.records import HostState
    from stamen.testing import bundled_smollm2_gguf
    from stamen.transports.base import Credentials
    from stamen.transports.tcp import TcpTransport

    gguf = bundled_smollm2_gguf()
    span = load_span(gguf, 0, blocks, dtype=torch.float32)
    credentials = Credentials.generate()
    transport = TcpTransport(credentials)
    host = Host(HostSettings(str(gguf), "hop", blocks=(0, blocks)), credentials, transport)
    async with SpanRuntime(span, RuntimeLimits(max_cache_tokens=4096)) as runtime:
        host.runtime, host.state, host.span_range = runtime, HostState.ONLINE, (0, blocks)
        listener = await transport.listen("tcp://127.0.0.1:0", host._server().serve)
        print(json.dumps({"address": listener.addresses[0], "key": credentials.public_key.hex()}))
        sys.stdout.flush()
        await asyncio.to_thread(sys.stdin.read)  # serve until the parent closes our stdin
        await listener.close()


# --- the measuring process ----------------------------------------------------------------


async def _time_steps(step, hidden_size: int, steps: int) -> float:  # type: ignore[no-untyped-def]
    """Median ms of single-token steps at positions cycling over [PREFILL, MAX_LENGTH)."""
    import torch

    await step(torch.randn(1, PREFILL_TOKENS, hidden_size), 0)
    token = torch.randn(1, 1, hidden_size)
    samples = []
    for i in range(steps):
        position = PREFILL_TOKENS + i % (MAX_LENGTH - PREFILL_TOKENS)
        began = time.perf_counter()
        await step(token, position)
        samples.append(time.perf_counter() - began)
    return 1000 * statistics.median(samples)


async def _measure(blocks: int, steps: int, threads: int, host: dict[str, str]) -> dict[str, float]:
    import torch

    from stamen.models.chain import SpanCache, run_span
    from stamen.models.loading import load_span
    from stamen.swarm_core.client.pool import HostConnections
    from stamen.swarm_core.client.swarm import ClientSettings, RpcSpanClient
    from stamen.swarm_core.host.runtime import RuntimeLimits, SpanRuntime
    from stamen.swarm_core.protocol.rpc import RpcClient
    from stamen.swarm_core.protocol.wire import Hello, Ping
    from stamen.testing import bundled_smollm2_gguf
    from stamen.transports.base import Credentials
    from stamen.transports.tcp import TcpTransport

    torch.set_num_threads(threads)
    gguf = bundled_smollm2_gguf()
    span = load_span(gguf, 0, blocks, dtype=torch.float32)
    C = span.config.hidden_size
    cache = SpanCache.empty(span.adapter, span.config, blocks, 1, MAX_LENGTH, dtype=torch.float32)

    async def local(hidden: torch.Tensor, position: int) -> torch.Tensor:
        return run_span(span.blocks, cache, hidden, position)

    results = {"local_ms": await _time_steps(local, C, steps)}
    async with SpanRuntime(span, RuntimeLimits(max_cache_tokens=4096)) as runtime:
        session_id = await runtime.open_session(MAX_LENGTH, 1)

        async def in_runtime(hidden: torch.Tensor, position: int) -> torch.Tensor:
            return await runtime.step(session_id, hidden, position)

        results["runtime_ms"] = await _time_steps(in_runtime, C, steps)

    transport = TcpTransport(Credentials.generate())
    rpc = await RpcClient.connect(
        transport,
        host["address"],
        Hello.local(),
        expected_public_key=bytes.fromhex(host["key"]),
    )
    async with rpc:
        settings = ClientSettings(step_timeout_s=60.0)
        client = RpcSpanClient("hop-host", HostConnections.of(rpc), settings)
        hop = await client.open_session(0, blocks, MAX_LENGTH, 1)
        results["hop_ms"] = await _time_steps(hop.step, C, steps)
        await hop.close()
        pings = []
        for _ in range(steps):
            began = time.perf_counter()
            await rpc.call(Ping(), timeout_s=5.0)
            pings.append(time.perf_counter() - began)
        results["ping_ms"] = 1000 * statistics.median(pings)
    await transport.aclose()
    # Local compute again after the hop: the lower of the two is the compute floor.
    results["local2_ms"] = await _time_steps(local, C, steps)
    return results


def _measure_with_host(blocks: int, steps: int, threads: int) -> dict[str, float]:
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--blocks", str(blocks)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=_env(None, threads),
    )
    try:
        assert server.stdout is not None
        host = json.loads(server.stdout.readline())
        return asyncio.run(_measure(blocks, steps, threads, host))
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(30)


# --- the report ---------------------------------------------------------------------------


def _run_round(src: str | None, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--measure", "--blocks", str(args.blocks)]
    command += ["--steps", str(args.steps), "--threads", str(args.threads)]
    out = subprocess.run(
        command, env=_env(src, args.threads), capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _summary(rounds: list[dict[str, float]]) -> dict[str, float]:
    local = [min(r["local_ms"], r["local2_ms"]) for r in rounds]
    return {
        "hop step ms": statistics.median(r["hop_ms"] for r in rounds),
        "local ms (compute)": statistics.median(local),
        "added ms per hop": statistics.median(
            r["hop_ms"] - floor for r, floor in zip(rounds, local)
        ),
        "ping ms": statistics.median(r["ping_ms"] for r in rounds),
        "runtime added ms": statistics.median(
            r["runtime_ms"] - floor for r, floor in zip(rounds, local)
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compare", metavar="OLD_SRC_DIR", help="another tree's src dir")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(_serve(args.blocks))
        return 0
    if args.measure:
        print(json.dumps(_measure_with_host(args.blocks, args.steps, args.threads)))
        return 0
    trees = {"this tree": None} | ({"compare": str(Path(args.compare))} if args.compare else {})
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, src in reversed(trees.items()):
            rounds[name].append(_run_round(src, args))
    summaries = {name: _summary(r) for name, r in rounds.items()}
    revision = git_revision()
    print(
        f"one hop over tcp, {args.blocks} SmolLM2 blocks, decode steps of 1 token; "
        f"@ {revision}; {os.cpu_count()} cpus; torch threads {args.threads}; "
        f"medians of {args.rounds} rounds x {args.steps} steps"
    )
    names = list(trees)
    labels = [("compare: " + trees[n]) if trees[n] else n for n in names]
    print(f"{'':<22}" + "".join(f"{label[:28]:>30}" for label in labels))
    for row in summaries[names[0]]:
        print(f"{row:<22}" + "".join(f"{summaries[n][row]:>30.3f}" for n in names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
