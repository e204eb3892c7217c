"""The swarm client's side of the network table, as a process in the client namespace:

    python -m benchmarks.network.driver GGUF --initial-peers HOST:PORT [--modes off,on]
        [--rounds 3] [--prefix-lengths 128,2048] [--decode-steps 16] [--batches 1,64]
        [--forward-tokens 128] [--large-rounds 1] [--bulk] [--generate-ids 1,2,3
        --generate-tokens 8]

One client per forwarding mode (`off`: the client steps every host in turn; `on`:
server-to-server forwarding), and the same blocks loaded in this process (`local`, the
floors' compute). Each figure is measured in rounds that alternate the modes and the local
run, so that load from other work on the machine hits them alike; the report keeps the
median (the fastest, for the local compute):

- decode: single-sequence steps/s after prefilling a random (1, L) prefix, over
  `--decode-steps` timed steps (one untimed step first);
- prefill: tokens/s of one (B, T) step opening a session (the "parallel forward" of the
  table, which forwarding applies to); batches of more than `LARGE_TOKENS` tokens get
  `--large-rounds` rounds;
- bulk (with `--bulk`): tokens/s of the stateless `Forward` path, for reference;
- generate (with `--generate-ids`): greedy tokens through the swarm per mode, which the
  caller compares with a local run.

It prints one JSON line (`{"modes": ...}`) on stdout; errors go to stderr, exit 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.network.local import LocalModel, greedy_tokens
from stamen.swarm_core.client.distributed import (
    AutoDistributedModelForCausalLM,
    DistributedModelForCausalLM,
)
from stamen.swarm_core.client.inference import InferenceSession
from stamen.swarm_core.client.swarm import ClientSettings

STEP_TIMEOUT_S = 600.0  # a (64, 128) prefill on shared cores at 100 Mbit/s takes a while


def client_settings(forwarding: bool) -> ClientSettings:
    """Long timeouts, and server-to-server forwarding on or off."""
    return ClientSettings(
        step_timeout_s=STEP_TIMEOUT_S, bulk_timeout_s=STEP_TIMEOUT_S, forwarding=forwarding
    )


@dataclass
class Driver:
    """The measurements over one model; `stats` sums how every session's steps travelled,
    so the report shows that forwarding really happened (or really did not)."""

    model: DistributedModelForCausalLM
    stats: Counter[str] = field(default_factory=Counter)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @asynccontextmanager
    async def session(self, max_length: int, batch: int) -> AsyncIterator[InferenceSession]:
        session = InferenceSession(
            self.model.swarm,
            0,
            self.model.num_blocks,
            max_length,
            batch,
            ban_list=self.model.ban_list,
            step_timeout_s=STEP_TIMEOUT_S,
        )
        try:
            async with session:
                yield session
        finally:
            self.stats.update(dataclasses.asdict(session.stats))

    async def decode_steps_s(self, prefix: int, steps: int) -> float:
        """Steps/s of `steps` single-token steps after a (1, prefix) prefill and one more
        untimed step."""
        async with self.session(prefix + steps + 1, 1) as session:
            await session.step(torch.randn(1, prefix, self.hidden_size))
            token = torch.randn(1, 1, self.hidden_size)
            await session.step(token)
            began = time.perf_counter()
            for _ in range(steps):
                await session.step(token)
            return steps / (time.perf_counter() - began)

    async def prefill_s(self, batch: int, tokens: int) -> float:
        """Seconds of the one (B, T) step that fills a new session."""
        hidden = torch.randn(batch, tokens, self.hidden_size)
        async with self.session(tokens, batch) as session:
            began = time.perf_counter()
            out = await session.step(hidden)
            elapsed = time.perf_counter() - began
        if out.shape != hidden.shape:
            raise RuntimeError(f"prefill returned {tuple(out.shape)}")
        return elapsed

    async def generate(self, ids: torch.Tensor, new_tokens: int) -> list[int]:
        async with self.session(ids.shape[1] + new_tokens, 1) as session:
            return await greedy_tokens(self.model.head, session, ids, new_tokens)

    def bulk_s(self, batch: int, tokens: int) -> float:
        hidden = torch.randn(batch, tokens, self.hidden_size)
        began = time.perf_counter()
        self.model.remote_blocks().forward(hidden)
        return time.perf_counter() - began

    def generated(self, args: argparse.Namespace) -> list[int]:
        ids = torch.tensor([args.generate_ids])
        return self.model._loop.run(self.generate(ids, args.generate_tokens))


LARGE_TOKENS = 2048


def _rounds(args: argparse.Namespace, tokens: int) -> int:
    return int(args.large_rounds if tokens > LARGE_TOKENS else args.rounds)


def measure(
    drivers: dict[str, Driver], local: LocalModel | None, args: argparse.Namespace
) -> dict[str, Any]:
    """Every figure, in rounds alternating the modes and the local run."""
    C = next(iter(drivers.values())).hidden_size
    samples: dict[str, dict[str, dict[int, list[float]]]] = {
        mode: {"decode": defaultdict(list), "prefill": defaultdict(list), "bulk": defaultdict(list)}
        for mode in [*drivers, "local"]
    }
    for driver in drivers.values():
        driver.model._loop.run(driver.decode_steps_s(4, 2))  # connections, allocators warm
    for prefix in args.prefix_lengths:
        for _ in range(args.rounds):
            for mode, driver in drivers.items():
                rate = driver.model._loop.run(driver.decode_steps_s(prefix, args.decode_steps))
                samples[mode]["decode"][prefix].append(rate)
            if local is not None:
                samples["local"]["decode"][prefix].append(
                    local.decode_step_s(prefix, args.decode_steps)
                )
    T = args.forward_tokens
    for batch in args.batches:
        for _ in range(_rounds(args, batch * T)):
            for mode, driver in drivers.items():
                seconds = driver.model._loop.run(driver.prefill_s(batch, T))
                samples[mode]["prefill"][batch].append(batch * T / seconds)
                if args.bulk:
                    samples[mode]["bulk"][batch].append(batch * T / driver.bulk_s(batch, T))
            if local is not None:
                samples["local"]["prefill"][batch].append(local.prefill_s(batch, T))
    report: dict[str, Any] = {"hidden_size": C, "modes": {}}
    for mode, driver in drivers.items():
        figures = samples[mode]
        report["modes"][mode] = {
            "decode_steps_s": _medians(figures["decode"]),
            "prefill_tokens_s": _medians(figures["prefill"]),
            "bulk_tokens_s": _medians(figures["bulk"]),
            "samples": {kind: dict(values) for kind, values in figures.items() if values},
        }
        if args.generate_ids:
            report["modes"][mode]["generated"] = driver.generated(args)
        report["modes"][mode]["step_stats"] = dict(driver.stats)
    if local is not None:
        report["local"] = {
            "decode_s": _medians(samples["local"]["decode"]),
            "prefill_s": {b: min(v) for b, v in samples["local"]["prefill"].items()},
        }
    return report


def _medians(values: dict[int, list[float]]) -> dict[int, float]:
    return {key: statistics.median(v) for key, v in values.items()}


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"negative value in {text!r}")
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--initial-peers", nargs="+", required=True)
    p.add_argument("--modes", type=_modes, default=["off", "on"], help="forwarding off,on")
    p.add_argument("--rounds", type=int, default=3, help="rounds of each figure")
    p.add_argument("--large-rounds", type=int, default=1, help="rounds of large prefills")
    p.add_argument("--no-local", action="store_true", help="skip the local compute")
    p.add_argument("--prefix-lengths", type=_int_list, default=[128, 2048])
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--batches", type=_int_list, default=[1, 64])
    p.add_argument("--forward-tokens", type=int, default=128)
    p.add_argument("--bulk", action="store_true", help="also the stateless forward path")
    p.add_argument("--generate-ids", type=_int_list, default=[])
    p.add_argument("--generate-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    return p


def _modes(text: str) -> list[str]:
    modes = [m for m in text.split(",") if m]
    if not modes or not set(modes) <= {"off", "on"} or len(set(modes)) != len(modes):
        raise argparse.ArgumentTypeError(f"modes are off and/or on, got {text!r}")
    return modes


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    counts = (args.decode_steps, args.forward_tokens, args.rounds, args.large_rounds)
    if min(*counts, args.generate_tokens, args.threads) < 1:
        raise SystemExit("counts (steps, tokens, rounds, threads) must be >= 1")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(args.threads)
    with ExitStack() as stack:
        drivers = {
            mode: Driver(
                stack.enter_context(
                    AutoDistributedModelForCausalLM.from_pretrained(
                        args.checkpoint,
                        initial_peers=args.initial_peers,
                        settings=client_settings(mode == "on"),
                        wait_for_coverage_s=60.0,
                    )
                )
            )
            for mode in args.modes
        }
        local = None if args.no_local else LocalModel.load(Path(args.checkpoint))
        report = measure(drivers, local, args)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
