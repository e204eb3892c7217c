"""Where one swarm hop's time goes on a GPU host: each stage of a host's decode step timed in
isolation with the real functions, next to the end-to-end hop cost, in one run.

    python -m benchmarks.hop_breakdown [--hidden 4096 --layers 2] [--iterations 300]
    python -m benchmarks.hop_breakdown --device cpu --hidden 256   # a CPU smoke run

Stages, for one single-token step of a (1, 1, C) float32 hidden state (what a client sends):

- `wire decode`: `wire.decode_message` of the received Step frames (header + tensor frame);
- `H2D pageable` / `H2D pinned`: the hidden state to the GPU and cast to the span's dtype,
  from ordinary memory, and through a pinned staging buffer (copy + non-blocking transfer);
- `compute eager` / `compute graphs`: one host's span (half of `--layers`), `run_paged_span`
  eagerly and `DecodeGraphs.run` (graph replay), each followed by a device sync;
- `D2H + sync`: the output back to the CPU as float32 (`.cpu()`, which waits for the GPU),
  and through a pinned buffer with a non-blocking copy and one sync;
- `wire encode`: `wire.encode_message` of the StepResult the host answers with;
- `tcp round trip`: the Step frames sent over a `TcpTransport` stream on 127.0.0.1 and the
  reply frames sent back (an echo server; handshake and connection set up beforehand).

The end-to-end rows come from `gpu_swarm_speed` (2 `swarm-host` processes, `--layers`
blocks of a random Llama with `--hidden`, over tcp): ms added per hop against the eager and
the graph-captured local baselines, and the RPC ping. The residual is the added ms per hop
(vs graphs) minus the stages a hop adds to the compute (both wire codecs on both ends,
the copies with pinned buffers, the tcp round trip): what is left for the runtime, the
scheduler, the session checks and the forwarding between hosts. Medians throughout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_swarm_speed import Target, save_random_llama
from benchmarks.gpu_swarm_speed import run as run_swarm
from stamen.models.loading import load_span
from stamen.models.paged import DecodeGraphs, KVPool, pages_for, run_paged_span
from stamen.swarm_core.protocol.wire import Step, StepResult, decode_message, encode_message
from stamen.transports.base import Connection, Credentials
from stamen.transports.tcp import TcpTransport

CONTEXT = 128  # tokens cached before the timed step


def median_us(fn: Callable[[], object], iterations: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iterations):
        began = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - began)
    return statistics.median(samples) / 1e3


# --- the stages ------------------------------------------------------------------------


def wire_stages(hidden: torch.Tensor, iterations: int) -> dict[str, float]:
    """Decode of a received Step and encode of the StepResult, in microseconds."""
    request = [bytes(f) for f in encode_message(Step("s" * 32, CONTEXT), {"hidden": hidden})]
    reply = StepResult("s" * 32, CONTEXT + 1)
    return {
        "wire decode (Step)": median_us(lambda: decode_message(request), iterations),
        "wire encode (StepResult)": median_us(
            lambda: encode_message(reply, {"hidden": hidden}), iterations
        ),
        "client wire encode (Step)": median_us(
            lambda: encode_message(Step("s" * 32, CONTEXT), {"hidden": hidden}), iterations
        ),
        "client wire decode (StepResult)": median_us(
            lambda: decode_message([bytes(f) for f in encode_message(reply, {"hidden": hidden})]),
            iterations,
        ),
    }


def copy_stages(hidden: torch.Tensor, target: Target, iterations: int) -> dict[str, float]:
    """Host-device copies of one hidden state, each ending in a sync, in microseconds."""
    device, dtype = target.device, target.dtype
    pinned_in = torch.empty_like(hidden, pin_memory=device.type == "cuda")
    on_device = hidden.to(device, dtype)
    pinned_out = torch.empty(hidden.shape, dtype=torch.float32, pin_memory=device.type == "cuda")

    def h2d_pageable() -> None:
        hidden.to(device).to(dtype)
        target.synchronize()

    def h2d_pinned() -> None:
        pinned_in.copy_(hidden)
        pinned_in.to(device, non_blocking=True).to(dtype)
        target.synchronize()

    def d2h_pageable() -> None:
        on_device.float().cpu()

    def d2h_pinned() -> None:
        pinned_out.copy_(on_device, non_blocking=True)
        target.synchronize()

    return {
        "H2D pageable + cast": median_us(h2d_pageable, iterations),
        "H2D pinned + cast": median_us(h2d_pinned, iterations),
        "D2H pageable (.cpu())": median_us(d2h_pageable, iterations),
        "D2H pinned + sync": median_us(d2h_pinned, iterations),
    }


def compute_stages(
    model_dir: Path, blocks: int, target: Target, iterations: int
) -> dict[str, float]:
    """One host's span (blocks [0, blocks)) for a single-token step at CONTEXT, eager vs
    graph replay, in microseconds; the input already on the device."""
    span = load_span(model_dir, 0, blocks, dtype=target.dtype, device=target.device)
    pool = KVPool(
        span.adapter,
        span.config,
        blocks,
        pages_for(CONTEXT + 1, 16) + 1,
        dtype=target.dtype,
        device=target.device,
    )
    pool.clear_pages(range(pool.num_pages))
    pool.valid[1:] = True  # every slot before the step holds a (zero) token
    table = torch.arange(1, pool.num_pages)[None]  # (1, n_p)
    start = torch.tensor([CONTEXT])
    x = torch.randn(1, 1, span.config.hidden_size, device=target.device, dtype=target.dtype)
    graphs = DecodeGraphs(span.blocks, pool)
    table_d, start_d = table.to(target.device), start.to(target.device)

    def eager() -> None:
        run_paged_span(span.blocks, pool, x, table_d, start_d)
        target.synchronize()

    def replay() -> None:
        graphs.run(x, table, start)
        target.synchronize()

    return {
        "compute eager": median_us(eager, iterations),
        "compute graphs": median_us(replay, iterations),
    }


async def _tcp_round_trip_us(hidden: torch.Tensor, iterations: int) -> float:
    """Step frames out, StepResult frames back, over one loopback tcp stream."""
    request = encode_message(Step("s" * 32, CONTEXT), {"hidden": hidden})
    reply = [
        bytes(f) for f in encode_message(StepResult("s" * 32, CONTEXT + 1), {"hidden": hidden})
    ]
    server_credentials = Credentials.generate()
    server, client = TcpTransport(server_credentials), TcpTransport(Credentials.generate())

    async def echo(connection: Connection) -> None:
        stream = await connection.accept_stream()
        while True:
            await stream.recv()
            await stream.send(reply)

    listener = await server.listen("tcp://127.0.0.1:0", echo)
    samples = []
    try:
        connection = await client.connect(
            listener.addresses[0], expected_public_key=server_credentials.public_key
        )
        async with connection:
            stream = await connection.open_stream()
            for i in range(iterations + 10):
                began = time.perf_counter_ns()
                await stream.send(request)
                await asyncio.wait_for(stream.recv(), 10.0)
                if i >= 10:
                    samples.append(time.perf_counter_ns() - began)
            stream.reset()
    finally:
        await listener.close()
        await client.aclose()
        await server.aclose()
    return statistics.median(samples) / 1e3


# --- the report ----------------------------------------------------------------------------


def end_to_end(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """gpu_swarm_speed's measurement over the same model: added ms per hop and the ping."""
    swarm_args = argparse.Namespace(
        hidden=args.hidden,
        layers=args.layers,
        steps=args.steps,
        rounds=args.rounds,
        device=args.device,
        json=None,
    )
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        swarm_args.json = out.name
        asyncio.run(run_swarm(swarm_args, model_dir))
        numbers = json.loads(Path(out.name).read_text())
    added = numbers["added_ms_per_hop"]
    return {
        "eager": added["eager"],
        "graphs": added["graphs"],
        "ping_ms": numbers["ping_ms"],
        "step_ms": 1e3 / numbers["rates_steps_s"]["swarm"],
        "hosts": numbers["hosts"],
    }


