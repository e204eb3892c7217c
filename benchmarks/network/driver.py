"""The swarm client's side of the network table, as a process in the client namespace:

    python -m benchmarks.network.driver GGUF --initial-peers HOST:PORT --forwarding on
        [--prefix-lengths 128,2048] [--decode-steps 16] [--batches 1,64]
        [--forward-tokens 128] [--prefill-rounds 1] [--bulk] [--generate-ids 1,2,3
        --generate-tokens 8]

For one forwarding mode it measures, through a client `InferenceSession` over every block:

- decode: single-sequence steps/s after prefilling a random (1, L) prefix, over
  `--decode-steps` timed steps (one untimed step first);
- prefill: tokens/s of one (B, T) step opening a session (the "parallel forward" of the
  table, which server-to-server forwarding applies to);
- bulk (with `--bulk`): tokens/s of the stateless `Forward` path, for reference;
- generate (with `--generate-ids`): greedy tokens through the swarm, which the caller
  compares with a local run.

It prints one JSON line (`{"mode": ...}`) on stdout; errors go to stderr, exit 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.network.local import greedy_tokens
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

    def measure(self, args: argparse.Namespace) -> dict[str, Any]:
        run = self.model._loop.run
        run(self.decode_steps_s(4, 2))  # connections, sessions and allocators warmed up
        result: dict[str, Any] = {
            "hidden_size": self.hidden_size,
            "decode_steps_s": {},
            "prefill_tokens_s": {},
            "bulk_tokens_s": {},
        }
        for prefix in args.prefix_lengths:
            result["decode_steps_s"][prefix] = run(self.decode_steps_s(prefix, args.decode_steps))
        T = args.forward_tokens
        for batch in args.batches:
            times = [run(self.prefill_s(batch, T)) for _ in range(args.prefill_rounds)]
            result["prefill_tokens_s"][batch] = batch * T / statistics.median(times)
            if args.bulk:
                result["bulk_tokens_s"][batch] = batch * T / self.bulk_s(batch, T)
        if args.generate_ids:
            ids = torch.tensor([args.generate_ids])
            result["generated"] = run(self.generate(ids, args.generate_tokens))
        result["step_stats"] = dict(self.stats)
        return result


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
    p.add_argument("--forwarding", choices=("on", "off"), required=True)
    p.add_argument("--prefix-lengths", type=_int_list, default=[128, 2048])
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--batches", type=_int_list, default=[1, 64])
    p.add_argument("--forward-tokens", type=int, default=128)
    p.add_argument("--prefill-rounds", type=int, default=1)
    p.add_argument("--bulk", action="store_true", help="also the stateless forward path")
    p.add_argument("--generate-ids", type=_int_list, default=[])
    p.add_argument("--generate-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if min(args.decode_steps, args.forward_tokens, args.prefill_rounds, args.generate_tokens) < 1:
        raise SystemExit(
            "--decode-steps, --forward-tokens, --prefill-rounds, --generate-tokens >= 1"
        )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(args.threads)
    forwarding = args.forwarding == "on"
    with AutoDistributedModelForCausalLM.from_pretrained(
        args.checkpoint,
        initial_peers=args.initial_peers,
        settings=client_settings(forwarding),
        wait_for_coverage_s=60.0,
    ) as model:
        result = Driver(model).measure(args)
    print(json.dumps({"mode": args.forwarding, **result}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