def report(stages: dict[str, float], e2e: dict[str, Any] | None) -> list[str]:
    lines = [f"{'stage (one decode step, one hop)':<40}{'us':>10}"]
    lines += [f"{name:<40}{us:>10.1f}" for name, us in stages.items()]
    if e2e is None:
        return lines
    on_the_hop = [
        "client wire encode (Step)",
        "wire decode (Step)",
        "H2D pinned + cast",
        "D2H pinned + sync",
        "wire encode (StepResult)",
        "client wire decode (StepResult)",
        "tcp round trip (Step + StepResult)",
    ]
    counted = sum(stages[name] for name in on_the_hop)
    hosts = e2e["hosts"]
    added_us = e2e["graphs"] * 1e3
    lines += [
        "",
        f"{'end to end: added per hop vs eager local':<40}{e2e['eager'] * 1e3:>10.1f}",
        f"{'end to end: added per hop vs graph local':<40}{added_us:>10.1f}",
        f"{'RPC ping':<40}{e2e['ping_ms'] * 1e3:>10.1f}",
        f"{'sum of the hop stages above':<40}{counted:>10.1f}",
        f"{'residual (runtime, scheduler, relay)':<40}{added_us - counted:>10.1f}",
        "",
        "one swarm step as the hosts saw it (both hosts summed):",
        f"{'  client-observed step':<40}{e2e['step_ms'] * 1e3:>10.1f}",
        f"{'  in the hosts runtimes (SpanRuntime.step)':<40}{hosts['runtime_ms'] * 1e3:>10.1f}",
        f"{'  of it decode compute':<40}{hosts['decode_ms'] * 1e3:>10.1f}",
        f"{'  outside the runtimes':<40}{hosts['outside_ms'] * 1e3:>10.1f}",
        f"  graphs captured per host: {hosts['rounds'][-1]['graphs_captured']}",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda (default when available) or cpu",
    )
    parser.add_argument("--hidden", type=int, default=4096, help="model width (the frame's C)")
    parser.add_argument("--layers", type=int, default=2, help="blocks, split over 2 hosts")
    parser.add_argument("--iterations", type=int, default=300, help="timed calls per stage")
    parser.add_argument("--steps", type=int, default=100, help="end-to-end decode steps")
    parser.add_argument("--rounds", type=int, default=3, help="end-to-end rounds")
    parser.add_argument(
        "--no-end-to-end",
        dest="end_to_end",
        action="store_false",
        help="stages only (no swarm processes)",
    )
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    target = Target(torch.device(args.device))
    hidden = torch.randn(1, 1, args.hidden)  # (1, 1, C) float32, as a client sends it
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "random-llama"
        save_random_llama(model_dir, args.hidden, args.layers)
        stages = wire_stages(hidden, args.iterations)
        stages |= copy_stages(hidden, target, args.iterations)
        with torch.inference_mode():
            stages |= compute_stages(model_dir, max(1, args.layers // 2), target, args.iterations)
        stages["tcp round trip (Step + StepResult)"] = asyncio.run(
            _tcp_round_trip_us(hidden, args.iterations)
        )
        e2e = end_to_end(args, model_dir) if args.end_to_end else None
    lines = report(stages, e2e)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"stages_us": stages, "end_to_end_ms": e2e}, indent=1)
        )
    print(
        f"hop breakdown: {target.name()}, torch {torch.__version__}, {target.dtype}, "
        f"hidden {args.hidden}, {args.layers} blocks over 2 hosts, context {CONTEXT}"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
